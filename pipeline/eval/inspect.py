"""Render stored Step-1 responses over their images, to look at what the model localises.

``python -m pipeline.eval.inspect --responses artifacts/responses.zarr --index artifacts/index --split val
--sample 8 --out inspect/`` writes one PNG per sentence: the image with the ground-truth contour, and
the response map (upsampled bilinearly to the original image size, then min-max normalised, exactly as
evaluation does) overlaid as a heat map with its maximum point, captioned with the expression and its
IoU / PointM / PointIt / Acc_box outcome at ``--threshold``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_file
from pipeline.data.images import read_image_rgb
from pipeline.data.index import Index, decode_mask, load_index
from pipeline.eval.metrics import SentenceScore, point_from_map, score_sentence
from pipeline.eval.scoring import response_to_prob
from pipeline.eval.viz import render_case
from pipeline.store import RecordStore, open_responses


def _lookup(table: pd.DataFrame, column: str, key: int) -> pd.Series:
    rows = table[table[column] == int(key)]
    if rows.empty:
        raise KeyError(f"{column} {key} not in the index")
    return rows.iloc[0]


def render_sentence(
    store: RecordStore,
    index: Index,
    split: str,
    sent_id: int,
    threshold: float = 0.5,
    image_root: str | Path | None = None,
) -> tuple[np.ndarray, SentenceScore]:
    """The inspection panel of one sentence and its metric outcome."""
    response = store.get(split, sent_id)  # KeyError naming sent_id if absent
    sentence = _lookup(index.sentences, "sent_id", sent_id)
    ref = _lookup(index.refs, "ref_id", sentence["ref_id"])
    image_row = _lookup(index.images, "image_id", sentence["image_id"])
    image_path = Path(image_row["path"])
    if image_root is not None and not image_path.is_absolute():
        image_path = Path(image_root) / image_path
    image = read_image_rgb(image_path)
    gt_mask = decode_mask(ref)
    if image.shape[:2] != gt_mask.shape:
        raise ValueError(
            f"sent_id {sent_id}: image {image_path} is {image.shape[:2]} but its GT mask is {gt_mask.shape}"
        )
    map01 = response_to_prob(response, *image.shape[:2])
    score = score_sentence(map01, gt_mask, list(ref["bbox"]), threshold)
    point = point_from_map(map01)
    hit = {True: "hit", False: "miss"}
    text = (
        f'"{sentence["text"]}" (sent {sent_id})\n'
        f"IoU@{threshold:g} {score.iou:.2f} | PointM {hit[score.point_m]} | "
        f"PointIt {hit[score.point_it]} | Acc_box {hit[score.box_hit]}"
    )
    return render_case(image, map01, gt_mask, text, point), score


def choose_sent_ids(
    store: RecordStore, split: str, sent_ids: Sequence[int] | None, sample: int, seed: int
) -> list[int]:
    """The given ids, or ``sample`` ids drawn without replacement (seeded) from the split, sorted."""
    if sent_ids:
        return [int(s) for s in sent_ids]
    available = store.keys(split)
    rng = np.random.default_rng(seed)
    picked = rng.choice(available, size=min(sample, len(available)), replace=False)
    return sorted(int(s) for s in picked)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.inspect",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--responses", required=True, type=Path, help="responses.zarr")
    parser.add_argument("--index", required=True, type=Path, help="folder with the index parquet tables")
    parser.add_argument("--split", required=True)
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--sent-ids", nargs="+", type=int, help="sentences to render")
    pick.add_argument("--sample", type=int, default=8, help="number of random sentences (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.5, help="binarisation of the [0, 1] map")
    parser.add_argument("--image-root", type=Path, default=None, help="prefix for relative image paths")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs (created)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    store = open_responses(args.responses)
    index = load_index(args.index)
    args.out.mkdir(parents=True, exist_ok=True)
    for sent_id in choose_sent_ids(store, args.split, args.sent_ids, args.sample, args.seed):
        panel, score = render_sentence(store, index, args.split, sent_id, args.threshold, args.image_root)
        target = args.out / f"{args.split}_{sent_id}.png"
        with atomic_file(target) as tmp:
            Image.fromarray(panel).save(tmp, format="PNG")
        print(f"{target}  IoU {score.iou:.3f}  PointM {int(score.point_m)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
