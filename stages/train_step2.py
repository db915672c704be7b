"""Stage train_step2: the referring segmenter (CLIP encoders + non-local fusion on the last three
stages + symmetric decoder) trained with cross-entropy on the pseudo-masks only, never on GT.

Resumable like train_step1 (``artifacts/step2`` is a DVC ``persist`` out holding ``resume.pt``).
"""

import shutil

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.models.checkpoints import save_segmenter
from pipeline.models.clip_artifact import load_clip, read_clip_spec
from pipeline.models.clip_backbone import ClipBackbone
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.stage import StageTimer, start_distributed_stage
from pipeline.store import open_pseudo_masks
from pipeline.train.common import fingerprint, load_resume_state, training_code
from pipeline.train.live import open_live
from pipeline.train.step2 import Step2TrainConfig, train_step2


def main() -> None:
    params, device, dist = start_distributed_stage("train_step2")
    p = params.step2
    out = paths.STEP2
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").unlink(missing_ok=True)
    spec = read_clip_spec(paths.CLIP)
    meta = {"clip_name": spec["name"], "clip_tiny": spec["tiny"], "context_length": spec["context_length"],
            "max_tokens": params.model.max_tokens, "input_size": p.input_size,
            "fusion_dim": p.fusion_dim, "decoder_dim": p.decoder_dim}
    run_id = fingerprint({"step2": p.model_dump(), "meta": meta, "seed": params.base.seed},
                         [paths.INDEX, paths.CLIP, paths.PSEUDO_MASKS, *training_code(__file__)])
    resume_path = out / "resume.pt"
    if dist.is_main and not p.resume:
        resume_path.unlink(missing_ok=True)
    dist.barrier()
    resuming = load_resume_state(resume_path, run_id) is not None
    if dist.is_main and not resuming:
        shutil.rmtree(out / "live", ignore_errors=True)

    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    store = open_pseudo_masks(paths.PSEUDO_MASKS)
    masks_by_ref = {int(r): store.get("train", int(r)) for r in store.ref_ids("train")}
    bank = ImageBank.from_index(index.images, p.input_size, workers=params.base.num_workers)
    model = ReferringSegmenter(ClipBackbone(load_clip(paths.CLIP)), p.fusion_dim, p.decoder_dim)
    cfg = Step2TrainConfig.from_params(params)
    live, log = open_live(out / "live", resume=resuming) if dist.is_main else (None, None)
    with StageTimer("train_step2"):
        train_step2(model, bank, train, masks_by_ref, cfg, device, resume_path=resume_path,
                    fingerprint=run_id, log=log, dist=dist)
    if dist.is_main:
        live.end()
        save_segmenter(out / "model.pt", model.cpu(), meta)
        resume_path.unlink(missing_ok=True)  # finished: only an interrupted run resumes
    dist.barrier()
    dist.close()


if __name__ == "__main__":
    main()
