"""A tiny CLIP shipped as a file, as a released CLIP is: the web CLIP that ``scripts/build_web_clip.py``
writes (``weights/web-clip``) or the ``artifacts/clip`` of an earlier run. Its ``clip.json`` rides beside
the weights and says how to build the network, as a downloaded open_clip model comes with its config.
Only ``pretrain_clip`` reads it; every later stage reads the spec that stage records."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.models.clip_artifact import SPEC_FILE, clip_spec
from pipeline.models.clip_backbone import CLIP_CONTEXT_LENGTH, TINY_RN, TINY_VIT


def external_clip_spec(name: str, pretrained: str, tiny: dict, max_tokens: int) -> dict:
    """The spec of a CLIP whose weights lie outside ``artifacts/clip`` (``model.clip.pretrained`` a tag or
    a path). A released CLIP is built at open_clip's text context. A tiny CLIP's file is read as a
    shipped build (``scripts/build_web_clip.py``) or an earlier ``pretrain_clip``: its architecture is
    the ``clip.json`` beside it, as a downloaded open_clip model comes with its config, so
    ``model.clip.tiny`` (``tiny``) is used only where there is none. The name must match it, and the text
    context must be ``model.max_tokens`` (``max_tokens``): the tiny text tower has one position per token."""
    if name not in (TINY_RN, TINY_VIT):
        return clip_spec(name, pretrained, None, CLIP_CONTEXT_LENGTH)
    record_path = Path(pretrained).parent / SPEC_FILE
    if not record_path.is_file():
        return clip_spec(name, pretrained, tiny, max_tokens)
    record = json.loads(record_path.read_text())
    if record.get("name") != name:
        raise ValueError(f"{record_path}: the weights beside it are a {record.get('name')!r} CLIP, but "
                         f"model.clip.name is {name!r}")
    if record.get("context_length") != max_tokens:
        raise ValueError(f"{record_path}: the CLIP's text context is {record.get('context_length')} tokens, "
                         f"but model.max_tokens is {max_tokens}; set model.max_tokens to "
                         f"{record.get('context_length')}")
    return clip_spec(name, pretrained, record["tiny"], max_tokens)
