"""Hostile stores (issue 30, cases 1 and 17): a response or pseudo-mask store whose files are intact but
in the wrong place, or that was built from another index, is refused with one line instead of being
read as other sentences' records.

Case 1: a CRC covers a shard's bytes, not its place, so two valid shards swapped (or two id columns, or
two whole groups) decoded cleanly and handed their rows to other sentences. Case 17: a store from an
earlier index (another seed) was scored against the new one and failed on a size mismatch, or not at all.
The stage-level tests run the real stage scripts on a few synthetic images (``dump_responses`` with its
Step-1 model stubbed out; ``make_pseudo_masks`` for real, without PRMS and refinement).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import write_params

import pipeline.store as store_module
from pipeline.store import (
    PSEUDO_MASK_SCHEMA,
    RESPONSE_SCHEMA,
    RecordWriter,
    StoreCorruptError,
    open_pseudo_masks,
    open_responses,
)

ROOT = Path(__file__).resolve().parents[1]
N, SHARD = 12, 4  # three shards per split
KINDS = ["responses.zarr", "pseudo_masks.zarr"]
SPLITS = ("train", "val")
# the few-image workspace: dump shards of 8 sentences (train has 31: four shards), no PRMS, no refinement
WORKSPACE = {"synthesize": {"num_images": 8}, "dump": {"shard_size": 8},
             "pseudo_masks": {"prms": False, "refine": "none", "shard_size": 4}}
SEED_A, SEED_B = 4, 5  # the index the stores are built from, and the "new seed" index


# ----------------------------------------------------------------------------------------------------
# Stores built directly (case 1)
# ----------------------------------------------------------------------------------------------------


def _build(path: Path) -> Path:
    """A two-split store in which every data shard and every column file differs from every other, so
    that any swap changes what a read would return."""
    schema = RESPONSE_SCHEMA if path.name == "responses.zarr" else PSEUDO_MASK_SCHEMA
    with RecordWriter(path, schema, (5, 5), shard_size=SHARD, attrs={"input_size": [16, 16]}) as w:
        for i, split in enumerate(SPLITS):
            rows = np.random.default_rng(i).normal(0, 3, (N, 5, 5))
            if schema is PSEUDO_MASK_SCHEMA:
                rows = (rows > 0).astype(np.uint8)
            ids = np.arange(N) + 1000 * (i + 1)
            columns = {"sent_id": ids + 10, "ref_id": ids + 200, "image_id": ids // 2 + 300,
                       "height": np.arange(N) + 40 + i, "width": np.arange(N) + 70 + i}
            if schema is PSEUDO_MASK_SCHEMA:
                columns["sent_id_selected"] = columns.pop("sent_id")
            w.add_split(split, N)
            w.write(split, 0, rows, **columns)
    return path


def _open(path: Path):
    return open_responses(path) if path.name == "responses.zarr" else open_pseudo_masks(path)


def _swap(root: Path, a: str, b: str) -> None:
    """Exchange two files or directories of a store, as a careless copy or restore would."""
    tmp = root / (a.replace("/", "_") + ".swap")
    os.rename(root / a, tmp)
    os.rename(root / b, root / a)
    os.rename(tmp, root / b)


@pytest.fixture(params=KINDS)
def store_path(request, tmp_path) -> Path:
    path = _build(tmp_path / request.param)
    store = _open(path)  # control: the pristine store reads
    assert sum(len(b[store.schema.data_name]) for s in SPLITS for b in store.iter_batches(s, 5)) == 2 * N
    return path


@pytest.mark.parametrize("read", ["get", "iter_batches"])
def test_case_01_swapped_shards_are_refused(store_path, read):
    store = _open(store_path)
    data, keys = store.schema.data_name, store.keys("train")
    _swap(store_path, f"train/{data}/c/0/0/0", f"train/{data}/c/1/0/0")
    store = _open(store_path)
    with pytest.raises(StoreCorruptError) as err:
        if read == "get":
            store.get("train", int(keys[5]))  # row 5: in the second shard, which now holds the first's rows
        else:
            list(store.iter_batches("train", 5))
    here, there = ("c/1/0/0", "c/0/0/0") if read == "get" else ("c/0/0/0", "c/1/0/0")
    message = str(err.value)
    assert f"group 'train', shard {data}/{here} holds the bytes of shard {data}/{there}" in message
    assert str(store_path) in message and "dvc repro" in message and "\n" not in message
    assert err.value.group == "train" and err.value.shard == f"{data}/{here}"
    assert store.get("val", int(store.keys("val")[5])).shape == (5, 5)  # the other split still reads


def test_case_01_shard_swapped_with_another_groups_is_refused(store_path):
    data = _open(store_path).schema.data_name
    _swap(store_path, f"train/{data}/c/2/0/0", f"val/{data}/c/2/0/0")
    with pytest.raises(StoreCorruptError,
                       match=rf"group 'val', shard {data}/c/2/0/0 holds the bytes of group 'train' shard "):
        list(_open(store_path).iter_batches("val", 4))


@pytest.mark.parametrize("swap", ["key column between groups", "two id columns of one group"])
def test_case_01_swapped_id_column_shards_are_refused(store_path, swap):
    store = _open(store_path)
    key = store.schema.key
    other = "image_id"  # int64 like every key, same length: a swap decodes cleanly
    a, b = ((f"train/{key}/c/0", f"val/{key}/c/0") if swap.startswith("key")
            else (f"train/{key}/c/0", f"train/{other}/c/0"))
    _swap(store_path, a, b)
    with pytest.raises(StoreCorruptError) as err:
        _open(store_path).keys("train")
    here, there = a.split("/", 1), b.split("/", 1)
    named = {f"group 'train', shard {here[1]} holds the bytes of {_where(there)}"}
    if there[0] == "train":  # the columns of a group load together: either file may be named first
        named.add(f"group 'train', shard {there[1]} holds the bytes of {_where(here)}")
    assert any(n in str(err.value) for n in named), str(err.value)


def _where(place: list[str]) -> str:
    return f"shard {place[1]}" if place[0] == "train" else f"group {place[0]!r} shard {place[1]}"


def test_case_01_swapped_group_directories_are_refused(store_path):
    """Whole groups (their metadata included) swapped: the digests live in the consolidated metadata at
    the root, so a group directory cannot carry its own along."""
    _swap(store_path, "train", "val")
    with pytest.raises(StoreCorruptError, match=r"holds the bytes of group 'val' shard "):
        list(_open(store_path).iter_batches("train", 4))


# ----------------------------------------------------------------------------------------------------
# Stores built by the stages (cases 1 and 17)
# ----------------------------------------------------------------------------------------------------


def _in_dir(workdir: Path, mp: pytest.MonkeyPatch) -> None:
    mp.chdir(workdir)
    mp.setenv("TQDM_DISABLE", "1")


def _index_workspace(workdir: Path, seed: int) -> Path:
    """``params.yaml`` (the few-image config with ``seed``), the synthetic images and their index."""
    write_params(workdir, {**WORKSPACE, "base": {"seed": seed}})
    with pytest.MonkeyPatch.context() as mp:
        _in_dir(workdir, mp)
        for stage in ("synthesize", "index"):
            _load_stage(stage).main()
    return workdir


def _load_stage(name: str):
    """A stage script as a module (its ``main`` not run), so a test can stub what it imports."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}_under_test", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_maps(model, bank, rows, batch_size, max_tokens, device, desc="", ranges=None,
               show_progress=True) -> Iterator[tuple[int, np.ndarray]]:
    """Stands in for the Step-1 model in ``iter_responses``: a 3x3 map per sentence that depends on its
    sent_id (so that a shard holding other sentences' maps holds other values)."""
    sent_ids = rows["sent_id"].to_numpy()
    for a, b in [(0, len(rows))] if ranges is None else ranges:
        for start in range(a, b, batch_size):
            ids = sent_ids[start:min(b, start + batch_size)]
            yield start, (ids[:, None, None] % 97 + np.arange(9).reshape(3, 3) / 10).astype(np.float32)


def _run(workdir: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Workspace A: index (seed 4), ``responses.zarr`` from ``dump_responses`` (its model stubbed) and
    ``pseudo_masks.zarr`` from the real ``make_pseudo_masks``, which reads the responses through the
    index check (a store from the right index passes). Workspace B: another index (seed 5)."""
    a = _index_workspace(tmp_path_factory.mktemp("index_a"), SEED_A)
    with pytest.MonkeyPatch.context() as mp:
        _in_dir(a, mp)
        dump = _load_stage("dump_responses")
        mp.setattr(dump, "load_localiser", lambda path: (None, {"input_size": 32, "max_tokens": 20}))
        mp.setattr(dump, "iter_responses", _stub_maps)
        dump.main()
    proc = _run(a, "make_pseudo_masks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = _index_workspace(tmp_path_factory.mktemp("index_b"), SEED_B)
    return {"a": a, "b": b}


def _workspace(built: dict[str, Path], tmp_path: Path, index: str) -> Path:
    """A copy of workspace A whose images and index are those of workspace ``index``."""
    work = tmp_path / "work"
    shutil.copytree(built["a"], work)
    if index == "b":
        for part in ("synthetic", "index"):
            shutil.rmtree(work / "artifacts" / part)
            shutil.copytree(built["b"] / "artifacts" / part, work / "artifacts" / part)
        shutil.copy(built["b"] / "params.yaml", work / "params.yaml")
    return work


def test_case_01_make_pseudo_masks_on_swapped_response_shards_exits_1_with_one_line(built, tmp_path):
    work = _workspace(built, tmp_path, "a")
    store = work / "artifacts" / "responses.zarr"
    _swap(store, "train/response/c/0/0/0", "train/response/c/1/0/0")
    proc = _run(work, "make_pseudo_masks")
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "make_pseudo_masks: responses store artifacts/responses.zarr is damaged: group 'train', shard "
        "response/c/0/0/0 holds the bytes of shard response/c/1/0/0 (swapped, moved or copied), so its rows "
        "would be read as other records; `dvc repro` rebuilds it (or delete the store and re-run the stage "
        "that writes it)"
    ]


def test_case_17_stages_record_the_index_their_store_was_built_from(built):
    """The writers (``dump_responses``, ``make_pseudo_masks``) record the index; a reader given the same
    index accepts the store, given another refuses it, and given none reads it as before."""
    index_a, index_b = (built[k] / "artifacts" / "index" for k in "ab")
    fingerprint = store_module.index_fingerprint(index_a)
    assert fingerprint != store_module.index_fingerprint(index_b)
    for path, opener in ((built["a"] / "artifacts" / "responses.zarr", open_responses),
                         (built["a"] / "artifacts" / "pseudo_masks.zarr", open_pseudo_masks)):
        assert opener(path, index=index_a).index_fingerprint == fingerprint
        with pytest.raises(store_module.StoreMismatchError) as err:
            opener(path, index=index_b)
        assert str(path) in str(err.value) and str(index_b) in str(err.value)
        assert len(opener(path).splits) >= 1


def test_case_17_a_store_without_an_index_is_refused_only_when_a_reader_asks(built, tmp_path):
    """Stores written without ``index`` (tests, benchmarks) keep working; a stage, which always passes
    the index, cannot check them and refuses them."""
    path = _build(tmp_path / "responses.zarr")
    assert open_responses(path).index_fingerprint is None
    index = built["a"] / "artifacts" / "index"
    with pytest.raises(store_module.StoreMismatchError, match="does not record which index it was built"):
        open_responses(path, index=index)


READERS = {  # stage -> (store it refuses, the stage that writes that store)
    "evaluate_step1": ("responses", "dump_responses"),
    "make_pseudo_masks": ("responses", "dump_responses"),
    "train_step2": ("pseudo_masks", "make_pseudo_masks"),
    "report": ("responses", "dump_responses"),  # its pseudo-masks are rebuilt on the new index below
}


@pytest.mark.parametrize("stage", list(READERS))
def test_case_17_reader_stages_refuse_a_store_from_an_earlier_index(built, tmp_path, stage):
    work = _workspace(built, tmp_path, "b")
    kind, writer = READERS[stage]
    if stage == "report":  # pseudo-masks of the new index, responses of the old: the responses are refused
        shutil.rmtree(work / "artifacts" / "pseudo_masks.zarr")
        with pytest.MonkeyPatch.context() as mp:
            _in_dir(work, mp)
            with RecordWriter("artifacts/pseudo_masks.zarr", PSEUDO_MASK_SCHEMA, (4, 4),
                              index="artifacts/index") as w:
                w.add_split("train", 1)
                w.write("train", 0, np.zeros((1, 4, 4), np.uint8), ref_id=[1], image_id=[1], height=[4],
                        width=[4], sent_id_selected=[1])
    proc = _run(work, stage)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    old = store_module.index_fingerprint(built["a"] / "artifacts" / "index")
    new = store_module.index_fingerprint(work / "artifacts" / "index")
    assert proc.stderr.strip().splitlines() == [
        f"{stage}: {kind} store artifacts/{kind}.zarr was built from another index than the one in "
        f"artifacts/index (index fingerprint {old[:12]} in the store, {new[:12]} in the index); `dvc repro` "
        f"rebuilds it (or delete the store and re-run {writer})"
    ]
