"""What Step-1 and Step-2 share: one sentence per object per epoch, in batches of distinct images, the
images decoded ahead on a thread, and AdamW with polynomial decay over the encoders and the new layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.data.samples import ImageBank, distinct_image_batches, one_sentence_per_ref
from pipeline.distributed import DistContext
from pipeline.models.clip_backbone import tokenize
from pipeline.params import OptimParams
from pipeline.train.common import build_optimizer, poly_scheduler
from pipeline.train.loop import Epoch, Training


def sentence_batches(ref_ids: np.ndarray, image_ids: np.ndarray, batch_size: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of sentence rows: one sentence per object, distinct images per batch."""
    subset = one_sentence_per_ref(ref_ids, rng)
    return [subset[b] for b in distinct_image_batches(image_ids[subset], batch_size, rng)]


class SentenceTraining(Training):
    """A model trained on batches of ``sentences`` (one per object per epoch) with their images.

    Subclasses call :meth:`setup` and implement :meth:`Training.step` on ``(rows, images01)``: the
    global batch's sentence rows and this rank's slice of its images (``[0, 1]``, on ``device``).
    """

    rng_key: tuple[int, ...] = ()  # per-epoch generator key after the seed (tells trainings apart)

    def setup(self, model: nn.Module, bank: ImageBank, sentences: pd.DataFrame, p: OptimParams,
              device: torch.device, seed: int, max_tokens: int, dist: DistContext) -> None:
        """Everything but the model-specific parts: preloaded images, tokens, the DDP / compiled
        ``net``, and the optimiser with its per-iteration polynomial decay."""
        self.model, self.bank, self.p, self.device, self.seed, self.dist = model, bank, p, device, seed, dist
        self.epochs, self.freeze_batchnorm = p.epochs, p.freeze_batchnorm
        self.image_ids = sentences["image_id"].to_numpy()
        bank.preload(self.image_ids)
        self.tokens_all = tokenize(sentences["text"].tolist(), max_tokens)  # once: BPE is slow per step
        self.ref_ids = sentences["ref_id"].to_numpy()
        probe = one_sentence_per_ref(self.ref_ids, np.random.default_rng(0))
        steps_per_epoch = len(distinct_image_batches(self.image_ids[probe], p.batch_size,
                                                     np.random.default_rng(0)))
        net = dist.wrap(model, device)
        self.net = torch.compile(net) if p.compile else net
        backbone, head = model.param_groups()
        self.optimizer = build_optimizer(backbone, head, p.lr, p.backbone_lr_mult, p.weight_decay)
        self.scheduler = poly_scheduler(self.optimizer, p.epochs * steps_per_epoch, p.poly_power)

    def epoch(self, epoch: int) -> Epoch:
        """The epoch's batches from a generator of (seed, key, epoch): no state to carry or resume."""
        self.rng = np.random.default_rng([self.seed, *self.rng_key, epoch])
        batches = sentence_batches(self.ref_ids, self.image_ids, self.p.batch_size, self.rng)
        local = (self.image_ids[rows[self.dist.local_slice(len(rows))]] for rows in batches)
        return Epoch(zip(batches, self.bank.prefetch(local, self.device), strict=True), len(batches))

