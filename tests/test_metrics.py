"""Hand-computed cases for the Sec. 4.1 metrics, including the conventions the paper leaves open."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.eval.metrics import (
    SentenceScore,
    aggregate,
    box_accuracy_hit,
    box_iou,
    chance_baselines,
    iou,
    mask_iou_terms,
    point_from_map,
    point_in_box,
    point_in_mask,
    predicted_box,
    score_sentence,
)


def _mask(shape, pixels):
    m = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        m[y, x] = True
    return m


def test_iou_terms_hand_computed():
    pred = np.zeros((4, 5), bool)
    pred[0:2, 0:2] = True  # 4 px
    gt = np.zeros((4, 5), bool)
    gt[1:3, 1:4] = True  # 6 px, overlap = (1,1)
    assert mask_iou_terms(pred, gt) == (1, 9)
    assert iou(pred, gt) == pytest.approx(1 / 9)


def test_iou_empty_cases():
    gt = _mask((3, 3), [(0, 0), (1, 1)])
    empty = np.zeros((3, 3), bool)
    assert mask_iou_terms(empty, gt) == (0, 2) and iou(empty, gt) == 0.0  # empty prediction
    assert mask_iou_terms(gt, empty) == (0, 2) and iou(gt, empty) == 0.0  # empty ground truth
    assert mask_iou_terms(empty, empty) == (0, 0) and iou(empty, empty) == 1.0  # both empty


def test_iou_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        mask_iou_terms(np.zeros((3, 7), bool), np.zeros((7, 3), bool))


def test_argmax_ties_take_first_in_row_major_order():
    m = np.zeros((3, 6))
    m[0, 5] = 1.0
    m[1, 0] = 1.0
    m[2, 2] = 1.0
    assert point_from_map(m) == (0, 5)
    assert point_from_map(np.full((2, 3), 0.7)) == (0, 0)
    with pytest.raises(ValueError, match="NaN"):
        point_from_map(np.array([[0.0, np.nan]]))


def test_non_square_image_has_no_xy_swap():
    # 3 rows x 7 columns; the maximum at row 1, column 5.
    m = np.zeros((3, 7))
    m[1, 5] = 1.0
    point = point_from_map(m)
    assert point == (1, 5)
    assert point_in_mask(point, _mask((3, 7), [(1, 5)]))
    assert not point_in_mask(point, _mask((3, 7), [(2, 1)]))
    assert point_in_box(point, [4, 0, 2, 2])  # x in [4, 6], y in [0, 2]
    assert not point_in_box(point, [0, 4, 2, 2])  # the same box with x and y swapped
    gt = _mask((3, 7), [(1, 5), (1, 6)])
    s = score_sentence(m, gt, [5, 1, 2, 1], threshold=0.5)
    assert (s.intersection, s.union) == (1, 2)
    assert s.point_m and s.point_it
    # predicted box [5, 1, 6, 2] vs GT [5, 1, 7, 2]: IoU 1/2 -> hit
    assert s.box_hit


def test_point_it_includes_box_borders():
    box = [2, 1, 3, 2]  # x in [2, 5], y in [1, 3]
    assert point_in_box((3, 5), box)  # bottom-right corner
    assert point_in_box((1, 2), box)  # top-left corner
    assert not point_in_box((3, 6), box)
    assert not point_in_box((0, 3), box)
    # through score_sentence: the maximum exactly on the right border is a PointIt hit, not a PointM hit
    m = np.zeros((6, 8))
    m[3, 5] = 1.0
    s = score_sentence(m, np.zeros((6, 8), bool), box)
    assert s.point_it and not s.point_m


def test_box_iou_and_predicted_box():
    assert box_iou((0, 0, 2, 2), (0, 0, 4, 2)) == pytest.approx(0.5)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    binary = np.zeros((6, 6), bool)
    binary[1, 1] = binary[2, 2] = binary[3, 3] = True  # diagonal chain: one 8-connected component
    binary[5, 0] = True  # separate component
    assert predicted_box(binary, (2, 2)) == (1, 1, 4, 4)
    assert predicted_box(binary, (5, 0)) == (0, 5, 1, 6)
    assert predicted_box(binary, (0, 0)) is None


def test_acc_box_hit_uses_component_of_the_maximum():
    m = np.zeros((10, 10))
    m[2:5, 3:7] = 0.8  # component A: box [3, 2, 7, 5]
    m[3, 4] = 1.0  # maximum inside A
    m[7:10, 0:2] = 0.6  # component B, above threshold too
    gt_a = [3, 2, 4, 3]  # xywh of A exactly
    s = score_sentence(m, np.zeros((10, 10), bool), gt_a, threshold=0.5)
    assert s.box_hit
    # GT box around B: the (bigger) binary map covers it, but the maximum's component is A -> miss
    s = score_sentence(m, np.zeros((10, 10), bool), [0, 7, 2, 3], threshold=0.5)
    assert not s.box_hit
    # IoU exactly 0.5 counts as a hit: predicted [3, 2, 7, 5] (area 12) vs GT [3, 2, 7, 8] (area 24)
    assert box_accuracy_hit(m >= 0.5, (3, 4), [3, 2, 4, 6])
    assert not box_accuracy_hit(m >= 0.5, (3, 4), [3, 2, 4, 7])


def test_acc_box_misses_when_map_is_below_threshold():
    m = np.full((5, 5), 0.2)
    m[2, 2] = 0.4
    s = score_sentence(m, _mask((5, 5), [(2, 2)]), [2, 2, 1, 1], threshold=0.5)
    assert not s.box_hit
    assert s.point_m and s.point_it
    assert (s.intersection, s.union, s.iou) == (0, 1, 0.0)


def test_score_sentence_soft_and_bool_maps():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 0:2] = True
    m = np.array(
        [
            [0.9, 0.6, 0.1, 0.0],
            [0.5, 0.4, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.7],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    s = score_sentence(m, gt, [0, 0, 2, 2], threshold=0.5)
    # binary = {(0,0), (0,1), (1,0), (2,3)}: I = 3, U = 5
    assert s == SentenceScore(intersection=3, union=5, iou=0.6, point_m=True, point_it=True, box_hit=True)
    # a bool map is the binary prediction itself; threshold is ignored
    b = score_sentence(gt.copy(), gt, [0, 0, 2, 2], threshold=0.0)
    assert (b.intersection, b.union, b.iou) == (4, 4, 1.0)
    assert b.point_m and b.box_hit


def test_aggregate_hand_computed():
    scores = [
        SentenceScore(3, 5, 0.6, True, True, True),
        SentenceScore(0, 4, 0.0, False, True, False),
        SentenceScore(9, 10, 0.9, True, False, True),
        SentenceScore(0, 0, 1.0, False, False, False),
    ]
    out = aggregate(scores)
    assert list(out) == ["mIoU", "oIoU", "P@0.5", "P@0.7", "P@0.9", "PointM", "PointIt", "Acc_box", "n"]
    assert out["mIoU"] == 0.625
    assert out["oIoU"] == round(12 / 19, 4) == 0.6316
    assert out["P@0.5"] == 0.75
    assert out["P@0.7"] == 0.5
    assert out["P@0.9"] == 0.5  # IoU 0.9 counts (>=)
    assert (out["PointM"], out["PointIt"], out["Acc_box"]) == (0.5, 0.5, 0.5)
    assert out["n"] == 4 and isinstance(out["n"], int)
    with pytest.raises(ValueError):
        aggregate([])


def test_chance_baselines_exact():
    a = np.zeros((4, 4), bool)
    a[1:3, 1:3] = True  # centre (2, 2) inside; area 4/16
    b = np.zeros((2, 3), bool)
    b[0, 0] = True  # centre (1, 1) outside; area 1/6
    out = chance_baselines([a, b])
    assert out == {"PointM_center": 0.5, "PointM_uniform": round((0.25 + 1 / 6) / 2, 4)}
    with pytest.raises(ValueError):
        chance_baselines([])
