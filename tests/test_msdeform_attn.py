"""Tests for kd/ops/msdeform_attn.py: against a naive bilinear loop, gradients, module init and geometry."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kd.ops import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
    use_gather,
)
from kd.ops.msdeform_attn import softmax_short


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample img [C, H, W] at normalised (x, y) like grid_sample(align_corners=False, zero padding)."""
    _, h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < w and 0 <= yi < h:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[:, yi, xi]
    return out


def _naive(value, shapes, locations, weights):
    """Per-point loop: value [B,S,H,Dh], locations [B,Q,H,V,P,2], weights [B,Q,H,V,P] -> [B,Q,H*Dh]."""
    b, _, n_heads, d_head = value.shape
    _, n_q, _, n_levels, n_points, _ = locations.shape
    starts = [0] + torch.cumsum(shapes.prod(1), 0).tolist()
    out = torch.zeros(b, n_q, n_heads, d_head, dtype=value.dtype)
    for bi in range(b):
        for q in range(n_q):
            for hd in range(n_heads):
                for lvl in range(n_levels):
                    h, w = shapes[lvl].tolist()
                    img = value[bi, starts[lvl] : starts[lvl + 1], hd].T.reshape(d_head, h, w)
                    for p in range(n_points):
                        x, y = locations[bi, q, hd, lvl, p].tolist()
                        out[bi, q, hd] += weights[bi, q, hd, lvl, p] * _bilinear(img, x, y)
    return out.flatten(2)


def _random_inputs(seed: int, b=2, n_q=3, n_heads=2, d_head=3, shapes=((5, 4), (3, 2)), n_points=2):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    s = int(shapes.prod(1).sum())
    value = torch.randn(b, s, n_heads, d_head, generator=g, dtype=torch.float64)
    # locations partly outside [0, 1] to exercise the zero padding
    locations = (
        torch.rand(b, n_q, n_heads, len(shapes), n_points, 2, generator=g, dtype=torch.float64) * 1.3 - 0.15
    )
    weights = torch.rand(b, n_q, n_heads, len(shapes), n_points, generator=g, dtype=torch.float64)
    return value, shapes, locations, weights


class TestMsDeformAttn:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_matches_naive_loop(self, seed):
        value, shapes, locations, weights = _random_inputs(seed)
        out = ms_deform_attn(value, shapes, locations, weights)
        assert out.shape == (2, 3, 6)
        assert_close(out, _naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)

    def test_gradcheck(self):
        value, shapes, locations, weights = _random_inputs(3, b=1, n_q=2, shapes=((3, 3), (2, 2)))
        inputs = [t.requires_grad_() for t in (value, locations, weights)]
        assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, shapes, loc, w), inputs)

    def test_pixel_centre_reads_the_pixel(self):
        value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # one 2x3 level
        shapes = torch.tensor([[2, 3]])
        loc = torch.tensor([(2 + 0.5) / 3, (1 + 0.5) / 2], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
        out = ms_deform_attn(value, shapes, loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
        assert_close(out, torch.tensor([[[5.0]]], dtype=torch.float64))

    def test_bfloat16_values_keep_float32_locations(self):
        value, shapes, locations, weights = _random_inputs(4)
        value, locations, weights = value.float(), locations.float(), weights.float()
        out = ms_deform_attn(value.bfloat16(), shapes, locations, weights)
        assert out.dtype == torch.float32
        assert_close(out, ms_deform_attn(value, shapes, locations, weights), rtol=0.02, atol=0.02)

    def test_bad_shapes(self):
        value, shapes, locations, weights = _random_inputs(0)
        with pytest.raises(ValueError, match="spatial_shapes"):
            ms_deform_attn(value[:, :-1], shapes, locations, weights)


class TestMSDeformAttnModule:
    def test_official_offset_init(self):
        m = MSDeformAttn(d_model=8, n_levels=1, n_heads=4, n_points=2)
        expected = torch.tensor([1, 0, 2, 0, 0, 1, 0, 2, -1, 0, -2, 0, 0, -1, 0, -2], dtype=torch.float32)
        assert_close(m.sampling_offsets.bias.detach(), expected, atol=1e-6, rtol=0)
        assert_close(m.sampling_offsets.weight.detach(), torch.zeros_like(m.sampling_offsets.weight))

    @pytest.mark.parametrize("ref_dim", [2, 4])
    def test_sampling_geometry_at_init(self, ref_dim):
        torch.manual_seed(0)
        m = MSDeformAttn(d_model=8, n_levels=2, n_heads=4, n_points=2)
        shapes = torch.tensor([[4, 6], [2, 3]])
        memory = torch.randn(1, 30, 8)
        ref = torch.rand(1, 5, 2, ref_dim)
        out, loc, w = m(torch.randn(1, 5, 8), ref, memory, shapes, return_sampling=True)
        assert out.shape == (1, 5, 8) and loc.shape == (1, 5, 4, 2, 2, 2) and w.shape == (1, 5, 4, 2, 2)
        offsets = m.sampling_offsets.bias.detach().view(4, 2, 2, 2)  # weights are zero at init
        if ref_dim == 2:
            expected = ref[:, :, None, :, None] + offsets / torch.tensor([[6.0, 4.0], [3.0, 2.0]])[:, None]
        else:
            expected = ref[:, :, None, :, None, :2] + offsets / 2 * ref[:, :, None, :, None, 2:] * 0.5
        assert_close(loc, expected)
        assert_close(w, torch.full_like(w, 0.25))  # uniform softmax at init

    def test_padding_values_are_ignored(self):
        torch.manual_seed(0)
        m = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=3)
        shapes = torch.tensor([[3, 4]])
        memory, query, ref = torch.randn(1, 12, 8), torch.randn(1, 2, 8), torch.rand(1, 2, 1, 2)
        pad = torch.zeros(1, 3, 4, dtype=torch.bool)
        pad[:, :, 2:] = True
        other = memory.clone().view(1, 3, 4, 8)
        other[:, :, 2:] = 100.0
        a = m(query, ref, memory, shapes, pad.flatten(1))
        b = m(query, ref, other.view(1, 12, 8), shapes, pad.flatten(1))
        assert_close(a, b)

    def test_bad_reference_dim(self):
        m = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
        with pytest.raises(ValueError, match="reference_points"):
            m(torch.randn(1, 2, 8), torch.rand(1, 2, 1, 3), torch.randn(1, 4, 8), torch.tensor([[2, 2]]))


class TestGatherPath:
    """The no-gradient CPU path (``ms_deform_attn_gather`` / ``MSDeformAttn._gather_points``) against the
    ``grid_sample`` path that training takes."""

    @pytest.mark.parametrize("seed", [0, 1])
    def test_gather_equals_grid_sample_and_naive(self, seed):
        value, shapes, locations, weights = _random_inputs(seed, shapes=((5, 4), (3, 2), (1, 1)))
        out = ms_deform_attn_gather(value, shapes, locations, weights)
        assert_close(
            out, ms_deform_attn_grid_sample(value, shapes, locations, weights), rtol=1e-12, atol=1e-12
        )
        assert_close(out, _naive(value, shapes, locations, weights), rtol=1e-10, atol=1e-10)

    def test_far_outside_reads_zero(self):
        value, shapes, locations, weights = _random_inputs(5)
        far = locations + torch.tensor([3.0, -2.5], dtype=torch.float64)
        assert_close(
            ms_deform_attn_gather(value, shapes, far, weights), torch.zeros(2, 3, 6, dtype=torch.float64)
        )

    def test_dispatch(self, monkeypatch):
        """No gradient -> gather; inputs that need a gradient -> grid_sample (its backward is faster)."""
        import kd.ops.msdeform_attn as op

        value, shapes, locations, weights = _random_inputs(6)
        calls = []
        gather = op.ms_deform_attn_gather
        monkeypatch.setattr(op, "ms_deform_attn_gather", lambda *a: calls.append("gather") or gather(*a))
        ms_deform_attn(value, shapes, locations, weights)
        with torch.no_grad():
            ms_deform_attn(value, shapes, locations.requires_grad_(), weights)
        assert calls == ["gather", "gather"]
        out = ms_deform_attn(value, shapes, locations, weights)
        assert calls == ["gather", "gather"] and out.grad_fn is not None
        with torch.no_grad(), use_gather(False):
            ms_deform_attn(value, shapes, locations, weights)
        assert calls == ["gather", "gather"]

    def test_use_gather_false_is_the_official_path_bit_for_bit(self):
        torch.manual_seed(0)
        m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
        shapes = torch.tensor([[4, 5], [2, 3]])
        memory, query, ref = torch.randn(2, 26, 16), torch.randn(2, 7, 16), torch.rand(2, 7, 2, 2)
        train = m(query, ref, memory, shapes)
        with torch.no_grad(), use_gather(False):
            assert torch.equal(m(query, ref, memory, shapes), train.detach())

    def test_float64_row_indices_past_float32_range(self, monkeypatch):
        import kd.ops.msdeform_attn as op

        value, shapes, locations, weights = _random_inputs(7)
        value, locations, weights = value.float(), locations.float(), weights.float()
        expected = ms_deform_attn_gather(value, shapes, locations, weights)
        monkeypatch.setattr(op, "FLOAT32_EXACT_ROWS", 8)
        assert_close(ms_deform_attn_gather(value, shapes, locations, weights), expected)

    def test_softmax_short(self):
        x = torch.randn(2, 7, 3, 12)
        assert_close(softmax_short(x), x.softmax(-1))

    @pytest.mark.parametrize("ref_dim", [2, 4])
    def test_module_no_grad_equals_training_path(self, ref_dim):
        """Encoder-style 2-d references (``_gather_points``, no locations formed) and decoder-style 4-d
        boxes with ``return_sampling``: the same output, locations and weights as with gradients on."""
        torch.manual_seed(0)
        m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3).double()
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(torch.randn_like(prm) * 0.3)  # off the init's zero offsets
        shapes = torch.tensor([[4, 5], [2, 3]])
        memory = torch.randn(2, 26, 16, dtype=torch.float64)
        query = torch.randn(2, 7, 16, dtype=torch.float64)
        ref = torch.rand(2, 7, 2, ref_dim, dtype=torch.float64) * 1.2 - 0.1
        pad = torch.zeros(2, 26, dtype=torch.bool)
        pad[1, :4] = True
        train = m(query, ref, memory, shapes, pad, return_sampling=True)
        assert train[0].grad_fn is not None
        with torch.no_grad():
            fast = m(query, ref, memory, shapes, pad, return_sampling=True)
            assert_close(m(query, ref, memory, shapes, pad), train[0].detach(), rtol=1e-10, atol=1e-10)
        for a, b in zip(fast, train, strict=True):
            assert_close(a, b.detach(), rtol=1e-10, atol=1e-10)

    def test_module_bfloat16_autocast_no_grad(self):
        """Under bf16 autocast (as the teacher runs) the gather path stays within bf16 rounding."""
        torch.manual_seed(0)
        m = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
        shapes = torch.tensor([[4, 5], [2, 3]])
        memory, query, ref = torch.randn(2, 26, 16), torch.randn(2, 7, 16), torch.rand(2, 7, 2, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train = m(query, ref, memory, shapes)
            with torch.no_grad():
                fast = m(query, ref, memory, shapes)
        assert fast.dtype == train.dtype == torch.bfloat16
        assert_close(fast.float(), train.detach().float(), rtol=0.02, atol=0.02)
