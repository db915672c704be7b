"""Dense CRF: IRN's confident seeds snap a blurry, shifted response onto the object it points at."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from pipeline.params import CrfParams
from pipeline.pseudo.crf import confident_labels, crf_refine

# the kernels these scenes were tuned with (params.yaml runs fewer iterations on the real maps)
CRF = CrfParams(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=30.0, bilateral_srgb=13.0,
                bilateral_compat=10.0)


def disc_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red disc on a noisy grey 64x64 background and a blurry response shifted off the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 30) ** 2 < 14**2
    image = np.full((64, 64, 3), 128.0) + rng.normal(0, 12, (64, 64, 3))
    image[disc] = np.array([200.0, 40.0, 40.0]) + rng.normal(0, 12, (int(disc.sum()), 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    coarse = gaussian_filter(np.roll(disc.astype(float), (4, -5), axis=(0, 1)), 5)
    return image, coarse / coarse.max(), disc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_confident_labels_recover_the_disc():
    image, coarse, disc = disc_scene()
    label = confident_labels(image, coarse, conf_fg=0.30, conf_bg=0.05, crf=CRF)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 255}
    fg, bg = label == 1, label == 0
    assert fg.sum() > 0.5 * disc.sum() and bg.sum() > 0.5 * (~disc).sum()
    assert disc[fg].mean() >= 0.95
    assert (~disc[bg]).mean() >= 0.95
    # the raw response thresholded the same way is visibly worse: the CRF did the work
    assert disc[coarse > 0.30].mean() < 0.9


def test_crf_refine_mask_matches_the_disc():
    image, coarse, disc = disc_scene(1)
    soft = crf_refine(image, coarse, CRF)
    assert soft.shape == disc.shape and soft.min() >= 0 and soft.max() <= 1
    assert iou(soft > 0.5, disc) > 0.8
    assert iou(coarse > 0.5, disc) < 0.7


def test_confident_labels_follow_irn_combination():
    """Three flat colour stripes with responses 0.9 / 0.15 / 0.0: the strict run (bg score 0.3) keeps only
    the first as fg, the permissive run (bg score 0.05) calls the first two fg, so the middle stripe,
    on which the runs disagree, is ignored (255) and only the last is confident bg."""
    image = np.zeros((30, 60, 3), np.uint8)
    fg_map = np.zeros((30, 60), np.float32)
    for i, (colour, value) in enumerate([((220, 30, 30), 0.9), ((30, 220, 30), 0.15), ((30, 30, 220), 0.0)]):
        image[:, 20 * i : 20 * (i + 1)] = colour
        fg_map[:, 20 * i : 20 * (i + 1)] = value
    label = confident_labels(image, fg_map, conf_fg=0.30, conf_bg=0.05, crf=CRF)
    assert (label[:, 2:18] == 1).all()
    assert (label[:, 22:38] == 255).all()
    assert (label[:, 42:58] == 0).all()


def test_confident_labels_constant_maps():
    image = np.full((20, 20, 3), 100, np.uint8)
    assert (confident_labels(image, np.zeros((20, 20)), 0.3, 0.05, CRF) == 0).all()
    assert (confident_labels(image, np.ones((20, 20)), 0.3, 0.05, CRF) == 1).all()


def test_crf_refine_keeps_confident_labels():
    """Near-certain maps stay put: the CRF's MAP labels (soft mask > 0.5) are the disc itself."""
    image, _, disc = disc_scene(2)
    soft = crf_refine(image, np.where(disc, 0.98, 0.02), CRF)
    assert soft.shape == disc.shape
    assert ((soft > 0.5) == disc).mean() > 0.99


def test_unknown_or_missing_crf_key_is_rejected():
    """The CRF takes its settings only as a validated section: a typo or a gap fails by name."""
    good = CRF.model_dump()
    with pytest.raises(ValueError, match="bilateral_sx"):
        CrfParams.model_validate({**good, "bilateral_sx": 3.0})
    del good["iterations"]
    with pytest.raises(ValueError, match="iterations"):
        CrfParams.model_validate(good)


def test_read_only_images_are_accepted():
    """``np.asarray(PIL image)`` is read-only; pydensecrf refuses a read-only buffer, so the CRF must copy
    it rather than fail with "buffer source array is read-only"."""
    image, coarse, _ = disc_scene()
    writable = confident_labels(image, coarse, conf_fg=0.30, conf_bg=0.05, crf=CRF)
    image.setflags(write=False)
    assert np.array_equal(confident_labels(image, coarse, conf_fg=0.30, conf_bg=0.05, crf=CRF), writable)
    assert crf_refine(image, coarse, CRF).shape == coarse.shape
