"""The ``artifacts/clip`` directory: which CLIP every later stage initialises from and freezes.

For the embedded default it holds the checkpoint trained by ``pretrain_clip``; for real weights it
only records the open_clip name and the tag or local path, so RN50 weights are never copied around.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.atomic import write_json
from pipeline.models.clip_backbone import build_clip

SPEC_FILE = "clip.json"
WEIGHTS_FILE = "clip.pt"


def clip_spec(name: str, pretrained: str, tiny: dict | None, context_length: int) -> dict:
    return {"name": name, "pretrained": pretrained, "tiny": tiny, "context_length": context_length}


def write_clip_spec(clip_dir: Path, spec: dict) -> None:
    write_json(Path(clip_dir) / SPEC_FILE, spec)


def read_clip_spec(clip_dir: str | Path) -> dict:
    path = Path(clip_dir) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP spec missing; run the pretrain_clip stage first")
    return json.loads(path.read_text())


def load_clip(clip_dir: str | Path) -> nn.Module:
    """A fresh CLIP instance with the weights the spec points at (call twice for two copies)."""
    spec = read_clip_spec(clip_dir)
    pretrained = spec["pretrained"]
    if pretrained == WEIGHTS_FILE:
        pretrained = str(Path(clip_dir) / WEIGHTS_FILE)
    return build_clip(spec["name"], pretrained, tiny=spec["tiny"], context_length=spec["context_length"])
