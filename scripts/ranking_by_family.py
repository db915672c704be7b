"""The frozen CLIP's masked-object ranking, split by expression family (issue 14, finding 5).

    python scripts/ranking_by_family.py [--split val] [--clip artifacts/clip]

``pretrain_clip`` reports one masked-object ranking: for each expression, does the frozen CLIP score the
target's GT-masked image above every other object's? The synthetic expressions come in three families,
and a masked image cannot show the same things for each:

- attribute ("the red square"): the masked object shows everything the expression names;
- position ("the leftmost square"): the object keeps its place in the frame, the rivals are hidden;
- relation ("one left of the star"): the anchor is masked away, so the expression cannot be checked on
  the masked image at all.

Calibration (Eq. 8-9) and PRMS (Eq. 10) ask exactly this question of the frozen CLIP, so the families
where it fails bound what they can teach. A diagnostic: it reads GT masks, and no training step calls it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.synthetic.expressions import parse_expression
from pipeline.diagnostics import masked_object_hits
from pipeline.models.clip_artifact import load_frozen_clip
from pipeline.params import load_params
from pipeline.runtime import select_device

FAMILIES = ("attribute", "position", "relation")


def expression_family(text: str) -> str:
    """``attribute``, ``position`` or ``relation`` of a generated expression (the generator's parser)."""
    meaning = parse_expression(text)
    return "relation" if meaning.relation else "position" if meaning.position else "attribute"


def ranking_by_family(hits: pd.DataFrame) -> pd.DataFrame:
    """Rate, chance and count per family (and ``all``) of :func:`masked_object_hits`' table."""
    hits = hits.assign(family=[expression_family(t) for t in hits["text"]], chance=1.0 / hits["objects"])
    rows = [{"family": f, "rate": g["hit"].mean(), "chance": g["chance"].mean(), "n": len(g)}
            for f in FAMILIES if len(g := hits[hits["family"] == f])]
    rows.append({"family": "all", "rate": hits["hit"].mean(), "chance": hits["chance"].mean(),
                 "n": len(hits)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--clip", type=Path, default=paths.CLIP, help="a pretrain_clip output folder")
    args = parser.parse_args()
    params = load_params()
    device = select_device(params.base.device)
    index = load_index(paths.INDEX)
    frozen = load_frozen_clip(args.clip).to(device)
    hits = masked_object_hits(frozen, index.images, index.refs, index.sentences, args.split,  # as the stage
                              params.model.max_tokens, frozen.image_size, device)
    table = ranking_by_family(hits)
    print(f"masked-object ranking of {args.clip} on {args.split}\n")
    print("| family | rate | chance | n |\n|---|---|---|---|")
    for row in table.itertuples():
        print(f"| {row.family} | {row.rate:.3f} | {row.chance:.3f} | {row.n} |")


if __name__ == "__main__":
    main()
