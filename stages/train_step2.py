"""Stage train_step2: the referring segmenter (CLIP encoders + non-local fusion on the last three
stages + symmetric decoder) trained with cross-entropy on the pseudo-masks only, never on GT.

Resumable like train_step1 (``artifacts/step2`` is a DVC ``persist`` out holding ``resume.pt``).
"""

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.eval.scoring import GroundTruth, val_miou_scorer
from pipeline.models.checkpoints import save_segmenter
from pipeline.models.clip_artifact import SPEC_FILE, load_clip, read_clip_spec, recorded_quick_gelu
from pipeline.models.clip_backbone import ClipBackbone
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.stage import start_distributed_stage
from pipeline.store import open_pseudo_masks
from pipeline.train.loop import TrainingRun
from pipeline.train.selection import BestValSelection
from pipeline.train.step2 import train_step2


def main() -> None:
    params, device, dist = start_distributed_stage("train_step2")
    p = params.step2
    store = open_pseudo_masks(paths.PSEUDO_MASKS, index=paths.INDEX)  # first: refuses masks of another index
    spec = read_clip_spec(paths.CLIP)
    # quick_gelu: the activation the CLIP trains with, so that load_segmenter rebuilds that network
    meta = {"clip_name": spec["name"], "clip_tiny": spec["tiny"], "context_length": spec["context_length"],
            "quick_gelu": recorded_quick_gelu(spec, "name", str(paths.CLIP / SPEC_FILE)),
            "max_tokens": params.model.max_tokens, "input_size": p.input_size,
            "fusion_dim": p.fusion_dim, "decoder_dim": p.decoder_dim}
    run = TrainingRun.start("train_step2", paths.STEP2,
                            config={"step2": p.model_dump(), "meta": meta, "seed": params.base.seed},
                            inputs=[paths.INDEX, paths.CLIP, paths.PSEUDO_MASKS], stage_script=__file__,
                            resume=p.resume, dist=dist)
    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    masks_by_ref = {int(r): store.get("train", int(r)) for r in store.ref_ids("train")}
    bank = ImageBank.from_index(index.images, p.input_size, workers=params.base.num_workers)
    selection = None
    if p.select == "best_val" and dist.is_main:  # reads the val split's GT masks (docs/departures.md)
        score = val_miou_scorer(bank, split_sentences(index.images, index.sentences, "val"),
                                GroundTruth(index.refs), threshold=params.evaluate.step2_threshold,
                                max_tokens=params.model.max_tokens, device=device,
                                align_corners=params.model.align_corners)
        selection = BestValSelection(paths.STEP2, run.fingerprint, score, resuming=run.resuming)
    model = ReferringSegmenter(ClipBackbone(load_clip(paths.CLIP)), p.fusion_dim, p.decoder_dim)
    run.run_stage(lambda: train_step2(model, bank, train, masks_by_ref, p, device, seed=params.base.seed,
                                      max_tokens=params.model.max_tokens, run=run,
                                      selection=selection),
                  lambda trained: save_segmenter(paths.STEP2 / "model.pt", trained, meta))
    if selection is not None:
        selection.discard()  # model.pt now holds the best epoch's weights


if __name__ == "__main__":
    main()
