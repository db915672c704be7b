"""Contrastive pretraining of the embedded small CLIP on (image, expression) pairs of the train split.

This stands in for OpenAI's web-scale pretraining when nothing can be downloaded: the result is what
Step-1 starts from and what the frozen "CLIP" of calibration (Eq. 8-9) and PRMS (Eq. 10) is. Only text
supervises it: an image is paired with an expression of one of its objects; boxes and masks are never
read. Random black rectangles (no ground truth involved) get it used to partially blacked-out inputs,
which is what calibration and PRMS show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.data.samples import ImageBank
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import tokenize
from pipeline.progress import progress
from pipeline.runtime import channels_last, to_channels_last
from pipeline.train.common import build_optimizer, check_finite, warmup_cosine_scheduler


@dataclass
class PretrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    erase_prob: float
    max_tokens: int
    seed: int


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


def pretrain_clip(model: torch.nn.Module, bank: ImageBank, sentences: pd.DataFrame, cfg: PretrainConfig,
                  device: torch.device, log=None) -> torch.nn.Module:
    """Train ``model`` (an open_clip CLIP) in place on batches of images with all their expressions;
    returns it in eval mode."""
    to_channels_last(model.to(device)).train()
    bank.preload(sentences["image_id"])
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens_all = tokenize(sentences["text"].tolist(), cfg.max_tokens)  # once: BPE is slow per step
    rows_of = {int(k): np.asarray(v) for k, v in sentences.groupby("image_id").indices.items()}
    image_ids = np.array(sorted(rows_of))
    steps_per_epoch = -(-len(image_ids) // cfg.batch_size)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    optimizer = build_optimizer(decay, [], cfg.lr, 1.0, cfg.weight_decay)
    optimizer.add_param_group({"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0})
    scheduler = warmup_cosine_scheduler(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_steps)
    step = 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(image_ids)
        batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        losses = []
        for batch in progress(batches, desc=f"pretrain_clip {epoch + 1}/{cfg.epochs}"):
            rows = [rows_of[int(i)] for i in batch]
            owner = torch.as_tensor(np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)]))
            images = random_blackout(bank.batch(batch), cfg.erase_prob, gen)
            tokens = tokens_all[np.concatenate(rows)]
            image_f = model.encode_image(channels_last(clip_normalize(images).to(device)), normalize=True)
            text_f = model.encode_text(tokens.to(device), normalize=True)
            loss = multi_positive_clip_loss(image_f, text_f, owner.to(device), model.logit_scale.exp())
            check_finite("pretrain_clip", epoch, step, {"clip_loss": loss})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
            step += 1
            losses.append(loss.item())
        print(f"pretrain_clip epoch {epoch + 1}/{cfg.epochs}: loss={np.mean(losses):.4f}")
        if log is not None:
            log(step=step, epoch=epoch + 1, loss=float(np.mean(losses)), lr=scheduler.get_last_lr()[0],
                logit_scale=model.logit_scale.exp().item())
    return model.eval()
