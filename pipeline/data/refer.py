"""Reading a dataset in REFER's layout (RefCOCO, RefCOCO+, RefCOCOg umd/google, RefCLEF, synthetic).

Layout: ``root/<dataset>/refs(<split_by>).p`` (a pickled list of ref dicts) and
``root/<dataset>/instances.json`` (COCO-style images / annotations / categories). Images live elsewhere
(``image_dir``); the index stage joins them.

Errors name the file and the problem, because the usual failure is a wrong ``data.refer.root`` or
``split_by`` and the user needs to see which path was tried. Note that pickles can run code when loaded:
only point this at dataset files you trust (the official REFER release or this pipeline's generator).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
REQUIRED_INSTANCE_KEYS = ("images", "annotations")


def refs_path(root: Path, dataset: str, split_by: str) -> Path:
    """Where REFER keeps the refs pickle of ``dataset`` split by ``split_by``."""
    return Path(root) / dataset / f"refs({split_by}).p"


def instances_path(root: Path, dataset: str) -> Path:
    return Path(root) / dataset / "instances.json"


def _repair_py2_text(value: Any) -> Any:
    """Undo latin-1 decoding of Python-2 ``str`` bytes that were really UTF-8 (REFER's pickles are py2)."""
    if isinstance(value, str):
        try:
            return value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return value
    if isinstance(value, list):
        return [_repair_py2_text(v) for v in value]
    if isinstance(value, dict):
        return {_repair_py2_text(k): _repair_py2_text(v) for k, v in value.items()}
    return value


def _load_pickle(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return pickle.load(fh)
    except UnicodeDecodeError:
        # A Python-2 pickle whose byte strings are not ASCII: read them as latin-1 and re-decode.
        with path.open("rb") as fh:
            return _repair_py2_text(pickle.load(fh, encoding="latin-1"))
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise ValueError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from err


def _check_refs(refs: Any, path: Path) -> list[dict]:
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise ValueError(f"{path}: item {i} is a {type(ref).__name__}, expected a ref dict")
        missing = [k for k in REQUIRED_REF_KEYS if k not in ref]
        if missing:
            raise ValueError(f"{path}: ref at position {i} lacks required key(s) {missing}")
        if not isinstance(ref["sentences"], list):
            raise ValueError(f"{path}: ref {ref['ref_id']!r} has 'sentences' of type "
                             f"{type(ref['sentences']).__name__}, expected a list")
    return refs


def _check_instances(instances: Any, path: Path) -> dict:
    if not isinstance(instances, dict):
        raise ValueError(f"{path}: expected a COCO-style JSON object, got {type(instances).__name__}")
    missing = [k for k in REQUIRED_INSTANCE_KEYS if not isinstance(instances.get(k), list)]
    if missing:
        raise ValueError(f"{path}: missing or non-list key(s) {missing}")
    return instances


def load_refer(root: str | Path, dataset: str, split_by: str) -> tuple[list[dict], dict]:
    """Read ``(refs, instances)`` of one REFER dataset; raise naming the path on any problem.

    Missing root, dataset folder, pickle or JSON -> :class:`FileNotFoundError`; a pickle that is not a
    list of ref dicts with ``ref_id, ann_id, image_id, split, sentences``, or an instances file without
    ``images`` / ``annotations`` lists -> :class:`ValueError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: REFER data root not found")
    if not (root / dataset).is_dir():
        raise FileNotFoundError(f"{root / dataset}: dataset folder not found (dataset={dataset!r})")
    ref_file, inst_file = refs_path(root, dataset, split_by), instances_path(root, dataset)
    for path in (ref_file, inst_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found (dataset={dataset!r}, split_by={split_by!r})")
    refs = _check_refs(_load_pickle(ref_file), ref_file)
    try:
        with inst_file.open(encoding="utf-8") as fh:
            instances = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{inst_file}: not valid JSON ({err})") from err
    return refs, _check_instances(instances, inst_file)
