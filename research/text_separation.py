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
from collections import defaultdict
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.synthetic.expressions import _POSITION_OF as POSITION_OF  # the parser's own table
from pipeline.data.synthetic.expressions import SHAPE_WORDS, SIZE_WORDS
from pipeline.data.synthetic.scene import COLOURS
from pipeline.models.clip_backbone import tokenize

# word -> (family, value): two words of one family with different values make a minimal pair
WORD_VALUES: dict[str, tuple[str, str]] = {
    **{w: ("colour", w) for w in COLOURS},
    **{w: ("shape", s) for s, words in SHAPE_WORDS.items() for w in words},
    **{w: ("size", s) for s, words in SIZE_WORDS.items() for w in words},
    **{w: ("position", p) for w, p in POSITION_OF.items()},
}
# a relation's direction: "left" / "right" followed by "of", "above", "below" / "under"
RELATION_WORDS = {"left": "left", "right": "right", "above": "above", "below": "below", "under": "below"}
FAMILIES = ("colour", "shape", "size", "position", "relation")


def word_value(words: list[str], i: int) -> tuple[str, str] | None:
    """(family, value) of ``words[i]``, or None for a word that names no attribute value; "left of"
    is a relation's direction, not the object's place in the frame."""
    word = words[i]
    if word in ("left", "right") and words[i + 1:i + 2] == ["of"]:
        return "relation", RELATION_WORDS[word]
    if word in WORD_VALUES:
        return WORD_VALUES[word]
    if word in RELATION_WORDS:
        return "relation", RELATION_WORDS[word]
    return None


def minimal_pairs(texts: list[str]) -> pd.DataFrame:
    """Pairs ``(a, b, family)`` of distinct ``texts`` that differ in exactly one word, the two words being
    different values of one family (:func:`word_value`)."""
    unique = sorted(set(texts))
    by_frame: dict[tuple, list[tuple[tuple[str, str], str]]] = defaultdict(list)
    for text in unique:
        words = text.split()
        for i in range(len(words)):
            value = word_value(words, i)
            if value is not None:
                by_frame[(*words[:i], "*", *words[i + 1:])].append((value, text))
    rows = []
    for members in by_frame.values():
        for ((fa, va), a), ((fb, vb), b) in combinations(members, 2):
            if fa == fb and va != vb:
                rows.append({"a": a, "b": b, "family": fa})
    return pd.DataFrame(rows, columns=["a", "b", "family"])


def separation(embed: Callable[[list[str]], torch.Tensor], pairs: pd.DataFrame, texts: list[str],
               random_pairs: int = 2000, seed: int = 0) -> dict[str, tuple[float, int]]:
    """Mean cosine and count of the minimal pairs per family, and of ``random_pairs`` random pairs of
    distinct ``texts`` (``"random"``). ``embed`` maps a list of strings to ``(n, C)`` features."""
    vocab = sorted(set(texts) | set(pairs["a"]) | set(pairs["b"]))
    where = {t: i for i, t in enumerate(vocab)}
    with torch.no_grad():
        feats = torch.nn.functional.normalize(embed(vocab).float(), dim=-1)
    out: dict[str, tuple[float, int]] = {}
    for family in FAMILIES:
        sub = pairs[pairs["family"] == family]
        if len(sub):
            cos = (feats[[where[t] for t in sub["a"]]] * feats[[where[t] for t in sub["b"]]]).sum(-1)
            out[family] = (float(cos.mean()), len(sub))
    rng = np.random.default_rng(seed)
    distinct = sorted(set(texts))
    i, j = rng.integers(0, len(distinct), (2, random_pairs))
    keep = i != j
    ia = [where[distinct[k]] for k in i[keep]]
    ib = [where[distinct[k]] for k in j[keep]]
    out["random"] = (float((feats[ia] * feats[ib]).sum(-1).mean()), int(keep.sum()))
    return out


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
