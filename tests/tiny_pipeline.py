"""The tiny end-to-end configuration shared by the slow tests: a few dozen synthetic images and one
epoch per training, run through the same stage scripts `dvc repro` runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.params import overlay, read_params_yaml

ROOT = Path(__file__).resolve().parents[1]

# The tests' small CLIP (``model.clip.tiny`` keys): the one definition, also the ``tiny_clip`` fixture.
# A test that needs another size writes ``{**TINY_CLIP, "image_size": 96}``.
TINY_CLIP = {"embed_dim": 32, "image_size": 64, "vision_layers": [1, 1, 1, 1], "vision_width": 8,
             "text_width": 32, "text_heads": 2, "text_layers": 1}

TINY = {
    "base": {"seed": 3, "threads": 1},
    "synthesize": {"num_images": 40,
                   "split_fractions": {"train": 0.5, "val": 0.2, "testA": 0.15, "testB": 0.15}},
    # the CLIP is pretrained inside the run (the in-repro switch), not the shipped web CLIP's 128 wide one
    "inputs": {"weights": "models"},
    "model": {"clip": {"pretrained": "embedded", "tiny": TINY_CLIP}, "hidden_dim": 32},
    "pretrain_clip": {"epochs": 1, "batch_size": 8,
                      "frozen": {"pictures": 16, "epochs": 1, "image_size": 32}},
    "step1": {"input_size": 96, "epochs": 1, "batch_size": 8, "num_negatives": 7, "calibration_size": "auto"},
    "dump": {"batch_size": 16, "shard_size": 64},
    "evaluate": {"gallery_size": 1},
    "pseudo_masks": {"size": 64, "workers": 1, "affinity": {"epochs": 1, "input_size": 64, "max_samples": 40},
                     "random_walk": {"exp_times": 2}},
    "step2": {"input_size": 64, "epochs": 1, "batch_size": 8},
}


def stage_names() -> list[str]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def write_params(workdir: Path, override: dict | None = None) -> None:
    """``params.yaml`` of the tiny config (plus ``override``) in ``workdir``."""
    params = overlay(overlay(read_params_yaml(ROOT / "params.yaml"), TINY), override or {})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(workdir: Path, name: str, timeout: float = 600) -> str:
    """Run one stage script in ``workdir`` as DVC would; fail the test with its log on error."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py")], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    log = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"stage {name} failed:\n{log}"
    return result.stdout


def run_pipeline(workdir: Path, override: dict | None = None) -> dict:
    """Every stage of dvc.yaml in order on the tiny config; the final metrics.json."""
    write_params(workdir, override)
    for name in stage_names():
        run_stage(workdir, name)
    return json.loads((workdir / "artifacts/reports/metrics.json").read_text())
