"""DAB-DETR (Liu et al., ICLR 2022): dynamic anchor boxes as queries, with optional DN-DETR denoising.

Follows IDEA-Research/DAB-DETR ``models/DAB_DETR/DABDETR.py`` and ``transformer.py`` (defaults: PReLU,
dropout 0, position-embedding temperature 20, ``query_scale_type='cond_elewise'``, ``modulate_hw_attn=True``,
``keep_query_pos=False``, box head shared across layers) and IDEA-Research/DN-DETR for the denoising groups:

* a query is an unsigmoided anchor box a = (x, y, w, h) [4] (rows of ``refpoint_embed``); content starts at
  zero (or at the ``num_patterns`` learned pattern embeddings);
* layer l: positional query P = MLP(sine(a_l)) (``ref_point_head``), spatial query
  = sine_xy(a_l) * MLP(f_{l-1}) (``query_scale``, identity at l = 0), modulated by (w_ref / w, h_ref / h)
  with w_ref, h_ref = sigmoid(MLP(f)) (``ref_anchor_head``);
* anchors are refined layer by layer: a_{l+1} = sigmoid(bbox_embed(f_l) + inverse_sigmoid(a_l)), detached
  between layers; the output boxes are sigmoid(bbox_embed(LN(f_l)) + inverse_sigmoid(a_l)), a_l not detached;
* the encoder scales its positional embedding by an MLP of its input at every layer.

Parameter names mirror the official checkpoints (``refpoint_embed``, ``transformer.encoder.query_scale``,
``transformer.decoder.ref_anchor_head`` ...). The official decoder also registers ``bbox_embed`` under
``transformer.decoder.bbox_embed``; here the single shared head is passed to the decoder instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.models.backbone import Backbone
from kd.models.box_ops import inverse_sigmoid
from kd.models.denoising import DNQueries, build_dn_queries
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

# DAB-DETR / DN-DETR / DINO ``util/misc.py`` clamp (Conditional DETR uses 1e-5)
INVERSE_SIGMOID_EPS = 1e-3


class DABDecoder(nn.Module):
    """DAB-DETR decoder: anchor-conditioned queries, w/h-modulated attention, iterative anchor update."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        ffn_dim: int,
        dropout: float,
        activation: str,
        num_layers: int,
        keep_query_pos: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(
                d_model, nhead, ffn_dim, dropout, activation, cross_query_pos=(i == 0 or keep_query_pos)
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)

    def _spatial_query(self, out: Tensor, anchor: Tensor, sine: Tensor, first: bool) -> Tensor:
        """Transformed, w/h-modulated sine embedding of the anchor centre: [B, N, D]."""
        half = self.d_model // 2
        xy = sine[..., : self.d_model] if first else sine[..., : self.d_model] * self.query_scale(out)
        ref_wh = self.ref_anchor_head(out).sigmoid()
        y_scale = (ref_wh[..., 1] / anchor[..., 3]).unsqueeze(-1)
        x_scale = (ref_wh[..., 0] / anchor[..., 2]).unsqueeze(-1)
        return torch.cat([xy[..., :half] * y_scale, xy[..., half:] * x_scale], dim=-1)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        anchors: Tensor,
        bbox_embed: nn.Module,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Decode N anchor queries.

        Args:
            tgt: [B, N, D] content queries; anchors: [B, N, 4] unsigmoided (cx, cy, w, h).
            memory, pos: [B, S, D]; memory_padding_mask: [B, S] bool, True on padding.
            bbox_embed: the box head (shared with the detector output) used for the anchor update.
            self_attn_mask: [N, N] bool, True = blocked.
            need_weights: also return the cross-attention maps.

        Returns:
            hidden [L, B, N, D] (after the shared final LayerNorm), references [L, B, N, 4] (the sigmoid
            anchors each layer took as input; not detached, as in the official output), cross-attention
            [L, B, N, S] or None.
        """
        anchor = anchors.sigmoid()
        references = [anchor]
        out = tgt
        hidden, attn = [], []
        for i, layer in enumerate(self.layers):
            sine = sine_embed(anchor, self.d_model // 2).to(out.dtype)
            query_pos = self.ref_point_head(sine)
            query_sine_embed = self._spatial_query(out, anchor, sine, first=(i == 0))
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
            new_anchor = (bbox_embed(out) + inverse_sigmoid(anchor, INVERSE_SIGMOID_EPS)).sigmoid()
            if i < len(self.layers) - 1:
                references.append(new_anchor)
            anchor = new_anchor.detach()
            hidden.append(self.norm(out))
            attn.append(weights)
        cross_attn = torch.stack(attn) if need_weights else None
        return torch.stack(hidden), torch.stack(references), cross_attn


class DABDETR(nn.Module):
    """DAB-DETR detector returning :class:`DetectorOutput`.

    Queries are in ``"box"`` format: an unsigmoided anchor box [4] (rows of ``refpoint_embed``). Extra groups
    given to :meth:`forward` start from zero content and cannot see (or be seen by) the detection queries. In
    training mode with targets and ``dn_groups > 0`` the DN-DETR denoising queries are decoded jointly with
    the detection queries under the DN attention mask and returned as ``out.denoising`` / ``out.dn_meta``.

    Args:
        backbone: a :class:`Backbone`; its last (coarsest) feature map is used.
        hidden_dim, nheads, enc_layers, dec_layers, ffn_dim, dropout, activation: transformer sizes
            (official defaults 256, 8, 6, 6, 2048, 0.0, prelu).
        num_queries: number of learned anchors (official 300).
        num_classes: width of the sigmoid classification head.
        dn_groups, dn_label_noise, dn_box_noise: DN-DETR denoising groups (0 disables) and noise scales.
        random_refpoints_xy: initialise the anchor centres uniformly in [0, 1] (the official flag; its
            attempt to freeze them is a no-op on a ``.data`` slice, so they train here too).
        num_patterns: number of learned content patterns; each anchor is decoded once per pattern (0 = none).
    """

    query_format = "box"

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.0,
        num_queries: int = 300,
        num_classes: int = 91,
        activation: str = "prelu",
        dn_groups: int = 0,
        dn_label_noise: float = 0.2,
        dn_box_noise: float = 0.4,
        random_refpoints_xy: bool = False,
        num_patterns: int = 0,
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_patterns = num_patterns
        self.dn_groups = dn_groups
        self.dn_label_noise = dn_label_noise
        self.dn_box_noise = dn_box_noise
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, temperature=20.0)
        transformer = {
            "encoder": TransformerEncoder(
                hidden_dim, nheads, ffn_dim, dropout, activation, enc_layers, scale_pos=True
            ),
            "decoder": DABDecoder(hidden_dim, nheads, ffn_dim, dropout, activation, dec_layers),
        }
        if num_patterns > 0:
            transformer["patterns"] = nn.Embedding(num_patterns, hidden_dim)
        self.transformer = nn.ModuleDict(transformer)
        xavier_init_(self.transformer)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        if random_refpoints_xy:
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])
        # DN-DETR label encoder; index num_classes is the "unknown" label
        self.label_embed = nn.Embedding(num_classes + 1, hidden_dim) if dn_groups > 0 else None
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0.0)

    @classmethod
    def from_config(cls, cfg: dict) -> DABDETR:
        """Build from the ``model`` dict of params.yaml (single scale: the last of ``strides``)."""
        v = config_values(
            cfg,
            {
                **SINGLE_SCALE_KEYS,
                "dropout": 0.0,
                "activation": "prelu",
                "dn_groups": 0,
                "dn_label_noise": 0.2,
                "dn_box_noise": 0.4,
                "random_refpoints_xy": False,
                "num_patterns": 0,
            },
            "dab_detr",
        )
        return cls(pop_single_scale_backbone(v), **v)

    def native_queries(self) -> Tensor:
        """The learned anchors [Q, 4] (unsigmoided cx, cy, w, h), this model's ``"box"`` query format."""
        return self.refpoint_embed.weight

    def _detection_queries(self, bsz: int) -> tuple[Tensor, Tensor]:
        """Anchors [B, Q*P, 4] and contents [B, Q*P, D] of the detection queries, P = max(num_patterns, 1)."""
        anchors = self.refpoint_embed.weight
        if self.num_patterns == 0:
            content = anchors.new_zeros(anchors.shape[0], self.hidden_dim)
        else:
            patterns = self.transformer["patterns"].weight
            content = patterns.repeat_interleave(anchors.shape[0], dim=0)
            anchors = anchors.repeat(self.num_patterns, 1)
        return anchors[None].expand(bsz, -1, -1), content[None].expand(bsz, -1, -1)

    def _denoising_queries(self, targets: list[dict] | None, num_det: int) -> DNQueries | None:
        """DN-DETR noised ground-truth queries, or None outside training / without targets or groups."""
        if not (self.training and targets is not None and self.dn_groups > 0):
            return None
        return build_dn_queries(
            targets,
            self.num_classes,
            self.dn_groups,
            self.dn_label_noise,
            self.dn_box_noise,
            self.label_embed,
            num_det,
        )

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
            targets: ground truth (see the package conventions); used only for denoising in training mode.
            extra_queries: {name: [B or 1, M, 4]} unsigmoided anchors decoded as isolated groups.
            return_attention: fill ``cross_attn`` [L, B, Q, S] of every group.

        Returns:
            :class:`DetectorOutput`; ``references`` are the [L, B, Q, 4] anchors each layer took as input.
        """
        enc = encode_single_scale(
            self.backbone, self.input_proj, self.position_embedding, self.transformer["encoder"], images, mask
        )
        bsz = images.shape[0]
        det_anchors, det_content = self._detection_queries(bsz)
        dn = self._denoising_queries(targets, det_anchors.shape[1])
        queries, contents = {}, []
        if dn is not None:
            queries["denoising"] = dn.anchors
            contents.append(dn.content)
        queries["detection"] = det_anchors
        contents.append(det_content)
        for name, q in expand_extra_queries(extra_queries, bsz, 4, "dab_detr").items():
            queries[name] = q
            contents.append(q.new_zeros(*q.shape[:2], self.hidden_dim))
        sizes = [q.shape[1] for q in queries.values()]
        if dn is not None:  # the DN mask covers [denoising, detection]
            sizes = [sizes[0] + sizes[1], *sizes[2:]]
        self_attn_mask = group_attention_mask(sizes, images.device, None if dn is None else dn.attn_mask)
        hidden, references, cross_attn = self.transformer["decoder"](
            torch.cat(contents, dim=1).to(enc.memory.dtype),
            enc.memory,
            enc.pos,
            torch.cat(list(queries.values()), dim=1),
            self.bbox_embed,
            enc.memory_mask,
            self_attn_mask,
            return_attention,
        )
        logits = self.class_embed(hidden)
        boxes = (self.bbox_embed(hidden) + inverse_sigmoid(references, INVERSE_SIGMOID_EPS)).sigmoid()
        groups = split_decoder_output(logits, boxes, hidden, references, cross_attn, queries)
        return detector_output(enc, groups, dn_meta=None if dn is None else dn.meta)
