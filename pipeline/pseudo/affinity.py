"""Inter-pixel affinity from a predicted class-boundary map (IRN, Ahn et al., CVPR 2019).

IRN does not predict affinities directly: it predicts a boundary map ``B`` and defines the affinity of
two nearby pixels as ``a_ij = 1 - max_{k on the segment i->j} B_k``, so two pixels are related unless a
boundary separates them. The boundary branch is trained only from pairs of *confident* pseudo-labels
(:func:`pipeline.pseudo.crf.confident_labels`): same label -> high affinity, different -> low.

IRN's network is a frozen ResNet-50 with a boundary head; here :class:`AffinityNet` is a ~33k-parameter
CNN trained from scratch on the pseudo-labels, so the stage stays minutes on a CPU. The pair geometry
(:func:`path_offsets`), the edge-to-affinity rule and the loss weighting follow IRN exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.maps import clip_normalize
from pipeline.params import AffinityParams
from pipeline.train.loop import Epoch, StepOut, Training, TrainingRun, fit

IGNORE = 255
STRIDE = 4


class PathOffset(NamedTuple):
    """One neighbour direction: destination ``(dy, dx)`` relative to the source pixel and the pixels
    ``(y, x)`` whose boundary values decide the pair's affinity (source and destination included)."""

    dy: int
    dx: int
    path: tuple[tuple[int, int], ...]


@lru_cache(maxsize=8)
def _path_offsets(radius: int) -> tuple[PathOffset, ...]:
    r = int(radius)
    if r < 1:
        raise ValueError(f"radius must be >= 1, got {radius}")
    # Half-plane (dy > 0, or dy == 0 and dx > 0) so that each unordered pair appears once, and the
    # strict disc dy^2 + dx^2 < r^2, as IRN's PathIndex.
    dirs = [(0, x) for x in range(1, r)]
    dirs += [(y, x) for y in range(1, r) for x in range(-r + 1, r) if x * x + y * y < r * r]
    out = []
    for dy, dx in dirs:
        length_sq = dy * dy + dx * dx
        path = [
            (y, x)
            for y in range(min(0, dy), max(0, dy) + 1)
            for x in range(min(0, dx), max(0, dx) + 1)
            # perpendicular distance from the lattice point to the line (0,0)-(dy,dx) below one pixel
            if (dy * x - dx * y) ** 2 / length_sq < 1
        ]
        path.sort(key=lambda p: -abs(p[0]) - abs(p[1]))  # destination first, source last (as IRN)
        out.append(PathOffset(dy, dx, tuple(path)))
    return tuple(out)


def path_offsets(radius: int) -> list[PathOffset]:
    """IRN's neighbour set within ``radius`` (half-plane, each unordered pair once) with each pair's path.

    For radius 5 there are 34 offsets; every one of ``dy`` lies in ``[0, radius - 1]`` and every ``dx`` in
    ``[-(radius - 1), radius - 1]``, which is all the padding the shifted-slice code below needs.
    """
    return list(_path_offsets(int(radius)))


def pair_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN's edge-to-affinity for every pair ``(j, j + offset)``, stored at the source pixel ``j``.

    ``boundary``: ``(..., h, w)`` in [0, 1]. Returns ``(..., K, h, w)``, K = ``len(path_offsets(radius))``.
    Pixels outside the image count as boundary 1 (IRN pads the edge map with 1), so a pair whose
    destination falls outside the image gets affinity exactly 0, i.e. it does not exist.
    Memory is ``K * h * w`` per map: no ``(hw, hw)`` matrix is ever built.
    """
    pad = int(radius) - 1
    h, w = boundary.shape[-2:]
    padded = F.pad(boundary, (pad, pad, 0, pad), value=1.0)
    # A chain of element-wise maxima over shifted views: cheaper forward and backward on CPU than one
    # big gather of all path pixels (measured ~2x for a batch of 16 32x32 maps at radius 5).
    per_offset = []
    for off in _path_offsets(int(radius)):
        views = (padded[..., y : y + h, pad + x : pad + x + w] for y, x in off.path)
        highest = next(views)
        for view in views:
            highest = torch.maximum(highest, view)
        per_offset.append(highest)
    return 1.0 - torch.stack(per_offset, dim=-3)


def pair_labels(labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IRN's affinity targets from ``(..., h, w)`` labels {0, fg > 0, 255 = ignore}: ``(..., K, h, w)``
    float masks of fg-fg positive, bg-bg positive and negative (different labels) pairs.

    Pairs touching an ignored pixel or leaving the image are in none of the three.
    """
    pad = int(radius) - 1
    h, w = labels.shape[-2:]
    src = labels.long()
    padded = F.pad(src, (pad, pad, 0, pad), value=IGNORE)
    dst = torch.stack(
        [padded[..., o.dy : o.dy + h, pad + o.dx : pad + o.dx + w] for o in _path_offsets(radius)], -3
    )
    src = src.unsqueeze(-3)
    valid = (src != IGNORE) & (dst != IGNORE)
    equal = valid & (src == dst)
    fg_pos = (equal & (src > 0)).float()
    bg_pos = (equal & (src == 0)).float()
    neg = (valid & (src != dst)).float()
    return fg_pos, bg_pos, neg


def affinity_loss(
    boundary: torch.Tensor, labels: torch.Tensor, radius: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """IRN's affinity loss on a sigmoid boundary map ``(N, 1, h, w)`` and labels ``(N, h, w)``.

    ``L = (L_pos_bg / 2 + L_pos_fg / 2) / 2 + L_neg / 2`` with ``L_pos = mean -log(a)`` over positive
    pairs of that kind and ``L_neg = mean -log(1 - a)`` over negative pairs (each mean over its own pair
    count, eps 1e-5 as IRN). Averaging fg and bg positives separately keeps the usually far more numerous
    bg-bg pairs from drowning the object's interior. IRN's extra displacement-field terms (instance
    centroids) are not needed for one referred object and are left out.
    """
    eps = 1e-5
    aff = pair_affinity(boundary[:, 0], radius)
    fg_pos, bg_pos, neg = pair_labels(labels.to(boundary.device), radius)
    fg_loss = (-fg_pos * torch.log(aff + eps)).sum() / (fg_pos.sum() + eps)
    bg_loss = (-bg_pos * torch.log(aff + eps)).sum() / (bg_pos.sum() + eps)
    neg_loss = (-neg * torch.log(1.0 + eps - aff)).sum() / (neg.sum() + eps)
    loss = (bg_loss / 2 + fg_loss / 2) / 2 + neg_loss / 2
    stats = {
        "loss": float(loss.detach()),
        "pos_fg": float(fg_loss.detach()),
        "pos_bg": float(bg_loss.detach()),
        "neg": float(neg_loss.detach()),
        "n_pos_fg": float(fg_pos.sum()),
        "n_pos_bg": float(bg_pos.sum()),
        "n_neg": float(neg.sum()),
    }
    return loss, stats


def grid_size(input_size: int) -> int:
    """Side of the stride-4 boundary grid for a square input of ``input_size`` (ceil, like the convs)."""
    return (int(input_size) + STRIDE - 1) // STRIDE


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.GroupNorm(4, cout),
        nn.ReLU(inplace=True),
    )


class AffinityNet(nn.Module):
    """Small boundary detector: RGB image -> boundary logits at stride 4 (apply sigmoid for ``B``).

    A stride-4 branch keeps the colour edges that boundaries mostly are; a stride-8 branch with dilated
    convolutions sees enough context (receptive field ~120 px) to tell an object's outline from texture
    inside it.
    GroupNorm (as IRN's boundary head) behaves the same in train and eval mode with small batches.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(_block(3, width, stride=2), _block(width, width, stride=2))
        self.context = nn.Sequential(
            _block(width, 2 * width, stride=2),
            _block(2 * width, 2 * width, dilation=2),
            _block(2 * width, 2 * width, dilation=4),
        )
        self.fuse = _block(3 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(N, 3, H, W)`` CLIP-normalised. Returns logits ``(N, 1, ceil(H/4), ceil(W/4))``."""
        low = self.stem(images)
        ctx = F.interpolate(self.context(low), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([low, ctx], dim=1)))


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR))


def _resize_label(label: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(label)).resize((size, size), Image.NEAREST))


def _to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> CLIP-normalised float ``(N, 3, H, W)``."""
    return clip_normalize(images_u8.permute(0, 3, 1, 2).float() / 255.0)


WEIGHT_DECAY = 1e-4  # AdamW's, fixed (not a param: IRN's value, never tuned here)


class AffinityTraining(Training):
    """The boundary net on confident labels; the only augmentation is a random horizontal flip (IRN's
    random rescale/crop is skipped: inputs are already one fixed size)."""

    name = "train_affinity"
    scheduler = None  # a constant learning rate

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], p: AffinityParams, *,
                 seed: int, device: torch.device) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} label maps")
        if len(images) == 0:
            raise ValueError("train_affinity needs at least one image")
        self.p, self.device, self.epochs = p, device, p.epochs
        self.gen = torch.Generator().manual_seed(int(seed))
        grid = grid_size(p.input_size)
        # resized once up front, so an epoch costs only the forward/backward passes
        self.x_all = torch.from_numpy(np.stack([_resize_image(im, p.input_size) for im in images]))
        self.y_all = torch.from_numpy(np.stack([_resize_label(lb.astype(np.uint8), grid) for lb in labels]))
        with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the global RNG
            torch.manual_seed(int(seed))
            self.model = self.net = AffinityNet().to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=p.lr, weight_decay=WEIGHT_DECAY)

    def epoch(self, epoch: int) -> Epoch:
        """A fresh permutation of the images, in batches of ``batch_size``."""
        n, size = len(self.x_all), self.p.batch_size
        order = torch.randperm(n, generator=self.gen)
        return Epoch((order[start:start + size] for start in range(0, n, size)), (n + size - 1) // size)

    def step(self, idx: torch.Tensor) -> StepOut:
        """IRN's affinity loss on the (randomly flipped) images ``idx``."""
        x, y = self.x_all[idx], self.y_all[idx]
        flip = torch.rand(len(idx), generator=self.gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(2), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(2), y)
        boundary = torch.sigmoid(self.net(_to_input(x.to(self.device))))
        loss, _ = affinity_loss(boundary, y.to(self.device), self.p.radius)
        return StepOut(loss, {"loss": loss})

    def generators(self) -> dict[str, torch.Generator]:
        """Order and flips continue across epochs."""
        return {"augment": self.gen}


def train_affinity(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], p: AffinityParams, *,
                   seed: int, device: str | torch.device = "cpu",
                   run: TrainingRun | None = None) -> AffinityNet:
    """Train :class:`AffinityNet` on confident labels with the settings ``p``
    (``params.pseudo_masks.affinity``); returns the net in eval mode on ``device``.

    Images are resized bilinearly to ``p.input_size`` squared, labels (uint8 {0, 1, 255}, full image
    size) by nearest neighbour straight to the stride-4 grid.
    """
    return fit(AffinityTraining(images, labels, p, seed=seed, device=torch.device(device)), run)


@torch.no_grad()
def predict_boundary(net: AffinityNet, image: np.ndarray, input_size: int) -> torch.Tensor:
    """Boundary map ``B`` in [0, 1] of shape ``(grid, grid)``, ``grid = ceil(input_size / 4)``.

    As IRN at inference, the logits of the image and of its mirror (flipped back) are averaged before
    the sigmoid. The map is returned on the net's device, ready for :func:`random_walk`.
    """
    device = next(net.parameters()).device
    x = torch.from_numpy(np.array(_resize_image(image, input_size))).unsqueeze(0)
    x = _to_input(torch.cat([x, x.flip(2)]).to(device))
    logits = net(x)[:, 0]
    return torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)
