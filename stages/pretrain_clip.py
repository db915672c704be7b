"""Stage pretrain_clip: the CLIP every later stage starts from and freezes.

Embedded default (``model.clip.pretrained: embedded``): train the small open_clip model contrastively on
the train split's (image, expression) pairs. Otherwise: record the open_clip name and tag / local
checkpoint path (loaded once here so a bad path fails now, not three stages later); a tiny CLIP's file
(a web CLIP from ``scripts/build_web_clip.py``) brings its architecture in the ``clip.json`` beside it.
Either way, ``frozen_clip.json`` records the frozen CLIP of calibration and PRMS (``model.frozen_clip``:
``same`` = this CLIP; ``embedded`` = a second small CLIP trained here on generated cutout pictures
(``pretrain_clip.frozen``), the embedded stand-in for the authors' separate web-scale ViT-B/32; or an
open_clip tag / local path), loaded here for the same reason.
Either way, report on val how often the frozen CLIP ranks the referred object's GT-masked image first,
and how often it retrieves an image's own expression among 48 (diagnostics; training never reads masks).
Weight files read from outside ``artifacts/clip`` (a local path, or a tag's cached file) must lie under
``inputs.weights``, this stage's dvc.yaml dep, and their size and md5 go into ``artifacts/clip/weights.json``:
a byte change re-runs this stage, changes its output and so re-runs every stage after it
(:mod:`pipeline.inputs`).
"""

import os
from pathlib import Path

import torch

from pipeline import paths
from pipeline.atomic import atomic_dir, write_json
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.data.splits import require_eval_splits
from pipeline.eval.clip_checks import expression_retrieval, masked_object_ranking
from pipeline.inputs import MANIFEST_FILE, require_tracked, uncovered, weights_file, weights_manifest
from pipeline.models.clip_artifact import (
    FROZEN_SPEC_FILE,
    FROZEN_WEIGHTS_FILE,
    LOCAL_WEIGHTS,
    WEIGHTS_FILE,
    clip_spec,
    frozen_clip_spec,
    load_clip,
    load_frozen_clip,
    write_clip_spec,
)
from pipeline.models.shipped_clip import external_clip_spec
from pipeline.params import Params
from pipeline.stage import StageTimer, start_stage
from pipeline.train.clip_pretrain import pretrain_embedded_clip, pretrain_embedded_frozen_clip
from pipeline.train.loop import TrainingRun


def pretrain_frozen_clip(params: Params, out: Path, device: torch.device) -> dict:
    """Train the embedded frozen CLIP (``pretrain_embedded_frozen_clip``) into ``out``; return its spec."""
    run = TrainingRun("pretrain_frozen_clip", live_dir=out / "frozen_live")
    model, tiny = pretrain_embedded_frozen_clip(params, device, run)
    run.finish(lambda: torch.save(model.state_dict(), out / FROZEN_WEIGHTS_FILE))
    return clip_spec(params.model.frozen_clip.name, FROZEN_WEIGHTS_FILE, tiny, params.model.max_tokens)


def untracked_weights(params: Params) -> list[str]:
    """The weight files this run reads that do not lie under ``inputs.weights`` (its dvc.yaml dep)."""
    clip_p, frozen_p, declared = params.model.clip, params.model.frozen_clip, params.inputs.weights
    reads = [("model.clip.pretrained", weights_file(clip_p.name, clip_p.pretrained))]
    if frozen_p.name != "same":
        reads.append(("model.frozen_clip.pretrained", weights_file(frozen_p.name, frozen_p.pretrained)))
    reads = [(key, path) for key, path in reads if path is not None]
    if not reads:
        return []
    folders = sorted({str(path.parent) for _, path in reads})
    common = folders[0] if len(folders) == 1 else os.path.commonpath([os.path.abspath(f) for f in folders])
    return uncovered(reads, "weights", declared, f"a folder holding them ({common!r})")


def main() -> None:
    params, device = start_stage("pretrain_clip")
    require_tracked("pretrain_clip", untracked_weights(params))
    clip_p = params.model.clip
    index = load_index(paths.INDEX)
    eval_splits = require_eval_splits("pretrain_clip", index, params.data.eval_splits)
    with StageTimer("pretrain_clip"), atomic_dir(paths.CLIP) as out:
        if clip_p.pretrained == "embedded":
            index_bank = ImageBank.from_index(index.images, clip_p.tiny.image_size,
                                              workers=params.base.num_workers)
            train = split_sentences(index.images, index.sentences, "train")
            run = TrainingRun("pretrain_clip", live_dir=out / "live")  # out is fresh: nothing to resume
            model = pretrain_embedded_clip(params, train, index_bank, device, run)
            run.finish(lambda: torch.save(model.state_dict(), out / WEIGHTS_FILE))
            spec = clip_spec(clip_p.name, WEIGHTS_FILE, clip_p.tiny.model_dump(), params.model.max_tokens)
        else:
            spec = external_clip_spec(clip_p.name, clip_p.pretrained, clip_p.tiny.model_dump(),
                                      params.model.max_tokens)
        write_clip_spec(out, spec)
        frozen_p = params.model.frozen_clip
        if frozen_p.pretrained == "embedded":
            frozen_spec = pretrain_frozen_clip(params, out, device)
        else:
            frozen_spec = frozen_clip_spec(frozen_p.name, frozen_p.pretrained, spec)
        write_clip_spec(out, frozen_spec, FROZEN_SPEC_FILE)
        manifest = weights_manifest({"clip": spec, "frozen_clip": frozen_spec}, LOCAL_WEIGHTS)
        if manifest is not None:
            write_json(out / MANIFEST_FILE, manifest)
        if clip_p.pretrained != "embedded" and frozen_p.name != "same":
            load_clip(out)  # the trained CLIP's weights are not loaded below: check them now
        frozen = load_frozen_clip(out).to(device)
        split = eval_splits[0]
        ranking = masked_object_ranking(frozen, index.images, index.refs, index.sentences, split,
                                        params.model.max_tokens, frozen.image_size, device)
        retrieval = expression_retrieval(frozen, index.images, index.sentences, split,
                                         params.model.max_tokens, frozen.image_size, device, candidates=48)
        print(f"[pretrain_clip] frozen CLIP ranks the GT-masked target first for {ranking['rate']:.3f} "
              f"of {split} expressions (chance {ranking['chance']:.3f}); retrieves an image's own "
              f"expression among 48 for {retrieval['rate']:.3f} of images (chance {retrieval['chance']:.3f})")
    write_json(paths.REPORTS / "clip_diagnostic.json", {**ranking, "retrieval": retrieval})


if __name__ == "__main__":
    main()
