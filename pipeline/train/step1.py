"""Step-1 training: localisation learned only by classifying expressions (Eq. 6-7) and calibrating
the positive response with a frozen CLIP (Eq. 8-9).

Per batch of B sentences from B distinct images, every image is scored against every sentence of the
batch (plus extra dataset sentences when N > B - 1): its own sentence is the positive, N sentences of
other images are the negatives (Eq. 7). The positive response masks the image, the frozen CLIP embeds
the masked image, and Eq. 8 pulls it towards the positive expression and away from K expressions of
other objects of the same image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.samples import ImageBank, distinct_image_batches, one_sentence_per_ref
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.losses import calibration_loss, classification_loss, image_level_scores
from pipeline.maps import clip_normalize, mask_images
from pipeline.models.clip_backbone import FrozenClip, encode_texts, tokenize
from pipeline.models.step1 import TRISLocaliser
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
class Step1TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    poly_power: float
    num_negatives: int
    calibration_negatives: int
    cls_weight: float
    calibration_positive: bool
    calibration_negative: bool
    calibration_size: int
    calibration_score: str
    focal_power: float
    focal_eps: float
    max_tokens: int
    amp: bool
    seed: int
    freeze_batchnorm: bool = False
    compile: bool = False

    @classmethod
    def from_params(cls, params: Params) -> Step1TrainConfig:
        """The training settings of ``params.step1`` (plus the shared token limit and seed)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"max_tokens", "seed"}
        return cls(**{k: getattr(params.step1, k) for k in fields}, max_tokens=params.model.max_tokens,
                   seed=params.base.seed)


def localiser_meta(params: Params, clip_dir: str) -> dict:
    """What rebuilds the Step-1 model from its checkpoint (saved beside the weights in model.pt)."""
    p = params.step1
    return {"clip_dir": clip_dir, "hidden_dim": params.model.hidden_dim, "prompt": p.prompt,
            "alpha": p.alpha, "beta": p.beta, "input_size": p.input_size,
            "max_tokens": params.model.max_tokens}


class CalibrationNegatives:
    """For each sentence, K expressions of OTHER objects of the same image (Eq. 8), topped up with
    expressions of other images when the image has too few (the paper's implementation details)."""

    def __init__(self, sentences: pd.DataFrame) -> None:
        self.image_ids = sentences["image_id"].to_numpy()
        self.ref_ids = sentences["ref_id"].to_numpy()
        self.by_image: dict[int, np.ndarray] = {
            int(k): np.asarray(v) for k, v in sentences.groupby("image_id").indices.items()
        }

    def sample(self, rows: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """``(B, K)`` row indices; same-image other-object rows first, then random other-image rows."""
        out = np.empty((len(rows), k), dtype=np.int64)
        n = len(self.image_ids)
        for i, row in enumerate(rows):
            same = self.by_image[int(self.image_ids[row])]
            others = same[self.ref_ids[same] != self.ref_ids[row]]
            chosen = list(rng.permutation(others)[:k])
            while len(chosen) < k:
                cand = int(rng.integers(n))
                if self.image_ids[cand] != self.image_ids[row]:
                    chosen.append(cand)
            out[i] = chosen
        return out


def classification_targets(batch_images: np.ndarray, query_images: np.ndarray, num_negatives: int,
                           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity for Eq. 7 with queries = [batch sentences..., extra sentences...].

    Query j is the positive of image i when j == i. Negatives are drawn only among queries of OTHER
    images (never another expression of the same image), ``num_negatives`` per image.
    """
    b, q = len(batch_images), len(query_images)
    targets = torch.zeros(b, q)
    valid = torch.zeros(b, q, dtype=torch.bool)
    for i in range(b):
        targets[i, i] = 1.0
        valid[i, i] = True
        candidates = np.flatnonzero(query_images != batch_images[i])
        chosen = rng.permutation(candidates)[:num_negatives]
        valid[i, chosen] = True
    return targets, valid


def extra_negative_rows(batch_rows: np.ndarray, image_ids: np.ndarray, count: int,
                        rng: np.random.Generator) -> np.ndarray:
    """``count`` dataset sentences from images outside the batch, for N > B - 1."""
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    banned = set(image_ids[batch_rows].tolist())
    out: list[int] = []
    while len(out) < count:
        cand = int(rng.integers(len(image_ids)))
        if int(image_ids[cand]) not in banned:
            out.append(cand)
    return np.asarray(out, dtype=np.int64)


def train_step1(model: TRISLocaliser, frozen: FrozenClip, bank: ImageBank, sentences: pd.DataFrame,
                cfg: Step1TrainConfig, device: torch.device, *, resume_path: Path | None = None,
                fingerprint: str = "", log: Callable[..., None] | None = None,
                dist: DistContext = SINGLE_PROCESS) -> TRISLocaliser:
    """Train ``model`` in place; resumes from ``resume_path`` when it holds this fingerprint's state.

    Under torchrun (``dist.enabled``) every rank draws the same global batch and encodes the images of
    its own slice against ALL queries of the batch, so each image still sees its N negatives (Eq. 7);
    each rank's loss is weighted by its share of the batch, so DDP's gradient average equals the
    gradient of the single-process loss. Rank 0 alone logs and writes ``resume_path``.
    """
    to_channels_last(model.to(device))
    to_channels_last(frozen.to(device))
    image_ids = sentences["image_id"].to_numpy()
    bank.preload(image_ids)
    texts = sentences["text"].tolist()
    tokens_all = tokenize(texts, cfg.max_tokens)  # once: BPE is slow per step
    use_cal = cfg.calibration_positive or cfg.calibration_negative
    text_emb = encode_texts(frozen, texts, cfg.max_tokens, device) if use_cal else None
    negatives = CalibrationNegatives(sentences)

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
        print(f"train_step1: resuming after epoch {start_epoch} (step {step}) from {resume_path}")

    for epoch in range(start_epoch, cfg.epochs):
        set_train_mode(net, cfg.freeze_batchnorm)
        rng = np.random.default_rng([cfg.seed, epoch])
        subset = one_sentence_per_ref(ref_ids, rng)
        batches = [subset[b] for b in distinct_image_batches(image_ids[subset], cfg.batch_size, rng)]
        sums: dict[str, float] = {}
        bar = progress(batches, desc=f"train_step1 {epoch + 1}/{cfg.epochs}",
                       disable=not dist.is_main or None)
        local_images = (image_ids[rows[dist.local_slice(len(rows))]] for rows in batches)
        for rows, images01 in zip(bar, bank.prefetch(local_images, device), strict=True):
            extra = extra_negative_rows(rows, image_ids, cfg.num_negatives - (len(rows) - 1), rng)
            query_rows = np.concatenate([rows, extra])
            targets, valid = classification_targets(image_ids[rows], image_ids[query_rows],
                                                     cfg.num_negatives, rng)
            local = dist.local_slice(len(rows))  # this rank's images; every rank scores all queries
            tokens = tokens_all[query_rows].to(device)
            with autocast(device, cfg.amp):
                responses = net(channels_last(clip_normalize(images01)), tokens)  # (b, Q, h, w), Eq. 2
                scores = image_level_scores(responses.float(), cfg.focal_power, cfg.focal_eps)  # Eq. 6
            l_cls = classification_loss(scores, targets[local].to(device), valid[local].to(device))  # Eq. 7
            terms = {"cls": l_cls}
            loss = cfg.cls_weight * l_cls
            if use_cal:
                own = torch.as_tensor(local, device=device)  # query index of each image's own sentence
                positive = responses[torch.arange(len(local), device=device), own].float()  # R^p
                with autocast(device, cfg.amp):
                    masked_emb = frozen.encode_image(
                        channels_last(mask_images(images01, positive, cfg.calibration_size)))
                # sampled for the whole batch so every rank's RNG stays in step
                neg_rows = negatives.sample(rows, cfg.calibration_negatives, rng)[local]
                l_cal, cal_terms = calibration_loss(  # Eq. 8-9
                    masked_emb.float(), text_emb[rows[local]], text_emb[neg_rows],
                    torch.ones(neg_rows.shape, dtype=torch.bool, device=device),
                    use_positive=cfg.calibration_positive, use_negative=cfg.calibration_negative,
                    mode=cfg.calibration_score,
                )
                loss = loss + l_cal
                terms.update(cal=l_cal, **cal_terms)
            terms["loss"] = loss
            check_finite("train_step1", epoch, step, terms)
            weight = dist.loss_weight(len(local), len(rows))
            optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for k, v in reduce_terms(terms, dist, len(local) / len(rows)).items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{loss.item():.3f}", cls=f"{l_cls.item():.3f}")
        means = {k: v / max(1, len(batches)) for k, v in sums.items()}
        if dist.is_main:
            print(f"train_step1 epoch {epoch + 1}/{cfg.epochs}: "
                  + ", ".join(f"{k}={v:.4f}" for k, v in means.items()))
            if log is not None:
                log(epoch=epoch + 1, step=step, lr=scheduler.get_last_lr()[-1],
                    temperature=float(model.temperature.detach()), **means)
            if resume_path is not None:
                save_resume_state(resume_path, fingerprint=fingerprint, epoch=epoch + 1, step=step,
                                  model=model, optimizer=optimizer, scheduler=scheduler,
                                  extra={"config": asdict(cfg)})
        dist.barrier()
    return model.eval()
