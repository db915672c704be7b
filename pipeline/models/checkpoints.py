"""Save and rebuild the Step-1 localiser: weights plus the few settings needed to rebuild it."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import save_torch
from pipeline.models.clip_artifact import load_clip
from pipeline.models.clip_backbone import ClipBackbone
from pipeline.models.step1 import TRISLocaliser


def save_localiser(path: Path, model: TRISLocaliser, meta: dict) -> None:
    """``meta`` holds clip_dir, hidden_dim, prompt, alpha, beta, input_size, max_tokens."""
    save_torch(path, {"model": model.state_dict(), "meta": meta})


def build_localiser(clip_dir: str | Path, meta: dict) -> TRISLocaliser:
    """A localiser initialised from the CLIP of ``clip_dir`` (Step-1 starts here)."""
    return TRISLocaliser(ClipBackbone(load_clip(clip_dir)), meta["hidden_dim"], prompt=meta["prompt"],
                         alpha=meta["alpha"], beta=meta["beta"])


def load_localiser(path: str | Path) -> tuple[TRISLocaliser, dict]:
    """Rebuild a trained localiser from ``model.pt`` (eval mode, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Step-1 checkpoint missing; run the train_step1 stage")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_localiser(state["meta"]["clip_dir"], state["meta"])
    model.load_state_dict(state["model"])
    return model.eval(), state["meta"]
