"""The CLIP pretraining corpus of captioned pictures: drawn from the synthetic world, never from the
RIS images, deterministic, and served through the ImageBank interface."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.captions import (
    CorpusBank,
    caption_corpus,
    cutout_corpus,
    isolated_cutouts,
    pretraining_corpus,
    scene_cutouts,
)

WORLD = dict(image_side=(96, 120), object_scale=(0.25, 0.4), expressions_per_object=(1, 2),
             distractor_rate=0.5, family_weights={"attribute": 0.5, "position": 0.3, "relation": 0.2})


def test_corpus_is_deterministic_and_keyed_apart_from_index_images():
    a_rows, a_pics = caption_corpus(6, objects_per_image=(1, 2), size=32, seed=0, **WORLD)
    b_rows, b_pics = caption_corpus(6, objects_per_image=(1, 2), size=32, seed=0, **WORLD)
    pd.testing.assert_frame_equal(a_rows, b_rows)
    assert all(torch.equal(a_pics[k], b_pics[k]) for k in a_pics)
    assert sorted(a_pics) == list(range(-6, 0))  # negative ids never collide with an index image
    assert set(a_rows["image_id"]) == set(a_pics)
    assert all(p.shape == (3, 32, 32) and p.dtype == torch.uint8 for p in a_pics.values())
    assert a_rows["text"].str.len().gt(0).all()
    other, _ = caption_corpus(6, objects_per_image=(1, 2), size=32, seed=1, **WORLD)
    assert not other.equals(a_rows)


def test_single_object_pictures_are_captioned_by_attributes_only():
    rows, _ = caption_corpus(5, objects_per_image=(1, 1), size=32, seed=0, **WORLD)
    relational = ("left of", "right of", "above", "below", "under", "next to", "beside", "near")
    assert not any(any(w in t for w in relational) for t in rows["text"])


class _Bank:
    def __init__(self):
        self.preloaded: list[int] = []

    def preload(self, ids):
        self.preloaded += list(ids)

    def get(self, image_id):
        return torch.full((3, 32, 32), image_id, dtype=torch.uint8)


def test_corpus_bank_serves_pictures_and_index_images():
    _, pictures = caption_corpus(2, objects_per_image=(1, 1), size=32, seed=0, **WORLD)
    index_bank = _Bank()
    bank = CorpusBank(pictures, index_bank)
    bank.preload([-1, 7, -2, 9])
    assert index_bank.preloaded == [7, 9]
    batch = bank.batch([-2, 7])
    assert batch.shape == (2, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(batch[0], pictures[-2].float() / 255)
    assert torch.allclose(batch[1], torch.full((3, 32, 32), 7 / 255))


def test_pretraining_corpus_combines_or_refuses(default_params):
    train = pd.DataFrame({"image_id": [1, 1, 2], "text": ["a", "b", "c"], "sent_id": [1, 2, 3]})
    world = default_params.synthesize.model_copy(update={"image_side": (96, 120)})
    p = default_params.pretrain_clip
    pairs, _ = pretraining_corpus(train, p.model_copy(update={"caption_images": 3}), world, _Bank(),
                                  size=32, seed=0)
    assert list(pairs.columns) == ["image_id", "text"]
    assert (pairs["image_id"] > 0).sum() == 3 and (pairs["image_id"] < 0).any()
    only_ris, _ = pretraining_corpus(train, p.model_copy(update={"caption_images": 0}), world, _Bank(),
                                     size=32, seed=0)
    assert np.array_equal(only_ris["image_id"], [1, 1, 2])
    with pytest.raises(ValueError, match="ris_images"):
        pretraining_corpus(train, p.model_copy(update={"caption_images": 0, "ris_images": False}), world,
                           _Bank(), size=32, seed=0)


def test_cutouts_show_one_object_on_black_and_never_mix_kinds(default_params):
    world = default_params.synthesize.model_copy(update={"image_side": (96, 120)})
    fp = default_params.pretrain_clip.frozen.model_copy(
        update={"kinds": ["isolated", "scene"], "pictures": 4, "image_size": 32})
    rows, bank = cutout_corpus(fp, world, seed=0)
    assert sorted(bank.pictures) == list(range(-8, 0))  # 4 of each kind, ids kept apart
    assert set(rows["image_id"]) == set(bank.pictures)
    for picture in bank.pictures.values():
        dark = (picture.max(dim=0).values < 8).float().mean()
        assert 0.4 < dark < 0.99  # mostly black ground around one painted object (no textured background)
    isolated = rows[rows["image_id"] >= -4]["text"]
    relational = ("left of", "right of", "above", "below", "under", "next to", "beside", "near", "left",
                  "right", "top", "bottom", "middle")
    assert not any(any(w in t.split() or w in t for w in relational) for t in isolated)
    again, bank2 = cutout_corpus(fp, world, seed=0)
    pd.testing.assert_frame_equal(rows, again)
    assert all(torch.equal(bank.pictures[k], bank2.pictures[k]) for k in bank.pictures)


def test_scene_cutouts_keep_the_scene_expressions():
    rows, pictures = scene_cutouts(6, objects_per_image=(3, 4), size=32, seed=0, **WORLD)
    assert len(pictures) == 6 and set(rows["image_id"]) == set(pictures)
    isolated, _ = isolated_cutouts(6, image_side=WORLD["image_side"], object_scale=WORLD["object_scale"],
                                   expressions_per_object=(1, 2), size=32, seed=0)
    assert not rows["text"].equals(isolated["text"])
