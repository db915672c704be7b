"""The paper's architecture end to end on CPU: open_clip RN50 at 320 px with C_d = 1024 and MaskCLIP
projector init, a separate frozen ViT-B-32 for calibration and PRMS, weights from local checkpoint files.

The README's real-data command is :data:`REAL_DATA_OVERRIDES`; the slow test runs exactly those overrides,
replacing only the data location, the weight paths and the epoch counts (:data:`STAND_INS`), on a few
synthetic images in REFER's layout. ``test_readme_command_is_the_tested_one`` keeps the two in step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_pipeline import run_stage, stage_names, write_params

from bench.paper_step1 import overrides_to_dict, readme_overrides
from pipeline.params import overlay

# `dvc exp run -S ...` of README "Real data and real CLIP weights", in order.
REAL_DATA_OVERRIDES = (
    "data.source=refer",
    "data.refer.root=/data/refer",
    "data.refer.dataset=refcoco",
    "data.refer.split_by=unc",
    "data.refer.image_dir=/data/refer/images/train2014",
    "model.clip.name=RN50",
    "model.clip.pretrained=/models/RN50.pt",
    "model.hidden_dim=1024",
    "model.frozen_clip.name=ViT-B-32",
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
)

# What the slow test puts in place of the README's values: data and weights that exist here, 1 epoch.
# Paths are relative to the stage's working directory; "{tmp}" is the test's checkpoint folder.
STAND_INS = {
    "data.refer.root": "artifacts/synthetic",
    "data.refer.dataset": "synthetic",
    "data.refer.image_dir": "artifacts/synthetic/images",
    "model.clip.pretrained": "{tmp}/RN50-checkpoint.pt",
    "model.frozen_clip.pretrained": "{tmp}/ViT-B-32-state-dict.pt",
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


def overrides_under_test(tmp: Path) -> list[str]:
    """The README's overrides with :data:`STAND_INS` substituted (every stand-in replaces a README key)."""
    keys = [pair.split("=", 1)[0] for pair in REAL_DATA_OVERRIDES]
    assert set(STAND_INS) <= set(keys), "a stand-in must replace a key of the README command"
    return [f"{key}={STAND_INS[key].format(tmp=tmp)}" if key in STAND_INS else f"{key}={value}"
            for key, value in (pair.split("=", 1) for pair in REAL_DATA_OVERRIDES)]


def test_readme_command_is_the_tested_one():
    assert readme_overrides() == list(REAL_DATA_OVERRIDES)


def test_overrides_under_test_validate(tmp_path):
    """The slow test's params parse (cheap guard against a stand-in that is not a valid value)."""
    from pipeline.params import load_params

    write_params(tmp_path, overlay(SMALL, overrides_to_dict(overrides_under_test(tmp_path))))
    params = load_params(tmp_path / "params.yaml")
    assert params.model.clip.name == "RN50" and params.model.frozen_clip.name == "ViT-B-32"
    assert params.step1.calibration_size == "auto" and params.step1.epochs == 1


def _write_checkpoints(tmp: Path) -> None:
    """Random RN50 as an open_clip training checkpoint, random ViT-B-32 as a plain state dict."""
    import open_clip
    import torch

    torch.manual_seed(0)
    rn50 = open_clip.create_model("RN50")
    torch.save({"epoch": 1, "state_dict": rn50.state_dict()}, tmp / "RN50-checkpoint.pt")
    del rn50
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), tmp / "ViT-B-32-state-dict.pt")


@pytest.mark.slow
def test_paper_architecture_end_to_end(tmp_path):
    import torch

    from pipeline.models.checkpoints import load_segmenter
    from pipeline.models.clip_artifact import load_frozen_clip
    from pipeline.models.clip_backbone import tokenize
    from pipeline.store import open_responses

    weights = tmp_path / "weights"
    weights.mkdir()
    try:
        _write_checkpoints(weights)
        work = tmp_path / "run"
        write_params(work, overlay(SMALL, overrides_to_dict(overrides_under_test(weights))))
        for name in stage_names():
            run_stage(work, name, timeout=900)
        # calibration_size=auto follows the separate frozen CLIP: ViT-B-32's 224 px, not RN50's
        assert load_frozen_clip(work / "artifacts/clip").image_size == 224
    finally:
        shutil.rmtree(weights)  # 1 GB of random weights; pytest keeps the last runs' tmp dirs

    # Step 1: stride-32 maps, 320 / 32 = 10 x 10 (Sec. 4.1)
    responses = open_responses(work / "artifacts/responses.zarr")
    assert responses.row_shape == (10, 10)
    # Step 2: the decoder's finest level is stride 4 and the logits come back at the input size
    # (pipeline/models/segmenter.py: "upsamples the stride-4 logit to the input resolution")
    model, meta = load_segmenter(work / "artifacts/step2/model.pt")
    assert meta["input_size"] == 320
    images = torch.zeros(1, 3, 320, 320)
    tokens = tokenize(["the red circle"], meta["max_tokens"])
    with torch.no_grad():
        feats = model.backbone.stage_features(images)
        logits = model(images, tokens)
    assert [f.shape[-1] for f in feats] == [80, 40, 20, 10]
    assert logits.shape == (1, 1, 320, 320)
    assert (work / "artifacts/reports/metrics.json").is_file()
