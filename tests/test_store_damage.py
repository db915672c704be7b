"""A damaged response or pseudo-mask store is never read as data: a deleted, emptied, bit-flipped or
truncated shard raises StoreCorruptError naming the store, group and shard (and that `dvc repro`
rebuilds it), where Zarr alone reads a missing shard as zeros and a flipped byte as other numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import (
    PSEUDO_MASK_SCHEMA,
    RESPONSE_SCHEMA,
    RecordWriter,
    StoreCorruptError,
    open_pseudo_masks,
    open_responses,
)

ROOT = Path(__file__).resolve().parents[1]
N, SHARD = 12, 4  # three shards per split; the damaged one is the middle one (rows 4..7)


def _build(path: Path, kind: str) -> Path:
    """A two-split store whose first shard is all zeros (the fill value, which must still be written)."""
    rng = np.random.default_rng(0)
    if kind == "responses.zarr":
        schema, size, rows = RESPONSE_SCHEMA, (5, 5), rng.normal(0, 3, (N, 5, 5)).astype(np.float32)
        extra = {"sent_id": np.arange(N) + 10, "ref_id": np.arange(N)}
    else:
        schema, size, rows = PSEUDO_MASK_SCHEMA, (8, 6), (rng.random((N, 8, 6)) > 0.5).astype(np.uint8)
        extra = {"ref_id": np.arange(N) + 10, "sent_id_selected": np.arange(N)}
    rows[:SHARD] = 0
    with RecordWriter(path, schema, size, shard_size=SHARD, attrs={"input_size": [16, 16]}) as w:
        for split in ("train", "val"):
            w.add_split(split, N)
            w.write(split, 0, rows, image_id=np.arange(N) // 2, height=np.full(N, 40), width=np.full(N, 30),
                    **extra)
    return path


def _open(path: Path):
    return open_responses(path) if path.name == "responses.zarr" else open_pseudo_masks(path)


def _damage(path: Path, damage: str, relative: str) -> None:
    f = path / relative
    data = bytearray(f.read_bytes())
    if damage == "deleted shard":
        f.unlink()
    elif damage == "0-byte shard":
        f.write_bytes(b"")
    elif damage == "flipped byte":
        data[len(data) // 3] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "flipped byte in shard index":
        data[-12] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "half-truncated shard":
        f.write_bytes(bytes(data[: len(data) // 2]))


@pytest.fixture(scope="module", params=["responses.zarr", "pseudo_masks.zarr"])
def pristine(request, tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("store") / request.param, request.param)


def test_undamaged_store_reads_including_an_all_fill_value_shard(pristine):
    store = _open(pristine)
    for split in store.splits:
        assert sum(len(b[store.schema.data_name]) for b in store.iter_batches(split, 5)) == N
    assert not store.get("val", 10).any()  # the all-zero first shard is on disk, not "missing"


@pytest.mark.parametrize("damage", ["deleted shard", "0-byte shard", "flipped byte",
                                    "flipped byte in shard index", "half-truncated shard"])
@pytest.mark.parametrize("read", ["get", "iter_batches"])
def test_damaged_shard_is_named_not_read_as_data(pristine, tmp_path, damage, read):
    path = tmp_path / pristine.name
    shutil.copytree(pristine, path)
    data_name = _open(path).schema.data_name
    _damage(path, damage, f"val/{data_name}/c/1/0/0")
    store = _open(path)
    with pytest.raises(StoreCorruptError) as err:
        if read == "get":
            store.get("val", 10 + 5)  # row 5: in the damaged shard
        else:
            list(store.iter_batches("val", 3))
    message = str(err.value)
    assert str(path) in message and "group 'val'" in message
    assert f"shard {data_name}/c/1/0/0" in message and "dvc repro" in message
    assert err.value.group == "val" and err.value.shard == f"{data_name}/c/1/0/0"
    # the other split is untouched and still reads
    assert store.get("train", 15).shape == store.row_shape


@pytest.mark.parametrize("damage", ["deleted shard", "flipped byte"])
def test_damaged_key_column_is_named(pristine, tmp_path, damage):
    path = tmp_path / pristine.name
    shutil.copytree(pristine, path)
    key = _open(path).schema.key
    _damage(path, damage, f"val/{key}/c/0")
    with pytest.raises(StoreCorruptError, match=rf"group 'val', shard {key}/c/0 "):
        _open(path).keys("val")


DAMAGED_STAGE = textwrap.dedent("""
    from pipeline.stage import start_stage
    from pipeline.store import open_responses
    start_stage("evaluate_step1", {params!r})
    open_responses({store!r}).get("val", 15)
""")


def test_a_stage_reading_a_deleted_shard_exits_1_with_one_line(tmp_path):
    path = _build(tmp_path / "responses.zarr", "responses.zarr")
    _damage(path, "deleted shard", "val/response/c/1/0/0")
    code = DAMAGED_STAGE.format(params=str(ROOT / "params.yaml"), store=str(path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"evaluate_step1: responses store {path} is damaged: group 'val', shard response/c/1/0/0 is missing; "
        "`dvc repro` rebuilds it (or delete the store and re-run the stage that writes it)"
    ]
