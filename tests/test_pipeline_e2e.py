"""End to end: every DVC stage, in dvc.yaml order, on a tiny config (a few dozen images, one epoch
each), through the same stage scripts `dvc repro` runs. Marked slow; `make test` (and so CI) runs it.

Run twice with one seed, the pipeline must give identical metrics (CPU determinism).
"""

import pytest
from tiny_pipeline import run_pipeline


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_is_deterministic(tmp_path):
    first = run_pipeline(tmp_path / "a")
    reports = tmp_path / "a" / "artifacts" / "reports"
    assert set(first) == {"step1", "step2", "pseudo_masks"}
    for step in ("step1", "step2"):
        assert set(first[step]) == {"val", "testA", "testB"}
        for split in first[step].values():
            assert 0.0 <= split["mIoU"] <= 1.0 and split["n"] > 0
    assert first["pseudo_masks"]["n_objects"] > 0
    assert (reports / "summary.md").read_text().startswith("# TRIS pipeline summary")
    assert (reports / "step1_gallery" / "index.html").is_file()
    assert (reports / "gallery" / "index.html").is_file()
    assert (tmp_path / "a" / "artifacts" / "step1" / "live").is_dir()

    second = run_pipeline(tmp_path / "b")
    assert second == first, "two CPU runs with one seed must give identical metrics"
