"""Checks that read ground truth on purpose, to tell whether the text-only parts work.

Nothing here feeds training: these functions only report numbers (e.g. whether the frozen CLIP ranks
the referred object's masked image above the other objects' for the same expression, the premise of
calibration and PRMS).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import islice

import numpy as np
import pandas as pd
import torch

from pipeline.data.images import read_image_rgb
from pipeline.data.index import decode_mask
from pipeline.data.samples import stretch_resize
from pipeline.maps import clip_normalize, response_to_soft_mask
from pipeline.models.clip_backbone import FrozenClip, tokenize


def _masked_image(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """``image * mask`` stretched to ``size``: a GT mask (bool) as before, a soft mask (float in [0, 1])
    rounded back to uint8 first, so both kinds of mask go through the one resize and a soft mask equal to
    the GT mask gives the very same input."""
    if mask.dtype == bool:
        return stretch_resize(image * mask[..., None], size)
    masked = np.rint(image.astype(np.float32) * mask[..., None].astype(np.float32))
    return stretch_resize(masked.clip(0, 255).astype(np.uint8), size)


def _soft_masks(responses: Mapping[int, np.ndarray], sent_ids: list[int], height: int, width: int,
                split: str) -> np.ndarray:
    """Step-1's soft masks ``sigmoid(up(R))`` (Eq. 9) of ``sent_ids`` at the image's size, ``(S, H, W)``."""
    missing = [s for s in sent_ids if s not in responses]
    if missing:
        raise ValueError(f"responses store: split {split!r} has no map for sent_id {missing[0]}")
    stack = torch.from_numpy(np.stack([np.asarray(responses[s], dtype=np.float32) for s in sent_ids]))
    return response_to_soft_mask(stack, (height, width)).numpy()


def _first_expression_rows(sents: pd.DataFrame, ref_ids: np.ndarray, split: str) -> list[int]:
    """Per object of ``ref_ids``, the row in ``sents`` of its expression with the lowest ``sent_id``."""
    sent_ids, owners = sents["sent_id"].to_numpy(), sents["ref_id"].to_numpy()
    rows = []
    for ref_id in ref_ids:
        own = np.flatnonzero(owners == ref_id)
        if not len(own):
            raise ValueError(f"split {split!r}: ref_id {int(ref_id)} has no expression, hence no Step-1 map")
        rows.append(int(own[np.argmin(sent_ids[own])]))
    return rows


@torch.no_grad()
def masked_object_hits(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame, sentences: pd.DataFrame,
                       split: str, max_tokens: int, size: int, device: torch.device,
                       max_images: int | None = None,
                       responses: Mapping[int, np.ndarray] | None = None) -> pd.DataFrame:
    """Per expression of ``split`` (images with two or more referred objects): ``sent_id``, ``text``,
    ``hit`` (the frozen CLIP scores the target's masked image above every other object's masked image
    of the same image) and ``objects`` (how many it chose among).

    By default each object is masked by its GT mask. With ``responses`` (``sent_id`` -> raw Step-1
    response), each is masked instead by Step-1's own soft mask ``sigmoid(up(R))``, the mask of Eq. 9:
    the target by the map of the expression being ranked (what calibration scores), every other object
    by the map of its first expression (lowest ``sent_id``). A map that covers exactly its object gives
    the GT ranking; a map that shows the scorer more than the object does scores above it."""
    split_refs = refs[refs["split"] == split]
    image_rows = images.set_index("image_id")
    records = []
    for n, (image_id, group) in enumerate(split_refs.groupby("image_id", sort=True)):
        if max_images is not None and n >= max_images:
            break
        if len(group) < 2:
            continue
        image = read_image_rgb(image_rows.loc[image_id, "path"])
        ref_ids = group["ref_id"].to_numpy()
        sents = sentences[sentences["ref_id"].isin(ref_ids)]
        target = np.asarray([int(np.flatnonzero(ref_ids == r)[0]) for r in sents["ref_id"]])
        if responses is None:
            masks = [decode_mask(ref) for _, ref in group.iterrows()]
            shown = np.arange(len(ref_ids))[None].repeat(len(sents), 0)  # (sentences, objects) -> image
        else:
            sent_ids = [int(s) for s in sents["sent_id"]]
            masks = list(_soft_masks(responses, sent_ids, image.shape[0], image.shape[1], split))
            first = _first_expression_rows(sents, ref_ids, split)
            shown = np.asarray([[row if j == t else first[j] for j in range(len(ref_ids))]
                                for row, t in enumerate(target)])
        batch = np.stack([_masked_image(image, m, size) for m in masks])
        batch = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)
        img_emb = frozen.encode_image(clip_normalize(batch))
        txt_emb = frozen.encode_text(tokenize(sents["text"].tolist(), max_tokens).to(device))
        sims = (txt_emb @ img_emb.T).gather(1, torch.as_tensor(shown, device=device))  # (sentences, objects)
        hits = (sims.argmax(dim=1).cpu().numpy() == target).tolist()
        records += [{"sent_id": int(s), "text": t, "hit": bool(h), "objects": len(group)}
                    for s, t, h in zip(sents["sent_id"], sents["text"], hits, strict=True)]
    if not records:
        raise ValueError(f"split {split!r}: no image with two or more referred objects")
    return pd.DataFrame.from_records(records)


def masked_object_ranking(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame,
                          sentences: pd.DataFrame, split: str, max_tokens: int, size: int,
                          device: torch.device, max_images: int | None = None,
                          responses: Mapping[int, np.ndarray] | None = None) -> dict:
    """How often the frozen CLIP scores the target's masked image above every other object's masked
    image of the same image, for the target's own expression (vs chance 1/objects); GT masks, or
    Step-1's soft masks with ``responses`` (:func:`masked_object_hits`)."""
    hits = masked_object_hits(frozen, images, refs, sentences, split, max_tokens, size, device, max_images,
                              responses)
    return {"split": split, "rate": round(float(hits["hit"].mean()), 4),
            "chance": round(float((1.0 / hits["objects"]).mean()), 4), "n": len(hits)}


GAMING_MARGIN = 0.05  # the guard's bound: soft-mask ranking <= GT-mask ranking + this


def gaming_guard(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame, sentences: pd.DataFrame,
                 responses: Mapping[int, np.ndarray], split: str, max_tokens: int, size: int,
                 device: torch.device, max_images: int | None = None) -> dict:
    """The frozen CLIP's masked-object ranking on Step-1's own soft masks beside its ranking on GT masks:
    ``{"soft", "gt", "margin": soft - gt, "n"}`` (a diagnostic; it reads GT masks).

    Why: calibration (Eq. 8-9) trains the maps to please this scorer. A map that covers its object can at
    best match the GT masks' ranking; one that ranks clearly above them (``margin`` over
    :data:`GAMING_MARGIN`) shows the scorer something other than the object, a shortcut it rewards."""
    soft = masked_object_ranking(frozen, images, refs, sentences, split, max_tokens, size, device,
                                 max_images, responses)
    gt = masked_object_ranking(frozen, images, refs, sentences, split, max_tokens, size, device, max_images)
    return {"soft": soft["rate"], "gt": gt["rate"], "margin": round(soft["rate"] - gt["rate"], 4),
            "n": soft["n"]}


def retrieval_candidates(image_ids: np.ndarray, candidates: int,
                         seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """The candidate draws of :func:`expression_retrieval`, image by image in sorted order: ``(image_id,
    rows)`` where ``rows[0]`` is one of the image's own sentences and the rest are ``candidates - 1``
    sentences of other images (fewer on small splits), positions in ``image_ids`` (one per sentence)."""
    rng = np.random.default_rng(seed)
    for image_id in np.unique(image_ids):
        own = np.flatnonzero(image_ids == image_id)
        others = np.flatnonzero(image_ids != image_id)
        negatives = rng.choice(others, min(candidates - 1, len(others)), replace=False)
        yield int(image_id), np.concatenate([rng.choice(own, 1), negatives])


@torch.no_grad()
def expression_retrieval(frozen: FrozenClip, images: pd.DataFrame, sentences: pd.DataFrame, split: str,
                         max_tokens: int, size: int, device: torch.device, candidates: int = 48,
                         seed: int = 0) -> dict:
    """How often the frozen CLIP scores a whole image highest against one of its own expressions among
    ``candidates - 1`` expressions of other images: the classification premise of Eq. 7 (chance
    ``1 / candidates``). Reads no mask; a diagnostic like ``masked_object_ranking``."""
    split_sents = sentences[sentences["split"] == split].sort_values("sent_id", kind="stable")
    image_ids = split_sents["image_id"].to_numpy()
    unique_ids = np.unique(image_ids)
    if len(unique_ids) < 2:
        raise ValueError(f"split {split!r}: expression retrieval needs two or more images")
    paths = images.set_index("image_id")["path"]
    texts = split_sents["text"].tolist()
    txt_emb = torch.cat([frozen.encode_text(tokenize(texts[i:i + 256], max_tokens).to(device))
                         for i in range(0, len(texts), 256)])
    draws = retrieval_candidates(image_ids, candidates, seed)
    hits, chance = 0, []
    for start in range(0, len(unique_ids), 64):
        chunk = unique_ids[start:start + 64]
        batch = np.stack([stretch_resize(read_image_rgb(paths.loc[i]), size) for i in chunk])
        img = frozen.encode_image(clip_normalize(
            torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)))
        for row, (_, cand) in enumerate(islice(draws, len(chunk))):  # the draws of this chunk's images
            chance.append(1 / len(cand))
            sims = txt_emb[torch.as_tensor(cand, device=device)] @ img[row]
            hits += int(sims.argmax().item() == 0)
    return {"split": split, "rate": round(hits / len(unique_ids), 4),
            "chance": round(float(np.mean(chance)), 4),
            "n": int(len(unique_ids)), "candidates": candidates}
