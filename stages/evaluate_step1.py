"""Stage evaluate_step1: scores the dumped Step-1 maps of every evaluation split (mIoU, oIoU, P@t,
PointM, PointIt, Acc_box, with the chance PointM baselines beside them) into
``artifacts/reports/step1.json``, and renders a best / median / worst gallery of the first split."""



from pipeline import paths
from pipeline.atomic import write_json
from pipeline.data.index import load_index
from pipeline.data.splits import require_eval_splits
from pipeline.eval.inspect import render_sentence
from pipeline.eval.scoring import GroundTruth, evaluate_responses
from pipeline.eval.viz import select_sections, write_gallery
from pipeline.stage import StageTimer, start_stage
from pipeline.store import open_responses


def main() -> None:
    params, _ = start_stage("evaluate_step1")
    p = params.evaluate
    index = load_index(paths.INDEX)
    eval_splits = require_eval_splits("evaluate_step1", index, params.data.eval_splits)
    store = open_responses(paths.RESPONSES, index=paths.INDEX)  # refuses a store from another index
    gt = GroundTruth(index.refs)
    report, tables = {}, {}
    with StageTimer("evaluate_step1"):
        for split in eval_splits:
            report[split], tables[split] = evaluate_responses(store, split, gt, p)
            print(f"[evaluate_step1] {split}: {report[split]}")
    write_json(paths.REPORTS / "step1.json", report)

    split = eval_splits[0]
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
