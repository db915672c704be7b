"""The ``artifacts/clip`` directory: which CLIP every later stage initialises from and freezes.

For the embedded default it holds the checkpoint trained by ``pretrain_clip``; for real weights it
only records the open_clip name and the tag or local path, so RN50 weights are never copied around.

``frozen_clip.json`` next to it says which CLIP is the frozen one of calibration (Eq. 8-9) and PRMS
(Eq. 10): a copy of ``clip.json`` for ``model.frozen_clip: same``, or its own open_clip name and tag /
local path (the authors freeze a separate ViT-B/32). :func:`load_frozen_clip` is the one way to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.atomic import write_json
from pipeline.models.clip_backbone import CLIP_CONTEXT_LENGTH, TINY_RN, TINY_VIT, FrozenClip, build_clip

SPEC_FILE = "clip.json"
FROZEN_SPEC_FILE = "frozen_clip.json"
WEIGHTS_FILE = "clip.pt"
FROZEN_WEIGHTS_FILE = "frozen_clip.pt"  # the embedded frozen CLIP (model.frozen_clip.pretrained: embedded)
LOCAL_WEIGHTS = (WEIGHTS_FILE, FROZEN_WEIGHTS_FILE)  # weights stored inside the clip folder itself


def clip_spec(name: str, pretrained: str, tiny: dict | None, context_length: int) -> dict:
    return {"name": name, "pretrained": pretrained, "tiny": tiny, "context_length": context_length}


def frozen_clip_spec(frozen_name: str, frozen_pretrained: str, clip: dict) -> dict:
    """The frozen CLIP's spec: ``clip`` (the spec of ``clip.json``) itself for ``same``, else its own
    name and tag / path (a tiny name reuses ``clip``'s tiny config and context length)."""
    if frozen_name == "same":
        return dict(clip)
    if frozen_name in (TINY_RN, TINY_VIT):
        return clip_spec(frozen_name, frozen_pretrained, clip["tiny"], clip["context_length"])
    return clip_spec(frozen_name, frozen_pretrained, None, CLIP_CONTEXT_LENGTH)


def write_clip_spec(clip_dir: Path, spec: dict, file: str = SPEC_FILE) -> None:
    write_json(Path(clip_dir) / file, spec)


def read_clip_spec(clip_dir: str | Path, file: str = SPEC_FILE) -> dict:
    path = Path(clip_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CLIP spec missing; run the pretrain_clip stage (again) first")
    return json.loads(path.read_text())


def _build_from_spec(clip_dir: str | Path, spec: dict) -> nn.Module:
    pretrained = spec["pretrained"]
    if pretrained in LOCAL_WEIGHTS:
        pretrained = str(Path(clip_dir) / pretrained)
    return build_clip(spec["name"], pretrained, tiny=spec["tiny"], context_length=spec["context_length"])


def load_clip(clip_dir: str | Path) -> nn.Module:
    """A fresh CLIP instance with the weights the spec points at (call twice for two copies)."""
    return _build_from_spec(clip_dir, read_clip_spec(clip_dir))


def load_frozen_clip(clip_dir: str | Path) -> FrozenClip:
    """The frozen CLIP of calibration and PRMS, as ``frozen_clip.json`` in ``clip_dir`` records it.

    A missing spec or a weights path that no longer exists fails here with the path in the message,
    before any training or pseudo-labelling starts.
    """
    spec = read_clip_spec(clip_dir, FROZEN_SPEC_FILE)
    pretrained = spec["pretrained"]
    if pretrained not in LOCAL_WEIGHTS and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin",
                                                                                ".safetensors"))):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"{Path(clip_dir) / FROZEN_SPEC_FILE}: frozen CLIP weights "
                                    f"{pretrained!r} not found (model.frozen_clip.pretrained)")
    return FrozenClip(_build_from_spec(clip_dir, spec))


def resolve_calibration_size(value: int | str, frozen: FrozenClip) -> int:
    """``step1.calibration_size``: an int as given, ``auto`` = the frozen CLIP's native image size."""
    return frozen.image_size if value == "auto" else int(value)
