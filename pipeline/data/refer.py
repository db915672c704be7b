"""Reading a dataset in REFER's layout (RefCOCO, RefCOCO+, RefCOCOg umd/google, RefCLEF, synthetic).

Layout: ``root/<dataset>/refs(<split_by>).p`` (a pickled list of ref dicts) and
``root/<dataset>/instances.json`` (COCO-style images / annotations / categories). Images live elsewhere
(``image_dir``); the index stage joins them.

Errors name the file and the problem, because the usual failure is a wrong ``data.refer.root`` or
``split_by`` and the user needs to see which path was tried.

Structural checks stop here, naming the file, the field and the id, because every later stage keys on
these ids and a duplicate or a non-integer id otherwise surfaces as an unrelated crash stages later:

- ids (``ref_id``, ``ann_id``, ``image_id``, ``sent_id``, instances' image and annotation ``id``) must be
  integers, and ``ref_id``, ``sent_id``, image ``id`` and annotation ``id`` unique;
- every image entry needs a ``file_name`` inside the image folder (no absolute path, no ``..``; a
  dataset file must not make the pipeline read elsewhere) and positive integer ``width`` and ``height``.

Problems with one object's ground truth (a bad split, bbox or mask) are not structural: the index skips
that ref and counts it (:mod:`pipeline.data.index`).

A pickle can run code while it loads. The refs file is read with :class:`RestrictedUnpickler`, which
admits only what REFER files hold (lists, dicts, strings, numbers, and the few builtins Python 3 uses to
pickle bytes and sets), so a crafted ``refs(*).p`` is refused instead of executed.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
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


# The only globals a refs pickle may name. Plain containers and scalars need no global at all; Python 3
# pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(text, "latin1")`` and sets as ``builtins.set``.
_ALLOWED_GLOBALS = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),
})


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`_ALLOWED_GLOBALS` (a class or a callable)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class and callable a REFER refs file cannot contain.

    Why: ``pickle.load`` calls whatever a pickle names (``os.system`` via ``__reduce__``), and the refs
    file is data downloaded from elsewhere. Refusing in :meth:`find_class` stops before anything runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenPickleError(f"the pickle names {module}.{name}, which a REFER refs file never "
                                       "holds (only lists, dicts, strings and numbers are loaded)")
        return super().find_class(module, name)


def restricted_loads(data: bytes, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding`` as for :func:`pickle.loads`)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _load_pickle(path: Path) -> Any:
    data = path.read_bytes()
    try:
        try:
            return restricted_loads(data)
        except UnicodeDecodeError:
            # A Python-2 pickle whose byte strings are not ASCII: read them as latin-1 and re-decode.
            return _repair_py2_text(restricted_loads(data, encoding="latin-1"))
    except ForbiddenPickleError as err:
        raise ValueError(f"{path}: refused to load: {err}; a pickle can run code, so this file is not "
                         "read (replace it with the original REFER download)") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_unique(ids: Iterable[tuple[Any, Any]], path: Path, field: str, owner: str) -> None:
    """Raise naming ``field`` and the first id that occurs twice; ``ids`` yields ``(id, where)`` pairs."""
    seen: dict[Any, Any] = {}
    for ident, where in ids:
        if ident in seen:
            raise ValueError(f"{path}: {field} {ident!r} occurs twice ({owner} {seen[ident]!r} and "
                             f"{where!r}); {field} must be unique")
        seen[ident] = where


def escapes_folder(file_name: str) -> bool:
    """Whether ``file_name`` is absolute or climbs out with ``..`` (POSIX or Windows spelling)."""
    posix, windows = PurePosixPath(file_name), PureWindowsPath(file_name)
    return (posix.is_absolute() or windows.is_absolute() or bool(windows.drive) or bool(windows.root)
            or ".." in posix.parts or ".." in windows.parts)


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
        for key in ("ref_id", "ann_id", "image_id"):
            if not _is_int(ref[key]):
                who = f"ref {ref['ref_id']!r}" if key != "ref_id" else f"ref at position {i}"
                raise ValueError(f"{path}: {who} has {key} {ref[key]!r}, expected an integer id")
    _require_unique(((ref["ref_id"], i) for i, ref in enumerate(refs)), path, "ref_id", "refs at positions")
    _require_unique(((sent_id, ref["ref_id"]) for ref in refs for sent_id in _sent_ids(ref, path)),
                    path, "sent_id", "in refs")
    return refs


def _sent_ids(ref: dict, path: Path) -> list[int]:
    """The sentence ids of one ref (a sentence's own ``sent_id``, else ``sent_ids[k]``), all integers."""
    sent_ids = ref.get("sent_ids") or []
    out = []
    for k, sent in enumerate(ref["sentences"]):
        sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
        if sent_id is None and k < len(sent_ids):
            sent_id = sent_ids[k]
        if sent_id is None:
            raise ValueError(f"{path}: ref {ref['ref_id']!r}: sentence {k} has no sent_id")
        if not _is_int(sent_id):
            raise ValueError(f"{path}: ref {ref['ref_id']!r}: sentence {k} has sent_id {sent_id!r}, "
                             "expected an integer id")
        out.append(sent_id)
    return out


def _check_instances(instances: Any, path: Path) -> dict:
    if not isinstance(instances, dict):
        raise ValueError(f"{path}: expected a COCO-style JSON object, got {type(instances).__name__}")
    missing = [k for k in REQUIRED_INSTANCE_KEYS if not isinstance(instances.get(k), list)]
    if missing:
        raise ValueError(f"{path}: missing or non-list key(s) {missing}")
    for i, image in enumerate(instances["images"]):
        _check_image_entry(image, i, path)
    for i, ann in enumerate(instances["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{path}: annotations[{i}] is a {type(ann).__name__}, expected an object")
        for key in ("id", "image_id"):
            if not _is_int(ann.get(key)):
                raise ValueError(f"{path}: annotations[{i}] has {key} {ann.get(key)!r}, "
                                 "expected an integer id")
    _require_unique(((im["id"], i) for i, im in enumerate(instances["images"])), path, "image id",
                    "images at positions")
    _require_unique(((a["id"], i) for i, a in enumerate(instances["annotations"])), path, "annotation id",
                    "annotations at positions")
    return instances


def _check_image_entry(image: Any, i: int, path: Path) -> None:
    """One ``images[i]`` entry: integer id, a file_name inside the image folder, positive integer size."""
    if not isinstance(image, dict):
        raise ValueError(f"{path}: images[{i}] is a {type(image).__name__}, expected an object")
    if not _is_int(image.get("id")):
        raise ValueError(f"{path}: images[{i}] has id {image.get('id')!r}, expected an integer id")
    who = f"image {image['id']}"
    name = image.get("file_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: {who} has file_name {name!r}, expected a file name")
    if escapes_folder(name):
        raise ValueError(f"{path}: {who} has file_name {name!r}, which leaves the image folder "
                         "(absolute paths and '..' are refused)")
    for key in ("width", "height"):
        if key not in image:
            raise ValueError(f"{path}: {who} lacks '{key}'")
        if not _is_int(image[key]) or image[key] <= 0:
            raise ValueError(f"{path}: {who} has {key} {image[key]!r}, expected a positive integer")


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
