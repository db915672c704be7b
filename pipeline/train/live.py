"""Training curves through DVCLive, written inside the training stage's output directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dvclive import Live


def open_live(directory: str | Path, resume: bool = False) -> tuple[Live, Callable[..., None]]:
    """A DVCLive run that never edits dvc.yaml or creates experiments by itself (DVC owns those),
    and a ``log(**metrics)`` callable that records one step of scalars under ``train/``."""
    live = Live(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=False, report=None)

    def log(**metrics: float) -> None:
        for name, value in metrics.items():
            if name in ("step",):
                continue
            live.log_metric(f"train/{name}", float(value))
        live.next_step()

    return live, log
