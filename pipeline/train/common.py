"""The pieces every training shares: optimisers and learning-rate schedules, the NaN guard, train mode,
DDP-reduced loss terms, and the fingerprint that stops a resume from mixing two configurations
(the loop itself is :mod:`pipeline.train.loop`)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.distributed import DistContext


class NonFiniteLossError(RuntimeError):
    """Raised instead of writing a garbage checkpoint when a loss term turns NaN or inf."""


def check_finite(stage: str, epoch: int, step: int, terms: dict[str, torch.Tensor]) -> None:
    """Stop the run with a message naming the stage, step and offending term."""
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise NonFiniteLossError(
                f"{stage}: loss term {name!r} became {value.item()} at epoch {epoch}, step {step}; "
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


def reduce_terms(terms: dict[str, torch.Tensor], dist: DistContext, share: float) -> dict[str, float]:
    """Loss terms as floats for logging: under DDP the mean over the global batch, each rank's value
    weighted by its ``share`` of the batch; the values themselves when not distributed."""
    if not dist.enabled:
        return {k: float(v.detach()) for k, v in terms.items()}
    values = torch.stack([v.detach().float() for v in terms.values()]) * share
    dist.sum_(values)
    return dict(zip(terms, values.tolist(), strict=True))


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
    """Identity of a training run: its parameters plus the content of its inputs (code included)."""
    blob = json.dumps(config, sort_keys=True, default=str) + file_digest(inputs)
    return hashlib.md5(blob.encode()).hexdigest()
