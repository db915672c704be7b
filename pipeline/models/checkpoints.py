"""Save and rebuild the trained networks: weights plus the few settings needed to rebuild each.

The Step-1 localiser and the Step-2 segmenter checkpoints live here, below both the training stages
that write them and the evaluation / inference code that reads them, so neither side imports the other
(in particular, training does not import the ``predict`` CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import CheckpointError, load_torch, save_torch
from pipeline.models.clip_artifact import load_clip
from pipeline.models.clip_backbone import ClipBackbone, build_clip
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


def save_localiser(path: Path, model: TRISLocaliser, meta: dict) -> None:
    """``meta`` (``pipeline.train.step1.localiser_meta``) holds clip_dir, hidden_dim, prompt, alpha, beta,
    input_size, max_tokens, feature_stride, temperature and learn_temperature."""
    save_torch(path, {"model": model.state_dict(), "meta": meta})


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
    model = build_localiser(state["meta"]["clip_dir"], state["meta"])
    _load_weights(path, model, state["model"])
    return model.eval(), state["meta"]


def save_segmenter(path: str | Path, model: ReferringSegmenter, meta: dict[str, Any]) -> None:
    """Atomically write ``{"model": state_dict, "meta": meta}``; ``meta`` must hold every key of
    SEGMENTER_META_KEYS.

    ``meta`` is what ``load_segmenter`` needs to rebuild the architecture without params.yaml, so a
    checkpoint stays usable on its own (e.g. copied to another machine for the predict CLI).
    """
    missing = [k for k in SEGMENTER_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"segmenter meta lacks {missing}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"model": state, "meta": dict(meta)})


def load_segmenter(checkpoint_path: str | Path) -> tuple[ReferringSegmenter, dict[str, Any]]:
    """Rebuild the Step-2 network described by a checkpoint's meta and load its weights (CPU, eval mode).

    The CLIP is built without pretrained weights: every CLIP parameter is in the state dict anyway.
    """
    ckpt = _read_checkpoint(Path(checkpoint_path), "Step-2 segmenter", SEGMENTER_META_KEYS)
    _note_unfinished(Path(checkpoint_path))
    meta = ckpt["meta"]
    clip = build_clip(meta["clip_name"], None, tiny=meta["clip_tiny"], context_length=meta["context_length"])
    model = ReferringSegmenter(
        ClipBackbone(clip), fusion_dim=meta["fusion_dim"], decoder_dim=meta["decoder_dim"]
    )
    _load_weights(Path(checkpoint_path), model, ckpt["model"])
    return model.eval(), meta
