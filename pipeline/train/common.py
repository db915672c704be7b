"""The pieces every training shares: optimisers and learning-rate schedules, the NaN guard, train mode,
DDP-reduced loss terms kept on the device, host-to-device copies that do not wait for the GPU, and the
fingerprint that stops a resume from mixing two configurations (the loop itself is
:mod:`pipeline.train.loop`)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.distributed import DistContext


class NonFiniteLossError(RuntimeError):
    """Raised instead of writing a garbage checkpoint when a loss term turns NaN or inf."""


def check_finite(stage: str, epoch: int, step: int, terms: Mapping[str, torch.Tensor | float],
                 steps: tuple[int, int] | None = None) -> None:
    """Stop the run with a message naming the stage, epoch, step and offending term.

    ``terms`` are tensors or host floats; the training loop passes floats, read from the device once per
    log interval for the ``steps`` (first, last) read together, so the message names that range too: the
    optimiser kept stepping up to its end, but no checkpoint was written after the first bad step.
    """
    for name, value in terms.items():
        finite = math.isfinite(value) if isinstance(value, float) else bool(torch.isfinite(value).all())
        if not finite:
            shown = value if isinstance(value, float) else value.item()
            read = f" (loss terms of steps {steps[0]}-{steps[1]} read together)" if steps else ""
            raise NonFiniteLossError(
                f"{stage}: loss term {name!r} became {shown} at epoch {epoch}, step {step}{read}; "
                "stopping before a checkpoint is written (try a lower lr or disable amp)"
            )


def set_train_mode(module: nn.Module, freeze_batchnorm: bool = False) -> nn.Module:
    """``module.train()``, with BatchNorm layers left in eval mode when ``freeze_batchnorm`` (their running
    statistics are used and not updated, as detectron2's FrozenBatchNorm does for pretrained backbones)."""
    module.train()
    if freeze_batchnorm:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return module


def stack_terms(terms: Mapping[str, torch.Tensor], dist: DistContext, share: float) -> torch.Tensor:
    """One step's loss terms as a float64 vector on their device, for logging without a host read.

    Under DDP each rank's float32 values are weighted by its ``share`` of the batch and summed over ranks
    (the mean over the global batch; the all-reduce is queued, not waited for); otherwise the values
    themselves. float64 holds every float32 exactly, so the host floats read later are the ones a
    per-step ``float(v)`` gave, and the logged epoch means do not change.
    """
    if not dist.enabled:
        return torch.stack([v.detach().double().reshape(()) for v in terms.values()])
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]) * share
    return dist.sum_(values).double()


def to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` (host memory) on ``device`` without a host sync.

    A plain ``.to("cuda")`` from pageable memory waits for every queued kernel to finish (the copy is
    synchronous); staged through pinned memory with ``non_blocking`` it is queued behind them instead
    (the pinned block is not reused before the copy ends: torch's host allocator records the stream).
    Elsewhere it is ``.to(device)``, the same values.
    """
    tensor = torch.as_tensor(data)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def build_optimizer(backbone: Iterable[nn.Parameter], head: Iterable[nn.Parameter], lr: float,
                    backbone_lr_mult: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the pretrained encoders at ``lr * backbone_lr_mult`` and new layers at ``lr``
    (the paper's optimiser; the multiplier follows the authors' ``lr_multi``)."""
    groups = [
        {"params": [p for p in backbone if p.requires_grad], "lr": lr * backbone_lr_mult},
        {"params": [p for p in head if p.requires_grad], "lr": lr},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                   power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay per iteration: lr_t = lr_0 * (1 - t / T) ** power."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1 - t / total) ** power)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                            warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay (used for the from-scratch CLIP pretraining)."""
    total = max(1, total_steps)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def file_digest(paths: Iterable[str | Path]) -> str:
    """md5 over the bytes of the given files (or every file below given directories), in path order."""
    h = hashlib.md5()
    for root in sorted(Path(p) for p in paths):
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root.parent)).encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def training_code(stage_script: str | Path) -> list[Path]:
    """Source files whose edit must restart a training: the stage script, then every ``pipeline`` module
    it runs (its import closure, :func:`pipeline.codedeps.stage_closure`).

    The resume fingerprint hashes these beside the params and inputs. Otherwise a run after an edited
    loss would "resume" from the old run's checkpoint. The closure is computed from the code rather than
    read from dvc.yaml because stages also run outside DVC (tests, torchrun) where dvc.yaml need not be at
    hand; it is the same closure ``tests/test_dvc_deps.py`` requires among the stage's dvc.yaml deps, so
    resume and ``dvc repro`` agree on what code a stage depends on, and an edit to a module the stage
    does not run neither re-runs it nor discards its resume state.
    """
    from pipeline.codedeps import stage_closure  # imported here: only this function of the module needs it

    return stage_closure(stage_script)


def fingerprint(config: dict[str, Any], inputs: Iterable[str | Path]) -> str:
    """Identity of a training run: its parameters plus the content of its inputs (code included).

    A CLIP folder among ``inputs`` (``artifacts/clip``) records only the path of real weights, so the
    external weight files it points at (:func:`pipeline.inputs.external_weights`: a local checkpoint, or
    a tag's cached file) are hashed too, in full: a checkpoint swapped behind the same path must not be
    resumed from a run on the old one. md5 of RN50's 244 MB takes about 0.5 s per start.
    """
    from pipeline.inputs import external_weights  # imported here, as in training_code
    from pipeline.models.clip_artifact import FROZEN_SPEC_FILE, LOCAL_WEIGHTS, SPEC_FILE

    inputs = list(inputs)
    weights = external_weights(inputs, (SPEC_FILE, FROZEN_SPEC_FILE), LOCAL_WEIGHTS)
    blob = json.dumps(config, sort_keys=True, default=str) + file_digest([*inputs, *weights])
    return hashlib.md5(blob.encode()).hexdigest()
