"""The embedded web CLIP: its corpus's truth rule, its loss, and the shipped weights' format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.synthetic.expressions import Desc, Expr
from pipeline.data.synthetic.scene import SceneObject
from pipeline.data.web_corpus import WebPicture, caption_true, placements, soft_reveal, web_corpus
from pipeline.train.web_clip import (
    MANIFEST_FILE,
    WebClipRecipe,
    WebCorpusBatches,
    truth_table_clip_loss,
    write_web_clip,
)

RED_CIRCLE_LEFT = SceneObject("circle", "red", "large", cx=30, cy=100, radius=20)
BLUE_SQUARE_RIGHT = SceneObject("square", "blue", "small", cx=170, cy=100, radius=12)
RED_STAR_RIGHT = SceneObject("star", "red", "small", cx=170, cy=40, radius=12)


def picture(*objs: SceneObject) -> WebPicture:
    return WebPicture(np.zeros((8, 8, 3), np.uint8), list(objs), height=200, width=200, group=0)


def test_position_words_read_in_the_frame_when_one_object_is_shown():
    alone = picture(RED_CIRCLE_LEFT)
    assert "left" in placements(RED_CIRCLE_LEFT, 200, 200)
    assert caption_true(Expr(Desc(shape="circle"), position="left"), alone)
    assert not caption_true(Expr(Desc(shape="circle"), position="right"), alone)
    assert not caption_true(Expr(Desc(colour="blue")), alone)
    # a relation cannot hold of a picture whose anchor is hidden
    assert not caption_true(Expr(Desc(shape="circle"), relation="left", anchor=Desc(shape="square")), alone)


def test_several_objects_follow_the_generators_resolver():
    scene = picture(RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT, RED_STAR_RIGHT)
    assert caption_true(Expr(Desc(shape="circle")), scene)
    assert not caption_true(Expr(Desc(colour="red")), scene)  # two red objects: ambiguous
    assert caption_true(Expr(Desc(colour="red"), position="left"), scene)
    assert caption_true(Expr(Desc(), relation="left", anchor=Desc(shape="square")), scene)


def test_the_truth_table_loss_is_clips_loss_on_a_diagonal_and_spares_shared_captions():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=1)
    txt = F.normalize(torch.randn(4, 8), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert torch.allclose(truth_table_clip_loss(img, txt, torch.eye(4, dtype=torch.bool), scale), clip)
    # a caption true of pictures 0 and 1: the loss pulls picture 1 towards it, where CLIP's pushes it away
    def pull_on_picture_1(table: torch.Tensor) -> float:
        """d loss / d logit(picture 1, text 0) at random logits (pictures as the unit basis): < 0 pulls."""
        texts = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        truth_table_clip_loss(torch.eye(4), texts, table, torch.tensor(1.0)).backward()
        return float(texts.grad[0, 1])

    shared = torch.eye(4, dtype=torch.bool)
    shared[1, 0] = True
    assert pull_on_picture_1(torch.eye(4, dtype=torch.bool)) > 0  # CLIP: a negative, pushed
    assert pull_on_picture_1(shared) < 0


def test_soft_reveal_shows_the_object_more_than_the_background():
    rng = np.random.default_rng(0)
    masks = np.zeros((1, 60, 60), dtype=bool)
    masks[0, 20:40, 20:40] = True
    reveal = soft_reveal(masks, rng)
    assert reveal.shape == (60, 60) and reveal.min() >= 0 and reveal.max() <= 1
    assert reveal[masks[0]].mean() > reveal[~masks[0]].mean() + 0.3


CORPUS_WORLD = {"image_side": (96, 120), "objects_per_image": (2, 3), "object_scale": (0.22, 0.40),
                "distractor_rate": 0.5}


def test_the_corpus_is_a_pure_function_of_its_seed_and_every_caption_is_true_of_its_picture():
    a = web_corpus(3, size=32, seed=5, **CORPUS_WORLD)
    b = web_corpus(3, size=32, seed=5, **CORPUS_WORLD)
    assert [p.pixels.tobytes() for g in a for p in g] == [p.pixels.tobytes() for g in b for p in g]
    assert [p.captions for g in a for p in g] == [p.captions for g in b for p in g]
    for group in a:
        for pic in group:
            assert pic.pixels.shape == (32, 32, 3)
            assert all(caption_true(c, pic) for c in pic.captions), pic.captions


def test_noisy_pairs_are_positives_and_the_batch_table_covers_other_pictures():
    groups = web_corpus(4, size=32, seed=1, **CORPUS_WORLD)
    corpus = WebCorpusBatches(groups, noise=0.5, max_tokens=20, seed=0)
    rows = np.arange(len(corpus.pictures))
    images, tokens, table = corpus.batch(rows)
    assert images.shape == (len(rows), 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert table.shape == (len(rows), len(tokens))
    assert corpus.noisy.any()
    assert table.any(dim=1).all()  # every picture has a positive, noisy ones their planted caption


def _shipped(tmp_path, tiny_clip) -> tuple[dict, torch.nn.Module]:
    """A small random tiny-rn written as scripts/build_web_clip.py ships a build; its config and model."""
    from pipeline.models.clip_backbone import build_clip

    tiny = {**tiny_clip, "image_size": 32}
    recipe = WebClipRecipe(seed=0, groups=1, tiny=tiny, max_tokens=20, epochs=1, batch_size=4, lr=1e-3,
                           weight_decay=0.0, warmup_steps=0, noise=0.0, two_object_rate=0.5, isolated=(1, 1),
                           objects_per_image=(2, 3), image_side=(96, 120), object_scale=(0.22, 0.4),
                           distractor_rate=0.5)
    model = build_clip("tiny-rn", None, tiny=tiny, context_length=20)
    write_web_clip(tmp_path / "web", model, recipe, {"seed": 0})
    return tiny, model


def test_written_weights_are_fp16_loadable_and_small(tmp_path, tiny_clip):
    from pipeline.models.clip_artifact import load_clip

    _, model = _shipped(tmp_path, tiny_clip)
    state = torch.load(tmp_path / "web" / "clip.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    loaded = load_clip(tmp_path / "web")
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, model.state_dict()[k].half().float()), k
    assert json.loads((tmp_path / "web" / MANIFEST_FILE).read_text())["seed"] == 0


@pytest.mark.parametrize("field,value", [("noise", 0.9), ("groups", 0), ("lr", 0.0)])
def test_a_bad_recipe_value_names_itself(tmp_path, field, value):
    import yaml

    from pipeline.train.web_clip import read_recipe

    path = tmp_path / "recipe.yaml"
    good = yaml.safe_load(open("weights/web-clip/recipe.yaml"))
    path.write_text(yaml.safe_dump({**good, field: value}))
    with pytest.raises(ValueError, match=field):
        read_recipe(path)


def test_pretrain_clip_reads_a_shipped_tiny_clip_with_the_architecture_beside_it(tmp_path, tiny_clip):
    """``model.clip.pretrained: <build>/clip.pt`` under a tiny name: the build's ``clip.json`` gives the
    architecture, not ``model.clip.tiny`` (which here is another width), and the weights load as written."""
    from pipeline.models.clip_artifact import load_clip, write_clip_spec
    from pipeline.models.shipped_clip import external_clip_spec

    tiny, model = _shipped(tmp_path, tiny_clip)
    other = {**tiny, "vision_width": 2 * tiny["vision_width"]}
    spec = external_clip_spec("tiny-rn", str(tmp_path / "web" / "clip.pt"), other, 20)
    assert spec["tiny"] == tiny and spec["context_length"] == 20 and spec["quick_gelu"] is False
    write_clip_spec(tmp_path / "artifact", spec)
    loaded = load_clip(tmp_path / "artifact")
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, model.state_dict()[k].half().float()), k


@pytest.mark.parametrize("name,max_tokens,message", [("tiny-vit", 20, "model.clip.name"),
                                                     ("tiny-rn", 16, "model.max_tokens")])
def test_a_shipped_tiny_clip_refuses_another_name_or_text_context(tmp_path, tiny_clip, name, max_tokens,
                                                                  message):
    from pipeline.models.shipped_clip import external_clip_spec

    _shipped(tmp_path, tiny_clip)
    with pytest.raises(ValueError, match=message) as err:
        external_clip_spec(name, str(tmp_path / "web" / "clip.pt"), tiny_clip, max_tokens)
    assert "clip.json" in str(err.value)


# The floors for a shipped build, on val (docs/embedded-default-study.md, "An embedded web CLIP").
SHIPPED_FLOORS = {"overall": 0.70, "attribute": 0.90, "shape_only": 0.85, "position": 0.60}
SHIPPED_MAX_PAIR_COSINE = {"shape": 0.80, "position": 0.80}


def test_the_default_clip_is_the_shipped_web_clip_and_loads(tmp_path):
    """``params.yaml`` starts Step-1 from ``weights/web-clip`` as a user starts from downloaded weights:
    the file is committed, small, under ``inputs.weights`` (so DVC re-runs on a byte change), carries a
    manifest whose val diagnostics meet the floors, and loads into the architecture beside it."""
    from pathlib import Path

    from pipeline.inputs import covers
    from pipeline.models.clip_artifact import load_clip, write_clip_spec
    from pipeline.models.shipped_clip import external_clip_spec
    from pipeline.params import load_params

    params = load_params(Path("params.yaml"))
    weights = Path(params.model.clip.pretrained)
    assert weights.is_file() and weights.stat().st_size <= 25 * 2**20
    assert covers(params.inputs.weights, weights)  # pretrain_clip's own rule for an untracked weight file
    manifest = json.loads((weights.parent / MANIFEST_FILE).read_text())
    assert {"seed", "pictures", "captions", "steps", "seconds", "device"} <= manifest.keys()
    ranking = manifest["diagnostics"]["masked_object_ranking"]
    for group, floor in SHIPPED_FLOORS.items():
        assert ranking[group]["rate"] >= floor, group
    for kind, ceiling in SHIPPED_MAX_PAIR_COSINE.items():
        assert manifest["diagnostics"]["minimal_pair_cosine"][kind]["cosine"] <= ceiling, kind

    spec = external_clip_spec(params.model.clip.name, str(weights), params.model.clip.tiny,
                              params.model.max_tokens)
    write_clip_spec(tmp_path, spec)
    model = load_clip(tmp_path)
    shipped = torch.load(weights, map_location="cpu", weights_only=True)
    assert shipped.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.float16 for v in shipped.values() if v.is_floating_point())
