"""Random walk (IRN's propagate_to_edge): sparse stencil == dense reference; and the pseudo-mask step
that consumes it (refine_map, to_pseudo_mask keep rules)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.pseudo.random_walk import random_walk, random_walk_dense, transition_matrix_dense
from pipeline.pseudo.refine import refine_map, to_pseudo_mask


def random_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    boundary = torch.rand(12, 10, generator=g, dtype=dtype) ** 2
    x = torch.rand(2, 12, 10, generator=g, dtype=dtype)
    return x, boundary


def test_sparse_equals_dense():
    x, boundary = random_case()
    dense = random_walk_dense(x, boundary, radius=3, beta=10, exp_times=3)
    sparse = random_walk(x, boundary, radius=3, beta=10, exp_times=3)
    assert dense.shape == sparse.shape == (2, 12, 10)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    assert not torch.allclose(dense, x * (1 - boundary), atol=1e-3)  # the walk did move mass


def test_sparse_equals_dense_with_radius_five_on_a_non_square_grid():
    g = torch.Generator().manual_seed(1)
    boundary = torch.rand(9, 14, generator=g, dtype=torch.float64)
    x = torch.rand(1, 9, 14, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        random_walk(x, boundary, 5, 4.0, 2), random_walk_dense(x, boundary, 5, 4.0, 2), atol=1e-5, rtol=0
    )


def test_float32_default_is_close_to_float64():
    x, boundary = random_case()
    ref = random_walk(x, boundary, 3, 10, 3)
    out = random_walk(x.float(), boundary.float(), 3, 10, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_dense_transition_columns_sum_to_one():
    _, boundary = random_case()
    T = transition_matrix_dense(boundary, radius=3, beta=10)
    assert T.shape == (120, 120) and (T >= 0).all()
    torch.testing.assert_close(T.sum(dim=0), torch.ones(120, dtype=T.dtype))
    # column j is nonzero only on j and its radius-3 neighbours (2 * 12 + 1 = 25 at most)
    assert int((T > 0).sum(dim=0).max()) == 25


def test_two_pixels_hand_computed():
    """1x2 grid, no boundary: A = [[1, 1], [1, 1]], T = A / 2, so one step averages the two pixels."""
    x = torch.tensor([[[1.0, 0.0]]])
    out = random_walk(x, torch.zeros(1, 2), radius=2, beta=10, exp_times=0)
    torch.testing.assert_close(out, torch.tensor([[[0.5, 0.5]]]))
    # half boundary on the right pixel: seed 1 * (1 - 0) and affinity 0.5^beta
    b = torch.tensor([[0.0, 0.5]])
    a = 0.5**2
    out = random_walk(x, b, radius=2, beta=2, exp_times=0)
    torch.testing.assert_close(out, torch.tensor([[[1 / (1 + a), a / (1 + a)]]]))


def test_a_closed_wall_stops_propagation():
    boundary = torch.zeros(8, 12)
    boundary[:, 5] = 1.0
    x = torch.zeros(1, 8, 12)
    x[0, 3, 1] = 1.0
    out = random_walk(x, boundary, radius=4, beta=10, exp_times=6)
    assert out[0, :, 6:].abs().max() == 0  # nothing crosses the wall
    assert out[0, :, 5].abs().max() == 0  # wall pixels are seeds times (1 - B) = 0 and isolated
    assert out[0, :, :5].min() > 0  # but the left side is filled


# --- pseudo-mask -------------------------------------------------------------------------------


class RingNet(nn.Module):
    """Stand-in affinity net whose boundary logits are a fixed ring (the disc outline) on the grid."""

    def __init__(self, ring: torch.Tensor) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.register_buffer("logits", torch.where(ring, 20.0, -20.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(images), 1, -1, -1) + 0 * self.anchor


def disc_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, RingNet]:
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 < 16**2
    image = np.where(disc[..., None], 200, 90).astype(np.uint8).repeat(3, axis=2)
    gy, gx = np.mgrid[:16, :16] * 4 + 1.5  # centres of the 16x16 grid cells of a 64 input
    dist = np.sqrt((gy - 31.5) ** 2 + (gx - 31.5) ** 2)
    ring = torch.from_numpy((dist >= 16) & (dist < 20))  # the first layer of cells outside the disc
    # blurry response spilling far outside the disc (a response that "bleeds")
    coarse = np.clip(1.2 - np.sqrt((yy - 31.5) ** 2 + (xx - 31.5) ** 2) / 28, 0, 1).astype(np.float32)
    return image, coarse, disc, RingNet(ring)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def settings(default_params, refine: str):
    """The ``pseudo_masks`` section with the settings these scenes were made for (a 64-pixel grid, a
    6-squaring walk, a 10-iteration CRF)."""
    p = default_params.pseudo_masks
    return p.model_copy(update={
        "refine": refine,
        "affinity": p.affinity.model_copy(update={"radius": 5, "input_size": 64}),
        "random_walk": p.random_walk.model_copy(update={"beta": 10.0, "exp_times": 6}),
        "crf": p.crf.model_copy(update={"iterations": 10}),
    })


def test_refine_map_irn_confines_the_response_to_the_boundary(default_params):
    image, coarse, disc, net = disc_scene()
    refined = refine_map(image, coarse, settings(default_params, "irn"), affinity_net=net)
    assert refined.shape == disc.shape and refined.dtype == np.float32
    assert refined.max() == pytest.approx(1.0) and refined.min() >= 0
    assert iou(refined > 0.4, disc) > 0.85
    assert iou(coarse > 0.4, disc) < 0.6


def test_refine_map_none_and_crf(default_params):
    image, coarse, disc, _ = disc_scene()
    np.testing.assert_array_equal(refine_map(image, coarse, settings(default_params, "none")), coarse)
    assert iou(refine_map(image, coarse, settings(default_params, "crf")) > 0.5, disc) > 0.85
    with pytest.raises(ValueError, match="affinity_net"):
        refine_map(image, coarse, settings(default_params, "irn"))


def keep_map() -> np.ndarray:
    """Two blobs above 0.5: a big one (12 px, peak 0.7) and a small one (3 px) holding the maximum 0.9.
    The diagonal pixel at (3, 3) joins the big blob only under 8-connectivity."""
    m = np.zeros((8, 8), np.float32)
    m[0:3, 0:3] = 0.6
    m[1, 1] = 0.7
    m[3, 3] = 0.6
    m[3:5, 4] = 0.6  # touches (3,3) side-on: part of the big blob too
    m[6, 5:8] = [0.8, 0.9, 0.8]
    return m


def test_keep_rules():
    m = keep_map()
    small = np.zeros((8, 8), bool)
    small[6, 5:8] = True
    big = (m > 0.5) & ~small
    assert big.sum() == 12
    np.testing.assert_array_equal(to_pseudo_mask(m, 0.5, "all"), m > 0.5)
    np.testing.assert_array_equal(to_pseudo_mask(m, 0.5, "largest"), big)
    np.testing.assert_array_equal(to_pseudo_mask(m, 0.5, "argmax"), small)
    # strict threshold: exactly-at-threshold pixels are background (IRN's argmax ties go to bg)
    np.testing.assert_array_equal(to_pseudo_mask(m, 0.6, "all"), m > 0.6)


def test_keep_rules_on_empty_maps():
    for keep in ("all", "largest", "argmax"):
        out = to_pseudo_mask(np.full((5, 6), 0.2), 0.5, keep)
        assert out.dtype == bool and out.shape == (5, 6) and not out.any()
    with pytest.raises(ValueError):
        to_pseudo_mask(np.zeros((2, 2)), 0.5, "biggest")
