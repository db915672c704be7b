"""Contrastive pretraining of the embedded small CLIP on (image, expression) pairs of the train split.

This stands in for OpenAI's web-scale pretraining when nothing can be downloaded: the result is what
Step-1 starts from and what the frozen "CLIP" of calibration (Eq. 8-9) and PRMS (Eq. 10) is. Only text
supervises it: an image is paired with an expression of one of its objects; boxes and masks are never
read. Random black rectangles (no ground truth involved) get it used to partially blacked-out inputs,
which is what calibration and PRMS show it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.captions import cutout_corpus, pretraining_corpus
from pipeline.data.samples import ImageBank
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import build_clip, tokenize
from pipeline.params import Params, PretrainClipParams
from pipeline.runtime import channels_last, seed_everything, to_channels_last
from pipeline.train.common import build_optimizer, warmup_cosine_scheduler
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit


def random_blackout(images: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Black out one or two random rectangles (15-40% of each side) in a ``prob`` share of images."""
    out = images.clone()
    b, _, h, w = images.shape
    for i in range(b):
        if torch.rand(1, generator=generator).item() >= prob:
            continue
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            rh = int(h * (0.15 + 0.25 * torch.rand(1, generator=generator).item()))
            rw = int(w * (0.15 + 0.25 * torch.rand(1, generator=generator).item()))
            y = int(torch.randint(0, h - rh + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - rw + 1, (1,), generator=generator))
            out[i, :, y:y + rh, x:x + rw] = 0.0
    return out


def multi_positive_clip_loss(image_f: torch.Tensor, text_f: torch.Tensor, owner: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where an image has several captions (its referring expressions).

    ``owner[j]`` is the batch row of text ``j``'s image. Text-to-image is CLIP's cross-entropy (one
    positive image per text); image-to-text uses a uniform target over the image's own texts. open_clip's
    ClipLoss assumes one caption per image and would push an image away from its other expressions;
    with one text per image this reduces exactly to it.
    """
    logits = logit_scale * image_f @ text_f.T  # (B, T)
    t2i = F.cross_entropy(logits.T, owner)
    target = F.one_hot(owner, num_classes=len(image_f)).T.float()  # (B, T)
    target = target / target.sum(dim=1, keepdim=True).clamp_min(1)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    return (t2i + i2t) / 2


class ClipPretraining(Training):
    """Batches of images with all their expressions; one numpy and one torch generator, seeded once,
    run through the whole training (both are carried in the resume state)."""

    name = "pretrain_clip"
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def __init__(self, model: nn.Module, bank: ImageBank, sentences: pd.DataFrame, p: PretrainClipParams,
                 device: torch.device, *, seed: int, max_tokens: int, name: str = "pretrain_clip") -> None:
        self.name = name  # what the log lines say (the frozen CLIP trains under its own name)
        self.model = self.net = to_channels_last(model.to(device))
        self.bank, self.p, self.device, self.epochs = bank, p, device, p.epochs
        bank.preload(sentences["image_id"])
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens_all = tokenize(sentences["text"].tolist(), max_tokens)  # once: BPE is slow per step
        self.rows_of = {int(k): np.asarray(v) for k, v in sentences.groupby("image_id").indices.items()}
        self.image_ids = np.array(sorted(self.rows_of))
        steps_per_epoch = -(-len(self.image_ids) // p.batch_size)
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
        self.optimizer = build_optimizer(decay, [], p.lr, 1.0, p.weight_decay)
        self.optimizer.add_param_group({"params": no_decay, "lr": p.lr, "weight_decay": 0.0})
        self.scheduler = warmup_cosine_scheduler(self.optimizer, p.epochs * steps_per_epoch, p.warmup_steps)

    def epoch(self, epoch: int) -> Epoch:
        """A fresh permutation of the images, in batches of ``batch_size``."""
        order = self.rng.permutation(self.image_ids)
        size = self.p.batch_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        return Epoch(batches, len(batches))

    def step(self, batch: np.ndarray) -> StepOut:
        """The multi-positive contrastive loss of the batch's (blacked-out) images and expressions."""
        rows = [self.rows_of[int(i)] for i in batch]
        owner = torch.as_tensor(np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)]))
        images = random_blackout(self.bank.batch(batch), self.p.erase_prob, self.gen)
        tokens = self.tokens_all[np.concatenate(rows)]
        model, device = self.model, self.device
        image_f = model.encode_image(channels_last(clip_normalize(images).to(device)), normalize=True)
        text_f = model.encode_text(tokens.to(device), normalize=True)
        loss = multi_positive_clip_loss(image_f, text_f, owner.to(device), model.logit_scale.exp())
        return StepOut(loss, {"loss": loss})

    def after_step(self) -> None:
        """CLIP's cap on the logit scale (a temperature of at least 1/100)."""
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, np.log(100))

    def metrics(self) -> dict[str, float]:
        """The learned logit scale, logged each epoch."""
        return {"logit_scale": self.model.logit_scale.exp().item()}

    def generators(self) -> dict[str, np.random.Generator | torch.Generator]:
        """The image order and the blackout draws continue across epochs."""
        return {"order": self.rng, "blackout": self.gen}


def pretrain_clip(model: nn.Module, bank: ImageBank, sentences: pd.DataFrame, p: PretrainClipParams,
                  device: torch.device, *, seed: int, max_tokens: int,
                  run: TrainingRun | None = None) -> nn.Module:
    """Train ``model`` (an open_clip CLIP) in place with the settings ``p`` (``params.pretrain_clip``);
    returns it in eval mode. Log lines carry ``run``'s name."""
    name = run.name if run is not None else "pretrain_clip"
    return fit(ClipPretraining(model, bank, sentences, p, device, seed=seed, max_tokens=max_tokens,
                               name=name), run)


def pretrain_embedded_clip(params: Params, train: pd.DataFrame, index_bank: ImageBank, device: torch.device,
                           run: TrainingRun | None = None) -> nn.Module:
    """The embedded default's CLIP (``model.clip.pretrained: embedded``): ``model.clip.tiny`` from random
    weights (seeded with ``base.seed``), trained on ``pretraining_corpus`` of the train split's
    sentences ``train`` (images from ``index_bank``, at ``model.clip.tiny.image_size``).

    The one definition of this pretraining: a caller that pretrains with other ``model.clip.tiny``
    values gets the CLIP the ``pretrain_clip`` stage would build with them.
    """
    clip_p = params.model.clip
    seed_everything(params.base.seed)
    model = build_clip(clip_p.name, None, tiny=clip_p.tiny.model_dump(),
                       context_length=params.model.max_tokens)
    corpus, bank = pretraining_corpus(train, params.pretrain_clip, params.synthesize, index_bank,
                                      size=clip_p.tiny.image_size, seed=params.base.seed)
    return pretrain_clip(model, bank, corpus, params.pretrain_clip, device, seed=params.base.seed,
                         max_tokens=params.model.max_tokens, run=run)


def pretrain_embedded_frozen_clip(params: Params, device: torch.device,
                                  run: TrainingRun | None = None) -> tuple[nn.Module, dict]:
    """The embedded frozen CLIP of calibration and PRMS (``model.frozen_clip.pretrained: embedded``) and
    its ``tiny`` architecture: ``model.clip.tiny`` at ``pretrain_clip.frozen.image_size``, from random
    weights seeded with ``base.seed`` (which also seeds its cutout corpus), trained on
    ``pretrain_clip.frozen``'s cutouts with ``pretrain_clip``'s optimiser settings. It never sees a RIS image.

    Seeded here, not by whatever the main CLIP's pretraining left in torch's generator, because what
    this scorer learns depends strongly on its start: with one definition, a scorer built for a seed
    outside the stage is the stage's scorer for that seed.
    """
    fp, seed = params.pretrain_clip.frozen, params.base.seed
    tiny = {**params.model.clip.tiny.model_dump(), "image_size": fp.image_size}
    seed_everything(seed)
    model = build_clip(params.model.frozen_clip.name, None, tiny=tiny, context_length=params.model.max_tokens)
    corpus, bank = cutout_corpus(fp, params.synthesize, seed=seed)
    model = pretrain_clip(model, bank, corpus, params.pretrain_clip.model_copy(update={"epochs": fp.epochs}),
                          device, seed=seed, max_tokens=params.model.max_tokens, run=run)
    return model, tiny
