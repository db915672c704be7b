"""From a selected response map to a binary pseudo-mask (Sec. 3.4, "Segmentation": refine with [1] = IRN,
then threshold).

:func:`refine_map` turns the [0, 1] response of the PRMS-selected expression into a refined [0, 1] map
(``irn``: random walk inside the affinity net's boundaries, as IRN's ``make_sem_seg_labels``; ``crf``:
dense-CRF marginal, an ablation; ``none``: the response itself). :func:`to_pseudo_mask` thresholds it and
optionally keeps one connected component, since a referring expression names a single object.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from pipeline.params import PseudoMaskParams
from pipeline.pseudo.affinity import AffinityNet, predict_boundary
from pipeline.pseudo.crf import crf_refine
from pipeline.pseudo.random_walk import random_walk

Keep = Literal["all", "largest", "argmax"]


def refine_map(
    image: np.ndarray, fg_map: np.ndarray, params: PseudoMaskParams, affinity_net: AffinityNet | None = None,
    boundary: torch.Tensor | None = None,
) -> np.ndarray:
    """Refined foreground map(s) in [0, 1] for a uint8 ``(H, W, 3)`` image, by ``params.refine``.

    ``fg_map`` is ``(H, W)`` or a stack ``(C, H, W)`` of maps of several objects of the same image,
    which then share one boundary map and one batched random walk (the output has the input's shape).
    The method and its settings come from the ``pseudo_masks`` section, so no setting has a second
    default here: ``crf`` uses ``params.crf``; ``irn`` uses ``params.affinity`` (``radius``, ``input_size``)
    and ``params.random_walk``.

    ``irn``: the boundary map ``B`` of ``affinity_net`` on the image resized to ``input_size`` squared
    (stride-4 grid), the fg map area-downsampled to that grid, ``random_walk`` of ``fg * (1 - B)``,
    bilinear upsampling back to ``(H, W)`` and division by the maximum (IRN's ``rw_up / max``), per map.
    The confident labels that trained ``affinity_net`` come from :func:`pipeline.pseudo.crf.confident_labels`.
    ``boundary`` (``irn`` only) is that boundary map computed beforehand, in place of ``affinity_net``: the
    stage computes it in its main process, because the net's convolutions round differently with a
    different number of torch threads, and its refinement workers run one thread each.
    """
    method = params.refine
    fg = np.clip(np.asarray(fg_map, dtype=np.float32), 0.0, 1.0)
    single = fg.ndim == 2
    stack = fg[None] if single else fg
    if stack.shape[1:] != image.shape[:2]:
        raise ValueError(f"fg_map {fg.shape} does not match image {image.shape[:2]}")
    if method == "none":
        out = stack
    elif method == "crf":
        out = np.stack([crf_refine(image, m, params.crf) for m in stack]).clip(0, 1).astype(np.float32)
    elif method == "irn":
        if boundary is None:
            if affinity_net is None:
                raise ValueError("method='irn' needs a trained affinity_net or its boundary map")
            boundary = predict_boundary(affinity_net, image, params.affinity.input_size)
        seeds = torch.from_numpy(stack).to(boundary.device)[:, None]
        seeds = F.interpolate(seeds, size=tuple(boundary.shape), mode="area")[:, 0]
        walk = params.random_walk
        walked = random_walk(seeds, boundary, params.affinity.radius, walk.beta, walk.exp_times)
        up = F.interpolate(walked[:, None], size=stack.shape[1:], mode="bilinear", align_corners=False)[:, 0]
        peak = up.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
        out = (up / peak).clamp(0, 1).cpu().numpy().astype(np.float32)
    else:
        raise ValueError(f"unknown refine method {method!r}; expected 'none', 'crf' or 'irn'")
    return out[0] if single else out


_EIGHT = np.ones((3, 3), dtype=bool)


def to_pseudo_mask(refined: np.ndarray, threshold: float, keep: Keep) -> np.ndarray:
    """Binary pseudo-mask ``(H, W)`` bool: pixels with ``refined > threshold``, then per ``keep``:

    ``all`` every component; ``largest`` the largest 8-connected component (ties: the lowest label, i.e.
    first in raster order); ``argmax`` the component containing the map's maximum (first in raster order
    on ties), i.e. the object the response points at, which may be smaller than a distractor blob.
    Strict ``>`` matches IRN, whose argmax against a constant bg score gives ties to the background.
    Nothing above the threshold gives an empty mask.
    """
    if keep not in ("all", "largest", "argmax"):
        raise ValueError(f"unknown keep rule {keep!r}; expected 'all', 'largest' or 'argmax'")
    refined = np.asarray(refined)
    mask = refined > threshold
    if keep == "all" or not mask.any():
        return mask
    components, n = ndimage.label(mask, structure=_EIGHT)
    if keep == "largest":
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        return components == (int(np.argmax(sizes)) + 1)
    peak = np.unravel_index(int(np.argmax(refined)), refined.shape)
    return components == components[peak]
