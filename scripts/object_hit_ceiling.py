"""The object-hit ceiling of a Step-1 that reads attributes perfectly and position or relation not at all.

    python scripts/object_hit_ceiling.py                 # val, after `dvc repro index`
    python scripts/object_hit_ceiling.py --split testA

``evaluate_step1`` reports the **object hit**: does the Step-1 map respond most to the referred object
among the image's referred objects (:mod:`pipeline.eval.grounding`). This script says how high that can
go for a model that grounds the *attribute part* of every expression perfectly (size, colour, shape)
and ignores its position or relation words, so that targets set by expression kind can be checked
against what attributes alone allow. It reads only the generator's truth: the expressions
(``artifacts/index/sentences.parquet``), which object each one refers to (``refs.parquet``'s
``ann_id``, no mask) and the objects the generator placed (``artifacts/synthetic/*/scenes.json``).

The rule, per expression of the split whose image has two or more referred objects (the expressions
the object hit counts):

1. parse it with the generator's own parser (``parse_expression``) and keep its target description
   (``Expr.target``: the size, colour and shape words; for a relation, the words before the relation,
   never the anchor);
2. take the image's referred objects that description matches (``Desc.matches``, the generator's own
   predicate); the referred object is always one of them;
3. the model cannot tell those apart, so it picks one uniformly: the expected hit is
   ``1 / len(matching)``.

The ceiling is the mean of that expected hit. Attribute expressions single their object out by
construction, so they score 1; position and relation expressions are generated only when their
attribute part is ambiguous, so they score at most 1/2. No model, mask or training step is involved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import paths
from pipeline.data.synthetic.expressions import parse_expression
from pipeline.data.synthetic.scene import SceneObject
from pipeline.eval.grounding import FAMILIES, expression_kind, group_order

Scenes = dict[int, dict[int, SceneObject]]


def load_scenes(scenes_json: Path) -> Scenes:
    """``image_id`` -> ``ann_id`` -> the object the generator placed, from the synthesize stage's
    ``scenes.json``."""
    try:
        scenes = json.loads(Path(scenes_json).read_text())["images"]
        return {int(s["image_id"]): {int(o.pop("ann_id")): SceneObject(**o) for o in s["objects"]}
                for s in scenes}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{scenes_json}: not a synthesize scenes.json ({err})") from None


def expected_hits(scenes: Scenes, sentences: pd.DataFrame, refs: pd.DataFrame,
                  split: str) -> pd.DataFrame:
    """Per expression of ``split`` whose image has two or more referred objects: ``sent_id``, ``text``,
    ``hit`` (the expected hit ``1 / #referred objects matching its attribute part``), ``objects`` and
    ``matching``. ``refs`` needs ``ref_id``, ``ann_id`` and ``image_id`` (the index's refs table)."""
    ann_of = refs.set_index("ref_id")["ann_id"].to_dict()
    referred = refs.groupby("image_id")["ann_id"].apply(lambda s: {int(a) for a in s}).to_dict()
    records = []
    for row in sentences[sentences["split"] == split].itertuples(index=False):
        ann_ids = referred.get(row.image_id, set())
        if len(ann_ids) < 2:
            continue
        if row.image_id not in scenes:
            raise ValueError(f"scenes.json has no image_id {row.image_id} (sent_id {row.sent_id}); "
                             "is it from the synthesize run behind this index?")
        objects = {a: o for a, o in scenes[row.image_id].items() if a in ann_ids}
        target = parse_expression(row.text).target
        matching = [a for a, o in objects.items() if target.matches(o)]
        if int(ann_of[row.ref_id]) not in matching:
            raise ValueError(f"sent_id {row.sent_id} {row.text!r}: its own object (ann_id "
                             f"{ann_of[row.ref_id]}) does not match its attribute part")
        records.append({"sent_id": int(row.sent_id), "text": row.text, "hit": 1.0 / len(matching),
                        "objects": len(objects), "matching": len(matching)})
    if not records:
        raise ValueError(f"split {split!r}: no expression whose image has two or more referred objects")
    return pd.DataFrame.from_records(records)


def ceiling_table(hits: pd.DataFrame) -> pd.DataFrame:
    """Ceiling, chance (``1 / objects``), share and count per family, per kind and ``all`` (the groups
    of ``object_hit_by_kind``)."""
    kinds = hits["text"].map(expression_kind)
    families = kinds.str.split(":").str[0]
    groups = {**{f: families == f for f in set(families)},
              **{k: kinds == k for k in set(kinds) if k not in FAMILIES}}
    rows = []
    for name, rows_of in [*((g, groups[g]) for g in group_order(groups)), ("all", np.ones(len(hits), bool))]:
        part = hits[rows_of]
        rows.append({"group": name, "ceiling": part["hit"].mean(), "chance": (1.0 / part["objects"]).mean(),
                     "share": len(part) / len(hits), "n": len(part)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--scenes", type=Path, default=None,
                        help=f"the generator's scenes.json (default: the one under {paths.SYNTHETIC})")
    parser.add_argument("--index", type=Path, default=paths.INDEX, help="the index stage's folder")
    args = parser.parse_args(argv)
    scenes_json = args.scenes or next(paths.SYNTHETIC.glob("*/scenes.json"), None)
    if scenes_json is None:
        sys.exit(f"object_hit_ceiling: no */scenes.json under {paths.SYNTHETIC}; run `dvc repro index` "
                 "(the ceiling needs the synthetic generator's scenes)")
    try:
        sentences = pd.read_parquet(args.index / "sentences.parquet")
        refs = pd.read_parquet(args.index / "refs.parquet", columns=["ref_id", "ann_id", "image_id"])
        hits = expected_hits(load_scenes(scenes_json), sentences, refs, args.split)
    except (OSError, ValueError) as err:
        sys.exit(f"object_hit_ceiling: {err}")
    table = ceiling_table(hits)
    print(f"object-hit ceiling on {args.split} of a Step-1 that reads size, colour and shape perfectly "
          f"and ignores position and relation words ({scenes_json}, {args.index})\n")
    print("| kind | ceiling | chance | share | n |")
    print("|---|---|---|---|---|")
    for row in table.to_dict("records"):
        print(f"| {row['group']} | {row['ceiling']:.3f} | {row['chance']:.3f} | {row['share']:.2f} "
              f"| {row['n']} |")


if __name__ == "__main__":
    main()
