"""How well could *any* model do on the retrieval-among-48 diagnostic of the embedded default?

    python -m research.retrieval_ceiling [--split val] [--candidates 48]

``pretrain_clip``'s ``retrieval`` diagnostic scores a whole image against one of its own expressions and
``candidates - 1`` expressions of other images (Eq. 7's premise). On the synthetic world many of those
other expressions are *true* of the image too: "the square" is true of every image with exactly one
square. This script replays the diagnostic's candidate draws (same seed, same order) with an oracle that
reads the generator's scene description (``scenes.json``): a candidate is true of the image when it
singles out one of its objects (the generator's own ``resolve``). An oracle that cannot tell true
candidates apart retrieves the own expression with probability ``1 / #true``; the mean of that is the
ceiling printed here. Reads scene layouts only (no masks), and no training step ever calls it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.data.synthetic.expressions import parse_expression, resolve
from pipeline.data.synthetic.scene import SceneObject
from pipeline.eval.clip_checks import retrieval_candidates


def load_scene_objects(scenes_json: Path) -> dict[int, list[SceneObject]]:
    """image_id -> the objects the generator placed (``scenes.json`` of the synthesize stage)."""
    scenes = json.loads(Path(scenes_json).read_text())["images"]
    return {int(s["image_id"]): [SceneObject(**{k: v for k, v in o.items() if k != "ann_id"})
                                 for o in s["objects"]] for s in scenes}


def oracle_retrieval(objects: dict[int, list[SceneObject]], sentences: pd.DataFrame, split: str,
                     candidates: int = 48, seed: int = 0) -> dict:
    """Expected retrieval of a scene-reading oracle, with the candidate draws of
    :func:`pipeline.eval.clip_checks.expression_retrieval`
    (:func:`~pipeline.eval.clip_checks.retrieval_candidates`);
    also the mean number of true candidates."""
    rows = sentences[sentences["split"] == split].sort_values("sent_id", kind="stable")
    meanings = [parse_expression(t) for t in rows["text"]]
    expected, true_counts = [], []
    for image_id, cand in retrieval_candidates(rows["image_id"].to_numpy(), candidates, seed):
        n_true = sum(resolve(meanings[c], objects[image_id]) is not None for c in cand)
        expected.append(1 / max(n_true, 1))
        true_counts.append(n_true)
    return {"split": split, "ceiling": round(float(np.mean(expected)), 4),
            "true_candidates_mean": round(float(np.mean(true_counts)), 2), "n": len(expected),
            "chance": round(1 / candidates, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--candidates", type=int, default=48)
    args = parser.parse_args()
    scenes = next(paths.SYNTHETIC.glob("*/scenes.json"), None)
    if scenes is None:
        raise SystemExit(f"retrieval_ceiling: no */scenes.json under {paths.SYNTHETIC}; "
                         "run `dvc repro index`")
    sentences = pd.read_parquet(paths.INDEX / "sentences.parquet")
    r = oracle_retrieval(load_scene_objects(scenes), sentences, args.split, args.candidates)
    print(f"{r['split']}: a scene-reading oracle retrieves the own expression among {args.candidates} for "
          f"{r['ceiling']:.3f} of images (chance {r['chance']:.3f}); {r['true_candidates_mean']:.1f} of the "
          f"{args.candidates} candidates are true of an image on average (n = {r['n']})")


if __name__ == "__main__":
    main()
