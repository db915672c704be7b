"""Segmentation and localisation metrics of the paper's Sec. 4.1: IoU, P@t, PointM, PointIt, Acc_box.

Every metric is scored per sentence from one map at the original image size (a soft map in [0, 1], or
a bool mask) against that sentence's ground-truth mask and box, then averaged by :func:`aggregate`.
The conventions that papers leave implicit are fixed here once, in the docstrings, so that the Step-1
and Step-2 evaluations and the chance baselines all use the same ones:

* IoU of an empty prediction against an empty ground truth is 1.0 (nothing to find, nothing found).
* The "maximum point" is the first maximum in row-major order (``np.argmax``), as ``(y, x)``.
* Pixel ``(x, y)`` is inside a COCO ``[bx, by, bw, bh]`` box when ``bx <= x <= bx + bw`` and
  ``by <= y <= by + bh``: pixel indices are compared to box coordinates directly, borders included.
* P@t counts IoU >= t.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
PRECISION_THRESHOLDS = (0.5, 0.7, 0.9)
BOX_IOU_HIT = 0.5


def _check_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {a.shape}")
    return a


def mask_iou_terms(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Intersection and union pixel counts of two bool ``(H, W)`` masks (kept for the overall IoU)."""
    pred = _check_2d("pred", pred).astype(bool)
    gt = _check_2d("gt", gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def iou_from_terms(intersection: int, union: int) -> float:
    """``I / U``; an empty union (empty prediction and empty ground truth) scores 1.0."""
    return 1.0 if union == 0 else intersection / union


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mask IoU of two bool masks; 1.0 when both are empty (see :func:`iou_from_terms`)."""
    return iou_from_terms(*mask_iou_terms(pred, gt))


def point_from_map(score_map: np.ndarray) -> tuple[int, int]:
    """``(y, x)`` of the map's maximum; on ties the first maximum in row-major order wins."""
    score_map = _check_2d("map", score_map)
    if score_map.size == 0:
        raise ValueError("cannot take the maximum point of an empty map")
    if score_map.dtype != bool and not np.isfinite(score_map).all():
        raise ValueError("map contains NaN or infinite values")
    y, x = np.unravel_index(int(np.argmax(score_map)), score_map.shape)
    return int(y), int(x)


def point_in_mask(point: tuple[int, int], mask: np.ndarray) -> bool:
    """PointM hit test (Sec. 4.1): the maximum point lies on a ground-truth mask pixel."""
    y, x = point
    return bool(np.asarray(mask, dtype=bool)[y, x])


def point_in_box(point: tuple[int, int], box_xywh: Sequence[float]) -> bool:
    """PointIt hit test: ``bx <= x <= bx + bw`` and ``by <= y <= by + bh`` (pixel indices vs box
    coordinates, borders included)."""
    y, x = point
    bx, by, bw, bh = (float(v) for v in box_xywh)
    return bx <= x <= bx + bw and by <= y <= by + bh


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` to ``[x0, y0, x1, y1]`` corners."""
    bx, by, bw, bh = (float(v) for v in box)
    return bx, by, bx + bw, by + bh


def box_iou(a_xyxy: Sequence[float], b_xyxy: Sequence[float]) -> float:
    """IoU of two ``[x0, y0, x1, y1]`` boxes; 0.0 when both have zero area."""
    ax0, ay0, ax1, ay1 = a_xyxy
    bx0, by0, bx1, by1 = b_xyxy
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def predicted_box(binary: np.ndarray, point: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Tight ``[x0, y0, x1 + 1, y1 + 1]`` box of the 8-connected component of ``binary`` holding ``point``.

    ``None`` when ``point`` is not a foreground pixel (which covers an empty ``binary``).
    """
    binary = _check_2d("binary map", binary).astype(bool)
    y, x = point
    if not binary[y, x]:
        return None
    labels, _ = ndimage.label(binary, structure=EIGHT_CONNECTED)
    ys, xs = np.nonzero(labels == labels[y, x])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_accuracy_hit(
    binary: np.ndarray, point: tuple[int, int], gt_box_xywh: Sequence[float], iou_hit: float = BOX_IOU_HIT
) -> bool:
    """Acc_box hit test for one sentence.

    Rule (the same for every method evaluated here, no NMS): binarise the map (``map >= threshold``,
    done by the caller), take the 8-connected component that contains the map's maximum point, and box
    it tightly as ``[x0, y0, x1 + 1, y1 + 1]`` in pixel-edge coordinates (a single pixel at (x, y) is
    the box [x, y, x + 1, y + 1]). It is a hit when its IoU with the ground-truth box, converted from
    COCO ``[x, y, w, h]`` to ``[x, y, x + w, y + h]``, is ``>= 0.5``. If the maximum pixel is below the
    threshold (so also if the binary map is empty) there is no box and it is a miss.
    """
    box = predicted_box(binary, point)
    return box is not None and box_iou(box, xywh_to_xyxy(gt_box_xywh)) >= iou_hit


ACC_BOX_RULES = ("max_point", "authors")
AUTHORS_NMS_IOU = 0.05
AUTHORS_KEEP_FRACTION = 0.5


def _nms(boxes: list[tuple[int, int, int, int]], scores: list[float], iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, highest score first (ties: lower index first)."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        if all(box_iou(boxes[i], boxes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def authors_boxes(binary: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The boxes the authors' evaluation draws from a binary map (``generate_bbox`` of their
    ``utils/box_eval_utils.py``), as ``[x0, y0, x1 + 1, y1 + 1]``.

    Every 8-connected component is boxed tightly (their ``cv2.findContours`` outer contours; the
    contours of holes, which they also box, are left out); a box's confidence is the fraction of its
    pixels that are foreground; boxes overlapping a more confident one by IoU > 0.05 are suppressed
    (their NMS), and boxes whose confidence is at most half the best are dropped. Their NMS call
    passes ``(x, y, w, h)`` rectangles where corners are expected; this uses the corners. An empty
    map has no box; a map that is all foreground has one, the whole image.
    """
    binary = _check_2d("binary map", binary).astype(bool)
    labels, _ = ndimage.label(binary, structure=EIGHT_CONNECTED)
    boxes, fills = [], []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        ys, xs = sl
        boxes.append((xs.start, ys.start, xs.stop, ys.stop))
        fills.append(float(binary[sl].mean()))
    if not boxes:
        return []
    kept = _nms(boxes, fills, AUTHORS_NMS_IOU)
    best = max(fills)
    return [boxes[i] for i in kept if fills[i] > AUTHORS_KEEP_FRACTION * best]


def box_accuracy_hit_authors(binary: np.ndarray, gt_box_xywh: Sequence[float],
                             iou_hit: float = BOX_IOU_HIT) -> bool:
    """Acc_box as the authors' evaluation scores it (``eval_box_acc``): a hit when ANY box of
    :func:`authors_boxes` has IoU >= 0.5 with the ground-truth box, wherever the maximum point is.

    More lenient than :func:`box_accuracy_hit` (the component holding the maximum point only): a map
    that lights up the target and a distractor scores a hit here. ``evaluate.acc_box: authors``.
    """
    gt = xywh_to_xyxy(gt_box_xywh)
    return any(box_iou(box, gt) >= iou_hit for box in authors_boxes(binary))


@dataclass(frozen=True)
class SentenceScore:
    """All per-sentence quantities :func:`aggregate` needs."""

    intersection: int
    union: int
    iou: float
    point_m: bool
    point_it: bool
    box_hit: bool


def score_sentence(
    prob_map: np.ndarray, gt_mask: np.ndarray, gt_box: Sequence[float], threshold: float = 0.5,
    binary: np.ndarray | None = None, acc_box: str = "max_point",
) -> SentenceScore:
    """Score one sentence's map, already at the original image size ``(H, W)``.

    The binary prediction is ``binary`` when given (another binarisation protocol of the same map),
    else ``prob_map >= threshold``; a bool ``prob_map`` is used as the binary prediction directly
    (``threshold`` is then ignored) and its maximum point is its first True pixel.
    PointM / PointIt use the maximum point of ``prob_map``; Acc_box follows :func:`box_accuracy_hit`
    (``acc_box='max_point'``, this project's rule) or :func:`box_accuracy_hit_authors`
    (``acc_box='authors'``), the ``evaluate.acc_box`` setting.
    """
    if acc_box not in ACC_BOX_RULES:
        raise ValueError(f"evaluate.acc_box: unknown rule {acc_box!r}; expected one of {ACC_BOX_RULES}")
    prob_map = _check_2d("prob_map", prob_map)
    gt_mask = _check_2d("gt_mask", gt_mask).astype(bool)
    if prob_map.shape != gt_mask.shape:
        raise ValueError(f"map shape {prob_map.shape} != ground-truth mask shape {gt_mask.shape}")
    if len(gt_box) != 4:
        raise ValueError(f"gt_box must be COCO [x, y, w, h], got {gt_box!r}")
    if binary is None:
        binary = prob_map if prob_map.dtype == bool else prob_map >= threshold
    elif np.shape(binary) != prob_map.shape:
        raise ValueError(f"binary shape {np.shape(binary)} != map shape {prob_map.shape}")
    point = point_from_map(prob_map)
    inter, union = mask_iou_terms(binary, gt_mask)
    return SentenceScore(
        intersection=inter,
        union=union,
        iou=iou_from_terms(inter, union),
        point_m=point_in_mask(point, gt_mask),
        point_it=point_in_box(point, gt_box),
        box_hit=(box_accuracy_hit(binary, point, gt_box) if acc_box == "max_point"
                 else box_accuracy_hit_authors(binary, gt_box)),
    )


def aggregate(scores: Sequence[SentenceScore]) -> dict[str, float | int]:
    """Dataset-level metrics, as fractions in [0, 1] rounded to 4 decimals.

    ``mIoU`` is the mean of per-sentence IoUs, ``oIoU`` the overall IoU (total intersection over total
    union; 1.0 if every union is empty), ``P@t`` the fraction of sentences with IoU >= t, ``PointM`` /
    ``PointIt`` / ``Acc_box`` hit rates, ``n`` the number of sentences.
    """
    if len(scores) == 0:
        raise ValueError("aggregate() needs at least one sentence score")
    ious = np.array([s.iou for s in scores], dtype=np.float64)
    total_i = sum(s.intersection for s in scores)
    total_u = sum(s.union for s in scores)
    out: dict[str, float | int] = {
        "mIoU": float(ious.mean()),
        "oIoU": iou_from_terms(total_i, total_u),
    }
    for t in PRECISION_THRESHOLDS:
        out[f"P@{t}"] = float((ious >= t).mean())
    out["PointM"] = float(np.mean([s.point_m for s in scores]))
    out["PointIt"] = float(np.mean([s.point_it for s in scores]))
    out["Acc_box"] = float(np.mean([s.box_hit for s in scores]))
    out = {k: round(float(v), 4) for k, v in out.items()}
    out["n"] = len(scores)
    return out


def chance_baselines(gt_masks: Iterable[np.ndarray]) -> dict[str, float]:
    """PointM of two maps that look at nothing: a context for Step-1 PointM numbers.

    ``PointM_center``: the maximum point is always the image centre pixel ``(H // 2, W // 2)``.
    ``PointM_uniform``: the expected PointM of a uniformly random pixel, which is exactly each mask's
    area fraction averaged over sentences (so no sampling is needed).
    """
    center, uniform = [], []
    for mask in gt_masks:
        mask = _check_2d("gt_mask", mask).astype(bool)
        h, w = mask.shape
        center.append(bool(mask[h // 2, w // 2]))
        uniform.append(float(mask.mean()))
    if not center:
        raise ValueError("chance_baselines() needs at least one ground-truth mask")
    return {
        "PointM_center": round(float(np.mean(center)), 4),
        "PointM_uniform": round(float(np.mean(uniform)), 4),
    }
