"""Tests for kd/models/transformer_layers.py: the attention functions shared by every detector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from kd.models.transformer_layers import dot_product_attention, multihead_attention, sdpa


def _mha(dim: int = 32, heads: int = 4, dropout: float = 0.0) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True).double().eval()
    nn.init.normal_(mha.in_proj_bias)  # torch initialises the biases to zero: make them count
    nn.init.normal_(mha.out_proj.bias)
    return mha


def test_multihead_attention_matches_nn_module_self_attention_with_group_mask():
    mha = _mha()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    blocked = torch.zeros(7, 7, dtype=torch.bool)
    blocked[:3, 3:] = blocked[3:, :3] = True  # two isolated query groups (DN / extra groups)
    expected = mha(x, x, x * 0.5, attn_mask=blocked, need_weights=False)[0]
    assert_close(multihead_attention(mha, x, x, x * 0.5, attn_mask=blocked), expected)


def test_multihead_attention_matches_nn_module_with_padding_and_distinct_keys():
    mha = _mha()
    q, k = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 9, 32, dtype=torch.float64)
    v = torch.randn(2, 9, 32, dtype=torch.float64)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    expected = mha(q, k, v, key_padding_mask=padding, need_weights=False)[0]
    assert_close(multihead_attention(mha, q, k, v, key_padding_mask=padding), expected)
    # padded keys are ignored: changing them does not change the output
    v2 = v.clone()
    v2[1, 6:] = 1e3
    assert_close(multihead_attention(mha, q, k, v2, key_padding_mask=padding), expected)


def test_multihead_attention_gradients_reach_the_modules_parameters():
    mha = _mha().train()
    x = torch.randn(2, 4, 32, dtype=torch.float64)
    multihead_attention(mha, x, x, x).square().sum().backward()
    assert mha.in_proj_weight.grad is not None and mha.in_proj_weight.grad.abs().sum() > 0
    assert mha.out_proj.weight.grad is not None and mha.out_proj.weight.grad.abs().sum() > 0


def test_multihead_attention_applies_dropout_in_training_only():
    mha = _mha(dropout=0.5)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    assert_close(multihead_attention(mha, x, x, x), multihead_attention(mha, x, x, x))  # eval: no dropout
    mha.train()
    torch.manual_seed(1)
    a = multihead_attention(mha, x, x, x)
    assert not torch.allclose(a, multihead_attention(mha.eval(), x, x, x))


def test_sdpa_runs_bf16_inputs_in_fp32_and_returns_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    allowed = torch.rand(30, 30) > 0.3
    allowed.fill_diagonal_(True)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out = sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=allowed)
    assert out.dtype == torch.bfloat16
    # only the inputs' and the output's rounding to bf16 remain (bf16 has 8 bits of mantissa)
    assert_close(out.float(), reference, atol=3e-2, rtol=2e-2)
    assert_close(sdpa(q, k, v, attn_mask=allowed), reference)  # fp32 unchanged


def test_sdpa_under_bf16_autocast_computes_in_fp32():
    """Autocast lists SDPA among its bf16 ops: fp32 inputs must not be rounded to bf16 inside it."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v)
    assert out.dtype == torch.float32
    assert_close(out, F.scaled_dot_product_attention(q, k, v))  # fp32 tolerances: no bf16 rounding


@pytest.mark.parametrize("need_weights", [False, True])
def test_dot_product_attention_under_bf16_autocast_keeps_the_input_dtype(need_weights):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 32) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, need_weights=need_weights
        )
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 32)
    assert (weights is not None) == need_weights
    expected, _ = dot_product_attention(q, k, v, 4)
    assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
