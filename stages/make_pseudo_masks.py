"""Stage make_pseudo_masks: PRMS (Eq. 10) + IRN-style refinement + thresholding -> one pseudo-mask per
train object in ``artifacts/pseudo_masks.zarr``, the affinity network in ``artifacts/affinity``, and a
diagnostic report (pseudo-masks vs GT; nothing trains on GT) in ``artifacts/reports/pseudo_masks.json``.

With ``base.nproc > 1`` the stage runs under torchrun: each rank builds the pseudo-masks of its own
store shards and writes them (no shard has two writers); see :mod:`pipeline.pseudo.labels`.
"""


import numpy as np
import torch

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.eval.scoring import GroundTruth
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.pseudo.labels import load_split_responses, make_pseudo_masks, select_responses
from pipeline.pseudo.report import local_quality, pseudo_mask_report
from pipeline.stage import StageTimer, start_distributed_stage
from pipeline.store import PSEUDO_MASK_SCHEMA, RecordWriter, open_responses


def main() -> None:
    params, device, dist = start_distributed_stage("make_pseudo_masks")
    p = params.pseudo_masks
    size = p.size
    index = load_index(paths.INDEX)
    store = open_responses(paths.RESPONSES, index=paths.INDEX)  # refuses a store from another index
    train = split_sentences(index.images, index.sentences, "train")
    ref_order = np.sort(train["ref_id"].unique())  # the store's row order
    bank = ImageBank.from_index(index.images, size, workers=params.base.num_workers)
    responses = load_split_responses(store, "train")
    frozen = load_frozen_clip(paths.CLIP).to(device) if p.prms else None
    calibration_size = resolve_calibration_size(params.step1.calibration_size, frozen) if p.prms else 0
    attrs = {"input_size": [size, size], "refine": p.refine, "prms": p.prms, "threshold": p.threshold}
    writer = RecordWriter(paths.PSEUDO_MASKS, PSEUDO_MASK_SCHEMA, (size, size), p.shard_size, attrs,
                          dist=dist, index=paths.INDEX)
    with StageTimer("make_pseudo_masks"), writer:
        writer.add_split("train", len(ref_order))
        ranges = writer.owned_ranges("train")  # this rank's objects: whole shards of the store
        rows = np.concatenate([np.arange(a, b) for a, b in ranges] or [np.empty(0, dtype=np.int64)])
        mine = train[train["ref_id"].isin(ref_order[rows])]
        sel = select_responses(mine, responses, bank, frozen, use_prms=p.prms, off_choice=p.prms_off_choice,
                               max_tokens=params.model.max_tokens,
                               calibration_size=calibration_size, device=device,
                               seed=params.base.seed)
        masks, net = make_pseudo_masks(sel, bank, p, seed=params.base.seed, device=device, global_rows=rows,
                                       total_objects=len(ref_order), dist=dist)
        objects = sel.objects
        if dist.is_main:
            with atomic_dir(paths.AFFINITY) as out:
                torch.save({"model": net.state_dict() if net else None, "input_size": p.affinity.input_size},
                           out / "affinity.pt")
        for a, b in ranges:
            part = objects.iloc[np.searchsorted(rows, a):np.searchsorted(rows, a) + (b - a)]
            writer.write_table("train", a, np.stack([masks[int(r)] for r in part["ref_id"]]), part)

    # diagnostic report: per-object IoUs from every rank, in store order
    local = local_quality(sel, masks, rows, p, GroundTruth(index.refs))
    parts = [local]
    if dist.enabled:
        parts = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, local)
    if dist.is_main:
        report = pseudo_mask_report(parts, len(ref_order), p)
        print(f"[make_pseudo_masks] {report}")
        write_json(paths.REPORTS / "pseudo_masks.json", report)
    dist.close()


if __name__ == "__main__":
    main()
