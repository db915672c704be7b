"""The real-weights path builds, records and rebuilds the activation CLIP was trained with, and asks for
the device it names.

GELU and QuickGELU have no weights, so a CLIP state dict loads strictly into either network: without a
record, Step-2 trained on OpenAI's QuickGELU ``RN50.pt`` was rebuilt as GELU by ``load_segmenter`` and
evaluated as another network. Each test here failed before activations were recorded and checked.

The networks are OpenAI-shaped but small: two open_clip model configs registered for this module,
``tris-test-rn`` (GELU) and ``tris-test-rn-quickgelu``, the way open_clip pairs ``RN50`` and
``RN50-quickgelu``; OpenAI-format archives are ``torch.jit.script`` saves, as OpenAI's ``RN50.pt`` is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from pipeline.atomic import CheckpointError, load_torch, save_torch
from pipeline.models.checkpoints import (
    build_localiser,
    load_localiser,
    load_segmenter,
    save_localiser,
    save_segmenter,
)
from pipeline.models.clip_artifact import clip_spec, load_clip, write_clip_spec
from pipeline.models.clip_backbone import ActivationError, ClipBackbone, build_clip, tokenize, uses_quick_gelu
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.runtime import DeviceError, device_note, select_device

GELU_NAME, QUICK_NAME = "tris-test-rn", "tris-test-rn-quickgelu"
# OpenAI's shapes in small: head_width 64 and text heads = width // 64, which is what
# build_model_from_openai_state_dict (the archive path) infers from the weights.
CONFIG = {"embed_dim": 64,
          "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
META = {"clip_tiny": None, "max_tokens": 8, "input_size": 64, "fusion_dim": 16, "decoder_dim": 8,
        "context_length": 77}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Register the two configs; write an OpenAI-format archive (QuickGELU, as OpenAI's) and a GELU one."""
    configs = tmp_path_factory.mktemp("configs")
    (configs / f"{GELU_NAME}.json").write_text(json.dumps(CONFIG))
    (configs / f"{QUICK_NAME}.json").write_text(json.dumps({**CONFIG, "quick_gelu": True}))
    open_clip.add_model_config(configs)
    out = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    files = {"openai": out / "RN-openai.pt", "gelu": out / "RN-gelu.pt"}
    with warnings.catch_warnings():  # torch.jit.script is deprecated; it is how OpenAI's archives exist
        warnings.simplefilter("ignore")
        torch.jit.script(open_clip.create_model(QUICK_NAME)).save(str(files["openai"]))
        torch.jit.script(open_clip.create_model(GELU_NAME)).save(str(files["gelu"]))
    return files


def _segmenter(clip: torch.nn.Module) -> ReferringSegmenter:
    torch.manual_seed(1)
    return ReferringSegmenter(ClipBackbone(clip), META["fusion_dim"], META["decoder_dim"]).eval()


def _outputs(model: ReferringSegmenter) -> torch.Tensor:
    torch.manual_seed(2)
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64), tokenize(["the red circle"], META["max_tokens"]))


# ----------------------------------------------------------------------------- which name fits which file
def test_openai_archive_under_a_gelu_name_is_refused_naming_the_right_name(weights):
    """Before: built QuickGELU whatever the name said, and the name later rebuilt GELU."""
    with pytest.raises(ActivationError, match=rf"RN-openai.pt .*QuickGELU.*{GELU_NAME}.*use '{QUICK_NAME}'"):
        build_clip(GELU_NAME, weights["openai"])
    clip = build_clip(QUICK_NAME, weights["openai"])
    assert uses_quick_gelu(clip)


def test_gelu_archive_builds_gelu_not_openais_quickgelu(weights):
    """An archive of a GELU network says so in its module tree; before, every archive built QuickGELU."""
    clip = build_clip(GELU_NAME, weights["gelu"])
    assert not uses_quick_gelu(clip)
    with pytest.raises(ActivationError, match=f"use '{GELU_NAME}'"):
        build_clip(QUICK_NAME, weights["gelu"])
    tokens = tokenize(["a red circle"], 77)
    with torch.no_grad():  # the same weights in open_clip's GELU network compute the same embedding
        gelu, quick = open_clip.create_model(GELU_NAME), open_clip.create_model(QUICK_NAME)
        gelu.load_state_dict(clip.state_dict())
        quick.load_state_dict(clip.state_dict())
        assert torch.equal(clip.encode_text(tokens), gelu.encode_text(tokens))
        assert not torch.allclose(clip.encode_text(tokens), quick.encode_text(tokens), atol=1e-4)


def test_openai_tag_under_a_gelu_name_is_refused_before_any_download():
    """``RN50`` + ``openai``: open_clip only warns and builds GELU for QuickGELU weights."""
    with pytest.raises(ActivationError, match="open_clip tag 'openai' .*QuickGELU.*use 'RN50-quickgelu'"):
        build_clip("RN50", "openai")


# ----------------------------------------------------------------------------- checkpoints record it
def test_step2_checkpoint_rebuilds_the_quickgelu_network_it_trained(weights, tmp_path):
    trained = _segmenter(build_clip(QUICK_NAME, weights["openai"]))
    path = tmp_path / "model.pt"
    save_segmenter(path, trained, {**META, "clip_name": QUICK_NAME})
    loaded, meta = load_segmenter(path)
    assert meta["quick_gelu"] is True and uses_quick_gelu(loaded.backbone.clip)
    assert torch.equal(_outputs(loaded), _outputs(trained))


def test_step2_checkpoint_whose_name_builds_another_activation_is_refused(weights, tmp_path):
    """What train_step2 wrote for ``RN50`` + OpenAI's ``RN50.pt``: a QuickGELU network under a GELU name.
    Before: loaded strictly into GELU and evaluated, reported and predicted as another network."""
    trained = _segmenter(build_clip(QUICK_NAME, weights["openai"]))
    path = tmp_path / "model.pt"
    save_segmenter(path, trained, {**META, "clip_name": GELU_NAME})
    with pytest.raises(CheckpointError, match=rf"{path}: trained with QuickGELU, but model name "
                                              rf"'{GELU_NAME}' builds GELU"):
        load_segmenter(path)


def test_step2_checkpoint_without_a_record_loads_only_for_tiny_clips(weights, tmp_path):
    """Checkpoints written before the record: the tiny CLIPs are GELU only, so they keep loading; for any
    other the activation is unknowable and the checkpoint is refused, naming it."""
    path = tmp_path / "model.pt"
    save_segmenter(path, _segmenter(build_clip(GELU_NAME, weights["gelu"])), {**META, "clip_name": GELU_NAME})
    state = load_torch(path)
    del state["meta"]["quick_gelu"]
    save_torch(path, state)
    with pytest.raises(ActivationError, match=rf"{path} does not record its CLIP's activation"):
        load_segmenter(path)

    tiny = {"embed_dim": 32, "image_size": 64, "vision_layers": [1, 1, 1, 1], "vision_width": 8,
            "text_width": 32, "text_heads": 2, "text_layers": 1}
    old = tmp_path / "tiny.pt"
    model = _segmenter(build_clip("tiny-rn", None, tiny=tiny, context_length=20))
    save_segmenter(old, model, {**META, "clip_name": "tiny-rn", "clip_tiny": tiny, "context_length": 20})
    state = load_torch(old)
    del state["meta"]["quick_gelu"]
    save_torch(old, state)
    loaded, _ = load_segmenter(old)
    assert not uses_quick_gelu(loaded.backbone.clip)
    assert torch.equal(_outputs(loaded), _outputs(model))


def _clip_dir(path: Path, name: str, weights_file: Path) -> Path:
    path.mkdir()
    write_clip_spec(path, clip_spec(name, str(weights_file), None, 77))
    return path


LOCALISER_META = {"hidden_dim": 16, "prompt": "bilateral", "alpha": 0.1, "beta": 0.1, "input_size": 64,
                  "max_tokens": 8, "feature_stride": 32, "temperature": 0.07, "learn_temperature": False}


def test_step1_checkpoint_refuses_a_clip_folder_that_now_builds_another_activation(weights, tmp_path):
    clip_dir = _clip_dir(tmp_path / "clip", QUICK_NAME, weights["openai"])
    meta = {**LOCALISER_META, "clip_dir": str(clip_dir)}
    path = tmp_path / "model.pt"
    save_localiser(path, build_localiser(clip_dir, meta), meta)
    assert load_torch(path)["meta"]["quick_gelu"] is True
    model, _ = load_localiser(path)
    assert uses_quick_gelu(model.backbone.clip)
    # the folder now names a GELU CLIP (pretrain_clip re-run with other weights): refuse, do not load
    write_clip_spec(clip_dir, clip_spec(GELU_NAME, str(weights["gelu"]), None, 77))
    with pytest.raises(CheckpointError, match=rf"{path}: trained with QuickGELU, but .*json builds GELU"):
        load_localiser(path)


def test_clip_spec_records_the_activation_and_loading_checks_it(weights, tmp_path):
    clip_dir = _clip_dir(tmp_path / "clip", QUICK_NAME, weights["openai"])
    assert json.loads((clip_dir / "clip.json").read_text())["quick_gelu"] is True
    assert uses_quick_gelu(load_clip(clip_dir))
    spec = {**clip_spec(QUICK_NAME, str(weights["openai"]), None, 77), "quick_gelu": False}
    write_clip_spec(clip_dir, spec)
    with pytest.raises(ActivationError, match=r"clip.json: CLIP .* builds QuickGELU, but GELU was recorded"):
        load_clip(clip_dir)


def test_predict_cli_runs_the_activation_step2_trained_with(weights, tmp_path, capsys):
    from PIL import Image

    from pipeline.predict import main

    path = tmp_path / "model.pt"
    trained = _segmenter(build_clip(QUICK_NAME, weights["openai"]))
    save_segmenter(path, trained, {**META, "clip_name": QUICK_NAME})
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.png")
    assert main(["--image", str(tmp_path / "photo.png"), "--text", "the red circle", "--checkpoint",
                 str(path), "--out", str(tmp_path / "mask.png"), "--device", "cpu"]) == 0
    assert f"Step-2 CLIP {QUICK_NAME} with QuickGELU on cpu" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the device
def test_cuda_on_a_gpu_the_wheel_cannot_run_fails_at_start(monkeypatch):
    """``is_available()`` can be true while no kernel runs (a GPU the wheel was not built for); before,
    ``cuda`` was accepted and the stage failed minutes later."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_ones = torch.ones

    def ones(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real_ones(*args, **kwargs)

    monkeypatch.setattr(torch, "ones", ones)
    with pytest.raises(DeviceError, match=r"^base.device='cuda' but no CUDA device is usable \(CUDA "
                                          r"unusable: CUDA error: no kernel image"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_old_driver_is_named_for_cuda_and_for_auto(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")

    def is_available() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version "
                      "11040).", UserWarning, stacklevel=1)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    with pytest.raises(DeviceError, match="driver on your system is too old") as err:
        select_device("cuda")
    assert "\n" not in str(err.value)
    device = select_device("auto")
    assert device == torch.device("cpu")
    assert "base.device=auto chose the CPU: CUDA unusable: CUDA initialization: The NVIDIA driver" in \
        device_note("auto", device)
    assert device_note("cpu", device) == ""


def test_stage_start_line_says_why_auto_chose_the_cpu(tmp_path, monkeypatch, capsys):
    """Before: ``auto`` fell back to the CPU without a word, so a GPU run could train on the CPU."""
    from pipeline.params import read_params_yaml
    from pipeline.stage import start_stage

    monkeypatch.setattr(torch.version, "cuda", None)
    params = read_params_yaml(Path(__file__).resolve().parents[1] / "params.yaml")
    params["base"]["device"] = "auto"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _, device = start_stage("train_step1", tmp_path / "params.yaml")
    line = capsys.readouterr().out.splitlines()[0]
    assert device.type == "cpu"
    assert line.startswith("[train_step1] device=cpu (base.device=auto chose the CPU: this torch build")
