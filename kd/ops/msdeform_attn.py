"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3), in pure PyTorch.

``ms_deform_attn`` is the official ``ms_deform_attn_core_pytorch`` (fundamentalvision/Deformable-DETR,
``models/ops/functions/ms_deform_attn_func.py``): bilinear sampling with ``F.grid_sample``
(``align_corners=False``, zero padding), one call per feature level, weighted sum over levels and points.
On the CPU without gradients (a teacher inside distillation, evaluation, prediction) ``ms_deform_attn`` takes
``ms_deform_attn_gather`` instead: the same bilinear sampling with zero padding as one weighted gather
(``F.embedding_bag``) over all levels, points and corners, 2x the speed of the per-level ``grid_sample`` calls
and their stack-multiply-sum at the teacher's encoder sizes (``bench/msdeform_attn.py``); equal to it up to
float rounding. Training keeps ``grid_sample`` (its fused backward beats any gather's); ``use_gather(False)``
turns the gather path off (the official path everywhere, bit for bit).
``MSDeformAttn`` is the official module (``models/ops/modules/ms_deform_attn.py``) with the same
parameter names and initialisation, so official state dicts load unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FLOAT32_EXACT_ROWS = 2**24  # bilinear_gather computes row indices in float32 below this many table rows
_GATHER = True


@contextlib.contextmanager
def use_gather(enabled: bool) -> Iterator[None]:
    """Inside the block, take (``True``) or never take (``False``) the no-gradient gather path."""
    global _GATHER
    previous, _GATHER = _GATHER, enabled
    try:
        yield
    finally:
        _GATHER = previous


def _takes_gather(*tensors: Tensor) -> bool:
    """The gather path: enabled, on the CPU, and no gradient needed through ``tensors``."""
    if not _GATHER or tensors[0].device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def ms_deform_attn(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Sample every level at the given locations and sum with the attention weights.

    Args:
        value: [B, S, H, Dh] per-head values, levels flattened in order (S = sum_v H_v * W_v).
        spatial_shapes: [V, 2] long, (H_v, W_v) of each level.
        sampling_locations: [B, Q, H, V, P, 2] (x, y) in [0, 1] of the padded map; outside reads zero.
        attention_weights: [B, Q, H, V, P] (softmax-normalised over V*P by the caller).

    Returns:
        [B, Q, H * Dh].
    """
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    if sum(sizes) != value.shape[1]:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes cover {sum(sizes)} tokens, value has {value.shape[1]}"
        )
    if _takes_gather(value, sampling_locations, attention_weights):
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_grid_sample(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """``ms_deform_attn`` as the official ``ms_deform_attn_core_pytorch``: one ``F.grid_sample`` per level."""
    b, _, n_heads, d_head = value.shape
    _, n_q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # never round locations to bf16
    value, sampling_locations = value.to(dtype), sampling_locations.to(dtype)
    grids = 2 * sampling_locations - 1  # grid_sample coordinates in [-1, 1]
    sampled = []
    for lvl, (value_l, (h, w)) in enumerate(
        zip(value.split(sizes, dim=1), spatial_shapes.tolist(), strict=True)
    ):
        # [B, H_v*W_v, H, Dh] -> [B*H, Dh, H_v, W_v]
        value_l = value_l.flatten(2).transpose(1, 2).reshape(b * n_heads, d_head, h, w)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> [B*H, Dh, Q, P]
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [B, Q, H, V, P] -> [B*H, 1, Q, V*P]
    weights = attention_weights.transpose(1, 2).reshape(b * n_heads, 1, n_q, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights.to(dtype)).sum(-1)
    return out.view(b, n_heads * d_head, n_q).transpose(1, 2).contiguous()


def ms_deform_attn_gather(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """``ms_deform_attn`` as one weighted gather (``bilinear_gather``); same arguments and result.

    Differentiable, but its backward is slower than ``grid_sample``'s: ``ms_deform_attn`` takes it only
    when no gradient is needed.
    """
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)  # never round locations to bf16
    # level-major views: locations [V, 2, B, H, Q, P], weights [V, B, H, Q, P]
    locations = sampling_locations.to(dtype).permute(3, 5, 0, 2, 1, 4)
    weights = attention_weights.to(dtype).permute(3, 0, 2, 1, 4)
    shapes = spatial_shapes.tolist()
    xs = [locations[lvl, 0] * w - 0.5 for lvl, (_, w) in enumerate(shapes)]
    ys = [locations[lvl, 1] * h - 0.5 for lvl, (h, _) in enumerate(shapes)]
    return bilinear_gather(value.to(dtype), spatial_shapes, xs, ys, list(weights.unbind(0)))


def bilinear_gather(
    value: Tensor, spatial_shapes: Tensor, xs: list[Tensor], ys: list[Tensor], weights: list[Tensor]
) -> Tensor:
    """Weighted bilinear reads of every level, summed per (image, query, head), as one ``F.embedding_bag``.

    Every (image, head, query) is a bag of its V * P * 4 bilinear corners, each weighted by its point's
    attention weight times its bilinear weight. Zero padding without masks: each level's values get a
    border of zero cells and the corner coordinates are clamped into it, so a corner outside the map reads
    zero as ``grid_sample(padding_mode="zeros")`` does.

    Args:
        value: [B, S, H, Dh] per-head values, levels flattened in order.
        spatial_shapes: [V, 2] long, (H_v, W_v).
        xs, ys: V x [B, H, Q, P] pixel coordinates of the points (``grid_sample``'s with
            ``align_corners=False``: x * W_v - 0.5 for a location x in [0, 1]).
        weights: V x [B, H, Q, P] attention weights, same dtype as ``value``.

    Returns:
        [B, Q, H * Dh].
    """
    b, _, n_heads, d_head = value.shape
    n_q = xs[0].shape[2]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if sum(h * w for h, w in shapes) != value.shape[1]:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes cover {sum(h * w for h, w in shapes)} tokens, "
            f"value has {value.shape[1]}"
        )
    # table [B * H * S', Dh]: per level [B, H_v + 2, W_v + 2, H, Dh] with a zero border, rows ordered
    # (image, head, padded token)
    padded, starts = [], [0]
    for value_l, (h, w) in zip(value.split([h * w for h, w in shapes], 1), shapes, strict=True):
        value_l = F.pad(value_l.reshape(b, h, w, n_heads * d_head), (0, 0, 1, 1, 1, 1))
        padded.append(value_l.view(b, (h + 2) * (w + 2), n_heads, d_head))
        starts.append(starts[-1] + (h + 2) * (w + 2))
    table = torch.cat(padded, 1).transpose(1, 2).reshape(-1, d_head)
    # row indices are computed in floating point (exact below 2**24 in float32), then made integers once
    n_rows = b * n_heads * starts[-1]
    exact = torch.promote_types(xs[0].dtype, torch.float32 if n_rows < FLOAT32_EXACT_ROWS else torch.float64)
    block = torch.arange(b * n_heads, device=value.device, dtype=exact).view(b, n_heads, 1, 1)
    rows, mass = [], []
    for lvl, (h, w) in enumerate(shapes):
        x, y = xs[lvl].to(exact), ys[lvl].to(exact)
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        # padded-map columns and row starts of the two corners on each axis (-1 and W_v / H_v: the border)
        col0, col1 = x0.clamp(-1, w) + 1, (x0 + 1).clamp(-1, w) + 1
        base = block * starts[-1] + starts[lvl]
        row0 = (y0.clamp(-1, h) + 1) * (w + 2) + base
        row1 = ((y0 + 1).clamp(-1, h) + 1) * (w + 2) + base
        a1 = weights[lvl] * fy.to(value.dtype)
        a0 = weights[lvl] - a1
        fx = fx.to(value.dtype)
        rows += [row0 + col0, row0 + col1, row1 + col0, row1 + col1]
        mass += [a0 - a0 * fx, a0 * fx, a1 - a1 * fx, a1 * fx]
    # bags [B * H * Q, 4 V P] (index and weight), out [B * H * Q, Dh] -> [B, Q, H * Dh]
    index = torch.stack(rows, 3).to(torch.int32 if n_rows < 2**31 else torch.int64)
    index = index.view(b * n_heads * n_q, -1)
    out = F.embedding_bag(
        index, table, mode="sum", per_sample_weights=torch.stack(mass, 3).view(b * n_heads * n_q, -1)
    )
    return out.view(b, n_heads, n_q, d_head).transpose(1, 2).reshape(b, n_q, n_heads * d_head)


def softmax_short(x: Tensor) -> Tensor:
    """Softmax over a short last dim (V * P), computed along dim 0 of its transpose: at the encoder's sizes
    5-8x faster on the CPU than ``softmax(-1)`` (which vectorises along that short dim). [..., K] -> same."""
    k = x.shape[-1]
    return x.reshape(-1, k).t().contiguous().softmax(0).t().reshape(x.shape)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (official parameter names and init).

    Args:
        d_model: hidden size D (divisible by n_heads).
        n_levels: number of feature levels V.
        n_heads: number of heads H.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: offsets start on a ring of H directions, point i at distance i + 1."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Tensor,
        padding_mask: Tensor | None = None,
        return_sampling: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: [B, Q, D] (content + positional embedding).
            reference_points: [B, Q, V, 2] points (x, y) in [0, 1] of the padded maps, or [B, Q, V, 4]
                boxes (cx, cy, w, h); offsets are then scaled by half the box size over P.
            input_flatten: [B, S, D] the flattened multi-level feature maps.
            spatial_shapes: [V, 2] long, (H_v, W_v).
            padding_mask: [B, S] bool, True on padding (those values are zeroed).
            return_sampling: also return the sampling locations and attention weights.

        Returns:
            output [B, Q, D]; with ``return_sampling`` also sampling_locations [B, Q, H, V, P, 2] and
            attention_weights [B, Q, H, V, P].
        """
        b, n_q, _ = query.shape
        n_in = input_flatten.shape[1]
        h, v, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, n_in, h, self.d_model // h)
        offsets = self.sampling_offsets(query).view(b, n_q, h, v, p, 2)
        logits = self.attention_weights(query).view(b, n_q, h, v * p)
        if _takes_gather(query, reference_points, input_flatten, *self.parameters()):
            # no gradient: the gather path (ms_deform_attn_gather), and straight to its pixel coordinates
            if reference_points.shape[-1] == 2 and not return_sampling:
                out = self._gather_points(value, spatial_shapes, reference_points, offsets, logits)
                return self.output_proj(out)
            weights = softmax_short(logits).view(b, n_q, h, v, p)
        else:
            weights = logits.softmax(-1).view(b, n_q, h, v, p)
        if reference_points.shape[-1] == 2:
            normalizer = spatial_shapes.flip(-1).to(reference_points.dtype)  # (W_v, H_v)
            locations = (
                reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None]
            )
        elif reference_points.shape[-1] == 4:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"MSDeformAttn: reference_points last dim must be 2 or 4, got {reference_points.shape}"
            )
        output = self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))
        if return_sampling:
            return output, locations, weights
        return output

    def _gather_points(
        self, value: Tensor, spatial_shapes: Tensor, reference_points: Tensor, offsets: Tensor, logits: Tensor
    ) -> Tensor:
        """The no-gradient forward from 2-d references: pixel coordinates x_ref * W_v + offset - 0.5 (the
        same points as ``forward``'s locations, without forming them) and the softmax in the level-major
        layout ``bilinear_gather`` reads.

        value [B, S, H, Dh]; spatial_shapes [V, 2]; reference_points [B, Q, V, 2]; offsets
        [B, Q, H, V, P, 2]; logits [B, Q, H, V * P]. Returns [B, Q, H * Dh].
        """
        b, n_q, h, v, p, _ = offsets.shape
        dtype = torch.promote_types(value.dtype, torch.promote_types(offsets.dtype, reference_points.dtype))
        offsets = offsets.to(dtype).permute(3, 5, 0, 2, 1, 4)  # [V, 2, B, H, Q, P]
        refs = reference_points.to(dtype).permute(2, 3, 0, 1)  # [V, 2, B, Q]
        # softmax over V * P along dim 0 of [V * P, B, H, Q], then per level [B, H, Q, P]
        weights = logits.to(dtype).permute(3, 0, 2, 1).contiguous().softmax(0).view(v, p, b, h, n_q)
        xs, ys, ws = [], [], []
        for lvl, (hl, wl) in enumerate(spatial_shapes.tolist()):
            xs.append(offsets[lvl, 0] + (refs[lvl, 0] * wl - 0.5)[:, None, :, None])
            ys.append(offsets[lvl, 1] + (refs[lvl, 1] * hl - 0.5)[:, None, :, None])
            ws.append(weights[lvl].permute(1, 2, 3, 0))
        return bilinear_gather(value.to(dtype), spatial_shapes, xs, ys, ws)
