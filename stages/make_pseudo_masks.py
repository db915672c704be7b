"""Stage make_pseudo_masks: PRMS (Eq. 10) + IRN-style refinement + thresholding -> one pseudo-mask per
train object in ``artifacts/pseudo_masks.zarr``, the affinity network in ``artifacts/affinity``, and a
diagnostic report (pseudo-masks vs GT; nothing trains on GT) in ``artifacts/reports/pseudo_masks.json``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import paths  # noqa: E402
from pipeline.atomic import atomic_dir, write_json  # noqa: E402
from pipeline.data.index import load_index  # noqa: E402
from pipeline.data.samples import ImageBank, split_sentences  # noqa: E402
from pipeline.evaluation import GroundTruth  # noqa: E402
from pipeline.metrics import iou  # noqa: E402
from pipeline.models.clip_artifact import load_clip  # noqa: E402
from pipeline.models.clip_backbone import FrozenClip  # noqa: E402
from pipeline.pseudo_labels import load_split_responses, make_pseudo_masks, select_responses  # noqa: E402
from pipeline.refine.pseudo_mask import to_pseudo_mask  # noqa: E402
from pipeline.stage import StageTimer, start_stage  # noqa: E402
from pipeline.store import PseudoMaskWriter, open_responses  # noqa: E402


def mask_quality(masks: dict, objects, gt: GroundTruth) -> dict:
    """mIoU and P@0.5 of S x S masks against GT at the original size (diagnostic only)."""
    ious = []
    for row in objects.itertuples():
        mask = Image.fromarray(masks[row.ref_id].astype(np.uint8))
        up = mask.resize((row.width, row.height), Image.NEAREST)
        ious.append(iou(np.asarray(up, dtype=bool), gt.mask(row.ref_id)))
    ious = np.asarray(ious)
    return {"mIoU": round(float(ious.mean()), 4), "P@0.5": round(float((ious >= 0.5).mean()), 4)}


def main() -> None:
    params, device = start_stage("make_pseudo_masks")
    p = params.pseudo_masks
    size = p.size
    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    bank = ImageBank.from_index(index.images, size)
    responses = load_split_responses(open_responses(paths.RESPONSES), "train")
    frozen = FrozenClip(load_clip(paths.CLIP)).to(device) if p.prms else None
    with StageTimer("make_pseudo_masks"):
        sel = select_responses(train, responses, bank, frozen, use_prms=p.prms, off_choice=p.prms_off_choice,
                               max_tokens=params.model.max_tokens,
                               calibration_size=params.step1.calibration_size, device=device,
                               seed=params.base.seed)
        masks, net = make_pseudo_masks(
            sel, bank, method=p.refine, conf_fg=p.conf_fg, conf_bg=p.conf_bg, crf_kwargs=p.crf.model_dump(),
            affinity=p.affinity.model_dump(), random_walk=p.random_walk.model_dump(), threshold=p.threshold,
            keep=p.keep, workers=p.workers, seed=params.base.seed, device=device,
            walk_seed=p.walk_seed)
    objects = sel.objects
    with atomic_dir(paths.AFFINITY) as out:
        torch.save({"model": net.state_dict() if net else None, "input_size": p.affinity.input_size},
                   out / "affinity.pt")
    attrs = {"input_size": [size, size], "refine": p.refine, "prms": p.prms, "threshold": p.threshold}
    with PseudoMaskWriter(paths.PSEUDO_MASKS, (size, size), 256, attrs) as writer:
        writer.add_split("train", len(objects))
        writer.write("train", 0, np.stack([masks[int(r)] for r in objects["ref_id"]]), objects["ref_id"],
                     objects["image_id"], objects["height"], objects["width"], objects["sent_id_selected"])

    gt = GroundTruth(index.refs)
    raw = {r: to_pseudo_mask(sel.fg_maps[r], p.threshold, p.keep) for r in sel.fg_maps}
    first = {r: to_pseudo_mask(sel.first_maps[r], p.threshold, p.keep) for r in sel.first_maps}
    multi = objects["num_expressions"] > 1
    report = {
        "n_objects": len(objects),
        "raw_first_expression": mask_quality(first, objects, gt),
        "raw_selected": mask_quality(raw, objects, gt),
        "refined": mask_quality(masks, objects, gt),
        "prms": {"enabled": p.prms, "objects_with_several_expressions": int(multi.sum()),
                 "picked_other_than_first": int(objects["changed"].sum()),
                 "mean_expressions_per_object": round(float(objects["num_expressions"].mean()), 3)},
        "refine": p.refine,
    }
    print(f"[make_pseudo_masks] {report}")
    write_json(paths.REPORTS / "pseudo_masks.json", report)


if __name__ == "__main__":
    main()
