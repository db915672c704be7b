"""Stage report: ``artifacts/reports/metrics.json`` (Step-1, Step-2 and pseudo-mask metrics in one
file for `dvc metrics show` / `dvc exp show`), ``summary.md``, and a gallery of train objects showing
image, Step-1 map (the PRMS-selected expression), pseudo-mask, Step-2 mask and GT."""

import json

import numpy as np
from PIL import Image

from pipeline import paths
from pipeline.atomic import atomic_file, write_json
from pipeline.data.images import read_image_rgb
from pipeline.data.index import decode_mask, load_index
from pipeline.eval.metrics import iou, point_from_map
from pipeline.eval.report import combine_metrics, summary_markdown
from pipeline.eval.scoring import response_to_prob
from pipeline.eval.viz import render_case, write_gallery
from pipeline.models.checkpoints import load_segmenter
from pipeline.predict import predict_mask
from pipeline.stage import start_stage
from pipeline.store import open_pseudo_masks, open_responses

GALLERY_SAMPLE = 60


def main() -> None:
    params, device = start_stage("report")
    # both stores first: either one built from another index than artifacts/index is refused, before
    # anything is written
    masks = open_pseudo_masks(paths.PSEUDO_MASKS, index=paths.INDEX)
    responses = open_responses(paths.RESPONSES, index=paths.INDEX)
    read = lambda name: json.loads((paths.REPORTS / name).read_text())  # noqa: E731
    metrics = combine_metrics(read("step1.json"), read("step2.json"), read("pseudo_masks.json"))
    write_json(paths.REPORTS / "metrics.json", metrics)

    index = load_index(paths.INDEX)
    model, meta = load_segmenter(paths.STEP2 / "model.pt")
    sentences = index.sentences.set_index("sent_id")
    refs, images = index.refs.set_index("ref_id"), index.images.set_index("image_id")
    rng = np.random.default_rng(params.base.seed)
    ref_ids = masks.ref_ids("train")
    cases = []
    for ref_id in rng.choice(ref_ids, size=min(GALLERY_SAMPLE, len(ref_ids)), replace=False):
        info = masks.meta("train", int(ref_id))
        sent_id = int(info["sent_id_selected"])
        text = sentences.loc[sent_id, "text"]
        image = read_image_rgb(images.loc[int(info["image_id"]), "path"])
        h, w = image.shape[:2]
        step1 = response_to_prob(responses.get("train", sent_id), h, w)
        pseudo = Image.fromarray(masks.get("train", int(ref_id)) * 255).resize((w, h), Image.NEAREST)
        pseudo = np.asarray(pseudo) > 0
        prob, step2 = predict_mask(image, text, model, input_size=meta["input_size"],
                                   max_tokens=meta["max_tokens"], device=device)
        gt = decode_mask(refs.loc[int(ref_id)])
        panel = render_case(image, step1, gt, text, point_from_map(step1),
                            extra_panels=[("pseudo-mask", pseudo), ("Step-2", step2), ("GT", gt)])
        cases.append({"title": f"train ref {int(ref_id)}: {text}", "image": panel, "score": iou(step2, gt)})
    write_gallery(paths.REPORTS / "gallery", cases, "Step-1 map, pseudo-mask and Step-2 mask (train objects)",
                  params.evaluate.gallery_size, score_name="Step-2 IoU")
    with atomic_file(paths.REPORTS / "summary.md") as tmp:
        tmp.write_text(summary_markdown(metrics, "gallery/index.html"))
    print((paths.REPORTS / "summary.md").read_text())


if __name__ == "__main__":
    main()
