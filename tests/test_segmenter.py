"""Step-2 segmentation network (Sec. 3.4): shapes, text-to-visual fusion, word masking, L_ce, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_pipeline import TINY_CLIP

from pipeline.models.clip_backbone import ClipBackbone, build_clip, tokenize
from pipeline.models.segmenter import PixelWordAttention, ReferringSegmenter, segmentation_loss

MAX_TOKENS = 12


def _segmenter(name: str = "tiny-rn", tiny: dict | None = None) -> ReferringSegmenter:
    torch.manual_seed(0)
    clip = build_clip(name, None, tiny=tiny or TINY_CLIP, context_length=20)
    return ReferringSegmenter(ClipBackbone(clip), fusion_dim=16, decoder_dim=8)


@pytest.fixture(scope="module")
def model() -> ReferringSegmenter:
    return _segmenter().eval()


def _images(size: tuple[int, int], batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (80, 80), (72, 100)])
def test_forward_gives_full_resolution_logits(model, size):
    tokens = tokenize(["the red cube on the left", "a small blue ball"], MAX_TOKENS)
    with torch.no_grad():
        out = model(_images(size), tokens)
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


def test_changing_the_text_changes_the_fused_features_and_the_mask(model):
    images = _images((64, 64), batch=1)
    feats, logits = [], []
    for text in ("the red cube on the left", "the blue ball at the top"):
        tokens = tokenize([text], MAX_TOKENS)
        with torch.no_grad():
            words, mask = model.backbone.encode_words(tokens)
            feats.append(model._encode(images, words, mask))
            logits.append(model(images, tokens))
    # The stride-4 skip is not fused, the last three stages are (Sec. 3.4).
    torch.testing.assert_close(feats[0][0], feats[1][0], rtol=0, atol=0)
    for a, b in zip(feats[0][1:], feats[1][1:], strict=True):
        assert (a - b).norm() > 0.01 * a.norm()
    # A random-init decoder in eval mode shrinks every signal, so the logit change is small but real
    # (identical inputs give bit-identical outputs, see the padding test).
    assert (logits[0] - logits[1]).abs().max() > 1e-5


def test_padding_after_eot_does_not_change_the_mask(model):
    images = _images((64, 64), batch=1)
    tokens = tokenize(["a red cube"], MAX_TOKENS)
    eot = int(tokens.argmax())
    assert eot < MAX_TOKENS - 2
    garbage = tokens.clone()
    garbage[0, eot + 1:] = torch.arange(1000, 1000 + MAX_TOKENS - eot - 1)
    with torch.no_grad():
        a = model(images, tokens)
        b = model(images, garbage)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_word_mask_hides_padding_words_from_the_attention():
    torch.manual_seed(0)
    pwam = PixelWordAttention(visual_channels=6, word_channels=5, dim=8, heads=2).eval()
    visual, words = torch.randn(2, 6, 3, 4), torch.randn(2, 7, 5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 4:] = False
    changed = words.clone()
    changed[:, 4:] = torch.randn(2, 3, 5) * 10
    torch.testing.assert_close(pwam(visual, words, mask), pwam(visual, changed, mask), rtol=0, atol=1e-6)
    # Without the mask the same change does reach the output, so the check above can fail.
    full = torch.ones_like(mask)
    assert (pwam(visual, words, full) - pwam(visual, changed, full)).abs().max() > 1e-3


def test_fused_language_feeds_the_next_encoder_stage(model):
    """LAVT feeds the gated fusion back: layer3's input must depend on the text."""
    seen = []
    hook = model.backbone.clip.visual.layer3.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    images = _images((64, 64), batch=1)
    try:
        with torch.no_grad():
            model(images, tokenize(["the red cube"], MAX_TOKENS))
            model(images, tokenize(["a tiny green ball far away"], MAX_TOKENS))
    finally:
        hook.remove()
    assert (seen[0] - seen[1]).abs().max() > 1e-6


def test_vit_backbone_fuses_without_feedback():
    tiny = dict(embed_dim=32, image_size=64, vision_width=16, text_width=32, text_heads=2, text_layers=1)
    model = _segmenter("tiny-vit", tiny).eval()
    assert not model.feed_back and len(model.gates) == 0
    images = _images((80, 80), batch=1)
    with torch.no_grad():
        a = model(images, tokenize(["the red cube"], MAX_TOKENS))
        b = model(images, tokenize(["a blue ball"], MAX_TOKENS))
    assert a.shape == (1, 1, 80, 80)
    assert (a - b).abs().max() > 1e-4


def test_loss_matches_hand_computed_bce_and_ignores_255():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]], requires_grad=True)
    masks = torch.tensor([[[1, 0], [255, 1]]], dtype=torch.uint8)
    # BCE(x, 1) = log(1 + e^-x), BCE(x, 0) = log(1 + e^x); the ignored pixel (-1.0) is left out.
    expected = (math.log(2.0) + math.log1p(math.exp(2.0)) + math.log1p(math.exp(-3.0))) / 3
    loss = segmentation_loss(logits, masks)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 0, 1, 0] == 0  # the ignored pixel gets no gradient
    other = logits.detach().clone()
    other[0, 0, 1, 0] = 50.0
    assert segmentation_loss(other, masks).item() == pytest.approx(expected, rel=1e-6)


def test_loss_with_everything_ignored_is_zero_and_differentiable():
    logits = torch.randn(1, 1, 3, 3, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 3, 3), 255, dtype=torch.uint8))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_loss_rejects_mismatched_masks():
    with pytest.raises(ValueError, match="do not match"):
        segmentation_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5, 5))


def test_gradient_reaches_text_encoder_fusion_and_decoder():
    model = _segmenter().train()
    tokens = tokenize(["the red cube on the left", "a small blue ball"], MAX_TOKENS)
    logits = model(_images((64, 64)), tokens)
    masks = (torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.5).to(torch.uint8)
    segmentation_loss(logits, masks).backward()
    clip = model.backbone.clip
    checked = {
        "text transformer": clip.transformer.resblocks[0].mlp.c_fc.weight,
        "token embedding": clip.token_embedding.weight,
        "image encoder": clip.visual.conv1.weight,
        "fusion": model.fusion[0].key.weight,
        "language gate": model.gates[0].gate[0].weight,
        "decoder head": model.decoder.head.weight,
    }
    for name, p in checked.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_param_groups_split_pretrained_from_new(model):
    backbone, new = model.param_groups()
    ids_b, ids_n = {id(p) for p in backbone}, {id(p) for p in new}
    assert not ids_b & ids_n
    assert ids_b | ids_n == {id(p) for p in model.parameters()}
    assert ids_b == {id(p) for p in model.backbone.parameters()}
    assert id(model.decoder.head.weight) in ids_n
