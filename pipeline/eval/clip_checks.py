"""Checks that read ground truth on purpose, to tell whether the text-only parts work.

Nothing here feeds training: these functions only report numbers (e.g. whether the frozen CLIP ranks
the referred object's masked image above the other objects' for the same expression, the premise of
calibration and PRMS).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import numpy as np
import pandas as pd
import torch

from pipeline.data.images import read_image_rgb
from pipeline.data.index import decode_mask
from pipeline.data.samples import stretch_resize
from pipeline.maps import clip_normalize
from pipeline.models.clip_backbone import FrozenClip, tokenize


@torch.no_grad()
def masked_object_hits(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame, sentences: pd.DataFrame,
                       split: str, max_tokens: int, size: int, device: torch.device,
                       max_images: int | None = None) -> pd.DataFrame:
    """Per expression of ``split`` (images with two or more referred objects): ``sent_id``, ``text``,
    ``hit`` (the frozen CLIP scores the target's GT-masked image above every other object's GT-masked
    image of the same image) and ``objects`` (how many it chose among)."""
    split_refs = refs[refs["split"] == split]
    image_rows = images.set_index("image_id")
    records = []
    for n, (image_id, group) in enumerate(split_refs.groupby("image_id", sort=True)):
        if max_images is not None and n >= max_images:
            break
        if len(group) < 2:
            continue
        image = read_image_rgb(image_rows.loc[image_id, "path"])
        masked = []
        for _, ref in group.iterrows():
            mask = decode_mask(ref)[..., None]
            masked.append(stretch_resize(image * mask, size))
        batch = torch.from_numpy(np.stack(masked)).permute(0, 3, 1, 2).float().div(255).to(device)
        img_emb = frozen.encode_image(clip_normalize(batch))
        ref_ids = group["ref_id"].to_numpy()
        sents = sentences[sentences["ref_id"].isin(ref_ids)]
        txt_emb = frozen.encode_text(tokenize(sents["text"].tolist(), max_tokens).to(device))
        sims = txt_emb @ img_emb.T  # (sentences, objects)
        target = torch.as_tensor([int(np.flatnonzero(ref_ids == r)[0]) for r in sents["ref_id"]])
        hits = (sims.argmax(dim=1).cpu() == target).tolist()
        records += [{"sent_id": int(s), "text": t, "hit": bool(h), "objects": len(group)}
                    for s, t, h in zip(sents["sent_id"], sents["text"], hits, strict=True)]
    if not records:
        raise ValueError(f"split {split!r}: no image with two or more referred objects")
    return pd.DataFrame.from_records(records)


def masked_object_ranking(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame,
                          sentences: pd.DataFrame, split: str, max_tokens: int, size: int,
                          device: torch.device, max_images: int | None = None) -> dict:
    """How often the frozen CLIP scores the target's GT-masked image above every other object's
    GT-masked image of the same image, for the target's own expression (vs chance 1/objects)."""
    hits = masked_object_hits(frozen, images, refs, sentences, split, max_tokens, size, device, max_images)
    return {"split": split, "rate": round(float(hits["hit"].mean()), 4),
            "chance": round(float((1.0 / hits["objects"]).mean()), 4), "n": len(hits)}


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
