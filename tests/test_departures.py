"""The switches that give the authors' choice where this implementation departs from it
(docs/departures.md): each changes what it says, and its default keeps today's behaviour."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.metrics import authors_boxes, box_accuracy_hit_authors, score_sentence
from pipeline.eval.scoring import upsample_response
from pipeline.maps import clip_normalize, mask_images, upsample
from pipeline.params import ParamsError, load_params, overlay, parse_params, read_params_yaml
from pipeline.pseudo.prms import PrmsItem, select_batch
from pipeline.train.selection import BEST_FILE, BestValSelection


def _images_and_response(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 24, 24, generator=g), torch.randn(2, 3, 3, generator=g) * 3


# --- Eq. 9 masking space (step1.calibration_mask_space) ----------------------------------------------

def test_unit_masking_is_the_formula_and_the_default():
    images, response = _images_and_response()
    size = 16
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    soft = torch.sigmoid(F.interpolate(response[:, None], size=(size, size), mode="bilinear",
                                       align_corners=False))
    expected = clip_normalize(resized * soft)
    assert torch.allclose(mask_images(images, response, size), expected, atol=1e-6)
    assert torch.equal(mask_images(images, response, size, space="unit"), mask_images(images, response, size))


def test_normalized_masking_masks_the_normalised_image():
    images, response = _images_and_response()
    size = 16
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    soft = torch.sigmoid(F.interpolate(response[:, None], size=(size, size), mode="bilinear",
                                       align_corners=False))
    out = mask_images(images, response, size, space="normalized")
    assert torch.allclose(out, clip_normalize(resized) * soft, atol=1e-6)
    assert not torch.allclose(out, mask_images(images, response, size), atol=1e-3)
    # a fully masked-out pixel is 0 (the mean colour) after normalisation, not CLIP's black
    blank = mask_images(images, torch.full((2, 3, 3), -100.0), size, space="normalized")
    assert torch.allclose(blank, torch.zeros_like(blank), atol=1e-6)
    black = mask_images(images, torch.full((2, 3, 3), -100.0), size, space="unit")
    assert black.abs().min() > 1.0


def test_unknown_masking_space_is_refused_by_name():
    images, response = _images_and_response()
    with pytest.raises(ValueError, match="step1.calibration_mask_space"):
        mask_images(images, response, 16, space="imagenet")


# --- align_corners (model.align_corners) -------------------------------------------------------------

def test_upsample_default_is_one_resize_with_half_pixel_centres():
    _, response = _images_and_response()
    direct = F.interpolate(response[:, None], size=(40, 30), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(upsample(response, (40, 30)), direct)
    assert torch.equal(upsample(response, (40, 30), via=96), direct)  # via only matters with True


def test_upsample_align_corners_is_the_authors_two_resizes():
    _, response = _images_and_response()
    first = F.interpolate(response[:, None], size=(96, 96), mode="bilinear", align_corners=False)
    second = F.interpolate(first, size=(40, 30), mode="bilinear", align_corners=True)[:, 0]
    out = upsample(response, (40, 30), align_corners=True, via=96)
    assert torch.allclose(out, second, atol=1e-6)
    assert not torch.allclose(out, upsample(response, (40, 30)), atol=1e-3)
    # without a network input side it is one resize with align_corners=True
    one = F.interpolate(response[:, None], size=(40, 30), mode="bilinear", align_corners=True)[:, 0]
    assert torch.allclose(upsample(response, (40, 30), align_corners=True), one, atol=1e-6)


def test_masking_with_align_corners_goes_through_the_image_side():
    images, response = _images_and_response()
    size = 16
    out = mask_images(images, response, size, align_corners=True)
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
    soft = torch.sigmoid(upsample(response, (size, size), align_corners=True, via=24))[:, None]
    assert torch.allclose(out, clip_normalize(resized * soft), atol=1e-6)
    assert not torch.allclose(out, mask_images(images, response, size), atol=1e-3)


def test_step1_evaluation_upsampling_follows_align_corners():
    response = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    plain = upsample_response(response, 50, 70)
    authors = upsample_response(response, 50, 70, align_corners=True, input_size=128)
    two = upsample(torch.from_numpy(response)[None], (50, 70), align_corners=True, via=128)[0].numpy()
    np.testing.assert_allclose(authors, two, atol=1e-6)
    assert np.abs(authors - plain).max() > 1e-3


# --- PRMS: masking space and align_corners reach PRMS's masked images -----------------------------------

def test_prms_masks_in_the_space_it_is_given():
    images, responses = _images_and_response()
    seen: list[torch.Tensor] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x.flatten(1)[:, :8]

    item = PrmsItem(images[0], responses, torch.randn(2, 8))
    for space, corners in (("unit", False), ("normalized", False), ("normalized", True)):
        seen.clear()
        select_batch([item], encode, 16, 8, space=space, align_corners=corners)
        expected = mask_images(images[0][None].expand(2, -1, -1, -1), responses, 16, space=space,
                               align_corners=corners)
        assert torch.allclose(seen[0], expected, atol=1e-6)
    assert not torch.allclose(seen[0], mask_images(images[0][None].expand(2, -1, -1, -1), responses, 16))


# --- Acc_box (evaluate.acc_box) ------------------------------------------------------------------------

def _two_blobs() -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A map whose maximum is on a distractor (left) while the target (right) is also lit."""
    prob = np.zeros((40, 60), dtype=np.float32)
    prob[5:15, 5:15] = 1.0  # distractor, holds the maximum point (first in raster order)
    prob[20:35, 35:55] = 0.8  # target
    gt = np.zeros((40, 60), dtype=bool)
    gt[20:35, 35:55] = True
    return prob, gt, [35.0, 20.0, 20.0, 15.0]


def test_authors_acc_box_hits_when_any_box_matches():
    prob, gt, box = _two_blobs()
    ours = score_sentence(prob, gt, box, 0.5)
    authors = score_sentence(prob, gt, box, 0.5, acc_box="authors")
    assert not ours.box_hit and authors.box_hit
    assert (ours.iou, ours.point_m) == (authors.iou, authors.point_m)  # only Acc_box changes
    assert sorted(authors_boxes(prob >= 0.5)) == [(5, 5, 15, 15), (35, 20, 55, 35)]
    assert score_sentence(prob, gt, box, 0.5, acc_box="max_point") == ours


def test_authors_boxes_drop_suppressed_and_weak_boxes():
    binary = np.zeros((40, 40), dtype=bool)
    binary[2:12, 2:12] = True  # full box, fill 1.0
    diagonal = np.eye(20, dtype=bool)  # one 8-connected component, fill 0.05 <= 0.5 * best
    binary[18:38, 18:38] = diagonal
    assert authors_boxes(binary) == [(2, 2, 12, 12)]
    # a frame (fill 0.64) around a solid block (fill 1.0): the boxes overlap by IoU 0.09 > 0.05, so
    # NMS keeps only the more confident block, though the frame alone would pass the fill test
    framed = np.zeros((30, 30), dtype=bool)
    framed[0:20, 0:20] = True
    framed[4:16, 4:16] = False
    framed[7:13, 7:13] = True
    assert authors_boxes(framed) == [(7, 7, 13, 13)]
    framed[7:13, 7:13] = False
    assert authors_boxes(framed) == [(0, 0, 20, 20)]
    assert authors_boxes(np.zeros((5, 5), dtype=bool)) == []
    assert not box_accuracy_hit_authors(np.zeros((5, 5), dtype=bool), [0, 0, 5, 5])
    assert box_accuracy_hit_authors(np.ones((5, 5), dtype=bool), [0, 0, 5, 5])


def test_unknown_acc_box_rule_is_refused_by_name():
    prob, gt, box = _two_blobs()
    with pytest.raises(ValueError, match="evaluate.acc_box"):
        score_sentence(prob, gt, box, 0.5, acc_box="any")


# --- Step-2 model selection (step2.select) ---------------------------------------------------------------

class _Scores:
    """A scorer that reads the model's one weight (set per epoch by the test) and returns a fixed curve."""

    def __init__(self, curve: dict[float, float]) -> None:
        self.curve = curve

    def __call__(self, model: torch.nn.Module) -> float:
        return self.curve[float(model.weight.item())]


def _model(value: float) -> torch.nn.Linear:
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_best_val_keeps_the_best_epoch_not_the_last(tmp_path):
    scores = _Scores({1.0: 0.2, 2.0: 0.5, 3.0: 0.3})
    sel = BestValSelection(tmp_path, "run-a", scores, resuming=False)
    model = _model(0.0)
    for epoch, w in enumerate((1.0, 2.0, 3.0), start=1):
        with torch.no_grad():
            model.weight.fill_(w)
        logged = sel.observe(model, epoch)
    assert logged == {"val_mIoU": 0.3, "best_val_mIoU": 0.5}
    assert sel.select(model) is model and model.weight.item() == 2.0 and sel.best_epoch == 2
    sel.discard()
    assert not (tmp_path / BEST_FILE).exists()


def test_best_val_survives_a_resume_and_ignores_other_runs(tmp_path):
    scores = _Scores({1.0: 0.6, 2.0: 0.1})
    first = BestValSelection(tmp_path, "run-a", scores, resuming=False)
    first.observe(_model(1.0), 1)
    # killed here; the resumed run of the same configuration continues with the best it had
    resumed = BestValSelection(tmp_path, "run-a", scores, resuming=True)
    resumed.observe(_model(2.0), 2)
    model = resumed.select(_model(2.0))
    assert resumed.best_epoch == 1 and model.weight.item() == 1.0
    # a file of another configuration, or a fresh run, does not choose
    assert BestValSelection(tmp_path, "run-b", scores, resuming=True).best_epoch is None
    BestValSelection(tmp_path, "run-a", scores, resuming=False)
    assert not (tmp_path / BEST_FILE).exists()


# --- params: every switch is declared, defaults are today's behaviour --------------------------------------

def test_departure_switches_default_to_the_embedded_behaviour(repo_root):
    p = load_params(repo_root / "params.yaml")
    assert p.step1.calibration_mask_space == "unit"
    assert p.model.align_corners is False
    assert p.evaluate.acc_box == "max_point"
    assert p.pseudo_masks.prms_image == "working"
    assert p.step2.select == "last"


@pytest.mark.parametrize("override,key", [
    ({"step1": {"calibration_mask_space": "imagenet"}}, "step1.calibration_mask_space"),
    ({"evaluate": {"acc_box": "any"}}, "evaluate.acc_box"),
    ({"pseudo_masks": {"prms_image": "calibration"}}, "pseudo_masks.prms_image"),
    ({"step2": {"select": "best"}}, "step2.select"),
    ({"model": {"align_corners": "yes"}}, "model.align_corners"),
])
def test_departure_switches_refuse_unknown_values_by_key(repo_root, override, key):
    raw = read_params_yaml(repo_root / "params.yaml")
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(overlay(raw, override))


class _LeftHalf(torch.nn.Module):
    """A stand-in segmenter: logit +5 on the left ``frac`` of the input, -5 elsewhere."""

    def __init__(self, frac: float) -> None:
        super().__init__()
        self.frac = frac
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        out = torch.full((b, 1, h, w), -5.0)
        out[..., : int(round(w * self.frac))] = 5.0
        return out


def test_val_miou_scorer_is_evaluate_step2s_miou(tmp_path):
    from PIL import Image
    from pycocotools import mask as mask_utils

    from pipeline.data.samples import ImageBank
    from pipeline.eval.scoring import GroundTruth, iter_segmenter_probs, val_miou_scorer

    h, w = 20, 30
    Image.new("RGB", (w, h), (120, 30, 200)).save(tmp_path / "a.png")
    gt_mask = np.zeros((h, w), dtype=bool)
    gt_mask[:, : w // 2] = True
    rle = mask_utils.encode(np.asfortranarray(gt_mask.astype(np.uint8)))
    refs = pd.DataFrame([{"ref_id": 1, "bbox": [0.0, 0.0, float(w // 2), float(h)],
                          "mask_counts": rle["counts"].decode("ascii"), "mask_height": h, "mask_width": w}])
    val = pd.DataFrame([{"sent_id": 5, "ref_id": 1, "image_id": 1, "text": "the left half",
                         "height": h, "width": w}])
    bank = ImageBank({1: tmp_path / "a.png"}, 16, workers=1)
    score = val_miou_scorer(bank, val, GroundTruth(refs), threshold=0.5, max_tokens=8,
                            device=torch.device("cpu"), align_corners=False)
    assert score(_LeftHalf(0.5)) == pytest.approx(1.0)
    assert score(_LeftHalf(0.25)) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="step2.select"):
        val_miou_scorer(bank, val.iloc[:0], GroundTruth(refs), threshold=0.5, max_tokens=8,
                        device=torch.device("cpu"), align_corners=False)
    # model.align_corners reaches the resize of the logits to the image
    plain = next(iter_segmenter_probs(_LeftHalf(0.5), bank, val, 4, 8, torch.device("cpu")))[2]
    corners = next(iter_segmenter_probs(_LeftHalf(0.5), bank, val, 4, 8, torch.device("cpu"),
                                        align_corners=True))[2]
    assert plain.shape == corners.shape == (h, w) and np.abs(plain - corners).max() > 1e-3
