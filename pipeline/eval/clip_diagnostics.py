"""What a frozen CLIP knows of this world, in the figures the web CLIP's targets are stated in.

- the masked-object ranking (:func:`pipeline.eval.clip_checks.masked_object_hits`: the target's
  GT-masked image scored above every other object's of the image, for the target's own expression),
  overall and by expression kind (attribute subsets, position, relation);
- the one-word minimal-pair cosine of its text encoder per family (:mod:`pipeline.eval.text_pairs`).

Reads GT masks of an eval split: a diagnostic for the manifest and the reports, never a training input.
"""

from __future__ import annotations

import pandas as pd
import torch

from pipeline.eval.clip_checks import masked_object_hits
from pipeline.eval.grounding import expression_family, expression_kind
from pipeline.eval.text_pairs import minimal_pairs, separation
from pipeline.models.clip_backbone import FrozenClip, tokenize

# the kinds the targets name: attribute (all attribute kinds), shape-only, position
HEADLINE = {"attribute": lambda kind, family: family == "attribute",
            "shape_only": lambda kind, family: kind == "attribute: shape",
            "position": lambda kind, family: family == "position"}


def ranking_summary(hits: pd.DataFrame) -> dict:
    """Overall, headline and per-kind rates of a ``masked_object_hits`` table (rate, chance, n)."""
    kinds = [expression_kind(t) for t in hits["text"]]
    families = [expression_family(t) for t in hits["text"]]
    hits = hits.assign(kind=kinds, family=families, chance=1.0 / hits["objects"])

    def rate(part: pd.DataFrame) -> dict:
        return {"rate": round(float(part["hit"].mean()), 4), "chance": round(float(part["chance"].mean()), 4),
                "n": len(part)}

    out = {"overall": rate(hits)}
    for name, keep in HEADLINE.items():
        part = hits[[keep(k, f) for k, f in zip(hits["kind"], hits["family"], strict=True)]]
        if len(part):
            out[name] = rate(part)
    out["by_kind"] = {k: rate(part) for k, part in hits.groupby("kind", sort=True)}
    return out


@torch.no_grad()
def clip_diagnostics(frozen: FrozenClip, images: pd.DataFrame, refs: pd.DataFrame, sentences: pd.DataFrame,
                     split: str, max_tokens: int, device: torch.device) -> dict:
    """Masked-object ranking (by kind) and minimal-pair cosines of ``frozen`` on ``split``."""
    hits = masked_object_hits(frozen, images, refs, sentences, split, max_tokens, frozen.image_size, device)
    texts = sentences.loc[sentences["split"] == split, "text"].tolist()

    def embed(batch: list[str]) -> torch.Tensor:
        return torch.cat([frozen.encode_text(tokenize(batch[s:s + 512], max_tokens).to(device)).cpu()
                          for s in range(0, len(batch), 512)])

    pairs = separation(embed, minimal_pairs(texts), texts)
    return {"split": split, "masked_object_ranking": ranking_summary(hits),
            "minimal_pair_cosine": {family: {"cosine": round(cos, 4), "pairs": n}
                                    for family, (cos, n) in pairs.items()}}
