"""Run-time choices every stage makes the same way: device, seeds, CPU threads."""

from __future__ import annotations

import numbers
import os
import random
import warnings

import numpy as np
import torch


class DeviceError(ValueError):
    """A device name that cannot be used on this machine; its message is one line naming the setting."""


def cuda_unusable_reason() -> str | None:
    """Why CUDA cannot run here, in one line, or ``None`` when it can.

    ``torch.cuda.is_available()`` answers False both for a CPU-only wheel and for a driver older than the
    wheel's CUDA (it only warns, and only once); a GPU the wheel has no kernels for passes it and fails at
    the first kernel. So this asks each in turn and runs one tiny op, keeping torch's own words.
    """
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        said = next((" ".join(str(w.message).split()) for w in caught), "")
        return f"CUDA unusable: {said[:200]}" if said else "no CUDA device is visible (driver or GPU missing)"
    # on this process's own GPU: a torchrun worker (LOCAL_RANK) must not open a context on GPU 0
    probe = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    try:
        (torch.ones(1, device=f"cuda:{probe}") + 1).item()
    except RuntimeError as err:  # e.g. "no kernel image is available for execution on the device"
        return f"CUDA unusable: {' '.join(str(err).split())[:200]}"
    return None


def select_device(name: str = "auto", setting: str = "base.device") -> torch.device:
    """``auto`` picks CUDA when it works, else the CPU (:func:`device_note` says why); an
    explicit ``cuda`` that cannot run (no GPU, a driver too old for this torch wheel, a GPU the wheel has
    no kernels for) is an error.

    Checked when a stage starts (and before the predict CLI loads anything), so a wrong device stops the
    run with one line naming ``setting`` instead of a CUDA traceback minutes into the work, and a run
    meant for a GPU never trains on the CPU unnoticed.
    """
    if name == "auto":
        return torch.device("cuda" if cuda_unusable_reason() is None else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:  # e.g. 'cdua', 'cuda:x'
        raise DeviceError(f"{setting}={name!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"{setting}={name!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda":
        reason = cuda_unusable_reason()
        if reason is not None:
            raise DeviceError(f"{setting}={name!r} but no CUDA device is usable ({reason}); use 'auto' or "
                              "'cpu' to run on the CPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{setting}={name!r} but this machine has {count} CUDA device(s)")
    return device


def device_note(name: str, device: torch.device, setting: str = "base.device") -> str:
    """For the start-up line: why ``auto`` fell back to the CPU (``""`` otherwise), so that a run meant
    for a GPU that trains on the CPU says so in its first line of output."""
    if name != "auto" or device.type != "cpu":
        return ""
    return f" ({setting}=auto chose the CPU: {cuda_unusable_reason()}; {setting}=cuda makes that an error)"


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
