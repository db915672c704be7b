"""The few lines every stage entrypoint starts with: validated params, seeds, threads, device."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from pipeline.params import Params, ParamsError, load_params
from pipeline.runtime import configure_threads, seed_everything, select_device


def start_stage(name: str, params_path: str | Path = "params.yaml") -> tuple[Params, torch.device]:
    """Load params (exit with the key-naming message on error), seed, pin threads, pick the device."""
    try:
        params = load_params(params_path)
    except ParamsError as err:
        sys.exit(f"{name}: {err}")
    seed_everything(params.base.seed)
    configure_threads(params.base.threads)
    device = select_device(params.base.device)
    print(f"[{name}] device={device} seed={params.base.seed} threads={torch.get_num_threads()}")
    return params, device


class StageTimer:
    """Prints the stage's wall time on exit (the README's per-stage figures come from these lines)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> StageTimer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        print(f"[{self.name}] wall time {time.perf_counter() - self.t0:.1f} s")
