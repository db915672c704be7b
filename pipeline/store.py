"""Zarr v3 stores for Step-1 response maps and PRMS pseudo-masks.

Both stores hold one record per sentence (responses) or per referred object (pseudo-masks), in one
group per split. The large per-record array (``response`` / ``mask``) is chunked ``records_per_chunk``
records per chunk (one 16 kB mask; 64 response maps of a few dozen values each, since zarr's per-chunk
cost dominates tiny chunks: one-record chunks made the dump 30 % slower than the model and the store a
third larger, while reading one record still decodes a single small chunk), and sharded ``shard_size``
records per file, so a split of 100k sentences is a few dozen files rather than 100k (file counts
matter to DVC, which hashes every file of an output). The small per-record columns (ids, original
image size) are one chunk each: readers load them whole to build the id -> row lookup.

Zarr rewrites a whole shard on every partial write to it (read, merge, re-encode), so the writer
buffers rows in memory until a shard is complete and writes each shard exactly once. The buffer holds
at most one shard per partially filled shard: ``shard_size * H * W * itemsize`` bytes, which is why
the pseudo-mask store (full-resolution masks) wants a smaller ``shard_size`` than the response store.

Writers build the store in a temporary sibling directory and move it onto the target only when the
``with`` block ends without error and every preallocated row was written (:func:`pipeline.atomic.atomic_dir`),
so a crashed dump never leaves a half-filled store behind. Metadata is consolidated so that
``xarray.open_zarr(path, group=split)`` opens a split directly.

Several processes (torchrun ranks) can fill one store: rank 0 creates the temporary store and the
arrays, each rank writes only the shards :meth:`RecordWriter.owned_ranges` gives it (shard k goes
to rank k mod world size, so no two writers ever touch one shard file), and rank 0 gathers the small
columns, checks that every row arrived exactly once, and moves the store into place.

Readers never return a silently wrong record. Zarr reads a missing chunk file as the fill value, so
a deleted or emptied shard would read as zeros (and score a plausible mIoU); a changed byte would decode
to other numbers. Every chunk therefore carries a CRC-32C (``Crc32cCodec`` after zstd; the shard index
has its own CRC by default) and every chunk is written even when it equals the fill value
(``write_empty_chunks``), so :class:`RecordStore` checks, the first time it touches a split, that every
storage file the array metadata implies exists and is non-empty, and turns any decode failure into a
:class:`StoreCorruptError` naming the store, the group (split) and the shard file, and saying that
``dvc repro`` rebuilds it. The codecs change the stored bytes only; the decoded arrays are the same.

A CRC covers a shard's bytes, not its place: two valid shards swapped (``c/0/0/0`` <-> ``c/1/0/0``), or
two id columns swapped, decode cleanly and hand every record to another sentence. So the writer binds
each storage file to its place: once every file is on disk it records, in each array's attributes
(``storage_digests``: storage key -> BLAKE2b-128 of the file's bytes), the digest of the file at that key,
and the reader checks a file against the digest recorded for its key the first time a read touches it
(the whole file once, then never again: a row-level hash on every read would cost more than the read).
Rows are bound through their shard: a row's place in a verified shard is its place in the store, and
the key column that names it is a verified file too. The digests live in the (consolidated) metadata,
not in the data files, so moving a whole shard, column or group directory cannot carry them along.

A store is built from one index (``artifacts/index``): its rows follow that index's sentences and
objects, and its sizes that index's images. A writer given ``index=`` records the index's fingerprint
(:func:`index_fingerprint`, a hash of its tables' bytes) in the attributes, and a reader given
``index=`` refuses a store built from another index (e.g. one indexed with another seed) with one line
naming both, instead of failing later on a size mismatch, or not at all.

The two stores differ only in data: each is a :class:`RecordSchema` (``RESPONSE_SCHEMA``,
``PSEUDO_MASK_SCHEMA``) that names its data array, key column, dtypes, columns and attributes, and one
writer (:class:`RecordWriter`) and one reader (:class:`RecordStore`) serve both.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline.atomic import atomic_dir
from pipeline.distributed import SINGLE_PROCESS, DistContext

FORMAT_VERSION = 2
"""2: every array records the digest of each storage file at its key (``DIGEST_ATTR``); 1 did not."""
DIGEST_ATTR = "storage_digests"
"""Array attribute: storage key (e.g. ``c/3/0/0``) -> BLAKE2b-128 hex digest of that file's bytes."""
INDEX_ATTR = "index_fingerprint"
"""Root and group attribute: :func:`index_fingerprint` of the index the store was built from."""
WRITER_STAGES = {"responses": "dump_responses", "pseudo_masks": "make_pseudo_masks"}
"""The stage that writes each kind of store (named in mismatch messages)."""

COMPRESSORS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
"""zarr's default zstd, then a CRC-32C of each (compressed) chunk, so a changed byte fails to decode
instead of decoding to other values."""
ARRAY_CONFIG = {"write_empty_chunks": True}
"""Store fill-valued chunks too: with every chunk on disk, a missing file always means damage."""

RESPONSE_DESCRIPTION = (
    "response[i] is the raw Step-1 text-to-image response map (Eq. 2, temperature-scaled cosine "
    "similarity, before any sigmoid or min-max normalisation) of sentence sent_id[i], stored as float16. "
    "The model saw the whole image stretched (aspect ratio not kept, no crop, no padding) to input_size "
    "= [S, S]; the map_size = [h, w] map therefore covers the whole image. To compare it with the "
    "original image, upsample it bilinearly (align_corners=False) to (height[i], width[i])."
)
PSEUDO_MASK_DESCRIPTION = (
    "mask[i] is the Step-2 training pseudo-mask of the referred object ref_id[i] (0 background, "
    "1 foreground; other uint8 values are passed through as written, e.g. an ignore label), built from the "
    "response of sentence sent_id_selected[i] that PRMS (Eq. 10) selected. Masks are stored at the fixed "
    "mask_size = [H, W] covering the whole image stretched like the model input; resize with nearest "
    "neighbour to (height[i], width[i]) to compare with the original image."
)


# ----------------------------------------------------------------------------------------------------
# Record schemas: what distinguishes the two stores
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordSchema:
    """The layout of one kind of record store: everything the writer and the reader need to know.

    ``columns`` maps each small per-record column to its dtype, in the order the arrays are created
    (the key column among them). ``attrs`` are the default attributes of the root and of every split
    group (the writer's ``attrs`` may override them); ``required_attrs`` must be given by the writer's
    caller and are stored as lists of ints (they are sizes); ``size_attr`` records the ``(h, w)``
    shape of one record. ``data_dtype`` is how the large array is stored, ``read_dtype`` how
    :meth:`RecordStore.get` returns it.
    """

    kind: str
    data_name: str
    data_dtype: str
    read_dtype: str
    record_dim: str
    key: str
    columns: Mapping[str, str]
    size_attr: str
    attrs: Mapping[str, Any]
    shard_size: int
    records_per_chunk: int = 1
    required_attrs: tuple[str, ...] = ()
    row_dims: tuple[str, ...] = ("y", "x")

    def __post_init__(self) -> None:
        if self.key not in self.columns:
            raise ValueError(f"key column {self.key!r} missing from columns {sorted(self.columns)}")
        if self.records_per_chunk < 1:
            raise ValueError(f"records_per_chunk must be >= 1, got {self.records_per_chunk}")
        # read-only views: a schema is shared module state
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))


RESPONSE_SCHEMA = RecordSchema(
    kind="responses",
    data_name="response",
    data_dtype="float16",
    read_dtype="float32",
    record_dim="sentence",
    key="sent_id",
    columns={"sent_id": "int64", "ref_id": "int64", "image_id": "int64", "height": "int32", "width": "int32"},
    size_attr="map_size",
    attrs={"resize": "stretch", "description": RESPONSE_DESCRIPTION},
    shard_size=4096,
    records_per_chunk=64,
    required_attrs=("input_size",),
)
"""``responses.zarr``: raw low-resolution Step-1 responses, one per sentence, keyed by ``sent_id``.
Writers must give ``input_size`` ([S, S], the stretched model input)."""

PSEUDO_MASK_SCHEMA = RecordSchema(
    kind="pseudo_masks",
    data_name="mask",
    data_dtype="uint8",
    read_dtype="uint8",
    record_dim="object",
    key="ref_id",
    columns={"ref_id": "int64", "image_id": "int64", "height": "int32", "width": "int32",
             "sent_id_selected": "int64"},
    size_attr="mask_size",
    attrs={"resize": "stretch", "description": PSEUDO_MASK_DESCRIPTION},
    shard_size=256,
)
"""``pseudo_masks.zarr``: one mask per referred object at a fixed ``mask_size``, keyed by ``ref_id``.
Masks are stored as uint8 (not bit-packed): zstd shrinks a binary mask chunk to a few hundred bytes,
and uint8 leaves room for an ignore label."""


# ----------------------------------------------------------------------------------------------------
# Writer: one large sharded array plus small 1-D columns per split
# ----------------------------------------------------------------------------------------------------


@dataclass
class _SplitState:
    """Everything the writer keeps for one split until the store is finalised."""

    n: int
    data: zarr.Array
    shard_rows: int
    columns: dict[str, np.ndarray]
    written: np.ndarray
    pending: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)


class RecordWriter:
    """Write the records of ``schema`` (one large array row + scalar columns each) into a sharded Zarr
    store. Use as a context manager: the store appears at ``target`` only when the block exits cleanly.

    ``row_shape`` is the ``(h, w)`` of one record (stored as the ``schema.size_attr`` attribute);
    ``shard_size`` defaults to the schema's. ``attrs`` go to the root and to every split group, after
    the schema's defaults and before the size attribute. ``index`` (the index folder the records come
    from) adds its :func:`index_fingerprint` to those attributes, so that readers can refuse the store
    once the index changed; stores built without it (tests, benchmarks) simply record none.
    """

    def __init__(
        self,
        target: str | Path,
        schema: RecordSchema,
        row_shape: Sequence[int],
        shard_size: int | None = None,
        attrs: Mapping[str, Any] | None = None,
        dist: DistContext = SINGLE_PROCESS,
        index: str | Path | None = None,
    ) -> None:
        attrs = dict(attrs or {})
        if index is not None:
            attrs[INDEX_ATTR] = index_fingerprint(index)
        for name in schema.required_attrs:
            if name not in attrs:
                raise ValueError(f"{schema.kind} writer attrs must give {name}")
        shard_size = schema.shard_size if shard_size is None else int(shard_size)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        row_shape = tuple(int(s) for s in row_shape)
        if len(schema.row_dims) != len(row_shape):
            raise ValueError(f"row_dims {schema.row_dims} do not match row_shape {row_shape}")
        self.target = Path(target)
        self.schema = schema
        self.data_dtype = np.dtype(schema.data_dtype)
        self.row_shape = row_shape
        self.column_dtypes = {k: np.dtype(v) for k, v in schema.columns.items()}
        self.shard_size = shard_size
        self.attrs = {
            **schema.attrs,
            **attrs,
            **{name: [int(s) for s in attrs[name]] for name in schema.required_attrs},
            schema.size_attr: list(row_shape),
        }
        self.dist = dist
        self._splits: dict[str, _SplitState] = {}
        self._stack: contextlib.ExitStack | None = None
        self._root: zarr.Group | None = None
        self._tmp: Path | None = None

    # -- context management ------------------------------------------------------------------------

    def __enter__(self) -> RecordWriter:
        self._stack = contextlib.ExitStack()
        if self.dist.is_main:
            self._tmp = self._stack.enter_context(atomic_dir(self.target))
            root_attrs = {
                "kind": self.schema.kind, "format_version": FORMAT_VERSION, "splits": [], **self.attrs
            }
            self._root = zarr.open_group(self._tmp, mode="w", attributes=root_attrs)
        self._tmp = Path(self.dist.broadcast_object(str(self._tmp)))
        if not self.dist.is_main:
            self._root = zarr.open_group(self._tmp, mode="r+")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        if exc_type is None:
            try:
                self._finalize()
            except BaseException as err:  # the temp store must go, then the error propagates
                if not stack.__exit__(type(err), err, err.__traceback__):
                    raise
                return False
        return bool(stack.__exit__(exc_type, exc, tb))

    # -- building ----------------------------------------------------------------------------------

    def add_split(self, split: str, n: int) -> None:
        """Preallocate ``n`` records for ``split`` (a Zarr group of that name). With several ranks every
        rank calls this, in the same order."""
        root = self._require_open()
        if split in self._splits:
            raise ValueError(f"split {split!r} was already added to {self.target}")
        if n < 0:
            raise ValueError(f"split {split!r}: n must be >= 0, got {n}")
        chunk_rows = max(1, min(self.schema.records_per_chunk, self.shard_size, n))
        shard_rows = -(-max(1, min(self.shard_size, n)) // chunk_rows) * chunk_rows  # whole chunks
        if self.dist.is_main:
            group = root.create_group(split, attributes=dict(self.attrs))
            data = group.create_array(
                self.schema.data_name,
                shape=(n, *self.row_shape),
                dtype=self.data_dtype,
                chunks=(chunk_rows, *self.row_shape),
                shards=(shard_rows, *self.row_shape),
                dimension_names=(self.schema.record_dim, *self.schema.row_dims),
                compressors=COMPRESSORS,
                config=ARRAY_CONFIG,
            )
            root.attrs["splits"] = [*root.attrs["splits"], split]
        self.dist.barrier()
        if not self.dist.is_main:
            data = zarr.open_array(self._tmp / split / self.schema.data_name, mode="r+")
        columns = {name: np.zeros(n, dtype=dt) for name, dt in self.column_dtypes.items()}
        self._splits[split] = _SplitState(n, data, shard_rows, columns, np.zeros(n, dtype=bool))

    def owned_ranges(self, split: str) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` this rank writes: whole shards, shard k to rank k mod world."""
        state = self._splits[split]
        shards = range(self.dist.rank, -(-state.n // state.shard_rows), self.dist.world_size)
        return [(k * state.shard_rows, min((k + 1) * state.shard_rows, state.n)) for k in shards]

    def write(self, split: str, start: int, rows: Any, /, **columns: Any) -> None:
        """Write a batch of ``b`` records at rows ``start:start+b`` of ``split``.

        ``rows`` is a ``(b, *row_shape)`` array or tensor (any device); it is cast to the schema's data
        dtype, refusing what the cast would corrupt (non-finite floats, out-of-range or non-integer
        values for an integer dtype). ``columns`` gives every schema column by name, ``(b,)`` each.
        """
        rows = _cast_rows(rows, self.data_dtype, f"{self.schema.data_name} rows of split {split!r}")
        self._require_open()
        state = self._splits.get(split)
        if state is None:
            raise KeyError(f"split {split!r} not added (call add_split first); have {list(self._splits)}")
        b = rows.shape[0]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.schema.data_name} rows have shape {rows.shape[1:]}, expected {self.row_shape}"
            )
        if start < 0 or start + b > state.n:
            raise ValueError(f"split {split!r}: rows [{start}, {start + b}) outside the {state.n} allocated")
        if set(columns) != set(self.column_dtypes):
            raise ValueError(f"columns {sorted(columns)} != expected {sorted(self.column_dtypes)}")
        if state.written[start : start + b].any():
            first = start + int(np.argmax(state.written[start : start + b]))
            raise ValueError(f"split {split!r}: row {first} written twice")
        for name, values in columns.items():
            values = _to_numpy(values)
            if values.shape != (b,):
                raise ValueError(f"column {name!r} has shape {values.shape}, expected ({b},)")
            state.columns[name][start : start + b] = values.astype(self.column_dtypes[name])
        state.written[start : start + b] = True
        self._buffer(state, start, rows)

    def write_table(self, split: str, start: int, rows: Any, table: Mapping[str, Any]) -> None:
        """:meth:`write` with the schema's columns taken by name from ``table`` (a DataFrame slice or a
        mapping; other columns are ignored), since the callers' tables already use the store's names."""
        self.write(split, start, rows, **{name: table[name] for name in self.schema.columns})

    def _buffer(self, state: _SplitState, start: int, rows: np.ndarray) -> None:
        """Copy rows into per-shard buffers; write each shard once, when all of its rows arrived."""
        stop = start + rows.shape[0]
        pos = start
        while pos < stop:
            shard = pos // state.shard_rows
            s0 = shard * state.shard_rows
            s1 = min(s0 + state.shard_rows, state.n)
            upto = min(stop, s1)
            buf, count = state.pending.get(shard, (None, 0))
            if buf is None:
                buf = np.zeros((s1 - s0, *self.row_shape), dtype=self.data_dtype)
            buf[pos - s0 : upto - s0] = rows[pos - start : upto - start]
            count += upto - pos
            if count == s1 - s0:
                state.data[s0:s1] = buf
                state.pending.pop(shard, None)
            else:
                state.pending[shard] = (buf, count)
            pos = upto

    def _finalize(self) -> None:
        root = self._require_open()
        for split, state in self._splits.items():
            if state.pending:
                raise ValueError(f"split {split!r}: shards {sorted(state.pending)} were only partly written")
            if self.dist.enabled:  # gather what every rank wrote; rows are disjoint, so sums are copies
                writes = self.dist.sum_array(state.written)
                twice = np.flatnonzero(writes > 1)
                if twice.size:
                    raise ValueError(f"split {split!r}: row {int(twice[0])} written by two ranks")
                state.written = writes > 0
                for name, values in state.columns.items():
                    state.columns[name] = self.dist.sum_array(values).astype(values.dtype)
        self.dist.barrier()  # every shard is on disk before rank 0 finalises
        if not self.dist.is_main:
            self._root = None
            return
        for split, state in self._splits.items():
            missing = np.flatnonzero(~state.written)
            if missing.size:
                raise ValueError(
                    f"split {split!r}: {missing.size} of {state.n} rows never written "
                    f"(first missing row {int(missing[0])}); the store at {self.target} was not created"
                )
            keys = state.columns[self.schema.key]
            uniq, counts = np.unique(keys, return_counts=True)
            if (counts > 1).any():
                dup = int(uniq[np.argmax(counts > 1)])
                raise ValueError(f"split {split!r}: {self.schema.key} {dup} appears {counts.max()} times")
            group = root[split]
            for name, values in state.columns.items():
                group.create_array(
                    name,
                    data=values,
                    chunks=(max(1, state.n),),
                    dimension_names=(self.schema.record_dim,),
                    compressors=COMPRESSORS,
                    config=ARRAY_CONFIG,
                )
            for name, arr in group.arrays():  # every file is on disk now: bind each to its place
                arr.update_attributes({DIGEST_ATTR: {
                    key: _file_digest(self._tmp / split / name / key) for _, _, key in _storage_files(arr)
                }})
        with warnings.catch_warnings():
            # Consolidated metadata is not yet in the Zarr v3 spec; zarr-python and xarray read it,
            # and without it xarray warns on every open_zarr.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self._tmp)
        self._root = None

    def _require_open(self) -> zarr.Group:
        if self._root is None:
            raise RuntimeError(f"writer for {self.target} is not open: use it as a context manager")
        return self._root


def _to_numpy(values: Any) -> np.ndarray:
    """NumPy view of an array-like; torch tensors are detached and copied to the CPU first."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator (torch is not imported here)
        values = values.detach()
        values = (values.float() if values.is_floating_point() else values).cpu().numpy()
    return np.asarray(values)


def _as_finite(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the offending row
        out = _to_numpy(values).astype(dtype)
    if not np.isfinite(out).all():
        bad = int(np.argwhere(~np.isfinite(out).reshape(out.shape[0], -1).all(axis=1))[0, 0])
        raise ValueError(f"{what}: non-finite value in batch row {bad} (NaN, or beyond the {dtype} range)")
    return out


def _cast_rows(values: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """``values`` as ``dtype``: floats must stay finite; integer stores take only bool or integer
    input within the dtype's range (a float mask or a 256 would otherwise wrap silently)."""
    if np.issubdtype(dtype, np.floating):
        return _as_finite(values, dtype, what)
    values = _to_numpy(values)
    if values.dtype != bool and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be bool or integer, got {values.dtype}")
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ValueError(
            f"{what}: values must lie in {info.min}..{info.max}, got [{values.min()}, {values.max()}]"
        )
    return values.astype(dtype)


def _file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes, read in blocks (a pseudo-mask shard can be tens of MB)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def index_fingerprint(index_dir: str | Path) -> str:
    """A hash of the index tables (``*.parquet``: names, sizes and bytes) in ``index_dir``.

    It identifies the index a store was built from: a store's rows follow the index's sentences and
    objects, and its records the index's image sizes, so any change of a table (another seed, another
    dataset, another filter) changes what the store should hold. The bytes, not the parsed tables, are
    hashed, because this module reads no Parquet and because DVC tracks the same bytes. ``report.json``
    is left out: it describes the tables and changes nothing in them.
    """
    index_dir = Path(index_dir)
    tables = sorted(index_dir.glob("*.parquet"))
    if not index_dir.is_dir() or not tables:
        raise FileNotFoundError(f"{index_dir}: no index tables (*.parquet) found (run the index stage first)")
    digest = hashlib.blake2b(digest_size=16)
    for path in tables:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        digest.update(_file_digest(path).encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------


class StoreCorruptError(RuntimeError):
    """A store file is missing, empty or fails its checksum. The message names the store, the group
    (split) and the shard file, and the fix: the store is a DVC output, so ``dvc repro`` rebuilds it."""

    stage_one_line = True  # a stage reports it as one line (pipeline.stage), not a traceback

    def __init__(self, store: Path, kind: str, group: str, shard: str, problem: str) -> None:
        self.store, self.kind, self.group, self.shard, self.problem = store, kind, group, shard, problem
        super().__init__(
            f"{kind} store {store} is damaged: group {group!r}, shard {shard} {problem}; "
            f"`dvc repro` rebuilds it (or delete the store and re-run the stage that writes it)"
        )


class StoreMismatchError(ValueError):
    """A store that is intact but cannot be used here: built from another index than the one given, or
    written in an older format. The message names the store (and the index) and the fix."""

    stage_one_line = True  # a stage reports it as one line (pipeline.stage), not a traceback


class RecordStore:
    """Read-only view of a store written by :class:`RecordWriter` for ``schema``, with lookup by the
    schema's key column.

    Every read is checked (see the module docstring): the first access to a split verifies that all of
    its storage files exist and are non-empty, the first read of a storage file that its bytes are the
    ones recorded for its place, and a chunk that fails to decode raises :class:`StoreCorruptError`
    naming the store, split and shard instead of returning wrong values. With ``index`` (an index
    folder), a store built from another index is refused (:class:`StoreMismatchError`).
    """

    def __init__(self, path: str | Path, schema: RecordSchema, index: str | Path | None = None) -> None:
        self.path = Path(path)
        self.schema = schema
        if not self.path.exists():
            raise FileNotFoundError(f"{schema.kind} store not found: {self.path}")
        try:
            self._root = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for "not a zarr group"
            raise ValueError(f"{self.path} is not a readable Zarr group: {err}") from err
        found = self._root.attrs.get("kind")
        if found != schema.kind:
            raise ValueError(f"{self.path} holds {found!r}, not a {schema.kind!r} store")
        version = self._root.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{schema.kind} store {self.path} has format {version}, this code reads format "
                f"{FORMAT_VERSION} (shards bound to their place); `dvc repro` rebuilds it (or delete the "
                f"store and re-run {WRITER_STAGES.get(schema.kind, 'the stage that writes it')})"
            )
        self._columns: dict[str, dict[str, np.ndarray]] = {}
        self._rows: dict[str, dict[int, int]] = {}
        self._verified: set[str] = set()
        self._placed: dict[tuple[str, str], set[int]] = {}  # storage files whose digest was checked
        if index is not None:
            self.require_index(index)

    @property
    def index_fingerprint(self) -> str | None:
        """The :func:`index_fingerprint` of the index the store was built from (None if not recorded)."""
        found = self._root.attrs.get(INDEX_ATTR)
        return None if found is None else str(found)

    def require_index(self, index_dir: str | Path) -> None:
        """Refuse (:class:`StoreMismatchError`, one line naming the store and the index) a store that was
        not built from the index in ``index_dir``, or that does not say which index it was built from."""
        writer = WRITER_STAGES.get(self.schema.kind, "the stage that writes it")
        fix = f"`dvc repro` rebuilds it (or delete the store and re-run {writer})"
        found, expected = self.index_fingerprint, index_fingerprint(index_dir)
        if found is None:
            raise StoreMismatchError(
                f"{self.schema.kind} store {self.path} does not record which index it was built from, so "
                f"it cannot be checked against the index in {index_dir}; {fix}"
            )
        if found != expected:
            raise StoreMismatchError(
                f"{self.schema.kind} store {self.path} was built from another index than the one in "
                f"{index_dir} (index fingerprint {found[:12]} in the store, {expected[:12]} in the index); "
                f"{fix}"
            )

    @property
    def splits(self) -> list[str]:
        """Split names in the order they were written."""
        return list(self._root.attrs["splits"])

    @property
    def row_shape(self) -> tuple[int, int]:
        """``(h, w)`` of one record: the response ``map_size`` or the pseudo-mask ``mask_size``."""
        h, w = self._root.attrs[self.schema.size_attr]
        return int(h), int(w)

    def attrs(self, split: str) -> dict[str, Any]:
        """The split group's attributes (resize, input_size, map_size / mask_size, description)."""
        return dict(self._group(split).attrs)

    def __len__(self) -> int:
        return sum(len(self.keys(s)) for s in self.splits)

    def keys(self, split: str) -> np.ndarray:
        """The key column (sent_id or ref_id) of ``split``, in row order."""
        return self.column(split, self.schema.key)

    def column(self, split: str, name: str) -> np.ndarray:
        """The scalar column ``name`` of ``split``, in row order."""
        columns = self._load(split)
        if name not in columns:
            raise KeyError(f"no column {name!r} in split {split!r} of {self.path} (has {sorted(columns)})")
        return columns[name]

    def sent_ids(self, split: str) -> np.ndarray:
        """The ``sent_id`` column of ``split`` (the key of a response store)."""
        return self.column(split, "sent_id")

    def ref_ids(self, split: str) -> np.ndarray:
        """The ``ref_id`` column of ``split`` (the key of a pseudo-mask store)."""
        return self.column(split, "ref_id")

    def get(self, split: str, key: int) -> np.ndarray:
        """The record of ``key`` in ``split``, as the schema's ``read_dtype``; reads a single chunk."""
        row = self._row(split, key)
        data = self._read(split, self.schema.data_name, row, row + 1)[0]
        return np.asarray(data, dtype=self.schema.read_dtype)

    def meta(self, split: str, key: int) -> dict[str, int]:
        """All scalar columns of ``key`` except the key itself, as Python ints."""
        row = self._row(split, key)
        return {k: int(v[row]) for k, v in self._load(split).items() if k != self.schema.key}

    def iter_batches(self, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Contiguous batches in row order: ``{data_name: (b, h, w), column: (b,) ...}``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        columns = self._load(split)
        n = self._group(split)[self.schema.data_name].shape[0]
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            data = self._read(split, self.schema.data_name, s, e)
            batch = {self.schema.data_name: np.asarray(data, dtype=self.schema.read_dtype)}
            batch.update({k: v[s:e] for k, v in columns.items()})
            yield batch

    def _group(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.path} (has {self.splits})")
        group = self._root[split]
        if split not in self._verified:
            for name, arr in group.arrays():
                for _, _, key in _storage_files(arr):
                    self._check_file(split, name, key)
            self._verified.add(split)
        return group

    def _check_file(self, split: str, name: str, key: str) -> None:
        """Zarr would read a missing or empty storage file as fill values: refuse both."""
        path = self.path / split / name / key
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise self._corrupt(split, name, key, "is missing") from None
        if size == 0:
            raise self._corrupt(split, name, key, "is empty (0 bytes)")

    def _read(self, split: str, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of array ``name``; a decode failure (checksum mismatch, torn shard)
        becomes a :class:`StoreCorruptError` naming the shard that fails on its own."""
        arr = self._group(split)[name]
        self._check_places(split, name, arr, start, stop)
        try:
            return arr[start:stop]
        except Exception as err:  # zarr and the codecs raise several types for damaged bytes
            for lo, hi, key in _storage_files(arr):
                if lo < stop and hi > start:
                    try:
                        arr[lo:hi]
                    except Exception as shard_err:
                        raise self._corrupt(split, name, key, _fails(shard_err)) from shard_err
            raise self._corrupt(split, name, f"rows {start}..{stop - 1}", _fails(err)) from err

    def _check_places(self, split: str, name: str, arr: zarr.Array, start: int, stop: int) -> None:
        """Check each storage file holding rows ``[start, stop)`` of ``name`` against the digest recorded
        for its key, once per file: a shard swapped with, or copied over from, another place has intact
        CRCs but someone else's rows."""
        step = (arr.shards or arr.chunks)[0]
        placed = self._placed.setdefault((split, name), set())
        for k in range(start // step, -(-stop // step)):
            if k in placed:
                continue
            recorded = arr.attrs.get(DIGEST_ATTR, {})
            for lo, hi, key in _storage_files(arr, rows=(k, k + 1)):
                if key not in recorded:
                    raise self._corrupt(split, name, key, "has no digest recorded in the array metadata")
                try:
                    found = _file_digest(self.path / split / name / key)
                except FileNotFoundError:
                    raise self._corrupt(split, name, key, "is missing") from None
                if found != recorded[key]:
                    raise self._corrupt(split, name, key, self._misplaced(split, name, arr, lo, hi, found))
            placed.add(k)

    def _misplaced(self, split: str, name: str, arr: zarr.Array, lo: int, hi: int, found: str) -> str:
        """What is wrong with a file whose digest is not the one recorded for its place: whose bytes it
        holds, if another place of this store recorded them, else whether it still decodes."""
        for other in self.splits:
            for other_name, other_arr in self._root[other].arrays():
                for key, digest in other_arr.attrs.get(DIGEST_ATTR, {}).items():
                    if digest == found:
                        where = f"shard {other_name}/{key}" if other == split else (
                            f"group {other!r} shard {other_name}/{key}")
                        return (f"holds the bytes of {where} (swapped, moved or copied), so its rows would "
                                f"be read as other records")
        try:
            arr[lo:hi]
        except Exception as err:  # zarr and the codecs raise several types for damaged bytes
            return _fails(err)
        return "does not match the digest recorded when the store was written (rewritten or replaced)"

    def _corrupt(self, split: str, name: str, key: str, problem: str) -> StoreCorruptError:
        return StoreCorruptError(self.path, self.schema.kind, split, f"{name}/{key}", problem)

    def _load(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._columns:
            group = self._group(split)
            self._columns[split] = {
                name: np.asarray(self._read(split, name, 0, arr.shape[0]))
                for name, arr in group.arrays() if name != self.schema.data_name
            }
        return self._columns[split]

    def _row(self, split: str, key: int) -> int:
        if split not in self._rows:
            keys = self.keys(split)
            self._rows[split] = {int(k): i for i, k in enumerate(keys)}
        try:
            return self._rows[split][int(key)]
        except KeyError:
            raise KeyError(f"{self.schema.key} {key} not in split {split!r} of {self.path}") from None


def _storage_files(arr: zarr.Array, rows: tuple[int, int] | None = None) -> list[tuple[int, int, str]]:
    """``(first row, stop row, key)`` of every storage file (shard, or chunk of an unsharded array)
    that ``arr``'s metadata implies, the key relative to the array's folder (e.g. ``c/3/0/0``); with
    ``rows = (a, b)``, only the files of shard rows ``a..b-1`` along the first axis (cheap per read)."""
    step = arr.shards or arr.chunks
    grid = [-(-size // chunk) for size, chunk in zip(arr.shape, step, strict=True)]
    first = range(grid[0]) if rows is None else range(max(0, rows[0]), min(grid[0], rows[1]))
    return [
        (idx[0] * step[0], min((idx[0] + 1) * step[0], arr.shape[0]), arr.metadata.encode_chunk_key(idx))
        for idx in itertools.product(first, *(range(g) for g in grid[1:]))
    ]


def _fails(err: BaseException) -> str:
    if "checksum" in str(err).lower():
        return "fails its checksum"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"fails to decode ({type(err).__name__}{': ' + detail if detail else ''})"


def open_responses(path: str | Path, index: str | Path | None = None) -> RecordStore:
    """Open a response store for reading (FileNotFoundError naming ``path`` if it is missing); with
    ``index``, refuse a store built from another index (:meth:`RecordStore.require_index`)."""
    return RecordStore(path, RESPONSE_SCHEMA, index)


def open_pseudo_masks(path: str | Path, index: str | Path | None = None) -> RecordStore:
    """Open a pseudo-mask store for reading (FileNotFoundError naming ``path`` if it is missing); with
    ``index``, refuse a store built from another index (:meth:`RecordStore.require_index`)."""
    return RecordStore(path, PSEUDO_MASK_SCHEMA, index)
