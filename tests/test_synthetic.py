"""The synthetic REFER-layout generator: RefCOCO file shapes, unique referents, determinism, chance rates."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_erosion

from pipeline.data.images import read_image_rgb
from pipeline.data.rle import decode_rle
from pipeline.data.synthetic import (
    COLOURS,
    SHAPES,
    Desc,
    Expr,
    SceneObject,
    clean_sentence,
    generate_synthetic_refer,
    parse_expression,
    render_expression,
    resolve,
)

SETTINGS = dict(dataset="synthetic", split_by="unc", objects_per_image=(3, 5), image_side=(176, 240),
                expressions_per_object=(1, 3), object_scale=(0.10, 0.19), distractor_rate=0.5,
                split_fractions={"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1}, jpeg_quality=92)
REF_KEYS = {"ref_id", "ann_id", "image_id", "split", "sentences", "sent_ids", "category_id", "file_name"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    summary = generate_synthetic_refer(root, num_images=60, seed=3, **SETTINGS)
    return root, summary


def _load(root: Path) -> tuple[list[dict], dict, dict]:
    with (root / "synthetic" / "refs(unc).p").open("rb") as fh:
        refs = pickle.load(fh)
    instances = json.loads((root / "synthetic" / "instances.json").read_text())
    scenes = json.loads((root / "synthetic" / "scenes.json").read_text())
    return refs, instances, scenes


def test_files_have_refcoco_shapes(synth):
    root, summary = synth
    refs, instances, _ = _load(root)
    assert isinstance(refs, list) and len(refs) == summary["refs"]
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    assert [c["name"] for c in instances["categories"]] == list(SHAPES)
    all_sent_ids = []
    for ref in refs:
        assert set(ref) == REF_KEYS
        assert all(isinstance(ref[k], int) for k in ("ref_id", "ann_id", "image_id", "category_id"))
        assert ref["split"] in SETTINGS["split_fractions"]
        assert ref["file_name"] == f"synth_{ref['image_id']:06d}_{ref['ann_id']}.jpg"
        assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
        for s in ref["sentences"]:
            assert set(s) == {"raw", "sent", "tokens", "sent_id"}
            assert s["sent"] == clean_sentence(s["raw"]) == s["sent"].lower()
            assert s["tokens"] == s["sent"].split() and s["tokens"]
        all_sent_ids += ref["sent_ids"]
        ann = anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4 and ann["area"] > 0
        assert isinstance(ann["segmentation"], list) and len(ann["segmentation"][0]) >= 6
    assert len(set(all_sent_ids)) == len(all_sent_ids) == summary["sentences"]
    assert len({r["ref_id"] for r in refs}) == len(refs)
    for image_id in (1, 30, 60):
        im = images[image_id]
        pixels = read_image_rgb(root / "images" / im["file_name"])
        assert pixels.shape == (im["height"], im["width"], 3)
        assert 176 <= im["height"] <= 240 and 176 <= im["width"] <= 240


def test_every_expression_refers_to_exactly_its_object(synth):
    root, _ = synth
    refs, _, scenes = _load(root)
    objects = {s["image_id"]: s["objects"] for s in scenes["images"]}
    families = set()
    for ref in refs:
        rows = objects[ref["image_id"]]
        objs = [SceneObject(**{k: v for k, v in o.items() if k != "ann_id"}) for o in rows]
        target = [o["ann_id"] for o in rows].index(ref["ann_id"])
        for s in ref["sentences"]:
            expr = parse_expression(s["raw"])
            assert resolve(expr, objs) == target, s["raw"]
            families.add(expr.family)
    assert families == {"attribute", "position", "relation"}


def test_several_objects_and_expressions(synth):
    root, summary = synth
    refs, _, _ = _load(root)
    per_image: dict[int, int] = {}
    for ref in refs:
        per_image[ref["image_id"]] = per_image.get(ref["image_id"], 0) + 1
        assert 1 <= len(ref["sentences"]) <= 3
        assert len({s["sent"] for s in ref["sentences"]}) == len(ref["sentences"])
    assert len(per_image) == 60 and min(per_image.values()) >= 3 and max(per_image.values()) <= 5
    assert sum(len(r["sentences"]) >= 2 for r in refs) > len(refs) // 3
    assert summary["scene_retries"] >= 0 and summary["objects_per_image_mean"] > 3


def test_chance_rates_are_low_and_honest(synth):
    root, summary = synth
    refs, instances, _ = _load(root)
    assert summary["chance_random_point"] < 0.15 and summary["chance_centre_point"] < 0.15
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    rates, centre = [], []
    for ref in refs:
        im, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        polygons = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
        mask = decode_rle(mask_utils.merge(polygons))
        rates += [mask.mean()] * len(ref["sentences"])
        centre += [mask[im["height"] // 2, im["width"] // 2]] * len(ref["sentences"])
    assert summary["chance_random_point"] == pytest.approx(np.mean(rates), abs=1e-4)
    assert summary["chance_centre_point"] == pytest.approx(np.mean(centre), abs=1e-4)


def test_pixels_match_masks_and_background_is_textured(synth):
    root, _ = synth
    _, instances, scenes = _load(root)
    colour_of = {o["ann_id"]: o["colour"] for s in scenes["images"] for o in s["objects"]}
    for im in instances["images"][:6]:
        pixels = read_image_rgb(root / "images" / im["file_name"]).astype(float)
        union = np.zeros((im["height"], im["width"]), bool)
        for ann in (a for a in instances["annotations"] if a["image_id"] == im["id"]):
            mask = decode_rle(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], im["height"],
                                                                      im["width"])))
            union |= mask
            inner = binary_erosion(mask, iterations=2)
            mean = pixels[inner].mean(axis=0)
            assert np.abs(mean - np.array(COLOURS[colour_of[ann["id"]]])).max() < 30
        background = pixels[~union]
        assert background.std(axis=0).min() > 4  # not a flat colour


def test_generation_is_deterministic(tmp_path):
    small = dict(SETTINGS, num_images=6)
    a = generate_synthetic_refer(tmp_path / "a", seed=11, **small)
    b = generate_synthetic_refer(tmp_path / "b", seed=11, **small)
    c = generate_synthetic_refer(tmp_path / "c", seed=12, **small)
    assert a == b
    pickle_bytes = [(tmp_path / d / "synthetic" / "refs(unc).p").read_bytes() for d in "abc"]
    assert pickle_bytes[0] == pickle_bytes[1] != pickle_bytes[2]
    for name in ("synthetic/instances.json", "images/synth_000004.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert c != a


def test_split_fractions_by_image(synth):
    root, summary = synth
    refs, _, _ = _load(root)
    assert {k: v["images"] for k, v in summary["per_split"].items()} == {"train": 42, "val": 6, "testA": 6,
                                                                       "testB": 6}
    split_of: dict[int, str] = {}
    for ref in refs:
        assert split_of.setdefault(ref["image_id"], ref["split"]) == ref["split"]


# A hand-made scene: big red circle (left), small red circle (middle), big blue square close to it (right).
SCENE = [SceneObject("circle", "red", "large", 30, 50, 10), SceneObject("circle", "red", "small", 100, 50, 6),
         SceneObject("square", "blue", "large", 122, 50, 10)]


@pytest.mark.parametrize("text, expected", [
    ("the red circle", None),               # two red circles
    ("the big red circle", 0),
    ("the red circle on the left", 0),
    ("rightmost red circle", 1),
    ("the blue one", 2),
    ("the middle one", 1),
    ("the circle left of the blue square", None),  # both circles are left of it
    ("the circle next to the blue square", 1),     # gap 6 px < half the summed radii
    ("the thing above the blue square", None),     # nothing is above it
    ("the circle next to the red circle", None),   # anchor is ambiguous
])
def test_resolve_on_a_known_scene(text, expected):
    assert resolve(parse_expression(text), SCENE) == expected


def test_superlative_needs_a_clear_margin():
    close = [SceneObject("circle", "red", "large", 50, 50, 10),
             SceneObject("circle", "blue", "large", 53, 90, 10)]
    assert resolve(parse_expression("the left circle"), close) is None
    assert resolve(parse_expression("the top circle"), close) == 0


def test_render_and_parse_are_inverse():
    rng = np.random.default_rng(0)
    exprs = [Expr(Desc("small", "red", "star")), Expr(Desc(None, "green", None)),
             Expr(Desc(None, None, "cross"), position="left"), Expr(Desc(), position="middle"),
             Expr(Desc("large", None, None), position="bottom"),
             Expr(Desc(None, None, "circle"), relation="next_to", anchor=Desc(None, "blue", "square")),
             Expr(Desc(), relation="left", anchor=Desc("small", None, None)),
             Expr(Desc(None, "white", None), relation="below", anchor=Desc(None, None, "hexagon"))]
    for _ in range(20):
        for expr in exprs:
            assert parse_expression(render_expression(expr, rng)) == expr
    with pytest.raises(ValueError, match="gigantic"):
        parse_expression("the gigantic circle")
