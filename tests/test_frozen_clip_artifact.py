"""The frozen CLIP of calibration and PRMS: its params keys, its spec in artifacts/clip, its one loader."""

import copy

import pytest
import torch
import yaml
from tiny_pipeline import ROOT, TINY_CLIP

from pipeline.models.clip_artifact import (
    FROZEN_SPEC_FILE,
    FROZEN_WEIGHTS_FILE,
    WEIGHTS_FILE,
    clip_spec,
    frozen_clip_spec,
    load_clip,
    load_frozen_clip,
    resolve_calibration_size,
    write_clip_spec,
)
from pipeline.models.clip_backbone import build_clip
from pipeline.params import ParamsError, parse_params


@pytest.fixture
def embedded_clip_dir(tmp_path):
    """artifacts/clip as pretrain_clip writes it for the embedded CLIP (weights + clip.json)."""
    torch.manual_seed(0)
    clip = build_clip("tiny-rn", None, tiny=TINY_CLIP, context_length=20)
    torch.save(clip.state_dict(), tmp_path / WEIGHTS_FILE)
    spec = clip_spec("tiny-rn", WEIGHTS_FILE, TINY_CLIP, 20)
    write_clip_spec(tmp_path, spec)
    return tmp_path, spec


def test_same_freezes_a_copy_of_the_trained_clip(embedded_clip_dir):
    clip_dir, spec = embedded_clip_dir
    write_clip_spec(clip_dir, frozen_clip_spec("same", "same", spec), FROZEN_SPEC_FILE)
    frozen = load_frozen_clip(clip_dir)
    clip = load_clip(clip_dir)
    for key, value in clip.state_dict().items():
        assert torch.equal(frozen.backbone.clip.state_dict()[key], value), key
    assert not any(p.requires_grad for p in frozen.parameters())
    assert resolve_calibration_size("auto", frozen) == 64
    assert resolve_calibration_size(128, frozen) == 128


def test_separate_frozen_clip_from_its_own_file(embedded_clip_dir, tmp_path_factory):
    clip_dir, spec = embedded_clip_dir
    other = tmp_path_factory.mktemp("weights") / "vit.pt"
    vit_tiny = {**TINY_CLIP, "vision_layers": 2}
    torch.save(build_clip("tiny-vit", None, tiny=vit_tiny, context_length=20).state_dict(), other)
    write_clip_spec(clip_dir, {**frozen_clip_spec("tiny-vit", str(other), spec), "tiny": vit_tiny},
                    FROZEN_SPEC_FILE)
    frozen = load_frozen_clip(clip_dir)
    assert type(frozen.backbone.clip.visual).__name__ == "VisionTransformer"
    assert resolve_calibration_size("auto", frozen) == 64


def test_open_clip_name_gets_its_own_spec():
    spec = frozen_clip_spec("ViT-B-32", "/models/ViT-B-32.pt", clip_spec("RN50", "/models/RN50.pt", None, 77))
    assert spec == {"name": "ViT-B-32", "pretrained": "/models/ViT-B-32.pt", "tiny": None,
                    "context_length": 77, "quick_gelu": False}
    # the spec records the activation the name builds: OpenAI's weights need a -quickgelu name
    quick = frozen_clip_spec("ViT-B-32-quickgelu", "/m/ViT-B-32.pt", clip_spec("RN50-quickgelu", "/m/RN50.pt",
                                                                              None, 77))
    assert quick["quick_gelu"] is True
    assert frozen_clip_spec("same", "same", clip_spec("RN50-quickgelu", "/m/RN50.pt", None, 77))["quick_gelu"]


def test_bad_frozen_path_fails_fast_naming_it(embedded_clip_dir, tmp_path_factory):
    clip_dir, spec = embedded_clip_dir
    missing = tmp_path_factory.mktemp("gone") / "ViT-B-32.pt"
    write_clip_spec(clip_dir, frozen_clip_spec("ViT-B-32", str(missing), spec), FROZEN_SPEC_FILE)
    with pytest.raises(FileNotFoundError, match="ViT-B-32.pt.*model.frozen_clip.pretrained"):
        load_frozen_clip(clip_dir)


def test_missing_frozen_spec_says_to_rerun_pretrain_clip(embedded_clip_dir):
    clip_dir, _ = embedded_clip_dir
    with pytest.raises(FileNotFoundError, match="frozen_clip.json.*pretrain_clip"):
        load_frozen_clip(clip_dir)


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.mark.parametrize("name, pretrained, ok", [
    ("same", "same", True),
    ("ViT-B-32", "/models/ViT-B-32.pt", True),
    ("ViT-B-32", "openai", True),
    ("same", "/models/ViT-B-32.pt", False),
    ("ViT-B-32", "same", False),
    ("tiny-rn", "embedded", True),
    ("tiny-vit", "embedded", True),
    ("ViT-B-32", "embedded", False),
])
def test_frozen_clip_params(name, pretrained, ok):
    raw = copy.deepcopy(_params())
    raw["model"]["frozen_clip"] = {"name": name, "pretrained": pretrained}
    if ok:
        assert parse_params(raw).model.frozen_clip.name == name
    else:
        with pytest.raises(ParamsError, match="model.frozen_clip"):
            parse_params(raw)


@pytest.mark.parametrize("value, ok", [(128, True), ("auto", True), (16, False), ("big", False),
                                       (True, False)])
def test_calibration_size_is_auto_or_an_int(value, ok):
    raw = copy.deepcopy(_params())
    raw["step1"]["calibration_size"] = value
    if ok:
        assert parse_params(raw).step1.calibration_size == value
    else:
        with pytest.raises(ParamsError, match="step1.calibration_size"):
            parse_params(raw)


def test_frozen_clip_keys_are_required():
    raw = copy.deepcopy(_params())
    del raw["model"]["frozen_clip"]["pretrained"]
    with pytest.raises(ParamsError, match="model.frozen_clip.pretrained"):
        parse_params(raw)


def test_embedded_frozen_clip_loads_from_the_clip_folder(embedded_clip_dir):
    """pretrain_clip stores the embedded frozen CLIP as frozen_clip.pt beside clip.pt, with its own
    input size; the spec names the file relative to the folder, so the folder can move."""
    clip_dir, spec = embedded_clip_dir
    small = {**spec["tiny"], "image_size": 32}
    model = build_clip("tiny-rn", None, tiny=small, context_length=spec["context_length"])
    torch.save(model.state_dict(), clip_dir / FROZEN_WEIGHTS_FILE)
    write_clip_spec(clip_dir, clip_spec("tiny-rn", FROZEN_WEIGHTS_FILE, small, spec["context_length"]),
                    FROZEN_SPEC_FILE)
    moved = clip_dir.parent / "moved"
    clip_dir.rename(moved)
    frozen = load_frozen_clip(moved)
    assert resolve_calibration_size("auto", frozen) == 32
    for key, value in model.state_dict().items():
        assert torch.equal(frozen.backbone.clip.state_dict()[key], value), key
    (moved / FROZEN_WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="frozen_clip.pt"):
        load_frozen_clip(moved)


@pytest.mark.slow
def test_pretrain_clip_trains_the_embedded_frozen_clip_that_step1_calibrates_with(tmp_path):
    """``model.frozen_clip.pretrained: embedded`` end to end on the tiny config: pretrain_clip writes a
    second CLIP at its own input size, and train_step1 calibrates against it (calibration_size auto)."""
    from tiny_pipeline import run_stage, write_params

    write_params(tmp_path, {"model": {"frozen_clip": {"name": "tiny-rn", "pretrained": "embedded"}}})
    for stage in ("synthesize", "index", "pretrain_clip"):
        log = run_stage(tmp_path, stage)
    clip_dir = tmp_path / "artifacts" / "clip"
    assert "pretrain_frozen_clip epoch 1/1" in log
    frozen = load_frozen_clip(clip_dir)
    assert frozen.image_size == 32  # tiny_pipeline's pretrain_clip.frozen.image_size, not the CLIP's 64
    assert load_clip(clip_dir).visual.image_size in (64, (64, 64))
    trained = torch.load(clip_dir / FROZEN_WEIGHTS_FILE, weights_only=True)
    assert trained["ln_final.bias"].abs().sum() > 0  # built with zeros: the optimiser moved it
    assert "cal_pos" in run_stage(tmp_path, "train_step1")


def _tiny_frozen_params(seed: int):
    from tiny_pipeline import TINY

    from pipeline.params import overlay

    raw = overlay(overlay(_params(), TINY), {"base": {"seed": seed}, "model": {"frozen_clip": {
        "name": "tiny-rn", "pretrained": "embedded"}}, "pretrain_clip": {"frozen": {"pictures": 4}}})
    return parse_params(raw)


def test_embedded_frozen_clip_is_seeded_by_its_own_seed_not_by_what_ran_before():
    """The stage trains the frozen scorer after the main CLIP; its start (which decides whether it
    learns position words) must depend on base.seed alone, so that research/frozen_scorer_seeds.py's
    seed N is the scorer the stage builds with base.seed N."""
    from pipeline.train.clip_pretrain import pretrain_embedded_frozen_clip

    cpu = torch.device("cpu")
    first, tiny = pretrain_embedded_frozen_clip(_tiny_frozen_params(0), cpu)
    torch.rand(1000)  # what the main CLIP's pretraining would leave in the global generator
    again, _ = pretrain_embedded_frozen_clip(_tiny_frozen_params(0), cpu)
    other, _ = pretrain_embedded_frozen_clip(_tiny_frozen_params(1), cpu)
    assert tiny["image_size"] == 32  # pretrain_clip.frozen.image_size, not model.clip.tiny's
    weights, same, moved = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(weights[k], same[k]) for k in weights)
    assert not torch.equal(weights["text_projection"], moved["text_projection"])


def test_seed_summary_gives_each_family_its_seeds_mean_and_spread():
    from research.frozen_scorer_seeds import seed_summary

    rows = [{"seed": s, "family": f, "rate": r} for s, f, r in [
        (0, "position", 0.8), (1, "position", 0.4), (0, "all", 0.8), (1, "all", 0.6),
        (0, "attribute", 0.9), (1, "attribute", 0.7)]]
    table = seed_summary(rows)
    assert list(table.index) == ["attribute", "position", "all"]
    assert table.loc["position", "mean"] == pytest.approx(0.6)
    assert table.loc["position", "std"] == pytest.approx(2 ** 0.5 * 0.2)  # ddof 1: sqrt(0.2^2 + 0.2^2)
    assert table.loc["all", "std"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) / 1) ** 0.5)
