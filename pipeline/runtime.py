"""Run-time choices every stage makes the same way: device, seeds, CPU threads."""

from __future__ import annotations

import numbers
import os
import random

import numpy as np
import torch


class DeviceError(ValueError):
    """A device name that cannot be used on this machine; its message is one line naming the setting."""


def select_device(name: str = "auto", setting: str = "base.device") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit ``cuda`` without a GPU is an error.

    Checked when a stage starts (and before the predict CLI loads anything), so a wrong device stops the
    run with one line naming ``setting`` instead of a CUDA traceback minutes into the work.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:  # e.g. 'cdua', 'cuda:x'
        raise DeviceError(f"{setting}={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{setting}={name!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{setting}={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{setting}={name!r} but this machine has {count} CUDA device(s)")
    return device


MAX_SEED = 2**32 - 1
"""The largest seed every consumer takes: np.random.seed and PYTHONHASHSEED stop at 2**32 - 1 (torch at
2**64 - 1); ``base.seed`` has the same range in pipeline/params.py."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that two CPU runs with one seed give identical outputs.

    A seed outside 0 .. 2**32 - 1 is refused with one line naming ``base.seed`` (params validation already
    does; this covers direct callers), instead of torch's bare "Overflow when unpacking long" here or a
    child process refusing PYTHONHASHSEED later.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"base.seed: {seed!r} is not an integer in 0 .. {MAX_SEED} (2**32 - 1)")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def configure_threads(threads: int) -> None:
    """Pin torch's intra-op threads (0 keeps torch's default: one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled`` (AMP); a no-op context on CPU, where fp32 is faster here."""
    use = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout for 4-D image batches: roughly doubles conv throughput on CPU (oneDNN) and suits
    tensor cores under AMP on CUDA. Other tensors pass through unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Convert a model's 4-D conv weights to NHWC (see :func:`channels_last`)."""
    return module.to(memory_format=torch.channels_last)
