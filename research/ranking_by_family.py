"""The frozen CLIP's masked-object ranking, and Step-1's object-level grounding, split by what the
expression names.

    python -m research.ranking_by_family [--split val] [--clip artifacts/clip]
    python -m research.ranking_by_family --by kind --step1     # attribute subsets; Step-1 beside CLIP

``pretrain_clip`` reports one masked-object ranking: for each expression, does the frozen CLIP score the
target's GT-masked image above every other object's? The synthetic expressions come in three families,
and a masked image cannot show the same things for each:

- attribute ("the red square"): the masked object shows everything the expression names;
- position ("the leftmost square"): the object keeps its place in the frame, the rivals are hidden;
- relation ("one left of the star"): the anchor is masked away, so the expression cannot be checked on
  the masked image at all.

Calibration (Eq. 8-9) and PRMS (Eq. 10) ask exactly this question of the frozen CLIP, so the families
where it fails bound what they can teach.

``--by kind`` splits the attribute family by which attributes it names (colour, shape, size and their
combinations), which tells a CLIP that reads colour from one that reads shape (the kinds of
:func:`pipeline.eval.grounding.expression_kind`, which ``evaluate_step1`` reports too). ``--step1`` adds two
columns from ``artifacts/responses.zarr``: how often the Step-1 map responds most, on average, inside
the target among the image's referred objects (``step1 object``), and PointM's test (``step1 peak``).
A diagnostic: it reads GT masks, and no training step calls it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.eval.clip_checks import masked_object_hits
from pipeline.eval.grounding import (
    ATTRIBUTES,
    FAMILIES,
    expression_family,
    expression_kind,
    group_order,
    response_object_hits,
)
from pipeline.models.clip_artifact import load_frozen_clip
from pipeline.params import load_params
from pipeline.pseudo.labels import load_split_responses
from pipeline.runtime import select_device
from pipeline.store import open_responses

__all__ = ["ATTRIBUTES", "FAMILIES", "expression_family", "expression_kind", "rates_by", "ranking_by_family"]


def rates_by(hits: pd.DataFrame, group: Callable[[str], str] = expression_family,
             columns: tuple[str, ...] = ("hit",)) -> pd.DataFrame:
    """Mean of each of ``columns`` (booleans), chance and count per ``group(text)`` and ``all``; the
    groups in the order of ``FAMILIES`` (kinds of a family sorted under it)."""
    hits = hits.assign(group=[group(t) for t in hits["text"]], chance=1.0 / hits["objects"])
    order = group_order(hits["group"])
    rows = [{"group": g, **{c: part[c].mean() for c in columns}, "chance": part["chance"].mean(),
             "n": len(part)} for g in order if len(part := hits[hits["group"] == g])]
    rows.append({"group": "all", **{c: hits[c].mean() for c in columns}, "chance": hits["chance"].mean(),
                 "n": len(hits)})
    return pd.DataFrame(rows)


def ranking_by_family(hits: pd.DataFrame) -> pd.DataFrame:
    """Rate, chance and count per family (and ``all``) of :func:`masked_object_hits`' table."""
    return rates_by(hits).rename(columns={"group": "family", "hit": "rate"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--clip", type=Path, default=paths.CLIP, help="a pretrain_clip output folder")
    parser.add_argument("--by", choices=("family", "kind"), default="family")
    parser.add_argument("--step1", action="store_true",
                        help=f"add Step-1's object-level grounding from {paths.RESPONSES}")
    args = parser.parse_args()
    params = load_params()
    device = select_device(params.base.device)
    index = load_index(paths.INDEX)
    frozen = load_frozen_clip(args.clip).to(device)
    hits = masked_object_hits(frozen, index.images, index.refs, index.sentences, args.split,  # as the stage
                              params.model.max_tokens, frozen.image_size, device)
    hits = hits.rename(columns={"hit": "clip"})
    columns = ("clip",)
    if args.step1:
        sentences = index.sentences[index.sentences["split"] == args.split]
        responses = load_split_responses(open_responses(paths.RESPONSES), args.split)
        step1 = response_object_hits(responses, sentences, index.refs, index.images)
        hits = hits.merge(step1[["sent_id", "hit", "point"]], on="sent_id", how="inner")
        hits = hits.rename(columns={"hit": "step1 object", "point": "step1 peak"})
        columns += ("step1 object", "step1 peak")
    table = rates_by(hits, expression_kind if args.by == "kind" else expression_family, columns)
    print(f"masked-object ranking of {args.clip} (clip) on {args.split}"
          + (f"; Step-1 maps of {paths.RESPONSES}" if args.step1 else "") + "\n")
    print(f"| {args.by} | " + " | ".join(columns) + " | chance | n |")
    print("|---|" + "---|" * (len(columns) + 2))
    for row in table.to_dict("records"):
        print(f"| {row['group']} | " + " | ".join(f"{row[c]:.3f}" for c in columns)
              + f" | {row['chance']:.3f} | {row['n']} |")


if __name__ == "__main__":
    main()
