"""Step-1 losses: image-level score (Eq. 6), classification (Eq. 7), calibration (Eq. 8-9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    calibration_loss,
    calibration_similarity,
    classification_loss,
    image_level_scores,
)
from pipeline.maps import mask_images
from pipeline.models.clip_backbone import FrozenClip, build_clip, tokenize


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_image_level_score_hand_case():
    """One query, two pixels with responses 2 and 0."""
    responses = torch.tensor([[[[2.0, 0.0]]]])
    # Per-pixel softmax over [background = 1, response].
    share0 = math.exp(2) / (math.exp(1) + math.exp(2))
    share1 = math.exp(0) / (math.exp(1) + math.exp(0))
    p = (share0 + share1) / 2
    psi = (1 - p) ** 3 * math.log(0.01 + p)
    expected = 2.0 + 1.0 + psi
    y = image_level_scores(responses, focal_power=3.0, focal_eps=0.01)
    assert y.shape == (1, 1)
    assert y.item() == pytest.approx(expected, rel=1e-6)


def test_image_level_score_softmax_couples_queries():
    """psi uses a softmax across the queries: adding a strong competitor lowers a query's share and score."""
    focal = {"focal_power": 3.0, "focal_eps": 0.01}
    alone = image_level_scores(torch.tensor([[[[1.0, 1.0]]]]), **focal)
    together = image_level_scores(torch.tensor([[[[1.0, 1.0]], [[5.0, 5.0]]]]), **focal)
    assert together.shape == (1, 2)
    assert together[0, 0] < alone[0, 0]


def test_classification_loss_hand_case_ignores_invalid():
    y = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    row0 = -(_log_sigmoid(2.0) + _log_sigmoid(1.0)) / 2  # 1 - sigmoid(-1) = sigmoid(1)
    row1 = -(_log_sigmoid(-0.0) + _log_sigmoid(3.0) + _log_sigmoid(2.0)) / 3
    loss = classification_loss(y, targets, valid)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    y_changed = y.clone()
    y_changed[0, 2] = 100.0  # an ignored entry cannot move the loss
    assert classification_loss(y_changed, targets, valid).item() == pytest.approx(loss.item(), rel=1e-6)


def test_calibration_similarity_modes():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-2.0, 0.0]])  # cosines 0 and -1 (inputs need not be normalised)
    torch.testing.assert_close(calibration_similarity(a, b, "cosine"), torch.tensor([0.0, -1.0]))
    torch.testing.assert_close(calibration_similarity(a, b, "rescaled"), torch.tensor([0.5, 0.0]))


def test_calibration_loss_hand_case():
    s = math.sqrt(0.5)
    masked = torch.tensor([[1.0, 0.0]])
    pos = torch.tensor([[s, s]])  # cos = sqrt(0.5)
    neg = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])  # cos 0, 1 (invalid), -1
    neg_valid = torch.tensor([[True, False, True]])
    s_pos = (1 + s) / 2
    expected_pos = -math.log(s_pos)
    expected_neg = -(math.log(1 - 0.5) + math.log(1 - 1e-6))  # S(-1) = 0 is clamped to 1e-6
    loss, parts = calibration_loss(masked, pos, neg, neg_valid, mode="rescaled")
    assert loss.item() == pytest.approx(expected_pos + expected_neg, rel=1e-5)
    assert parts["cal_pos"].item() == pytest.approx(expected_pos, rel=1e-5)
    assert parts["cal_neg"].item() == pytest.approx(expected_neg, rel=1e-5)
    only_pos, _ = calibration_loss(masked, pos, neg, neg_valid, use_negative=False)
    only_neg, _ = calibration_loss(masked, pos, neg, neg_valid, use_positive=False)
    assert only_pos.item() == pytest.approx(expected_pos, rel=1e-5)
    assert only_neg.item() == pytest.approx(expected_neg, rel=1e-5)
    cosine, _ = calibration_loss(masked, pos, neg, neg_valid, mode="cosine", use_negative=False)
    assert cosine.item() == pytest.approx(-math.log(s), rel=1e-5)


def test_calibration_gradient_reaches_response_not_frozen_clip(tiny_clip):
    """Eq. 9 end to end: response -> mask_images -> frozen CLIP -> Eq. 8; only the response gets gradient."""
    torch.manual_seed(0)
    frozen = FrozenClip(build_clip("tiny-rn", None, tiny={**tiny_clip, "embed_dim": 16}))
    images01 = torch.rand(2, 3, 80, 80)
    response = torch.randn(2, 3, 3, requires_grad=True)
    masked = frozen.encode_image(mask_images(images01, response, frozen.image_size))
    pos = frozen.encode_text(tokenize(["a dog", "a red car"], 20))
    neg = frozen.encode_text(tokenize(["the man", "a tree", "left cat", "blue sky"], 20)).view(2, 2, -1)
    loss, _ = calibration_loss(masked, pos, neg, torch.ones(2, 2, dtype=torch.bool))
    loss.backward()
    assert response.grad is not None and response.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())


def test_calibration_negative_mean_and_weight_follow_the_authors_code():
    torch.manual_seed(0)
    masked, pos, neg = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 4, 8)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    _, summed = calibration_loss(masked, pos, neg, valid, mode="rescaled")
    _, mean2 = calibration_loss(masked, pos, neg, valid, mode="rescaled", negative_reduction="mean",
                                negative_weight=2.0)
    s_neg = ((1 + F.cosine_similarity(masked.unsqueeze(1), neg, dim=-1)) / 2).clamp(1e-6, 1 - 1e-6)
    per_row = -(torch.log(1 - s_neg) * valid).sum(dim=1)
    assert float(summed["cal_neg"]) == pytest.approx(float(per_row.mean()), rel=1e-5)
    expected = (2.0 * per_row / valid.sum(dim=1)).mean()
    assert float(mean2["cal_neg"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(mean2["cal_pos"]) == pytest.approx(float(summed["cal_pos"]))
    with pytest.raises(ValueError, match="negative_reduction"):
        calibration_loss(masked, pos, neg, valid, negative_reduction="max")
