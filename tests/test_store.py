"""Response and pseudo-mask Zarr stores: round trip, lookups, file counts, size, atomicity, xarray."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from pipeline.store import PseudoMaskWriter, ResponseWriter, open_pseudo_masks, open_responses

MAP = (6, 6)
ATTRS = {"input_size": [192, 192]}


def _records(n: int, seed: int = 0, offset: int = 1000):
    rng = np.random.default_rng(seed)
    return {
        "responses": rng.normal(0, 5, size=(n, *MAP)).astype(np.float32),
        "sent_ids": np.arange(n) * 3 + offset,
        "ref_ids": np.arange(n) // 2 + 7,
        "image_ids": np.arange(n) // 4 + 100,
        "heights": rng.integers(100, 500, n),
        "widths": rng.integers(100, 500, n),
    }


def _write(path: Path, splits: dict[str, dict], shard_size: int, batch: int, order=None) -> None:
    with ResponseWriter(path, MAP, shard_size=shard_size, attrs=ATTRS) as w:
        for split, rec in splits.items():
            n = len(rec["sent_ids"])
            w.add_split(split, n)
            starts = list(range(0, n, batch))
            for s in order(starts) if order else starts:
                w.write(split, s, **{k: v[s : s + batch] for k, v in rec.items()})


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def test_round_trip_two_splits_out_of_order(tmp_path):
    train, val = _records(50, seed=1), _records(23, seed=2, offset=5000)
    path = tmp_path / "responses.zarr"
    _write(path, {"train": train, "val": val}, shard_size=16, batch=7, order=lambda s: s[::-1])
    store = open_responses(path)
    assert store.splits == ["train", "val"]
    assert store.map_size == MAP
    assert len(store) == 73
    np.testing.assert_array_equal(store.sent_ids("val"), val["sent_ids"])
    for i in (0, 11, 22):
        got = store.get("val", int(val["sent_ids"][i]))
        assert got.dtype == np.float32 and got.shape == MAP
        np.testing.assert_allclose(got, val["responses"][i], rtol=1e-3, atol=1e-3)  # float16 rounding
        assert store.meta("val", int(val["sent_ids"][i])) == {
            "ref_id": int(val["ref_ids"][i]),
            "image_id": int(val["image_ids"][i]),
            "height": int(val["heights"][i]),
            "width": int(val["widths"][i]),
        }
    batches = list(store.iter_batches("train", 20))
    assert [len(b["sent_id"]) for b in batches] == [20, 20, 10]
    np.testing.assert_allclose(
        np.concatenate([b["response"] for b in batches]), train["responses"], rtol=1e-3, atol=1e-3
    )
    np.testing.assert_array_equal(np.concatenate([b["ref_id"] for b in batches]), train["ref_ids"])
    attrs = store.attrs("val")
    assert attrs["resize"] == "stretch" and attrs["input_size"] == [192, 192] and attrs["map_size"] == [6, 6]
    assert "bilinear" in attrs["description"]


def test_accepts_cpu_tensors(tmp_path):
    rec = _records(3)
    rec["responses"] = torch.from_numpy(rec["responses"])
    path = tmp_path / "r.zarr"
    _write(path, {"val": rec}, shard_size=8, batch=3)
    np.testing.assert_allclose(open_responses(path).get("val", 1003), rec["responses"][1].numpy(), atol=1e-2)


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
    with ResponseWriter(tmp_path / "r.zarr", MAP, shard_size=32, attrs=ATTRS) as w:
        w.add_split("val", 100)
        counting = CountingArray(w._splits["val"].data)
        w._splits["val"].data = counting
        for s in range(0, 100, 10):
            w.write("val", s, **{k: v[s : s + 10] for k, v in rec.items()})
    assert sorted(counting.calls) == [(0, 32), (32, 64), (64, 96), (96, 100)]


def test_xarray_opens_a_split(tmp_path):
    val = _records(10)
    val["responses"][0] = 0.0  # equal to the fill value: must not become NaN
    path = tmp_path / "responses.zarr"
    _write(path, {"train": _records(4), "val": val}, shard_size=4, batch=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, group="val")
    assert ds["response"].dims == ("sentence", "y", "x")
    assert ds["sent_id"].dims == ("sentence",)
    assert ds.attrs["map_size"] == [6, 6]
    np.testing.assert_array_equal(ds["sent_id"].values, val["sent_ids"])
    np.testing.assert_allclose(ds["response"].values.astype(np.float32), val["responses"], atol=1e-2)


def test_exception_inside_block_leaves_nothing(tmp_path):
    path = tmp_path / "responses.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with ResponseWriter(path, MAP, shard_size=4, attrs=ATTRS) as w:
            w.add_split("val", 4)
            w.write("val", 0, **_records(4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_split_fails_and_keeps_previous_store(tmp_path):
    path = tmp_path / "responses.zarr"
    _write(path, {"val": _records(4)}, shard_size=4, batch=4)
    rec = _records(6, seed=9)
    with pytest.raises(ValueError, match="2 of 6 rows never written"):
        with ResponseWriter(path, MAP, shard_size=4, attrs=ATTRS) as w:
            w.add_split("val", 6)
            w.write("val", 0, **{k: v[:4] for k, v in rec.items()})
    assert [p.name for p in tmp_path.iterdir()] == ["responses.zarr"]
    assert len(open_responses(path).sent_ids("val")) == 4  # the old store is untouched


def test_write_errors(tmp_path):
    rec = _records(4)
    with pytest.raises(ValueError, match="written twice"):
        with ResponseWriter(tmp_path / "a.zarr", MAP, shard_size=4, attrs=ATTRS) as w:
            w.add_split("val", 4)
            w.write("val", 0, **rec)
            w.write("val", 2, **{k: v[:2] for k, v in rec.items()})
    bad = dict(rec, responses=np.full((4, *MAP), 1e6, np.float32))  # overflows float16
    with pytest.raises(ValueError, match="non-finite"):
        with ResponseWriter(tmp_path / "b.zarr", MAP, shard_size=4, attrs=ATTRS) as w:
            w.add_split("val", 4)
            w.write("val", 0, **bad)
    dup = dict(rec, sent_ids=np.array([1, 2, 2, 3]))
    with pytest.raises(ValueError, match="sent_id 2 appears 2 times"):
        with ResponseWriter(tmp_path / "c.zarr", MAP, shard_size=4, attrs=ATTRS) as w:
            w.add_split("val", 4)
            w.write("val", 0, **dup)
    with pytest.raises(ValueError, match="input_size"):
        ResponseWriter(tmp_path / "d.zarr", MAP)
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
        store.sent_ids("test")
    with pytest.raises(ValueError, match="not a 'pseudo_masks' store"):
        open_pseudo_masks(path)


def test_pseudo_mask_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    n, size = 9, (16, 12)
    masks = rng.random((n, *size)) > 0.6
    ref_ids = np.arange(n) + 50
    path = tmp_path / "pseudo_masks.zarr"
    with PseudoMaskWriter(path, size, shard_size=4, attrs={"input_size": [16, 12]}) as w:
        w.add_split("train", n)
        for s in (4, 0, 8):
            e = min(s + 4, n)
            w.write(
                "train",
                s,
                masks[s:e],
                ref_ids[s:e],
                image_ids=ref_ids[s:e] // 3,
                heights=np.full(e - s, 480),
                widths=np.full(e - s, 640),
                sent_ids_selected=ref_ids[s:e] * 10 + 1,
            )
    store = open_pseudo_masks(path)
    assert store.mask_size == size and store.splits == ["train"]
    np.testing.assert_array_equal(store.ref_ids("train"), ref_ids)
    got = store.get("train", 55)
    assert got.dtype == np.uint8 and got.shape == size
    np.testing.assert_array_equal(got, masks[5].astype(np.uint8))
    assert store.meta("train", 55) == {"image_id": 18, "height": 480, "width": 640, "sent_id_selected": 551}
    batches = list(store.iter_batches("train", 5))
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), masks.astype(np.uint8))
    # 3 metadata files (root, group, mask) + 3 shards of 4 rows + 5 columns x (metadata + one chunk)
    assert len(_files(path)) == 3 + 3 + 10
    with pytest.raises(ValueError, match="bool or integer"):
        with PseudoMaskWriter(tmp_path / "x.zarr", size) as w:
            w.add_split("train", 1)
            w.write("train", 0, masks[:1].astype(float), [1], [1], [1], [1], [1])
