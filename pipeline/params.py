"""The one validated schema for ``params.yaml``.

Every stage reads its parameters through :func:`load_params`, so a typo (``step1.alpah``), an unknown
section or a wrong type fails at once with a message naming the key, instead of silently falling back to
a default deep inside a training loop. Sections are named after the DVC stages that read them, plus a
shared ``base`` (seed, device) and the shared ``data`` / ``model`` descriptions.

Every number has its domain here, because a value the schema lets through reaches code that trusts it: a
NaN ``random_walk.beta`` empties every pseudo-mask with exit status 0, a NaN or tiny CRF kernel width
crashes pydensecrf's C++ lattice (segfault), a seed above 2**32 - 1 stops every stage in NumPy, and an
oversized ``max_tokens`` or image side allocates tens of GB. So every float is finite, and every integer
has a lower and an upper bound: the upper bounds are typo guards far above any configuration in use (the
paper's real-data settings included), stated with the field. ``load_params`` also refuses a key given
twice in the YAML file, which PyYAML would otherwise resolve silently to the later value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AllowInfNan,
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
# ``lr: true`` is not 1.0, while an integer given for a float (``beta: 10``) is still a float. A float is
# also finite: YAML's ``.nan`` / ``.inf`` (and ``1e999``) pass every ``ge`` / ``le`` test or slip past
# them (NaN compares False), then poison a loss, a CRF or a random walk without an error.
Int = StrictInt
Float = Annotated[StrictFloat, AllowInfNan(False), BeforeValidator(_yaml12_float)]
Bool = StrictBool

# Upper bounds. Each is far above every configuration in use (params.yaml, the tests' tiny and paper
# configs, bench/paper_step1.py, the ablations) and below the point where the value stops being a setting
# and becomes an outage (a raw error deep in a stage, a many-GB allocation, a run that never ends).
MAX_SEED = 2**32 - 1
"""np.random.seed, np.random.default_rng and PYTHONHASHSEED (set for child processes) take 0 .. 2**32 - 1."""
CLIP_CONTEXT_LENGTH = 77
"""Positional embeddings of the released CLIPs' text towers (``pipeline.models.clip_backbone`` has the same
constant; kept here so validating params does not import torch / open_clip)."""
MAX_SIDE = 1024
"""Image sides and network input sizes in pixels (paper: 320; CLIP: 224). Activations, the random walk's
grid and the stored masks grow with the square of the side."""
MAX_BATCH = 1024
"""Batch sizes and per-sample query counts (paper: 48 and N = 47). Step-1 scores every image against every
query of the batch and CLIP pretraining builds a batch x batch logit matrix: memory grows quadratically."""
MAX_WIDTH = 4096
"""Channel widths (paper: C_d = 1024; the widest released CLIP embedding is 1280)."""
MAX_DEPTH = 64
"""Blocks or layers per stage of a network, attention heads (RN50x64: 36 blocks in its widest stage)."""
MAX_PROCESSES = 256
"""Threads and processes (each process loads the models: more than there are cores only adds memory)."""
MAX_EPOCHS = 10_000
MAX_COUNT = 1_000_000
"""Generated pictures, training samples, steps: a typo guard (the embedded default uses 3000)."""
MAX_SHARD = 65_536
"""Rows per Zarr shard: a shard is built in memory before it is written."""


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment too.

    No field has a default: ``params.yaml`` is the one place a value lives, so a key missing there fails
    validation by its dotted name instead of silently taking a second, different value from here.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# Constrained element types of the tuple-valued keys (a tuple's constraints live on its elements).
Side = Annotated[Int, Field(ge=32, le=MAX_SIDE)]
ObjectCount = Annotated[Int, Field(ge=1, le=32)]
Fraction = Annotated[Float, Field(gt=0.0, le=1.0)]


class BaseParams(_Strict):
    seed: Int = Field(ge=0, le=MAX_SEED, description="seeds Python, NumPy and torch; 0 .. 2**32 - 1, the "
                      "range NumPy and PYTHONHASHSEED accept")
    device: str = Field(description="auto (CUDA if present, else CPU) | cpu | cuda | cuda:N")
    num_workers: Int = Field(ge=0, le=MAX_PROCESSES, description="image-decoding threads of ImageBank (the "
                             "DataLoader workers' job); 0 = one per core, at most 8")
    threads: Int = Field(ge=0, le=MAX_PROCESSES, description="torch intra-op threads on CPU; 0 = torch's "
                         "default")
    nproc: Int = Field(ge=1, le=MAX_PROCESSES, description="processes for train_step1/2 and dump_responses; "
                       "> 1 launches the stage through torchrun (one per GPU on CUDA, gloo on CPU)")


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


def _dvc_dep_path(value: object) -> object:
    """A path DVC interpolates into ``dvc.yaml`` deps: non-empty text, with no ``${`` (DVC would try to
    interpolate it) and no NUL or newline (no file system takes them, and DVC would fail far from the key)."""
    if isinstance(value, str) and (not value.strip() or "${" in value or any(c in value for c in "\0\n\r")):
        raise ValueError(f"{value!r} is not a usable path (empty, or holds '${{', a NUL or a newline)")
    return value


DepPath = Annotated[str, BeforeValidator(_dvc_dep_path)]


class InputsParams(_Strict):
    """Where the pipeline's real inputs live, as DVC sees them: ``dvc.yaml`` interpolates these paths into
    the deps of ``index`` and of every stage that reads images (``refs``, ``images``) and of
    ``pretrain_clip`` (``weights``), so a byte change there re-runs exactly the stages downstream.
    ``pipeline.inputs`` checks that every file the stage reads lies under them (docs/operations.md)."""

    refs: DepPath = Field(description="folder holding <dataset>/refs(<split_by>).p and instances.json "
                          "(synthetic: artifacts/synthetic; refer: data.refer.root or a folder above it)")
    images: DepPath = Field(description="folder holding the images (synthetic: artifacts/synthetic/images; "
                            "refer: data.refer.image_dir or a folder above it)")
    weights: DepPath = Field(description="file or folder holding the CLIP weight files that "
                             "model.clip.pretrained / model.frozen_clip.pretrained read (a tag: its cached "
                             "file); models/ by default")


class FamilyWeights(_Strict):
    """Mix of expression families; every family is named, so a forgotten one is an error, not weight 0."""

    # relative weights (normalised by their sum): the bound keeps the sum finite
    attribute: Float = Field(ge=0, le=1e6)
    position: Float = Field(ge=0, le=1e6)
    relation: Float = Field(ge=0, le=1e6)


# REFER's split names (``pipeline.data.index.KNOWN_SPLITS``, which a test keeps equal): the index skips a
# ref of any other split, so a synthetic split of another name would be written and then dropped.
SplitName = Literal["train", "val", "test", "testA", "testB", "testC"]


class SynthesizeParams(_Strict):
    dataset: str
    split_by: str
    num_images: Int = Field(ge=4, le=MAX_COUNT)
    objects_per_image: tuple[ObjectCount, ObjectCount]
    image_side: tuple[Side, Side]
    expressions_per_object: tuple[ObjectCount, ObjectCount]
    object_scale: tuple[Fraction, Fraction] = Field(description="object diameter as a fraction of the "
                                                    "shorter image side, in (0, 1]")
    distractor_rate: Float = Field(ge=0.0, le=1.0)
    family_weights: FamilyWeights
    split_fractions: dict[SplitName, Annotated[Float, Field(ge=0.0, le=1.0)]]
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

    embed_dim: Int = Field(ge=1, le=MAX_WIDTH)
    image_size: Int = Field(ge=32, le=MAX_SIDE)
    vision_layers: list[Annotated[Int, Field(ge=1, le=MAX_DEPTH)]] = Field(
        min_length=4, max_length=4, description="blocks of the ModifiedResNet's four stages")
    vision_width: Int = Field(ge=1, le=MAX_WIDTH // 32, description="stem width; the attention pool is 32 "
                              "times as wide")
    text_width: Int = Field(ge=1, le=MAX_WIDTH)
    text_heads: Int = Field(ge=1, le=MAX_DEPTH)
    text_layers: Int = Field(ge=1, le=MAX_DEPTH)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyClipParams:
        if self.text_width % self.text_heads:
            raise ValueError(f"model.clip.tiny.text_heads: {self.text_heads} does not divide text_width "
                             f"{self.text_width} (multi-head attention splits the width evenly)")
        return self


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
    max_tokens: Int = Field(ge=3, le=CLIP_CONTEXT_LENGTH, description="tokens per expression; a released "
                            "CLIP's text tower has 77 positions and the tiny CLIP is built with max_tokens")
    hidden_dim: Int = Field(ge=8, le=MAX_WIDTH, description="C_d, the projector width (paper: 1024)")
    align_corners: Bool = Field(description="how maps are resized to the calibration / PRMS input and to "
                                "the image for evaluation: false = one resize, align_corners=False; true = "
                                "the authors' two resizes (to the network input with False, then True)")


class FrozenPretrainParams(_Strict):
    """The embedded frozen CLIP (``model.frozen_clip.pretrained: embedded``): a second small CLIP that
    ``pretrain_clip`` trains on cutout pictures, the stand-in for the authors' separate web-scale ViT-B/32."""

    kinds: list[Literal["isolated", "scene"]] = Field(
        min_length=1, description="isolated: one object on black, attribute captions; scene: an object of "
        "a generated scene alone on black, captioned by its scene expressions")
    pictures: Int = Field(ge=1, le=MAX_COUNT, description="cutout pictures of each kind")
    epochs: Int = Field(ge=1, le=MAX_EPOCHS)
    image_size: Int = Field(ge=32, le=MAX_SIDE, description="the frozen CLIP's input side "
                            "(calibration_size: auto)")


# AdamW multiplies the weights by (1 - lr * weight_decay) each step: with both at most 1 the factor stays in
# [0, 1] (a larger product flips the weights' sign). Any learning rate above 1 diverges anyway.
LearningRate = Annotated[Float, Field(gt=0, le=1)]
WeightDecay = Annotated[Float, Field(ge=0, le=1)]


class PretrainClipParams(_Strict):
    epochs: Int = Field(ge=0, le=MAX_EPOCHS)
    batch_size: Int = Field(ge=2, le=MAX_BATCH)
    lr: LearningRate
    weight_decay: WeightDecay
    warmup_steps: Int = Field(ge=0, le=MAX_COUNT)
    erase_prob: Float = Field(ge=0, le=1, description="random blackout augmentation (no GT used)")
    ris_images: Bool = Field(description="pretrain on the RIS train split's (image, expressions) pairs")
    caption_images: Int = Field(ge=0, le=MAX_COUNT, description="extra captioned pictures drawn from the "
                                "synthetic world with their own seed stream (pipeline/data/captions.py); "
                                "0 = none")
    caption_objects: tuple[ObjectCount, ObjectCount] = Field(description="objects per captioned picture "
                                                             "(lower, upper)")
    frozen: FrozenPretrainParams

    @model_validator(mode="after")
    def _caption_range(self) -> PretrainClipParams:
        lo, hi = self.caption_objects
        if lo > hi:
            raise ValueError(f"pretrain_clip.caption_objects: lower bound {lo} exceeds upper bound {hi}")
        return self


class OptimParams(_Strict):
    lr: LearningRate
    backbone_lr_mult: Float = Field(ge=0, le=10, description="the pretrained encoders' lr is lr times this")
    weight_decay: WeightDecay
    poly_power: Float = Field(ge=0, le=10, description="lr * (1 - step / steps) ** poly_power")
    epochs: Int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(ge=1, le=MAX_BATCH)
    amp: Bool
    resume: Bool
    freeze_batchnorm: Bool = Field(
        description="keep BatchNorm statistics fixed (eval mode) while training; makes results "
        "independent of the per-process batch under DDP on CPU, where SyncBatchNorm is unavailable")
    compile: Bool = Field(description="torch.compile the trained model (CUDA: faster steps)")


class Step1Params(OptimParams):
    input_size: Int = Field(ge=32, le=MAX_SIDE)
    prompt: Literal["bilateral", "t2v", "v2t", "none"]
    init_projectors: Literal["clip", "random"] = Field(
        description="clip: start from CLIP's dense embedding (MaskCLIP); needs hidden_dim = embed dim"
    )
    alpha: Float = Field(ge=0, le=10, description="weight of the bilateral prompt's visual residual")
    beta: Float = Field(ge=0, le=10, description="weight of the bilateral prompt's text residual")
    num_negatives: Int = Field(ge=0, le=MAX_BATCH, description="N of Eq. 7 (N + 1 queries per image)")
    calibration_negatives: Int = Field(ge=0, le=MAX_BATCH, description="K of Eq. 8")
    cls_weight: Float = Field(ge=0, le=1000, description="lambda in L = lambda * L_cls + L_cal")
    calibration_positive: Bool
    calibration_negative: Bool
    calibration_size: Literal["auto"] | Annotated[Int, Field(ge=32, le=MAX_SIDE)] = Field(
        description="side of the masked image fed to the frozen CLIP; auto = that CLIP's native size")
    calibration_score: Literal["cosine", "rescaled"] = Field(
        description="phi of Eq. 9: raw cosine, or (1 + cos) / 2 so log S stays defined"
    )
    focal_power: Float = Field(ge=0, le=10, description="gamma of psi = (1 - p) ** gamma * log(eps + p), "
                               "Eq. 6")
    focal_eps: Float = Field(gt=0, le=1, description="eps of psi: log(eps + p) must stay finite at p = 0")
    calibration_negative_reduction: Literal["sum", "mean"] = Field(
        description="Eq. 8 sums over the K negatives (paper); the authors' code averages them")
    calibration_negative_weight: Float = Field(ge=0, le=1000, description="weight of the Eq. 8 negative "
                                               "term (authors' code: 2, with the mean)")
    feature_stride: Literal[8, 16, 32] = Field(
        description="output stride of the Step-1 feature map; 16 drops layer4's average pools, 8 also "
                    "layer3's (ResNet)")
    temperature: Float = Field(gt=0, le=100, description="tau of Eq. 2 (its initial value when learned); "
                               "the model clamps tau to CLIP's 100, so a larger value would be silently cut")
    learn_temperature: Bool = Field(description="learn tau (paper) or keep it fixed (authors' code)")
    calibration_mask_space: Literal["unit", "normalized"] = Field(
        description="Eq. 9 (and PRMS) multiply the map into the image in [0, 1] (masked-out pixels black) "
                    "or into the normalised image (authors' code: masked-out pixels the mean colour)")


class DumpParams(_Strict):
    batch_size: Int = Field(ge=1, le=MAX_BATCH)
    shard_size: Int = Field(ge=1, le=MAX_SHARD, description="sentences per Zarr shard")


class EvaluateParams(_Strict):
    threshold: Float = Field(ge=0, le=1, description="binarisation of min-max normalised Step-1 maps")
    step2_threshold: Float = Field(ge=0, le=1, description="binarisation of Step-2 probabilities")
    gallery_size: Int = Field(ge=0, le=256, description="cases per best / median / worst row")
    acc_box: Literal["max_point", "authors"] = Field(
        description="Acc_box: box the component holding the maximum point (max_point), or hit when any "
                    "box of the authors' contour + NMS boxes matches (authors' evaluation code)")


# pydensecrf divides pixel coordinates and colours by the kernel widths and hashes the result into an
# integer lattice: a width of 1e-6 (or NaN) crashes it (segfault or heap corruption), so widths start at
# 0.01 (pixels / colour levels; a width below a pixel already makes the kernel a no-op). A weight (Potts
# compatibility) is a penalty, so not negative (a negative one rewards label changes across similar pixels)
# and at most 1000, where the energies still fit float32 (1e300 gives NaN marginals and empty masks).
KernelWidth = Annotated[Float, Field(ge=0.01, le=1e4)]
KernelWeight = Annotated[Float, Field(ge=0, le=1000)]


class CrfParams(_Strict):
    """Dense CRF of IRN's confident seeds and of the ``refine: crf`` ablation (pydensecrf's kernels)."""

    iterations: Int = Field(ge=0, le=100, description="mean-field iterations (IRN: 10)")
    gaussian_sxy: KernelWidth = Field(description="spatial width of the smoothness (Gaussian) kernel")
    gaussian_compat: KernelWeight = Field(description="weight of the smoothness kernel")
    bilateral_sxy: KernelWidth = Field(description="spatial width of the appearance (bilateral) kernel")
    bilateral_srgb: KernelWidth = Field(description="colour width of the appearance kernel")
    bilateral_compat: KernelWeight = Field(description="weight of the appearance kernel")


class AffinityParams(_Strict):
    radius: Int = Field(ge=1, le=16, description="pixel pairs within this radius on the stride-4 grid (IRN: "
                        "5 and 10); the pairs, hence the memory, grow with its square")
    epochs: Int = Field(ge=1, le=MAX_EPOCHS)
    lr: LearningRate
    batch_size: Int = Field(ge=1, le=MAX_BATCH)
    input_size: Int = Field(ge=32, le=MAX_SIDE)
    max_samples: Int = Field(ge=1, le=MAX_COUNT, description="objects whose confident labels train the net")


class RandomWalkParams(_Strict):
    beta: Float = Field(gt=0, le=100, description="exponent of the affinities in [0, 1] (sharpens the "
                        "boundaries); 0 would make every affinity 1, a negative one 0 ** beta infinite")
    exp_times: Int = Field(ge=0, le=12, description="the transition matrix is applied 2^exp_times times "
                           "(IRN: 8); each step is a sparse product per object")


class PseudoMaskParams(_Strict):
    prms: Bool
    prms_off_choice: Literal["first", "random"]
    prms_image: Literal["working", "step1_input"] = Field(
        description="the image PRMS masks: at the working size (pseudo_masks.size), or at "
                    "step1.input_size like the image calibration masks (authors: the 320-px input)")
    refine: Literal["irn", "crf", "none"]
    walk_seed: Literal["confident", "map"]
    conf_fg: Float = Field(ge=0, le=1)
    conf_bg: Float = Field(ge=0, le=1)
    threshold: Float = Field(ge=0, le=1)
    keep: Literal["all", "largest", "argmax"]
    crf: CrfParams
    affinity: AffinityParams
    random_walk: RandomWalkParams
    workers: Int = Field(ge=1, le=MAX_PROCESSES, description="CPU processes for the CRF")
    shard_size: Int = Field(ge=1, le=MAX_SHARD, description="objects per pseudo_masks.zarr shard (and per "
                            "rank task)")
    size: Int = Field(ge=32, le=MAX_SIDE, description="working (and stored) resolution of the pseudo-masks")

    @model_validator(mode="after")
    def _confidence_order(self) -> PseudoMaskParams:
        if self.conf_bg >= self.conf_fg:
            raise ValueError("pseudo_masks.conf_bg must be below pseudo_masks.conf_fg")
        return self


class Step2Params(OptimParams):
    input_size: Int = Field(ge=32, le=MAX_SIDE)
    fusion_dim: Int = Field(ge=8, le=MAX_WIDTH)
    decoder_dim: Int = Field(ge=8, le=MAX_WIDTH)
    select: Literal["last", "best_val"] = Field(
        description="the model kept: the last epoch's, or the epoch with the best val mIoU (reads the val "
                    "split's GT masks; authors' code: best val mIoU)")


class Params(_Strict):
    base: BaseParams
    data: DataParams
    inputs: InputsParams
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


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice in one YAML document (the message names the dotted key and both lines)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice.

    PyYAML keeps the later of two equal keys without a word, while DVC's YAML reader refuses the file: with
    ``step1.epochs`` written twice, ``dvc repro`` stops but a stage run directly trains with the second
    value. Use it wherever a ``params.yaml`` is read: ``yaml.load(text, Loader=UniqueKeyLoader)``. A key
    merged in with ``<<:`` and then set again is not a duplicate (that is what merging is for).
    """

    def construct_document(self, node: yaml.Node) -> object:
        """Check the whole composed document for duplicate keys, then build it as SafeLoader does."""
        self._refuse_duplicate_keys(node)
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, root: yaml.Node) -> None:
        # iterative (no recursion limit on deep documents); each node once (aliases share nodes)
        stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
        visited: set[int] = set()
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((child, (*path, str(i))) for i, child in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first_line: dict[object, int] = {}
                for key_node, value_node in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        key: object = "<<"
                    elif isinstance(key_node, yaml.ScalarNode):
                        key = self.construct_object(key_node)
                    else:  # a sequence or mapping as a key: SafeLoader reports it if unhashable
                        key = None
                    line = key_node.start_mark.line + 1
                    name = ".".join((*path, str(key)))
                    if key is not None:
                        if key in first_line:
                            raise DuplicateKeyError(
                                f"duplicate key {name} at line {line} (first at line {first_line[key]}); "
                                "YAML would silently keep the later value, so remove one of them")
                        first_line[key] = line
                    stack.append((value_node, (*path, str(key))))


def read_params_yaml(path: str | Path = "params.yaml") -> dict | None:
    """The raw mapping of a params file, read with :class:`UniqueKeyLoader` (duplicate keys refused).

    For tools that :func:`overlay` changes onto ``params.yaml`` before :func:`parse_params`; every error
    is a :class:`ParamsError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        with path.open() as fh:
            raw = yaml.load(fh, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:  # a duplicate key, or a syntax error with its line and column
        raise ParamsError(f"{path}: " + " ".join(str(err).split())) from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (the file every stage reads); a key given twice is an error."""
    return parse_params(read_params_yaml(path), str(Path(path)))


def overlay(base: dict, override: dict) -> dict:
    """``override`` merged into ``base`` key by key, nested mappings recursively, as ``dvc exp run -S``
    combines a change with ``params.yaml``; neither input is modified. Build a variant of the raw params
    with it, then validate the result with :func:`parse_params`."""
    out = dict(base)
    for key, value in override.items():
        out[key] = overlay(base.get(key, {}), value) if isinstance(value, dict) else value
    return out
