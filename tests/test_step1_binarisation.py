"""Step-1 maps are scored with two binarisations (issue 14, finding 7): this project's (min-max
normalised map >= ``evaluate.threshold``) and the authors' (ReLU, divide by the max, keep > 0), so
Step-1 mIoU / P@X can be compared with the paper's numbers."""

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from pipeline.eval.report import summary_markdown
from pipeline.eval.scoring import AUTHORS_KEY, GroundTruth, authors_binary, evaluate_responses
from pipeline.params import EvaluateParams
from pipeline.store import RESPONSE_SCHEMA, RecordWriter, open_responses


def test_authors_binary_keeps_every_positive_pixel_and_nothing_when_none_is():
    raw = np.array([[-2.0, 0.0, 0.01], [3.0, -0.5, 7.0]], np.float32)
    assert authors_binary(raw).tolist() == [[False, False, True], [True, False, True]]
    assert not authors_binary(-np.ones((3, 3), np.float32)).any()


def _refs(mask: np.ndarray) -> pd.DataFrame:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    return pd.DataFrame([{"ref_id": 1, "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                                 float(np.ptp(ys) + 1)],
                          "mask_counts": rle["counts"].decode("ascii"), "mask_height": mask.shape[0],
                          "mask_width": mask.shape[1]}])


def test_both_protocols_score_the_same_maps_with_the_same_point(tmp_path):
    """A map positive over the whole object but peaking in one corner of it: the authors' protocol keeps
    the object (IoU 1), min-max >= 0.5 keeps only the peak; the maximum point is shared."""
    gt = np.zeros((8, 8), bool)
    gt[:, :4] = True  # left half
    response = np.full((8, 8), -1.0, np.float32)
    response[:, :4] = 0.5
    response[0, 0] = 4.0
    store = tmp_path / "responses.zarr"
    with RecordWriter(store, RESPONSE_SCHEMA, (8, 8), shard_size=4, attrs={"input_size": [8, 8]}) as w:
        w.add_split("val", 1)
        w.write("val", 0, response[None], sent_id=[7], ref_id=[1], image_id=[1], height=[8], width=[8])
    metrics, table = evaluate_responses(open_responses(store), "val", GroundTruth(_refs(gt)),
                                        EvaluateParams(threshold=0.5, step2_threshold=0.5, gallery_size=4,
                                                       acc_box="max_point"))
    authors = metrics[AUTHORS_KEY]
    assert authors["mIoU"] == pytest.approx(1.0) and metrics["mIoU"] < 0.5
    assert authors["PointM"] == metrics["PointM"] == 1.0 and authors["n"] == metrics["n"] == 1
    assert table["sent_id"].tolist() == [7]
    summary = summary_markdown({"step1": {"val": metrics}, "step2": {}, "pseudo_masks": {}})
    assert "| val | Step-1, authors' binarisation | 1.000 |" in summary
