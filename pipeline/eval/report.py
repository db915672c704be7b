"""The final report: one metrics.json for `dvc metrics show` / `dvc exp show`, and a Markdown summary
(Step-1 vs Step-2 per split beside the chance baselines) with a gallery of image, Step-1 map,
pseudo-mask, Step-2 mask and GT for the best / median / worst Step-2 cases."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.eval.scoring import AUTHORS_KEY

KEYS = ("mIoU", "oIoU", "P@0.5", "P@0.7", "P@0.9", "PointM", "PointIt", "Acc_box")


def combine_metrics(step1: Mapping, step2: Mapping, pseudo: Mapping) -> dict:
    """``{"step1": ..., "step2": ..., "pseudo_masks": ...}`` as written to metrics.json."""
    return {"step1": dict(step1), "step2": dict(step2), "pseudo_masks": dict(pseudo)}


def summary_markdown(metrics: Mapping, gallery_link: str | None = None) -> str:
    """A per-split table of Step-1 and Step-2 metrics beside the chance PointM baselines."""
    lines = ["# TRIS pipeline summary", "",
             "Metrics on each evaluation split (fractions in [0, 1]). Chance: PointM of the image centre "
             "and of a uniformly random point. Step-1 masks are min-max normalised maps >= "
             "evaluate.threshold; the authors' binarisation keeps every positive pixel (ReLU, / max, > 0).",
             "",
             "| split | model | " + " | ".join(KEYS) + " | n |",
             "|---|---|" + "---|" * (len(KEYS) + 1)]
    for split in metrics["step1"]:
        for name in ("step1", "step2"):
            row = metrics[name].get(split)
            if row is None:
                continue
            cells = " | ".join(f"{row[k]:.3f}" for k in KEYS)
            lines.append(f"| {split} | {name.replace('step', 'Step-')} | {cells} | {row['n']} |")
            authors = row.get(AUTHORS_KEY)
            if authors is not None:
                cells = " | ".join(f"{authors[k]:.3f}" for k in KEYS)
                lines.append(f"| {split} | Step-1, authors' binarisation | {cells} | {authors['n']} |")
        s1 = metrics["step1"][split]
        if "PointM_center" in s1:
            lines.append(f"| {split} | chance | | | | | | centre {s1['PointM_center']:.3f}, uniform "
                         f"{s1['PointM_uniform']:.3f} | | | |")
    pm = metrics.get("pseudo_masks", {})
    if pm:
        lines += ["", "## Pseudo-masks (train split, vs GT: a diagnostic, nothing trains on GT)", "",
                  "| masks | mIoU | P@0.5 |", "|---|---|---|"]
        for key in ("raw_first_expression", "raw_selected", "refined"):
            if key in pm:
                lines.append(f"| {key.replace('_', ' ')} | {pm[key]['mIoU']:.3f} | {pm[key]['P@0.5']:.3f} |")
    if gallery_link:
        lines += ["", "Gallery (image, Step-1 map, pseudo-mask, Step-2 mask, GT): "
                  f"[{gallery_link}]({gallery_link})"]
    return "\n".join(lines) + "\n"
