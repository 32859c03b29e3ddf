"""Sine positional encodings: for feature maps (DETR) and for boxes/points (Conditional/DAB-DETR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine encoding of a padded feature map, normalised to the unpadded extent (DETR).

    ``offset`` is added to the 1-based cumulative positions before normalising: 0 in DETR, Conditional and
    DAB-DETR, -0.5 in Deformable DETR. Returns [B, 2*num_pos_feats, H, W] for a padding mask [B, H, W]
    (True on padding).
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000.0,
        scale: float = 2 * math.pi,
        offset: float = 0.0,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        eps = 1e-6
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_embed(coords: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of normalised coordinates (Conditional/DAB-DETR ``gen_sineembed_for_position``).

    coords: [..., 2] (x, y) or [..., 4] (cx, cy, w, h) in [0, 1].
    Returns [..., num_pos_feats * coords.shape[-1]], ordered (y, x[, w, h]) as in the official code.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)

    def enc(c: Tensor) -> Tensor:
        p = c[..., None] * scale / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    parts = [enc(coords[..., 1]), enc(coords[..., 0])]
    if coords.shape[-1] == 4:
        parts += [enc(coords[..., 2]), enc(coords[..., 3])]
    return torch.cat(parts, dim=-1).to(coords.dtype)
