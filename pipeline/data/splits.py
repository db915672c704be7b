"""Checking params that name splits against the index, before any stage spends time on them.

``data.eval_splits`` is read by ``pretrain_clip`` (after training), ``dump_responses`` and both
evaluations. A split the data lacks (RefCOCOg has ``val`` / ``test``, not ``testA`` / ``testB``), a typo
or an empty list used to surface only after training, throwing the trained weights away. Every stage
that reads it calls :func:`require_eval_splits` right after loading the index, and uses the list it
returns: ``auto`` (the default) resolves to every split of the index except ``train``, so one params file
fits RefCOCO / RefCOCO+ (val, testA, testB), RefCOCOg umd (val, test), google (val) and refclef.
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


def resolve_eval_splits(eval_splits: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """The splits to evaluate: ``auto`` is every available split but ``train``, in ``available``'s order
    (the index orders them val, test, testA, testB, testC; it keeps no other split name, see
    ``split_unknown`` in :mod:`pipeline.data.index`); a list is taken as it is."""
    if isinstance(eval_splits, str):
        if eval_splits != "auto":
            raise ValueError(f"data.eval_splits: {eval_splits!r} is neither 'auto' nor a list of splits")
        return [s for s in available if s != "train"]
    return list(eval_splits)


def require_eval_splits(stage: str, index: Index, eval_splits: str | Sequence[str]) -> list[str]:
    """The resolved ``eval_splits`` if every one is a split of ``index``; else exit with one line naming
    the problem."""
    available = split_names(index)
    splits = resolve_eval_splits(eval_splits, available)
    problem = eval_splits_problem(splits, available)
    if problem is not None:
        sys.exit(f"{stage}: {problem}")
    return splits
