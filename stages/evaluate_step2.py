"""Stage evaluate_step2: the Step-2 segmenter (its own class, loaded from its own checkpoint) on each
evaluation split; writes ``artifacts/reports/step2.json`` with the same keys as ``step1.json``
(PointM / PointIt from the argmax of the predicted probability map)."""



from pipeline import paths
from pipeline.atomic import write_json
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.data.splits import require_eval_splits
from pipeline.eval.scoring import GroundTruth, iter_segmenter_probs, score_maps
from pipeline.models.checkpoints import load_segmenter
from pipeline.stage import StageTimer, start_stage


def main() -> None:
    params, device = start_stage("evaluate_step2")
    model, meta = load_segmenter(paths.STEP2 / "model.pt")
    index = load_index(paths.INDEX)
    eval_splits = require_eval_splits("evaluate_step2", index, params.data.eval_splits)
    gt = GroundTruth(index.refs)
    bank = ImageBank.from_index(index.images, meta["input_size"], workers=params.base.num_workers)
    report = {}
    with StageTimer("evaluate_step2"):
        for split in eval_splits:
            rows = split_sentences(index.images, index.sentences, split)
            probs = iter_segmenter_probs(model, bank, rows, 32, meta["max_tokens"], device,
                                         align_corners=params.model.align_corners)
            report[split], _ = score_maps(probs, gt, params.evaluate.step2_threshold,
                                          acc_box=params.evaluate.acc_box)
            print(f"[evaluate_step2] {split}: {report[split]}")
    write_json(paths.REPORTS / "step2.json", report)


if __name__ == "__main__":
    main()
