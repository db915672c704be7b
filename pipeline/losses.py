"""Step-1 objectives of TRIS (Sec. 3.3): query classification (Eq. 6-7) and calibration (Eq. 8-9).

``L = lambda * L_cls + L_cal`` (Sec. 4.1). The classification loss teaches the localiser *where* an
expression matches by asking only *whether* it matches; the calibration loss uses a frozen CLIP to judge
the masked image ``I * up(R^p)`` against the positive expression and against expressions of other objects in
the same image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

SimilarityMode = Literal["cosine", "rescaled"]
S_EPS = 1e-6


def image_level_scores(responses: torch.Tensor, focal_power: float, focal_eps: float) -> torch.Tensor:
    """Eq. 6: ``y_q = max_i R_iq + mean_i R_iq + psi_q`` for ``responses (B, Q, h, w)`` -> ``(B, Q)``.

    ``psi`` is the focal-style regulariser of Lin et al. [32] as in the authors' code: per pixel a softmax
    over a constant background channel (value 1) and the ``Q`` response maps; ``p_q`` is the spatial mean of
    query ``q``'s share and ``psi_q = (1 - p_q)^focal_power * log(focal_eps + p_q)`` (``step1.focal_power``,
``step1.focal_eps``). A query that wins few
    pixels gets a large negative ``psi``, which re-balances the one positive against many negatives.
    """
    flat = responses.flatten(2)  # (B, Q, HW)
    background = torch.ones_like(flat[:, :1])
    shares = torch.softmax(torch.cat([background, flat], dim=1), dim=1)[:, 1:]
    p = shares.mean(dim=-1)
    psi = (1 - p).pow(focal_power) * torch.log(focal_eps + p)
    return flat.amax(dim=-1) + flat.mean(dim=-1) + psi


def classification_loss(y: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 7: sigmoid binary cross-entropy of scores ``y (B, Q)`` vs ``targets`` (1 positive, 0 negative).

    Averaged over the ``valid`` entries of each row (its positives and the ``N`` sampled negatives; the
    other queries of the batch are ignored), then over the rows that have any valid entry.
    """
    valid = valid.to(y.dtype)
    bce = F.binary_cross_entropy_with_logits(y, targets.to(y.dtype), reduction="none")
    count = valid.sum(dim=1)
    per_row = (bce * valid).sum(dim=1) / count.clamp(min=1)
    has_any = (count > 0).to(y.dtype)
    return (per_row * has_any).sum() / has_any.sum().clamp(min=1)  # no host sync: no bool(), no mask index


def calibration_similarity(
    image_emb: torch.Tensor, text_emb: torch.Tensor, mode: SimilarityMode = "rescaled"
) -> torch.Tensor:
    """``phi`` of Eq. 9 over the last axis (broadcasting), unclamped.

    ``'cosine'`` is the paper's choice; with a pretrained CLIP the cosine of a masked image and a sentence is
    positive. An untrained or small CLIP gives negative cosines, where ``log S`` of Eq. 8 is undefined, so
    ``'rescaled'`` maps the cosine to ``(1 + cos) / 2`` in [0, 1], keeping the order of the scores.
    PRMS (Eq. 10) can use this directly; ``calibration_loss`` clamps before taking logs.
    """
    cos = (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(dim=-1)
    if mode == "cosine":
        return cos
    if mode == "rescaled":
        return (1 + cos) / 2
    raise ValueError(f"unknown similarity mode {mode!r}")


def calibration_loss(
    masked_emb: torch.Tensor,
    pos_emb: torch.Tensor,
    neg_emb: torch.Tensor,
    neg_valid: torch.Tensor,
    *,
    use_positive: bool = True,
    use_negative: bool = True,
    mode: SimilarityMode = "rescaled",
    negative_reduction: Literal["sum", "mean"] = "sum",
    negative_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 8: ``-(log S(pos) + sum_k log(1 - S(neg_k)))`` averaged over the batch.

    ``masked_emb (B, D)`` embeds ``I * up(R^p)``, ``pos_emb (B, D)`` the positive expression, ``neg_emb
    (B, K, D)`` the ``K`` expressions of other objects of the same image; ``neg_valid (B, K)`` drops padding
    negatives. ``S`` is clamped into ``[1e-6, 1 - 1e-6]`` so the logs stay finite. The switches give the
    ablations of Table 6. The returned dict holds the detached batch means of the two terms.

    Eq. 8 sums over the ``K`` negatives; the authors' released code averages them and weights the
    average by 2 (``negative_reduction='mean'``, ``negative_weight=2``), which keeps the negative term
    from outweighing the positive one ``K`` to one as ``K`` grows.
    """
    pos_term = -torch.log(calibration_similarity(masked_emb, pos_emb, mode).clamp(S_EPS, 1 - S_EPS))
    s_neg = calibration_similarity(masked_emb.unsqueeze(1), neg_emb, mode).clamp(S_EPS, 1 - S_EPS)
    valid = neg_valid.to(s_neg.dtype)
    neg_term = -(torch.log(1 - s_neg) * valid).sum(dim=1)
    if negative_reduction == "mean":
        neg_term = neg_term / valid.sum(dim=1).clamp(min=1)
    elif negative_reduction != "sum":
        raise ValueError(f"unknown negative_reduction {negative_reduction!r}")
    neg_term = negative_weight * neg_term
    loss = masked_emb.sum() * 0  # keeps a graph even when both terms are switched off
    if use_positive:
        loss = loss + pos_term.mean()
    if use_negative:
        loss = loss + neg_term.mean()
    return loss, {"cal_pos": pos_term.mean().detach(), "cal_neg": neg_term.mean().detach()}

