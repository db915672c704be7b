"""The one validated schema for ``params.yaml``.

Every stage reads its parameters through :func:`load_params`, so a typo (``step1.alpah``), an unknown
section or a wrong type fails at once with a message naming the key, instead of silently falling back to
a default deep inside a training loop. Sections are named after the DVC stages that read them, plus a
shared ``base`` (seed, device) and the shared ``data`` / ``model`` descriptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BaseParams(_Strict):
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA if present, else CPU) | cpu | cuda | cuda:N")
    num_workers: int = Field(0, ge=0, description="image-decoding threads of ImageBank (the DataLoader "
                             "workers' job); 0 = one per core, at most 8")
    threads: int = Field(0, ge=0, description="torch intra-op threads on CPU; 0 = torch's default")
    nproc: int = Field(1, ge=1, description="processes for train_step1/2 and dump_responses; > 1 launches "
                       "the stage through torchrun (one per GPU on CUDA, gloo on CPU)")


class ReferSource(_Strict):
    root: str = "data/refer"
    dataset: Literal["refcoco", "refcoco+", "refcocog", "refclef", "synthetic"] = "refcoco"
    split_by: Literal["unc", "umd", "google", "berkeley"] = "unc"
    image_dir: str = "data/refer/images/train2014"


class DataParams(_Strict):
    source: Literal["synthetic", "refer"] = "synthetic"
    refer: ReferSource = ReferSource()
    eval_splits: list[str] = ["val", "testA", "testB"]


class SynthesizeParams(_Strict):
    dataset: str = "synthetic"
    split_by: str = "unc"
    num_images: int = Field(900, ge=4)
    objects_per_image: tuple[int, int] = (3, 5)
    image_side: tuple[int, int] = (176, 240)
    expressions_per_object: tuple[int, int] = (1, 3)
    object_scale: tuple[float, float] = (0.22, 0.40)
    distractor_rate: float = Field(0.5, ge=0.0, le=1.0)
    family_weights: dict[Literal["attribute", "position", "relation"], float] = {
        "attribute": 0.5, "position": 0.3, "relation": 0.2}
    split_fractions: dict[str, float] = {"train": 0.7, "val": 0.1, "testA": 0.1, "testB": 0.1}
    jpeg_quality: int = Field(92, ge=50, le=100)

    @model_validator(mode="after")
    def _ranges(self) -> SynthesizeParams:
        for name in ("objects_per_image", "image_side", "expressions_per_object", "object_scale"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"synthesize.{name}: lower bound {lo} exceeds upper bound {hi}")
        if abs(sum(self.split_fractions.values()) - 1.0) > 1e-6:
            raise ValueError("synthesize.split_fractions must sum to 1")
        return self


class TinyClipParams(_Strict):
    """open_clip config of the embedded CLIP (a ModifiedResNet when ``vision_layers`` is a list)."""

    embed_dim: int = 128
    image_size: int = 192
    vision_layers: list[int] = [1, 1, 1, 1]
    vision_width: int = 16
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2


class ClipParams(_Strict):
    name: str = Field("tiny-rn", description="open_clip model name (RN50, ViT-B-16, ...) or 'tiny-rn'")
    pretrained: str = Field(
        "embedded",
        description="'embedded' (trained by pretrain_clip), an open_clip tag, or a local checkpoint path",
    )
    tiny: TinyClipParams = TinyClipParams()


class ModelParams(_Strict):
    clip: ClipParams = ClipParams()
    max_tokens: int = Field(20, ge=3)
    hidden_dim: int = Field(128, ge=8, description="C_d, the projector width (paper: 1024)")


class PretrainClipParams(_Strict):
    epochs: int = Field(12, ge=0)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    erase_prob: float = Field(0.5, ge=0, le=1, description="random blackout augmentation (no GT used)")


class OptimParams(_Strict):
    lr: float = Field(5e-5, gt=0)
    backbone_lr_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    poly_power: float = Field(0.9, ge=0)
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(48, ge=1)
    amp: bool = True
    resume: bool = True
    freeze_batchnorm: bool = Field(
        False, description="keep BatchNorm statistics fixed (eval mode) while training; makes results "
        "independent of the per-process batch under DDP on CPU, where SyncBatchNorm is unavailable")
    compile: bool = Field(False, description="torch.compile the trained model (CUDA: faster steps)")


class Step1Params(OptimParams):
    input_size: int = Field(192, ge=32)
    prompt: Literal["bilateral", "t2v", "v2t", "none"] = "bilateral"
    init_projectors: Literal["clip", "random"] = Field(
        "clip", description="clip: start from CLIP's dense embedding (MaskCLIP); needs hidden_dim = embed dim"
    )
    alpha: float = 0.1
    beta: float = 0.1
    num_negatives: int = Field(47, ge=0, description="N of Eq. 7")
    calibration_negatives: int = Field(6, ge=0, description="K of Eq. 8")
    cls_weight: float = Field(5.0, ge=0, description="lambda in L = lambda * L_cls + L_cal")
    calibration_positive: bool = True
    calibration_negative: bool = True
    calibration_size: int = Field(128, ge=32, description="side of the masked image fed to frozen CLIP")
    calibration_score: Literal["cosine", "rescaled"] = Field(
        "rescaled", description="phi of Eq. 9: raw cosine, or (1 + cos) / 2 so log S stays defined"
    )
    focal_power: float = 3.0
    focal_eps: float = 0.01


class DumpParams(_Strict):
    batch_size: int = Field(64, ge=1)
    shard_size: int = Field(4096, ge=1, description="sentences per Zarr shard")


class EvaluateParams(_Strict):
    threshold: float = Field(0.5, ge=0, le=1, description="binarisation of min-max normalised Step-1 maps")
    step2_threshold: float = Field(0.5, ge=0, le=1, description="binarisation of Step-2 probabilities")
    gallery_size: int = Field(4, ge=0, description="cases per best / median / worst row")


class CrfParams(_Strict):
    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 30.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0


class AffinityParams(_Strict):
    radius: int = Field(5, ge=1)
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    input_size: int = Field(128, ge=32)
    max_samples: int = Field(2000, ge=1, description="objects whose confident labels train the net")


class RandomWalkParams(_Strict):
    beta: float = 10.0
    exp_times: int = Field(8, ge=0)


class PseudoMaskParams(_Strict):
    prms: bool = True
    prms_off_choice: Literal["first", "random"] = "first"
    refine: Literal["irn", "crf", "none"] = "irn"
    walk_seed: Literal["confident", "map"] = "confident"
    conf_fg: float = Field(0.30, ge=0, le=1)
    conf_bg: float = Field(0.05, ge=0, le=1)
    threshold: float = Field(0.25, ge=0, le=1)
    keep: Literal["all", "largest", "argmax"] = "argmax"
    crf: CrfParams = CrfParams()
    affinity: AffinityParams = AffinityParams()
    random_walk: RandomWalkParams = RandomWalkParams()
    workers: int = Field(2, ge=1, description="CPU processes for the CRF")
    shard_size: int = Field(256, ge=1, description="objects per pseudo_masks.zarr shard (and per rank task)")
    size: int = Field(128, ge=32, description="working (and stored) resolution of the pseudo-masks")

    @model_validator(mode="after")
    def _confidence_order(self) -> PseudoMaskParams:
        if self.conf_bg >= self.conf_fg:
            raise ValueError("pseudo_masks.conf_bg must be below pseudo_masks.conf_fg")
        return self


class Step2Params(OptimParams):
    input_size: int = Field(192, ge=32)
    fusion_dim: int = Field(64, ge=8)
    decoder_dim: int = Field(32, ge=8)


class Params(_Strict):
    base: BaseParams = BaseParams()
    data: DataParams = DataParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    model: ModelParams = ModelParams()
    pretrain_clip: PretrainClipParams = PretrainClipParams()
    step1: Step1Params = Step1Params()
    dump: DumpParams = DumpParams()
    evaluate: EvaluateParams = EvaluateParams()
    pseudo_masks: PseudoMaskParams = PseudoMaskParams()
    step2: Step2Params = Step2Params()


class ParamsError(ValueError):
    """A params.yaml problem, worded with the dotted key so the user can find it."""


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid parameters"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see pipeline/params.py for the schema)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict, source: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` naming every offending key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_describe(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (the file every stage reads)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    with path.open() as fh:
        raw = yaml.safe_load(fh)
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, str(path))
