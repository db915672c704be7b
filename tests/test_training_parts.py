"""The pieces of the training loops that decide what the model is compared against."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline
from pipeline.data.samples import distinct_image_batches, one_sentence_per_ref
from pipeline.train.common import (
    NonFiniteLossError,
    check_finite,
    fingerprint,
    poly_scheduler,
    training_code,
)
from pipeline.train.step1 import CalibrationNegatives, classification_targets, extra_negative_rows


def test_batches_never_hold_one_image_twice_and_use_every_row():
    rng = np.random.default_rng(0)
    image_ids = np.repeat(np.arange(30), 3)  # three sentences per image
    batches = distinct_image_batches(image_ids, 8, rng, drop_last=False)
    for rows in batches:
        assert len(set(image_ids[rows])) == len(rows)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(image_ids)))


def test_one_sentence_per_ref_keeps_exactly_one_row_per_object():
    refs = np.array([5, 5, 5, 7, 9, 9])
    rows = one_sentence_per_ref(refs, np.random.default_rng(1))
    assert sorted(refs[rows].tolist()) == [5, 7, 9]


def test_same_image_expressions_are_never_negatives():
    batch_images = np.array([1, 2, 3])
    query_images = np.array([1, 2, 3, 1, 4])  # query 3 is another expression of image 1
    targets, valid = classification_targets(batch_images, query_images, num_negatives=10,
                                            rng=np.random.default_rng(0))
    assert torch.equal(targets[:, :3], torch.eye(3))
    assert not valid[0, 3]  # same image as image 0: neither positive nor negative
    assert valid[1, 3] and valid[2, 3]  # for other images it is a fair negative
    assert valid.sum(dim=1).tolist() == [4, 5, 5]


def test_number_of_negatives_is_respected():
    images = np.arange(10)
    _, valid = classification_targets(images, images, num_negatives=3, rng=np.random.default_rng(0))
    assert (valid.sum(dim=1) == 4).all()


def test_extra_negatives_come_from_outside_the_batch():
    image_ids = np.array([0, 0, 1, 2, 3, 4])
    extra = extra_negative_rows(np.array([0, 2]), image_ids, 20, np.random.default_rng(0))
    assert len(extra) == 20
    assert not set(image_ids[extra]) & {0, 1}


def test_calibration_negatives_prefer_other_objects_of_the_same_image():
    sentences = pd.DataFrame({"image_id": [1, 1, 1, 1, 2, 2], "ref_id": [10, 10, 11, 12, 20, 21]})
    neg = CalibrationNegatives(sentences).sample(np.array([0]), 4, np.random.default_rng(0))[0]
    assert set(neg[:2]) == {2, 3}  # the image's two other objects come first
    assert all(sentences.loc[int(r), "image_id"] == 2 for r in neg[2:])  # topped up from other images
    assert 1 not in neg  # never the positive's own object


def test_non_finite_loss_names_stage_step_and_term():
    with pytest.raises(NonFiniteLossError, match=r"train_step1.*'cal'.*epoch 2, step 17"):
        check_finite("train_step1", 2, 17, {"cls": torch.tensor(0.3), "cal": torch.tensor(float("nan"))})


def test_polynomial_decay_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = poly_scheduler(opt, total_steps=10, power=0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5 ** 0.9)


def test_resume_fingerprint_changes_with_the_training_code(tmp_path):
    """An edited loss must not be "resumed" from the previous run's checkpoint; the code hashed is what
    the stage runs (its import closure), so an edit elsewhere keeps the resume state."""
    stage = tmp_path / "train.py"
    stage.write_text("from pipeline.train.step1 import train_step1\nLAMBDA = 5\n")
    code = training_code(stage)
    assert code[0] == stage.resolve()
    root = Path(pipeline.__file__).resolve().parents[1]
    names = {f.relative_to(root).as_posix() for f in code[1:]}
    assert {"pipeline/losses.py", "pipeline/train/step1.py", "pipeline/train/common.py"} <= names
    assert not {"pipeline/train/step2.py", "pipeline/predict.py", "pipeline/pseudo/crf.py"} & names
    assert all(f.suffix == ".py" for f in code)
    before = fingerprint({"lr": 1e-3}, code)
    assert fingerprint({"lr": 1e-3}, code) == before
    stage.write_text("from pipeline.train.step1 import train_step1\nLAMBDA = 25\n")
    assert fingerprint({"lr": 1e-3}, code) != before
