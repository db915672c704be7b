"""Diagnostics of the synthetic expressions (issue 14). The retrieval ceiling counts how many candidate
expressions are true of an image (on the synthetic world many expressions of other images also single
out an object of this one); the masked-object ranking is split by expression family."""

import pandas as pd
import pytest

from pipeline.data.synthetic.scene import SceneObject
from research.retrieval_ceiling import oracle_retrieval


def test_an_expression_true_of_two_images_halves_the_oracle_ceiling():
    objects = {1: [SceneObject("square", "red", "large", 20, 20, 10),
                   SceneObject("circle", "green", "small", 60, 60, 5)],
               2: [SceneObject("circle", "blue", "large", 20, 20, 10)],
               3: [SceneObject("square", "red", "small", 20, 20, 10)]}
    sentences = pd.DataFrame({"sent_id": [1, 2, 3], "image_id": [1, 2, 3], "split": "val",
                              "text": ["the red square", "the blue circle", "the square"]})
    r = oracle_retrieval(objects, sentences, "val", candidates=3)
    # image 1: "the square" is true of it too (1/2); image 2: only its own (1);
    # image 3: "the red square" is true of it too (1/2)
    assert r["ceiling"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-4)
    assert r["true_candidates_mean"] == pytest.approx(5 / 3, abs=0.01) and r["n"] == 3


def test_ranking_by_family_splits_the_masked_object_hits_by_what_the_expression_names():
    from research.ranking_by_family import expression_family, ranking_by_family

    assert [expression_family(t) for t in ("the red square", "the leftmost square", "one left of the star")] \
        == ["attribute", "position", "relation"]
    hits = pd.DataFrame({"text": ["the red square", "big blue circle", "one left of the star"],
                         "hit": [True, False, True], "objects": [2, 4, 4]})
    table = ranking_by_family(hits).set_index("family")
    assert table.loc["attribute", "rate"] == 0.5 and table.loc["attribute", "chance"] == pytest.approx(0.375)
    assert table.loc["relation", "n"] == 1 and "position" not in table.index
    assert table.loc["all", "rate"] == pytest.approx(2 / 3) and table.loc["all", "n"] == 3


def _ref_row(ref_id: int, image_id: int, mask) -> dict:
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"ref_id": ref_id, "image_id": image_id, "mask_counts": rle["counts"].decode("ascii"),
            "mask_height": mask.shape[0], "mask_width": mask.shape[1]}


def test_object_hit_asks_which_object_the_map_covers_and_the_peak_where_it_points():
    """A coarse map over the left object whose single peak spills just outside it: the object hit
    counts it (it responds to the target, not the rival), PointM's test does not; a map peaking on the
    rival fails both. Images with one referred object are left out (nothing to choose among)."""
    import numpy as np

    from research.grounding import response_object_hits

    left, right = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    left[2:6, 0:3] = True
    right[2:6, 5:8] = True
    alone = np.zeros((8, 8), bool)
    alone[1:3, 1:3] = True
    refs = pd.DataFrame([_ref_row(1, 10, left), _ref_row(2, 10, right), _ref_row(3, 20, alone)])
    images = pd.DataFrame({"image_id": [10, 20], "height": [8, 8], "width": [8, 8]})
    sentences = pd.DataFrame({"sent_id": [1, 2, 3], "ref_id": [1, 2, 3], "image_id": [10, 10, 20],
                              "text": ["the left one", "the right one", "the only one"]})
    near = np.zeros((8, 8), np.float32)
    near[2:6, 0:3] = 0.8
    near[3, 3] = 1.0  # the peak just right of the left object
    on_rival = np.zeros((8, 8), np.float32)
    on_rival[2:6, 0:3] = 0.9  # responds to the left object: wrong for "the right one"
    on_rival[4, 1] = 1.0
    hits = response_object_hits({1: near, 2: on_rival, 3: near}, sentences, refs, images).set_index("sent_id")
    assert list(hits.index) == [1, 2]
    assert hits.loc[1, "hit"] and not hits.loc[1, "point"]
    assert not hits.loc[2, "hit"] and not hits.loc[2, "point"]
    assert (hits["objects"] == 2).all()
    with pytest.raises(ValueError, match="two or more referred objects"):
        response_object_hits({3: near}, sentences[sentences["sent_id"] == 3], refs, images)


def test_expression_kind_splits_attribute_expressions_by_the_attributes_they_name():
    from research.ranking_by_family import expression_kind, rates_by

    kinds = [expression_kind(t) for t in ("the square", "the red one", "the small red square",
                                           "the leftmost square", "one left of the star")]
    assert kinds == ["attribute: shape", "attribute: colour", "attribute: size+colour+shape",
                     "position", "relation"]
    hits = pd.DataFrame({"text": ["the square", "the red one", "the red one", "the leftmost square"],
                         "clip": [False, True, True, False], "peak": [True, True, False, False],
                         "objects": [4, 2, 2, 4]})
    table = rates_by(hits, expression_kind, ("clip", "peak")).set_index("group")
    assert list(table.index) == ["attribute: colour", "attribute: shape", "position", "all"]
    assert table.loc["attribute: colour", "clip"] == 1.0 and table.loc["attribute: colour", "peak"] == 0.5
    assert table.loc["all", "n"] == 4 and table.loc["all", "chance"] == pytest.approx(0.375)
