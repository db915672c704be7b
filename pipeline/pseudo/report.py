"""The ``make_pseudo_masks`` diagnostic report: pseudo-masks scored against ground truth.

Three stages of each object's mask are scored, so the report says where quality is won or lost: the
first expression's map thresholded as is, PRMS's selected map thresholded as is, and the refined
pseudo-mask. GT is read here for the report only; nothing trains on it. The stage scores each store
shard as it is written (:func:`local_quality`, with GT masks decoded for that shard only) and keeps just
the per-object IoUs (three floats an object); :func:`pseudo_mask_report` puts the shards' parts together
in store order, so the report is the one an all-at-once scoring gives, without holding any mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.eval.scoring import GroundTruth, object_ious, quality
from pipeline.params import PseudoMaskParams
from pipeline.pseudo.labels import Selection
from pipeline.pseudo.refine import to_pseudo_mask


def local_quality(selection: Selection, masks: dict[int, np.ndarray], rows: np.ndarray,
                  params: PseudoMaskParams, gt: GroundTruth) -> dict:
    """Per-object IoUs of one part of the objects, e.g. a shard (``rows`` are their places in the store)."""
    objects = selection.objects
    raw = {r: to_pseudo_mask(selection.fg_maps[r], params.threshold, params.keep) for r in selection.fg_maps}
    first = {r: to_pseudo_mask(selection.first_maps[r], params.threshold, params.keep)
             for r in selection.first_maps}
    return {"rows": rows, "first": object_ious(first, objects, gt), "raw": object_ious(raw, objects, gt),
            "refined": object_ious(masks, objects, gt), "objects": objects[["num_expressions", "changed"]]}


def pseudo_mask_report(parts: Sequence[dict], n_objects: int, params: PseudoMaskParams) -> dict:
    """The report from every part's :func:`local_quality`, objects in store order."""
    order = np.argsort(np.concatenate([q["rows"] for q in parts]), kind="stable")

    def cat(key: str) -> np.ndarray:
        return np.concatenate([q[key] for q in parts])[order]

    info = pd.concat([q["objects"] for q in parts], ignore_index=True).iloc[order]
    multi = info["num_expressions"] > 1
    return {
        "n_objects": n_objects,
        "raw_first_expression": quality(cat("first")),
        "raw_selected": quality(cat("raw")),
        "refined": quality(cat("refined")),
        "prms": {"enabled": params.prms, "objects_with_several_expressions": int(multi.sum()),
                 "picked_other_than_first": int(info["changed"].sum()),
                 "mean_expressions_per_object": round(float(info["num_expressions"].mean()), 3)},
        "refine": params.refine,
    }
