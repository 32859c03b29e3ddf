"""Decoder cross-attention maps of queries over the encoder memory tokens (QSKD AGFD, visualisation).

Dense attention (Conditional / DAB-DETR) already is a map: ``DecoderOutput.cross_attn [L, B, Q, S]``,
head-averaged. Deformable attention only has sampling points; following Sparse-DETR / D3ETR
(``attn_map_to_flat_grid``, also used by the TPRD QSKD port), each point's attention weight is splatted
bilinearly onto the four nearest cells of its level's grid and the levels are flattened in memory order.

Grid convention: a sampling location (x, y) in [0, 1] of the padded map is at continuous cell coordinate
``(x * W_v - pixel_offset, y * H_v - pixel_offset)``. The default offset 0.5 matches ``F.grid_sample``
with ``align_corners=False`` (how :mod:`kd.ops.msdeform_attn` reads the values), so the splat is exactly
the weight each cell contributed to the sampled value; Sparse-DETR uses offset 0 (half a cell off).
Mass falling outside the map is dropped, as zero padding drops it when sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.models.outputs import DecoderOutput


def splat_points(
    locations: Tensor, weights: Tensor, spatial_shapes: Tensor, pixel_offset: float = 0.5
) -> Tensor:
    """Bilinearly splat weighted points onto the flattened multi-level grid.

    Args:
        locations: [R, N, V, 2] (x, y) in [0, 1] of each level's padded map, N points per row and level.
        weights: [R, N, V] mass of each point.
        spatial_shapes: [V, 2] long, (H_v, W_v).
        pixel_offset: see the module docstring.

    Returns:
        [R, S] float32 map, S = sum_v H_v * W_v (levels in order, row-major inside a level).
    """
    if locations.shape[:-1] != weights.shape or locations.shape[-1] != 2:
        raise ValueError(f"attention: locations {tuple(locations.shape)} vs weights {tuple(weights.shape)}")
    if locations.shape[2] != spatial_shapes.shape[0]:
        raise ValueError(
            f"attention: {locations.shape[2]} levels in locations, {spatial_shapes.shape[0]} shapes"
        )
    rows = locations.shape[0]
    shapes = spatial_shapes.tolist()
    out = torch.zeros(rows, sum(h * w for h, w in shapes), device=locations.device)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        xy = locations[:, :, lvl].float() * torch.tensor([w, h], device=locations.device) - pixel_offset
        corner = xy.floor()
        frac = xy - corner
        corner = corner.long()
        mass = weights[:, :, lvl].float()
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x, y = corner[..., 0] + dx, corner[..., 1] + dy
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            wy = frac[..., 1] if dy else 1 - frac[..., 1]
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            idx = (start + y * w + x).masked_fill(~inside, start)
            out.scatter_add_(1, idx, (mass * wx * wy).masked_fill(~inside, 0.0))
        start += h * w
    return out


def deformable_query_maps(
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes: Tensor,
    per_head: bool = False,
    pixel_offset: float = 0.5,
) -> Tensor:
    """Attention map of every query (and head) of one deformable decoder layer.

    Args:
        sampling_locations: [B, Q, H, V, P, 2]; attention_weights: [B, Q, H, V, P] (sum 1 over V, P).
        spatial_shapes: [V, 2]; per_head: keep the heads apart instead of averaging them.

    Returns:
        [B, Q, S] head-averaged maps, or [B, Q, H, S] with ``per_head``.
    """
    b, q, h, v, p, _ = sampling_locations.shape
    locs = sampling_locations.permute(0, 1, 2, 4, 3, 5).reshape(b * q * h, p, v, 2)
    weights = attention_weights.permute(0, 1, 2, 4, 3).reshape(b * q * h, p, v)
    maps = splat_points(locs, weights, spatial_shapes, pixel_offset).view(b, q, h, -1)
    return maps if per_head else maps.mean(2)


def query_attention_maps(
    dec: DecoderOutput, layer: int, spatial_shapes: Tensor, pixel_offset: float = 0.5
) -> Tensor:
    """Head-averaged cross-attention maps [B, Q, S] of decoder layer ``layer`` (dense or deformable)."""
    if dec.cross_attn is not None:
        return dec.cross_attn[layer].float()
    if dec.sampling_locations is None or dec.attention_weights is None:
        raise ValueError(
            "attention: the decoder output has no attention (run the model with return_attention)"
        )
    return deformable_query_maps(
        dec.sampling_locations[layer], dec.attention_weights[layer], spatial_shapes, False, pixel_offset
    )


def weighted_attention_map(
    dec: DecoderOutput,
    layer: int,
    query_weights: Tensor,
    spatial_shapes: Tensor,
    pixel_offset: float = 0.5,
) -> Tensor:
    """``sum_q w_q A_q``: the weighted sum of the queries' head-averaged maps of one layer.

    Args:
        dec: a decoder output with ``cross_attn`` or ``sampling_locations`` + ``attention_weights``.
        query_weights: [B, Q] (0 for queries left out).

    Returns:
        [B, S] float32.
    """
    w = query_weights.float()
    if dec.cross_attn is not None:
        return torch.einsum("bq,bqs->bs", w, dec.cross_attn[layer].float())
    if dec.sampling_locations is None or dec.attention_weights is None:
        raise ValueError(
            "attention: the decoder output has no attention (run the model with return_attention)"
        )
    locs, attn = dec.sampling_locations[layer], dec.attention_weights[layer]
    b, q, h, v, p, _ = locs.shape
    attn = attn.float() * (w / h)[:, :, None, None, None]
    locs = locs.permute(0, 1, 2, 4, 3, 5).reshape(b, q * h * p, v, 2)
    attn = attn.permute(0, 1, 2, 4, 3).reshape(b, q * h * p, v)
    return splat_points(locs, attn, spatial_shapes, pixel_offset)
