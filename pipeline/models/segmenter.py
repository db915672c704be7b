"""Step-2 referring segmentation network trained on the pseudo-masks (Sec. 3.4, "Segmentation").

The paper specifies four parts: the CLIP image and text encoders of Eq. 9 (initialised from the same CLIP
as Step-1), a non-local text-to-visual fusion on the last three encoder stages, and a decoder symmetric
to the encoder, trained with the standard cross-entropy loss L_ce. The fusion is LAVT's pixel-word
attention module (PWAM) with its language gate:

* every pixel of a stage queries the word features (non-local attention over the words, padding masked),
* the attended language vector multiplies a projection of the pixel (multiplicative gating),
* the result goes to the decoder, and, gated by a learned tanh gate, is added back to the stage's features
  before the next encoder stage runs -- as LAVT does. Feeding it back needs the encoder to run stage by
  stage, which the ModifiedResNet allows; for a ViT backbone the stages of ``stage_features`` are a
  pyramid built from one transformer output, so there the fused maps only feed the decoder.

The decoder mirrors the encoder's four strides (32 -> 16 -> 8 -> 4) with skip connections and upsamples
the stride-4 logit to the input resolution, so any input size (also one not divisible by 32) gives an
``H x W`` mask.

Where the authors' code differs (docs/departures.md): their fusion works at each stage's own width and
feeds the decoder only (nothing goes back into the encoder), their decoder's widths halve 512 -> 32, and
each of its four levels has its own output and loss (deep supervision). Here the widths are
``step2.fusion_dim`` / ``step2.decoder_dim``, sized for the embedded default's CPU budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.clip_backbone import ClipBackbone

IGNORE_INDEX = 255


class PixelWordAttention(nn.Module):
    """LAVT's PWAM: pixels attend to words; the attended language feature gates the pixel feature.

    Query projections and the attention output are instance-normalised over the spatial positions (as in
    LAVT), which keeps the multiplicative fusion at the same scale across stages of very different widths.
    All internal work is ``dim`` wide; the output is projected back to the stage width so it can be added
    to the encoder features.
    """

    def __init__(self, visual_channels: int, word_channels: int, dim: int, heads: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.vis_project = nn.Sequential(nn.Conv2d(visual_channels, dim, 1), nn.GELU())
        self.query = nn.Sequential(nn.Conv2d(visual_channels, dim, 1), nn.InstanceNorm2d(dim))
        self.key = nn.Linear(word_channels, dim)
        self.value = nn.Linear(word_channels, dim)
        self.attn_out = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.InstanceNorm2d(dim))
        self.project_mm = nn.Sequential(nn.Conv2d(dim, visual_channels, 1), nn.GELU())

    def forward(self, visual: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``visual (B, C, h, w)``, ``words (B, T, Cw)``, ``word_mask (B, T)`` bool -> ``(B, C, h, w)``."""
        B, _, h, w = visual.shape
        words = words.to(visual.dtype)
        q = self.query(visual).flatten(2).transpose(1, 2)  # (B, hw, dim)
        k, v = self.key(words), self.value(words)  # (B, T, dim)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        # Padding words (beyond EOT) get zero attention, so the text's padding cannot change the mask.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=word_mask[:, None, None, :])
        lang = attended.transpose(1, 2).flatten(2).transpose(1, 2).reshape(B, -1, h, w)
        lang = self.attn_out(lang)
        return self.project_mm(self.vis_project(visual) * lang)


class LanguageGate(nn.Module):
    """LAVT's learned gate: how much of the fused feature flows back into the encoder, per pixel/channel.

    tanh keeps the gate in (-1, 1), so the pretrained encoder features are perturbed by a bounded
    amount. The hidden layer is ``dim`` wide (LAVT uses the stage width; the bottleneck keeps a RN50's
    2048-channel stage from adding 8M parameters).
    """

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(channels, dim, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, channels, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.gate(fused) * fused


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SymmetricDecoder(nn.Module):
    """Top-down decoder mirroring the encoder: stride 32 -> 16 -> 8 -> 4, then a 1-channel logit.

    Each step upsamples to the skip's actual size (not a fixed factor of 2), so inputs whose side is
    not a multiple of 32 still line up; the skip is reduced to ``dim`` channels, concatenated and
    mixed by two 3x3 conv-bn-relu layers.
    """

    def __init__(self, in_channels: list[int], dim: int):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected 4 encoder stages (strides 4..32), got {len(in_channels)}")
        self.lateral = nn.ModuleList(_conv_bn_relu(c, dim, 1) for c in in_channels)
        self.top = _conv_bn_relu(dim, dim, 3)
        self.merge = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(2 * dim, dim, 3), _conv_bn_relu(dim, dim, 3)) for _ in range(3)
        )
        self.head = nn.Conv2d(dim, 1, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``features`` at strides 4, 8, 16, 32 -> logits ``(B, 1, *size)``."""
        x = self.top(self.lateral[3](features[3]))
        for i in (2, 1, 0):
            skip = self.lateral[i](features[i])
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.merge[i](torch.cat([x, skip], dim=1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class ReferringSegmenter(nn.Module):
    """CLIP encoders + PWAM fusion on the last three stages + symmetric decoder (Sec. 3.4)."""

    FUSED_STAGES = (1, 2, 3)  # layer2, layer3, layer4: the last three encoder stages

    def __init__(self, backbone: ClipBackbone, fusion_dim: int, decoder_dim: int):
        super().__init__()
        self.backbone = backbone
        stages = list(backbone.stage_channels)
        self.fusion = nn.ModuleList(
            PixelWordAttention(stages[i], backbone.word_channels, fusion_dim) for i in self.FUSED_STAGES
        )
        # The last fused stage has no next encoder stage to feed, so it has no gate.
        self.feed_back = bool(backbone.is_resnet)
        gated = self.FUSED_STAGES[:-1] if self.feed_back else ()
        self.gates = nn.ModuleList(LanguageGate(stages[i], fusion_dim) for i in gated)
        self.decoder = SymmetricDecoder(stages, decoder_dim)

    def _encode(self, images: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at strides 4..32, the last three replaced by their fused versions."""
        if not self.feed_back:
            feats = list(self.backbone.stage_features(images))
            for j, i in enumerate(self.FUSED_STAGES):
                feats[i] = self.fusion[j](feats[i], words, mask)
            return feats
        visual = self.backbone.clip.visual  # open_clip ModifiedResNet: stem, layer1..layer4
        x = visual.layer1(visual.stem(images))
        feats = [x]
        for j, layer in enumerate((visual.layer2, visual.layer3, visual.layer4)):
            x = layer(x)
            fused = self.fusion[j](x, words, mask)
            feats.append(fused)
            if j < len(self.gates):
                x = x + self.gates[j](fused)  # LAVT: the gated language residual enters the next stage
        return feats

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``images (B, 3, H, W)`` CLIP-normalised, ``tokens (B, T)`` -> mask logits ``(B, 1, H, W)``."""
        words, mask = self.backbone.encode_words(tokens)
        feats = self._encode(images, words, mask.bool())
        return self.decoder(feats, images.shape[-2:])

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained CLIP parameters, newly initialised fusion/gate/decoder parameters).

        Separate groups let the trainer give the pretrained encoders a smaller learning rate.
        """
        backbone = list(self.backbone.parameters())
        seen = {id(p) for p in backbone}
        new = [p for p in self.parameters() if id(p) not in seen]
        return backbone, new


def segmentation_loss(logits: torch.Tensor, pseudo_masks: torch.Tensor) -> torch.Tensor:
    """L_ce of Sec. 3.4: binary cross-entropy on the mask logits, averaged over non-ignored pixels.

    ``logits (B, 1, H, W)``; ``pseudo_masks (B, H, W)`` with 1 = target, 0 = background and 255 =
    ignore (pixels the refinement left uncertain). The two-class cross-entropy is a BCE on one logit.
    A batch with no valid pixel gives a zero loss that still belongs to the graph.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (B, 1, H, W), got {tuple(logits.shape)}")
    logits = logits[:, 0]
    if logits.shape != pseudo_masks.shape:
        raise ValueError(
            f"pseudo_masks {tuple(pseudo_masks.shape)} do not match logits {tuple(logits.shape)}"
        )
    valid = pseudo_masks != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    target = pseudo_masks[valid].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits[valid].float(), target.float())
