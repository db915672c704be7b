"""The few lines every stage entrypoint starts with: validated params, seeds, threads, device.

Every stage obtains its params here, which is also where the dvc.yaml check hooks in: with
``TRIS_PARAMS_TRACE=<dir>`` set, the stage gets a :class:`~pipeline.params_trace.ParamsReads` view and writes
the dotted keys it read to ``<dir>/<stage>.json`` on exit (see tests/test_dvc_params.py).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType

import torch

from pipeline.distributed import DistContext, init_distributed, relaunch_under_torchrun
from pipeline.params import Params, ParamsError, load_params
from pipeline.params_trace import record_reads
from pipeline.runtime import DeviceError, configure_threads, device_note, seed_everything, select_device

TRACE_ENV = "TRIS_PARAMS_TRACE"


def _traced(name: str, params: Params) -> Params:
    """``params`` as is, or (with ``TRIS_PARAMS_TRACE`` set) a view recording the keys the stage reads.

    The reads :func:`start_stage` makes itself (seed, threads, device) come before the view: seeding the
    global RNGs is set-up done for every stage, and a stage whose results depend on the seed reads
    ``base.seed`` again where it draws (its generators, its training config).
    """
    trace_dir = os.environ.get(TRACE_ENV)
    if not trace_dir:
        return params
    view, reads = record_reads(params)
    path = Path(trace_dir) / f"{name}.json"

    def dump() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sorted(reads), indent=1))

    atexit.register(dump)
    return view


def _one_line_errors(name: str) -> None:
    """Report damaged inputs as one ``<stage>: <message>`` line, exit status 1: errors whose class sets
    ``stage_one_line`` (:class:`~pipeline.store.StoreCorruptError`, :class:`~pipeline.atomic.CheckpointError`)
    already name the file and the fix, and a traceback would bury them. Other errors keep Python's
    traceback. (A class flag, not an import of those modules: every stage would then depend on them.)"""
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if getattr(exc_type, "stage_one_line", False):
            print(f"{name}: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = hook


def one_line(err: Exception) -> str:
    """``err``'s message on one line: a ParamsError lists each offending key on its own line, which a log
    (DVC's, CI's) would split from the stage name; joined with ``; `` every key stays on the stage's line."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def start_stage(name: str, params_path: str | Path = "params.yaml") -> tuple[Params, torch.device]:
    """Load params (exit with one line naming every offending key on error), seed, pin threads, pick the
    device (exit with one line naming ``base.device`` when it is unusable here, e.g. ``cuda`` without a
    GPU or with a driver too old for the torch wheel; ``auto`` on the CPU says why on the start-up line)."""
    try:
        params = load_params(params_path)
    except ParamsError as err:
        sys.exit(f"{name}: {one_line(err)}")
    _one_line_errors(name)
    seed_everything(params.base.seed)
    configure_threads(params.base.threads)
    try:
        device = select_device(params.base.device)
    except DeviceError as err:
        sys.exit(f"{name}: {err}")
    print(f"[{name}] device={device}{device_note(params.base.device, device)} seed={params.base.seed} "
          f"threads={torch.get_num_threads()}")
    return _traced(name, params), device


def start_distributed_stage(name: str, params_path: str | Path = "params.yaml"
                            ) -> tuple[Params, torch.device, DistContext]:
    """:func:`start_stage`, then re-exec under torchrun when ``base.nproc > 1`` and join the job."""
    params, device = start_stage(name, params_path)
    relaunch_under_torchrun(params.base.nproc)
    dist, device = init_distributed(device)
    if dist.enabled:
        print(f"[{name}] rank {dist.rank} of {dist.world_size} on {device}", flush=True)
    return params, device, dist


class StageTimer:
    """Prints the stage's wall time on exit (docs/benchmarks.md's per-stage figures come from these lines)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> StageTimer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        print(f"[{self.name}] wall time {time.perf_counter() - self.t0:.1f} s")
