"""Response and pseudo-mask Zarr stores: round trip, lookups, file counts, size, atomicity, xarray."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from pipeline.store import (
    PSEUDO_MASK_SCHEMA,
    RESPONSE_SCHEMA,
    RecordSchema,
    RecordWriter,
    open_pseudo_masks,
    open_responses,
)

MAP = (6, 6)
ATTRS = {"input_size": [192, 192]}


def _records(n: int, seed: int = 0, offset: int = 1000):
    """A response map per record and every column of the response schema, by column name."""
    rng = np.random.default_rng(seed)
    return {
        "response": rng.normal(0, 5, size=(n, *MAP)).astype(np.float32),
        "sent_id": np.arange(n) * 3 + offset,
        "ref_id": np.arange(n) // 2 + 7,
        "image_id": np.arange(n) // 4 + 100,
        "height": rng.integers(100, 500, n),
        "width": rng.integers(100, 500, n),
    }


def _response_writer(path: Path, shard_size: int) -> RecordWriter:
    return RecordWriter(path, RESPONSE_SCHEMA, MAP, shard_size=shard_size, attrs=ATTRS)


def _write_batch(w: RecordWriter, split: str, start: int, rec: dict, stop: int | None = None) -> None:
    """Write rows ``start:stop`` of ``rec`` (all of it by default) at ``start``."""
    part = {k: v[start:stop] for k, v in rec.items()}
    w.write(split, start, part.pop("response"), **part)


def _write(path: Path, splits: dict[str, dict], shard_size: int, batch: int, order=None) -> None:
    with _response_writer(path, shard_size) as w:
        for split, rec in splits.items():
            n = len(rec["sent_id"])
            w.add_split(split, n)
            starts = list(range(0, n, batch))
            for s in order(starts) if order else starts:
                _write_batch(w, split, s, rec, s + batch)


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_round_trip_two_splits_out_of_order(tmp_path):
    train, val = _records(50, seed=1), _records(23, seed=2, offset=5000)
    path = tmp_path / "responses.zarr"
    _write(path, {"train": train, "val": val}, shard_size=16, batch=7, order=lambda s: s[::-1])
    store = open_responses(path)
    assert store.splits == ["train", "val"]
    assert store.row_shape == MAP
    assert len(store) == 73
    np.testing.assert_array_equal(store.keys("val"), val["sent_id"])
    np.testing.assert_array_equal(store.sent_ids("val"), val["sent_id"])
    np.testing.assert_array_equal(store.ref_ids("val"), val["ref_id"])  # a column, not the key, here
    for i in (0, 11, 22):
        got = store.get("val", int(val["sent_id"][i]))
        assert got.dtype == np.float32 and got.shape == MAP
        np.testing.assert_allclose(got, val["response"][i], rtol=1e-3, atol=1e-3)  # float16 rounding
        assert store.meta("val", int(val["sent_id"][i])) == {
            "ref_id": int(val["ref_id"][i]),
            "image_id": int(val["image_id"][i]),
            "height": int(val["height"][i]),
            "width": int(val["width"][i]),
        }
    batches = list(store.iter_batches("train", 20))
    assert [len(b["sent_id"]) for b in batches] == [20, 20, 10]
    np.testing.assert_allclose(
        np.concatenate([b["response"] for b in batches]), train["response"], rtol=1e-3, atol=1e-3
    )
    np.testing.assert_array_equal(np.concatenate([b["ref_id"] for b in batches]), train["ref_id"])
    attrs = store.attrs("val")
    assert attrs["resize"] == "stretch" and attrs["input_size"] == [192, 192] and attrs["map_size"] == [6, 6]
    assert "bilinear" in attrs["description"]


def test_accepts_cpu_tensors(tmp_path):
    rec = _records(3)
    rec["response"] = torch.from_numpy(rec["response"])
    path = tmp_path / "r.zarr"
    _write(path, {"val": rec}, shard_size=8, batch=3)
    np.testing.assert_allclose(open_responses(path).get("val", 1003), rec["response"][1].numpy(), atol=1e-2)


def test_few_files_and_small_size(tmp_path):
    n = 1000
    path = tmp_path / "responses.zarr"
    _write(path, {"val": _records(n)}, shard_size=256, batch=64)
    files = _files(path)
    per_sentence = sum(p.stat().st_size for p in files) / n
    print(f"\n{len(files)} files, {per_sentence:.1f} bytes per sentence for {MAP} float16 maps")
    assert len(files) < 40
    assert per_sentence < 200


def test_each_shard_written_once(tmp_path):
    class CountingArray:
        def __init__(self, arr):
            self.arr, self.calls = arr, []

        def __setitem__(self, key, value):
            self.calls.append((key.start, key.stop))
            self.arr[key] = value

    rec = _records(100)
    with _response_writer(tmp_path / "r.zarr", 32) as w:
        w.add_split("val", 100)
        counting = CountingArray(w._splits["val"].data)
        w._splits["val"].data = counting
        for s in range(0, 100, 10):
            _write_batch(w, "val", s, rec, s + 10)
    assert sorted(counting.calls) == [(0, 32), (32, 64), (64, 96), (96, 100)]


def test_xarray_opens_a_split(tmp_path):
    val = _records(10)
    val["response"][0] = 0.0  # equal to the fill value: must not become NaN
    path = tmp_path / "responses.zarr"
    _write(path, {"train": _records(4), "val": val}, shard_size=4, batch=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, group="val")
    assert ds["response"].dims == ("sentence", "y", "x")
    assert ds["sent_id"].dims == ("sentence",)
    assert ds.attrs["map_size"] == [6, 6]
    np.testing.assert_array_equal(ds["sent_id"].values, val["sent_id"])
    np.testing.assert_allclose(ds["response"].values.astype(np.float32), val["response"], atol=1e-2)


def test_exception_inside_block_leaves_nothing(tmp_path):
    path = tmp_path / "responses.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with _response_writer(path, 4) as w:
            w.add_split("val", 4)
            _write_batch(w, "val", 0, _records(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_split_fails_and_keeps_previous_store(tmp_path):
    path = tmp_path / "responses.zarr"
    _write(path, {"val": _records(4)}, shard_size=4, batch=4)
    rec = _records(6, seed=9)
    with pytest.raises(ValueError, match="2 of 6 rows never written"):
        with _response_writer(path, 4) as w:
            w.add_split("val", 6)
            _write_batch(w, "val", 0, rec, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["responses.zarr"]
    assert len(open_responses(path).keys("val")) == 4  # the old store is untouched


def test_write_errors(tmp_path):
    rec = _records(4)
    with pytest.raises(ValueError, match="written twice"):
        with _response_writer(tmp_path / "a.zarr", 4) as w:
            w.add_split("val", 4)
            _write_batch(w, "val", 0, rec)
            w.write("val", 2, rec["response"][:2], **{k: v[:2] for k, v in rec.items() if k != "response"})
    bad = dict(rec, response=np.full((4, *MAP), 1e6, np.float32))  # overflows float16
    with pytest.raises(ValueError, match="non-finite"):
        with _response_writer(tmp_path / "b.zarr", 4) as w:
            w.add_split("val", 4)
            _write_batch(w, "val", 0, bad)
    dup = dict(rec, sent_id=np.array([1, 2, 2, 3]))
    with pytest.raises(ValueError, match="sent_id 2 appears 2 times"):
        with _response_writer(tmp_path / "c.zarr", 4) as w:
            w.add_split("val", 4)
            _write_batch(w, "val", 0, dup)
    with pytest.raises(ValueError, match=r"columns \['height', 'ref_id', 'sent_id', 'width'\] != expected"):
        with _response_writer(tmp_path / "e.zarr", 4) as w:
            w.add_split("val", 4)
            no_image_id = {k: v for k, v in rec.items() if k not in ("response", "image_id")}
            w.write("val", 0, rec["response"], **no_image_id)
    with pytest.raises(ValueError, match="input_size"):
        RecordWriter(tmp_path / "d.zarr", RESPONSE_SCHEMA, MAP)
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_what_is_missing(tmp_path):
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        open_responses(missing)
    path = tmp_path / "responses.zarr"
    _write(path, {"val": _records(4)}, shard_size=4, batch=4)
    store = open_responses(path)
    with pytest.raises(KeyError, match="sent_id 424242"):
        store.get("val", 424242)
    with pytest.raises(KeyError, match="'test'"):
        store.keys("test")
    with pytest.raises(KeyError, match="no column 'mask'"):
        store.column("val", "mask")
    with pytest.raises(ValueError, match="not a 'pseudo_masks' store"):
        open_pseudo_masks(path)


def test_pseudo_mask_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    n, size = 9, (16, 12)
    masks = rng.random((n, *size)) > 0.6
    ref_ids = np.arange(n) + 50
    path = tmp_path / "pseudo_masks.zarr"
    with RecordWriter(path, PSEUDO_MASK_SCHEMA, size, shard_size=4, attrs={"input_size": [16, 12]}) as w:
        w.add_split("train", n)
        for s in (4, 0, 8):
            e = min(s + 4, n)
            w.write(
                "train",
                s,
                masks[s:e],
                ref_id=ref_ids[s:e],
                image_id=ref_ids[s:e] // 3,
                height=np.full(e - s, 480),
                width=np.full(e - s, 640),
                sent_id_selected=ref_ids[s:e] * 10 + 1,
            )
    store = open_pseudo_masks(path)
    assert store.row_shape == size and store.splits == ["train"]
    np.testing.assert_array_equal(store.keys("train"), ref_ids)
    np.testing.assert_array_equal(store.ref_ids("train"), ref_ids)
    got = store.get("train", 55)
    assert got.dtype == np.uint8 and got.shape == size
    np.testing.assert_array_equal(got, masks[5].astype(np.uint8))
    assert store.meta("train", 55) == {"image_id": 18, "height": 480, "width": 640, "sent_id_selected": 551}
    batches = list(store.iter_batches("train", 5))
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), masks.astype(np.uint8))
    # 3 metadata files (root, group, mask) + 3 shards of 4 rows + 5 columns x (metadata + one chunk)
    assert len(_files(path)) == 3 + 3 + 10
    one = {"ref_id": [1], "image_id": [1], "height": [1], "width": [1], "sent_id_selected": [1]}
    with pytest.raises(ValueError, match="bool or integer"):
        with RecordWriter(tmp_path / "x.zarr", PSEUDO_MASK_SCHEMA, size) as w:
            w.add_split("train", 1)
            w.write("train", 0, masks[:1].astype(float), **one)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.255"):
        with RecordWriter(tmp_path / "y.zarr", PSEUDO_MASK_SCHEMA, size) as w:
            w.add_split("train", 1)
            w.write("train", 0, np.full((1, *size), 256), **one)


def test_schema_rejects_a_key_that_is_not_a_column():
    with pytest.raises(ValueError, match="key column 'id'"):
        RecordSchema(kind="k", data_name="d", data_dtype="uint8", read_dtype="uint8", record_dim="r",
                     key="id", columns={"other": "int64"}, size_attr="size", attrs={}, shard_size=4)


def test_schemas_fix_the_on_disk_layout(tmp_path):
    """Pins the layout the schemas describe: array names, dtypes, chunking, sharding and attrs order,
    which existing stores on disk (and DVC's hashes of them) depend on."""
    path = tmp_path / "responses.zarr"
    _write(path, {"val": _records(100)}, shard_size=32, batch=10)
    group = zarr.open_group(path, mode="r")
    assert list(group.attrs) == ["kind", "format_version", "splits", "resize", "description", "input_size",
                                 "map_size"]
    assert list(group["val"].attrs) == ["resize", "description", "input_size", "map_size"]
    data = group["val"]["response"]
    assert data.dtype == np.float16 and data.chunks == (32, *MAP) and data.shards == (32, *MAP)
    assert data.metadata.dimension_names == ("sentence", "y", "x")
    assert {name: arr.dtype for name, arr in group["val"].arrays() if name != "response"} == {
        "sent_id": np.int64, "ref_id": np.int64, "image_id": np.int64, "height": np.int32, "width": np.int32
    }
    big = tmp_path / "big.zarr"
    _write(big, {"val": _records(200)}, shard_size=128, batch=50)
    assert zarr.open_group(big, mode="r")["val"]["response"].chunks == (64, *MAP)  # records_per_chunk
