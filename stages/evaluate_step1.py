"""Stage evaluate_step1: scores the dumped Step-1 maps of every evaluation split (mIoU, oIoU, P@t,
PointM, PointIt, Acc_box, with the chance PointM baselines beside them) into
``artifacts/reports/step1.json``, and renders a best / median / worst gallery of the first split.

Beside them, per split, the object hit (``object_hit``: does the map respond most, by its mean, inside
the referred object among the image's referred objects; :mod:`pipeline.eval.grounding`) and its chance.
On the first split (val under ``data.eval_splits: auto``) only, to keep the stage quick:
``object_hit_by_kind`` (synthetic expressions only) and the gaming guard (``gaming_guard``: the frozen
CLIP's masked-object ranking on Step-1's own soft masks beside its ranking on GT masks,
:func:`pipeline.eval.clip_checks.gaming_guard`). All of it reads GT masks: evaluation only.
"""

from pipeline import paths
from pipeline.atomic import write_json
from pipeline.data.index import load_index
from pipeline.data.splits import require_eval_splits
from pipeline.eval.clip_checks import gaming_guard
from pipeline.eval.grounding import object_hit_metrics, response_object_hits, split_responses
from pipeline.eval.inspect import render_sentence
from pipeline.eval.scoring import GroundTruth, evaluate_responses
from pipeline.eval.viz import select_sections, write_gallery
from pipeline.models.clip_artifact import load_frozen_clip
from pipeline.stage import StageTimer, start_stage
from pipeline.store import open_responses


def main() -> None:
    params, device = start_stage("evaluate_step1")
    p = params.evaluate
    index = load_index(paths.INDEX)
    eval_splits = require_eval_splits("evaluate_step1", index, params.data.eval_splits)
    store = open_responses(paths.RESPONSES, index=paths.INDEX)  # refuses a store from another index
    gt = GroundTruth(index.refs)
    synthetic = params.data.source == "synthetic"  # the kinds exist for the generator's expressions only
    split = eval_splits[0]
    report, tables = {}, {}
    with StageTimer("evaluate_step1"):
        for name in eval_splits:
            report[name], tables[name] = evaluate_responses(store, name, gt, p,
                                                            align_corners=params.model.align_corners)
            responses = split_responses(store, name)
            sentences = index.sentences[index.sentences["split"] == name]
            hits = response_object_hits(responses, sentences, index.refs, index.images, gt.mask)
            report[name].update(object_hit_metrics(hits, by_kind=synthetic and name == split))
            if name == split:
                frozen = load_frozen_clip(paths.CLIP).to(device)
                report[name]["gaming_guard"] = gaming_guard(
                    frozen, index.images, index.refs, index.sentences, responses, name,
                    params.model.max_tokens, frozen.image_size, device)
            print(f"[evaluate_step1] {name}: {report[name]}")
    write_json(paths.REPORTS / "step1.json", report)

    table = tables[split]
    sections = select_sections(table["iou"].tolist(), p.gallery_size)
    picked = sorted({i for ids in sections.values() for i in ids})
    cases = []
    for i in picked:
        sent_id = int(table["sent_id"].iloc[i])
        panel, score = render_sentence(store, index, split, sent_id, p.threshold)
        cases.append({"title": f"{split} sent_id {sent_id}", "image": panel, "score": score.iou,
                      "point_m": score.point_m})
    write_gallery(paths.REPORTS / "step1_gallery", cases, f"Step-1 response maps ({split})", p.gallery_size)


if __name__ == "__main__":
    main()
