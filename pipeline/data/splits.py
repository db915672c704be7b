"""Checking params that name splits against the index, before any stage spends time on them.

``data.eval_splits`` is read by ``pretrain_clip`` (after training), ``dump_responses`` and both
evaluations. A split the data lacks (RefCOCOg has ``val`` / ``test``, not ``testA`` / ``testB``), a typo
or an empty list used to surface only after training, throwing the trained weights away. Every stage
that reads it calls :func:`require_eval_splits` right after loading the index.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.data.index import Index, split_names


def eval_splits_problem(eval_splits: Sequence[str], available: Sequence[str]) -> str | None:
    """One line saying what is wrong with ``eval_splits`` given the index's splits, or None if nothing."""
    have = ", ".join(available) or "none"
    if not eval_splits:
        return f"data.eval_splits is empty; name at least one split of the index (it has: {have})"
    seen: set[str] = set()
    for split in eval_splits:
        if split in seen:
            return f"data.eval_splits names {split!r} twice"
        seen.add(split)
        if split not in available:
            return f"data.eval_splits names {split!r}, which the index does not have (it has: {have})"
    return None


def require_eval_splits(stage: str, index: Index, eval_splits: Sequence[str]) -> list[str]:
    """``eval_splits`` as a list if every one is a split of ``index``; else exit with one line naming it."""
    problem = eval_splits_problem(list(eval_splits), split_names(index))
    if problem is not None:
        sys.exit(f"{stage}: {problem}")
    return list(eval_splits)
