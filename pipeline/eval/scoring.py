"""Scoring maps of a split against the ground truth (evaluation stages only).

Each map is brought to its image's original size before scoring (Sec. 4.1 metrics in
:mod:`pipeline.eval.metrics`). Step-1 responses are min-max normalised per map and then thresholded; Step-2
outputs are probabilities already.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.data.index import decode_mask
from pipeline.data.samples import ImageBank
from pipeline.eval.metrics import aggregate, chance_baselines, iou, score_sentence
from pipeline.maps import clip_normalize, minmax_normalize, upsample
from pipeline.models.clip_backbone import tokenize
from pipeline.params import EvaluateParams
from pipeline.store import RecordStore


def upsample_response(response: np.ndarray, height: int, width: int, *, align_corners: bool = False,
                      input_size: int | None = None) -> np.ndarray:
    """A stored low-resolution response, bilinearly up-sampled to the original image size (raw values).

    ``align_corners`` (``model.align_corners``) with the store's ``input_size`` gives the authors' two
    resizes (:func:`pipeline.maps.upsample`)."""
    low = torch.from_numpy(np.asarray(response, dtype=np.float32))[None]
    return upsample(low, (height, width), align_corners=align_corners, via=input_size)[0].numpy()


def response_to_prob(response: np.ndarray, height: int, width: int) -> np.ndarray:
    """A stored low-resolution response as a [0, 1] map at the original image size."""
    return minmax_normalize(upsample_response(response, height, width))


def authors_binary(raw: np.ndarray) -> np.ndarray:
    """Step-1 binarisation of the authors' evaluation code: ReLU, divide by the maximum, keep ``> 0``.

    Dividing by a positive maximum changes no sign, so that is ``raw > 0``: every pixel whose raw
    response (a temperature-scaled cosine) is positive, however weak, and nothing when no pixel is.
    This project's own protocol (min-max, ``>= evaluate.threshold``) keeps the upper part of every map.
    Both are reported so Step-1 mIoU / P@X compare with the paper's.
    """
    return np.asarray(raw) > 0


class GroundTruth:
    """Decoded GT masks and boxes by ``ref_id``, decoded once each (several sentences share a ref)."""

    def __init__(self, refs: pd.DataFrame) -> None:
        self._refs = refs.set_index("ref_id")
        self._masks: dict[int, np.ndarray] = {}

    def mask(self, ref_id: int) -> np.ndarray:
        if ref_id not in self._masks:
            self._masks[ref_id] = decode_mask(self._refs.loc[ref_id])
        return self._masks[ref_id]

    def box(self, ref_id: int) -> list[float]:
        return [float(v) for v in self._refs.loc[ref_id, "bbox"]]


def score_maps(items: Iterable[tuple[int, int, np.ndarray]], gt: GroundTruth,
               threshold: float, *, acc_box: str = "max_point") -> tuple[dict, pd.DataFrame]:
    """Score ``(sent_id, ref_id, prob_map at original size)`` items; return metrics and a per-sentence
    table (used to pick best / median / worst cases for galleries). ``acc_box`` is
    ``evaluate.acc_box`` (:func:`pipeline.eval.metrics.score_sentence`)."""
    records, scores = [], []
    for sent_id, ref_id, prob in items:
        score = score_sentence(prob, gt.mask(ref_id), gt.box(ref_id), threshold, acc_box=acc_box)
        scores.append(score)
        records.append({"sent_id": int(sent_id), "ref_id": int(ref_id), **asdict(score)})
    return aggregate(scores), pd.DataFrame.from_records(records)


AUTHORS_KEY = "authors_binarisation"


def evaluate_responses(store: RecordStore, split: str, gt: GroundTruth, params: EvaluateParams, *,
                       align_corners: bool = False) -> tuple[dict, pd.DataFrame]:
    """Metrics of the Step-1 maps of one split (min-max normalised, binarised at ``params.threshold``),
    the chance PointM baselines beside them, and under ``authors_binarisation`` the same maps scored
    with the authors' binarisation (:func:`authors_binary`; the maximum point, hence PointM / PointIt,
    is the same). Acc_box follows ``params.acc_box``; maps are up-sampled as ``align_corners``
    (``model.align_corners``) says, via the store's ``input_size``."""
    input_size = int(store.attrs(split)["input_size"][0]) if align_corners else None
    records, ours, authors = [], [], []
    for batch in store.iter_batches(split, 256):
        for k in range(len(batch["sent_id"])):
            ref_id = int(batch["ref_id"][k])
            raw = upsample_response(batch["response"][k], int(batch["height"][k]), int(batch["width"][k]),
                                    align_corners=align_corners, input_size=input_size)
            prob = minmax_normalize(raw)
            mask, box = gt.mask(ref_id), gt.box(ref_id)
            rule = params.acc_box
            ours.append(score_sentence(prob, mask, box, params.threshold, acc_box=rule))
            authors.append(score_sentence(prob, mask, box, binary=authors_binary(raw), acc_box=rule))
            records.append({"sent_id": int(batch["sent_id"][k]), "ref_id": ref_id, **asdict(ours[-1])})
    if not records:
        raise ValueError(f"responses store: split {split!r} has no sentences")
    table = pd.DataFrame.from_records(records)
    metrics = aggregate(ours)
    metrics.update(chance_baselines(gt.mask(int(r)) for r in table["ref_id"]))
    metrics[AUTHORS_KEY] = aggregate(authors)
    return metrics, table


@torch.inference_mode()
def iter_segmenter_probs(model: torch.nn.Module, bank: ImageBank, sentences: pd.DataFrame, batch_size: int,
                         max_tokens: int, device: torch.device, *, align_corners: bool = False
                         ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(sent_id, ref_id, probability map at original size)`` of the Step-2 network; its logits,
    at the input size, are resized to the image with ``align_corners`` (``model.align_corners``; the
    authors' evaluation: ``True``)."""
    model.to(device).eval()
    texts = sentences["text"].tolist()
    starts = range(0, len(sentences), batch_size)
    image_ids = sentences["image_id"].to_numpy()
    image_batches = bank.prefetch((image_ids[start:start + batch_size] for start in starts), device)
    for start, images01 in zip(starts, image_batches, strict=True):
        part = sentences.iloc[start:start + batch_size]
        images = clip_normalize(images01)
        tokens = tokenize(texts[start:start + batch_size], max_tokens).to(device)
        logits = model(images, tokens).float()[:, 0].cpu()
        for k, row in enumerate(part.itertuples()):
            # up-sample logits, then sigmoid in float64: float32 saturates to exactly 1.0 past ~17,
            # which would turn the PointM / PointIt argmax into "first saturated pixel in raster order"
            up = upsample(logits[k:k + 1], (int(row.height), int(row.width)),
                          align_corners=align_corners)[0].double()
            yield int(row.sent_id), int(row.ref_id), torch.sigmoid(up).numpy()


def val_miou_scorer(bank: ImageBank, val_sentences: pd.DataFrame, gt: GroundTruth, *, threshold: float,
                    max_tokens: int, device: torch.device, align_corners: bool,
                    batch_size: int = 32) -> Callable[[torch.nn.Module], float]:
    """``model -> val mIoU`` as ``evaluate_step2`` computes it (``evaluate.step2_threshold``,
    ``model.align_corners``): the score of ``step2.select: best_val``
    (:class:`pipeline.train.selection.BestValSelection`). ``val_sentences`` is the val split's table;
    only the val split's GT is read."""
    if val_sentences.empty:
        raise ValueError("step2.select: best_val needs a val split with sentences; the index has none")

    def score(model: torch.nn.Module) -> float:
        probs = iter_segmenter_probs(model, bank, val_sentences, batch_size, max_tokens, device,
                                     align_corners=align_corners)
        metrics, _ = score_maps(probs, gt, threshold)
        return float(metrics["mIoU"])

    return score


def object_ious(masks: dict[int, np.ndarray], objects: pd.DataFrame, gt: GroundTruth) -> np.ndarray:
    """IoU of each object's S x S pseudo-mask (``masks[ref_id]``), resized to its image, against its GT
    (a diagnostic: nothing trains on it). ``objects`` has ``ref_id``, ``height`` and ``width``."""
    ious = []
    for row in objects.itertuples():
        mask = Image.fromarray(masks[row.ref_id].astype(np.uint8))
        up = mask.resize((row.width, row.height), Image.NEAREST)
        ious.append(iou(np.asarray(up, dtype=bool), gt.mask(row.ref_id)))
    return np.asarray(ious)


def quality(ious: np.ndarray) -> dict:
    """mIoU and P@0.5 of per-object IoUs."""
    return {"mIoU": round(float(ious.mean()), 4), "P@0.5": round(float((ious >= 0.5).mean()), 4)}
