"""A captioned-picture corpus for pretraining the embedded CLIP, kept apart from the RIS images.

Why: real CLIP learned from web pairs, many of them pictures of one object, so it gives a meaningful score
to a picture in which only one object is visible: exactly the masked image ``I * up(R^p)`` that
calibration (Eq. 8-9) and PRMS (Eq. 10) show it. A CLIP pretrained only on the RIS train images (three to
five objects, every expression paired with the whole scene) never saw such a picture. This corpus draws
fresh scenes from the same synthetic world (same shapes, colours, backgrounds and expression language),
from a seed stream of its own, with one to a few objects each; every object's expressions caption the
whole picture. Nothing here reads a RIS image, mask or box: the pictures are generated, not cut out.

The pictures live in memory at the CLIP's input size (a few thousand 128 px images are ~100 MB).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch

from pipeline.data.rle import decode_rle
from pipeline.data.samples import ImageBank, stretch_resize
from pipeline.data.synthetic.expressions import (
    candidate_expressions,
    choose_expressions,
    clean_sentence,
    render_expression,
)
from pipeline.data.synthetic.refer_writer import sample_scene
from pipeline.data.synthetic.scene import paint, place_objects
from pipeline.params import FrozenPretrainParams, PretrainClipParams, SynthesizeParams

CORPUS_STREAM = 7  # seed stream of the caption corpus (synthesize uses stream 2 for the RIS images)


def _as_picture(pixels: np.ndarray, size: int) -> torch.Tensor:
    """Painted ``(H, W, 3)`` pixels stretched as ImageBank does, as a ``(3, size, size)`` uint8 tensor."""
    return torch.from_numpy(stretch_resize(pixels, size)).permute(2, 0, 1).contiguous()


def caption_corpus(num_images: int, *, objects_per_image: tuple[int, int], image_side: tuple[int, int],
                   object_scale: tuple[float, float], expressions_per_object: tuple[int, int],
                   distractor_rate: float, family_weights: dict[str, float], size: int,
                   seed: int) -> tuple[pd.DataFrame, dict[int, torch.Tensor]]:
    """``num_images`` captioned pictures: a sentences table (``image_id``, ``text``) and the pictures as
    ``(3, size, size)`` uint8 tensors keyed by negative image ids (never an index image id)."""
    rows: list[dict] = []
    pictures: dict[int, torch.Tensor] = {}
    for k in range(1, num_images + 1):
        rng = np.random.default_rng([seed, CORPUS_STREAM, k])
        scene, _ = sample_scene(rng, image_side, objects_per_image, object_scale, expressions_per_object,
                               distractor_rate, family_weights)
        pixels, _ = paint(rng, scene.height, scene.width, scene.objects)
        image_id = -k
        pictures[image_id] = _as_picture(pixels, size)
        for exprs in scene.expressions:
            rows += [{"image_id": image_id, "text": clean_sentence(render_expression(e, rng))} for e in exprs]
    return pd.DataFrame(rows, columns=["image_id", "text"]), pictures


class CorpusBank:
    """The ``ImageBank`` interface over in-memory pictures plus (optionally) an index ``ImageBank``:
    negative ids are corpus pictures, the others index images."""

    def __init__(self, pictures: dict[int, torch.Tensor], index_bank: ImageBank | None = None) -> None:
        self.pictures = pictures
        self.index_bank = index_bank

    def preload(self, image_ids: Iterable[int]) -> None:
        if self.index_bank is not None:
            self.index_bank.preload(i for i in image_ids if int(i) >= 0)

    def batch(self, image_ids: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, 3, size, size)`` float batch in [0, 1] on ``device``."""
        ids = [int(i) for i in image_ids]
        raw = torch.stack([self.pictures[i] if i < 0 else self.index_bank.get(i) for i in ids])
        return ImageBank.to_device(raw, device)


def pretraining_corpus(train: pd.DataFrame, p: PretrainClipParams, world: SynthesizeParams,
                       index_bank: ImageBank, *, size: int, seed: int) -> tuple[pd.DataFrame, CorpusBank]:
    """(image_id, text) pairs the embedded CLIP learns from, and the bank that serves their pictures:
    the RIS ``train`` sentences (``p.ris_images``) and/or ``p.caption_images`` captioned pictures of the
    synthetic world that ``world`` describes (the synthesize section: same shapes, sizes, layout rules)."""
    parts, pictures = [], {}
    if p.ris_images:
        parts.append(train[["image_id", "text"]])
    if p.caption_images:
        scene = {"image_side": world.image_side, "object_scale": world.object_scale,
                 "expressions_per_object": world.expressions_per_object,
                 "distractor_rate": world.distractor_rate,
                 "family_weights": world.family_weights.model_dump()}
        captions, pictures = caption_corpus(p.caption_images, objects_per_image=tuple(p.caption_objects),
                                            size=size, seed=seed, **scene)
        parts.append(captions)
    if not parts:
        raise ValueError("pretrain_clip.ris_images is false and pretrain_clip.caption_images is 0: "
                         "CLIP would have no pretraining pairs")
    return pd.concat(parts, ignore_index=True), CorpusBank(pictures, index_bank)


CUTOUT_STREAMS = {"isolated": 9, "scene": 11}  # seed streams of the two cutout kinds


def _cutout(pixels: np.ndarray, rle: dict, size: int) -> torch.Tensor:
    """One painted object alone on black, as a ``(3, size, size)`` uint8 tensor."""
    return _as_picture(pixels * decode_rle(rle)[..., None], size)


def isolated_cutouts(num_pictures: int, *, image_side: tuple[int, int], object_scale: tuple[float, float],
                     expressions_per_object: tuple[int, int], size: int,
                     seed: int) -> tuple[pd.DataFrame, dict[int, torch.Tensor]]:
    """Pictures of ONE object on black, captioned by descriptions of its attributes ("the small red
    square", "the red one", "disc"): the stock-photo side of a web corpus. Image ids ``-1 .. -n``."""
    rows: list[dict] = []
    pictures: dict[int, torch.Tensor] = {}
    for k in range(1, num_pictures + 1):
        rng = np.random.default_rng([seed, CUTOUT_STREAMS["isolated"], k])
        width, height = (int(rng.integers(image_side[0], image_side[1] + 1)) for _ in range(2))
        objects = place_objects(rng, 1, height, width, object_scale, 0.0)
        pixels, rles = paint(rng, height, width, objects)
        pictures[-k] = _cutout(pixels, rles[0], size)
        found = candidate_expressions(0, objects, [None])  # one object: every attribute subset is unique
        count = int(rng.integers(expressions_per_object[0], expressions_per_object[1] + 1))
        rows += [{"image_id": -k, "text": clean_sentence(render_expression(e, rng))}
                 for e in choose_expressions(found, max(count, 1), rng)]
    return pd.DataFrame(rows, columns=["image_id", "text"]), pictures


def scene_cutouts(num_pictures: int, *, objects_per_image: tuple[int, int], image_side: tuple[int, int],
                  object_scale: tuple[float, float], expressions_per_object: tuple[int, int],
                  distractor_rate: float, family_weights: dict[str, float], size: int,
                  seed: int) -> tuple[pd.DataFrame, dict[int, torch.Tensor]]:
    """Objects of freshly drawn scenes, each shown alone on black (at its place in the frame) and
    captioned by the expressions that single it out in its scene, position and relation ones included.
    A scorer trained on them learns what a referred object looks like once its context is gone, which
    is what Eq. 9 and Eq. 10 ask. Image ids ``-1 .. -n``."""
    rows: list[dict] = []
    pictures: dict[int, torch.Tensor] = {}
    k, scene_no = 0, 0
    while k < num_pictures:
        scene_no += 1
        rng = np.random.default_rng([seed, CUTOUT_STREAMS["scene"], scene_no])
        scene, _ = sample_scene(rng, image_side, objects_per_image, object_scale, expressions_per_object,
                               distractor_rate, family_weights)
        pixels, rles = paint(rng, scene.height, scene.width, scene.objects)
        for rle, exprs in zip(rles, scene.expressions, strict=True):
            if k == num_pictures:
                break
            k += 1
            pictures[-k] = _cutout(pixels, rle, size)
            rows += [{"image_id": -k, "text": clean_sentence(render_expression(e, rng))} for e in exprs]
    return pd.DataFrame(rows, columns=["image_id", "text"]), pictures


def cutout_corpus(p: FrozenPretrainParams, world: SynthesizeParams, *,
                  seed: int) -> tuple[pd.DataFrame, CorpusBank]:
    """The corpus of the embedded frozen CLIP (``pretrain_clip.frozen``): ``p.pictures`` cutouts of each
    kind in ``p.kinds``, at ``p.image_size``. Generated pictures only: no RIS image, mask or box is read."""
    common = {"image_side": tuple(world.image_side), "object_scale": tuple(world.object_scale),
              "expressions_per_object": tuple(world.expressions_per_object), "size": p.image_size,
              "seed": seed}
    parts, pictures = [], {}
    for kind in p.kinds:
        if kind == "isolated":
            rows, pics = isolated_cutouts(p.pictures, **common)
        else:
            scene = {"objects_per_image": tuple(world.objects_per_image),
                     "distractor_rate": world.distractor_rate,
                     "family_weights": world.family_weights.model_dump()}
            rows, pics = scene_cutouts(p.pictures, **scene, **common)
        offset = -len(pictures)  # keep the ids of the kinds apart: -1..-n, then -(n+1)..
        parts.append(rows.assign(image_id=rows["image_id"] + offset))
        pictures.update({i + offset: v for i, v in pics.items()})
    return pd.concat(parts, ignore_index=True), CorpusBank(pictures)
