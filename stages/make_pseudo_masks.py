"""Stage make_pseudo_masks: PRMS (Eq. 10) + IRN-style refinement + thresholding -> one pseudo-mask per
train object in ``artifacts/pseudo_masks.zarr``, the affinity network in ``artifacts/affinity``, and a
diagnostic report (pseudo-masks vs GT; nothing trains on GT) in ``artifacts/reports/pseudo_masks.json``.

The stage streams, so its memory does not grow with the split (RefCOCO: 42,404 train objects): PRMS
keeps one choice per object, the affinity net learns from at most ``affinity.max_samples`` objects' CRF
labels, and each store shard (``pseudo_masks.shard_size`` objects) is built, written, scored against its
own GT masks and dropped before the next. It runs as one process (PRMS on the device) with
``pseudo_masks.workers`` CPU processes for the CRFs and the per-image refinement, forked before the
split is read so that their copies of this process's pages do not grow with it: ``base.nproc``, a param of the
training stages, is not read, so using every core here never invalidates Step-1. Under an outer
torchrun only rank 0 runs it (a store has one writer). See :mod:`pipeline.pseudo.labels`.
"""

import os
from concurrent.futures import Executor

import numpy as np
import torch

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.distributed import under_torchrun
from pipeline.eval.scoring import GroundTruth
from pipeline.memory import release_free_memory
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.params import Params
from pipeline.pseudo.labels import (
    RecentImages,
    iter_pseudo_mask_shards,
    load_split_responses,
    refine_pool,
    select_objects,
    train_shared_affinity,
)
from pipeline.pseudo.report import local_quality, pseudo_mask_report
from pipeline.stage import StageTimer, start_stage
from pipeline.store import PSEUDO_MASK_SCHEMA, RecordWriter, open_responses


def make_pseudo_masks(params: Params, device: torch.device, pool: Executor) -> tuple[list[dict], int]:
    """PRMS, the affinity net and the refined pseudo-masks of every train object, written shard by shard
    (CRFs and walks in ``pool``); returns each shard's diagnostic IoUs and the number of objects."""
    p = params.pseudo_masks
    size = p.size
    index = load_index(paths.INDEX)
    store = open_responses(paths.RESPONSES, index=paths.INDEX)  # refuses a store from another index
    train = split_sentences(index.images, index.sentences, "train")
    # no bank cache (it would fill to 2 GB); the last images read are kept instead
    images = RecentImages(ImageBank.from_index(index.images, size, max_bytes=0,
                                               workers=params.base.num_workers))
    # PRMS masks the image at the working size or, as calibration does, at Step-1's input size
    prms_side = size if p.prms_image == "working" else params.step1.input_size
    prms_images = images if prms_side == size else RecentImages(
        ImageBank.from_index(index.images, prms_side, max_bytes=0, workers=params.base.num_workers))
    responses = load_split_responses(store, "train")
    frozen = load_frozen_clip(paths.CLIP).to(device) if p.prms else None
    calibration_size = resolve_calibration_size(params.step1.calibration_size, frozen) if p.prms else 0
    attrs = {"input_size": [size, size], "refine": p.refine, "prms": p.prms, "threshold": p.threshold}
    refs = index.refs.set_index("ref_id")
    parts = []
    writer = RecordWriter(paths.PSEUDO_MASKS, PSEUDO_MASK_SCHEMA, (size, size), p.shard_size, attrs,
                          index=paths.INDEX)
    with StageTimer("make_pseudo_masks"), writer:
        objects = select_objects(train, responses, prms_images, frozen, use_prms=p.prms,
                                 off_choice=p.prms_off_choice, max_tokens=params.model.max_tokens,
                                 calibration_size=calibration_size, device=device, seed=params.base.seed,
                                 space=params.step1.calibration_mask_space,
                                 align_corners=params.model.align_corners)
        del frozen
        release_free_memory()  # the heap pages PRMS freed (see pipeline.memory)
        writer.add_split("train", len(objects))
        net, labels = train_shared_affinity(objects, responses, images, p, seed=params.base.seed,
                                            device=device, pool=pool)
        with atomic_dir(paths.AFFINITY) as out:
            torch.save({"model": net.state_dict() if net else None, "input_size": p.affinity.input_size},
                       out / "affinity.pt")
        release_free_memory()
        shards = iter_pseudo_mask_shards(objects, responses, images, p, net, labels,
                                         writer.owned_ranges("train"), pool)
        for a, b, shard, masks in shards:
            part = shard.objects
            writer.write_table("train", a, np.stack([masks[int(r)] for r in part["ref_id"]]), part)
            # diagnostic: this shard's IoUs, against GT masks decoded for this shard only
            gt = GroundTruth(refs.loc[part["ref_id"]].reset_index())
            parts.append(local_quality(shard, masks, np.arange(a, b), p, gt))
            release_free_memory()
    return parts, len(objects)


def main() -> None:
    if under_torchrun() and int(os.environ.get("RANK", "0")) > 0:  # an outer torchrun: one writer only
        print(f"[make_pseudo_masks] rank {os.environ['RANK']}: the stage runs on rank 0 alone "
              "(pseudo_masks.workers spreads it over that node's cores)")
        return
    params, device = start_stage("make_pseudo_masks")
    p = params.pseudo_masks
    with refine_pool(p) as pool:  # forked first, while this process holds nothing of the split
        parts, n_objects = make_pseudo_masks(params, device, pool)
    report = pseudo_mask_report(parts, n_objects, p)
    print(f"[make_pseudo_masks] {report}")
    write_json(paths.REPORTS / "pseudo_masks.json", report)


if __name__ == "__main__":
    main()
