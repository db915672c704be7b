"""The web-like captioned corpus of the embedded "web CLIP": the analogue, in this synthetic world, of the
web pairs real CLIP is pretrained on.

Why: real TRIS starts from a CLIP trained on 400M web pairs, far more varied than the RIS data, and freezes
it as the scorer of Eq. 9 and Eq. 10, which show it soft-masked, mostly black pictures. A CLIP pretrained on
the RIS scenes alone never sees such pictures, cannot learn position words (every scene has a left and a
right object) and sees shape only weakly (colour separates most batch pairs first). This corpus is drawn
from the same world (shapes, colours, sizes, backgrounds, expression language) from a seed stream of its
own; it never reads a RIS image, mask or box, and never a val/test file. Each *group* is one fresh scene:

- the whole picture, one caption per object (the generator's own expressions: attribute, position and
  relation wordings that single the object out);
- each object revealed alone, the way Eq. 9 reveals it: a hard mask, or a coarse grid of logits
  (bilinear up-sampling, sigmoid) with background leakage and sometimes only part of the object;
  captioned by what is visible (its attributes, and its placement in the frame when that is clear);
- sometimes two objects revealed together, captioned by what singles one out between them;
- one or two isolated objects anywhere in the frame, on a textured or a black background.

A caption is a positive of *every* picture of the batch it is true of (:func:`caption_true`, the
generator's resolver), so the objects of one scene are each other's hard negatives and "the red circle"
is not pushed away from another picture's red circle. A share ``noise`` of pictures carries a caption of
another picture instead (the web is noisy); the corpus is still cleaner than the web.

Where a picture shows one object, position words are read in the frame ("the circle on the left" = a
circle in the left 40 %); where it shows several, as the RIS expressions read them (relative to the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.rle import decode_rle
from pipeline.data.samples import stretch_resize
from pipeline.data.synthetic.expressions import (
    Desc,
    Expr,
    anchor_desc,
    candidate_expressions,
    clean_sentence,
    render_expression,
    resolve,
)
from pipeline.data.synthetic.scene import COLOURS, SHAPES, SIZES, SceneObject, paint, place_objects

WEB_STREAM = 11  # seed stream of the web corpus (synthesize: 2, the RIS-scene caption corpus: 7)
PLACEMENT_MARGIN = 0.4  # "on the left" = centre in the left 40 % of the frame; "in the middle" = 40-60 %
_ATTRS = ("size", "colour", "shape")


@dataclass
class WebPicture:
    """One corpus picture: ``pixels`` at the corpus size, the objects it shows (``visible``, in the
    coordinates of a ``height x width`` frame), its captions (meanings and their texts) and its group."""

    pixels: np.ndarray
    visible: list[SceneObject]
    height: int
    width: int
    group: int
    captions: list[Expr] = field(default_factory=list)


def placements(obj: SceneObject, height: int, width: int) -> list[str]:
    """Where ``obj`` clearly sits in the frame (``left``/``right``/``top``/``bottom``/``middle``)."""
    x, y = obj.cx / width, obj.cy / height
    found = []
    if x < PLACEMENT_MARGIN:
        found.append("left")
    if x > 1 - PLACEMENT_MARGIN:
        found.append("right")
    if y < PLACEMENT_MARGIN:
        found.append("top")
    if y > 1 - PLACEMENT_MARGIN:
        found.append("bottom")
    if PLACEMENT_MARGIN <= x <= 1 - PLACEMENT_MARGIN:
        found.append("middle")
    return found


def caption_true(expr: Expr, picture: WebPicture) -> bool:
    """Whether caption ``expr`` is true of ``picture``: with one visible object, its attributes match and
    any position word holds in the frame (no relation can hold: the anchor is not there); with several,
    the generator's resolver singles out one of them."""
    if len(picture.visible) == 1:
        obj = picture.visible[0]
        if expr.relation is not None or not expr.target.matches(obj):
            return False
        return expr.position is None or expr.position in placements(obj, picture.height, picture.width)
    if not picture.visible:
        return False
    return resolve(expr, picture.visible) is not None


def _random_desc(obj: SceneObject, rng: np.random.Generator) -> Desc:
    """A non-empty random subset of ``obj``'s attributes (shape named more often than not)."""
    while True:
        keep = {a: getattr(obj, a) for a in _ATTRS if rng.random() < (0.7 if a == "shape" else 0.5)}
        if keep:
            return Desc(**keep)


def alone_caption(obj: SceneObject, height: int, width: int, rng: np.random.Generator,
                  colour_only: bool = False, placement_rate: float = 0.5) -> Expr:
    """A caption of ``obj`` shown alone: some of its attributes, and (a ``placement_rate`` share of the
    time) its placement in the frame when that is clear."""
    desc = Desc(colour=obj.colour) if colour_only else _random_desc(obj, rng)
    where = placements(obj, height, width)
    if where and rng.random() < placement_rate:
        return Expr(desc, position=where[int(rng.integers(len(where)))])
    return Expr(desc)


def soft_reveal(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An Eq. 9-like soft mask ``(H, W)`` in [0, 1] revealing the union of ``masks`` ``(k, H, W)``: the
    union's area share on a coarse grid (5-8 cells a side), mapped to logits with noise, background
    leakage and sometimes a shifted grid (part of the object), up-sampled bilinearly, then a sigmoid."""
    union = masks.any(axis=0).astype(np.float32)
    h, w = union.shape
    grid = int(rng.integers(5, 9))
    share = F.adaptive_avg_pool2d(torch.from_numpy(union)[None, None], grid)[0, 0].numpy()
    if rng.random() < 0.25:  # a grid off by a cell: the map covers the object only in part
        share = np.roll(share, shift=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    background, foreground = rng.uniform(-6.0, -1.5), rng.uniform(2.0, 6.0)
    logits = background + (foreground - background) * np.sqrt(share) + rng.normal(0, 0.5, share.shape)
    up = F.interpolate(torch.from_numpy(logits.astype(np.float32))[None, None], size=(h, w),
                       mode="bilinear", align_corners=False)[0, 0]
    return torch.sigmoid(up).numpy()


def _visible_objects(objs: list[SceneObject], masks: np.ndarray,
                     reveal: np.ndarray) -> tuple[list[int], list[int]]:
    """Objects mostly shown (mean reveal >= 0.6) and objects partly shown (0.25-0.6)."""
    shown = [float(reveal[m].mean()) if m.any() else 0.0 for m in masks]
    return ([k for k, v in enumerate(shown) if v >= 0.6],
            [k for k, v in enumerate(shown) if 0.25 <= v < 0.6])


def scene_group(rng: np.random.Generator, group: int, *, size: int, image_side: tuple[int, int],
                objects_per_image: tuple[int, int], object_scale: tuple[float, float],
                distractor_rate: float, two_object_rate: float, isolated: tuple[int, int],
                placement_rate: float = 0.5, shared_colour: bool = False) -> list[WebPicture]:
    """The pictures of one group (see the module docstring), all at ``size`` x ``size``.

    ``shared_colour``: the group's isolated objects share one colour, so that only their shapes (and
    sizes, places) tell their captions apart: shape hard negatives."""
    while True:
        height = int(rng.integers(image_side[0], image_side[1] + 1))
        width = int(rng.integers(image_side[0], image_side[1] + 1))
        n = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
        objs = place_objects(rng, n, height, width, object_scale, distractor_rate)
        if objs is not None:
            break
    pixels, rles = paint(rng, height, width, objs)
    masks = np.stack([decode_rle(r) for r in rles])
    pictures: list[WebPicture] = []

    anchors = [anchor_desc(k, objs, rng) for k in range(len(objs))]
    whole = WebPicture(stretch_resize(pixels, size), list(objs), height, width, group)
    for t in range(len(objs)):
        found = [e for family in candidate_expressions(t, objs, anchors).values() for e in family]
        if found:
            whole.captions.append(found[int(rng.integers(len(found)))])
    pictures.append(whole)

    reveals = [[k] for k in range(len(objs))]
    if len(objs) >= 2 and rng.random() < two_object_rate:
        reveals.append([int(k) for k in rng.choice(len(objs), 2, replace=False)])
    for chosen in reveals:
        if len(chosen) == 1 and rng.random() < 1 / 3:
            reveal = masks[chosen[0]].astype(np.float32)
        else:
            reveal = soft_reveal(masks[chosen], rng)
        shown, partial = _visible_objects(objs, masks, reveal)
        masked = np.rint(pixels * reveal[..., None]).astype(np.uint8)
        picture = WebPicture(stretch_resize(masked, size), [objs[k] for k in shown], height, width, group)
        if len(shown) == 1 and not partial:
            picture.captions.append(alone_caption(objs[shown[0]], height, width, rng,
                                                  placement_rate=placement_rate))
        elif not shown and len(partial) == 1:  # a fragment: its colour is all that is sure
            picture.visible = [objs[partial[0]]]
            picture.captions.append(alone_caption(objs[partial[0]], height, width, rng, colour_only=True))
        elif len(shown) >= 2 and not partial:
            sub = picture.visible
            sub_anchors = [anchor_desc(k, sub, rng) for k in range(len(sub))]
            t = int(rng.integers(len(sub)))
            found = [e for family in candidate_expressions(t, sub, sub_anchors).values() for e in family]
            if found:
                picture.captions.append(found[int(rng.integers(len(found)))])
        if picture.captions:
            pictures.append(picture)

    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))] if shared_colour else None
    for _ in range(int(rng.integers(isolated[0], isolated[1] + 1))):
        pictures.append(isolated_picture(rng, group, size=size, image_side=image_side,
                                         object_scale=object_scale, colour=colour,
                                         placement_rate=placement_rate))
    return pictures


def isolated_picture(rng: np.random.Generator, group: int, *, size: int, image_side: tuple[int, int],
                     object_scale: tuple[float, float], colour: str | None = None,
                     placement_rate: float = 0.5) -> WebPicture:
    """One object of random attributes (``colour`` if given) anywhere in the frame, on a textured or a
    black background."""
    height = int(rng.integers(image_side[0], image_side[1] + 1))
    width = int(rng.integers(image_side[0], image_side[1] + 1))
    shape, drawn = SHAPES[int(rng.integers(len(SHAPES)))], list(COLOURS)[int(rng.integers(len(COLOURS)))]
    colour = colour or drawn  # drawn either way: the stream stays the same with and without ``colour``
    size_class = SIZES[int(rng.integers(2))]
    frac = rng.uniform(0.6, 1.0) if size_class == "large" else rng.uniform(0.0, 0.4)
    lo, hi = object_scale
    radius = (lo + frac * (hi - lo)) * min(height, width) / 2
    cx = rng.uniform(radius + 3, width - radius - 3)
    cy = rng.uniform(radius + 3, height - radius - 3)
    rotation = 0.0 if shape == "circle" else float(np.deg2rad(rng.uniform(-10, 10)))
    obj = SceneObject(shape, colour, size_class, round(float(cx), 2), round(float(cy), 2),
                      round(float(radius), 2), round(rotation, 4))
    pixels, rles = paint(rng, height, width, [obj])
    if rng.random() < 0.5:
        pixels = pixels * decode_rle(rles[0])[..., None]
    picture = WebPicture(stretch_resize(pixels, size), [obj], height, width, group)
    picture.captions.append(alone_caption(obj, height, width, rng, placement_rate=placement_rate))
    return picture


def web_corpus(groups: int, *, size: int, seed: int, image_side: tuple[int, int],
               objects_per_image: tuple[int, int], object_scale: tuple[float, float], distractor_rate: float,
               two_object_rate: float = 0.5, isolated: tuple[int, int] = (1, 2), placement_rate: float = 0.5,
               shared_colour: bool = False) -> list[list[WebPicture]]:
    """``groups`` groups of pictures; group ``g`` is a pure function of ``(seed, WEB_STREAM, g)``."""
    return [scene_group(np.random.default_rng([seed, WEB_STREAM, g]), g, size=size, image_side=image_side,
                        objects_per_image=objects_per_image, object_scale=object_scale,
                        distractor_rate=distractor_rate, two_object_rate=two_object_rate, isolated=isolated,
                        placement_rate=placement_rate, shared_colour=shared_colour)
            for g in range(groups)]


def caption_text(expr: Expr, rng: np.random.Generator) -> str:
    """One wording of ``expr`` in the RIS expressions' own words (same synonyms and templates)."""
    return clean_sentence(render_expression(expr, rng))


def positives(pictures: list[WebPicture], meanings: list[Expr]) -> np.ndarray:
    """``(pictures, meanings)`` truth table of :func:`caption_true`."""
    return np.array([[caption_true(m, p) for m in meanings] for p in pictures], dtype=bool)


def mean_objects(groups: list[list[WebPicture]]) -> float:
    """Mean number of visible objects per picture (a manifest figure)."""
    counts = [len(p.visible) for g in groups for p in g]
    return round(float(np.mean(counts)), 3) if counts else math.nan

