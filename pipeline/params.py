"""The one validated schema for ``params.yaml``.

Every stage reads its parameters through :func:`load_params`, so a typo (``step1.alpah``), an unknown
section or a wrong type fails at once with a message naming the key, instead of silently falling back to
a default deep inside a training loop. Sections are named after the DVC stages that read them, plus a
shared ``base`` (seed, device) and the shared ``data`` / ``model`` descriptions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

# PyYAML follows YAML 1.1, where an exponent without a dot (``1e-3``) is a string; YAML 1.2 (and
# ``dvc exp run -S``) read it as a number, so such a string is taken as the float it spells.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml12_float(value: object) -> object:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


# Scalars are strict: YAML's ``seed: true`` is not the integer 1, ``amp: 'no'`` is not False and
# ``lr: true`` is not 1.0, while an integer given for a float (``beta: 10``) is still a float.
Int = StrictInt
Float = Annotated[StrictFloat, BeforeValidator(_yaml12_float)]
Bool = StrictBool


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment too.

    No field has a default: ``params.yaml`` is the one place a value lives, so a key missing there fails
    validation by its dotted name instead of silently taking a second, different value from here.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class BaseParams(_Strict):
    seed: Int
    device: str = Field(description="auto (CUDA if present, else CPU) | cpu | cuda | cuda:N")
    num_workers: Int = Field(ge=0, description="image-decoding threads of ImageBank (the DataLoader "
                             "workers' job); 0 = one per core, at most 8")
    threads: Int = Field(ge=0, description="torch intra-op threads on CPU; 0 = torch's default")
    nproc: Int = Field(ge=1, description="processes for train_step1/2 and dump_responses; > 1 launches "
                       "the stage through torchrun (one per GPU on CUDA, gloo on CPU)")


class ReferSource(_Strict):
    root: str
    dataset: Literal["refcoco", "refcoco+", "refcocog", "refclef", "synthetic"]
    split_by: Literal["unc", "umd", "google", "berkeley"]
    image_dir: str


class DataParams(_Strict):
    source: Literal["synthetic", "refer"]
    refer: ReferSource
    eval_splits: Literal["auto"] | list[str] = Field(
        description="splits to evaluate; auto = every non-train split the index has, in REFER's order "
        "(RefCOCO/+ unc: val, testA, testB; RefCOCOg umd: val, test; google: val; refclef berkeley: "
        "val, test)")


class FamilyWeights(_Strict):
    """Mix of expression families; every family is named, so a forgotten one is an error, not weight 0."""

    attribute: Float = Field(ge=0)
    position: Float = Field(ge=0)
    relation: Float = Field(ge=0)


class SynthesizeParams(_Strict):
    dataset: str
    split_by: str
    num_images: Int = Field(ge=4)
    objects_per_image: tuple[Int, Int]
    image_side: tuple[Int, Int]
    expressions_per_object: tuple[Int, Int]
    object_scale: tuple[Float, Float]
    distractor_rate: Float = Field(ge=0.0, le=1.0)
    family_weights: FamilyWeights
    split_fractions: dict[str, Float]
    jpeg_quality: Int = Field(ge=50, le=100)

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

    embed_dim: Int
    image_size: Int
    vision_layers: list[Int]
    vision_width: Int
    text_width: Int
    text_heads: Int
    text_layers: Int


class ClipParams(_Strict):
    name: str = Field(description="open_clip model name (RN50, ViT-B-16, ...) or 'tiny-rn'")
    pretrained: str = Field(
        description="'embedded' (trained by pretrain_clip), an open_clip tag, or a local checkpoint path",
    )
    tiny: TinyClipParams


class FrozenClipParams(_Strict):
    """The frozen CLIP of calibration (Eq. 8-9) and PRMS (Eq. 10); the authors use a separate ViT-B/32."""

    name: str = Field(description="'same' (the CLIP of artifacts/clip, i.e. model.clip) or an open_clip name "
                      "such as ViT-B-32")
    pretrained: str = Field(description="'same' (with name 'same'), an open_clip tag or a local checkpoint "
                            "path")

    @model_validator(mode="after")
    def _same_together(self) -> FrozenClipParams:
        if (self.name == "same") != (self.pretrained == "same"):
            raise ValueError("model.frozen_clip: name and pretrained are both 'same' or neither is")
        if self.pretrained == "embedded" and self.name not in ("tiny-rn", "tiny-vit"):
            raise ValueError("model.frozen_clip.pretrained: 'embedded' (pretrained by pretrain_clip on "
                             "pretrain_clip.frozen's cutout corpus) needs name tiny-rn or tiny-vit, "
                             f"not {self.name!r}")
        return self


class ModelParams(_Strict):
    clip: ClipParams
    frozen_clip: FrozenClipParams
    max_tokens: Int = Field(ge=3)
    hidden_dim: Int = Field(ge=8, description="C_d, the projector width (paper: 1024)")


class FrozenPretrainParams(_Strict):
    """The embedded frozen CLIP (``model.frozen_clip.pretrained: embedded``): a second small CLIP that
    ``pretrain_clip`` trains on cutout pictures, the stand-in for the authors' separate web-scale ViT-B/32."""

    kinds: list[Literal["isolated", "scene"]] = Field(
        min_length=1, description="isolated: one object on black, attribute captions; scene: an object of "
        "a generated scene alone on black, captioned by its scene expressions")
    pictures: Int = Field(ge=1, description="cutout pictures of each kind")
    epochs: Int = Field(ge=1)
    image_size: Int = Field(ge=32, description="the frozen CLIP's input side (calibration_size: auto)")


class PretrainClipParams(_Strict):
    epochs: Int = Field(ge=0)
    batch_size: Int = Field(ge=2)
    lr: Float = Field(gt=0)
    weight_decay: Float = Field(ge=0)
    warmup_steps: Int = Field(ge=0)
    erase_prob: Float = Field(ge=0, le=1, description="random blackout augmentation (no GT used)")
    ris_images: Bool = Field(description="pretrain on the RIS train split's (image, expressions) pairs")
    caption_images: Int = Field(ge=0, description="extra captioned pictures drawn from the synthetic world "
                                "with their own seed stream (pipeline/data/captions.py); 0 = none")
    caption_objects: tuple[Int, Int] = Field(description="objects per captioned picture (lower, upper)")
    frozen: FrozenPretrainParams


class OptimParams(_Strict):
    lr: Float = Field(gt=0)
    backbone_lr_mult: Float = Field(ge=0)
    weight_decay: Float = Field(ge=0)
    poly_power: Float = Field(ge=0)
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    amp: Bool
    resume: Bool
    freeze_batchnorm: Bool = Field(
        description="keep BatchNorm statistics fixed (eval mode) while training; makes results "
        "independent of the per-process batch under DDP on CPU, where SyncBatchNorm is unavailable")
    compile: Bool = Field(description="torch.compile the trained model (CUDA: faster steps)")


class Step1Params(OptimParams):
    input_size: Int = Field(ge=32)
    prompt: Literal["bilateral", "t2v", "v2t", "none"]
    init_projectors: Literal["clip", "random"] = Field(
        description="clip: start from CLIP's dense embedding (MaskCLIP); needs hidden_dim = embed dim"
    )
    alpha: Float
    beta: Float
    num_negatives: Int = Field(ge=0, description="N of Eq. 7")
    calibration_negatives: Int = Field(ge=0, description="K of Eq. 8")
    cls_weight: Float = Field(ge=0, description="lambda in L = lambda * L_cls + L_cal")
    calibration_positive: Bool
    calibration_negative: Bool
    calibration_size: Literal["auto"] | Annotated[Int, Field(ge=32)] = Field(
        description="side of the masked image fed to the frozen CLIP; auto = that CLIP's native size")
    calibration_score: Literal["cosine", "rescaled"] = Field(
        description="phi of Eq. 9: raw cosine, or (1 + cos) / 2 so log S stays defined"
    )
    focal_power: Float
    focal_eps: Float
    calibration_negative_reduction: Literal["sum", "mean"] = Field(
        description="Eq. 8 sums over the K negatives (paper); the authors' code averages them")
    calibration_negative_weight: Float = Field(ge=0, description="weight of the Eq. 8 negative term "
                                               "(authors' code: 2, with the mean)")
    feature_stride: Literal[8, 16, 32] = Field(
        description="output stride of the Step-1 feature map; 16 drops layer4's average pools, 8 also "
                    "layer3's (ResNet)")
    temperature: Float = Field(gt=0, description="tau of Eq. 2 (its initial value when learned)")
    learn_temperature: Bool = Field(description="learn tau (paper) or keep it fixed (authors' code)")


class DumpParams(_Strict):
    batch_size: Int = Field(ge=1)
    shard_size: Int = Field(ge=1, description="sentences per Zarr shard")


class EvaluateParams(_Strict):
    threshold: Float = Field(ge=0, le=1, description="binarisation of min-max normalised Step-1 maps")
    step2_threshold: Float = Field(ge=0, le=1, description="binarisation of Step-2 probabilities")
    gallery_size: Int = Field(ge=0, description="cases per best / median / worst row")


class CrfParams(_Strict):
    """Dense CRF of IRN's confident seeds and of the ``refine: crf`` ablation (pydensecrf's kernels)."""

    iterations: Int = Field(ge=0, description="mean-field iterations")
    gaussian_sxy: Float = Field(description="spatial width of the smoothness (Gaussian) kernel")
    gaussian_compat: Float = Field(description="weight of the smoothness kernel")
    bilateral_sxy: Float = Field(description="spatial width of the appearance (bilateral) kernel")
    bilateral_srgb: Float = Field(description="colour width of the appearance kernel")
    bilateral_compat: Float = Field(description="weight of the appearance kernel")


class AffinityParams(_Strict):
    radius: Int = Field(ge=1)
    epochs: Int = Field(ge=1)
    lr: Float = Field(gt=0)
    batch_size: Int = Field(ge=1)
    input_size: Int = Field(ge=32)
    max_samples: Int = Field(ge=1, description="objects whose confident labels train the net")


class RandomWalkParams(_Strict):
    beta: Float = Field(description="exponent of the affinities (sharpens the boundaries)")
    exp_times: Int = Field(ge=0, description="the transition matrix is applied 2^exp_times times")


class PseudoMaskParams(_Strict):
    prms: Bool
    prms_off_choice: Literal["first", "random"]
    refine: Literal["irn", "crf", "none"]
    walk_seed: Literal["confident", "map"]
    conf_fg: Float = Field(ge=0, le=1)
    conf_bg: Float = Field(ge=0, le=1)
    threshold: Float = Field(ge=0, le=1)
    keep: Literal["all", "largest", "argmax"]
    crf: CrfParams
    affinity: AffinityParams
    random_walk: RandomWalkParams
    workers: Int = Field(ge=1, description="CPU processes for the CRF")
    shard_size: Int = Field(ge=1, description="objects per pseudo_masks.zarr shard (and per rank task)")
    size: Int = Field(ge=32, description="working (and stored) resolution of the pseudo-masks")

    @model_validator(mode="after")
    def _confidence_order(self) -> PseudoMaskParams:
        if self.conf_bg >= self.conf_fg:
            raise ValueError("pseudo_masks.conf_bg must be below pseudo_masks.conf_fg")
        return self


class Step2Params(OptimParams):
    input_size: Int = Field(ge=32)
    fusion_dim: Int = Field(ge=8)
    decoder_dim: Int = Field(ge=8)


class Params(_Strict):
    base: BaseParams
    data: DataParams
    synthesize: SynthesizeParams
    model: ModelParams
    pretrain_clip: PretrainClipParams
    step1: Step1Params
    dump: DumpParams
    evaluate: EvaluateParams
    pseudo_masks: PseudoMaskParams
    step2: Step2Params


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


def overlay(base: dict, override: dict) -> dict:
    """``override`` merged into ``base`` key by key, nested mappings recursively, as ``dvc exp run -S``
    combines a change with ``params.yaml``; neither input is modified. Build a variant of the raw params
    with it, then validate the result with :func:`parse_params`."""
    out = dict(base)
    for key, value in override.items():
        out[key] = overlay(base.get(key, {}), value) if isinstance(value, dict) else value
    return out
