"""Dense-CRF helpers: IRN's confident fg/bg seeds (``cam_to_ir_label``) and a plain CRF refinement.

IRN does not trust a response map's values near its decision boundary. It runs a dense CRF twice on
the argmax of ``[bg score, fg map]``: once with a *high* constant bg score (``conf_fg``: only strongly
responding pixels become fg) and once with a *low* one (``conf_bg``: everything that responds at all
becomes fg, so what is still bg is surely bg). The colour-aware CRF snaps both seeds to image edges;
pixels on which the two runs disagree are left unlabelled (255) for the affinity network to decide.

The kernel settings come as one :class:`~pipeline.params.CrfParams` section (``pseudo_masks.crf``), so
they have no second set of defaults here.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from pipeline.params import CrfParams

IGNORE = 255


def _marginals(image: np.ndarray, unary: np.ndarray, n_labels: int, crf: CrfParams) -> np.ndarray:
    """Mean-field marginals ``(n_labels, H, W)`` of a DenseCRF2D: one Gaussian and one bilateral kernel."""
    h, w = image.shape[:2]
    model = dcrf.DenseCRF2D(w, h, n_labels)
    model.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    model.addPairwiseGaussian(sxy=crf.gaussian_sxy, compat=crf.gaussian_compat)
    # pydensecrf reads the raw buffer: a C-contiguous uint8 (H, W, 3) that is writable (it refuses a
    # read-only one, e.g. np.asarray of a PIL image, which np.ascontiguousarray would pass through)
    rgb = np.array(image, dtype=np.uint8, order="C", copy=True)
    model.addPairwiseBilateral(sxy=crf.bilateral_sxy, srgb=crf.bilateral_srgb, rgbim=rgb,
                               compat=crf.bilateral_compat)
    q = model.inference(int(crf.iterations))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def crf_inference_label(
    image: np.ndarray, labels: np.ndarray, n_labels: int, crf: CrfParams, gt_prob: float = 0.7
) -> np.ndarray:
    """IRN's ``crf_inference_label``: CRF from hard labels (each trusted with ``gt_prob``), argmax ``(H, W)``.

    Hard-label unaries make the result depend only on which side of the threshold a pixel lies, not on
    how far, which is what the confidence thresholds of :func:`confident_labels` mean. ``gt_prob`` is
    IRN's constant, not a tuned parameter.
    """
    unary = unary_from_labels(
        np.asarray(labels, dtype=np.int64).ravel(), n_labels, gt_prob=gt_prob, zero_unsure=False
    )
    return _marginals(image, unary, n_labels, crf).argmax(axis=0)


def confident_labels(
    image: np.ndarray, fg_map: np.ndarray, conf_fg: float, conf_bg: float, crf: CrfParams
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
    # np.argmax takes the first maximum: a tie with the bg score is bg, as IRN's padded argmax
    fg_conf = crf_inference_label(image, (fg_map > conf_fg).astype(np.int64), 2, crf)
    bg_conf = crf_inference_label(image, (fg_map > conf_bg).astype(np.int64), 2, crf)
    label = np.full(fg_map.shape, IGNORE, dtype=np.uint8)
    label[fg_conf == 1] = 1
    label[(fg_conf + bg_conf) == 0] = 0
    return label


def crf_refine(image: np.ndarray, fg_map: np.ndarray, crf: CrfParams) -> np.ndarray:
    """CRF-refined soft mask for the ``refine: crf`` ablation: the fg marginal ``(H, W)`` in [0, 1] of a CRF
    with probabilities ``[1 - fg_map, fg_map]``. Thresholding it at 0.5 gives the CRF's MAP labels."""
    fg = np.clip(np.asarray(fg_map, dtype=np.float32), 0.0, 1.0)
    probs = np.stack([1.0 - fg, fg])
    q = _marginals(image, unary_from_softmax(probs), 2, crf)
    return q[1]
