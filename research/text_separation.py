"""Does the text side tell "leftmost" from "rightmost"? Cosine of expressions that differ by one word.

    python -m research.text_separation [--split val] [--step1]

A minimal pair is two expressions of the split that are the same word for word except one, where the two
differing words name different values of one attribute: colour ("the red circle" / "the blue circle"),
shape ("the red circle" / "the red square"), size ("the big star" / "the small star"), position
("the leftmost hexagon" / "the rightmost hexagon") or a relation's direction ("the one left of the star"
/ "the one above the star"). Synonyms ("circle" / "disc", "below" / "under") are not pairs.

For each family the script prints the mean cosine of the pairs' embeddings under

- the frozen CLIP (``E_l`` of Eq. 9, which calibration and PRMS compare masked images against),
- with ``--step1``, the trained localiser's ``L`` (Sec. 3.1: the projected, normalised sentence feature
  the response map of Eq. 2 is computed with),

beside the mean cosine of random pairs of the split's expressions. A family whose pairs sit near 1 is
one the model cannot ground: both expressions of a pair get the same response map and the same Eq. 9
score. Reads expressions only (no mask, no image); a diagnostic that no training step calls.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.eval.text_pairs import FAMILIES, minimal_pairs, separation, word_value
from pipeline.models.clip_backbone import tokenize

__all__ = ["FAMILIES", "minimal_pairs", "separation", "word_value"]

def _batched(fn: Callable[[torch.Tensor], torch.Tensor],
             max_tokens: int) -> Callable[[list[str]], torch.Tensor]:
    """``fn`` on token batches of 512, as a function of the texts."""

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.cat([fn(tokenize(texts[s:s + 512], max_tokens)) for s in range(0, len(texts), 512)])
    return embed


def main() -> None:
    from pipeline.models.checkpoints import load_localiser
    from pipeline.models.clip_artifact import load_frozen_clip
    from pipeline.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val")
    parser.add_argument("--clip", type=Path, default=paths.CLIP)
    parser.add_argument("--step1", type=Path, nargs="?", const=paths.STEP1 / "model.pt",
                        help="also the Step-1 localiser's sentence features (artifacts/step1/model.pt)")
    args = parser.parse_args()
    max_tokens = load_params().model.max_tokens
    index = load_index(paths.INDEX)
    texts = index.sentences.loc[index.sentences["split"] == args.split, "text"].tolist()
    pairs = minimal_pairs(texts)
    encoders = {"frozen CLIP": _batched(load_frozen_clip(args.clip).eval().encode_text, max_tokens)}
    if args.step1:
        model, _ = load_localiser(args.step1)
        encoders["Step-1 L"] = _batched(model.eval().text_features, max_tokens)
    results = {name: separation(fn, pairs, texts) for name, fn in encoders.items()}
    first = next(iter(results.values()))
    table = pd.DataFrame({"pairs": {family: count for family, (_, count) in first.items()},
                          **{name: {family: round(cos, 3) for family, (cos, _) in r.items()}
                             for name, r in results.items()}})
    print(f"mean cosine of one-word minimal pairs ({args.split}); 1.000 = the two texts are one vector")
    print(table.to_string())

if __name__ == "__main__":
    main()
