"""One-word minimal pairs of expressions ("the leftmost hexagon" / "the rightmost hexagon") and how far
apart a text encoder puts them.

A family whose pairs sit near cosine 1 is one the model cannot ground: both expressions of a pair get
the same response map (Eq. 2) and the same Eq. 9 score. Reads expression texts only (no mask, no
image): a diagnostic of the frozen CLIP (``python -m research.text_separation``, the web CLIP's manifest)
that no training step calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from itertools import combinations

import numpy as np
import pandas as pd
import torch

from pipeline.data.synthetic.expressions import _POSITION_OF as POSITION_OF  # the parser's own table
from pipeline.data.synthetic.expressions import SHAPE_WORDS, SIZE_WORDS
from pipeline.data.synthetic.scene import COLOURS

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
