"""Step-1 training: localisation learned only by classifying expressions (Eq. 6-7) and calibrating
the positive response with a frozen CLIP (Eq. 8-9).

Per batch of B sentences from B distinct images, every image is scored against every sentence of the
batch (plus extra dataset sentences when N > B - 1): its own sentence is the positive, N sentences of
other images are the negatives (Eq. 7). The positive response masks the image, the frozen CLIP embeds
the masked image, and Eq. 8 pulls it towards the positive expression and away from K expressions of
other objects of the same image.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.data.samples import ImageBank
from pipeline.distributed import SINGLE_PROCESS, DistContext
from pipeline.losses import calibration_loss, classification_loss, image_level_scores
from pipeline.maps import clip_normalize, mask_images
from pipeline.models.clip_backbone import FrozenClip, encode_texts
from pipeline.models.step1 import TRISLocaliser
from pipeline.params import Params, Step1Params
from pipeline.runtime import autocast, channels_last, to_channels_last
from pipeline.train.common import to_device
from pipeline.train.loop import StepOut, TrainingRun, fit
from pipeline.train.sentences import SentenceTraining


def localiser_meta(params: Params, clip_dir: str) -> dict:
    """What rebuilds the Step-1 model from its checkpoint (saved beside the weights in model.pt)."""
    p = params.step1
    return {"clip_dir": clip_dir, "hidden_dim": params.model.hidden_dim, "prompt": p.prompt,
            "alpha": p.alpha, "beta": p.beta, "input_size": p.input_size,
            "max_tokens": params.model.max_tokens, "feature_stride": p.feature_stride,
            "temperature": p.temperature, "learn_temperature": p.learn_temperature}


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
        """``(B, K)`` row indices; same-image other-object rows first, then random other-image rows.

        Each row's draws (a permutation, then the top-up) come in row order from ``rng``, as they did
        when the top-up drew one candidate at a time: a row needing ``m`` more draws ``m`` at once (the
        same values, ``integers`` with a size continues the scalar stream), keeps the other-image ones
        and draws again for the rejects only, so no draw is made that the one-at-a-time loop would not
        make and a seed gives the same negatives. Rows cannot share one draw: the next row's permutation
        sits between two rows' top-ups in the stream.
        """
        out = np.empty((len(rows), k), dtype=np.int64)
        n = len(self.image_ids)
        for i, row in enumerate(rows):
            image = self.image_ids[row]
            same = self.by_image[int(image)]
            chosen = rng.permutation(same[self.ref_ids[same] != self.ref_ids[row]])[:k]
            filled = len(chosen)
            out[i, :filled] = chosen
            while filled < k:
                drawn = rng.integers(n, size=k - filled)
                kept = drawn[self.image_ids[drawn] != image]
                out[i, filled:filled + len(kept)] = kept
                filled += len(kept)
        return out


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of equal consecutive ``values``."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    bounds = [0, *cuts.tolist(), len(values)]
    return list(zip(bounds[:-1], bounds[1:], strict=False))


def classification_targets(batch_images: np.ndarray, query_images: np.ndarray, num_negatives: int,
                           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity for Eq. 7 with queries = [batch sentences..., extra sentences...].

    Query j is the positive of image i when j == i. Negatives are drawn only among queries of OTHER
    images (never another expression of the same image), ``num_negatives`` per image: a permutation of
    each image's candidates, in image order. Consecutive images with as many candidates (all of them in
    a batch of distinct images) are permuted by one ``rng.permuted`` call, which shuffles row after row
    with the draws of one ``rng.permutation`` per row, so a seed gives the same negatives.
    """
    b, q = len(batch_images), len(query_images)
    other = query_images[None, :] != batch_images[:, None]  # (b, q): candidate negatives of each image
    counts = other.sum(axis=1)
    valid = np.zeros((b, q), dtype=bool)
    valid[np.arange(b), np.arange(b)] = True
    for start, stop in _runs(counts):
        candidates = np.nonzero(other[start:stop])[1].reshape(stop - start, counts[start])
        chosen = rng.permuted(candidates, axis=1)[:, :num_negatives]
        valid[np.arange(start, stop)[:, None], chosen] = True
    return torch.eye(b, q), torch.from_numpy(valid)


def extra_negative_rows(batch_rows: np.ndarray, image_ids: np.ndarray, count: int,
                        rng: np.random.Generator) -> np.ndarray:
    """``count`` dataset sentences from images outside the batch, for N > B - 1 (drawn as
    :meth:`CalibrationNegatives.sample` tops up: the one-at-a-time draws, taken as many at once as are
    still missing)."""
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    banned = np.unique(image_ids[batch_rows])
    out = np.empty(0, dtype=np.int64)
    while len(out) < count:
        drawn = rng.integers(len(image_ids), size=count - len(out))
        out = np.concatenate([out, drawn[~np.isin(image_ids[drawn], banned)]])
    return out.astype(np.int64)


class Step1Training(SentenceTraining):
    """Eq. 6-9 on batches of B sentences of distinct images (see the module docstring)."""

    name = "train_step1"

    def __init__(self, model: TRISLocaliser, frozen: FrozenClip, bank: ImageBank, sentences: pd.DataFrame,
                 p: Step1Params, device: torch.device, *, seed: int, max_tokens: int,
                 dist: DistContext = SINGLE_PROCESS, align_corners: bool = False) -> None:
        to_channels_last(model.to(device))
        self.align_corners = align_corners  # model.align_corners: how Eq. 9 resizes the map
        self.frozen = to_channels_last(frozen.to(device))
        self.use_cal = p.calibration_positive or p.calibration_negative
        texts = sentences["text"].tolist()
        self.setup(model, bank, sentences, p, device, seed, max_tokens, dist)
        self.text_emb = encode_texts(frozen, texts, max_tokens, device) if self.use_cal else None
        self.negatives = CalibrationNegatives(sentences)

    def step(self, item: tuple[np.ndarray, torch.Tensor]) -> StepOut:
        """Every image of this rank's slice against ALL queries of the global batch (Eq. 7), plus the
        calibration of its positive response (Eq. 8-9)."""
        rows, images01 = item
        p, rng, device, dist = self.p, self.rng, self.device, self.dist
        image_ids = self.image_ids
        extra = extra_negative_rows(rows, image_ids, p.num_negatives - (len(rows) - 1), rng)
        query_rows = np.concatenate([rows, extra])
        targets, valid = classification_targets(image_ids[rows], image_ids[query_rows], p.num_negatives, rng)
        local = dist.local_slice(len(rows))  # this rank's images; every rank scores all queries
        # host data goes to the device with asynchronous copies (to_device): nothing here waits for the GPU
        tokens = to_device(self.tokens_all[query_rows], device)
        with autocast(device, p.amp):
            responses = self.net(channels_last(clip_normalize(images01)), tokens)  # (b, Q, h, w), Eq. 2
            scores = image_level_scores(responses.float(), p.focal_power, p.focal_eps)  # Eq. 6
        l_cls = classification_loss(scores, to_device(targets[local], device),
                                    to_device(valid[local], device))  # Eq. 7
        terms = {"cls": l_cls}
        loss = p.cls_weight * l_cls
        if self.use_cal:
            own = to_device(local, device)  # query index of each image's own sentence
            positive = responses[torch.arange(len(local), device=device), own].float()  # R^p
            with autocast(device, p.amp):
                masked_emb = self.frozen.encode_image(
                    channels_last(mask_images(images01, positive, p.calibration_size,
                                              space=p.calibration_mask_space,
                                              align_corners=self.align_corners)))
            # sampled for the whole batch so every rank's RNG stays in step
            neg_rows = self.negatives.sample(rows, p.calibration_negatives, rng)[local]
            l_cal, cal_terms = calibration_loss(  # Eq. 8-9
                masked_emb.float(), self.text_emb[to_device(rows[local], device)],
                self.text_emb[to_device(neg_rows, device)],
                torch.ones(neg_rows.shape, dtype=torch.bool, device=device),
                use_positive=p.calibration_positive, use_negative=p.calibration_negative,
                mode=p.calibration_score, negative_reduction=p.calibration_negative_reduction,
                negative_weight=p.calibration_negative_weight,
            )
            loss = loss + l_cal
            terms.update(cal=l_cal, **cal_terms)
        terms["loss"] = loss
        return StepOut(loss, terms, weight=dist.loss_weight(len(local), len(rows)),
                       share=len(local) / len(rows))

    def metrics(self) -> dict[str, float]:
        """The learned temperature of Eq. 7, logged each epoch."""
        return {"temperature": float(self.model.temperature.detach())}


def train_step1(model: TRISLocaliser, frozen: FrozenClip, bank: ImageBank, sentences: pd.DataFrame,
                p: Step1Params, device: torch.device, *, seed: int, max_tokens: int,
                run: TrainingRun | None = None, align_corners: bool = False) -> TRISLocaliser:
    """Train ``model`` in place with the settings ``p`` (``params.step1``); continues ``run``'s
    checkpoint when it has one.

    Under torchrun (``run.dist``) every rank draws the same global batch and encodes the images of its
    own slice against ALL queries of the batch, so each image still sees its N negatives (Eq. 7); each
    rank's loss is weighted by its share of the batch, so DDP's gradient average equals the gradient of
    the single-process loss. Rank 0 alone logs and checkpoints.
    """
    run = run or TrainingRun("train_step1")
    return fit(Step1Training(model, frozen, bank, sentences, p, device, seed=seed, max_tokens=max_tokens,
                             align_corners=align_corners, dist=run.dist), run)
