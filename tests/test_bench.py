"""The benchmark scripts measure what they say: stage times parsed from a repro log, and storage ratios
computed from the stores' real bytes."""

import numpy as np
import pytest

from bench import random_walk_memory, repro_time, storage
from bench.common import directory_bytes
from pipeline.store import PSEUDO_MASK_SCHEMA, RESPONSE_SCHEMA, RecordWriter


def test_stage_wall_times_are_parsed_from_the_repro_log():
    log = "Running stage 'index':\n[index] wall time 1.9 s\nnoise\n[train_step1] wall time 200.0 s\n"
    assert dict(repro_time.STAGE_TIME.findall(log)) == {"index": "1.9", "train_step1": "200.0"}


def test_storage_ratios_use_the_bytes_on_disk(in_tmp_cwd):
    ids = np.arange(10)
    attrs = {"input_size": [192, 192]}
    with RecordWriter("artifacts/responses.zarr", RESPONSE_SCHEMA, (6, 6), attrs=attrs) as w:
        w.add_split("train", 10)
        w.write("train", 0, np.random.default_rng(0).random((10, 6, 6)), sent_id=ids, ref_id=ids // 2,
                image_id=ids, height=ids * 0 + 100, width=ids * 0 + 200)
    with RecordWriter("artifacts/pseudo_masks.zarr", PSEUDO_MASK_SCHEMA, (32, 32)) as w:
        w.add_split("train", 5)
        w.write("train", 0, np.ones((5, 32, 32), np.uint8), ref_id=ids[:5], image_id=ids[:5],
                height=ids[:5] * 0 + 100, width=ids[:5] * 0 + 200, sent_id_selected=ids[:5])
    r = storage.run()
    npy = 100 * 200 * 4 + storage.NPY_HEADER
    assert r["npy_bytes_per_ref"] == npy
    on_disk = directory_bytes(in_tmp_cwd / "artifacts" / "responses.zarr")
    assert r["responses_bytes_per_sentence"] == pytest.approx(on_disk / 10)
    assert r["pseudo_masks_ratio"] == pytest.approx(r["pseudo_mask_bytes_per_ref"] / npy)
    assert 0 < r["responses_ratio"] < 1


def test_cpu_peak_memory_sees_the_sparse_walk_above_an_earlier_larger_peak():
    """The sparse walk's working set (~2 MiB at 40x60) is below the peaks of importing torch and of the
    warm-up; a high-water mark that is not reset reported 0 bytes for it."""
    sparse = random_walk_memory.run(device="cpu", height=40, width=60, exp_times=2)["sparse"]
    transitions = 40 * 60 * (2 * 5 + 1) ** 2 * 4  # one float32 weight per pixel and neighbour
    assert transitions / 2 < sparse["peak_bytes"] < 20 * transitions
