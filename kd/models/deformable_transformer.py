"""Deformable DETR transformer: deformable encoder, decoder with optional box refinement, two-stage proposals.

Follows fundamentalvision/Deformable-DETR ``models/deformable_transformer.py`` (parameter names kept so that
official state dicts map one to one). Differences: the decoder self-attention takes a mask (so that
denoising and extra query groups can share one pass with the detection queries), ``batch_first`` tensors,
and the two-stage top-k never selects padded or out-of-range proposals.

Shapes: B images, S memory tokens (all levels flattened), V levels, N queries, D hidden size, L layers.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.box_ops import inverse_sigmoid
from kd.models.transformer_layers import multihead_attention
from kd.ops import MSDeformAttn


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"deformable transformer: activation must be relu or gelu, got {name!r}")


def valid_ratios(masks: list[Tensor]) -> Tensor:
    """Unpadded fraction of each level: masks V x [B, H_v, W_v] (True on padding) -> [B, V, 2] (w, h)."""
    ratios = []
    for m in masks:
        valid_h = (~m[:, :, 0]).sum(1).float() / m.shape[1]
        valid_w = (~m[:, 0, :]).sum(1).float() / m.shape[2]
        ratios.append(torch.stack([valid_w, valid_h], -1))
    return torch.stack(ratios, 1)


def _level_grids(spatial_shapes: Tensor, device: torch.device) -> list[Tensor]:
    """Pixel-centre coordinates (x + 0.5, y + 0.5) of every level: V x [H_v * W_v, 2]."""
    grids = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        grids.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return grids


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Reference point of every memory token on every level (official ``get_reference_points``).

    spatial_shapes: [V, 2]; ratios: [B, V, 2] valid ratios. Returns [B, S, V, 2] in padded-map units.
    """
    refs = []
    for lvl, (grid, (h, w)) in enumerate(
        zip(_level_grids(spatial_shapes, ratios.device), spatial_shapes.tolist(), strict=True)
    ):
        size = torch.tensor([w, h], dtype=torch.float32, device=ratios.device)
        refs.append(grid[None] / (ratios[:, None, lvl] * size))  # normalised to the unpadded extent
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


def encoder_proposals(memory_mask: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """One proposal box per memory token (official ``gen_encoder_output_proposals``, without the head).

    memory_mask: [B, S] bool, True on padding; spatial_shapes: [V, 2].
    Returns proposals [B, S, 4] unsigmoided cxcywh (+inf where invalid) and valid [B, S] bool (not padding
    and the box strictly inside (0.01, 0.99)).
    """
    b = memory_mask.shape[0]
    proposals, start = [], 0
    for lvl, (grid, (h, w)) in enumerate(
        zip(_level_grids(spatial_shapes, memory_mask.device), spatial_shapes.tolist(), strict=True)
    ):
        mask_l = memory_mask[:, start : start + h * w].view(b, h, w)
        valid_hw = torch.stack([(~mask_l[:, 0, :]).sum(1), (~mask_l[:, :, 0]).sum(1)], -1).float()  # (w, h)
        xy = grid[None] / valid_hw[:, None]
        wh = torch.full_like(xy, 0.05 * (2.0**lvl))
        proposals.append(torch.cat([xy, wh], -1))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~memory_mask
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


def proposal_pos_embed(anchors: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of unsigmoided boxes (official ``get_proposal_pos_embed``, num_pos_feats = D / 2).

    anchors: [B, N, 4] unsigmoided cxcywh. Returns [B, N, 4 * num_pos_feats], ordered (cx, cy, w, h).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=anchors.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = anchors.float().sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN, post-norm (official encoder layer)."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        dropout: float,
        activation: str,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """src, pos: [B, S, D]; reference_points: [B, S, V, 2]; padding_mask: [B, S]. Returns [B, S, D]."""
        src = self.norm1(
            src
            + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask))
        )
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(
        self, src: Tensor, spatial_shapes: Tensor, ratios: Tensor, pos: Tensor, padding_mask: Tensor
    ) -> Tensor:
        """src, pos: [B, S, D]; ratios: [B, V, 2]; padding_mask: [B, S]. Returns memory [B, S, D]."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class DeformableDecoderLayer(nn.Module):
    """Self-attention, deformable cross-attention to the memory, FFN; post-norm (official decoder layer)."""

    def __init__(
        self,
        d_model: int,
        d_ffn: int,
        dropout: float,
        activation: str,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        memory_mask: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """tgt, query_pos: [B, N, D]; reference_points: [B, N, V, 2|4]; memory: [B, S, D];
        self_attn_mask: [N, N] bool, True where attention is blocked.

        Returns tgt [B, N, D], sampling_locations [B, N, H, V, P, 2], attention_weights [B, N, H, V, P].
        """
        q = tgt + query_pos
        tgt2 = multihead_attention(self.self_attn, q, q, tgt, attn_mask=self_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2, locations, weights = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, memory_mask, return_sampling=True
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn)), locations, weights


class DeformableDecoder(nn.Module):
    """A stack of decoder layers; with ``bbox_embed`` set, boxes are refined layer by layer.

    ``bbox_embed`` (a ModuleList, one head per layer) is assigned by the detector when box refinement is
    on, as in the official code; the refined reference is detached before it enters the next layer.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        ratios: Tensor,
        memory_mask: Tensor,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """Decode N queries.

        Args:
            tgt, query_pos: [B, N, D] content and positional queries.
            reference_points: [B, N, 2|4] sigmoided, normalised to the unpadded image.
            memory: [B, S, D]; spatial_shapes: [V, 2]; ratios: [B, V, 2]; memory_mask: [B, S].
            self_attn_mask: [N, N] bool, True where blocked.

        Returns:
            hidden [L, B, N, D]; the reference each layer took as input (L tensors [B, N, 2|4]; with box
            refinement from 2-d points the first is 2-d and the rest 4-d); sampling_locations
            [L, B, N, H, V, P, 2]; attention_weights [L, B, N, H, V, P].
        """
        hidden, references, locations, weights = [], [], [], []
        for lid, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
            ref_input = reference_points[:, :, None] * scale[:, None]
            tgt, loc, w = layer(
                tgt, query_pos, ref_input, memory, spatial_shapes, memory_mask, self_attn_mask
            )
            references.append(reference_points)
            hidden.append(tgt)
            locations.append(loc)
            weights.append(w)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                ref_logit = inverse_sigmoid(reference_points)
                if reference_points.shape[-1] == 4:
                    new_ref = delta + ref_logit
                else:
                    new_ref = torch.cat([delta[..., :2] + ref_logit, delta[..., 2:]], -1)
                reference_points = new_ref.sigmoid().detach()
        return torch.stack(hidden), references, torch.stack(locations), torch.stack(weights)


class DeformableTransformer(nn.Module):
    """Encoder + decoder + the two-stage / query heads that live in the official transformer.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation: as
            in the official constructor.
        num_feature_levels: V.
        enc_n_points, dec_n_points: sampling points per head and level.
        two_stage: create ``enc_output`` (+norm) for encoder proposals.
        box_queries: create ``pos_trans`` (+norm), mapping an anchor box to (query_pos, content) as the
            official two-stage does; otherwise ``reference_points`` (Linear D -> 2) for embedding queries.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        box_queries: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.box_queries = box_queries or two_stage
        enc_layer = DeformableEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableDecoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        if self.box_queries:
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: xavier on matrices, MSDeformAttn's own init, level embeddings ~ N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.box_queries:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def encode(
        self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Flatten the levels and run the encoder.

        srcs, pos: V x [B, D, H_v, W_v]; masks: V x [B, H_v, W_v].
        Returns memory [B, S, D], memory_mask [B, S], spatial_shapes [V, 2] long, valid ratios [B, V, 2].
        """
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos)
            ],
            1,
        )
        spatial_shapes = torch.as_tensor(
            [s.shape[-2:] for s in srcs], dtype=torch.long, device=src_flat.device
        )
        ratios = valid_ratios(masks)
        memory = self.encoder(src_flat, spatial_shapes, ratios, pos_flat, mask_flat)
        return memory, mask_flat, spatial_shapes, ratios

    def proposal_memory(self, memory: Tensor, valid: Tensor) -> Tensor:
        """Two-stage: zero invalid tokens, then ``enc_output`` + norm. [B, S, D] -> [B, S, D]."""
        return self.enc_output_norm(self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))

    def box_query(self, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Anchor boxes [B, N, 4] unsigmoided -> (query_pos, content), each [B, N, D] (official two-stage)."""
        emb = self.pos_trans_norm(
            self.pos_trans(proposal_pos_embed(anchors, self.d_model // 2).to(anchors.dtype))
        )
        query_pos, content = emb.split(self.d_model, dim=-1)
        return query_pos, content

    def embed_query(self, query_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedding queries [B, N, 2D] -> (query_pos, content, reference points [B, N, 2]) (official)."""
        query_pos, content = query_embed.split(self.d_model, dim=-1)
        return query_pos, content, self.reference_points(query_pos).sigmoid()
