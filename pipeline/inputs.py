"""The pipeline's real inputs (the REFER files, the images, the CLIP weight files) as DVC sees them.

DVC re-runs a stage when one of its ``deps`` changes, and a file that is no dep is invisible to it. The
dataset and the weights are read from paths given in ``params.yaml`` (``data.refer.*``,
``model.clip.pretrained``, ``model.frozen_clip.pretrained``), and ``dvc.yaml`` cannot list a dep only on
one branch (``data.source: refer``) or derive one from a tag, so ``params.yaml`` names the dep paths
itself in ``inputs`` (``refs``, ``images``, ``weights``) and ``dvc.yaml`` interpolates them
(``${inputs.refs}``). Their defaults exist in a clean clone: the synthetic dataset that ``synthesize``
writes, and the ``models/`` folder. What keeps the two in step is :func:`require_tracked`: ``index`` and
``pretrain_clip`` check that every file they read lies under the matching ``inputs`` path. Under DVC
(which sets ``DVC_STAGE`` for a stage's command) a file outside stops the stage in one line naming the
key to set, since DVC would otherwise serve stale results after that file changed; in a direct run of a
stage script (tests, a hand-run torchrun) DVC caches nothing, so it is one warning line.

Weights reach the later stages through ``artifacts/clip``, which records only their path. Two records of
their content close that gap: ``pretrain_clip`` writes ``weights.json`` (path, size, md5 of each external
weight file) into ``artifacts/clip``, so a byte change re-runs it and changes its output, and every
stage downstream re-runs; and :func:`external_weights` lets the training resume fingerprint
(:func:`pipeline.train.common.fingerprint`) hash the current file. Full md5, not a sampled hash: a
fine-tuned checkpoint can differ from its parent only in the middle of the file, and hashing RN50's
244 MB (ViT-L/14's 890 MB) takes about 0.5 s (2 s), once per stage start, against minutes of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

# No first-party import: ``index`` uses the checks below, and an import of the CLIP code here would make
# every edit of it re-run ``index`` (dvc.yaml's code deps are the import closure, pipeline/codedeps.py).

DOCS = 'docs/operations.md, "Real inputs as DVC dependencies"'
MANIFEST_FILE = "weights.json"
"""In ``artifacts/clip``: the identity of each external weight file (absent when there is none)."""
DVC_STAGE_ENV = "DVC_STAGE"
"""Set by DVC for every stage command it runs (``dvc repro``, ``dvc exp run``)."""

_NOT_A_FILE = ("embedded", "same", "", "none", "None")
_TINY = ("tiny-rn", "tiny-vit")


def covers(declared: str | Path, path: str | Path) -> bool:
    """``path`` is ``declared`` or lies below it, compared both as written (absolute) and with symlinks
    resolved: a dep on a symlinked folder covers what is read through it, and the reverse."""
    for norm in (os.path.abspath, os.path.realpath):
        d, p = Path(norm(declared)), Path(norm(path))
        if p == d or p.is_relative_to(d):
            return True
    return False


def uncovered(reads: Iterable[tuple[str, Path]], key: str, declared: str, hint: str) -> list[str]:
    """One message per ``(param, file)`` read that does not lie under ``inputs.<key>`` (= ``declared``);
    ``hint`` says what to set it to."""
    return [f"{param}: {path} is not under inputs.{key} {declared!r}, so DVC would not re-run the stage "
            f"when it changes; set inputs.{key} to {hint}"
            for param, path in reads if not covers(declared, path)]


def under_dvc() -> bool:
    return bool(os.environ.get(DVC_STAGE_ENV))


def require_tracked(stage: str, problems: list[str]) -> None:
    """Under DVC: exit 1 with one line listing ``problems``. Outside DVC: one warning line on stderr."""
    if not problems:
        return
    line = f"{stage}: {'; '.join(problems)} ({DOCS})"
    if under_dvc():
        sys.exit(line)
    print(f"warning: {line}", file=sys.stderr)


def cached_tag_file(name: str, tag: str) -> Path | None:
    """The local file open_clip loads for ``pretrained`` tag ``tag`` of model ``name``, if cached.

    Mirrors ``open_clip.pretrained.download_pretrained`` (3.x), which this pipeline never lets download: a
    ``file`` entry; else, with huggingface_hub installed and an ``hf_hub`` entry, the Hub cache (the
    ``.safetensors`` alternative first); else the URL's file in ``~/.cache/clip``. ``None`` when nothing is
    cached (loading then fails with its own message)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        return None
    if "file" in cfg:
        return Path(cfg["file"]) if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        hub = ""
    if hub:
        model_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else (
            filename[:-4] + ".safetensors" if filename.endswith((".bin", ".pth")) else None)
        for candidate in (safe, filename):
            found = try_to_load_from_cache(model_id, candidate) if candidate else None
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        return None
    url = cfg.get("url", "")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return target if url and target.is_file() else None


def weights_file(name: str, pretrained: str) -> Path | None:
    """The file CLIP ``name`` with ``pretrained`` (as ``params.yaml`` gives it) reads: a local path as
    given, or a tag's cached file; ``None`` for random, ``embedded`` or ``same`` weights and for a tag that
    is not cached."""
    if pretrained in _NOT_A_FILE:
        return None
    if os.path.isfile(pretrained):
        return Path(pretrained)
    return None if name in _TINY else cached_tag_file(name, pretrained)


def spec_weights(spec: dict, local: Iterable[str]) -> Path | None:
    """:func:`weights_file` of a CLIP spec (``artifacts/clip/clip.json``); ``None`` for weights stored
    in the CLIP folder itself (names in ``local``: they are part of the folder, hashed with it)."""
    return None if spec["pretrained"] in tuple(local) else weights_file(spec["name"], spec["pretrained"])


def external_weights(inputs: Iterable[str | Path], spec_files: Iterable[str], local: Iterable[str]
                     ) -> list[Path]:
    """The external weight files that the CLIP folders among ``inputs`` (those holding one of
    ``spec_files``) point at, in first-seen order without repeats; other inputs add nothing."""
    spec_files, local = tuple(spec_files), tuple(local)
    found: list[Path] = []
    for item in inputs:
        for spec_file in spec_files:
            spec_path = Path(item) / spec_file
            if spec_path.is_file():
                path = spec_weights(json.loads(spec_path.read_text()), local)
                if path is not None and path not in found:
                    found.append(path)
    return found


def file_identity(path: str | Path) -> dict:
    """``{"path", "bytes", "md5"}`` of one file (md5 over every byte, read 1 MiB at a time)."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(path), "bytes": os.path.getsize(path), "md5": h.hexdigest()}


def weights_manifest(specs: dict[str, dict], local: Iterable[str]) -> dict | None:
    """``{key: identity | None}`` for CLIP specs by key (``clip``, ``frozen_clip``), or ``None`` when
    none reads an external file (the embedded default: nothing to record)."""
    local = tuple(local)
    manifest = {}
    for key, spec in specs.items():
        path = spec_weights(spec, local)
        manifest[key] = None if path is None else file_identity(path)
    return manifest if any(manifest.values()) else None
