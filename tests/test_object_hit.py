"""The object hit and its measurement tools (issue 27): the object hit on crafted maps, its kinds, the
ceiling of a Step-1 that reads attributes only, and the gaming guard (the frozen CLIP's masked-object
ranking on Step-1's own soft masks beside its ranking on GT masks)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.data.images import read_image_rgb
from pipeline.data.synthetic.scene import SceneObject
from pipeline.eval.clip_checks import _masked_image, _soft_masks, gaming_guard, masked_object_hits
from pipeline.eval.grounding import object_hit_metrics, rates_by_kind, response_object_hits
from pipeline.models.clip_backbone import FrozenClip, build_clip
from scripts.object_hit_ceiling import ceiling_table, expected_hits


def _ref_row(ref_id: int, image_id: int, mask: np.ndarray, split: str = "val") -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"ref_id": ref_id, "ann_id": ref_id, "image_id": image_id, "split": split,
            "mask_counts": rle["counts"].decode("ascii"), "mask_height": mask.shape[0],
            "mask_width": mask.shape[1]}


def _box(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[rows, cols] = True
    return mask


# ------------------------------------------------------------------------------------------------
# the object hit
# ------------------------------------------------------------------------------------------------

def _two_object_image():
    left, right = _box(8, 8, slice(2, 6), slice(0, 3)), _box(8, 8, slice(2, 6), slice(5, 8))
    refs = pd.DataFrame([_ref_row(1, 10, left), _ref_row(2, 10, right)])
    images = pd.DataFrame({"image_id": [10], "height": [8], "width": [8]})
    sentences = pd.DataFrame({"sent_id": [1, 2], "ref_id": [1, 2], "image_id": [10, 10],
                              "text": ["the red square", "the leftmost square"]})
    return left, right, refs, images, sentences


def test_object_hit_counts_the_object_a_map_covers_most_by_its_mean():
    """A map brighter over the target than over the rival is a hit even where its peak lies on the
    rival: the object hit is a mean over each object's GT mask, not PointM's single peak."""
    left, right, refs, images, sentences = _two_object_image()
    covers_left = np.where(left, 0.8, 0.0).astype(np.float32)
    covers_left[2, 6] = 1.0  # the single peak sits on the right object
    maps = {1: covers_left, 2: covers_left}
    hits = response_object_hits(maps, sentences, refs, images).set_index("sent_id")
    assert hits.loc[1, "hit"] and not hits.loc[1, "point"]
    assert not hits.loc[2, "hit"] and hits.loc[2, "point"]
    given = response_object_hits(maps, sentences, refs, images,
                                 {1: left, 2: right}.__getitem__)  # masks decoded by the caller
    assert given.equals(hits.reset_index())


def test_a_map_that_responds_equally_to_two_objects_is_not_a_hit():
    """Bug fix: the hit took ``max`` over a dict, so a tie went to whichever object came first in the
    refs table; a constant map "hit" the first object. A tie picks nothing: a miss for both."""
    _, _, refs, images, sentences = _two_object_image()
    flat = np.ones((8, 8), np.float32)
    hits = response_object_hits({1: flat, 2: flat}, sentences, refs, images)
    assert not hits["hit"].any()


def test_object_hit_metrics_give_the_rate_its_chance_and_the_rates_by_kind():
    hits = pd.DataFrame({"text": ["the red square", "the red one", "the square", "the leftmost square",
                                  "the disc left of the star"],
                         "hit": [True, True, False, True, False], "objects": [2, 2, 4, 4, 4]})
    metrics = object_hit_metrics(hits, by_kind=True)
    assert metrics["object_hit"] == 0.6 and metrics["object_hit_chance"] == pytest.approx(0.35)
    by_kind = metrics["object_hit_by_kind"]
    assert list(by_kind) == ["attribute", "attribute: colour", "attribute: colour+shape", "attribute: shape",
                             "position", "relation"]
    assert by_kind["attribute"] == {"rate": 0.6667, "chance": 0.4167, "n": 3}  # chance (1/2 + 1/2 + 1/4) / 3
    assert by_kind["attribute: shape"]["rate"] == 0.0 and by_kind["position"]["rate"] == 1.0
    assert "object_hit_by_kind" not in object_hit_metrics(hits, by_kind=False)
    with pytest.raises(ValueError, match="unknown word"):  # RefCOCO's language has no kinds
        rates_by_kind(pd.DataFrame({"text": ["man on the far left"], "hit": [True], "objects": [2]}))


# ------------------------------------------------------------------------------------------------
# the ceiling of attribute-only grounding
# ------------------------------------------------------------------------------------------------

def _three_object_scene():
    """One image, three objects: a small red square (1), a large blue square (2), a large red circle (3)."""
    scenes = {7: {1: SceneObject("square", "red", "small", 20, 20, 8),
                  2: SceneObject("square", "blue", "large", 60, 20, 12),
                  3: SceneObject("circle", "red", "large", 40, 60, 12)}}
    refs = pd.DataFrame({"ref_id": [11, 12, 13], "ann_id": [1, 2, 3], "image_id": [7, 7, 7]})
    sentences = pd.DataFrame({
        "sent_id": [1, 2, 3, 4, 5], "ref_id": [13, 11, 13, 11, 12], "image_id": 7, "split": "val",
        "text": ["the red circle",               # attribute: only object 3 is a red circle -> 1
                 "the leftmost square",          # position: two squares -> 1/2
                 "the thing below the square",   # relation: the target is 'thing', all three -> 1/3
                 "the red one on the left",      # position: two red objects -> 1/2
                 "the blue one"]})               # attribute: one blue object -> 1
    return scenes, refs, sentences


def test_the_ceiling_picks_uniformly_among_the_objects_the_attribute_part_matches():
    scenes, refs, sentences = _three_object_scene()
    hits = expected_hits(scenes, sentences, refs, "val").set_index("sent_id")
    assert hits["hit"].to_dict() == pytest.approx({1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.5, 5: 1.0})
    assert hits["matching"].to_dict() == {1: 1, 2: 2, 3: 3, 4: 2, 5: 1} and (hits["objects"] == 3).all()
    table = ceiling_table(hits.reset_index()).set_index("group")
    assert table.loc["attribute", "ceiling"] == 1.0
    assert table.loc["position", "ceiling"] == pytest.approx(0.5)
    assert table.loc["relation", "ceiling"] == pytest.approx(1 / 3)
    assert table.loc["all", "ceiling"] == pytest.approx((1 + 0.5 + 1 / 3 + 0.5 + 1) / 5)
    assert table.loc["all", "chance"] == pytest.approx(1 / 3) and table.loc["all", "n"] == 5


def test_the_ceiling_refuses_an_expression_its_own_object_does_not_match():
    scenes, refs, sentences = _three_object_scene()
    wrong = sentences.assign(ref_id=[11, 11, 13, 11, 12])  # "the red circle" said of the red square
    with pytest.raises(ValueError, match="sent_id 1 'the red circle'"):
        expected_hits(scenes, wrong, refs, "val")


def test_the_ceiling_skips_images_with_one_referred_object_as_the_object_hit_does():
    scenes, refs, sentences = _three_object_scene()
    one = refs[refs["ann_id"] == 3]
    with pytest.raises(ValueError, match="two or more referred objects"):
        expected_hits(scenes, sentences[sentences["ref_id"] == 13], one, "val")


# ------------------------------------------------------------------------------------------------
# the gaming guard
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def scene_on_disk(tmp_path):
    """Two images of three coloured blocks each, written as PNGs, with the index tables for them."""
    rng = np.random.default_rng(0)
    h, w = 40, 48
    boxes = [(slice(4, 18), slice(3, 20)), (slice(22, 38), slice(6, 22)), (slice(8, 30), slice(28, 45))]
    images, refs, sentences = [], [], []
    ref_id = sent_id = 0
    for image_id in (1, 2):
        pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for k, (rows, cols) in enumerate(boxes):
            pixels[rows, cols] = rng.integers(80, 256, 3, dtype=np.uint8)
            ref_id += 1
            refs.append(_ref_row(ref_id, image_id, _box(h, w, rows, cols)))
            for text in (f"the block {k}", f"thing number {k} here")[: 1 + (k == 1)]:
                sent_id += 1
                sentences.append({"sent_id": sent_id, "ref_id": ref_id, "image_id": image_id, "split": "val",
                                  "text": text})
        path = tmp_path / f"{image_id}.png"
        Image.fromarray(pixels).save(path)
        images.append({"image_id": image_id, "path": str(path), "height": h, "width": w})
    return pd.DataFrame(images), pd.DataFrame(refs), pd.DataFrame(sentences)


@pytest.fixture
def frozen(tiny_clip) -> FrozenClip:
    torch.manual_seed(0)
    return FrozenClip(build_clip("tiny-rn", None, tiny={**tiny_clip, "embed_dim": 16}))


def _gt_like_responses(refs: pd.DataFrame, sentences: pd.DataFrame) -> dict[int, np.ndarray]:
    """Raw responses whose soft mask sigmoid(R) is the GT mask: +30 inside, -30 outside (full size)."""
    masks = {int(r["ref_id"]): mask_utils.decode({"size": [r["mask_height"], r["mask_width"]],
                                                  "counts": r["mask_counts"]}).astype(bool)
             for r in refs.to_dict("records")}
    return {int(s.sent_id): np.where(masks[int(s.ref_id)], 30.0, -30.0).astype(np.float32)
            for s in sentences.itertuples()}


def test_maps_equal_to_the_gt_masks_rank_exactly_as_the_gt_masks(scene_on_disk, frozen):
    images, refs, sentences = scene_on_disk
    device = torch.device("cpu")
    responses = _gt_like_responses(refs, sentences)
    gt = masked_object_hits(frozen, images, refs, sentences, "val", 20, frozen.image_size, device)
    soft = masked_object_hits(frozen, images, refs, sentences, "val", 20, frozen.image_size, device,
                              responses=responses)
    assert soft.equals(gt) and len(gt) == 8
    # and for the right reason: the CLIP's inputs are the same pictures, pixel for pixel
    image = read_image_rgb(images["path"].iloc[0])
    gt_mask = mask_utils.decode({"size": [40, 48], "counts": refs["mask_counts"].iloc[1]}).astype(bool)
    soft_mask = _soft_masks(responses, [2], 40, 48, "val")[0]
    assert np.array_equal(_masked_image(image, soft_mask, frozen.image_size),
                          _masked_image(image, gt_mask, frozen.image_size))
    guard = gaming_guard(frozen, images, refs, sentences, responses, "val", 20, frozen.image_size, device)
    assert guard["soft"] == guard["gt"] == round(float(gt["hit"].mean()), 4)
    assert guard["margin"] == 0.0 and guard["n"] == 8


def test_the_guard_masks_each_object_by_step1s_maps_not_by_its_gt(scene_on_disk, frozen):
    """Maps that black out the whole image make every candidate the same black picture, so each
    expression picks the first object of its image: the soft ranking follows the maps, not the GT."""
    images, refs, sentences = scene_on_disk
    device = torch.device("cpu")
    black = {int(s): np.full((3, 3), -30.0, np.float32) for s in sentences["sent_id"]}
    soft = masked_object_hits(frozen, images, refs, sentences, "val", 20, frozen.image_size, device,
                              responses=black).set_index("sent_id")
    first_objects = refs.groupby("image_id")["ref_id"].min()
    expected = sentences.set_index("sent_id").apply(
        lambda s: s["ref_id"] == first_objects[s["image_id"]], axis=1)
    assert soft["hit"].to_dict() == expected.to_dict()


def test_a_rival_is_masked_by_the_map_of_its_first_expression(scene_on_disk, frozen):
    """Object 2 of each image has two expressions; only its first one's map masks it as a rival, so a
    garbage map for its second expression changes no other expression's ranking."""
    images, refs, sentences = scene_on_disk
    device = torch.device("cpu")
    responses = _gt_like_responses(refs, sentences)
    second = sentences.groupby("ref_id")["sent_id"].max()[sentences.groupby("ref_id").size() > 1]
    spoiled = {**responses, **{int(s): np.full((40, 48), 30.0, np.float32) for s in second}}  # whole image
    base = masked_object_hits(frozen, images, refs, sentences, "val", 20, frozen.image_size, device,
                              responses=responses).set_index("sent_id")
    other = masked_object_hits(frozen, images, refs, sentences, "val", 20, frozen.image_size, device,
                               responses=spoiled).set_index("sent_id")
    rest = [s for s in base.index if s not in set(second)]
    assert len(rest) == 6 and base.loc[rest, "hit"].equals(other.loc[rest, "hit"])


def test_the_guard_names_an_expression_without_a_map(scene_on_disk, frozen):
    images, refs, sentences = scene_on_disk
    responses = _gt_like_responses(refs, sentences)
    del responses[3]
    with pytest.raises(ValueError, match="split 'val' has no map for sent_id 3"):
        gaming_guard(frozen, images, refs, sentences, responses, "val", 20, frozen.image_size,
                     torch.device("cpu"))
