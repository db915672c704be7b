"""What the benchmarks share: the artifacts they read (a finished `dvc repro`) and a clear error without."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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


def step1_setup(**updates: object) -> SimpleNamespace:
    """What the Step-1 benchmarks train on, read as ``train_step1`` reads it: params, device, index,
    the train sentences, the frozen CLIP and the ``step1`` section for one epoch with
    ``calibration_size`` resolved (plus ``updates``)."""
    from pipeline import paths
    from pipeline.data.index import load_index
    from pipeline.data.samples import split_sentences
    from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
    from pipeline.params import load_params
    from pipeline.runtime import select_device

    require(paths.CLIP, paths.INDEX)
    params = load_params()
    index = load_index(paths.INDEX)
    frozen = load_frozen_clip(paths.CLIP)
    step1 = params.step1.model_copy(update={
        "epochs": 1, "calibration_size": resolve_calibration_size(params.step1.calibration_size, frozen),
        **updates})
    return SimpleNamespace(params=params, device=select_device(params.base.device), index=index,
                           train=split_sentences(index.images, index.sentences, "train"), frozen=frozen,
                           step1=step1)
