"""Dense-CRF helpers: IRN's confident fg/bg seeds (``cam_to_ir_label``) and a plain CRF refinement.

IRN does not trust a response map's values near its decision boundary. It runs a dense CRF twice on
the argmax of ``[bg score, fg map]``: once with a *high* constant bg score (``conf_fg``: only strongly
responding pixels become fg) and once with a *low* one (``conf_bg``: everything that responds at all
becomes fg, so what is still bg is surely bg). The colour-aware CRF snaps both seeds to image edges;
pixels on which the two runs disagree are left unlabelled (255) for the affinity network to decide.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

IGNORE = 255

# Defaults of pipeline.params.CrfParams; any key given in crf_kwargs overrides them.
CRF_DEFAULTS = {
    "iterations": 10,
    "gaussian_sxy": 3.0,
    "gaussian_compat": 3.0,
    "bilateral_sxy": 30.0,
    "bilateral_srgb": 13.0,
    "bilateral_compat": 10.0,
}


def _crf_kwargs(crf_kwargs: Mapping[str, float] | None) -> dict[str, float]:
    kwargs = dict(CRF_DEFAULTS)
    unknown = set(crf_kwargs or {}) - set(kwargs)
    if unknown:
        raise ValueError(f"unknown CRF parameters: {sorted(unknown)}")
    kwargs.update(crf_kwargs or {})
    return kwargs


def _marginals(
    image: np.ndarray,
    unary: np.ndarray,
    n_labels: int,
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
) -> np.ndarray:
    """Mean-field marginals ``(n_labels, H, W)`` of a DenseCRF2D: one Gaussian and one bilateral kernel."""
    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    # pydensecrf reads the raw buffer: the image must be C-contiguous uint8 (H, W, 3)
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=rgb, compat=bilateral_compat)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_inference(
    image: np.ndarray,
    probs: np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 30.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
) -> np.ndarray:
    """Labels ``(H, W)`` int64 of a dense CRF whose unaries are ``-log probs`` (``probs``: ``(C, H, W)``)."""
    probs = np.asarray(probs, dtype=np.float32)
    q = _marginals(
        image,
        unary_from_softmax(probs),
        probs.shape[0],
        iterations,
        gaussian_sxy,
        gaussian_compat,
        bilateral_sxy,
        bilateral_srgb,
        bilateral_compat,
    )
    return q.argmax(axis=0)


def crf_inference_label(
    image: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7, **crf_kwargs: float
) -> np.ndarray:
    """IRN's ``crf_inference_label``: CRF from hard labels (each trusted with ``gt_prob``), argmax ``(H, W)``.

    Hard-label unaries make the result depend only on which side of the threshold a pixel lies, not on
    how far, which is what the confidence thresholds of :func:`confident_labels` mean.
    """
    unary = unary_from_labels(
        np.asarray(labels, dtype=np.int64).ravel(), n_labels, gt_prob=gt_prob, zero_unsure=False
    )
    return _marginals(image, unary, n_labels, **_crf_kwargs(crf_kwargs)).argmax(axis=0)


def confident_labels(
    image: np.ndarray,
    fg_map: np.ndarray,
    conf_fg: float,
    conf_bg: float,
    crf_kwargs: Mapping[str, float] | None = None,
) -> np.ndarray:
    """IRN's confident seeds for one foreground: uint8 ``(H, W)``, 1 = fg, 0 = bg, 255 = ignore.

    ``fg_conf = CRF(argmax([conf_fg, fg_map]))`` and ``bg_conf = CRF(argmax([conf_bg, fg_map]))``; then,
    as IRN, ``label = fg_conf`` with its 0s set to 255, and 0 where ``fg_conf + bg_conf == 0``. So a
    pixel is fg if the strict run says fg (this wins even if the permissive run disagrees), bg if both
    runs say bg, ignored otherwise. ``fg_map`` is on [0, 1] (min-max normalised response).
    """
    fg_map = np.asarray(fg_map, dtype=np.float32)
    if fg_map.shape != image.shape[:2]:
        raise ValueError(f"fg_map {fg_map.shape} does not match image {image.shape[:2]}")
    kwargs = _crf_kwargs(crf_kwargs)
    # np.argmax takes the first maximum: a tie with the bg score is bg, as IRN's padded argmax
    fg_conf = crf_inference_label(image, (fg_map > conf_fg).astype(np.int64), 2, **kwargs)
    bg_conf = crf_inference_label(image, (fg_map > conf_bg).astype(np.int64), 2, **kwargs)
    label = np.full(fg_map.shape, IGNORE, dtype=np.uint8)
    label[fg_conf == 1] = 1
    label[(fg_conf + bg_conf) == 0] = 0
    return label


def crf_refine(
    image: np.ndarray, fg_map: np.ndarray, crf_kwargs: Mapping[str, float] | None = None
) -> np.ndarray:
    """CRF-refined soft mask for the ``refine: crf`` ablation: the fg marginal ``(H, W)`` in [0, 1] of a CRF
    with probabilities ``[1 - fg_map, fg_map]``. Thresholding it at 0.5 gives the CRF's MAP labels."""
    fg = np.clip(np.asarray(fg_map, dtype=np.float32), 0.0, 1.0)
    probs = np.stack([1.0 - fg, fg])
    q = _marginals(image, unary_from_softmax(probs), 2, **_crf_kwargs(crf_kwargs))
    return q[1]
