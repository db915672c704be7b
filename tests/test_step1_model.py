"""TRIS localiser: bilateral prompt (Eq. 3-5), residual update (Eq. 1), response map (Eq. 2), shapes."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_pipeline import TINY_CLIP

from pipeline.models.clip_backbone import ClipBackbone, build_clip, tokenize
from pipeline.models.step1 import BilateralPrompt, TRISLocaliser

TINY_RN = {**TINY_CLIP, "context_length": 77}


def _localiser(prompt: str = "bilateral", alpha: float = 0.1, beta: float = 0.1) -> TRISLocaliser:
    torch.manual_seed(0)
    backbone = ClipBackbone(build_clip("tiny-rn", None, tiny=TINY_RN))
    return TRISLocaliser(backbone, hidden_dim=4, prompt=prompt, alpha=alpha, beta=beta)


def _identity_prompt(dim: int) -> BilateralPrompt:
    prompt = BilateralPrompt(dim)
    with torch.no_grad():
        for layer in (prompt.w1v, prompt.w2v, prompt.w3v, prompt.w1l, prompt.w2l, prompt.w3l):
            layer.weight.copy_(torch.eye(dim))
    return prompt


def _softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def test_bilateral_prompt_hand_case():
    """Identity W's, 2 pixels, 2 queries, C_d = 2: Eq. 3-5 by hand."""
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # pixels
    l = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])  # queries
    vis_res, lan_res = _identity_prompt(2)(v, l)
    s = 1 / math.sqrt(2)
    # A_l: query q over pixels i, logits <V_i, L_q> / sqrt(2).
    a0 = _softmax2(1.0 * s, 0.0 * s)
    a1 = _softmax2(0.6 * s, 0.8 * s)
    lan_expected = torch.tensor([[[a0[0], a0[1]], [a1[0], a1[1]]]])  # sum_i A_l[q, i] V_i with V = I
    # A_v: pixel i over queries q, logits <L_q, V_i> / sqrt(2).
    b0 = _softmax2(1.0 * s, 0.6 * s)
    b1 = _softmax2(0.0 * s, 0.8 * s)
    vis_expected = torch.tensor(
        [
            [
                [b0[0] * 1.0 + b0[1] * 0.6, b0[1] * 0.8],
                [b1[0] * 1.0 + b1[1] * 0.6, b1[1] * 0.8],
            ]
        ]
    )
    torch.testing.assert_close(lan_res, lan_expected)
    torch.testing.assert_close(vis_res, vis_expected)


def test_single_query_makes_text_to_visual_attention_constant():
    prompt = BilateralPrompt(3)
    vis = torch.randn(2, 5, 3)
    lan = torch.randn(2, 1, 3)
    vis_res, lan_res = prompt(vis, lan)
    assert vis_res.shape == (2, 5, 3) and lan_res.shape == (2, 1, 3)
    torch.testing.assert_close(vis_res, prompt.w3l(lan).expand(-1, 5, -1))


def test_eq2_response_hand_case():
    model = _localiser("none")
    vis = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])
    lan = torch.tensor([[[0.6, 0.8, 0.0, 0.0]]])
    expected = torch.tensor([[[0.6, 0.8]]]) / 0.07
    torch.testing.assert_close(model.response(vis, lan), expected)


def test_zero_weights_reduce_to_plain_response():
    model = _localiser("bilateral", alpha=0.0, beta=0.0)
    vis, lan = torch.randn(2, 6, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(model.response(vis, lan), model.temperature * lan @ vis.transpose(1, 2))


class _FixedResiduals(torch.nn.Module):
    """Stands in for the prompt: V' = 1 everywhere, L' = 2 everywhere."""

    def forward(self, vis, lan):
        return torch.ones_like(vis), 2 * torch.ones_like(lan)


@pytest.mark.parametrize(
    ("mode", "v_weight", "l_weight"),
    [("bilateral", 0.1, 0.2), ("t2v", 0.1, 0.0), ("v2t", 0.0, 0.2)],
)
def test_prompt_modes_switch_the_right_residual(mode, v_weight, l_weight):
    model = _localiser(mode, alpha=0.1, beta=0.1)
    model.prompt = _FixedResiduals()
    vis, lan = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    expected = model.temperature * (lan + l_weight) @ (vis + v_weight).transpose(1, 2)
    torch.testing.assert_close(model.response(vis, lan), expected)


def test_none_mode_has_no_prompt_parameters():
    assert _localiser("none").prompt is None
    with pytest.raises(ValueError):
        _localiser("both")


def test_temperature_is_trained_and_clamped():
    model = _localiser()
    assert any(p is model.logit_temperature for p in model.parameters())
    torch.testing.assert_close(model.temperature, torch.tensor(1 / 0.07))
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenize(["a dog", "the red car", "a man"], 20)
    model(images, tokens).sum().backward()
    assert model.logit_temperature.grad is not None and model.logit_temperature.grad.abs() > 0
    with torch.no_grad():
        model.logit_temperature.fill_(math.log(1000.0))
    assert model.temperature.item() == pytest.approx(100.0)


def test_forward_shapes_and_paired_consistency():
    model = _localiser().eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenize(["a dog", "the red car", "a man"], 20)
    with torch.no_grad():
        all_pairs = model(images, tokens)
        paired = model.forward_paired(images, tokens[:2])
        single = model(images[1:2], tokens[1:2])
    assert all_pairs.shape == (2, 3, 2, 2)
    assert paired.shape == (2, 2, 2)
    torch.testing.assert_close(paired[1], single[0, 0])


def test_param_groups_partition_all_parameters():
    model = _localiser()
    backbone, new = model.param_groups()
    ids_backbone, ids_new = {id(p) for p in backbone}, {id(p) for p in new}
    assert not ids_backbone & ids_new
    assert ids_backbone | ids_new == {id(p) for p in model.parameters()}
    assert id(model.logit_temperature) in ids_new and id(model.prompt.w3l.weight) in ids_new
    assert id(model.vis_proj.weight) in ids_new and id(model.lan_proj.weight) in ids_new


def test_fixed_temperature_is_a_buffer_outside_the_optimised_groups():
    torch.manual_seed(0)
    backbone = ClipBackbone(build_clip("tiny-rn", None, tiny=TINY_RN))
    fixed = TRISLocaliser(backbone, hidden_dim=4, init_temperature=10.0, learn_temperature=False)
    _, new = fixed.param_groups()
    assert all(p is not fixed.logit_temperature for p in new)
    assert not fixed.logit_temperature.requires_grad
    assert "logit_temperature" in fixed.state_dict()  # same key as the learnable version
    assert float(fixed.temperature) == pytest.approx(10.0)
    learnable = _localiser()
    assert any(p is learnable.logit_temperature for p in learnable.param_groups()[1])
