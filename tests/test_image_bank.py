"""ImageBank does the DataLoader's job: the same pixels however they are fetched, decoding spread over
threads, the next batch assembled ahead, and no image decoded for nothing."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data.samples as samples
from pipeline.data.samples import ImageBank


@pytest.fixture
def image_paths(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for image_id in range(8):
        path = tmp_path / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (20 + image_id, 30, 3), dtype=np.uint8)).save(path)
        paths[image_id] = path
    return paths


def _bytes_for(images: int, size: int) -> float:
    return images * 3 * size * size


def test_prefetched_batches_equal_direct_batches_past_the_cache(image_paths):
    batches = [[0, 1, 2], [3, 3, 4], [5, 6, 7], [1, 7]]
    direct = ImageBank(image_paths, 16)
    small = ImageBank(image_paths, 16, max_bytes=_bytes_for(2, 16), workers=3)  # most requests miss
    got = list(small.prefetch(batches))
    assert len(got) == len(batches)
    for ids, batch in zip(batches, got, strict=True):
        assert batch.dtype == torch.float32 and batch.shape == (len(ids), 3, 16, 16)
        assert torch.equal(batch, direct.batch(ids))
    assert len(small._cache) == 2


def test_preload_stops_at_the_cache_capacity(image_paths, monkeypatch):
    decoded = []
    read = samples.read_image_rgb
    monkeypatch.setattr(samples, "read_image_rgb", lambda path: decoded.append(path) or read(path))
    bank = ImageBank(image_paths, 16, max_bytes=_bytes_for(3, 16), workers=2)
    bank.preload(list(image_paths) * 2)
    assert len(decoded) == 3 and len(bank._cache) == 3


def test_prefetch_assembles_the_next_batch_while_the_caller_works(image_paths, monkeypatch):
    next_batch_decoded = threading.Event()
    read = samples.read_image_rgb

    def observed_read(path):
        if path == image_paths[5]:
            next_batch_decoded.set()
        return read(path)

    monkeypatch.setattr(samples, "read_image_rgb", observed_read)
    bank = ImageBank(image_paths, 16, workers=2)
    batches = bank.prefetch([[0, 1], [5, 6], [2]])
    first = next(batches)  # the caller now "trains" on batch 0 without asking for batch 1
    assert first.shape == (2, 3, 16, 16)
    assert next_batch_decoded.wait(timeout=10), "batch 1 was not decoded while batch 0 was in use"
    assert [b.shape[0] for b in batches] == [2, 1]
