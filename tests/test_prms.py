"""PRMS (Eq. 10): one encoder pass per masked image, the cumulative score picks the consensus map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.maps import CLIP_MEAN, CLIP_STD, mask_images
from pipeline.pseudo.prms import (
    PrmsItem,
    choose_without_prms,
    cumulative_scores,
    select_batch,
)

SIZE = 32
GRID = 8


class QuadrantEncoder:
    """Fake image encoder: the embedding is the normalised mean brightness of the four image quadrants
    (top-left, top-right, bottom-left, bottom-right), so a masked image "shows" the quadrants its
    response kept. Records how many images it saw, and in which batches."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(images))
        mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        pixels = (images * std + mean).mean(dim=1)  # undo CLIP normalisation -> [0, 1] brightness
        h, w = pixels.shape[-2] // 2, pixels.shape[-1] // 2
        quads = [pixels[:, :h, :w], pixels[:, :h, w:], pixels[:, h:, :w], pixels[:, h:, w:]]
        emb = torch.stack([q.mean(dim=(1, 2)) for q in quads], dim=1)
        return torch.nn.functional.normalize(emb, dim=1)

    @property
    def images_seen(self) -> int:
        return sum(self.batches)


class FailingEncoder:
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the encoder must not be called")


def quadrant_response(q: int) -> torch.Tensor:
    """A raw response map that is strongly positive on quadrant ``q`` and strongly negative elsewhere."""
    r = torch.full((GRID, GRID), -30.0)
    ys, xs = divmod(q, 2)
    half = GRID // 2
    r[ys * half : (ys + 1) * half, xs * half : (xs + 1) * half] = 30.0
    return r


def unit(v: list[float]) -> torch.Tensor:
    t = torch.tensor(v)
    return t / t.norm()


def quadrant_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Responses highlight quadrants 1, 2, 0 (in that order); all three texts describe quadrant 2, but the
    third one leans so much towards quadrant 0 that on its own it would pick response 2."""
    image01 = torch.ones(3, 48, 48)
    responses = torch.stack([quadrant_response(1), quadrant_response(2), quadrant_response(0)])
    text = torch.stack([unit([0.5, 0, 1, 0]), unit([0, 0.5, 1, 0]), unit([1, 0, 0.5, 0])])
    return image01, responses, text


def test_selects_consensus_map_with_one_encoder_pass_per_image():
    image01, responses, text = quadrant_case()
    enc = QuadrantEncoder()
    [(index, scores)] = select_batch([PrmsItem(image01, responses, text)], enc, SIZE, batch_size=8)
    assert enc.batches == [3]  # M images in one call, not M^2
    assert index == 1
    # hand-computed CS_t with image embeddings e1, e2, e0: 1/sqrt(5), 5/sqrt(5), 3/sqrt(5)
    expected = torch.tensor([1.0, 5.0, 3.0]) / math.sqrt(5.0)
    torch.testing.assert_close(scores, expected, atol=0.03, rtol=0)


def test_single_text_would_pick_differently():
    """Guards the test case itself: scoring with only the third text picks response 2, not 1."""
    image01, responses, text = quadrant_case()
    emb = QuadrantEncoder()(mask_images(image01.expand(3, -1, -1, -1), responses, SIZE))
    assert int(cumulative_scores(emb, text[2:3]).argmax()) == 2
    assert int(cumulative_scores(emb, text).argmax()) == 1


def test_single_expression_is_identity_without_encoder():
    image01, responses, text = quadrant_case()
    [(index, scores)] = select_batch([PrmsItem(image01, responses[:1], text[:1])], FailingEncoder(), SIZE, 4)
    assert index == 0
    assert scores.shape == (1,) and torch.isnan(scores).all()


def test_custom_similarity_is_used():
    image01, responses, text = quadrant_case()

    def negative_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -(a @ b.T)

    item = PrmsItem(image01, responses, text)
    [(index, _)] = select_batch([item], QuadrantEncoder(), SIZE, batch_size=4, similarity=negative_cosine)
    assert index == 0  # the lowest cosine sum (quadrant 1) now wins


def test_select_batch_shares_encoder_batches_and_matches_one_object_at_a_time():
    image01, responses, text = quadrant_case()
    items = [
        PrmsItem(image01, responses, text),
        PrmsItem(image01, responses[:1], text[:1]),
        PrmsItem(image01, responses[[2, 0]], text[[0, 2]]),
        PrmsItem(image01, responses[[2, 1, 0]], text),
    ]
    enc = QuadrantEncoder()
    results = select_batch(items, enc, SIZE, batch_size=4)
    assert enc.images_seen == 3 + 2 + 3  # every masked image once; the M = 1 item never reaches it
    assert enc.batches == [4, 4]
    assert [r[0] for r in results] == [1, 0, 0, 1]
    assert torch.isnan(results[1][1]).all()
    for item, (index, scores) in zip(items, results, strict=True):
        if len(item.responses) > 1:
            [(ref_index, ref_scores)] = select_batch([item], QuadrantEncoder(), SIZE, len(item.responses))
            assert index == ref_index
            torch.testing.assert_close(scores, ref_scores)


def test_select_batch_reads_a_generator_once():
    image01, responses, text = quadrant_case()
    made = []

    def items():
        for k in range(3):
            made.append(k)
            yield PrmsItem(image01, responses, text)

    results = select_batch(items(), QuadrantEncoder(), SIZE, batch_size=2)
    assert made == [0, 1, 2] and [r[0] for r in results] == [1, 1, 1]


def test_select_batch_flushes_a_partial_last_batch():
    image01, responses, text = quadrant_case()
    enc = QuadrantEncoder()
    select_batch([PrmsItem(image01, responses, text)] * 3, enc, SIZE, batch_size=5)
    assert enc.batches == [5, 4]


def test_choose_without_prms():
    assert choose_without_prms(4, "first") == 0
    draws = [choose_without_prms(3, "random", np.random.default_rng(s)) for s in range(60)]
    assert set(draws) == {0, 1, 2}
    assert choose_without_prms(5, "random", np.random.default_rng(7)) == int(
        np.random.default_rng(7).integers(5)
    )
    with pytest.raises(ValueError):
        choose_without_prms(3, "random")
    with pytest.raises(ValueError):
        choose_without_prms(0, "first")
