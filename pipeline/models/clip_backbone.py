"""CLIP encoders as TRIS uses them: dense visual maps, per-word text features and pooled embeddings.

TRIS (Sec. 3.1, Sec. 4.1) initialises its image encoder ``E_v`` and text encoder ``E_l`` from CLIP and needs
more from them than CLIP's own ``encode_image`` / ``encode_text`` give:

* the Step-1 localiser needs the stride-32 feature map *before* CLIP's attention pooling (``dense_features``);
* the Step-2 segmentation network needs a 4-level pyramid (``stage_features``) and per-token text features
  (``encode_words``);
* Eq. 9 needs pooled embeddings of masked images at any resolution and of 20-token expressions, while the
  pretrained positional embeddings were learnt for 224 px images and 77 tokens.

``ClipBackbone`` adds those views on top of an unmodified ``open_clip.model.CLIP`` (ModifiedResNet or ViT
image tower), so pretrained checkpoints load without any key renaming. ``FrozenClip`` is the frozen copy used
by the calibration loss (Eq. 8-9) and PRMS (Eq. 10).
"""

from __future__ import annotations

import ast
import io
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, build_model_from_openai_state_dict
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import QuickGELU, VisionTransformer, text_global_pool
from torch import nn

from pipeline.atomic import CheckpointError

CLIP_CONTEXT_LENGTH = 77
"""Text context of the released CLIPs (open_clip's default); the tiny CLIP is built at model.max_tokens."""

TINY_RN = "tiny-rn"
TINY_VIT = "tiny-vit"
_NO_WEIGHTS = (None, "", "none", "None")


def tiny_clip_config(
    embed_dim: int = 64,
    image_size: int = 224,
    vision_layers: int | Sequence[int] = (1, 1, 1, 1),
    vision_width: int = 16,
    text_width: int = 32,
    text_heads: int = 2,
    text_layers: int = 1,
    context_length: int = CLIP_CONTEXT_LENGTH,
    vision_patch_size: int | None = None,
) -> dict:
    """Keyword arguments for ``open_clip.CLIP`` describing a small, randomly initialisable CLIP.

    ``vision_layers`` as a list builds a ModifiedResNet (the paper's RN50 family); ``head_width`` equals
    ``vision_width`` so the attention pool has 32 heads of ``vision_width`` channels each, dividing the
    ``32 * vision_width`` pooled width. An int ``vision_layers`` with ``vision_patch_size`` builds a ViT.
    The vocabulary keeps CLIP's 49408 BPE tokens so open_clip's bundled tokenizer is used unchanged.
    """
    is_vit = isinstance(vision_layers, int)
    if is_vit and vision_patch_size is None:
        raise ValueError("a ViT tiny config (int vision_layers) needs vision_patch_size")
    vision_cfg: dict = {
        "layers": int(vision_layers) if is_vit else list(vision_layers),
        "width": vision_width,
        "head_width": vision_width,
        "image_size": image_size,
    }
    if is_vit:
        # ViT heads = width // head_width; keep at least 2 heads of equal width.
        vision_cfg["head_width"] = max(vision_width // 2, 1)
        vision_cfg["patch_size"] = vision_patch_size
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }


class ActivationError(ValueError):
    """CLIP weights and a model name (or a recorded activation) that disagree about GELU vs QuickGELU.

    Both activations have no weights, so a state dict loads strictly into either network and the
    mismatch would otherwise run a different function silently; its message is one line."""

    stage_one_line = True  # a stage reports it as one line (pipeline.stage), not a traceback


def activation_name(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def uses_quick_gelu(clip: nn.Module) -> bool:
    """Whether ``clip`` computes QuickGELU (``x * sigmoid(1.702 x)``, OpenAI's CLIPs) rather than GELU.

    Read from the built modules, not from a name, so a checkpoint records what actually ran."""
    return any(isinstance(m, QuickGELU) for m in clip.modules())


def name_quick_gelu(name: str) -> bool:
    """The activation ``open_clip.create_model(name)`` builds: its model config's ``quick_gelu`` (the
    ``-quickgelu`` names, e.g. ``RN50-quickgelu``, say true); the tiny CLIPs are GELU."""
    if name in (TINY_RN, TINY_VIT) or name.startswith("hf-hub:"):  # hf-hub configs need the network
        return False
    cfg = open_clip.get_model_config(name)
    return bool(cfg.get("quick_gelu", False)) if cfg else False


def _name_for(name: str, quick_gelu: bool) -> str:
    """The model name that builds ``name``'s architecture with the other activation, for an error's hint."""
    base = name.removesuffix("-quickgelu")
    other = f"{base}-quickgelu" if quick_gelu else base
    return other if other in open_clip.list_models() else f"an open_clip name with quick_gelu={quick_gelu}"


def _require_activation(name: str, weights_quick_gelu: bool, what: str) -> None:
    """Refuse weights trained with one activation under a ``name`` that builds the other (``what``
    names the weights); open_clip itself only warns for a tag and never checks a file."""
    if name_quick_gelu(name) == weights_quick_gelu:
        return
    if name in (TINY_RN, TINY_VIT):
        raise ActivationError(f"{what} was trained with {activation_name(weights_quick_gelu)}, but the tiny "
                              f"CLIP {name!r} is GELU only")
    raise ActivationError(f"{what} was trained with {activation_name(weights_quick_gelu)}, but model name "
                          f"{name!r} builds {activation_name(not weights_quick_gelu)}; use "
                          f"{_name_for(name, weights_quick_gelu)!r}")


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's released ``RN50.pt`` etc. are TorchScript zips; they carry a ``constants.pkl`` member."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):  # a torn zip: the checkpoint loader names it
        return False


def build_clip(
    name: str,
    pretrained: str | os.PathLike | None,
    *,
    tiny: dict | None = None,
    context_length: int = CLIP_CONTEXT_LENGTH,
    quick_gelu: bool | None = None,
) -> CLIP:
    """Build a float32 ``open_clip`` CLIP, optionally loading weights, without ever touching the network.

    The activation (GELU or QuickGELU) is the one ``name`` builds (:func:`name_quick_gelu`); weights
    known to need the other are refused with :class:`ActivationError` rather than run through a
    different network: an OpenAI TorchScript archive (its module tree names its activation class) and an
    open_clip tag whose pretrained config says ``quick_gelu``. A plain state dict does not say (the
    activation has no weights, and OpenAI's keys equal open_clip's), so there ``name`` decides.
    ``quick_gelu``, when given, is the activation a checkpoint or spec recorded; a build giving the other
    is refused too.

    * ``name`` ``'tiny-rn'`` / ``'tiny-vit'``: ``open_clip.CLIP(**tiny_clip_config(**tiny))``
      (``context_length`` is the default text context when ``tiny`` does not set one); otherwise an
      open_clip architecture name such as ``'RN50'`` or ``'RN50-quickgelu'``.
    * ``pretrained`` None / "" / "none": random initialisation.
    * ``pretrained`` an existing file: for an OpenAI TorchScript archive (``RN50.pt``) the architecture is
      inferred from the weights as ``open_clip.load_openai_model`` does, with the archive's activation
      (QuickGELU for OpenAI's, so ``name`` must be a ``-quickgelu`` one such as ``RN50-quickgelu``; the
      size otherwise comes from the weights); the archive's weights are read without running it
      (:func:`read_torchscript_state_dict`). Any other file (plain state dict, or an open_clip training
      checkpoint ``{'state_dict': ...}`` with or without ``module.`` prefixes) goes through
      ``open_clip.load_checkpoint`` (weights-only) into the named architecture; plain OpenAI state dicts
      need the ``-quickgelu`` architecture name to reproduce CLIP exactly. A file that is torn, not a
      checkpoint, or holds weights of another architecture raises a one-line :class:`CheckpointError`
      naming it.
    * otherwise ``pretrained`` is an open_clip pretrained tag, which only resolves from a local cache.
    """
    tiny_name = name in (TINY_RN, TINY_VIT)
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    if pretrained in _NO_WEIGHTS:
        model = _build_architecture(name, tiny, context_length) if tiny_name else open_clip.create_model(name)
    elif os.path.isfile(pretrained):
        model = _load_local_weights(name, pretrained, tiny, context_length)
    elif tiny_name:
        raise FileNotFoundError(f"weights file {pretrained!r} for the tiny CLIP does not exist")
    else:
        tag = open_clip.get_pretrained_cfg(name, pretrained)
        if tag:  # e.g. RN50 + openai: open_clip warns and builds GELU for QuickGELU weights
            _require_activation(name, bool(tag.get("quick_gelu", False)), f"open_clip tag {pretrained!r}")
        try:
            model = open_clip.create_model(name, pretrained=pretrained)
        except Exception as err:  # open_clip raises RuntimeError with a download hint
            raise RuntimeError(
                f"could not load open_clip weights {name!r} with pretrained tag {pretrained!r}: it is "
                "neither a local file nor in the local open_clip cache, and this pipeline never downloads "
                "(no network). Point `pretrained` at a local checkpoint file."
            ) from err
    if not isinstance(model, CLIP):
        raise TypeError(f"expected an open_clip CLIP with a built-in text tower, got {type(model).__name__}")
    built = uses_quick_gelu(model)
    if quick_gelu is not None and built != quick_gelu:
        raise ActivationError(f"CLIP {name!r} builds {activation_name(built)}, but "
                              f"{activation_name(quick_gelu)} was recorded for it")
    return model.float()


def _load_local_weights(name: str, path: str, tiny: dict | None, context_length: int) -> nn.Module:
    """The CLIP ``name`` with the weights of the local file ``path`` (see :func:`build_clip`); any
    failure is one :class:`CheckpointError` line naming the file and what is wrong with it (a truncated
    ``clip.pt`` otherwise ends in torch's raw ``PytorchStreamReader failed reading zip archive``)."""
    tiny_name = name in (TINY_RN, TINY_VIT)
    try:
        if _is_torchscript_archive(path):
            state, archive_quick_gelu = _torchscript_state_dict(path)
            _require_activation(name, archive_quick_gelu, f"{path} (a TorchScript CLIP archive)")
            if tiny_name:
                model = _build_architecture(name, tiny, context_length)
                model.load_state_dict(state)
                return model
            # what open_clip.load_openai_model does, minus its device/precision handling
            return build_model_from_openai_state_dict(state, quick_gelu=archive_quick_gelu, cast_dtype=None)
        if tiny_name:
            model = _build_architecture(name, tiny, context_length)
            open_clip.load_checkpoint(model, path)
            return model
        return open_clip.create_model(name, pretrained=path)
    except (CheckpointError, ActivationError, MemoryError):
        raise
    except Exception as err:  # torch.load, open_clip and load_state_dict raise many types
        detail = " ".join(str(err).split()) or type(err).__name__
        detail = detail[:300] + ("..." if len(detail) > 300 else "")
        if "Error(s) in loading state_dict" in detail or "size mismatch" in detail:
            raise CheckpointError(f"{path}: its weights do not fit the {name} CLIP ({detail})") from err
        first = detail.split(". ")[0]  # torch's first sentence says what failed; the rest is advice
        raise CheckpointError(f"{path}: not a loadable CLIP checkpoint (torn, truncated or not a weights "
                              f"file: {first})") from err


def _torchscript_state_dict(path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Weights of a TorchScript CLIP, minus the metadata and causal mask that scripting also stores, and
    whether its network uses QuickGELU.

    The activation has no weights but is a module of the scripted tree, so the archive names its class
    (``__torch__.clip.model.QuickGELU`` in OpenAI's, ``...activation.GELU`` in a scripted GELU CLIP). An
    archive naming neither is taken to be OpenAI's, as ``open_clip.load_openai_model`` takes every one.
    """
    state, classes = _read_torchscript(path)
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    leaves = {qualname.rsplit(".", 1)[-1] for qualname in classes}
    return state, "QuickGELU" in leaves or "GELU" not in leaves


# --------------------------------------------------------------------- TorchScript weights, code unrun
# A TorchScript archive is a zip: <prefix>/data.pkl pickles the module tree (each module a
# ``__torch__.<qualified name>`` object whose pickled state is its attributes: parameters, buffers,
# submodules, plain values), <prefix>/data/<key> holds the tensor storages the pickle refers to by
# persistent id, and <prefix>/code/ holds the modules' TorchScript source. ``torch.jit.load`` compiles
# that source and runs each class's ``__setstate__`` on its pickled state: a weights file that runs
# code. The reader below unpickles data.pkl with every ``__torch__`` class replaced by an inert
# container, storages read from the zip, and any other global refused; the source is only read as
# text for each class's ``__parameters__`` / ``__buffers__`` lists (the names ``state_dict`` reports).

_TS_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _identity_list(data: list) -> list:
    return data


def _restore_type_tag(value: object, type_str: str) -> object:
    return value


_TS_PLAIN_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
}
_TS_MAX_DEPTH = 64  # module nesting; CLIP's is under 10
_TS_MAX_VISITS = 1_000_000  # module visits while flattening (shared submodules are visited per name)


class _ScriptObject:
    """An inert stand-in for one TorchScript object: keeps the state the archive pickled for it and
    has no behaviour (the archive's ``__setstate__`` is never called)."""

    qualname = ""
    state: object = None  # until the pickle's BUILD gives it one

    def __init__(self, *args: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl into :class:`_ScriptObject` trees of tensors, running nothing."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(io.BytesIO(_read_member(zf, f"{prefix}/data.pkl", path)))
        self.zf, self.prefix, self.path = zf, prefix, path
        self.archive_size = os.path.getsize(path)
        self.classes: dict[str, type[_ScriptObject]] = {}
        self.storages: dict[str, torch.Tensor] = {}

    def _refuse(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: TorchScript archive {what}; its weights were not read "
                               "(nothing in it was run)")

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if module.startswith("__torch__.torch.classes"):
                raise self._refuse(f"holds a custom C++ class {qualname}, which only its code can read")
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _TS_STORAGE_DTYPES:
            return _StorageType(_TS_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) in _TS_PLAIN_GLOBALS:
            return _TS_PLAIN_GLOBALS[(module, name)]
        raise self._refuse(f"refers to {qualname}, which is not plain tensor data")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise self._refuse(f"has a storage reference {pid!r:.80} of an unknown form")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key in self.storages:
            return self.storages[key]
        member = f"{self.prefix}/data/{key}"
        try:
            info = self.zf.getinfo(member)
        except KeyError:
            raise self._refuse(f"lacks the storage {member}") from None
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if info.file_size > self.archive_size or info.file_size != numel * itemsize:
            raise self._refuse(f"storage {member} holds {info.file_size} bytes, not the {numel} x "
                               f"{itemsize} its reference says (torn?)")
        raw = bytearray(info.file_size)
        with self.zf.open(info) as fh:  # read into place: one copy of the weights, CRC checked
            if fh.readinto(raw) != info.file_size or fh.read(1):
                raise self._refuse(f"storage {member} is torn")
        dtype = storage_type.dtype
        base = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        self.storages[key] = base
        return base

    def _rebuild_tensor(self, storage: object, offset: object, size: object, stride: object,
                        requires_grad: object = False, backward_hooks: object = None,
                        metadata: object = None) -> torch.Tensor:
        ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if not isinstance(storage, torch.Tensor) or ints is None or len(size) != len(stride) \
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise self._refuse("rebuilds a tensor from arguments that are not a storage, offset, size "
                               "and stride")
        if math.prod(size) > max(storage.numel(), 1):  # no view claiming more elements than are stored
            raise self._refuse(f"has a tensor of size {list(size)} over a storage of {storage.numel()}")
        try:
            return storage.as_strided(size, stride, offset)
        except RuntimeError as err:
            raise self._refuse(f"has a tensor outside its storage ({' '.join(str(err).split())[:120]})") \
                from err


def _read_member(zf: zipfile.ZipFile, member: str, path: str) -> bytes:
    """A zip member's bytes, refusing one that would inflate past the archive's own size (torch stores
    members uncompressed, so only a zip bomb's would)."""
    if zf.getinfo(member).file_size > os.path.getsize(path):
        raise CheckpointError(f"{path}: TorchScript archive member {member} inflates past the archive's "
                              "size; not read")
    return zf.read(member)


def _declared_state(zf: zipfile.ZipFile, prefix: str, qualname: str, path: str,
                    cache: dict[str, tuple[bool, list[str] | None]]) -> tuple[bool, list[str] | None]:
    """``(is a module, its parameter and buffer names)`` from the class's source, read as text only;
    ``(True, None)`` when the source does not say (then every tensor attribute counts as state)."""
    if qualname in cache:
        return cache[qualname]
    module, _, name = qualname.rpartition(".")
    member = f"{prefix}/code/{module.replace('.', '/')}.py"
    result: tuple[bool, list[str] | None] = (True, None)
    try:
        lines = _read_member(zf, member, path).decode("utf-8", "replace").splitlines()
    except KeyError:  # no source for it in the archive
        lines = []
    header = re.compile(rf"class {re.escape(name)}(?:\((\w*)\))?:\s*")
    declared = re.compile(r"\s+(__parameters__|__buffers__) = (\[[^\]]*\])\s*")
    for at, line in enumerate(lines):
        match = header.fullmatch(line)
        if match is None:
            continue
        names: list[str] = []
        for body in lines[at + 1:]:
            if body.strip() and not body[:1].isspace():
                break  # the class body ended
            field = declared.fullmatch(body)
            if field is not None:
                try:  # a literal list of names: parsed, never run
                    value = ast.literal_eval(field.group(2))
                except (ValueError, SyntaxError):
                    value = []
                names.extend(v for v in value if isinstance(v, str))
        result = (match.group(1) == "Module", names)
        break
    cache[qualname] = result
    return result


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict()`` of the TorchScript module saved at ``path`` (OpenAI's ``RN50.pt``), read
    without ``torch.jit.load``: nothing in the archive is compiled or run (its ``__setstate__`` methods
    included), so a weights file stays data, as every checkpoint of this pipeline is.

    Keys are named as ``torch.jit.load(path).state_dict()`` names them (``visual.conv1.weight``) and
    tensors keep their stored dtype. Raises :class:`CheckpointError` naming the file for an archive
    that is torn or holds anything but modules, tensors and plain values.
    """
    return _read_torchscript(path)[0]


def _read_torchscript(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], set[str]]:
    """:func:`read_torchscript_state_dict` and the qualified names of the archive's module classes."""
    path = os.fspath(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: not a readable TorchScript archive ({err})") from err
    with zf:
        prefixes = [n[:-len("/data.pkl")] for n in zf.namelist()
                    if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(prefixes) != 1:
            raise CheckpointError(f"{path}: not a TorchScript archive this reader knows (needs exactly one "
                                  f"<name>/data.pkl, found {len(prefixes)})")
        prefix = prefixes[0]
        order = f"{prefix}/byteorder"
        if order in zf.namelist() and _read_member(zf, order, path).strip() != b"little":
            raise CheckpointError(f"{path}: TorchScript archive stored big-endian; not read")
        unpickler = _TorchScriptUnpickler(zf, prefix, path)
        try:
            root = unpickler.load()
        except CheckpointError:
            raise
        except Exception as err:  # a torn pickle raises many types
            raise CheckpointError(f"{path}: TorchScript archive's data.pkl is torn or foreign "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:160]})") from err
        if not isinstance(root, _ScriptObject):
            raise CheckpointError(f"{path}: TorchScript archive holds no module")
        state: dict[str, torch.Tensor] = {}
        visits = [0]
        cache: dict[str, tuple[bool, list[str] | None]] = {}

        def declared(obj: _ScriptObject) -> tuple[bool, list[str] | None]:
            return _declared_state(zf, prefix, obj.qualname, path, cache)

        def flatten(obj: _ScriptObject, key_prefix: str, path_ids: tuple[int, ...]) -> None:
            visits[0] += 1
            if len(path_ids) > _TS_MAX_DEPTH or visits[0] > _TS_MAX_VISITS or id(obj) in path_ids:
                raise CheckpointError(f"{path}: TorchScript module tree is cyclic or deeper / larger than "
                                      f"{_TS_MAX_DEPTH} levels / {_TS_MAX_VISITS} modules; not read")
            _, names = declared(obj)
            attrs = obj.state if isinstance(obj.state, dict) else None
            if attrs is None:
                if names:
                    raise CheckpointError(f"{path}: TorchScript class {obj.qualname} keeps its weights in a "
                                          "custom __getstate__, which only its code can read; not read")
                return
            if names is None:
                names = [k for k, v in attrs.items() if isinstance(v, torch.Tensor)]
            for name in names:
                value = attrs.get(name)
                if value is None:  # an absent optional parameter (bias=False) is not in state_dict
                    continue
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: TorchScript parameter {key_prefix}{name} is a "
                                          f"{type(value).__name__}, not a tensor")
                state[f"{key_prefix}{name}"] = value
            for name, value in attrs.items():
                if isinstance(value, _ScriptObject) and declared(value)[0]:
                    flatten(value, f"{key_prefix}{name}.", (*path_ids, id(obj)))

        flatten(root, "", ())
    return state, set(unpickler.classes)


def _build_architecture(name: str, tiny: dict | None, context_length: int) -> CLIP:
    kwargs = {"context_length": context_length, **(tiny or {})}
    if name == TINY_VIT:
        kwargs.setdefault("vision_layers", 2)
        kwargs.setdefault("vision_patch_size", 16)
    return CLIP(**tiny_clip_config(**kwargs))


def tokenize(texts: list[str], max_tokens: int) -> torch.LongTensor:
    """CLIP BPE tokens ``(B, max_tokens)``, zero padded.

    open_clip's tokenizer truncates a long sentence to ``max_tokens`` and overwrites the last kept token with
    EOT, so every row holds exactly one EOT; because EOT has the largest id, ``argmax`` finds it, which is how
    CLIP pools the sentence embedding (see ``ClipBackbone.encode_text``).
    """
    return open_clip.tokenize(list(texts), context_length=max_tokens)


def _interpolate_grid(
    pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], mode: str
) -> torch.Tensor:
    """Resize a ``(src_h * src_w, C)`` positional-embedding grid to ``(dst_h * dst_w, C)``."""
    if tuple(src) == tuple(dst):
        return pos
    grid = pos.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1)


def _drop_pooling(visual: ModifiedResNet, layers: tuple[str, ...]) -> None:
    """Turn the stride-2 average pools (main path and shortcut) of ``layers`` into identities.

    A ModifiedResNet downsamples with an ``AvgPool2d`` after the 3x3 conv of each first block instead of a
    strided conv, so removing a layer's two pools keeps every weight meaningful while halving the output
    stride (the dilation trick of DeepLab without dilating anything: the 1x1 convs after the pool see the
    same features at twice the density). Dropping layer4's gives stride 16, layer3's and layer4's stride 8:
    Step-1 maps then have 2x or 4x the resolution at the same input size.
    """
    for name in layers:
        block = getattr(visual, name)[0]
        if isinstance(block.avgpool, nn.AvgPool2d):
            block.avgpool = nn.Identity()
        if block.downsample is not None and isinstance(block.downsample[0], nn.AvgPool2d):
            block.downsample[0] = nn.Identity()


DENSE_STRIDES = {32: (), 16: ("layer4",), 8: ("layer3", "layer4")}  # layers whose pools are dropped


class ClipBackbone(nn.Module):
    """Feature views of a CLIP model needed by TRIS Step 1 and Step 2 (module docstring explains why).

    Attributes: ``visual_channels`` (channels of ``dense_features``), ``text_channels`` (pooled, projected
    text embedding), ``word_channels`` (per-token width of ``encode_words``), ``stage_channels`` (channels of
    the four ``stage_features`` levels), ``is_resnet``.
    """

    def __init__(self, clip: CLIP, dense_stride: int = 32) -> None:
        super().__init__()
        self.clip = clip
        visual = clip.visual
        self.is_resnet = isinstance(visual, ModifiedResNet)
        if dense_stride not in DENSE_STRIDES:
            raise ValueError(f"dense_stride must be one of {sorted(DENSE_STRIDES)}, got {dense_stride}")
        if dense_stride != 32:
            if not self.is_resnet:
                raise ValueError(f"dense_stride {dense_stride} needs a ModifiedResNet image tower")
            _drop_pooling(visual, DENSE_STRIDES[dense_stride])
        self.dense_stride = dense_stride
        if self.is_resnet:
            self.stage_channels = [layer[-1].conv3.out_channels for layer in self._res_layers()]
            self.visual_channels = self.stage_channels[-1]
        elif isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ValueError("ViT towers with attentional pooling are not supported")
            self.visual_channels = visual.conv1.out_channels
            self.stage_channels = [self.visual_channels] * 4
        else:
            raise TypeError(f"unsupported CLIP image tower {type(visual).__name__}")
        proj = clip.text_projection
        self.word_channels = clip.ln_final.normalized_shape[0]
        if proj is None:
            self.text_channels = self.word_channels
        elif isinstance(proj, nn.Linear):
            self.text_channels = proj.out_features
        else:
            self.text_channels = proj.shape[1]

    # ------------------------------------------------------------------ image side
    def _res_layers(self) -> list[nn.Module]:
        v = self.clip.visual
        return [v.layer1, v.layer2, v.layer3, v.layer4]

    def _vit_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ViT forward with the positional embedding resized (bicubic) to the input's patch grid.

        Returns all tokens after the transformer ``(B, 1 + h*w, C)`` (class token first) and ``(h, w)``.
        """
        v: VisionTransformer = self.clip.visual
        x = v.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding.to(x.dtype)
        patch_pos = _interpolate_grid(pos[1:], v.grid_size, (h, w), mode="bicubic")
        x = x + torch.cat([pos[:1], patch_pos], dim=0)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        return v.transformer(x), (h, w)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """``V_e`` of Sec. 3.1: ``(B, C_v, H/s, W/s)`` before any pooling.

        ModifiedResNet: the layer4 map (s = 32). ViT: the patch tokens after ``ln_post`` (s = patch size),
        class token dropped.
        """
        if self.is_resnet:
            return self.stage_features(images)[-1]
        tokens, (h, w) = self._vit_tokens(images)
        patches = self.clip.visual.ln_post(tokens[:, 1:])
        return patches.transpose(1, 2).reshape(images.shape[0], -1, h, w)

    def stage_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Four maps at strides 4, 8, 16, 32 for the Step-2 decoder.

        ModifiedResNet: outputs of layer1..layer4. ViT has a single-scale token grid, so a simple pyramid
        (as in ViTDet) resizes the ``dense_features`` map to ``H/4, H/8, H/16, H/32`` (bilinear; antialiased
        when shrinking), giving the same strides as the ResNet so the decoder does not care which it gets.
        """
        if self.is_resnet:
            x = self.clip.visual.stem(images)
            feats = []
            for layer in self._res_layers():
                x = layer(x)
                feats.append(x)
            return feats
        dense = self.dense_features(images)
        H, W = images.shape[-2:]
        out = []
        for stride in (4, 8, 16, 32):
            size = (max(H // stride, 1), max(W // stride, 1))
            shrink = size[0] < dense.shape[-2]
            out.append(
                F.interpolate(dense, size=size, mode="bilinear", align_corners=False, antialias=shrink)
            )
        return out

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled image embedding ``(B, embed_dim)`` for any input size (not normalised).

        The pooling's positional embedding is resized to the actual feature grid (bilinear for the ResNet
        attention pool, bicubic for ViT); at the model's native size the result equals ``CLIP.encode_image``.
        """
        v = self.clip.visual
        if not self.is_resnet:
            tokens, _ = self._vit_tokens(images)
            pooled, _ = v._pool(tokens)
            return pooled @ v.proj if v.proj is not None else pooled
        return self._attention_pool(self.dense_features(images))

    def _attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        """``AttentionPool2d.forward`` of open_clip with the positional embedding resized to ``x``'s grid."""
        pool = self.clip.visual.attnpool
        h, w = x.shape[-2:]
        x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        pos = pool.positional_embedding.to(x.dtype)
        side = math.isqrt(pos.shape[0] - 1)
        pos = torch.cat([pos[:1], _interpolate_grid(pos[1:], (side, side), (h, w), mode="bilinear")], dim=0)
        x = x + pos[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return x[0]

    # ------------------------------------------------------------------ text side
    def _token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text transformer + ``ln_final`` on ``(B, T)`` tokens, ``T <= context_length``.

        Shorter contexts (20-token expressions on a 77-token CLIP) use the first ``T`` positional embeddings
        and the top-left ``T x T`` causal mask: with a causal mask, tokens never see later padding, so this
        equals running the padded 77-token sequence and truncating.
        """
        clip = self.clip
        T = tokens.shape[1]
        context = clip.positional_embedding.shape[0]
        if T > context:
            raise ValueError(f"{T} tokens exceed the text encoder's context of {context}")
        x = clip.token_embedding(tokens) + clip.positional_embedding[:T]
        mask = clip.attn_mask[:T, :T] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=mask)
        return clip.ln_final(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``L_e`` of Sec. 3.1: EOT-token features, projected, not normalised: ``(B, text_channels)``."""
        x = text_global_pool(
            self._token_features(tokens),
            tokens,
            self.clip.text_pool_type,
            eos_token_id=getattr(self.clip, "text_eos_id", None),
        )
        proj = self.clip.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_words(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features after ``ln_final`` ``(B, T, word_channels)`` and a validity mask ``(B, T)``.

        A token is valid up to and including EOT (found by ``argmax``, EOT being the largest BPE id);
        padding after it is masked out for the Step-2 fusion module.
        """
        words = self._token_features(tokens)
        eot = tokens.argmax(dim=-1, keepdim=True)
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        return words, positions <= eot


class FrozenClip(nn.Module):
    """The frozen CLIP of Eq. 9 (calibration) and Eq. 10 (PRMS): L2-normalised embeddings, frozen weights.

    Its weights never receive gradients, yet gradients flow through it to the *input* images, which is how
    the calibration loss reaches the response map. ``train()`` keeps it in eval mode so BatchNorm statistics
    of the ResNet never drift. Give it its own CLIP instance (not the one the localiser fine-tunes), since
    it switches ``requires_grad`` off on every parameter it holds.
    """

    def __init__(self, clip: CLIP) -> None:
        super().__init__()
        self.backbone = ClipBackbone(clip)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        size = clip.visual.image_size
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenClip:
        """Ignore ``mode``: the frozen CLIP always runs in eval mode (see the class docstring)."""
        return super().train(False)

    def encode_image(self, images_normalized: torch.Tensor) -> torch.Tensor:
        """``E_v`` of Eq. 9 on CLIP-normalised images; differentiable w.r.t. the images."""
        return F.normalize(self.backbone.encode_image(images_normalized), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``E_l`` of Eq. 9; text embeddings are constants for the loss, so no graph is kept."""
        return F.normalize(self.backbone.encode_text(tokens), dim=-1)


@torch.no_grad()
def encode_texts(frozen: FrozenClip, texts: list[str], max_tokens: int, device: torch.device,
                 batch_size: int = 512) -> torch.Tensor:
    """L2-normalised frozen-CLIP embeddings of ``texts``, in batches of ``batch_size``.

    It lives next to :class:`FrozenClip` because both Step-1 calibration (computed once, reused every
    step) and PRMS pseudo-labelling embed the dataset's expressions this way.
    """
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(texts[start:start + batch_size], max_tokens).to(device)
        out.append(frozen.encode_text(tokens).float())
    return torch.cat(out) if out else torch.empty(0)
