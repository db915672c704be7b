"""Step-2 training: the referring segmenter learns from PRMS-selected, refined pseudo-masks only
(Sec. 3.4, cross-entropy). Every expression of a train object is paired with that object's one
pseudo-mask, so the network sees all the ways an object is described."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.data.samples import ImageBank, distinct_image_batches, one_sentence_per_ref
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import tokenize
from pipeline.models.segmenter import IGNORE_INDEX, ReferringSegmenter, segmentation_loss
from pipeline.params import Params
from pipeline.progress import progress
from pipeline.runtime import autocast, channels_last, to_channels_last
from pipeline.train.common import (
    build_optimizer,
    check_finite,
    load_resume_state,
    poly_scheduler,
    reduce_terms,
    save_resume_state,
    set_train_mode,
)


@dataclass
class Step2TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    poly_power: float
    max_tokens: int
    amp: bool
    seed: int
    freeze_batchnorm: bool = False
    compile: bool = False

    @classmethod
    def from_params(cls, params: Params) -> Step2TrainConfig:
        """The training settings of ``params.step2`` (plus the shared token limit and seed)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"max_tokens", "seed"}
        return cls(**{k: getattr(params.step2, k) for k in fields}, max_tokens=params.model.max_tokens,
                   seed=params.base.seed)


def masks_to_input_size(masks: np.ndarray, size: int) -> torch.Tensor:
    """Pseudo-masks ``(B, H, W)`` uint8 brought to the network's output size with nearest neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(masks))
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)


def train_step2(model: ReferringSegmenter, bank: ImageBank, sentences: pd.DataFrame,
                masks_by_ref: dict[int, np.ndarray], cfg: Step2TrainConfig, device: torch.device, *,
                resume_path: Path | None = None, fingerprint: str = "",
                log: Callable[..., None] | None = None,
                dist: DistContext = SINGLE_PROCESS) -> ReferringSegmenter:
    """Train on ``sentences`` whose ``ref_id`` has a pseudo-mask in ``masks_by_ref``.

    Under torchrun each rank trains on its slice of every global batch, its loss weighted by its share,
    so DDP's averaged gradient is the single-process one; rank 0 alone logs and checkpoints.
    """
    sentences = sentences[sentences["ref_id"].isin(masks_by_ref.keys())].reset_index(drop=True)
    if sentences.empty:
        raise ValueError("train_step2: no train sentence has a pseudo-mask")
    to_channels_last(model.to(device))
    image_ids = sentences["image_id"].to_numpy()
    bank.preload(image_ids)
    tokens_all = tokenize(sentences["text"].tolist(), cfg.max_tokens)  # once: BPE is slow per step
    ref_ids = sentences["ref_id"].to_numpy()
    probe = one_sentence_per_ref(ref_ids, np.random.default_rng(0))
    steps_per_epoch = len(distinct_image_batches(image_ids[probe], cfg.batch_size, np.random.default_rng(0)))
    net = dist.wrap(model, device)
    if cfg.compile:
        net = torch.compile(net)
    backbone, head = model.param_groups()
    optimizer = build_optimizer(backbone, head, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    scheduler = poly_scheduler(optimizer, cfg.epochs * steps_per_epoch, cfg.poly_power)

    start_epoch, step = 0, 0
    state = load_resume_state(resume_path, fingerprint) if resume_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, step = state["epoch"], state["step"]
        print(f"train_step2: resuming after epoch {start_epoch} (step {step}) from {resume_path}")

    for epoch in range(start_epoch, cfg.epochs):
        set_train_mode(net, cfg.freeze_batchnorm)
        rng = np.random.default_rng([cfg.seed, 2, epoch])
        # distinct images per batch is not needed by the loss, but it is the same sampler as Step-1
        subset = one_sentence_per_ref(ref_ids, rng)
        batches = [subset[b] for b in distinct_image_batches(image_ids[subset], cfg.batch_size, rng)]
        total = 0.0
        bar = progress(batches, desc=f"train_step2 {epoch + 1}/{cfg.epochs}",
                       disable=not dist.is_main or None)
        local_images = (image_ids[rows[dist.local_slice(len(rows))]] for rows in batches)
        for batch_rows, images01 in zip(bar, bank.prefetch(local_images, device), strict=True):
            rows = batch_rows[dist.local_slice(len(batch_rows))]
            images = channels_last(clip_normalize(images01))
            tokens = tokens_all[rows].to(device)
            target = masks_to_input_size(np.stack([masks_by_ref[int(r)] for r in ref_ids[rows]]),
                                         bank.size).to(device)
            with autocast(device, cfg.amp):
                logits = net(images, tokens)
            loss = segmentation_loss(logits.float(), target)
            check_finite("train_step2", epoch, step, {"ce": loss})
            # the loss is a mean over valid pixels, so a rank's share is its share of the valid pixels
            weight = 1.0
            if dist.enabled:
                valid = (target != IGNORE_INDEX).sum().double()
                weight = dist.loss_weight(int(valid), int(dist.sum_(valid.clone())))
            optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            total += reduce_terms({"ce": loss}, dist, weight / dist.world_size)["ce"]
            bar.set_postfix(loss=f"{loss.item():.3f}")
        mean = total / max(1, len(batches))
        if dist.is_main:
            print(f"train_step2 epoch {epoch + 1}/{cfg.epochs}: ce={mean:.4f}")
            if log is not None:
                log(epoch=epoch + 1, step=step, ce=mean, lr=scheduler.get_last_lr()[-1])
            if resume_path is not None:
                save_resume_state(resume_path, fingerprint=fingerprint, epoch=epoch + 1, step=step,
                                  model=model, optimizer=optimizer, scheduler=scheduler,
                                  extra={"config": asdict(cfg)})
        dist.barrier()
    return model.eval()
