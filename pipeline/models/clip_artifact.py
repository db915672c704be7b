"""The ``artifacts/clip`` directory: which CLIP every later stage initialises from and freezes.

For the embedded default it holds the checkpoint trained by ``pretrain_clip``; for real weights it
only records the open_clip name and the tag or local path, so RN50 weights are never copied around.

``frozen_clip.json`` next to it says which CLIP is the frozen one of calibration (Eq. 8-9) and PRMS
(Eq. 10): a copy of ``clip.json`` for ``model.frozen_clip: same``, or its own open_clip name and tag /
local path (the authors freeze a separate ViT-B/32). :func:`load_frozen_clip` is the one way to load it.

Each spec records ``quick_gelu``, the activation its name builds (GELU and QuickGELU share every weight,
so only this record tells them apart); loading refuses a CLIP that builds the other one. A spec without
the key, written before it was recorded, is read as GELU for the tiny CLIPs (the only activation they
have) and refused otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from pipeline.atomic import write_json
from pipeline.models.clip_backbone import (
    CLIP_CONTEXT_LENGTH,
    TINY_RN,
    TINY_VIT,
    ActivationError,
    FrozenClip,
    build_clip,
    name_quick_gelu,
)

SPEC_FILE = "clip.json"
FROZEN_SPEC_FILE = "frozen_clip.json"
WEIGHTS_FILE = "clip.pt"
FROZEN_WEIGHTS_FILE = "frozen_clip.pt"  # the embedded frozen CLIP (model.frozen_clip.pretrained: embedded)
LOCAL_WEIGHTS = (WEIGHTS_FILE, FROZEN_WEIGHTS_FILE)  # weights stored inside the clip folder itself


def clip_spec(name: str, pretrained: str, tiny: dict | None, context_length: int) -> dict:
    """What rebuilds a CLIP: name, weights, tiny config, text context and the activation ``name`` builds
    (:func:`~pipeline.models.clip_backbone.build_clip` refuses weights that need the other one)."""
    return {"name": name, "pretrained": pretrained, "tiny": tiny, "context_length": context_length,
            "quick_gelu": name_quick_gelu(name)}


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


def recorded_quick_gelu(record: dict, name_key: str, where: str) -> bool:
    """The activation a spec or checkpoint meta ``record`` holds under ``quick_gelu``; a record written
    before the key existed is GELU when its CLIP (``record[name_key]``) is a tiny one, the only
    activation those have, and refused otherwise, since both activations load the same weights."""
    if "quick_gelu" in record:
        if not isinstance(record["quick_gelu"], bool):
            raise ActivationError(f"{where}: quick_gelu is {record['quick_gelu']!r}, not true or false")
        return record["quick_gelu"]
    if record.get(name_key) in (TINY_RN, TINY_VIT):
        return False
    raise ActivationError(f"{where} does not record its CLIP's activation (GELU or QuickGELU; written by an "
                          "earlier version of this pipeline), so the network cannot be rebuilt for certain; "
                          "re-run the stage that wrote it")


def _build_from_spec(clip_dir: str | Path, spec: dict, file: str) -> nn.Module:
    where = Path(clip_dir) / file
    quick_gelu = recorded_quick_gelu(spec, "name", str(where))
    pretrained = spec["pretrained"]
    if pretrained in LOCAL_WEIGHTS:
        pretrained = str(Path(clip_dir) / pretrained)
    try:
        return build_clip(spec["name"], pretrained, tiny=spec["tiny"], context_length=spec["context_length"],
                          quick_gelu=quick_gelu)
    except ActivationError as err:
        raise ActivationError(f"{where}: {err}") from err


def load_clip(clip_dir: str | Path) -> nn.Module:
    """A fresh CLIP instance with the weights the spec points at (call twice for two copies)."""
    return _build_from_spec(clip_dir, read_clip_spec(clip_dir), SPEC_FILE)


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
    return FrozenClip(_build_from_spec(clip_dir, spec, FROZEN_SPEC_FILE))


def resolve_calibration_size(value: int | str, frozen: FrozenClip) -> int:
    """``step1.calibration_size``: an int as given, ``auto`` = the frozen CLIP's native image size."""
    return frozen.image_size if value == "auto" else int(value)
