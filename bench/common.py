"""What the benchmarks share: the artifacts they read (a finished `dvc repro`) and a clear error without."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def require(*paths: Path) -> None:
    """Exit with a message naming the first missing artifact (benchmarks measure a built pipeline)."""
    for path in paths:
        if not Path(path).exists():
            raise SystemExit(f"bench: {path} is missing; run `dvc repro` (or `make repro`) first")


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Smallest wall time of ``repeats`` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def directory_bytes(path: Path) -> int:
    """Bytes of every file below ``path`` (what DVC stores and transfers)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
