"""Conditional DETR (Meng et al., ICCV 2021), single-scale, sigmoid-focal head.

Follows Atten4Vis/ConditionalDETR ``models/conditional_detr.py`` and ``models/transformer.py``:

* each learned query is a positional embedding p_q [D]; the content query starts at zero;
* the reference point s = sigmoid(MLP(p_q)) [2] is fixed for all decoder layers;
* the conditional spatial query of layer l is ``sine(s) * T_l`` with T_0 = 1 and T_l = MLP(f_{l-1})
  (``query_scale``), concatenated per head with the content query in the cross-attention
  (see ``ConditionalDecoderLayer``);
* boxes: sigmoid(bbox_embed(f_l) + [inverse_sigmoid(s), 0, 0]); class and box heads are shared by all layers.

Parameter names mirror the official checkpoints (``transformer.decoder.layers.N.ca_qpos_sine_proj`` ...,
``query_embed``, ``input_proj``, ``class_embed``, ``bbox_embed``); the backbone is ``backbone.body`` instead
of ``backbone.0.body``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.models.backbone import Backbone
from kd.models.box_ops import inverse_sigmoid
from kd.models.outputs import DetectorOutput
from kd.models.position_encoding import PositionEmbeddingSine, sine_embed
from kd.models.transformer_layers import (
    MLP,
    SINGLE_SCALE_KEYS,
    ConditionalDecoderLayer,
    TransformerEncoder,
    config_values,
    detector_output,
    encode_single_scale,
    expand_extra_queries,
    group_attention_mask,
    pop_single_scale_backbone,
    split_decoder_output,
    xavier_init_,
)


class ConditionalDecoder(nn.Module):
    """Conditional DETR decoder: fixed 2-d reference points, conditional spatial queries."""

    def __init__(
        self, d_model: int, nhead: int, ffn_dim: int, dropout: float, activation: str, num_layers: int
    ):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, ffn_dim, dropout, activation, cross_query_pos=(i == 0))
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Decode N queries.

        Args:
            tgt: [B, N, D] content queries (zeros); query_pos: [B, N, D] positional queries.
            memory, pos: [B, S, D]; memory_padding_mask: [B, S] bool, True on padding.
            self_attn_mask: [N, N] bool, True = blocked.
            need_weights: also return the cross-attention maps.

        Returns:
            hidden [L, B, N, D] (each layer's output after the shared final LayerNorm), reference points
            [B, N, 2] (normalised x, y), cross-attention [L, B, N, S] or None.
        """
        reference = self.ref_point_head(query_pos).sigmoid()
        sine = sine_embed(reference, self.d_model // 2)
        out = tgt
        hidden, attn = [], []
        for i, layer in enumerate(self.layers):
            query_sine_embed = sine if i == 0 else sine * self.query_scale(out)
            out, weights = layer(
                out,
                memory,
                pos,
                query_pos,
                query_sine_embed,
                memory_padding_mask,
                self_attn_mask,
                need_weights,
            )
            hidden.append(self.norm(out))
            attn.append(weights)
        cross_attn = torch.stack(attn) if need_weights else None
        return torch.stack(hidden), reference, cross_attn


class ConditionalDETR(nn.Module):
    """Conditional DETR detector returning :class:`DetectorOutput`.

    Queries are in ``"embed"`` format: a query is a positional embedding [D] (the rows of ``query_embed``).
    Extra groups given to :meth:`forward` are decoded by the same decoder on the same memory and cannot see
    (or be seen by) the detection queries.

    Args:
        backbone: a :class:`Backbone`; its last (coarsest) feature map is used.
        hidden_dim, nheads, enc_layers, dec_layers, ffn_dim, dropout, activation: transformer sizes
            (official defaults 256, 8, 6, 6, 2048, 0.1, relu).
        num_queries: number of learned detection queries (official 300).
        num_classes: width of the sigmoid classification head.
    """

    query_format = "embed"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        num_queries: int = 300,
        num_classes: int = 91,
        activation: str = "relu",
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer = nn.ModuleDict(
            {
                "encoder": TransformerEncoder(hidden_dim, nheads, ffn_dim, dropout, activation, enc_layers),
                "decoder": ConditionalDecoder(hidden_dim, nheads, ffn_dim, dropout, activation, dec_layers),
            }
        )
        xavier_init_(self.transformer)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    @classmethod
    def from_config(cls, cfg: dict) -> ConditionalDETR:
        """Build from the ``model`` dict of params.yaml (single scale: the last of ``strides``)."""
        v = config_values(
            cfg, {**SINGLE_SCALE_KEYS, "dropout": 0.1, "activation": "relu"}, "conditional_detr"
        )
        return cls(pop_single_scale_backbone(v), **v)

    def native_queries(self) -> Tensor:
        """The learned detection queries [Q, D] in this model's ``"embed"`` format."""
        return self.query_embed.weight

    def forward(
        self,
        images: Tensor,
        mask: Tensor,
        targets: list[dict] | None = None,
        extra_queries: dict[str, Tensor] | None = None,
        return_attention: bool = False,
    ) -> DetectorOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] normalised; mask: [B, H, W] bool, True on padding.
            targets: unused (Conditional DETR has no denoising queries); accepted for a uniform interface.
            extra_queries: {name: [B or 1, M, D]} positional queries decoded as isolated groups.
            return_attention: fill ``cross_attn`` [L, B, Q, S] of every group.

        Returns:
            :class:`DetectorOutput`; ``references`` are the [L, B, Q, 2] reference points (equal across
            layers).
        """
        del targets
        enc = encode_single_scale(
            self.backbone, self.input_proj, self.position_embedding, self.transformer["encoder"], images, mask
        )
        bsz = images.shape[0]
        queries = {"detection": self.query_embed.weight[None].expand(bsz, -1, -1)}
        queries.update(expand_extra_queries(extra_queries, bsz, self.hidden_dim, "conditional_detr"))
        query_pos = torch.cat(list(queries.values()), dim=1).to(enc.memory.dtype)
        sizes = [q.shape[1] for q in queries.values()]
        hidden, reference, cross_attn = self.transformer["decoder"](
            torch.zeros_like(query_pos),
            enc.memory,
            enc.pos,
            query_pos,
            enc.memory_mask,
            group_attention_mask(sizes, images.device),
            return_attention,
        )
        logits = self.class_embed(hidden)
        delta = self.bbox_embed(hidden)
        center = delta[..., :2] + inverse_sigmoid(reference).to(delta.dtype)
        boxes = torch.cat([center, delta[..., 2:]], dim=-1).sigmoid()
        references = reference[None].expand(hidden.shape[0], -1, -1, -1)
        groups = split_decoder_output(logits, boxes, hidden, references, cross_attn, queries)
        return detector_output(enc, groups)
