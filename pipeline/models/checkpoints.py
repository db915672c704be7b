"""Save and rebuild the trained networks: weights plus the few settings needed to rebuild each.

The Step-1 localiser and the Step-2 segmenter checkpoints live here, below both the training stages
that write them and the evaluation / inference code that reads them, so neither side imports the other
(in particular, training does not import the ``predict`` CLI).

Both checkpoints record ``quick_gelu``, the activation of the CLIP that was trained: GELU and QuickGELU
share every weight, so a state dict loads strictly into either network, and only this record lets
loading refuse the wrong one (an OpenAI ``RN50.pt`` trains QuickGELU; a rebuild from the bare name
``RN50`` would be GELU). A checkpoint written before the record existed loads only for a tiny CLIP
(GELU, the only activation those have, so the embedded default's checkpoints keep loading).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import CheckpointError, load_torch, save_torch
from pipeline.models.clip_artifact import SPEC_FILE, load_clip, read_clip_spec, recorded_quick_gelu
from pipeline.models.clip_backbone import (
    ActivationError,
    ClipBackbone,
    activation_name,
    build_clip,
    uses_quick_gelu,
)
from pipeline.models.segmenter import ReferringSegmenter
from pipeline.models.step1 import TRISLocaliser

SEGMENTER_META_KEYS = (
    "clip_name", "clip_tiny", "max_tokens", "input_size", "fusion_dim", "decoder_dim", "context_length",
)
LOCALISER_META_KEYS = (
    "clip_dir", "hidden_dim", "prompt", "alpha", "beta", "input_size", "max_tokens", "feature_stride",
    "temperature", "learn_temperature",
)


def _checkpoint_kind(meta: Any) -> str:
    """What a checkpoint's meta says it is, for an error about the wrong one being given."""
    if isinstance(meta, dict) and all(k in meta for k in SEGMENTER_META_KEYS):
        return "a Step-2 segmenter checkpoint (train_step2's model.pt)"
    if isinstance(meta, dict) and "clip_dir" in meta and "hidden_dim" in meta:
        return "a Step-1 localiser checkpoint (train_step1's model.pt)"
    return "not a checkpoint of this pipeline"


def _read_checkpoint(path: Path, want: str, keys: tuple[str, ...]) -> dict:
    """``{"model": state dict, "meta": dict}`` from ``path``, or a one-line :class:`CheckpointError`
    saying what the file is instead (a Step-2 checkpoint where Step-1 is expected would otherwise fail
    with ``KeyError: 'clip_dir'`` deep in the model building)."""
    state = load_torch(path)  # weights only: a checkpoint is data, never code
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("meta"), dict):
        raise CheckpointError(f"{path} is not a {want} checkpoint (needs 'model' and 'meta'): it is "
                              f"{_checkpoint_kind(None)}")
    missing = [k for k in keys if k not in state["meta"]]
    if missing:
        raise CheckpointError(f"{path} is not a {want} checkpoint (its meta lacks {', '.join(missing)}): "
                              f"it is {_checkpoint_kind(state['meta'])}")
    return state


def _note_unfinished(path: Path) -> None:
    """Say so when a newer training run is unfinished beside ``path``: its ``model.pt`` is kept until
    the new one replaces it (:meth:`pipeline.train.loop.TrainingRun.start`), so a reader run outside
    DVC would otherwise not know it got the previous run's model."""
    if (path.parent / "resume.pt").is_file():
        print(f"note: {path.parent / 'resume.pt'} exists: a newer training run is unfinished; {path} is "
              "the model of the last run that finished")


def _load_weights(path: Path, model: Any, state: dict) -> None:
    """``model.load_state_dict(state)`` with a mismatch reported in one line naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{path}: its weights do not fit the network its meta describes "
                              f"({detail[:300]}{'...' if len(detail) > 300 else ''})") from err


def _with_activation(meta: dict, model: Any) -> dict:
    """``meta`` plus ``quick_gelu`` read from the network being saved; a ``quick_gelu`` already in
    ``meta`` that the network contradicts is a bug in the caller and refused."""
    built = uses_quick_gelu(model)
    if "quick_gelu" in meta and meta["quick_gelu"] != built:
        raise ValueError(f"checkpoint meta says quick_gelu={meta['quick_gelu']} but the network being saved "
                         f"uses {activation_name(built)}")
    return {**meta, "quick_gelu": built}


def _refuse_activation(path: Path, recorded: bool, built: bool, source: str) -> None:
    if recorded != built:
        raise CheckpointError(f"{path}: trained with {activation_name(recorded)}, but {source} builds "
                              f"{activation_name(built)}; refusing to run a different network")


def save_localiser(path: Path, model: TRISLocaliser, meta: dict) -> None:
    """``meta`` (``pipeline.train.step1.localiser_meta``) holds clip_dir, hidden_dim, prompt, alpha, beta,
    input_size, max_tokens, feature_stride, temperature and learn_temperature; ``quick_gelu`` (the
    network's activation) is added here."""
    save_torch(path, {"model": model.state_dict(), "meta": _with_activation(meta, model.backbone.clip)})


def build_localiser(clip_dir: str | Path, meta: dict) -> TRISLocaliser:
    """A localiser initialised from the CLIP of ``clip_dir`` (Step-1 starts here)."""
    backbone = ClipBackbone(load_clip(clip_dir), dense_stride=meta["feature_stride"])
    return TRISLocaliser(backbone, meta["hidden_dim"], prompt=meta["prompt"], alpha=meta["alpha"],
                         beta=meta["beta"], init_temperature=meta["temperature"],
                         learn_temperature=meta["learn_temperature"])


def load_localiser(path: str | Path) -> tuple[TRISLocaliser, dict]:
    """Rebuild a trained localiser from ``model.pt`` (eval mode, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: Step-1 checkpoint missing; run the train_step1 stage")
    state = _read_checkpoint(path, "Step-1 localiser", LOCALISER_META_KEYS)
    _note_unfinished(path)
    meta = state["meta"]
    spec_file = Path(meta["clip_dir"]) / SPEC_FILE
    # the localiser's CLIP is the one clip_dir names; a meta without quick_gelu is read by that name
    recorded = recorded_quick_gelu({**meta, "clip_name": read_clip_spec(meta["clip_dir"]).get("name")},
                                   "clip_name", str(path))
    try:
        model = build_localiser(meta["clip_dir"], meta)
    except ActivationError as err:
        raise CheckpointError(f"{path}: its CLIP cannot be rebuilt: {err}") from err
    _refuse_activation(path, recorded, uses_quick_gelu(model.backbone.clip), str(spec_file))
    _load_weights(path, model, state["model"])
    return model.eval(), meta


def save_segmenter(path: str | Path, model: ReferringSegmenter, meta: dict[str, Any]) -> None:
    """Atomically write ``{"model": state_dict, "meta": meta}``; ``meta`` must hold every key of
    SEGMENTER_META_KEYS; ``quick_gelu`` (the network's activation) is added here.

    ``meta`` is what ``load_segmenter`` needs to rebuild the architecture without params.yaml, so a
    checkpoint stays usable on its own (e.g. copied to another machine for the predict CLI).
    """
    missing = [k for k in SEGMENTER_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"segmenter meta lacks {missing}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"model": state, "meta": _with_activation(dict(meta), model.backbone.clip)})


def load_segmenter(checkpoint_path: str | Path) -> tuple[ReferringSegmenter, dict[str, Any]]:
    """Rebuild the Step-2 network described by a checkpoint's meta and load its weights (CPU, eval mode).

    The CLIP is built without pretrained weights: every CLIP parameter is in the state dict anyway. Its
    activation must be the recorded ``quick_gelu``, else the checkpoint is refused in one line.
    """
    path = Path(checkpoint_path)
    ckpt = _read_checkpoint(path, "Step-2 segmenter", SEGMENTER_META_KEYS)
    _note_unfinished(path)
    meta = ckpt["meta"]
    recorded = recorded_quick_gelu(meta, "clip_name", str(path))
    clip = build_clip(meta["clip_name"], None, tiny=meta["clip_tiny"], context_length=meta["context_length"])
    _refuse_activation(path, recorded, uses_quick_gelu(clip), f"model name {meta['clip_name']!r}")
    model = ReferringSegmenter(
        ClipBackbone(clip), fusion_dim=meta["fusion_dim"], decoder_dim=meta["decoder_dim"]
    )
    _load_weights(Path(checkpoint_path), model, ckpt["model"])
    return model.eval(), meta
