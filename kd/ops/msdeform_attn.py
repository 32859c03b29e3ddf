"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3), in pure PyTorch.

``ms_deform_attn`` is the official ``ms_deform_attn_core_pytorch`` (fundamentalvision/Deformable-DETR,
``models/ops/functions/ms_deform_attn_func.py``): bilinear sampling with ``F.grid_sample``
(``align_corners=False``, zero padding), one call per feature level, weighted sum over levels and points.
``MSDeformAttn`` is the official module (``models/ops/modules/ms_deform_attn.py``) with the same
parameter names and initialisation, so official state dicts load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    b, _, n_heads, d_head = value.shape
    _, n_q, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    if sum(sizes) != value.shape[1]:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes cover {sum(sizes)} tokens, value has {value.shape[1]}"
        )
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
        weights = self.attention_weights(query).view(b, n_q, h, v * p).softmax(-1).view(b, n_q, h, v, p)
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
