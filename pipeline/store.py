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
arrays, each rank writes only the shards :meth:`ShardedRecordWriter.owned_ranges` gives it (shard k goes
to rank k mod world size, so no two writers ever touch one shard file), and rank 0 gathers the small
columns, checks that every row arrived exactly once, and moves the store into place.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr

from pipeline.atomic import atomic_dir
from pipeline.distributed import SINGLE_PROCESS, DistContext

FORMAT_VERSION = 1
RESPONSES_PER_CHUNK = 64
RESPONSE_KIND = "responses"
PSEUDO_MASK_KIND = "pseudo_masks"

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
# Generic writer: one large sharded array plus small 1-D columns per split
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


class ShardedRecordWriter:
    """Write fixed-size records (one large array row + scalar columns) into a sharded Zarr store.

    Subclasses fix the record layout and expose a typed ``write``. Use as a context manager: the store
    appears at ``target`` only when the block exits cleanly.
    """

    def __init__(
        self,
        target: str | Path,
        *,
        kind: str,
        data_name: str,
        data_dtype: np.dtype | str,
        row_shape: tuple[int, ...],
        row_dims: tuple[str, ...],
        record_dim: str,
        key_name: str,
        column_dtypes: Mapping[str, np.dtype | str],
        shard_size: int,
        attrs: Mapping[str, Any],
        dist: DistContext = SINGLE_PROCESS,
        records_per_chunk: int = 1,
    ) -> None:
        if records_per_chunk < 1:
            raise ValueError(f"records_per_chunk must be >= 1, got {records_per_chunk}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if key_name not in column_dtypes:
            raise ValueError(f"key column {key_name!r} missing from columns {sorted(column_dtypes)}")
        if len(row_dims) != len(row_shape):
            raise ValueError(f"row_dims {row_dims} do not match row_shape {row_shape}")
        self.target = Path(target)
        self.kind = kind
        self.data_name = data_name
        self.data_dtype = np.dtype(data_dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.row_dims = tuple(row_dims)
        self.record_dim = record_dim
        self.key_name = key_name
        self.column_dtypes = {k: np.dtype(v) for k, v in column_dtypes.items()}
        self.shard_size = int(shard_size)
        self.attrs = dict(attrs)
        self.dist = dist
        self.records_per_chunk = int(records_per_chunk)
        self._splits: dict[str, _SplitState] = {}
        self._stack: contextlib.ExitStack | None = None
        self._root: zarr.Group | None = None
        self._tmp: Path | None = None

    # -- context management ------------------------------------------------------------------------

    def __enter__(self) -> ShardedRecordWriter:
        self._stack = contextlib.ExitStack()
        if self.dist.is_main:
            self._tmp = self._stack.enter_context(atomic_dir(self.target))
            root_attrs = {"kind": self.kind, "format_version": FORMAT_VERSION, "splits": [], **self.attrs}
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
        chunk_rows = max(1, min(self.records_per_chunk, self.shard_size, n))
        shard_rows = -(-max(1, min(self.shard_size, n)) // chunk_rows) * chunk_rows  # whole chunks
        if self.dist.is_main:
            group = root.create_group(split, attributes=dict(self.attrs))
            data = group.create_array(
                self.data_name,
                shape=(n, *self.row_shape),
                dtype=self.data_dtype,
                chunks=(chunk_rows, *self.row_shape),
                shards=(shard_rows, *self.row_shape),
                dimension_names=(self.record_dim, *self.row_dims),
            )
            root.attrs["splits"] = [*root.attrs["splits"], split]
        self.dist.barrier()
        if not self.dist.is_main:
            data = zarr.open_array(self._tmp / split / self.data_name, mode="r+")
        columns = {name: np.zeros(n, dtype=dt) for name, dt in self.column_dtypes.items()}
        self._splits[split] = _SplitState(n, data, shard_rows, columns, np.zeros(n, dtype=bool))

    def owned_ranges(self, split: str) -> list[tuple[int, int]]:
        """Row ranges ``[start, stop)`` this rank writes: whole shards, shard k to rank k mod world."""
        state = self._splits[split]
        shards = range(self.dist.rank, -(-state.n // state.shard_rows), self.dist.world_size)
        return [(k * state.shard_rows, min((k + 1) * state.shard_rows, state.n)) for k in shards]

    def _write_rows(self, split: str, start: int, rows: np.ndarray, columns: Mapping[str, Any]) -> None:
        """Store ``rows`` (already cast to the data dtype) and their column values at ``start``."""
        self._require_open()
        state = self._splits.get(split)
        if state is None:
            raise KeyError(f"split {split!r} not added (call add_split first); have {list(self._splits)}")
        b = rows.shape[0]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.data_name} rows have shape {rows.shape[1:]}, expected {self.row_shape}")
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
            keys = state.columns[self.key_name]
            uniq, counts = np.unique(keys, return_counts=True)
            if (counts > 1).any():
                dup = int(uniq[np.argmax(counts > 1)])
                raise ValueError(f"split {split!r}: {self.key_name} {dup} appears {counts.max()} times")
            group = root[split]
            for name, values in state.columns.items():
                group.create_array(
                    name,
                    data=values,
                    chunks=(max(1, state.n),),
                    dimension_names=(self.record_dim,),
                )
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


class ResponseWriter(ShardedRecordWriter):
    """Writer of ``responses.zarr``: raw low-resolution Step-1 responses, one per sentence.

    ``attrs`` must give ``input_size`` ([S, S], the stretched model input); ``resize``, ``map_size``
    and ``description`` are filled in (``attrs`` may override ``resize`` and ``description``).
    """

    def __init__(
        self,
        target_path: str | Path,
        map_size: tuple[int, int],
        shard_size: int = 4096,
        attrs: Mapping[str, Any] | None = None,
        dist: DistContext = SINGLE_PROCESS,
    ) -> None:
        attrs = dict(attrs or {})
        if "input_size" not in attrs:
            raise ValueError("ResponseWriter attrs must give input_size ([S, S] of the stretched input)")
        full = {
            "resize": "stretch",
            "description": RESPONSE_DESCRIPTION,
            **attrs,
            "input_size": [int(s) for s in attrs["input_size"]],
            "map_size": [int(map_size[0]), int(map_size[1])],
        }
        super().__init__(
            target_path,
            kind=RESPONSE_KIND,
            data_name="response",
            data_dtype="float16",
            row_shape=(int(map_size[0]), int(map_size[1])),
            row_dims=("y", "x"),
            record_dim="sentence",
            key_name="sent_id",
            column_dtypes={
                "sent_id": "int64",
                "ref_id": "int64",
                "image_id": "int64",
                "height": "int32",
                "width": "int32",
            },
            shard_size=shard_size,
            attrs=full,
            dist=dist,
            records_per_chunk=RESPONSES_PER_CHUNK,
        )

    def __enter__(self) -> ResponseWriter:
        super().__enter__()
        return self

    def write(
        self,
        split: str,
        start: int,
        responses: np.ndarray,
        sent_ids: Sequence[int] | np.ndarray,
        ref_ids: Sequence[int] | np.ndarray,
        image_ids: Sequence[int] | np.ndarray,
        heights: Sequence[int] | np.ndarray,
        widths: Sequence[int] | np.ndarray,
    ) -> None:
        """Write ``(b, h, w)`` responses (float array or tensor, any device) at rows ``start:start+b``."""
        rows = _as_finite(responses, np.dtype("float16"), f"responses of split {split!r}")
        self._write_rows(
            split,
            start,
            rows,
            {
                "sent_id": sent_ids,
                "ref_id": ref_ids,
                "image_id": image_ids,
                "height": heights,
                "width": widths,
            },
        )


class PseudoMaskWriter(ShardedRecordWriter):
    """Writer of ``pseudo_masks.zarr``: one uint8 mask per referred object at a fixed ``mask_size``.

    Masks are stored as uint8 (not bit-packed): zstd shrinks a binary mask chunk to a few hundred bytes,
    and uint8 leaves room for an ignore label.
    """

    def __init__(
        self,
        target_path: str | Path,
        mask_size: tuple[int, int],
        shard_size: int = 256,
        attrs: Mapping[str, Any] | None = None,
        dist: DistContext = SINGLE_PROCESS,
    ) -> None:
        full = {
            "resize": "stretch",
            "description": PSEUDO_MASK_DESCRIPTION,
            **dict(attrs or {}),
            "mask_size": [int(mask_size[0]), int(mask_size[1])],
        }
        super().__init__(
            target_path,
            kind=PSEUDO_MASK_KIND,
            data_name="mask",
            data_dtype="uint8",
            row_shape=(int(mask_size[0]), int(mask_size[1])),
            row_dims=("y", "x"),
            record_dim="object",
            key_name="ref_id",
            column_dtypes={
                "ref_id": "int64",
                "image_id": "int64",
                "height": "int32",
                "width": "int32",
                "sent_id_selected": "int64",
            },
            shard_size=shard_size,
            attrs=full,
            dist=dist,
        )

    def __enter__(self) -> PseudoMaskWriter:
        super().__enter__()
        return self

    def write(
        self,
        split: str,
        start: int,
        masks: np.ndarray,
        ref_ids: Sequence[int] | np.ndarray,
        image_ids: Sequence[int] | np.ndarray,
        heights: Sequence[int] | np.ndarray,
        widths: Sequence[int] | np.ndarray,
        sent_ids_selected: Sequence[int] | np.ndarray,
    ) -> None:
        """Write a batch of ``(b, H, W)`` bool or integer (0..255) masks at rows ``start:start+b``."""
        masks = _to_numpy(masks)
        if masks.dtype != bool and not np.issubdtype(masks.dtype, np.integer):
            raise ValueError(f"masks must be bool or integer, got {masks.dtype}")
        if masks.size and (masks.min() < 0 or masks.max() > 255):
            raise ValueError(f"mask values must lie in 0..255, got [{masks.min()}, {masks.max()}]")
        self._write_rows(
            split,
            start,
            masks.astype(np.uint8),
            {
                "ref_id": ref_ids,
                "image_id": image_ids,
                "height": heights,
                "width": widths,
                "sent_id_selected": sent_ids_selected,
            },
        )


# ----------------------------------------------------------------------------------------------------
# Generic reader
# ----------------------------------------------------------------------------------------------------


class RecordStore:
    """Read-only view of a store written by :class:`ShardedRecordWriter`, with lookup by key column."""

    def __init__(self, path: str | Path, *, kind: str, data_name: str, key_name: str, out_dtype: str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{kind} store not found: {self.path}")
        try:
            self._root = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for "not a zarr group"
            raise ValueError(f"{self.path} is not a readable Zarr group: {err}") from err
        found = self._root.attrs.get("kind")
        if found != kind:
            raise ValueError(f"{self.path} holds {found!r}, not a {kind!r} store")
        self.data_name = data_name
        self.key_name = key_name
        self.out_dtype = np.dtype(out_dtype)
        self._columns: dict[str, dict[str, np.ndarray]] = {}
        self._rows: dict[str, dict[int, int]] = {}

    @property
    def splits(self) -> list[str]:
        """Split names in the order they were written."""
        return list(self._root.attrs["splits"])

    def attrs(self, split: str) -> dict[str, Any]:
        """The split group's attributes (resize, input_size, map_size / mask_size, description)."""
        return dict(self._group(split).attrs)

    def __len__(self) -> int:
        return sum(len(self.keys(s)) for s in self.splits)

    def keys(self, split: str) -> np.ndarray:
        """The key column (sent_id or ref_id) of ``split``, in row order."""
        return self._load(split)[self.key_name]

    def get(self, split: str, key: int) -> np.ndarray:
        """The record of ``key`` in ``split``, as ``out_dtype``; reads a single chunk."""
        row = self._row(split, key)
        return np.asarray(self._group(split)[self.data_name][row], dtype=self.out_dtype)

    def meta(self, split: str, key: int) -> dict[str, int]:
        """All scalar columns of ``key`` except the key itself, as Python ints."""
        row = self._row(split, key)
        return {k: int(v[row]) for k, v in self._load(split).items() if k != self.key_name}

    def iter_batches(self, split: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Contiguous batches in row order: ``{data_name: (b, h, w), column: (b,) ...}``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        columns = self._load(split)
        data = self._group(split)[self.data_name]
        n = data.shape[0]
        for s in range(0, n, batch_size):
            e = min(s + batch_size, n)
            batch = {self.data_name: np.asarray(data[s:e], dtype=self.out_dtype)}
            batch.update({k: v[s:e] for k, v in columns.items()})
            yield batch

    def _group(self, split: str) -> zarr.Group:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in {self.path} (has {self.splits})")
        return self._root[split]

    def _load(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._columns:
            group = self._group(split)
            self._columns[split] = {
                name: np.asarray(arr[:]) for name, arr in group.arrays() if name != self.data_name
            }
        return self._columns[split]

    def _row(self, split: str, key: int) -> int:
        if split not in self._rows:
            keys = self.keys(split)
            self._rows[split] = {int(k): i for i, k in enumerate(keys)}
        try:
            return self._rows[split][int(key)]
        except KeyError:
            raise KeyError(f"{self.key_name} {key} not in split {split!r} of {self.path}") from None


class ResponseStore(RecordStore):
    """Reader of ``responses.zarr``; ``get`` returns the float32 ``(h, w)`` response of a sentence."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            path, kind=RESPONSE_KIND, data_name="response", key_name="sent_id", out_dtype="float32"
        )

    def sent_ids(self, split: str) -> np.ndarray:
        return self.keys(split)

    @property
    def map_size(self) -> tuple[int, int]:
        h, w = self._root.attrs["map_size"]
        return int(h), int(w)


class PseudoMaskStore(RecordStore):
    """Reader of ``pseudo_masks.zarr``; ``get`` returns the uint8 ``(H, W)`` mask of a referred object."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path, kind=PSEUDO_MASK_KIND, data_name="mask", key_name="ref_id", out_dtype="uint8")

    def ref_ids(self, split: str) -> np.ndarray:
        return self.keys(split)

    @property
    def mask_size(self) -> tuple[int, int]:
        h, w = self._root.attrs["mask_size"]
        return int(h), int(w)


def open_responses(path: str | Path) -> ResponseStore:
    """Open a response store for reading (FileNotFoundError naming ``path`` if it is missing)."""
    return ResponseStore(path)


def open_pseudo_masks(path: str | Path) -> PseudoMaskStore:
    """Open a pseudo-mask store for reading (FileNotFoundError naming ``path`` if it is missing)."""
    return PseudoMaskStore(path)
