"""``data.eval_splits: auto`` follows the dataset: the non-train splits each released REFER layout has."""

from __future__ import annotations

import pytest
from refer_fixture import RELEASES, write_refer_fixture

from pipeline.data.index import build_index, split_names
from pipeline.data.refer import load_refer
from pipeline.data.splits import require_eval_splits, resolve_eval_splits


class _Index:
    def __init__(self, refs):
        self.refs = refs


EXPECTED = {
    ("refcoco", "unc"): ["val", "testA", "testB"],
    ("refcoco+", "unc"): ["val", "testA", "testB"],
    ("refcocog", "umd"): ["val", "test"],
    ("refcocog", "google"): ["val"],
    ("refclef", "berkeley"): ["val", "test"],
}


@pytest.mark.parametrize(("dataset", "split_by"), sorted(EXPECTED), ids=lambda v: str(v))
def test_auto_eval_splits_follow_each_released_layout(tmp_path, dataset, split_by):
    write_refer_fixture(tmp_path, dataset=dataset, split_by=split_by, with_bad_cases=False)
    assert (tmp_path / dataset / f"refs({split_by}).p").is_file()
    refs, instances = load_refer(tmp_path, dataset, split_by)
    tables, _ = build_index(refs, instances, tmp_path / "images", workers=1)
    index = _Index(tables["refs"].to_pandas())
    available = split_names(index)
    assert available == [s for s in RELEASES[(dataset, split_by)] if s in available]
    assert resolve_eval_splits("auto", available) == EXPECTED[(dataset, split_by)]
    assert require_eval_splits("evaluate_step1", index, "auto") == EXPECTED[(dataset, split_by)]


def test_a_listed_split_the_layout_lacks_is_named(tmp_path):
    write_refer_fixture(tmp_path, dataset="refcocog", split_by="umd", with_bad_cases=False)
    refs, instances = load_refer(tmp_path, "refcocog", "umd")
    index = _Index(build_index(refs, instances, tmp_path / "images", workers=1)[0]["refs"].to_pandas())
    with pytest.raises(SystemExit, match="testA.*it has: train, val, test"):
        require_eval_splits("dump_responses", index, ["val", "testA", "testB"])


def test_auto_keeps_an_explicit_list_and_refuses_other_words():
    assert resolve_eval_splits(["testB", "val"], ["train", "val", "testB"]) == ["testB", "val"]
    with pytest.raises(ValueError, match="auto"):
        resolve_eval_splits("all", ["train", "val"])
