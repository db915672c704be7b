"""Bytes per sentence of responses.zarr and per referred object of pseudo_masks.zarr, against the
float32 full-resolution ``.npy`` per object that a naive dump writes (the authors' code saves one such
array per object; goal: <= 1 %).

    python -m bench.storage
"""

from __future__ import annotations

import numpy as np

from bench.common import directory_bytes, require
from pipeline import paths
from pipeline.store import open_pseudo_masks, open_responses

NPY_HEADER = 128  # bytes of a .npy header for a 2-D float32 array


def run() -> dict:
    require(paths.RESPONSES, paths.PSEUDO_MASKS)
    responses = open_responses(paths.RESPONSES)
    masks = open_pseudo_masks(paths.PSEUDO_MASKS)
    n_sentences = sum(len(responses.sent_ids(s)) for s in responses.splits)
    n_refs = sum(len(masks.ref_ids(s)) for s in masks.splits)
    npy = []  # float32 full-resolution map of every object whose mask is stored
    for split in masks.splits:
        for ref in masks.ref_ids(split):
            meta = masks.meta(split, int(ref))
            npy.append(meta["height"] * meta["width"] * 4 + NPY_HEADER)
    npy_per_ref = float(np.mean(npy))
    per_sentence = directory_bytes(paths.RESPONSES) / n_sentences
    per_ref = directory_bytes(paths.PSEUDO_MASKS) / n_refs
    return {"sentences": n_sentences, "refs": n_refs, "responses_bytes_per_sentence": per_sentence,
            "pseudo_mask_bytes_per_ref": per_ref, "npy_bytes_per_ref": npy_per_ref,
            "responses_ratio": per_sentence / npy_per_ref, "pseudo_masks_ratio": per_ref / npy_per_ref}


def main() -> None:
    r = run()
    print(f"responses.zarr {r['responses_bytes_per_sentence']:.0f} B/sentence, pseudo_masks.zarr "
          f"{r['pseudo_mask_bytes_per_ref']:.0f} B/ref, float32 .npy {r['npy_bytes_per_ref']:.0f} B/ref: "
          f"{100 * r['responses_ratio']:.3f} % and {100 * r['pseudo_masks_ratio']:.3f} % (goal <= 1 %)")


if __name__ == "__main__":
    main()
