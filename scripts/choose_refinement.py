"""Choose the pseudo-mask refinement settings on val, never on train or test.

    python scripts/choose_refinement.py                       # after `dvc repro make_pseudo_masks`
    python scripts/choose_refinement.py --conf-fg 0.6 0.7 --thresholds 0.3 0.35 0.4

make_pseudo_masks builds train pseudo-masks without any ground truth, but two of its settings,
``pseudo_masks.conf_fg`` (the CRF-confident foreground of IRN's seeds) and ``pseudo_masks.threshold`` (the
cut of the refined map), decide how good they are. This script runs the stage's own pipeline (PRMS, CRF
seeds, the affinity net that make_pseudo_masks trained on train's confident labels, random walk,
threshold, ``keep``) on the objects of the **val** split, whose ground truth is held out for exactly
this, and tabulates val pseudo-mask mIoU for every pair. ``params.yaml`` is left alone.

Pseudo-mask quality is a proxy: on the embedded default the threshold it prefers (0.6) gives a worse
Step-2 on val than 0.35, because Step-2 learns the masks' extent. So take ``conf_fg`` from this table,
and confirm the threshold through Step-2 on val with ``dvc exp run -S pseudo_masks.threshold=T``
(``docs/experiments.md``, "Settings chosen on val"; ``docs/refinement-on-val.md``).

The affinity net is the trained one in ``artifacts/affinity`` (its training labels used the current
``conf_fg`` / ``conf_bg``); only the seeds and the cut change per row, so the table is cheap. The
Markdown table goes to ``--out`` (default ``docs/refinement-on-val.md``) and is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline import paths
from pipeline.atomic import atomic_file, load_torch
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.eval.scoring import GroundTruth, object_ious
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.params import load_params
from pipeline.pseudo.affinity import AffinityNet
from pipeline.pseudo.labels import confident_seed_labels, load_split_responses, refined_maps, select_responses
from pipeline.pseudo.refine import to_pseudo_mask
from pipeline.runtime import select_device
from pipeline.store import open_responses

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "val"


def val_miou_grid(conf_fgs: list[float], thresholds: list[float]) -> tuple[np.ndarray, int]:
    """Val pseudo-mask mIoU for every ``(conf_fg, threshold)`` (rows, columns) and the number of objects."""
    params = load_params()
    p = params.pseudo_masks
    device = select_device(params.base.device)
    index = load_index(paths.INDEX)
    if SPLIT not in set(index.sentences["split"]):
        raise SystemExit(f"choose_refinement: the index has no {SPLIT!r} split; "
                         "refinement settings are chosen on val only")
    sentences = split_sentences(index.images, index.sentences, SPLIT)
    bank = ImageBank.from_index(index.images, p.size, workers=params.base.num_workers)
    responses = load_split_responses(open_responses(paths.RESPONSES), SPLIT)
    frozen = load_frozen_clip(paths.CLIP).to(device) if p.prms else None
    calibration_size = resolve_calibration_size(params.step1.calibration_size, frozen) if p.prms else 0
    selection = select_responses(sentences, responses, bank, frozen, use_prms=p.prms,
                                 off_choice=p.prms_off_choice, max_tokens=params.model.max_tokens,
                                 calibration_size=calibration_size, device=device, seed=params.base.seed)
    objects = selection.objects
    refs = [int(r) for r in objects["ref_id"]]
    net = None
    if p.refine == "irn":
        saved = load_torch(paths.AFFINITY / "affinity.pt")
        net = AffinityNet()
        net.load_state_dict(saved["model"])
        net = net.to(device).eval()
    gt = GroundTruth(index.refs)
    images = [bank.get(int(i)).permute(1, 2, 0).numpy() for i in objects["image_id"]]
    grid = np.zeros((len(conf_fgs), len(thresholds)))
    for row, conf_fg in enumerate(conf_fgs):
        q = p.model_copy(update={"conf_fg": conf_fg})
        seeds = {r: selection.fg_maps[r] for r in refs}
        if q.refine == "irn" and q.walk_seed == "confident":  # as make_pseudo_masks walks
            labels = confident_seed_labels(images, [seeds[r] for r in refs], q)
            seeds = {r: seeds[r] * (lab == 1) for r, lab in zip(refs, labels, strict=True)}
        with torch.no_grad():
            soft = refined_maps(objects, seeds, bank, q, net)
        for col, threshold in enumerate(thresholds):
            masks = {r: to_pseudo_mask(soft[r], threshold, q.keep) for r in refs}
            grid[row, col] = object_ious(masks, objects, gt).mean()
        print(f"[choose_refinement] conf_fg {conf_fg}: " +
              ", ".join(f"{t}: {v:.3f}" for t, v in zip(thresholds, grid[row], strict=True)), flush=True)
    return grid, len(objects)


def table(grid: np.ndarray, conf_fgs: list[float], thresholds: list[float], current: tuple[float, float],
          n_objects: int) -> str:
    """Markdown: the grid with the best cell in bold, and the current params' cell named."""
    best = np.unravel_index(int(np.argmax(grid)), grid.shape)
    lines = [f"# Refinement settings chosen on val ({n_objects} objects)", "",
             "Val pseudo-mask mIoU (vs val GT, which no training reads) of "
             "`python scripts/choose_refinement.py`; rows `pseudo_masks.conf_fg`, "
             "columns `pseudo_masks.threshold`.", "",
             "| conf_fg \\ threshold | " + " | ".join(f"{t:g}" for t in thresholds) + " |",
             "|---|" + "---|" * len(thresholds)]
    for r, conf_fg in enumerate(conf_fgs):
        cells = [f"**{v:.3f}**" if (r, c) == best else f"{v:.3f}" for c, v in enumerate(grid[r])]
        lines.append(f"| {conf_fg:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Best on val: conf_fg {conf_fgs[best[0]]:g}, threshold {thresholds[best[1]]:g} "
              f"(mIoU {grid[best]:.3f}). params.yaml: conf_fg {current[0]:g}, threshold {current[1]:g}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf-fg", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "refinement-on-val.md")
    args = parser.parse_args()
    grid, n = val_miou_grid(args.conf_fg, args.thresholds)
    p = load_params().pseudo_masks
    text = table(grid, args.conf_fg, args.thresholds, (p.conf_fg, p.threshold), n)
    with atomic_file(args.out) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
