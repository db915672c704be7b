"""How much does the embedded frozen scorer's masked-object ranking depend on its seed?

    python -m research.frozen_scorer_seeds --kinds scene --seeds 0 1 2 [--out-dir /tmp/scorers]

For each seed, pretrain the embedded frozen CLIP of calibration and PRMS exactly as the
``pretrain_clip`` stage does with ``model.frozen_clip.pretrained: embedded`` and that ``base.seed``
(``pipeline.train.clip_pretrain.pretrain_embedded_frozen_clip``: the seed draws both its cutout corpus
and its initial weights), then print its masked-object ranking on ``--split`` by expression family
(``research.ranking_by_family``'s table), and the mean and spread over seeds. Seed 0 is the scorer
the stage builds. ``--out-dir`` keeps each scorer as ``seedN/frozen_clip.{json,pt}``, a folder that
``python -m research.step1_sweep --frozen`` calibrates with.

Why: the embedded default's targets ask for a frozen CLIP that ranks masked objects (0.80). A scorer
trained on scene cutouts can read position words, but whether it learns to is a matter of its start
(study doc, section "A scorer that reads position"). Training reads generated pictures only; the
ranking reads val GT masks, as the stage's diagnostic does. No stage calls this script.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from pipeline import paths
from pipeline.atomic import atomic_dir
from pipeline.data.index import load_index
from pipeline.eval.clip_checks import masked_object_hits
from pipeline.models.clip_artifact import FROZEN_SPEC_FILE, FROZEN_WEIGHTS_FILE, clip_spec, write_clip_spec
from pipeline.models.clip_backbone import FrozenClip
from pipeline.params import overlay, parse_params, read_params_yaml
from pipeline.runtime import configure_threads, select_device
from pipeline.train.clip_pretrain import pretrain_embedded_frozen_clip
from research.ranking_by_family import FAMILIES, ranking_by_family


def scorer_override(kinds: list[str] | None, pictures: int | None, epochs: int | None) -> dict:
    """``params.yaml`` overrides for an embedded frozen CLIP with these corpus settings."""
    given = {"kinds": kinds, "pictures": pictures, "epochs": epochs}
    frozen = {k: v for k, v in given.items() if v is not None}
    return {"model": {"frozen_clip": {"name": "tiny-rn", "pretrained": "embedded"}},
            "pretrain_clip": {"frozen": frozen}}


def seed_summary(rows: list[dict]) -> pd.DataFrame:
    """Per family (and ``all``): the ranking of each seed, its mean and standard deviation (ddof 1)."""
    table = pd.DataFrame(rows).pivot(index="family", columns="seed", values="rate")
    table = table.reindex([f for f in (*FAMILIES, "all") if f in table.index])
    values = table.to_numpy()
    table["mean"] = values.mean(axis=1)
    table["std"] = values.std(axis=1, ddof=1) if values.shape[1] > 1 else 0.0
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", choices=("isolated", "scene"), default=None,
                        help="pretrain_clip.frozen.kinds (default: params.yaml)")
    parser.add_argument("--pictures", type=int, default=None, help="pretrain_clip.frozen.pictures")
    parser.add_argument("--epochs", type=int, default=None, help="pretrain_clip.frozen.epochs")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep each scorer as OUT_DIR/seedN")
    args = parser.parse_args()
    raw = overlay(read_params_yaml("params.yaml"), scorer_override(args.kinds, args.pictures, args.epochs))
    configure_threads(raw["base"]["threads"])  # as start_stage: float results depend on the thread count
    device = select_device(raw["base"]["device"])
    index = load_index(paths.INDEX)
    rows = []
    for seed in args.seeds:
        params = parse_params(overlay(raw, {"base": {"seed": seed}}), "params.yaml + frozen_scorer_seeds")
        model, tiny = pretrain_embedded_frozen_clip(params, device)
        if args.out_dir is not None:
            with atomic_dir(args.out_dir / f"seed{seed}") as out:
                torch.save(model.state_dict(), out / FROZEN_WEIGHTS_FILE)
                spec = clip_spec("tiny-rn", FROZEN_WEIGHTS_FILE, tiny, params.model.max_tokens)
                write_clip_spec(out, spec, FROZEN_SPEC_FILE)
        frozen = FrozenClip(model).to(device)
        hits = masked_object_hits(frozen, index.images, index.refs, index.sentences, args.split,
                                  params.model.max_tokens, frozen.image_size, device)
        ranking = ranking_by_family(hits)
        rates = ", ".join(f"{r.family} {r.rate:.3f}" for r in ranking.itertuples())
        print(f"seed {seed}: {rates}", flush=True)
        rows += [{"seed": seed, "family": r.family, "rate": r.rate} for r in ranking.itertuples()]
    kinds = params.pretrain_clip.frozen.kinds
    print(f"\nmasked-object ranking on {args.split} of the embedded frozen CLIP (kinds {kinds}), by seed\n")
    table = seed_summary(rows)
    print("| family | " + " | ".join(str(c) for c in table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for family, row in table.iterrows():
        print(f"| {family} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
