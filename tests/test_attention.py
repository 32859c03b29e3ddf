"""Tests for kd/distill/attention.py: bilinear splatting of deformable sampling points, dense maps."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from kd.distill.attention import (
    deformable_query_maps,
    query_attention_maps,
    splat_points,
    weighted_attention_map,
)
from kd.models.outputs import DecoderOutput
from kd.ops.msdeform_attn import ms_deform_attn

SHAPES = torch.tensor([[4, 4], [2, 3]])  # two levels: 16 + 6 tokens


def _one_point(x: float, y: float, level: int = 0, offset: float = 0.5) -> torch.Tensor:
    """Splat a single point of weight 1 on ``level``; returns the [S] map."""
    locs = torch.zeros(1, 1, 2, 2)
    locs[0, 0, level] = torch.tensor([x, y])
    weights = torch.zeros(1, 1, 2)
    weights[0, 0, level] = 1.0
    return splat_points(locs, weights, SHAPES, offset)[0]


class TestSplat:
    def test_single_point_bilinear(self):
        # level 0 is 4 x 4: x = 1.75 / 4 -> column 1.25, y = 3 / 4 -> row 2.5 (cell centres at i + 0.5)
        grid = _one_point(1.75 / 4, 3.0 / 4)
        expected = torch.zeros(22)
        expected[2 * 4 + 1], expected[2 * 4 + 2] = 0.375, 0.125  # row 2, columns 1 / 2
        expected[3 * 4 + 1], expected[3 * 4 + 2] = 0.375, 0.125  # row 3
        assert_close(grid, expected)

    def test_cell_centre_takes_all_the_mass(self):
        grid = _one_point(2.5 / 3, 0.5 / 2, level=1)  # level 1 is 2 x 3: row 0, column 2
        expected = torch.zeros(22)
        expected[16 + 2] = 1.0
        assert_close(grid, expected)

    def test_sparse_detr_offset(self):
        """With offset 0 (Sparse-DETR) a cell centre is split between two columns and two rows."""
        grid = _one_point(1.5 / 4, 1.5 / 4, offset=0.0)
        expected = torch.zeros(22)
        for r in (1, 2):
            for c in (1, 2):
                expected[r * 4 + c] = 0.25
        assert_close(grid, expected)

    def test_mass_outside_is_dropped(self):
        grid = _one_point(0.0, 0.5 / 4)  # column -0.5: half the mass falls off the left edge
        assert_close(grid.sum(), torch.tensor(0.5))
        assert_close(grid[0], torch.tensor(0.5))
        assert_close(_one_point(1.5, 0.5).sum(), torch.tensor(0.0))

    def test_masses_sum_to_one_per_query_head(self):
        g = torch.Generator().manual_seed(0)
        b, q, h, v, p = 2, 5, 3, 2, 4
        locs = 0.25 + 0.5 * torch.rand(b, q, h, v, p, 2, generator=g)  # inside every level's centre hull
        weights = torch.randn(b, q, h, v * p, generator=g).softmax(-1).view(b, q, h, v, p)
        maps = deformable_query_maps(locs, weights, SHAPES, per_head=True)
        assert maps.shape == (b, q, h, 22)
        assert_close(maps.sum(-1), torch.ones(b, q, h))
        assert bool((maps >= 0).all())
        assert_close(deformable_query_maps(locs, weights, SHAPES), maps.mean(2))

    def test_splat_is_the_adjoint_of_deformable_sampling(self):
        """<splat, value> equals what ms_deform_attn reads from ``value`` (borders included)."""
        g = torch.Generator().manual_seed(1)
        b, q, h, v, p = 2, 3, 2, 2, 3
        locs = torch.rand(b, q, h, v, p, 2, generator=g) * 1.2 - 0.1
        weights = torch.randn(b, q, h, v * p, generator=g).softmax(-1).view(b, q, h, v, p)
        value = torch.randn(b, 22, h, 1, generator=g)
        sampled = ms_deform_attn(value, SHAPES, locs, weights)  # [B, Q, H]
        maps = deformable_query_maps(locs, weights, SHAPES, per_head=True)  # [B, Q, H, S]
        read = torch.einsum("bqhs,bsh->bqh", maps, value[..., 0])
        assert_close(read, sampled, rtol=1e-5, atol=1e-6)

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="levels"):
            splat_points(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3), SHAPES)
        with pytest.raises(ValueError, match="weights"):
            splat_points(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2), SHAPES)


def _decoder(b=2, q=4, layers=2, **kw) -> DecoderOutput:
    return DecoderOutput(
        logits=torch.zeros(layers, b, q, 3), boxes=torch.zeros(layers, b, q, 4),
        hidden=torch.zeros(layers, b, q, 8), references=torch.zeros(layers, b, q, 2), **kw,
    )  # fmt: skip


class TestWeightedMap:
    def test_deformable_equals_weighted_sum_of_query_maps(self):
        g = torch.Generator().manual_seed(2)
        locs = torch.rand(2, 2, 4, 2, 2, 3, 2, generator=g)
        weights = torch.randn(2, 2, 4, 2, 6, generator=g).softmax(-1).view(2, 2, 4, 2, 2, 3)
        dec = _decoder(sampling_locations=locs, attention_weights=weights)
        w = torch.tensor([[1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 3.0]])
        maps = query_attention_maps(dec, 1, SHAPES)
        assert_close(maps, deformable_query_maps(locs[1], weights[1], SHAPES))
        assert_close(weighted_attention_map(dec, 1, w, SHAPES), torch.einsum("bq,bqs->bs", w, maps))

    def test_dense(self):
        attn = torch.rand(2, 2, 4, 22).softmax(-1)
        dec = _decoder(cross_attn=attn)
        w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
        out = weighted_attention_map(dec, 0, w, SHAPES)
        assert_close(out[0], attn[0, 0, 0])
        assert_close(out[1], 0.5 * (attn[0, 1, 1] + attn[0, 1, 2]))
        assert_close(query_attention_maps(dec, 1, SHAPES), attn[1])

    def test_missing_attention(self):
        with pytest.raises(ValueError, match="return_attention"):
            weighted_attention_map(_decoder(), 0, torch.ones(2, 4), SHAPES)
        with pytest.raises(ValueError, match="return_attention"):
            query_attention_maps(_decoder(), 0, SHAPES)
