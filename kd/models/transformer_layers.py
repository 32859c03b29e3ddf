"""Transformer pieces shared by Conditional DETR and DAB-DETR (single-scale, dense attention).

Follows Atten4Vis/ConditionalDETR ``models/transformer.py`` / ``models/attention.py`` and
IDEA-Research/DAB-DETR ``models/DAB_DETR/transformer.py``, batch-first. Parameter names match the official
code (``sa_qcontent_proj``, ``ca_qpos_sine_proj``, ``cross_attn.out_proj``, ``linear1``, ``norm3`` ...) so
official checkpoints map onto these modules by prefix only.

Attention runs through ``F.scaled_dot_product_attention`` (:func:`sdpa`: in fp32 under CPU bf16 autocast)
unless the weights are requested; then an explicit ``softmax(QK^T / sqrt(d))`` returns the head-averaged map
(for visualisation and feature distillation). :func:`multihead_attention` runs an ``nn.MultiheadAttention``'s
own parameters through the same path (the deformable decoder's and the DETR encoder's self-attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.outputs import DecoderOutput, DetectorOutput

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "prelu": nn.PReLU, "selu": nn.SELU}


def build_activation(name: str) -> nn.Module:
    """The FFN activation as a module (PReLU has one learned slope per layer, as in DAB-DETR)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {name!r}")
    return _ACTIVATIONS[name]()


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform init of every parameter with more than one dimension (``_reset_parameters``)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's ``MLP``): [..., in] -> [..., out]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out, strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _blocked(key_padding_mask: Tensor | None, attn_mask: Tensor | None) -> Tensor | None:
    """Merge masks into one bool tensor broadcastable to [B, H, Lq, S]; True = may not attend."""
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        blocked = attn_mask[None, None] if blocked is None else blocked | attn_mask[None, None]
    return blocked


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention`` ([B, H, L, d] inputs), in float32 on the CPU for bf16 inputs or
    under bf16 autocast.

    Under CPU bf16 autocast the projections hand bf16 q/k/v to SDPA, whose CPU flash kernel is 3-7x slower in
    bf16 than in fp32 at DETR's sizes (tens to hundreds of tokens, 8-32 channels per head;
    ``bench/attention_bf16.py``); fp32 is also the more accurate choice for the softmax. The output is cast
    back to the input dtype.
    """
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):  # autocast would cast fp32 inputs back to bf16
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p
            )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Multi-head attention without input projections (the official ``attention.py`` semantics).

    Args:
        q: [B, Lq, E]; k: [B, S, E]; v: [B, S, Ev]. E and Ev are split into ``num_heads`` heads each; the
            logits are scaled by (E / num_heads) ** -0.5.
        key_padding_mask: [B, S] bool, True on keys to ignore (padding).
        attn_mask: [Lq, S] bool, True where query i may not attend to key j.
        dropout: dropout on the attention probabilities (applied only when > 0; pass 0 in eval mode).
        need_weights: also return the head-averaged attention probabilities.

    Returns:
        output [B, Lq, Ev] and weights [B, Lq, S] (before dropout) or None.
    """
    b, lq, _ = q.shape
    s = k.shape[1]
    q = q.reshape(b, lq, num_heads, -1).transpose(1, 2)
    k = k.reshape(b, s, num_heads, -1).transpose(1, 2)
    v = v.reshape(b, s, num_heads, -1).transpose(1, 2)
    blocked = _blocked(key_padding_mask, attn_mask)
    if not need_weights:
        allowed = None if blocked is None else ~blocked
        out = sdpa(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return out.transpose(1, 2).reshape(b, lq, -1), None
    logits = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    probs = logits.softmax(dim=-1)
    attn = F.dropout(probs, dropout) if dropout > 0 else probs
    out = torch.matmul(attn.to(v.dtype), v)
    return out.transpose(1, 2).reshape(b, lq, -1), probs.mean(dim=1)


def multihead_attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """``mha(query, key, value, need_weights=False)[0]`` of a batch-first ``nn.MultiheadAttention`` (packed
    in-projection with bias), computed from its own parameters through :func:`dot_product_attention`, so
    state dicts are unchanged and the attention products run in fp32 under CPU bf16 autocast (:func:`sdpa`).

    query: [B, Lq, E]; key, value: [B, S, E]; masks as in :func:`dot_product_attention` (bool, True =
    blocked). Returns [B, Lq, E].
    """
    e = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if query is key:  # self-attention: one matmul for q and k
        q, k = F.linear(query, w[: 2 * e], b[: 2 * e]).chunk(2, dim=-1)
    else:
        q, k = F.linear(query, w[:e], b[:e]), F.linear(key, w[e : 2 * e], b[e : 2 * e])
    v = F.linear(value, w[2 * e :], b[2 * e :])
    dropout = mha.dropout if mha.training else 0.0
    out, _ = dot_product_attention(q, k, v, mha.num_heads, key_padding_mask, attn_mask, dropout)
    return mha.out_proj(out)


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention whose q/k/v projections live outside (Conditional DETR ``MultiheadAttention``).

    Query/key width ``embed_dim`` may differ from value width ``vdim`` (the cross-attention concatenates
    content and position per head, so its q/k are 2·D wide while v stays D). Only ``out_proj`` is learned.
    """

    def __init__(self, embed_dim: int, num_heads: int, vdim: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads or vdim % num_heads:
            raise ValueError(f"attention widths {embed_dim}, {vdim} must be divisible by nheads={num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """q [B,Lq,E], k [B,S,E], v [B,S,Ev] -> (output [B,Lq,Ev], head-averaged weights [B,Lq,S] or None)."""
        p = self.dropout if self.training else 0.0
        out, weights = dot_product_attention(
            q, k, v, self.num_heads, key_padding_mask, attn_mask, p, need_weights
        )
        return self.out_proj(out), weights


class EncoderLayer(nn.Module):
    """DETR post-norm encoder layer: self-attention with q = k = src + pos, v = src, then the FFN."""

    def __init__(self, d_model: int, nhead: int, ffn_dim: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """src, pos: [B, S, D]; key_padding_mask: [B, S] bool (True on padding) -> [B, S, D]."""
        q = src + pos
        src2 = multihead_attention(self.self_attn, q, q, src, key_padding_mask=key_padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer`.

    With ``scale_pos`` (DAB-DETR) every layer sees ``pos * query_scale(src)``, an MLP-predicted element-wise
    scaling of the positional embedding (DAB-DETR ``TransformerEncoder``); otherwise ``pos`` as is (DETR).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        ffn_dim: int,
        dropout: float,
        activation: str,
        num_layers: int,
        scale_pos: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, ffn_dim, dropout, activation) for _ in range(num_layers)
        )
        self.query_scale = MLP(d_model, d_model, d_model, 2) if scale_pos else None

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """src, pos: [B, S, D]; key_padding_mask: [B, S] -> memory [B, S, D]."""
        out = src
        for layer in self.layers:
            layer_pos = pos if self.query_scale is None else pos * self.query_scale(out)
            out = layer(out, layer_pos, key_padding_mask)
        return out


class ConditionalDecoderLayer(nn.Module):
    """Conditional DETR / DAB-DETR decoder layer (post-norm).

    Self-attention: q = Wqc·c + Wqp·p, k = Wkc·c + Wkp·p, v = Wv·c over the queries (c content, p query_pos).
    Cross-attention (conditional spatial query): per head, q = [Wqc·c (+ Wqp·p) ; Wsine·s] and
    k = [Wkc·m (+ Wkp·pos) ; Wkp·pos] are concatenated, so the logits are content·content + spatial·spatial
    (s is the transformed sine embedding of the reference point/anchor). The ``+ Wqp·p`` / ``+ Wkp·pos`` terms
    are used only when ``cross_query_pos`` (the first layer; ``ca_qpos_proj`` is absent elsewhere, as in the
    official code where it is set to None).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        ffn_dim: int,
        dropout: float,
        activation: str,
        cross_query_pos: bool,
    ):
        super().__init__()
        self.nhead = nhead
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectionFreeAttention(d_model, nhead, vdim=d_model, dropout=dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if cross_query_pos else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ProjectionFreeAttention(2 * d_model, nhead, vdim=d_model, dropout=dropout)

        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def _interleave_heads(self, a: Tensor, b: Tensor) -> Tensor:
        """[B, N, D] x 2 -> [B, N, 2D], head h = [a_h ; b_h] (the official view/cat/view)."""
        bsz, n, d = a.shape
        heads = torch.cat([a.view(bsz, n, self.nhead, -1), b.view(bsz, n, self.nhead, -1)], dim=-1)
        return heads.view(bsz, n, 2 * d)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        query_sine_embed: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """One decoder layer.

        Args:
            tgt: [B, N, D] content queries; query_pos: [B, N, D] positional queries.
            memory, pos: [B, S, D] encoder output and its sine position embedding.
            query_sine_embed: [B, N, D] transformed sine embedding of the reference point / anchor.
            memory_padding_mask: [B, S] bool, True on padding.
            self_attn_mask: [N, N] bool, True where query i may not attend to query j (isolated groups, DN).
            need_weights: return the head-averaged cross-attention [B, N, S].

        Returns:
            (tgt [B, N, D], cross-attention [B, N, S] or None)
        """
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt2 = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=self_attn_mask)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = self._interleave_heads(q, self.ca_qpos_sine_proj(query_sine_embed))
        k = self._interleave_heads(k, k_pos)
        tgt2, weights = self.cross_attn(
            q, k, self.ca_v_proj(memory), key_padding_mask=memory_padding_mask, need_weights=need_weights
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))

        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2)), weights


def group_attention_mask(
    sizes: list[int], device: torch.device, first_block: Tensor | None = None
) -> Tensor | None:
    """Self-attention mask that isolates query groups decoded in one pass (True = blocked).

    Decoding groups jointly under this block-diagonal mask gives the same result as separate decoder passes
    (KD-DETR's ``KDTransformer``): no group sees another, while the memory projections are computed once.

    Args:
        sizes: number of queries of each group, in decoding order.
        first_block: optional [sizes[0], sizes[0]] bool mask for the first group (e.g. the DN-DETR mask over
            [denoising, detection] queries); the other groups see only themselves.

    Returns:
        [N, N] bool with N = sum(sizes), or None when there is a single group without a mask.
    """
    if len(sizes) == 1:
        return first_block
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    mask = ids[:, None] != ids[None, :]
    if first_block is not None:
        mask[: sizes[0], : sizes[0]] = first_block
    return mask


def expand_extra_queries(
    extra_queries: dict[str, Tensor] | None, batch_size: int, width: int, model: str
) -> dict[str, Tensor]:
    """Check extra query groups {name: [B or 1, M, width]} and expand them to [B, M, width]."""
    out = {}
    for name, q in (extra_queries or {}).items():
        if name in ("detection", "denoising"):
            raise ValueError(f"{model}: extra query group name {name!r} is reserved")
        if q.dim() != 3 or q.shape[0] not in (1, batch_size) or q.shape[2] != width:
            raise ValueError(
                f"{model}: extra_queries[{name!r}] must be [{batch_size} or 1, M, {width}]; "
                f"got {tuple(q.shape)}"
            )
        out[name] = q.expand(batch_size, -1, -1)
    return out


@dataclass
class EncodedImages:
    """Single-scale encoder result (flattened over the H x W tokens)."""

    memory: Tensor  # [B, S, D] encoder output
    pos: Tensor  # [B, S, D] sine position embedding of the tokens
    memory_mask: Tensor  # [B, S] bool, True on padding
    feature: Tensor  # [B, D, H, W] projected encoder input
    feature_mask: Tensor  # [B, H, W] bool


def encode_single_scale(
    backbone: nn.Module,
    input_proj: nn.Module,
    position_embedding: nn.Module,
    encoder: TransformerEncoder,
    images: Tensor,
    mask: Tensor,
) -> EncodedImages:
    """Backbone -> last (coarsest) feature map -> 1x1 projection -> sine positions -> encoder.

    images: [B, 3, H, W]; mask: [B, H, W] bool, True on padding.
    """
    feat, feat_mask = backbone(images, mask)[-1]
    src = input_proj(feat)
    pos = position_embedding(feat_mask).to(src.dtype)
    src_flat = src.flatten(2).transpose(1, 2)
    pos_flat = pos.flatten(2).transpose(1, 2)
    mask_flat = feat_mask.flatten(1)
    memory = encoder(src_flat, pos_flat, mask_flat)
    return EncodedImages(memory, pos_flat, mask_flat, src, feat_mask)


def split_decoder_output(
    logits: Tensor,
    boxes: Tensor,
    hidden: Tensor,
    references: Tensor,
    cross_attn: Tensor | None,
    queries: dict[str, Tensor],
) -> dict[str, DecoderOutput]:
    """Cut jointly decoded tensors [L, B, N, ...] into one :class:`DecoderOutput` per query group.

    ``queries`` maps each group name, in decoding order, to the queries [B, M, K] it was decoded from.
    """
    sizes = [q.shape[1] for q in queries.values()]
    parts = [
        torch.split(t, sizes, dim=2) if t is not None else [None] * len(sizes)
        for t in (logits, boxes, hidden, references, cross_attn)
    ]
    return {
        name: DecoderOutput(logits=lg, boxes=bx, hidden=hd, references=rf, queries=q, cross_attn=ca)
        for name, q, lg, bx, hd, rf, ca in zip(queries, queries.values(), *parts, strict=True)
    }


def detector_output(
    enc: EncodedImages,
    groups: dict[str, DecoderOutput],
    dn_meta: dict | None = None,
) -> DetectorOutput:
    """Assemble the :class:`DetectorOutput` from the encoder result and the decoded groups."""
    groups = dict(groups)
    h, w = enc.feature.shape[-2:]
    return DetectorOutput(
        detection=groups.pop("detection"),
        memory=enc.memory,
        memory_mask=enc.memory_mask,
        spatial_shapes=torch.tensor([[h, w]], dtype=torch.long, device=enc.memory.device),
        features=[enc.feature],
        feature_masks=[enc.feature_mask],
        denoising=groups.pop("denoising", None),
        dn_meta=dn_meta,
        extra=groups,
    )


# keys every single-scale DETR reads from the ``model`` config; ``...`` marks a required key
SINGLE_SCALE_KEYS = {
    "backbone": "resnet18",
    "backbone_weights": None,
    "backbone_norm": "auto",
    "backbone_trainable_layers": None,
    "strides": [32],
    "hidden_dim": ...,
    "nheads": ...,
    "enc_layers": ...,
    "dec_layers": ...,
    "ffn_dim": ...,
    "num_queries": ...,
    "num_classes": ...,
}


def pop_single_scale_backbone(values: dict):
    """Remove the backbone keys from ``config_values`` output and build the backbone at the last stride."""
    from kd.models.backbone import Backbone

    return Backbone(
        values.pop("backbone"),
        (values.pop("strides")[-1],),
        values.pop("backbone_weights"),
        values.pop("backbone_norm"),
        trainable_layers=values.pop("backbone_trainable_layers"),
    )


def config_values(cfg: dict, defaults: dict, model: str) -> dict:
    """Read ``defaults``' keys from a ``model`` config dict (params.yaml), using the default where absent.

    Keys whose default is ``...`` are required.
    """
    missing = [k for k, v in defaults.items() if v is ... and k not in cfg]
    if missing:
        raise ValueError(f"{model}: model config is missing {missing}")
    return {k: cfg.get(k, v) for k, v in defaults.items()}
