"""Step-1 over tiny-CLIP architectures and training settings: what lets Step-1 ground shape?

    python -m research.step1_sweep 16:1111:cls_full_lr 32:1111:cls_full_lr:full_full_lr 32:2222:cls_full_lr
    python -m research.step1_sweep clip:cls_baseline_settings    # from the built artifacts/clip

Each argument is ``WIDTH:LAYERS:VARIANT[:VARIANT...]`` (or ``clip:VARIANT[:...]`` for the CLIP the
``pretrain_clip`` stage built): pretrain a tiny CLIP with
``model.clip.tiny.vision_width = WIDTH`` and ``vision_layers = LAYERS`` (one digit per stage) exactly as
the ``pretrain_clip`` stage does (same corpus, settings and seed; cached under ``--work``), report its
masked-object ranking on val, then train Step-1 from it once per named variant (``VARIANTS`` below:
``step1`` overrides of ``params.yaml``) and print one JSON line per run: val PointM and mIoU (the
evaluate stage's protocol), the object hit, and the object hit by expression kind
(``scripts/scratch_baseline.grounding_summary``). Lines are also appended to ``--out``.

``--frozen DIR`` calibrates every run with the frozen CLIP of ``DIR`` (for instance a scorer that
``python -m research.frozen_scorer_seeds --out-dir`` kept) instead of the CLIP folder's own.

The ``scratch_*`` variants reset every CLIP weight before Step-1, so the architecture is trained from
random weights inside Step-1's own loop: it separates "the CLIP's start" from "the Step-1 model and loss".
``baseline_cnn_settings`` puts the from-scratch baseline's CNN in place of the CLIP's vision tower, with
every baseline setting that is a ``params.yaml`` key: it separates the vision tower from the rest.
The lever tried after the from-scratch baseline (docs/embedded-default-study.md). Meant for a GPU
(about 20 s per pretraining and 15-40 s per Step-1 on an H100); it runs on CPU too. Training reads
images and expressions only; val ground truth is read by the evaluation alone. No stage calls it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline import paths
from pipeline.atomic import atomic_dir
from pipeline.data.index import load_index
from pipeline.data.samples import ImageBank, split_sentences
from pipeline.eval.clip_checks import masked_object_ranking
from pipeline.models.checkpoints import build_localiser
from pipeline.models.clip_artifact import (
    FROZEN_SPEC_FILE,
    WEIGHTS_FILE,
    clip_spec,
    frozen_clip_spec,
    load_frozen_clip,
    resolve_calibration_size,
    write_clip_spec,
)
from pipeline.models.step1 import TRISLocaliser
from pipeline.params import Params, overlay, parse_params, read_params_yaml
from pipeline.responses import iter_responses
from pipeline.runtime import configure_threads, seed_everything, select_device
from pipeline.train.clip_pretrain import pretrain_embedded_clip
from pipeline.train.step1 import localiser_meta, train_step1
from research.scratch_baseline import ScratchLocaliser, grounding_summary

CLS_ONLY = {"calibration_positive": False, "calibration_negative": False}
FULL_LR = {"lr": 5e-4, "backbone_lr_mult": 1.0, "feature_stride": 16}  # the baseline's rate on everything
# every choice of research.scratch_baseline that is a params.yaml key but the prompt (constant lr, tau 10)
BASELINE = {**FULL_LR, "input_size": 128, "feature_stride": 8, "poly_power": 0.0, "temperature": 10.0}
VARIANTS: dict[str, dict] = {
    "default": {},
    "cls_full_lr": {**FULL_LR, **CLS_ONLY},
    "full_full_lr": {**FULL_LR},
    "cls_full_lr_4ep": {**FULL_LR, **CLS_ONLY, "epochs": 4},
    "cls_full_lr_6ep": {**FULL_LR, **CLS_ONLY, "epochs": 6},
    "cls_full_lr_128s8": {**FULL_LR, **CLS_ONLY, "input_size": 128, "feature_stride": 8},
    "cls_baseline_settings": {**BASELINE, **CLS_ONLY, "prompt": "none"},
    # the full method (bilateral prompt, calibration as params.yaml) at the baseline's settings
    "full_baseline_settings": {**BASELINE},
    # the two halves of the full method apart: the bilateral prompt with L_cls, and calibration without it
    "prompt_baseline_settings": {**BASELINE, **CLS_ONLY},
    "cal_baseline_settings": {**BASELINE, "prompt": "none"},
    # the frozen scorer at its own input size (calibration_size auto), for --frozen scorers trained at 64 px:
    # the default's settings, and the full rate at stride 16 with the paper's lambda 5
    "default_native_scorer": {"calibration_size": "auto"},
    "full_full_lr_native_scorer_cls5": {**FULL_LR, "calibration_size": "auto", "cls_weight": 5.0},
    # the baseline's CNN as Step-1's vision tower (random weights, fresh projectors)
    "baseline_cnn_settings": {**BASELINE, **CLS_ONLY, "prompt": "none", "vision": "baseline_cnn"},
    "scratch_128s8_6ep": {**FULL_LR, **CLS_ONLY, "input_size": 128, "feature_stride": 8, "epochs": 6,
                          "scratch": True},
}


def parse_run(text: str) -> tuple[tuple[int, list[int]] | None, list[str]]:
    """``WIDTH:LAYERS:VARIANT[:VARIANT...]`` -> ((width, layers), variants); ``clip:VARIANT[:...]`` ->
    (None, variants) for the built CLIP. A malformed run or an unknown variant is a clear error."""
    parts = text.split(":")
    if parts[0] == "clip" and len(parts) >= 2:
        architecture, variants = None, parts[1:]
    elif len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
        architecture, variants = (int(parts[0]), [int(c) for c in parts[1]]), parts[2:]
    else:
        raise SystemExit(f"step1_sweep: run {text!r} is not WIDTH:LAYERS:VARIANT[:VARIANT...] or "
                         "clip:VARIANT[:VARIANT...], e.g. 32:1111:cls_full_lr")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"step1_sweep: unknown variant(s) {unknown} in {text!r}; known: {sorted(VARIANTS)}")
    return architecture, variants


def use_baseline_cnn(model: TRISLocaliser, hidden_dim: int) -> None:
    """Swap Step-1's vision tower for ``research.scratch_baseline``'s CNN (random weights, stride 8) and
    give it a fresh projector to C_d. It takes the CLIP-normalised images Step-1 feeds its backbone; the
    CLIP's own vision weights stay in the model, unused. Separates the vision tower from everything else."""
    baseline = ScratchLocaliser()
    model.backbone.add_module("baseline_cnn", baseline.visual)  # trained with the backbone's parameters
    object.__setattr__(model.backbone, "dense_features", baseline.visual)  # shadows the method
    model.vis_proj = torch.nn.Conv2d(baseline.visual_proj.in_channels, hidden_dim, kernel_size=1)


class Sweep:
    """The index, splits and base params shared by every run of one invocation."""

    def __init__(self, base: dict, work: Path, out: Path, device: torch.device, epochs: int | None,
                 frozen: Path | None = None) -> None:
        self.base, self.work, self.out, self.device, self.epochs = base, work, out, device, epochs
        self.frozen = frozen
        self.index = load_index(paths.INDEX)
        self.train = split_sentences(self.index.images, self.index.sentences, "train")
        self.val = split_sentences(self.index.images, self.index.sentences, "val").reset_index(drop=True)
        self.banks: dict[int, ImageBank] = {}

    def bank(self, size: int, workers: int) -> ImageBank:
        """One image bank per input size for the whole sweep: its decoded images are reused across runs."""
        if size not in self.banks:
            self.banks[size] = ImageBank.from_index(self.index.images, size, workers=workers)
        return self.banks[size]

    def params(self, override: dict) -> Params:
        return parse_params(overlay(self.base, override), "params.yaml + step1_sweep overrides")

    def emit(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with self.out.open("a") as f:
            f.write(line + "\n")

    def pretrain(self, width: int, layers: list[int]) -> Path:
        """The pretrain_clip stage's embedded CLIP with this vision width and depth (cached)."""
        override = {"model": {"clip": {"tiny": {"vision_width": width, "vision_layers": layers}}}}
        if self.epochs is not None:
            override["pretrain_clip"] = {"epochs": self.epochs}
        params = self.params(override)
        clip_dir = self.work / f"clip_w{width}_l{''.join(map(str, layers))}_e{params.pretrain_clip.epochs}"
        if (clip_dir / FROZEN_SPEC_FILE).is_file():
            return clip_dir
        start = time.time()
        clip_p, max_tokens = params.model.clip, params.model.max_tokens
        with atomic_dir(clip_dir) as out:
            bank = self.bank(clip_p.tiny.image_size, params.base.num_workers)
            model = pretrain_embedded_clip(params, self.train, bank, self.device)
            torch.save(model.state_dict(), out / WEIGHTS_FILE)
            spec = clip_spec(clip_p.name, WEIGHTS_FILE, clip_p.tiny.model_dump(), max_tokens)
            write_clip_spec(out, spec)
            write_clip_spec(out, frozen_clip_spec("same", "same", spec), FROZEN_SPEC_FILE)
        frozen = load_frozen_clip(clip_dir).to(self.device)
        index = self.index
        ranking = masked_object_ranking(frozen, index.images, index.refs, index.sentences, "val",
                                        max_tokens, frozen.image_size, self.device)
        self.emit({"clip": clip_dir.name, "pretrain_s": round(time.time() - start),
                   "ranking": round(ranking["rate"], 3),
                   "vision_params_M": round(sum(p.numel() for p in model.visual.parameters()) / 1e6, 2)})
        return clip_dir

    def step1(self, clip_dir: Path, name: str) -> None:
        """Step-1 (``train_step1`` as the stage calls it) from ``clip_dir``, variant ``name``; val scores."""
        update = dict(VARIANTS[name])
        scratch = update.pop("scratch", False)
        vision = update.pop("vision", "clip")
        if self.epochs is not None:
            update["epochs"] = self.epochs
        params = self.params({"step1": update})
        p = params.step1
        meta = localiser_meta(params, str(clip_dir))
        seed_everything(params.base.seed)  # as the stage's start_stage: each run starts where the stage does
        model = build_localiser(str(clip_dir), meta)
        if scratch:
            torch.manual_seed(params.base.seed)
            for module in model.backbone.clip.modules():
                if module is not model.backbone.clip and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        if vision == "baseline_cnn":
            torch.manual_seed(params.base.seed)
            use_baseline_cnn(model, params.model.hidden_dim)
        else:
            model.init_projectors_from_clip()
        frozen = load_frozen_clip(self.frozen or clip_dir)
        p = p.model_copy(update={"calibration_size": resolve_calibration_size(p.calibration_size, frozen)})
        bank = self.bank(p.input_size, params.base.num_workers)
        start = time.time()
        model = train_step1(model, frozen, bank, self.train, p, self.device, seed=params.base.seed,
                            max_tokens=params.model.max_tokens)
        train_s = time.time() - start
        responses = {}
        with torch.no_grad():
            for first, maps in iter_responses(model, bank, self.val, 128, params.model.max_tokens,
                                              self.device, show_progress=False):
                ids = self.val["sent_id"].iloc[first:first + len(maps)].astype(int)
                responses.update(zip(ids, maps, strict=True))
        summary = grounding_summary(responses, self.val, self.index.refs, self.index.images)
        scorer = {"frozen": str(self.frozen)} if self.frozen else {}
        self.emit({"clip": clip_dir.name, "variant": name, **scorer, "train_s": round(train_s), **summary})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="WIDTH:LAYERS:VARIANT[:VARIANT...]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/step1_sweep"),
                        help="where the pretrained CLIPs are cached")
    parser.add_argument("--out", type=Path, default=Path("step1_sweep.jsonl"),
                        help="JSON lines are appended here")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the pretraining and Step-1 epochs of every run")
    parser.add_argument("--frozen", type=Path, default=None,
                        help="calibrate with the frozen CLIP of this folder (its frozen_clip.json), not the "
                             "CLIP folder's own; e.g. one of research.frozen_scorer_seeds --out-dir")
    args = parser.parse_args()
    plan = [parse_run(text) for text in args.runs]
    raw = read_params_yaml("params.yaml")
    configure_threads(raw["base"]["threads"])  # as start_stage: float results depend on the thread count
    sweep = Sweep(raw, args.work, args.out, select_device(raw["base"]["device"]), args.epochs,
                  args.frozen)
    for architecture, variants in plan:
        clip_dir = paths.CLIP if architecture is None else sweep.pretrain(*architecture)
        for name in variants:
            sweep.step1(clip_dir, name)


if __name__ == "__main__":
    main()
