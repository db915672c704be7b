"""Build the embedded web CLIP (or measure one): the corpus of :mod:`pipeline.data.web_corpus`, the
training of :mod:`pipeline.train.web_clip`, and the diagnostics its targets are stated in.

    python scripts/build_web_clip.py --out /tmp/web-clip-seed1 --seed 1
    python scripts/build_web_clip.py --out weights/web-clip --diagnose-only

The build never reads the RIS index; the diagnostics afterwards read ``--index``'s ``--split`` (GT masks,
for the manifest only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from pipeline.atomic import write_json
from pipeline.data.index import load_index
from pipeline.eval.clip_diagnostics import clip_diagnostics
from pipeline.models.clip_artifact import load_clip
from pipeline.models.clip_backbone import FrozenClip
from pipeline.runtime import select_device
from pipeline.train.web_clip import (
    DEFAULT_DIR,
    MANIFEST_FILE,
    RECIPE_FILE,
    build_web_clip,
    read_recipe,
    write_web_clip,
)


def diagnose(model: nn.Module, index_dir: Path, split: str, max_tokens: int, device: torch.device) -> dict:
    """:func:`pipeline.eval.clip_diagnostics.clip_diagnostics` of ``model`` as the frozen scorer, on
    ``split`` of the index at ``index_dir`` (GT masks read for the diagnostic only; the build never
    reads the index)."""
    index = load_index(index_dir)
    frozen = FrozenClip(model).to(device).eval()
    return clip_diagnostics(frozen, index.images, index.refs, index.sentences, split, max_tokens, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded web CLIP (weights/web-clip).")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_DIR / RECIPE_FILE)
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--index", type=Path, default=Path("artifacts/index"),
                        help="index whose --split the diagnostics are measured on (skipped if absent)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--diagnose-only", action="store_true",
                        help="recompute the diagnostics of the CLIP already in --out")
    args = parser.parse_args(argv)
    device = select_device(args.device, "--device")
    if args.diagnose_only:
        manifest = json.loads((args.out / MANIFEST_FILE).read_text())
        recipe = read_recipe(args.out / RECIPE_FILE)
        manifest["diagnostics"] = diagnose(load_clip(args.out), args.index, args.split, recipe.max_tokens,
                                           device)
        write_json(args.out / MANIFEST_FILE, manifest)
        print(json.dumps(manifest["diagnostics"], indent=1))
        return
    recipe = read_recipe(args.recipe)
    if args.seed is not None:
        recipe = recipe.model_copy(update={"seed": args.seed})
    model, build = build_web_clip(recipe, device)
    diagnostics = (diagnose(model, args.index, args.split, recipe.max_tokens, device)
                   if (args.index / "refs.parquet").is_file() else None)
    write_web_clip(args.out, model.cpu(), recipe, build, diagnostics)
    print(f"build_web_clip: wrote {args.out} ({build['pictures']} pictures, {build['steps']} steps, "
          f"{build['seconds']:.0f} s on {build['device']})")


if __name__ == "__main__":
    main()
