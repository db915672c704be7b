"""IRN's boundary-based affinity: pair geometry, edge-to-affinity, loss weighting and a tiny training run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.params import load_params
from pipeline.pseudo.affinity import (
    AffinityNet,
    affinity_loss,
    grid_size,
    pair_affinity,
    pair_labels,
    path_offsets,
    predict_boundary,
    train_affinity,
)

ROOT = Path(__file__).resolve().parents[1]


def test_path_offsets_cover_each_unordered_pair_once():
    for radius in (2, 3, 5):
        offsets = {(o.dy, o.dx) for o in path_offsets(radius)}
        disc = {(y, x) for y in range(-radius, radius + 1) for x in range(-radius, radius + 1)}
        disc = {p for p in disc if p != (0, 0) and p[0] ** 2 + p[1] ** 2 < radius**2}
        assert offsets | {(-y, -x) for y, x in offsets} == disc
        assert not offsets & {(-y, -x) for y, x in offsets}
    assert len(path_offsets(5)) == 34


def test_paths_are_the_pixels_along_the_segment():
    paths = {(o.dy, o.dx): o.path for o in path_offsets(3)}
    assert paths[(0, 2)] == ((0, 2), (0, 1), (0, 0))
    assert paths[(2, 0)] == ((2, 0), (1, 0), (0, 0))
    assert set(paths[(1, 1)]) == {(1, 1), (0, 1), (1, 0), (0, 0)}
    # distance of (0,-1) and (1,-1) to the line (0,0)-(1,-2) is 1/sqrt(5) < 1; of (1,0) and (0,-2) 2/sqrt(5)
    assert set(paths[(1, -2)]) == {(1, -2), (0, -2), (1, -1), (0, -1), (1, 0), (0, 0)}
    for (dy, dx), path in paths.items():
        assert path[0] == (dy, dx) and path[-1] == (0, 0)


def test_pair_affinity_is_one_minus_max_boundary_on_the_path():
    boundary = torch.zeros(4, 5)
    boundary[:, 2] = 1.0  # a wall
    boundary[3, 0] = 0.3
    aff = pair_affinity(boundary, radius=2)  # offsets (0,1), (1,-1), (1,0), (1,1)
    k = {(o.dy, o.dx): i for i, o in enumerate(path_offsets(2))}
    right, down, diag = aff[k[(0, 1)]], aff[k[(1, 0)]], aff[k[(1, 1)]]
    assert right[0, 0] == 1.0 and right[0, 1] == 0.0 and right[0, 3] == 1.0
    assert right[0, 4] == 0.0  # destination outside the image: the pair does not exist
    assert torch.isclose(right[3, 0], torch.tensor(0.7)) and torch.isclose(down[2, 0], torch.tensor(0.7))
    assert down[3, 1] == 0.0  # leaves through the bottom
    assert diag[0, 1] == 0.0 and diag[0, 0] == 1.0


def test_pair_labels_split_positive_fg_bg_and_negative():
    labels = torch.tensor([[1, 1, 0, 0, 255]], dtype=torch.uint8)
    fg, bg, neg = pair_labels(labels, radius=2)
    k = [(o.dy, o.dx) for o in path_offsets(2)].index((0, 1))
    assert fg[k, 0].tolist() == [1, 0, 0, 0, 0]
    assert bg[k, 0].tolist() == [0, 0, 1, 0, 0]
    assert neg[k, 0].tolist() == [0, 1, 0, 0, 0]  # (0,3)-(0,4) touches 255; (0,4)-out does not exist
    assert fg.sum() + bg.sum() + neg.sum() == 3  # one row: only horizontal pairs exist


def test_affinity_loss_matches_irn_weighting():
    b = 0.2  # constant boundary: every in-image pair has affinity 0.8
    boundary = torch.full((1, 1, 1, 5), b)
    labels = torch.tensor([[[1, 1, 0, 0, 255]]], dtype=torch.uint8)
    loss, stats = affinity_loss(boundary, labels, radius=2)
    pos = -math.log(1 - b + 1e-5)
    neg = -math.log(b + 1e-5)
    assert math.isclose(float(loss), (pos / 2 + pos / 2) / 2 + neg / 2, rel_tol=1e-4)
    assert (stats["n_pos_fg"], stats["n_pos_bg"], stats["n_neg"]) == (1, 1, 1)
    # without bg-bg pairs that term is 0 (IRN's eps denominators), it is not averaged in as NaN
    loss2, _ = affinity_loss(boundary, torch.tensor([[[1, 1, 0, 255, 255]]], dtype=torch.uint8), 2)
    assert math.isclose(float(loss2), pos / 4 + neg / 2, rel_tol=1e-4)


def test_affinity_loss_gradient_raises_boundary_only_between_labels():
    boundary = torch.full((1, 1, 1, 4), 0.5, requires_grad=True)
    labels = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.uint8)
    loss, _ = affinity_loss(boundary, labels, radius=2)
    loss.backward()
    g = boundary.grad.flatten()
    assert g[1] < 0 or g[2] < 0  # the fg/bg transition wants a higher boundary
    assert g[0] > 0 and g[3] > 0  # inside uniform regions it wants a lower one


def scene(rng: np.random.Generator, side: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:side, :side]
    cy, cx, r = rng.integers(20, side - 20, 2).tolist() + [int(rng.integers(9, 15))]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    disc = d2 < r * r
    image = np.where(disc[..., None], rng.integers(0, 256, 3), rng.integers(60, 200, 3))
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    label = np.full((side, side), 255, np.uint8)
    label[d2 < (r - 3) ** 2] = 1
    label[d2 > (r + 3) ** 2] = 0
    return image, label, disc


def test_train_affinity_learns_object_outlines():
    rng = np.random.default_rng(0)
    data = [scene(rng) for _ in range(96)]
    p = load_params(ROOT / "params.yaml").pseudo_masks.affinity.model_copy(
        update={"input_size": 64, "radius": 3, "epochs": 20, "lr": 1e-2, "batch_size": 16})
    net = train_affinity([d[0] for d in data], [d[1] for d in data], p, seed=0, device="cpu")
    assert not net.training
    image, _, disc = scene(np.random.default_rng(123))
    boundary = predict_boundary(net, image, 64)
    assert boundary.shape == (grid_size(64), grid_size(64)) == (16, 16)
    small = torch.from_numpy(disc).float()[None, None]
    small = torch.nn.functional.avg_pool2d(small, 4)[0, 0]
    edge = (small > 0.1) & (small < 0.9)
    assert float(boundary[edge].mean()) > 3 * float(boundary[~edge].mean())


def test_predict_boundary_is_mirror_symmetric():
    """IRN's flip averaging makes the boundary of a mirrored image the mirrored boundary."""
    torch.manual_seed(0)
    net = AffinityNet().eval()
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    b = predict_boundary(net, image, 48)
    b_flip = predict_boundary(net, image[:, ::-1], 48)
    torch.testing.assert_close(b_flip, b.flip(-1), atol=1e-5, rtol=0)
    assert b.min() >= 0 and b.max() <= 1


def test_affinity_net_is_small_and_strided():
    net = AffinityNet()
    assert 20_000 <= sum(p.numel() for p in net.parameters()) <= 50_000
    assert net(torch.zeros(2, 3, 128, 128)).shape == (2, 1, 32, 32)
    assert net(torch.zeros(1, 3, 70, 70)).shape[-2:] == (grid_size(70), grid_size(70))
