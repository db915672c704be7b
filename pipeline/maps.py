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


def upsample(maps: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False,
             via: int | None = None) -> torch.Tensor:
    """Bilinearly resize ``(B, h, w)`` or ``(B, C, h, w)`` maps to ``size`` = (H, W).

    ``align_corners=False`` (``model.align_corners: false``, the default) is one resize with half-pixel
    centres. ``align_corners=True`` follows the authors' code, which resizes twice: the model up-samples
    its stride-32 map to the network input (``via`` x ``via``) with ``align_corners=False``, then the
    evaluation / calibration code resizes that to the target with ``align_corners=True``. ``via`` is
    ignored when ``align_corners`` is false, and skipped when the maps are already ``via`` wide.
    """
    squeeze = maps.dim() == 3
    x = (maps.unsqueeze(1) if squeeze else maps).float()
    if align_corners and via is not None and tuple(x.shape[-2:]) != (via, via):
        x = F.interpolate(x, size=(via, via), mode="bilinear", align_corners=False)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
    return x.squeeze(1) if squeeze else x


def response_to_soft_mask(response: torch.Tensor, size: tuple[int, int], *, align_corners: bool = False,
                          via: int | None = None) -> torch.Tensor:
    """``sigmoid(up(R))``: the soft foreground mask used to mask the image in Eq. 9 (and PRMS, Eq. 10).

    ``response`` holds temperature-scaled responses (Eq. 2), shape ``(B, h, w)``; output ``(B, H, W)``;
    ``align_corners`` / ``via`` as in :func:`upsample`.
    """
    return torch.sigmoid(upsample(response, size, align_corners=align_corners, via=via))


MASK_SPACES = ("unit", "normalized")


def mask_images(images01: torch.Tensor, response: torch.Tensor, size: int, *, space: str = "unit",
                align_corners: bool = False) -> torch.Tensor:
    """``I ⊙ up(R)`` of Eq. 9, resized to the frozen CLIP's input ``size`` and CLIP-normalised.

    ``space`` (``step1.calibration_mask_space``) says which image the mask multiplies:

    * ``unit``: the image in [0, 1], before normalisation, so masked-out pixels are black to CLIP;
    * ``normalized``: the CLIP-normalised image, as the authors' code does (it masks the normalised
      network input), so masked-out pixels are 0 after normalisation, i.e. the dataset mean colour.

    ``align_corners`` (``model.align_corners``): with ``True`` the image and the map are resized to
    ``size`` with ``align_corners=True`` and the map first goes to the image's own side with ``False``
    (the authors' two resizes, :func:`upsample`). Gradients flow from the output to ``response``.
    """
    if space not in MASK_SPACES:
        raise ValueError(f"step1.calibration_mask_space: unknown masking space {space!r}; "
                         f"expected one of {MASK_SPACES}")
    images = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=align_corners)
    via = images01.shape[-1] if images01.shape[-2] == images01.shape[-1] else None
    mask = response_to_soft_mask(response, (size, size), align_corners=align_corners, via=via).unsqueeze(1)
    if space == "normalized":
        return clip_normalize(images) * mask
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
