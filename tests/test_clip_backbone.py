"""CLIP backbone: feature shapes at several sizes, short-context text, EOT pooling, local weight loading."""

from __future__ import annotations

import open_clip
import pytest
import torch
from tiny_pipeline import TINY_CLIP

from pipeline.models.clip_backbone import ClipBackbone, FrozenClip, build_clip, tiny_clip_config, tokenize

EOT_ID = 49407  # CLIP BPE end-of-text id, the largest id of the vocabulary
TINY_RN = {**TINY_CLIP, "image_size": 96, "context_length": 77}


@pytest.fixture(scope="module")
def tiny_rn() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    return build_clip("tiny-rn", None, tiny=TINY_RN).eval()


@pytest.fixture(scope="module")
def tiny_vit() -> open_clip.model.CLIP:
    torch.manual_seed(0)
    vision_cfg = {"layers": 2, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 64}
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()


def test_tiny_config_builds_modified_resnet(tiny_rn):
    cfg = tiny_clip_config(**TINY_RN)
    assert cfg["vision_cfg"]["head_width"] == 8 and cfg["text_cfg"]["vocab_size"] == 49408
    backbone = ClipBackbone(tiny_rn)
    assert backbone.is_resnet
    # Bottleneck expansion 4: layer k has 4 * width * 2**k channels.
    assert backbone.stage_channels == [32, 64, 128, 256]
    assert (backbone.visual_channels, backbone.text_channels, backbone.word_channels) == (256, 32, 32)


@pytest.mark.parametrize("size", [96, 160])
def test_resnet_feature_shapes(tiny_rn, size):
    backbone = ClipBackbone(tiny_rn)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        stages = backbone.stage_features(images)
        dense = backbone.dense_features(images)
        pooled = backbone.encode_image(images)
    expected = [(2, 32 * 2**k, size // 2 ** (k + 2), size // 2 ** (k + 2)) for k in range(4)]
    assert [tuple(s.shape) for s in stages] == expected
    assert dense.shape == (2, 256, size // 32, size // 32)
    torch.testing.assert_close(dense, stages[-1])
    assert pooled.shape == (2, 32) and torch.isfinite(pooled).all()


def test_resnet_encode_image_matches_clip_at_native_size(tiny_rn):
    backbone = ClipBackbone(tiny_rn)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), tiny_rn.encode_image(images))


@pytest.mark.parametrize("size", [64, 96])
def test_vit_feature_shapes(tiny_vit, size):
    backbone = ClipBackbone(tiny_vit)
    assert not backbone.is_resnet and backbone.visual_channels == 32 and backbone.stage_channels == [32] * 4
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        dense = backbone.dense_features(images)
        stages = backbone.stage_features(images)
        pooled = backbone.encode_image(images)
    assert dense.shape == (2, 32, size // 16, size // 16)
    assert [tuple(s.shape) for s in stages] == [(2, 32, size // s, size // s) for s in (4, 8, 16, 32)]
    assert pooled.shape == (2, 24)
    if size == 64:  # native size: no positional-embedding interpolation, identical to open_clip
        torch.testing.assert_close(pooled, tiny_vit.encode_image(images))


def test_tokenize_keeps_eot_and_encode_text_pools_there(tiny_rn):
    long = " ".join(["dog"] * 30)
    tokens = tokenize([long, "a cat"], max_tokens=20)
    assert tokens.shape == (2, 20) and tokens.dtype == torch.long
    assert tokens[0, -1] == EOT_ID and (tokens[0] == EOT_ID).sum() == 1
    assert tokens[1, 3] == EOT_ID and (tokens[1, 4:] == 0).all()  # SOT, a, cat, EOT, padding
    backbone = ClipBackbone(tiny_rn)
    with torch.no_grad():
        words, valid = backbone.encode_words(tokens)
        pooled = backbone.encode_text(tokens)
    assert words.shape == (2, 20, 32)
    assert valid[0].all() and valid[1].tolist() == [True] * 4 + [False] * 16
    torch.testing.assert_close(pooled[0], words[0, 19] @ tiny_rn.text_projection)
    torch.testing.assert_close(pooled[1], words[1, 3] @ tiny_rn.text_projection)


def test_short_context_equals_full_context(tiny_rn):
    """With a causal mask, 20-token encoding must equal CLIP's own 77-token encoding of the same sentence."""
    sentences = ["the man on the left", "red umbrella"]
    backbone = ClipBackbone(tiny_rn)
    with torch.no_grad():
        short = backbone.encode_text(tokenize(sentences, 20))
        full = tiny_rn.encode_text(tokenize(sentences, 77))
    torch.testing.assert_close(short, full)
    with pytest.raises(ValueError, match="exceed"):
        backbone.encode_text(torch.zeros(1, 78, dtype=torch.long))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("fmt", ["state_dict", "checkpoint"])
def test_build_clip_loads_local_checkpoint(tmp_path, fmt):
    torch.manual_seed(1)
    source = build_clip("tiny-rn", None, tiny=TINY_RN)
    state = source.state_dict()
    if fmt == "checkpoint":  # open_clip training checkpoint saved from DistributedDataParallel
        payload = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:
        payload = state
    path = tmp_path / "clip.pt"
    torch.save(payload, path)
    torch.manual_seed(2)
    loaded = build_clip("tiny-rn", str(path), tiny=TINY_RN)
    _assert_same_weights(source, loaded)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    fresh = build_clip("tiny-rn", "none", tiny=TINY_RN)
    assert not torch.equal(fresh.visual.conv1.weight, source.visual.conv1.weight)


def test_build_clip_loads_torchscript_archive(tmp_path):
    """OpenAI releases TorchScript archives; the weights must come out unchanged."""
    torch.manual_seed(3)
    source = build_clip("tiny-rn", None, tiny=TINY_RN)
    path = tmp_path / "clip_jit.pt"
    with pytest.warns(FutureWarning):  # torch.jit.script is deprecated but is what OpenAI used
        torch.jit.script(source).save(str(path))
    loaded = build_clip("tiny-rn", str(path), tiny=TINY_RN)
    _assert_same_weights(source, loaded)


def test_build_clip_unknown_tag_says_no_network():
    with pytest.raises(RuntimeError, match="no-such-tag.*no network"):
        build_clip("RN50", "no-such-tag")


def test_frozen_clip_passes_gradient_to_input_only(tiny_rn):
    frozen = FrozenClip(build_clip("tiny-rn", None, tiny=TINY_RN))
    frozen.train()
    assert not frozen.training and not frozen.backbone.clip.visual.training
    assert frozen.image_size == 96
    assert all(not p.requires_grad for p in frozen.parameters())
    images = torch.randn(2, 3, 96, 96, requires_grad=True)
    emb = frozen.encode_image(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    text = frozen.encode_text(tokenize(["a dog", "a cat"], 20))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    (emb * text).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in frozen.parameters())


@pytest.mark.parametrize("stride, side", [(16, 6), (8, 12)])
def test_dense_stride_refines_the_map_with_the_same_weights(tiny_rn, stride, side):
    images = torch.randn(2, 3, 96, 96)
    coarse = ClipBackbone(tiny_rn).dense_features(images)
    dense_model = ClipBackbone(build_clip("tiny-rn", None, tiny=TINY_RN).eval(), dense_stride=stride)
    dense_model.load_state_dict(ClipBackbone(tiny_rn).state_dict())  # no pooling weights: same keys
    dense = dense_model.dense_features(images)
    assert coarse.shape[-2:] == (3, 3) and dense.shape[-2:] == (side, side)
    assert dense.shape[1] == coarse.shape[1]
    # The shared backbone weights are untouched: the stride-32 view of the same CLIP is unchanged.
    assert torch.equal(ClipBackbone(tiny_rn).dense_features(images), coarse)


def test_dense_stride_16_needs_a_resnet(tiny_vit):
    with pytest.raises(ValueError, match="ModifiedResNet"):
        ClipBackbone(tiny_vit, dense_stride=16)
    with pytest.raises(ValueError, match="one of"):
        ClipBackbone(tiny_vit, dense_stride=4)
