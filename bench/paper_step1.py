"""Step-1 training throughput and peak GPU memory of the paper's architecture: the README's real-data
command (open_clip RN50 at 320 px, C_d = 1024, MaskCLIP projector init, a separate frozen ViT-B-32 scoring
224 px masked images) with the paper's batch of 48, N = 47 and K = 6.

No weights or data are downloaded: random RN50 / ViT-B-32 weights are saved to local checkpoint files
(as ``tests/test_paper_architecture.py`` does) and a small synthetic set in REFER's layout stands in for
RefCOCO. Throughput does not depend on the weights, so the figure is what a GPU user should expect per
image of Step-1 training on real data (images are preloaded, as the stage does).

    python -m bench.paper_step1 [--steps 4] [--warmup 2] [--keep DIR]

It builds a workdir (synthesize, index, pretrain_clip stages) and runs :mod:`bench.step1_throughput`
there: ``--steps`` timed steps after ``--warmup`` untimed ones, setup outside the timed window, with the
host syncs per step. Meant for a GPU; on a 2-core CPU one step of batch 48 takes minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench import step1_throughput
from bench.common import ROOT
from pipeline.params import overlay, read_params_yaml

# What replaces the README command's data location and weight paths (they exist on a user's machine only).
STAND_INS = {
    "data.refer.root": "artifacts/synthetic",
    "data.refer.dataset": "synthetic",
    "data.refer.image_dir": "artifacts/synthetic/images",
    "model.clip.pretrained": "{weights}/RN50-checkpoint.pt",
    "model.frozen_clip.pretrained": "{weights}/ViT-B-32-state-dict.pt",
    "inputs.refs": "artifacts/synthetic",
    "inputs.images": "artifacts/synthetic/images",
    "inputs.weights": "{weights}",
    "base.device": "auto",  # the README asks for cuda; the bench also runs (slowly) without a GPU
}
PAPER_BATCH = {"batch_size": 48, "num_negatives": 47, "calibration_negatives": 6}


def readme_overrides(readme: Path = ROOT / "README.md") -> list[str]:
    """The ``-S`` values of the first ``dvc exp run`` block of README "Real data and real CLIP weights"."""
    text = readme.read_text()
    section = text.split("## Real data and real CLIP weights", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(dvc exp run .*?)```", section, re.S)
    if not block:
        raise SystemExit(f"{readme}: no `dvc exp run` block under 'Real data and real CLIP weights'")
    return re.findall(r"-S (\S+)", block.group(1))


def overrides_to_dict(pairs: list[str]) -> dict:
    """``key.sub=value`` pairs as the nested mapping ``dvc exp run -S`` would merge (YAML values)."""
    out: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def paper_params(weights: Path, num_images: int) -> dict:
    """``params.yaml`` of the README's real-data command with the stand-ins, on ``num_images`` synthetic
    images (half of them train) and the paper's Step-1 batch."""
    pairs = [f"{k}={STAND_INS[k].format(weights=weights)}" if k in STAND_INS else f"{k}={v}"
             for k, v in (p.split("=", 1) for p in readme_overrides())]
    small = {"synthesize": {"num_images": num_images,
                            "split_fractions": {"train": 0.5, "val": 0.2, "testA": 0.15, "testB": 0.15}},
             "step1": PAPER_BATCH}
    base = read_params_yaml(ROOT / "params.yaml")
    return overlay(overlay(base, overrides_to_dict(pairs)), small)


def write_random_weights(weights: Path) -> None:
    """Random RN50 as an open_clip training checkpoint, random ViT-B-32 as a plain state dict."""
    import open_clip
    import torch

    torch.manual_seed(0)
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("RN50").state_dict()},
               weights / "RN50-checkpoint.pt")
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights / "ViT-B-32-state-dict.pt")


def build_workdir(workdir: Path, steps: int, warmup: int = 2) -> None:
    """Weights, params and the three stages Step-1 training reads (synthesize, index, pretrain_clip)."""
    weights = workdir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    write_random_weights(weights)
    # (warmup + steps) full batches of distinct train images; the train split is half of the set
    num_images = 2 * (warmup + steps) * PAPER_BATCH["batch_size"] + 16
    params = paper_params(weights, num_images)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path}
    # the stand-in REFER data comes from synthesize, which writes nothing under data.source=refer
    for stage, source in (("synthesize", "synthetic"), ("index", None), ("pretrain_clip", None)):
        run_params = overlay(params, {"data": {"source": source}}) if source else params
        (workdir / "params.yaml").write_text(yaml.safe_dump(run_params, sort_keys=False))
        result = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=workdir, env=env,
                                capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"bench.paper_step1: stage {stage} failed:\n{result.stderr[-3000:]}")


def run(steps: int = 4, keep: Path | None = None, warmup: int = 2) -> dict:
    """:func:`bench.step1_throughput.run` in a freshly built workdir (a temporary one unless ``keep``)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = keep or Path(tmp)
        build_workdir(workdir, steps, warmup)
        here = Path.cwd()
        os.chdir(workdir)
        try:
            return step1_throughput.run(steps, warmup)
        finally:
            os.chdir(here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--keep", type=Path, help="build the workdir here and keep it")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    r = run(args.steps, args.keep.resolve() if args.keep else None, args.warmup)
    print(step1_throughput.describe(
        r, "Step-1 of the paper's architecture (RN50 320 px, C_d 1024, frozen ViT-B-32 at 224, batch 48)"))
    if step1_throughput.sites(r):
        print("host syncs in the timed steps, by call site:\n" + step1_throughput.sites(r))


if __name__ == "__main__":
    main()
