"""Response-map utilities shared by Step-1 training, PRMS, refinement, evaluation and inspection.

One place defines how a low-resolution response map becomes (a) a soft mask for the masked image of
Eq. 9, (b) a [0, 1] map for thresholding and refinement, and (c) an image at its original size, so that
training, PRMS and evaluation can never disagree about it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalize(images01: torch.Tensor) -> torch.Tensor:
    """CLIP's per-channel normalisation of ``(B, 3, H, W)`` images in [0, 1]."""
    mean = images01.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images01.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images01 - mean) / std


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize ``(B, h, w)`` or ``(B, C, h, w)`` maps to ``size`` = (H, W)."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    return x.squeeze(1) if squeeze else x


def response_to_soft_mask(response: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``sigmoid(up(R))``: the soft foreground mask used to mask the image in Eq. 9 (and PRMS, Eq. 10).

    ``response`` holds temperature-scaled responses (Eq. 2), shape ``(B, h, w)``; output ``(B, H, W)``.
    """
    return torch.sigmoid(upsample(response, size))


def mask_images(images01: torch.Tensor, response: torch.Tensor, size: int) -> torch.Tensor:
    """``I ⊙ up(R)`` of Eq. 9, resized to the frozen CLIP's input ``size`` and CLIP-normalised.

    Masking happens in [0, 1] pixel space, before normalisation, so masked-out pixels are black to CLIP
    (masking an already-normalised image would instead paint them the dataset mean colour).
    Gradients flow from the output to ``response``.
    """
    images = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False)
    mask = response_to_soft_mask(response, (size, size)).unsqueeze(1)
    return clip_normalize(images * mask)


def minmax_normalize(maps: torch.Tensor | np.ndarray, eps: float = 1e-6):
    """Scale each map of a ``(B, H, W)`` (or single ``(H, W)``) stack to [0, 1] by its own min and max.

    Response values are temperature-scaled cosines whose range drifts during training; thresholds
    (evaluation, confident CRF labels, pseudo-masks) are therefore defined on this per-map scale.
    A constant map becomes all zeros.
    """
    is_np = isinstance(maps, np.ndarray)
    x = torch.as_tensor(maps).float()
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    out = torch.where(hi - lo > eps, (x - lo) / (hi - lo + eps), torch.zeros_like(x)).clamp_(0, 1)
    if single:
        out = out[0]
    return out.numpy() if is_np else out
