"""Running the trained Step-1 localiser over every expression of a split (the ``dump_responses`` work).

Images are decoded once per split (``ImageBank``) and sentences are batched; the model runs under
``torch.inference_mode``. Each sentence gets its own raw low-resolution response (Eq. 2), which is
what the Zarr store keeps: min-max normalisation, sigmoid and up-sampling are cheap and happen at read
time, so the store stays a few hundred bytes per sentence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.data.samples import ImageBank
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import tokenize
from pipeline.models.step1 import TRISLocaliser
from pipeline.progress import progress
from pipeline.runtime import channels_last, to_channels_last


@torch.inference_mode()
def iter_responses(model: TRISLocaliser, bank: ImageBank, sentences: pd.DataFrame, batch_size: int,
                   max_tokens: int, device: torch.device, desc: str = "responses",
                   ranges: Sequence[tuple[int, int]] | None = None,
                   show_progress: bool = True) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start_row, responses (b, h, w) float32)`` over ``sentences`` in their row order.

    A batch holds ``batch_size`` sentences; each distinct image among them is encoded once (an image
    has several expressions), which is most of the cost. ``ranges`` restricts the work to row ranges
    ``[start, stop)`` (a rank's shards); batches never cross a range boundary.
    """
    to_channels_last(model.to(device)).eval()
    texts = sentences["text"].tolist()
    image_ids = sentences["image_id"].to_numpy()
    ranges = [(0, len(sentences))] if ranges is None else ranges
    batches = [(s, min(s + batch_size, e)) for b, e in ranges for s in range(b, e, batch_size)]
    uniques = [np.unique(image_ids[start:stop], return_inverse=True) for start, stop in batches]
    image_batches = bank.prefetch((unique for unique, _ in uniques), device)
    bar = progress(batches, desc=desc, disable=not show_progress or None)
    for (start, stop), (_, index), images01 in zip(bar, uniques, image_batches, strict=True):
        images = channels_last(clip_normalize(images01))
        tokens = tokenize(texts[start:stop], max_tokens).to(device)
        maps = model.forward_paired(images, tokens, torch.as_tensor(index, device=device))
        yield start, maps.float().cpu().numpy()
