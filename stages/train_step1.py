"""Stage train_step1: the TRIS localiser trained from text alone (Eq. 1-9).

Resumable: after every epoch ``artifacts/step1/resume.pt`` records model, optimiser, scheduler and a
fingerprint of params, inputs and code. The output directory is a DVC
``persist`` out, so after a kill the next ``dvc repro`` continues from the last finished epoch (set
``step1.resume: false`` to always start over). A finished run deletes ``resume.pt``: a re-run, forced or
after a code change, trains again instead of "resuming" after the last epoch.
The final weights are ``model.pt`` (last epoch: model selection reads no ground truth). The previous
``model.pt`` stays until the finished run's replaces it atomically: a killed run, or one stopped by a full
disk (one line naming the file), leaves it, beside its ``resume.pt``.
"""

import sys

from pipeline import paths
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.models.checkpoints import build_localiser, save_localiser
from pipeline.models.clip_artifact import load_frozen_clip, resolve_calibration_size
from pipeline.stage import start_distributed_stage
from pipeline.train.loop import TrainingRun
from pipeline.train.step1 import localiser_meta, train_step1


def main() -> None:
    params, device, dist = start_distributed_stage("train_step1")
    p = params.step1
    meta = localiser_meta(params, str(paths.CLIP))
    run = TrainingRun.start("train_step1", paths.STEP1,
                            config={"step1": p.model_dump(), "meta": meta, "seed": params.base.seed},
                            inputs=[paths.INDEX, paths.CLIP], stage_script=__file__, resume=p.resume,
                            dist=dist)
    index = load_index(paths.INDEX)
    train = split_sentences(index.images, index.sentences, "train")
    bank = ImageBank.from_index(index.images, p.input_size, workers=params.base.num_workers)
    model = build_localiser(paths.CLIP, meta)
    if p.init_projectors == "clip" and not run.resuming and not model.init_projectors_from_clip():
        sys.exit("train_step1: step1.init_projectors=clip needs a ResNet CLIP and model.hidden_dim equal to "
                 "its embedding width; set step1.init_projectors=random or fix model.hidden_dim")
    frozen = load_frozen_clip(paths.CLIP)
    p = p.model_copy(update={"calibration_size": resolve_calibration_size(p.calibration_size, frozen)})
    run.run_stage(lambda: train_step1(model, frozen, bank, train, p, device, seed=params.base.seed,
                                      max_tokens=params.model.max_tokens,
                                      align_corners=params.model.align_corners, run=run),
                  lambda trained: save_localiser(paths.STEP1 / "model.pt", trained, meta))


if __name__ == "__main__":
    main()
