"""The paper's architecture end to end on CPU, through ``dvc exp run``: open_clip RN50 at 320 px with
C_d = 1024 and MaskCLIP projector init, a separate frozen ViT-B-32 for calibration and PRMS, weights from
OpenAI-format TorchScript archives named as OpenAI names them (``RN50.pt``, ``ViT-B-32.pt``).

The README's real-data command is :data:`REAL_DATA_OVERRIDES`; the slow test runs exactly those overrides
with ``dvc exp run -S`` in a throwaway git + DVC repository holding this project, replacing only the
device (cpu), the data location, the weight paths and the epoch counts (:data:`STAND_INS`), on a few
synthetic images in REFER's layout; then ``python -m pipeline.predict`` loads what Step-2 trained, with
the activation it trained with (QuickGELU: OpenAI's). ``test_readme_command_is_the_tested_one`` keeps
the two commands in step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tiny_pipeline import ROOT, write_params

from bench.paper_step1 import overrides_to_dict, readme_overrides
from pipeline.params import overlay

# `dvc exp run -S ...` of README "Real data and real CLIP weights", in order.
REAL_DATA_OVERRIDES = (
    "base.device=cuda",
    "data.source=refer",
    "data.refer.root=/data/refer",
    "data.refer.dataset=refcoco",
    "data.refer.split_by=unc",
    "data.refer.image_dir=/data/refer/images/train2014",
    "inputs.refs=/data/refer",
    "inputs.images=/data/refer/images/train2014",
    "inputs.weights=/models",
    "model.clip.name=RN50-quickgelu",
    "model.clip.pretrained=/models/RN50.pt",
    "model.hidden_dim=1024",
    "model.frozen_clip.name=ViT-B-32-quickgelu",
    "model.frozen_clip.pretrained=/models/ViT-B-32.pt",
    "step1.init_projectors=clip",
    "step1.input_size=320",
    "step1.feature_stride=32",
    "step1.calibration_size=auto",
    "step1.lr=5e-5",
    "step1.epochs=15",
    "step1.cls_weight=5",
    "step2.input_size=320",
    "step2.lr=5e-5",
    "step2.epochs=15",
    "step1.calibration_mask_space=normalized",
    "model.align_corners=true",
    "pseudo_masks.prms_image=step1_input",
    "step2.select=best_val",
    "evaluate.acc_box=authors",
)

# What the slow test puts in place of the README's values: the CPU, data and weights that exist here,
# 1 epoch. Paths are relative to the repository root (the stages' working directory): ``data/refer`` holds
# synthetic images in REFER's layout; "{weights}" is the folder of the weight archives.
STAND_INS = {
    "base.device": "cpu",
    "data.refer.root": "data/refer",
    "data.refer.dataset": "synthetic",
    "data.refer.image_dir": "data/refer/images",
    "inputs.refs": "data/refer",
    "inputs.images": "data/refer/images",
    "inputs.weights": "{weights}",
    "model.clip.pretrained": "{weights}/RN50.pt",
    "model.frozen_clip.pretrained": "{weights}/ViT-B-32.pt",
    "step1.epochs": "1",
    "step2.epochs": "1",
}

# A few steps per training: 8 synthetic images (REFER layout), batch 2, small loss sets.
SMALL = {
    "synthesize": {"num_images": 8, "objects_per_image": [2, 3], "expressions_per_object": [1, 2],
                   "split_fractions": {"train": 0.5, "val": 0.25, "testA": 0.125, "testB": 0.125}},
    "step1": {"batch_size": 2, "num_negatives": 2, "calibration_negatives": 2},
    "dump": {"batch_size": 4},
    "pseudo_masks": {"affinity": {"epochs": 1, "batch_size": 4}},
    "step2": {"batch_size": 2},
}


def overrides_under_test(weights: str | Path = "models") -> list[str]:
    """The README's overrides with :data:`STAND_INS` substituted (every stand-in replaces a README key)."""
    keys = [pair.split("=", 1)[0] for pair in REAL_DATA_OVERRIDES]
    assert set(STAND_INS) <= set(keys), "a stand-in must replace a key of the README command"
    return [f"{key}={STAND_INS[key].format(weights=weights)}" if key in STAND_INS else f"{key}={value}"
            for key, value in (pair.split("=", 1) for pair in REAL_DATA_OVERRIDES)]


def test_readme_command_is_the_tested_one():
    assert readme_overrides() == list(REAL_DATA_OVERRIDES)


def test_overrides_under_test_validate(tmp_path):
    """The slow test's params parse (cheap guard against a stand-in that is not a valid value)."""
    from pipeline.params import load_params

    write_params(tmp_path, overlay(SMALL, overrides_to_dict(overrides_under_test())))
    params = load_params(tmp_path / "params.yaml")
    assert params.model.clip.name == "RN50-quickgelu"
    assert params.model.frozen_clip.name == "ViT-B-32-quickgelu"
    assert params.step1.calibration_size == "auto" and params.step1.epochs == 1
    assert params.base.device == "cpu" and params.model.clip.pretrained == "models/RN50.pt"
    assert params.data.refer.root == params.inputs.refs == "data/refer"


def test_readme_command_names_the_activation_and_the_device():
    """OpenAI's .pt archives are QuickGELU networks (their open_clip names end in -quickgelu), and the
    GPU command asks for CUDA, so that a machine without a usable one stops instead of training on the
    CPU; the test replaces only the device among the run-time settings."""
    pairs = dict(pair.split("=", 1) for pair in REAL_DATA_OVERRIDES)
    assert pairs["model.clip.pretrained"].endswith("/RN50.pt")
    assert pairs["model.clip.name"] == "RN50-quickgelu"
    assert pairs["model.frozen_clip.pretrained"].endswith("/ViT-B-32.pt")
    assert pairs["model.frozen_clip.name"] == "ViT-B-32-quickgelu"
    assert pairs["base.device"] == "cuda" and STAND_INS["base.device"] == "cpu"
    assert not [key for key in STAND_INS if key.startswith("base.") and key != "base.device"]


def _write_openai_archives(folder: Path) -> None:
    """Random RN50 and ViT-B-32 saved as OpenAI released them: ``torch.jit.script`` archives of QuickGELU
    networks with the conv, linear and attention weights in float16 (what ``convert_weights_to_fp16``
    leaves, as OpenAI's state dicts are)."""
    import open_clip
    import torch
    from open_clip.model import convert_weights_to_fp16

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in (("RN50-quickgelu", "RN50.pt"), ("ViT-B-32-quickgelu", "ViT-B-32.pt")):
        model = open_clip.create_model(name)
        convert_weights_to_fp16(model)
        with warnings.catch_warnings():  # torch.jit.script is deprecated; it is how OpenAI's archives exist
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(folder / file))
        del model


def _run(repo: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    log = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{' '.join(args[:3])} ... failed:\n{log}"
    return result


def _make_repo(repo: Path) -> None:
    """A git + DVC repository holding this project's stages, library and dvc.yaml, the small config
    committed as params.yaml, a REFER-layout dataset in ``data/refer`` (8 synthetic images, written by
    the synthesize stage outside DVC) and the archives in ``models/``, both outside git as a user's are."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("stages", "pipeline"):
        shutil.copytree(ROOT / name, repo / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    write_params(repo, SMALL)
    _run(repo, sys.executable, "stages/synthesize.py")
    (repo / "data").mkdir()
    (repo / "artifacts/synthetic").rename(repo / "data/refer")
    shutil.rmtree(repo / "artifacts")
    (repo / ".gitignore").write_text("/models/\n/data/\n__pycache__/\n")
    _write_openai_archives(repo / "models")
    for args in (("git", "init", "-q"), ("git", "config", "user.email", "ci@example.com"),
                 ("git", "config", "user.name", "ci"), ("dvc", "init", "-q"), ("git", "add", "-A"),
                 ("git", "commit", "-qm", "paper architecture")):
        _run(repo, *args)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc") is None or shutil.which("git") is None, reason="needs dvc and git")
def test_paper_architecture_end_to_end(tmp_path, monkeypatch):
    import torch

    from pipeline.models.checkpoints import load_segmenter
    from pipeline.models.clip_artifact import load_frozen_clip, read_clip_spec
    from pipeline.models.clip_backbone import tokenize, uses_quick_gelu
    from pipeline.params import load_params
    from pipeline.store import open_responses

    repo = tmp_path / "repo"
    try:
        _make_repo(repo)
        sets = [arg for pair in overrides_under_test() for arg in ("-S", pair)]
        _run(repo, "dvc", "exp", "run", *sets)
        params = load_params(repo / "params.yaml")  # what dvc exp run ran: the README's, with stand-ins
        assert (params.model.clip.name, params.base.device) == ("RN50-quickgelu", "cpu")
        clip_dir = repo / "artifacts/clip"
        monkeypatch.chdir(repo)  # the specs hold the weight paths as given: relative to the repository
        # calibration_size=auto follows the separate frozen CLIP: ViT-B-32's 224 px, not RN50's
        frozen = load_frozen_clip(clip_dir)
        assert frozen.image_size == 224 and uses_quick_gelu(frozen.backbone.clip)
        assert read_clip_spec(clip_dir)["quick_gelu"] is True
        image = next((repo / "data/refer/images").glob("*.jpg"))
        predicted = _run(repo, sys.executable, "-m", "pipeline.predict", "--image", str(image), "--text",
                         "the red circle", "--checkpoint", "artifacts/step2/model.pt", "--out",
                         str(tmp_path / "mask.png"), "--device", "cpu")
    finally:
        shutil.rmtree(repo / "models", ignore_errors=True)  # 0.5 GB; pytest keeps the last runs' tmp dirs

    # predict rebuilt Step-2 with the activation Step-2 trained with (the checkpoint's own record)
    assert "Step-2 CLIP RN50-quickgelu with QuickGELU on cpu" in predicted.stdout
    assert (tmp_path / "mask.png").is_file()
    step1 = torch.load(repo / "artifacts/step1/model.pt", weights_only=True)["meta"]
    assert step1["quick_gelu"] is True
    # Step 1: stride-32 maps, 320 / 32 = 10 x 10 (Sec. 4.1)
    responses = open_responses(repo / "artifacts/responses.zarr")
    assert responses.row_shape == (10, 10)
    # Step 2: the decoder's finest level is stride 4 and the logits come back at the input size
    # (pipeline/models/segmenter.py: "upsamples the stride-4 logit to the input resolution")
    model, meta = load_segmenter(repo / "artifacts/step2/model.pt")
    assert meta["input_size"] == 320 and meta["quick_gelu"] is True and uses_quick_gelu(model.backbone.clip)
    images = torch.zeros(1, 3, 320, 320)
    tokens = tokenize(["the red circle"], meta["max_tokens"])
    with torch.no_grad():
        feats = model.backbone.stage_features(images)
        logits = model(images, tokens)
    assert [f.shape[-1] for f in feats] == [80, 40, 20, 10]
    assert logits.shape == (1, 1, 320, 320)
    assert (repo / "artifacts/reports/metrics.json").is_file()
