"""Diagnostics of the synthetic expressions (issue 14). The retrieval ceiling counts how many candidate
expressions are true of an image (on the synthetic world many expressions of other images also single
out an object of this one); the masked-object ranking is split by expression family."""

import pandas as pd
import pytest

from pipeline.data.synthetic.scene import SceneObject
from scripts.retrieval_ceiling import oracle_retrieval


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
    from scripts.ranking_by_family import expression_family, ranking_by_family

    assert [expression_family(t) for t in ("the red square", "the leftmost square", "one left of the star")] \
        == ["attribute", "position", "relation"]
    hits = pd.DataFrame({"text": ["the red square", "big blue circle", "one left of the star"],
                         "hit": [True, False, True], "objects": [2, 4, 4]})
    table = ranking_by_family(hits).set_index("family")
    assert table.loc["attribute", "rate"] == 0.5 and table.loc["attribute", "chance"] == pytest.approx(0.375)
    assert table.loc["relation", "n"] == 1 and "position" not in table.index
    assert table.loc["all", "rate"] == pytest.approx(2 / 3) and table.loc["all", "n"] == 3
