"""Frozen-CLIP image-encoder calls per referred object in PRMS (Eq. 10).

Eq. 10 scores each of an object's M masked images against its M expressions, so a per-object loop
(the authors' code) calls the encoder once per object with M images, or M times. Here masked images of
many objects share encoder batches and objects with one expression skip the encoder, so the number of
calls per object is far below one; the images per object stay M for objects with M > 1.

    python -m bench.prms_calls [--refs 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import require
from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.models.clip_backbone import FrozenClip
from pipeline.params import load_params
from pipeline.pseudo.labels import load_split_responses, select_responses
from pipeline.runtime import select_device
from pipeline.store import open_responses


class CountingEncoder:
    """A FrozenClip stand-in that counts image-encoder calls and images."""

    def __init__(self, frozen: FrozenClip) -> None:
        self.frozen = frozen
        self.calls = 0
        self.images = 0

    def encode_text(self, tokens):
        return self.frozen.encode_text(tokens)

    def encode_image(self, images):
        self.calls += 1
        self.images += len(images)
        return self.frozen.encode_image(images)


def run(refs: int = 400) -> dict:
    require(paths.RESPONSES, paths.CLIP, paths.INDEX)
    params = load_params()
    device = select_device(params.base.device)
    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    chosen = np.sort(train["ref_id"].drop_duplicates().to_numpy())[:refs]
    subset = train[train["ref_id"].isin(chosen)].reset_index(drop=True)
    bank = ImageBank.from_index(index.images, params.pseudo_masks.size)
    responses = load_split_responses(open_responses(paths.RESPONSES), "train")
    frozen = load_frozen_clip(paths.CLIP).to(device)
    encoder = CountingEncoder(frozen)
    t0 = time.perf_counter()
    sel = select_responses(subset, responses, bank, encoder, use_prms=True, off_choice="first",
                           max_tokens=params.model.max_tokens,
                           calibration_size=resolve_calibration_size(params.step1.calibration_size, frozen),
                           device=device, seed=params.base.seed)
    seconds = time.perf_counter() - t0
    n = len(sel.objects)
    multi = int((sel.objects["num_expressions"] > 1).sum())
    return {"refs": n, "expressions": len(subset), "multi_expression_refs": multi,
            "encoder_calls": encoder.calls, "calls_per_ref": encoder.calls / n,
            "images_per_ref": encoder.images / n, "naive_calls_per_ref": len(subset) / n,
            "refs_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=int, default=400)
    r = run(parser.parse_args().refs)
    print(f"PRMS on {r['refs']} objects ({r['expressions']} expressions): "
          f"{r['encoder_calls']} encoder calls, {r['calls_per_ref']:.3f} calls/object "
          f"({r['images_per_ref']:.2f} images/object; one call per expression would be "
          f"{r['naive_calls_per_ref']:.2f}), {r['refs_per_s']:.0f} objects/s")


if __name__ == "__main__":
    main()
