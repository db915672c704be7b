"""Step-2 training: the referring segmenter learns from PRMS-selected, refined pseudo-masks only
(Sec. 3.4, cross-entropy). Every expression of a train object is paired with that object's one
pseudo-mask, so the network sees all the ways an object is described."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.data.samples import ImageBank
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.maps import clip_normalize
from pipeline.models.segmenter import IGNORE_INDEX, ReferringSegmenter, segmentation_loss
from pipeline.params import Step2Params
from pipeline.runtime import autocast, channels_last, to_channels_last
from pipeline.train.common import to_device
from pipeline.train.loop import Epoch, StepOut, TrainingRun, fit
from pipeline.train.selection import BestValSelection
from pipeline.train.sentences import SentenceTraining


def masks_to_input_size(masks: np.ndarray, size: int) -> torch.Tensor:
    """Pseudo-masks ``(B, H, W)`` uint8 brought to the network's output size with nearest neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(masks))
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(torch.uint8)


class Step2Training(SentenceTraining):
    """Cross-entropy against the pseudo-masks; the sampler is Step-1's (distinct images per batch is
    not needed by the loss, but keeps the two trainings' batches alike)."""

    name = "train_step2"
    rng_key = (2,)

    def __init__(self, model: ReferringSegmenter, bank: ImageBank, sentences: pd.DataFrame,
                 masks_by_ref: dict[int, np.ndarray], p: Step2Params, device: torch.device, *, seed: int,
                 max_tokens: int, dist: DistContext = SINGLE_PROCESS,
                 selection: BestValSelection | None = None) -> None:
        self.selection, self.epochs_done = selection, 0  # step2.select: best_val (rank 0 only)
        sentences = sentences[sentences["ref_id"].isin(masks_by_ref.keys())].reset_index(drop=True)
        if sentences.empty:
            raise ValueError("train_step2: no train sentence has a pseudo-mask")
        to_channels_last(model.to(device))
        self.masks_by_ref = masks_by_ref
        self.setup(model, bank, sentences, p, device, seed, max_tokens, dist)

    def epoch(self, epoch: int) -> Epoch:
        self.epochs_done = epoch + 1
        return super().epoch(epoch)

    def metrics(self) -> dict[str, float]:
        """With step2.select = best_val: this epoch's val mIoU, its weights kept if the best so far."""
        return self.selection.observe(self.model, self.epochs_done) if self.selection else {}

    def step(self, item: tuple[np.ndarray, torch.Tensor]) -> StepOut:
        """This rank's slice of the batch; its loss weighted by its share of the valid pixels."""
        batch_rows, images01 = item
        dist, device = self.dist, self.device
        rows = batch_rows[dist.local_slice(len(batch_rows))]
        images = channels_last(clip_normalize(images01))
        tokens = to_device(self.tokens_all[rows], device)  # asynchronous copies: no wait for the GPU
        masks = np.stack([self.masks_by_ref[int(r)] for r in self.ref_ids[rows]])
        target = to_device(masks_to_input_size(masks, self.bank.size), device)
        with autocast(device, self.p.amp):
            logits = self.net(images, tokens)
        loss = segmentation_loss(logits.float(), target)
        # the loss is a mean over valid pixels, so a rank's share is its share of the valid pixels
        weight = 1.0
        if dist.enabled:
            valid = (target != IGNORE_INDEX).sum().double()
            weight = dist.loss_weight(int(valid), int(dist.sum_(valid.clone())))
        return StepOut(loss, {"ce": loss}, weight=weight, share=weight / dist.world_size)


def train_step2(model: ReferringSegmenter, bank: ImageBank, sentences: pd.DataFrame,
                masks_by_ref: dict[int, np.ndarray], p: Step2Params, device: torch.device, *, seed: int,
                max_tokens: int, run: TrainingRun | None = None,
                selection: BestValSelection | None = None) -> ReferringSegmenter:
    """Train on ``sentences`` whose ``ref_id`` has a pseudo-mask in ``masks_by_ref``, with the settings
    ``p`` (``params.step2``); continues ``run``'s checkpoint when it has one.

    Under torchrun each rank trains on its slice of every global batch, its loss weighted by its share,
    so DDP's averaged gradient is the single-process one; rank 0 alone logs and checkpoints.
    """
    run = run or TrainingRun("train_step2")
    model = fit(Step2Training(model, bank, sentences, masks_by_ref, p, device, seed=seed,
                              max_tokens=max_tokens, dist=run.dist, selection=selection), run)
    return selection.select(model) if selection else model
