"""End to end: every DVC stage, in dvc.yaml order, on a tiny config (a few dozen images, one epoch
each), through the same stage scripts `dvc repro` runs. Marked slow; `make test` (and so CI) runs it.

Run twice with one seed, the pipeline must give identical metrics (CPU determinism).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_pipeline import ROOT, run_pipeline


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
    assert "Step-1, authors' binarisation" in (reports / "summary.md").read_text()
    for split in first["step1"].values():
        assert split["authors_binarisation"]["PointM"] == split["PointM"]

    # the refinement settings are chosen on val from what the stages built (issue 14, finding 6)
    out = tmp_path / "refinement-on-val.md"
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "choose_refinement.py"), "--conf-fg", "0.6",
                           "0.7", "--thresholds", "0.35", "0.6", "--out", str(out)], cwd=tmp_path / "a",
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 0.6 |", "| 0.7 |"))]
    values = [float(v.strip(" *")) for line in rows for v in line.split("|")[2:-1]]
    assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values) and table.count("**") == 2

    # how often Eq. 8's positive term is clamped dead (issue 14, finding 2), at init and trained
    script = ["-m", "research.calibration_gradient"]
    done = subprocess.run([sys.executable, *script, "--images", "16"], cwd=tmp_path / "a", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith(("| at ", "| trained"))]
    assert len(rows) == 2 and all(0.0 <= float(rows[r][0]) <= 1.0 for r in (0, 1))
    assert all(0.0 <= float(rows[r][3]) <= 1.0 for r in (0, 1))

    # the masked-object ranking by expression family reproduces pretrain_clip's overall figure
    script = ["-m", "research.ranking_by_family"]
    done = subprocess.run([sys.executable, *script], cwd=tmp_path / "a", env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    overall = next(line for line in done.stdout.splitlines() if line.startswith("| all |"))
    diagnostic = json.loads((reports / "clip_diagnostic.json").read_text())
    assert float(overall.split("|")[2]) == pytest.approx(diagnostic["rate"], abs=5e-4)
    # ... and, split by the attributes named, beside Step-1's object-level grounding of the dumped maps
    done = subprocess.run([sys.executable, *script, "--by", "kind", "--step1"], cwd=tmp_path / "a", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    by_kind = {r[0].strip(): [float(v) for v in r[1:]] for r in rows}
    assert all(0.0 <= v <= 1.0 for r in by_kind.values() for v in r[:4])
    assert sum(r[4] for k, r in by_kind.items() if k != "all") == by_kind["all"][4]

    # one-word minimal pairs under the frozen CLIP and the trained localiser's sentence feature
    script = ["-m", "research.text_separation"]
    done = subprocess.run([sys.executable, *script, "--split", "train", "--step1"], cwd=tmp_path / "a",
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    assert "random" in rows and all(len(r) == 3 and -1.0 <= float(r[1]) <= 1.0 for r in rows.values())

    # issue 14's from-scratch baseline trains on the split and reports val grounding by kind
    script = ["-m", "research.scratch_baseline"]
    done = subprocess.run([sys.executable, *script, "--max-steps", "2", "--batch-size", "4", "--size", "64",
                           "--width", "8", "--eval-every", "1000"], cwd=tmp_path / "a", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.splitlines()[-1])
    assert record["step"] == 2 and 0.0 <= record["PointM"] <= 1.0 and 0.0 <= record["object_hit"] <= 1.0
    assert record["hit_by_kind"] and all(0.0 <= v <= 1.0 for v in record["hit_by_kind"].values())

    # Step-1 from a tiny CLIP of another width (pretrained again), from it reset, with the baseline's CNN;
    # pretrained again at the stage's own width (8), the sweep's CLIP is the stage's, weight for weight
    script = ["-m", "research.step1_sweep"]
    sweep_out = tmp_path / "sweep.jsonl"
    done = subprocess.run([sys.executable, *script, "16:1111:cls_full_lr:scratch_128s8_6ep",
                           "8:1111:cls_full_lr", "clip:cls_baseline_settings:baseline_cnn_settings",
                           "--epochs", "1", "--work", str(tmp_path / "sweep"), "--out", str(sweep_out)],
                          cwd=tmp_path / "a", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in sweep_out.read_text().splitlines()]
    clip, clip8 = runs.pop(0), runs.pop(2)  # the two pretraining records; the rest are Step-1 runs
    assert clip["clip"] == "clip_w16_l1111_e1" and 0.0 <= clip["ranking"] <= 1.0
    assert clip8["clip"] == "clip_w8_l1111_e1"
    assert clip8["ranking"] == pytest.approx(diagnostic["rate"], abs=1e-3)
    assert [(r["clip"], r["variant"]) for r in runs] == [("clip_w16_l1111_e1", "cls_full_lr"),
                                                         ("clip_w16_l1111_e1", "scratch_128s8_6ep"),
                                                         ("clip_w8_l1111_e1", "cls_full_lr"),
                                                         ("clip", "cls_baseline_settings"),
                                                         ("clip", "baseline_cnn_settings")]
    stage_clip = torch.load(tmp_path / "a" / "artifacts" / "clip" / "clip.pt", weights_only=True)
    sweep_clip = torch.load(tmp_path / "sweep" / "clip_w8_l1111_e1" / "clip.pt", weights_only=True)
    assert stage_clip.keys() == sweep_clip.keys()
    assert all(torch.equal(stage_clip[k], sweep_clip[k]) for k in stage_clip)
    assert all(0.0 <= r["PointM"] <= 1.0 and 0.0 <= r["object_hit"] <= 1.0 and r["hit_by_kind"] for r in runs)
    # the embedded frozen scorer over seeds (seed 0 is the one the stage would build), and Step-1
    # calibrated with one of them through the sweep's --frozen
    seeds = subprocess.run([sys.executable, "-m", "research.frozen_scorer_seeds", "--seeds", "0",
                            "1", "--kinds", "scene", "--pictures", "4", "--epochs", "1", "--out-dir",
                            str(tmp_path / "scorers")], cwd=tmp_path / "a", env=env, capture_output=True,
                           text=True, timeout=600)
    assert seeds.returncode == 0, seeds.stderr[-3000:]
    table = {r.split("|")[1].strip(): [float(v) for v in r.split("|")[2:-1]]
             for r in seeds.stdout.splitlines() if r.startswith("| ") and not r.startswith("| family")}
    assert set(table) <= {"attribute", "position", "relation", "all"} and "all" in table
    assert all(len(v) == 4 and 0.0 <= min(v[:3]) <= max(v[:3]) <= 1.0 for v in table.values())
    assert table["all"][2] == pytest.approx((table["all"][0] + table["all"][1]) / 2, abs=1e-3)  # printed .3f
    done = subprocess.run([sys.executable, *script, "clip:default_native_scorer", "--epochs", "1", "--frozen",
                           str(tmp_path / "scorers" / "seed0"), "--out", str(sweep_out)], cwd=tmp_path / "a",
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(sweep_out.read_text().splitlines()[-1])
    assert record["variant"] == "default_native_scorer" and record["frozen"].endswith("seed0")
    assert 0.0 <= record["PointM"] <= 1.0
    done = subprocess.run([sys.executable, *script, "16:1111:no_such_variant"], cwd=tmp_path / "a", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "unknown variant(s) ['no_such_variant']" in done.stderr

    second = run_pipeline(tmp_path / "b")
    assert second == first, "two CPU runs with one seed must give identical metrics"
