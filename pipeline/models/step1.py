"""Step 1 of TRIS: the text-to-image response localiser (Sec. 3.1) with the bilateral prompt (Sec. 3.2).

The network never sees a mask. It scores how well each expression matches each image (Eq. 6-7) through a
per-pixel response map (Eq. 2); the map is what later becomes a pseudo label. During training every image
is scored against every expression of the batch (its own are positives, the others negatives), exactly as
the authors' code does; at inference each image is paired with its own expression only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.clip_backbone import ClipBackbone

PromptMode = Literal["bilateral", "t2v", "v2t", "none"]
MAX_TEMPERATURE = 100.0  # CLIP's clamp on its logit scale


class BilateralPrompt(nn.Module):
    """``Gamma_Prompt`` of Eq. 1: cross-modal residuals ``V'`` (text -> pixels) and ``L'`` (pixels -> text).

    Eq. 3: ``A_l[q, i] = softmax_i(<V_i W1v, L_q W2l> / sqrt(C_d))`` — each query attends over the ``HW``
    pixels, and ``L'_q = sum_i A_l[q, i] (V W3v)_i`` (Eq. 5) gathers the image evidence for that query.
    Eq. 4: ``A_v[i, q] = softmax_q(<L_q W1l, V_i W2v> / sqrt(C_d))`` — each pixel attends over the ``Q``
    queries, and ``V'_i = sum_q A_v[i, q] (L W3l)_q`` (Eq. 5) pulls text semantics into the pixel.

    With a single query (inference, ``Q = 1``) ``A_v`` is identically 1, so ``V'`` is the same vector
    ``L W3l`` at every pixel: the text-to-visual branch then shifts all responses of a map by one constant and
    only the visual-to-text branch changes the map's shape.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.w1v, self.w2v, self.w3v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.w1l, self.w2l, self.w3l = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, vis: torch.Tensor, lan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``vis (B, HW, C_d)``, ``lan (B, Q, C_d)`` -> ``V' (B, HW, C_d)``, ``L' (B, Q, C_d)``."""
        scale = 1.0 / math.sqrt(self.dim)
        # Eq. 3 + Eq. 5 (left): visual-to-text.
        a_l = torch.softmax(self.w2l(lan) @ self.w1v(vis).transpose(1, 2) * scale, dim=-1)  # (B, Q, HW)
        lan_res = a_l @ self.w3v(vis)
        # Eq. 4 + Eq. 5 (right): text-to-visual.
        a_v = torch.softmax(self.w2v(vis) @ self.w1l(lan).transpose(1, 2) * scale, dim=-1)  # (B, HW, Q)
        vis_res = a_v @ self.w3l(lan)
        return vis_res, lan_res


class TRISLocaliser(nn.Module):
    """CLIP encoders + projectors + bilateral prompt + temperature-scaled response map (Eq. 1-2).

    ``prompt`` selects the ablation of Table 5: ``'bilateral'`` (both residuals), ``'t2v'`` (only ``V'``),
    ``'v2t'`` (only ``L'``), ``'none'`` (plain projected CLIP features).
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        hidden_dim: int,
        prompt: PromptMode = "bilateral",
        alpha: float = 0.1,
        beta: float = 0.1,
        init_temperature: float = 1 / 0.07,
        learn_temperature: bool = True,
    ) -> None:
        super().__init__()
        if prompt not in ("bilateral", "t2v", "v2t", "none"):
            raise ValueError(f"unknown prompt mode {prompt!r}")
        self.backbone = backbone
        self.prompt_mode = prompt
        self.alpha = alpha if prompt in ("bilateral", "t2v") else 0.0
        self.beta = beta if prompt in ("bilateral", "v2t") else 0.0
        self.vis_proj = nn.Conv2d(backbone.visual_channels, hidden_dim, kernel_size=1)
        self.lan_proj = nn.Linear(backbone.text_channels, hidden_dim)
        self.prompt = BilateralPrompt(hidden_dim) if prompt != "none" else None
        # tau of Eq. 2, log-parametrised like CLIP's logit scale. The paper learns it; the authors' code keeps
        # it fixed. It also sets the sharpness of the Eq. 9 soft mask sigmoid(up(R)), so a learnable tau lets
        # calibration trade map shape for mask contrast; a buffer keeps the same state-dict key either way.
        log_tau = torch.tensor(math.log(init_temperature))
        if learn_temperature:
            self.logit_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("logit_temperature", log_tau)

    @torch.no_grad()
    def init_projectors_from_clip(self) -> bool:
        """Start the projectors where CLIP's own embedding space is (MaskCLIP, Zhou et al., ECCV 2022).

        For a ModifiedResNet, the attention pool's value and output projections applied to every
        layer4 pixel map it into the joint image-text space; a 1x1 conv with weight ``W_c W_v`` does
        exactly that, and an identity text projector keeps CLIP's text embedding. The response map
        then starts as CLIP's dense image-text similarity instead of a random projection, which is
        what a short CPU schedule needs. Only possible when ``hidden_dim`` equals CLIP's embedding
        width (1024 for RN50, as the paper's C_d); returns whether it was applied.
        """
        pool = getattr(self.backbone.clip.visual, "attnpool", None)
        c_d = self.vis_proj.out_channels
        if pool is None or pool.c_proj.out_features != c_d or self.lan_proj.in_features != c_d:
            return False
        weight = pool.c_proj.weight @ pool.v_proj.weight  # (C_d, C_v)
        bias = pool.c_proj.weight @ pool.v_proj.bias + pool.c_proj.bias
        self.vis_proj.weight.copy_(weight[:, :, None, None])
        self.vis_proj.bias.copy_(bias)
        self.lan_proj.weight.copy_(torch.eye(c_d))
        self.lan_proj.bias.zero_()
        return True

    @property
    def temperature(self) -> torch.Tensor:
        """Current scale ``exp(logit_temperature)``, clamped to CLIP's maximum of 100."""
        return self.logit_temperature.exp().clamp(max=MAX_TEMPERATURE)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained backbone params, new params) so the backbone can get a smaller learning rate."""
        new = list(self.vis_proj.parameters()) + list(self.lan_proj.parameters())
        if isinstance(self.logit_temperature, nn.Parameter):
            new.append(self.logit_temperature)
        if self.prompt is not None:
            new += list(self.prompt.parameters())
        return list(self.backbone.parameters()), new

    def visual_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``V`` of Sec. 3.1: projected, channel-L2-normalised pixels ``(B, HW, C_d)`` and grid ``(h, w)``."""
        vis = self.vis_proj(self.backbone.dense_features(images))
        h, w = vis.shape[-2:]
        return F.normalize(vis.flatten(2).transpose(1, 2), dim=-1), (h, w)

    def text_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``L`` of Sec. 3.1: projected, L2-normalised sentence features ``(Q, C_d)``."""
        return F.normalize(self.lan_proj(self.backbone.encode_text(tokens)), dim=-1)

    def response(self, vis: torch.Tensor, lan: torch.Tensor) -> torch.Tensor:
        """Eq. 1 then Eq. 2: ``tau * <V_hat_i, L_hat_q>``.

        ``vis (B, HW, C_d)`` and ``lan (B, Q, C_d)`` (the L2-normalised ``V``, ``L``) -> ``(B, Q, HW)``.
        """
        if self.prompt is not None:
            vis_res, lan_res = self.prompt(vis, lan)
            vis = vis + self.alpha * vis_res
            lan = lan + self.beta * lan_res
        return self.temperature * (lan @ vis.transpose(1, 2))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Every image against every query: ``images (B, 3, H, W)``, ``tokens (Q, T)`` -> ``(B, Q, h, w)``."""
        vis, (h, w) = self.visual_features(images)
        lan = self.text_features(tokens).unsqueeze(0).expand(vis.shape[0], -1, -1)
        return self.response(vis, lan).reshape(vis.shape[0], -1, h, w)

    def forward_paired(self, images: torch.Tensor, tokens: torch.Tensor,
                       image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Each sentence against its own image only (``Q = 1``): ``tokens (S, T)`` -> ``(S, h, w)``.

        Without ``image_index`` sentence ``b`` goes with image ``b``. With it, sentence ``s`` goes with
        image ``image_index[s]``, so an image described by several expressions is encoded once.
        """
        vis, (h, w) = self.visual_features(images)
        if image_index is not None:
            vis = vis[image_index]
        lan = self.text_features(tokens).unsqueeze(1)
        return self.response(vis, lan).reshape(vis.shape[0], h, w)
