"""End to end: every DVC stage, in dvc.yaml order, on a tiny config (a few dozen images, one epoch
each), through the same stage scripts `dvc repro` runs. Marked slow; `make test` (and so CI) runs it.

Run twice with one seed, the pipeline must give identical metrics (CPU determinism).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "base": {"seed": 3, "threads": 1},
    "synthesize": {"num_images": 40,
                   "split_fractions": {"train": 0.5, "val": 0.2, "testA": 0.15, "testB": 0.15}},
    "model": {"clip": {"tiny": {"embed_dim": 32, "image_size": 64, "vision_layers": [1, 1, 1, 1],
                                "vision_width": 8, "text_width": 32, "text_heads": 2, "text_layers": 1}},
              "hidden_dim": 32},
    "pretrain_clip": {"epochs": 1, "batch_size": 8},
    "step1": {"input_size": 96, "epochs": 1, "batch_size": 8, "num_negatives": 7, "calibration_size": 64},
    "dump": {"batch_size": 16, "shard_size": 64},
    "evaluate": {"gallery_size": 1},
    "pseudo_masks": {"size": 64, "workers": 1, "affinity": {"epochs": 1, "input_size": 64, "max_samples": 40},
                     "random_walk": {"exp_times": 2}},
    "step2": {"input_size": 64, "epochs": 1, "batch_size": 8},
}


def stage_names() -> list[str]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run_pipeline(workdir: Path) -> dict:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    for name in stage_names():
        result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=600)
        log = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"stage {name} failed:\n{log}"
    return json.loads((workdir / "artifacts/reports/metrics.json").read_text())


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
