"""Positive Response Map Selection (PRMS, Sec. 3.4, Eq. 10).

An object referred to by ``M`` expressions gets ``M`` Step-1 response maps. Each map ``R_t`` masks the
image (Eq. 9); the frozen CLIP scores the masked object against *all* ``M`` expressions, and the map whose
masked object agrees best with the whole set, ``argmax_t CS_t`` with ``CS_t = sum_m S(I, R_t, Q_m)``, is
kept as the object's pseudo-label source. A map that latched onto a wrong object matches the other
descriptions of the target poorly, so the cumulative score demotes it.

Each masked image goes through the image encoder once: the ``M x M`` similarity matrix is a product
of ``M`` image embeddings with ``M`` text embeddings, not ``M^2`` encoder calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.maps import mask_images

Encoder = Callable[[torch.Tensor], torch.Tensor]
Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``phi`` of Eq. 9 for all pairs: ``(M_images, D) x (M_texts, D) -> (M_images, M_texts)`` cosines."""
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return image_emb @ text_emb.T


def cumulative_scores(
    image_emb: torch.Tensor, text_emb: torch.Tensor, similarity: Similarity = cosine_similarity
) -> torch.Tensor:
    """``CS_t = sum_m S[t, m]`` of Eq. 10, where row ``t`` is the image masked by response ``R_t``."""
    return similarity(image_emb, text_emb.to(image_emb.device)).sum(dim=1)


@dataclass(frozen=True)
class PrmsItem:
    """The ``M`` responses of one referred object: ``image01`` ``(3, H, W)`` in [0, 1], ``responses``
    ``(M, h, w)`` raw Step-1 responses, ``text_emb`` ``(M, D)`` L2-normalised frozen-CLIP text embeddings."""

    image01: torch.Tensor
    responses: torch.Tensor
    text_emb: torch.Tensor


def _masked(image01: torch.Tensor, responses: torch.Tensor, size: int, space: str,
            align_corners: bool) -> torch.Tensor:
    image01 = image01.to(responses.device, torch.float32)
    images = image01.unsqueeze(0).expand(len(responses), -1, -1, -1)
    return mask_images(images, responses.float(), size, space=space, align_corners=align_corners)


@torch.no_grad()
def iter_select(
    items: Iterable[PrmsItem],
    encode_image: Encoder,
    size: int,
    batch_size: int,
    similarity: Similarity = cosine_similarity,
    *,
    space: str = "unit",
    align_corners: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """PRMS (Eq. 10) for many objects, streamed: per item, in order, the index of the selected response
    and the cumulative scores ``(M,)``, with encoder batches of ``batch_size`` masked images shared
    across objects.

    ``encode_image`` maps ``(n, 3, size, size)`` CLIP-normalised images to ``(n, D)`` embeddings. Each
    image is masked as calibration masks it (:func:`pipeline.maps.mask_images`: ``space`` is
    ``step1.calibration_mask_space``, ``align_corners`` is ``model.align_corners``), at the side of the
    item's ``image01``: the stage chooses that side (``pseudo_masks.prms_image``). With
    ``M == 1`` there is nothing to choose (the paper's identity case): index 0 is returned, the item
    never reaches the encoder and its score is NaN (not computed).

    ``items`` may be a generator and is read once. Masked images are flushed through the encoder as soon
    as a full batch is queued, and an item's result is yielded as soon as all its images are encoded,
    so memory holds about one batch of images and the embeddings of the items still waiting, however
    many items there are. The encoder batches do not depend on how the caller consumes the results.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    queue: list[torch.Tensor] = []
    queued = 0
    encoded: list[torch.Tensor] = []  # embeddings not yet handed to a waiting item
    waiting: deque[torch.Tensor | None] = deque()  # text embeddings of items not yet yielded; None: M == 1

    def flush(final: bool) -> None:
        nonlocal queue, queued
        while queued >= batch_size or (final and queued > 0):
            images = torch.cat(queue)
            encoded.append(encode_image(images[:batch_size]).float().cpu())
            rest = images[batch_size:]
            queue, queued = ([rest] if len(rest) else []), len(rest)

    def ready() -> Iterator[tuple[int, torch.Tensor]]:
        nonlocal encoded
        available = torch.cat(encoded) if len(encoded) > 1 else (encoded[0] if encoded else torch.empty(0))
        start = 0
        while waiting:
            text = waiting[0]
            if text is None:
                waiting.popleft()
                yield 0, torch.full((1,), float("nan"))
                continue
            m = len(text)
            if start + m > len(available):
                break
            waiting.popleft()
            scores = cumulative_scores(available[start : start + m], text, similarity).float()
            start += m
            yield int(scores.argmax()), scores
        encoded = [available[start:]] if start < len(available) else []

    for item in items:
        m = len(item.responses)
        if m == 0 or len(item.text_emb) != m:
            raise ValueError(f"{m} responses but {len(item.text_emb)} text embeddings")
        if m == 1:
            waiting.append(None)
        else:
            waiting.append(item.text_emb.float().cpu())
            queue.append(_masked(item.image01, item.responses, size, space, align_corners))
            queued += m
            flush(final=False)
        yield from ready()
    flush(final=True)
    yield from ready()


def select_batch(
    items: Iterable[PrmsItem],
    encode_image: Encoder,
    size: int,
    batch_size: int,
    similarity: Similarity = cosine_similarity,
    *,
    space: str = "unit",
    align_corners: bool = False,
) -> list[tuple[int, torch.Tensor]]:
    """:func:`iter_select` collected into a list (one ``(index, scores)`` per item, in order)."""
    return list(iter_select(items, encode_image, size, batch_size, similarity, space=space,
                            align_corners=align_corners))


def choose_without_prms(
    m: int, mode: Literal["first", "random"], rng: np.random.Generator | None = None
) -> int:
    """The PRMS-off ablation (Table 4, "w/o PRMS"): which of ``m`` responses to keep without scoring.

    ``first`` keeps the first expression's map (deterministic); ``random`` draws one uniformly with
    ``rng`` (a ``numpy.random.Generator``, seeded by the caller for reproducibility).
    """
    if m < 1:
        raise ValueError(f"need at least one response, got {m}")
    if mode == "first":
        return 0
    if mode == "random":
        if rng is None:
            raise ValueError("mode='random' needs an rng")
        return int(rng.integers(m))
    raise ValueError(f"unknown mode {mode!r}; expected 'first' or 'random'")


__all__ = [
    "PrmsItem",
    "choose_without_prms",
    "cosine_similarity",
    "cumulative_scores",
    "iter_select",
    "select_batch",
]
