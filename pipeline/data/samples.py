"""Training-side views of the Parquet index: per-split sentence tables, an in-memory image bank,
and batch samplers that keep the negatives of Eq. 7 honest (never two sentences of one image)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.data.images import read_image_rgb


def split_sentences(images: pd.DataFrame, sentences: pd.DataFrame, split: str) -> pd.DataFrame:
    """Sentences of one split joined with their image's path and size, in a stable order."""
    rows = sentences[sentences["split"] == split]
    if rows.empty:
        raise ValueError(f"split {split!r} has no sentences in the index")
    merged = rows.merge(images[["image_id", "path", "width", "height"]], on="image_id", how="left")
    return merged.sort_values("sent_id", kind="stable").reset_index(drop=True)


def stretch_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB uint8 image to ``size``x``size`` ignoring aspect ratio (as TRIS does).

    Every response map therefore covers the whole image, and mapping it back is a plain resize to the
    original (height, width): the store records exactly that (``resize: stretch``).
    """
    return np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))  # writable copy


class ImageBank:
    """Decodes each image once, keeps it stretched to ``size`` as uint8, hands out float batches.

    This plays the part of a DataLoader with workers, without copying images between processes: a pool
    of ``workers`` threads decodes (PIL releases the GIL), and ``prefetch`` assembles the next batch
    while the current training step runs. On the embedded default the whole train split fits in a few
    tens of MB, so after ``preload`` no JPEG is decoded in the training loop at all. Past ``max_bytes``
    (RefCOCO's 17k train images at 320 px need 5.2 GB) the remaining images are decoded on every
    request, in parallel and one batch ahead.
    """

    def __init__(self, paths: dict[int, str | Path], size: int, max_bytes: float = 2e9,
                 workers: int = 0) -> None:
        self.paths = paths
        self.size = size
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._cache: dict[int, torch.Tensor] = {}
        self._capacity = int(max_bytes // (3 * size * size))
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_index(cls, images: pd.DataFrame, size: int, max_bytes: float = 2e9,
                   workers: int = 0) -> ImageBank:
        """A bank over every image of the index's ``images`` table (``workers`` 0: one per core, <= 8)."""
        return cls(dict(zip(images["image_id"], images["path"], strict=True)), size, max_bytes, workers)

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="image-bank")
        return self._pool

    def get(self, image_id: int) -> torch.Tensor:
        """``(3, size, size)`` uint8 tensor of one image."""
        hit = self._cache.get(image_id)
        if hit is not None:
            return hit
        array = stretch_resize(read_image_rgb(self.paths[image_id]), self.size)
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        if len(self._cache) < self._capacity:
            self._cache[image_id] = tensor
        return tensor

    def preload(self, image_ids: Iterable[int]) -> None:
        """Decode up to the cache's capacity up front (images past it would be decoded for nothing)."""
        todo = [i for i in dict.fromkeys(int(i) for i in image_ids) if i not in self._cache]
        list(self.pool.map(self.get, todo[: max(self._capacity - len(self._cache), 0)]))

    def host_batch(self, image_ids: Iterable[int], pin: bool = False) -> torch.Tensor:
        """``(B, 3, size, size)`` uint8 batch in host memory; cache misses are decoded by the pool."""
        ids = [int(i) for i in image_ids]
        misses = [i for i in dict.fromkeys(ids) if i not in self._cache]
        decoded = dict(zip(misses, self.pool.map(self.get, misses), strict=True)) if len(misses) > 1 else {}
        raw = torch.stack([decoded[i] if i in decoded else self.get(i) for i in ids])
        return raw.pin_memory() if pin else raw

    @staticmethod
    def to_device(raw: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """Float batch in [0, 1] on ``device``. For CUDA the uint8 batch (pinned by ``host_batch``) is
        copied asynchronously and converted on the GPU: a quarter of the bytes over PCIe, and the copy
        overlaps the previous step's kernels."""
        device = torch.device(device)
        if device.type == "cuda":
            raw = raw.to(device, non_blocking=True)
        return raw.float().div_(255.0)

    def batch(self, image_ids: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, 3, size, size)`` float batch in [0, 1] on ``device``."""
        return self.to_device(self.host_batch(image_ids, pin=torch.device(device).type == "cuda"), device)

    def prefetch(self, id_batches: Iterable[Iterable[int]], device: torch.device | str = "cpu"
                 ) -> Iterator[torch.Tensor]:
        """``batch(ids, device)`` for each batch of ids, with batch k + 1 assembled on a background
        thread while the caller works on batch k (the DataLoader's ``prefetch_factor`` of 1).

        The host-to-device copy stays on the calling thread, so it is issued on the caller's stream.
        """
        pin = torch.device(device).type == "cuda"
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-bank-prefetch") as ahead:
            pending: Future[torch.Tensor] | None = None
            for ids in id_batches:
                following = ahead.submit(self.host_batch, list(ids), pin)
                if pending is not None:
                    yield self.to_device(pending.result(), device)
                pending = following
            if pending is not None:
                yield self.to_device(pending.result(), device)


def one_sentence_per_ref(ref_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices holding one randomly chosen sentence of every referred object.

    An epoch visits each object once with one of its expressions (as the REFER loaders of TRIS and
    LAVT do), so objects with three expressions are not seen three times as often as others.
    """
    order = rng.permutation(len(ref_ids))
    _, first = np.unique(ref_ids[order], return_index=True)
    return np.sort(order[first])


def distinct_image_batches(image_ids: np.ndarray, batch_size: int, rng: np.random.Generator,
                           drop_last: bool = True) -> list[np.ndarray]:
    """Shuffle row indices into batches in which no image appears twice.

    In-batch texts serve as each other's negatives (Eq. 7) and as contrastive pairs (CLIP
    pretraining); a second sentence of the same image would be a false negative. Rows that would
    collide wait in a queue for the next batch, so every row is used once per epoch (up to
    ``drop_last``).
    """
    order = rng.permutation(len(image_ids))
    pending: deque[int] = deque()
    batches: list[np.ndarray] = []
    current: list[int] = []
    seen: set[int] = set()

    def offer(row: int) -> bool:
        img = int(image_ids[row])
        if img in seen:
            return False
        current.append(row)
        seen.add(img)
        return True

    for row in order:
        if not offer(int(row)):
            pending.append(int(row))
        if len(current) == batch_size:
            batches.append(np.array(current))
            current, seen = [], set()
            for _ in range(len(pending)):
                r = pending.popleft()
                if not offer(r):
                    pending.append(r)
                if len(current) == batch_size:
                    batches.append(np.array(current))
                    current, seen = [], set()
    while pending:
        r = pending.popleft()
        if not offer(r):
            if current:
                batches.append(np.array(current))
            current, seen = [], set()
            offer(r)
        if len(current) == batch_size:
            batches.append(np.array(current))
            current, seen = [], set()
    if current and (not drop_last or not batches):
        batches.append(np.array(current))
    return batches
