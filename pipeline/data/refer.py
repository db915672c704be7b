"""Reading a dataset in REFER's layout (RefCOCO, RefCOCO+, RefCOCOg umd/google, RefCLEF, synthetic).

Layout: ``root/<dataset>/refs(<split_by>).p`` (a pickled list of ref dicts) and
``root/<dataset>/instances.json`` (COCO-style images / annotations / categories). Images live elsewhere
(``image_dir``); the index stage joins them.

Errors name the file and the problem, because the usual failure is a wrong ``data.refer.root`` or
``split_by`` and the user needs to see which path was tried.

Structural checks stop here, naming the file, the field and the id, because every later stage keys on
these ids and a duplicate or a non-integer id otherwise surfaces as an unrelated crash stages later:

- ids (``ref_id``, ``ann_id``, ``image_id``, ``sent_id``, instances' image and annotation ``id``) must be
  integers that fit the index's int64 columns, and ``ref_id``, ``sent_id``, image ``id`` and annotation
  ``id`` unique; a ``category_id`` (annotation, ref or category entry) must be an integer in int32;
- every image entry needs a ``file_name`` inside the image folder (no absolute path, no ``..``; a
  dataset file must not make the pipeline read elsewhere) and positive integer ``width`` and ``height``;
- text the index stores (a sentence's text, a ``file_name``, a category ``name``) must be valid Unicode:
  a lone surrogate such as ``\ud800`` cannot be written as UTF-8;
- neither file may nest containers deeper than :data:`MAX_NESTING_DEPTH` (REFER's refs nest 5 deep,
  COCO's instances 5), nor hold a container inside itself.

Problems with one object's ground truth (a bad split, bbox or mask) are not structural: the index skips
that ref and counts it (:mod:`pipeline.data.index`).

A pickle can run code while it loads. The refs file is read with :class:`RestrictedUnpickler`, which
admits only what REFER files hold (lists, dicts, strings, numbers, and the few builtins Python 3 uses to
pickle bytes and sets), so a crafted ``refs(*).p`` is refused instead of executed.

A pickle can also make a few bytes cost gigabytes. The bounds: the admitted builtins are wrapped so
that ``bytearray`` takes no size argument, ``_codecs.encode`` only the ``latin1`` Python 3 writes, and
all of them together may build at most as many elements as the file has bytes (plus 1 MiB), which a
real pickle never exceeds since each element is spelt in it; every other object costs at least one
opcode, so what loads is at most a small multiple of the file's size. Shared references (the pickle
memo) stay shared: the depth check and the Python-2 text repair visit each object once, so 24 levels of
``L[i] = [L[i-1], L[i-1]]`` (224 bytes, 2**24 leaves and gigabytes once expanded) load in milliseconds,
and the issue's 466-byte, 50-level one is refused for its depth before anything walks it recursively.
"""

from __future__ import annotations

import gc
import io
import json
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
REQUIRED_INSTANCE_KEYS = ("images", "annotations")
# How deep lists, dicts, tuples and sets may nest in either file. REFER's refs nest 5 deep (list, ref,
# sentences, sentence, tokens) and COCO's instances 5 (object, annotations, annotation, segmentation,
# polygon); the limit only has to stop a file that would make a recursive reader overflow.
MAX_NESTING_DEPTH = 32
# The slack on top of the file's size that the admitted pickle builtins may build (elements or bytes).
PICKLE_BUILD_SLACK = 1 << 20
_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)


def refs_path(root: Path, dataset: str, split_by: str) -> Path:
    """Where REFER keeps the refs pickle of ``dataset`` split by ``split_by``."""
    return Path(root) / dataset / f"refs({split_by}).p"


def instances_path(root: Path, dataset: str) -> Path:
    return Path(root) / dataset / "instances.json"


def _repair_py2_text(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """Undo latin-1 decoding of Python-2 ``str`` bytes that were really UTF-8 (REFER's pickles are py2).

    Memoised by object id, so an object the pickle shares (its memo) is repaired once and stays shared:
    a list of lists that names one list twice per level would otherwise expand exponentially. The caller
    has checked depth and cycles (:func:`_nesting_problem`), which bounds the recursion; ``value`` keeps
    every visited object alive, so no id is reused during the walk.
    """
    memo = {} if memo is None else memo
    if isinstance(value, str):
        if value.isascii():  # nothing to repair: the same object, so sharing costs nothing
            return value
        key = id(value)
        out = memo.get(key)
        if out is None:
            try:
                out = value.encode("latin-1").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                out = value
            memo[key] = out
        return out
    if not isinstance(value, list | dict):
        return value
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, list):
        memo[key] = out = []  # registered before filling: a shared list is built once
        out.extend([_repair_py2_text(v, memo) for v in value])
        return out
    memo[key] = out = {}
    for k, v in value.items():
        out[_repair_py2_text(k, memo)] = _repair_py2_text(v, memo)
    return out


# The only globals a refs pickle may name. Plain containers and scalars need no global at all; Python 3
# pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(text, "latin1")`` and sets as ``builtins.set``.
_ALLOWED_GLOBALS = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),
})


class ForbiddenPickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`_ALLOWED_GLOBALS` (a class or a callable)."""


_LATIN1 = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


class PickleBombError(pickle.UnpicklingError):
    """The pickle asks an admitted builtin for more than a REFER refs file can hold (a size, not content)."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every class and callable a REFER refs file cannot contain, and bounds
    what the admitted builtins may build.

    Why: ``pickle.load`` calls whatever a pickle names (``os.system`` via ``__reduce__``), and the refs
    file is data downloaded from elsewhere. Refusing in :meth:`find_class` stops before anything runs.
    The admitted builtins are handed out wrapped: ``bytearray(2**31)`` is 38 bytes of pickle and 2 GiB
    of memory, ``_codecs.encode(x, "hex")`` doubles ``x`` per call, and ``set(L)`` called on one shared
    list many times grows as the product. ``budget`` (default: the size of ``file`` plus
    :data:`PICKLE_BUILD_SLACK`) is how many elements or bytes they may build in all.
    """

    def __init__(self, file: io.BytesIO, *, encoding: str = "ASCII", budget: int | None = None) -> None:
        super().__init__(file, encoding=encoding)
        self._budget = (file.getbuffer().nbytes + PICKLE_BUILD_SLACK) if budget is None else budget

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ForbiddenPickleError(f"the pickle names {module}.{name}, which a REFER refs file never "
                                       "holds (only lists, dicts, strings and numbers are loaded)")
        return {"set": self._set, "frozenset": self._frozenset, "bytearray": self._bytearray,
                "encode": self._encode}[name]

    def _spend(self, n: int, what: str) -> None:
        if n > self._budget:
            raise PickleBombError(f"the pickle builds more than a refs file of its size can hold ({what} of "
                                  f"{n} elements with {max(self._budget, 0)} left of the file's allowance)")
        self._budget -= n

    def _sized(self, args: tuple, what: str) -> Any:
        """The one iterable argument of ``set`` / ``frozenset``, charged by its length."""
        if len(args) > 1:
            raise PickleBombError(f"{what}() called with {len(args)} arguments")
        items = args[0] if args else ()
        if not isinstance(items, list | tuple | set | frozenset | str | bytes | bytearray | dict):
            raise PickleBombError(f"{what}() called on a {type(items).__name__}, which a refs file never "
                                  "holds")
        self._spend(len(items), what)
        return items

    def _set(self, *args: Any) -> set:
        return set(self._sized(args, "set"))

    def _frozenset(self, *args: Any) -> frozenset:
        return frozenset(self._sized(args, "frozenset"))

    def _bytearray(self, *args: Any) -> bytearray:
        """``bytearray()``, ``bytearray(bytes)`` or ``bytearray(text, 'latin-1')``: never a size."""
        if not args:
            return bytearray()
        source, rest = args[0], args[1:]
        if isinstance(source, bytes | bytearray) and not rest:
            self._spend(len(source), "bytearray")
            return bytearray(source)
        if isinstance(source, str) and len(rest) == 1 and isinstance(rest[0], str) \
                and rest[0].lower() in _LATIN1:
            self._spend(len(source), "bytearray")
            return bytearray(source, "latin-1")
        what = f"an integer size of {_show(source)}" if _is_int(source) else f"a {type(source).__name__}"
        raise PickleBombError(f"bytearray() called with {what}; a refs file only pickles bytes that way")

    def _encode(self, *args: Any) -> bytes:
        """``_codecs.encode(text, 'latin1')``, the way Python 3 pickles ``bytes`` at protocol <= 2."""
        if len(args) != 2 or not isinstance(args[0], str) or not isinstance(args[1], str) \
                or args[1].lower() not in _LATIN1:
            encoding = _show(args[1]) if len(args) == 2 else f"{len(args)} arguments"
            raise PickleBombError(f"_codecs.encode called with {encoding}; a refs file only uses 'latin1'")
        self._spend(len(args[0]), "bytes")
        return args[0].encode("latin-1")


def restricted_loads(data: bytes, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding`` as for :func:`pickle.loads`)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


# Exact types: an unpickler that admits no class and a JSON reader build no subclasses.
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset})


def _children(value: Any) -> Iterator[Any]:
    return chain(value, value.values()) if type(value) is dict else iter(value)


def _nesting_problem(root: Any, limit: int = MAX_NESTING_DEPTH) -> str | None:
    """Why ``root`` cannot be walked safely (nested deeper than ``limit`` or a container inside itself),
    or None.

    Iterative and memoised by object id: each container is visited once however often the pickle
    shares it, so the walk costs what the file holds, not what a recursive reader would expand.
    """
    containers = _CONTAINERS
    if type(root) not in containers:
        return None
    height: dict[int, int] = {}  # id -> levels of containers at and below it, for finished containers
    on_path = {id(root)}
    stack: list[list[Any]] = [[root, _children(root), 0]]  # container, its children, tallest child so far
    while stack:
        top = stack[-1]
        for child in top[1]:
            if type(child) not in containers:
                continue
            key = id(child)
            if key in on_path:
                return f"a {type(child).__name__} contains itself {len(stack)} levels down"
            if key in height:
                if len(stack) + height[key] > limit:
                    return f"containers nest more than {limit} levels deep"
                top[2] = max(top[2], height[key])
                continue
            if len(stack) >= limit:
                return f"containers nest more than {limit} levels deep"
            on_path.add(key)
            stack.append([child, _children(child), 0])
            break
        else:
            stack.pop()
            on_path.discard(id(top[0]))
            height[id(top[0])] = top[2] + 1
            if stack:
                stack[-1][2] = max(stack[-1][2], top[2] + 1)
    return None


def _show(value: Any, limit: int = 60) -> str:
    """``value`` for an error message, whatever a hostile file put there: a huge integer by its size
    (its decimal repr may exceed Python's digit limit), a long string cut, a container by its type."""
    if _is_int(value):
        return repr(value) if value.bit_length() <= 96 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str | bytes | bytearray):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}... ({len(value)} long)"
    if value is None or isinstance(value, bool | float):
        return repr(value)
    return f"a {type(value).__name__}"


def unencodable(text: str) -> int | None:
    """Position of the first character of ``text`` that UTF-8 cannot hold (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def sentence_text(sent: Any) -> Any:
    """The text the index stores for one REFER sentence: its cleaned ``sent``, else ``raw`` (the rule of
    ``pipeline.data.index._sentence_text``)."""
    if not isinstance(sent, dict):
        return None
    text = sent.get("sent")
    return sent.get("raw") if text is None else text


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: building millions of containers otherwise triggers it over
    and over (a RefCOCO-sized refs file loads about three times faster without it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_pickle(path: Path) -> Any:
    with _no_cyclic_gc():
        return _load_pickle_unguarded(path)


def _load_pickle_unguarded(path: Path) -> Any:
    data = path.read_bytes()
    try:
        try:
            loaded, py2 = restricted_loads(data), False
        except UnicodeDecodeError:
            # A Python-2 pickle whose byte strings are not ASCII: read them as latin-1 and re-decode.
            loaded, py2 = restricted_loads(data, encoding="latin-1"), True
    except ForbiddenPickleError as err:
        raise ValueError(f"{path}: refused to load: {err}; a pickle can run code, so this file is not "
                         "read (replace it with the original REFER download)") from err
    except PickleBombError as err:
        raise ValueError(f"{path}: refused to load: {err} (replace it with the original REFER "
                         "download)") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError, KeyError, OverflowError, MemoryError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable refs pickle ({type(err).__name__}: {err})") from err
    problem = _nesting_problem(loaded)
    if problem is not None:
        raise ValueError(f"{path}: refused to load: {problem}; a REFER refs file is a flat list of ref "
                         "dicts (replace it with the original REFER download)")
    return _repair_py2_text(loaded) if py2 else loaded


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _id_problem(value: Any, bounds: tuple[int, int] = _INT64) -> str | None:
    """Why ``value`` is not an id the index can store (an integer within ``bounds``), or None."""
    if not _is_int(value):
        return f"{_show(value)}, expected an integer id"
    if not bounds[0] <= value <= bounds[1]:
        bits = 64 if bounds == _INT64 else 32
        return f"{_show(value)}, which does not fit the index's {bits}-bit integer column"
    return None


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
        for key in ("ref_id", "ann_id", "image_id"):
            problem = _id_problem(ref[key])
            if problem is not None:
                who = f"ref {ref['ref_id']!r}" if key != "ref_id" else f"ref at position {i}"
                raise ValueError(f"{path}: {who} has {key} {problem}")
        if "category_id" in ref and (problem := _id_problem(ref["category_id"], _INT32)) is not None:
            raise ValueError(f"{path}: ref {ref['ref_id']!r} has category_id {problem}")
        if not isinstance(ref["sentences"], list):
            raise ValueError(f"{path}: ref {ref['ref_id']!r} has 'sentences' of type "
                             f"{type(ref['sentences']).__name__}, expected a list")
        if not isinstance(ref.get("sent_ids") or [], list):
            raise ValueError(f"{path}: ref {ref['ref_id']!r} has 'sent_ids' of type "
                             f"{type(ref['sent_ids']).__name__}, expected a list")
    _require_unique(((ref["ref_id"], i) for i, ref in enumerate(refs)), path, "ref_id", "refs at positions")
    _require_unique(((sent_id, ref["ref_id"]) for ref in refs for sent_id in _sent_ids(ref, path)),
                    path, "sent_id", "in refs")
    return refs


def _sent_ids(ref: dict, path: Path) -> list[int]:
    """The sentence ids of one ref (a sentence's own ``sent_id``, else ``sent_ids[k]``), all integers
    that fit int64; also refuses a sentence text UTF-8 cannot hold (a lone surrogate), naming the ref,
    the sentence and the field, since the sentences table could not be written."""
    sent_ids = ref.get("sent_ids") or []
    out = []
    for k, sent in enumerate(ref["sentences"]):
        sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
        if sent_id is None and k < len(sent_ids):
            sent_id = sent_ids[k]
        if sent_id is None:
            raise ValueError(f"{path}: ref {ref['ref_id']!r}: sentence {k} has no sent_id")
        problem = _id_problem(sent_id)
        if problem is not None:
            raise ValueError(f"{path}: ref {ref['ref_id']!r}: sentence {k} has sent_id {problem}")
        text = sentence_text(sent)
        if isinstance(text, str) and (pos := unencodable(text)) is not None:
            field = "sent" if sent.get("sent") is not None else "raw"
            raise ValueError(f"{path}: ref {ref['ref_id']!r}: sentence {sent_id} has '{field}' "
                             f"{_show(text)} with {text[pos]!r} at position {pos}, which is not "
                             "Unicode text (a lone surrogate cannot be written as UTF-8)")
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
            problem = _id_problem(ann.get(key))
            if problem is not None:
                raise ValueError(f"{path}: annotations[{i}] has {key} {problem}")
        if "category_id" in ann and (problem := _id_problem(ann["category_id"], _INT32)) is not None:
            raise ValueError(f"{path}: annotation {ann['id']} has category_id {problem}")
    _check_categories(instances.get("categories", []), path)
    _require_unique(((im["id"], i) for i, im in enumerate(instances["images"])), path, "image id",
                    "images at positions")
    _require_unique(((a["id"], i) for i, a in enumerate(instances["annotations"])), path, "annotation id",
                    "annotations at positions")
    return instances


def _check_categories(categories: Any, path: Path) -> None:
    """The optional ``categories``: a list of objects with an int32 ``id`` and a text ``name``."""
    if not isinstance(categories, list):
        raise ValueError(f"{path}: 'categories' is a {type(categories).__name__}, expected a list")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict):
            raise ValueError(f"{path}: categories[{i}] is a {type(cat).__name__}, expected an object")
        problem = _id_problem(cat.get("id"), _INT32)
        if problem is not None:
            raise ValueError(f"{path}: categories[{i}] has id {problem}")
        name = cat.get("name")
        if not isinstance(name, str) or unencodable(name) is not None:
            raise ValueError(f"{path}: category {cat['id']} has name {_show(name)}, expected Unicode text")


def _check_image_entry(image: Any, i: int, path: Path) -> None:
    """One ``images[i]`` entry: integer id, a file_name inside the image folder, positive integer size."""
    if not isinstance(image, dict):
        raise ValueError(f"{path}: images[{i}] is a {type(image).__name__}, expected an object")
    problem = _id_problem(image.get("id"))
    if problem is not None:
        raise ValueError(f"{path}: images[{i}] has id {problem}")
    who = f"image {image['id']}"
    name = image.get("file_name")
    if not isinstance(name, str) or not name or unencodable(name) is not None:
        raise ValueError(f"{path}: {who} has file_name {_show(name)}, expected a file name (Unicode text)")
    if escapes_folder(name):
        raise ValueError(f"{path}: {who} has file_name {name!r}, which leaves the image folder "
                         "(absolute paths and '..' are refused)")
    for key in ("width", "height"):
        if key not in image:
            raise ValueError(f"{path}: {who} lacks '{key}'")
        if not _is_int(image[key]) or image[key] <= 0:
            raise ValueError(f"{path}: {who} has {key} {_show(image[key])}, expected a positive integer")


def load_refer(root: str | Path, dataset: str, split_by: str) -> tuple[list[dict], dict]:
    """Read ``(refs, instances)`` of one REFER dataset; raise naming the path on any problem.

    Missing root, dataset folder, pickle or JSON -> :class:`FileNotFoundError`; a pickle that is not a
    list of ref dicts with ``ref_id, ann_id, image_id, split, sentences``, an instances file without
    ``images`` / ``annotations`` lists, or any structural fault of the module docstring ->
    :class:`ValueError`, one line naming the file, the field and the id.
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
    except RecursionError as err:
        raise ValueError(f"{inst_file}: refused: containers nest deeper than Python's JSON reader allows "
                         f"(COCO's instances nest 5 deep; the limit here is {MAX_NESTING_DEPTH})") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer past the digit limit
        raise ValueError(f"{inst_file}: not valid JSON ({err})") from err
    problem = _nesting_problem(instances)
    if problem is not None:
        raise ValueError(f"{inst_file}: refused: {problem}; COCO's instances nest 5 deep")
    return refs, _check_instances(instances, inst_file)
