"""Deformable DETR (Zhu et al., ICLR 2021): multi-scale deformable encoder/decoder, box refinement, two-stage.

Follows fundamentalvision/Deformable-DETR ``models/deformable_detr.py`` (heads, initialisation, parameter
names). With ``two_stage=False`` and ``dn_groups=0`` this is the plain official model: learned query
embeddings ``[Q, 2D]`` split into (query_pos, content), 2-d reference points from a linear layer.

Queries in "box" format. In two-stage mode (the encoder's top-k proposals) and in denoising mode (DN-DETR
groups need queries that are boxes) every query is an anchor box: the official two-stage ``pos_trans``
maps its sine embedding to (query_pos, content); denoising queries take their content from a label
embedding instead. Without two-stage the detection anchors are learned (``refpoint_embed``, as DAB/DN-DETR).

Query groups share one decoder pass: ``[denoising | detection | one-to-many | extra groups...]`` with a
self-attention mask that isolates every group from the others (the denoising groups may not be seen by the
detection queries, DN-DETR), so an extra group never changes the detection outputs (cross-attention is per
query).

Hybrid matching (H-DETR, Jia et al. CVPR 2023, two-stage variant of ``HDETR/models/deformable_detr.py``):
with ``one2many_queries = M > 0`` the training forward keeps the top ``Q + M`` encoder proposals; the first
Q are the detection queries, the next M an isolated one-to-many group (``out.one2many``) that the criterion
matches against the ground truth repeated k times. More positives per image speed up training; evaluation
uses the Q one-to-one queries only, so inference is unchanged.

Two of DINO's convergence aids (Zhang et al., ICLR 2023, IDEA-Research/DINO ``deformable_transformer.py``),
both off by default. *Look forward twice* (``look_forward_twice``, needs ``box_refine``): layer l's box is
predicted from layer l-1's refined box *before* it is detached, so layer l's box loss also trains layer
l-1 (the reference that enters layer l is still detached; forward values are unchanged). *Mixed query
selection* (``mixed_query_selection``, needs ``two_stage``): the top-k proposals give the detection queries
their anchors and positional embeddings, while their content embeddings are learned (static) instead of
projected from the proposal boxes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.backbone import Backbone
from kd.models.box_ops import inverse_sigmoid
from kd.models.deformable_transformer import DeformableTransformer, encoder_proposals
from kd.models.denoising import DNQueries, build_dn_queries, split_dn
from kd.models.outputs import DecoderOutput, DetectorOutput
from kd.models.position_encoding import PositionEmbeddingSine
from kd.models.transformer_layers import MLP


def _refine(delta: Tensor, reference: Tensor) -> Tensor:
    """Unsigmoided box [B, N, 4]: a head's delta [B, N, 4] added to a sigmoided reference [B, N, 2|4]
    (a 2-d reference point moves the centre; the head predicts the size)."""
    ref = inverse_sigmoid(reference)
    if ref.shape[-1] == 4:
        return delta + ref
    return torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)


@dataclass
class _QueryGroup:
    """Decoder inputs of one query group (N queries)."""

    content: Tensor  # [B, N, D]
    pos: Tensor  # [B, N, D]
    reference: Tensor  # [B, N, 2|4] sigmoided, normalised to the unpadded image
    queries: Tensor  # [B, N, K] the group's queries in the model's format

    @property
    def size(self) -> int:
        return self.content.shape[1]


class DeformableDETR(nn.Module):
    """Deformable DETR with optional iterative box refinement, two-stage and denoising groups.

    Args:
        backbone: multi-scale backbone (``strides``, ``num_channels``; returns (feature, mask) per stride).
        hidden_dim: D. nheads: attention heads. enc_layers, dec_layers: layer counts. ffn_dim: FFN width.
        dropout: dropout everywhere in the transformer.
        num_queries: Q detection queries (two-stage: number of proposals kept).
        num_classes: C (sigmoid focal classification, no background class).
        extra_levels: extra stride-2 3x3 conv levels on top of the last backbone level (official: 1 with
            three backbone levels); ``num_feature_levels = len(backbone.strides) + extra_levels``.
        enc_points, dec_points: sampling points per head and level in the encoder / decoder.
        two_stage: queries are the top-k encoder proposals.
        box_refine: every decoder layer refines the boxes of the previous one (own heads per layer).
        dn_groups, dn_label_noise, dn_box_noise: DN-DETR denoising groups used in training (0 disables).
        activation: FFN activation, relu | gelu.
        one2many_queries: M extra proposals decoded in training as H-DETR's one-to-many group (0 disables;
            needs ``two_stage``).
        look_forward_twice: DINO's look forward twice (needs ``box_refine``).
        mixed_query_selection: DINO's mixed query selection, learned content queries (needs ``two_stage``).
    """

    def __init__(
        self,
        backbone: Backbone,
        hidden_dim: int = 256,
        nheads: int = 8,
        enc_layers: int = 6,
        dec_layers: int = 6,
        ffn_dim: int = 1024,
        dropout: float = 0.1,
        num_queries: int = 300,
        num_classes: int = 91,
        extra_levels: int = 0,
        enc_points: int = 4,
        dec_points: int = 4,
        two_stage: bool = False,
        box_refine: bool = False,
        dn_groups: int = 0,
        dn_label_noise: float = 0.5,
        dn_box_noise: float = 0.4,
        activation: str = "relu",
        one2many_queries: int = 0,
        look_forward_twice: bool = False,
        mixed_query_selection: bool = False,
    ):
        super().__init__()
        if one2many_queries and not two_stage:
            raise ValueError("deformable_detr: one2many_queries > 0 needs two_stage (H-DETR's two-stage way)")
        if look_forward_twice and not box_refine:
            raise ValueError("deformable_detr: look_forward_twice needs box_refine (it chains refined boxes)")
        if mixed_query_selection and not two_stage:
            raise ValueError("deformable_detr: mixed_query_selection needs two_stage (it selects proposals)")
        if hidden_dim % nheads or hidden_dim % 2:
            raise ValueError(
                f"deformable_detr: hidden_dim {hidden_dim} must be even and divisible by nheads {nheads}"
            )
        self.backbone = backbone
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.num_feature_levels = len(backbone.strides) + extra_levels
        self.two_stage = two_stage
        self.one2many_queries = one2many_queries
        self.box_refine = box_refine
        self.look_forward_twice = look_forward_twice
        self.mixed_query_selection = mixed_query_selection
        self.dn_groups = dn_groups
        self.dn_label_noise = dn_label_noise
        self.dn_box_noise = dn_box_noise
        self.query_format = "box" if (two_stage or dn_groups > 0) else "embed"
        self.transformer = DeformableTransformer(
            hidden_dim, nheads, enc_layers, dec_layers, ffn_dim, dropout, activation, self.num_feature_levels,
            enc_points, dec_points, two_stage, box_queries=self.query_format == "box",
        )  # fmt: skip
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, offset=-0.5)
        self.input_proj = self._input_projections(backbone.num_channels, hidden_dim, extra_levels)
        if self.query_format == "embed":
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        elif not two_stage:
            self.refpoint_embed = nn.Embedding(num_queries, 4)
            with torch.no_grad():  # DAB-DETR random_refpoints_xy: centres uniform over the image
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(torch.rand(num_queries, 2))
        if mixed_query_selection:  # DINO's tgt_embed: one learned content vector per selected proposal
            self.tgt_embed = nn.Embedding(num_queries + one2many_queries, hidden_dim)
            nn.init.normal_(self.tgt_embed.weight)
        if dn_groups > 0:
            self.label_enc = nn.Embedding(num_classes, hidden_dim)
        self._build_heads(hidden_dim, num_classes, dec_layers)

    @staticmethod
    def _input_projections(in_channels: list[int], hidden_dim: int, extra_levels: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level, then stride-2 3x3 conv + GroupNorm per extra level."""
        groups = math.gcd(32, hidden_dim)
        projs = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(groups, hidden_dim)) for c in in_channels
        ]
        channels = in_channels[-1]
        for _ in range(extra_levels):
            projs.append(
                nn.Sequential(
                    nn.Conv2d(channels, hidden_dim, 3, stride=2, padding=1), nn.GroupNorm(groups, hidden_dim)
                )
            )
            channels = hidden_dim
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return nn.ModuleList(projs)

    def _build_heads(self, hidden_dim: int, num_classes: int, dec_layers: int) -> None:
        """Class/box heads per decoder layer (+1 for the two-stage proposals), official init and sharing."""
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior 0.01
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_pred = dec_layers + 1 if self.two_stage else dec_layers
        if self.box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if self.query_format == "box":  # box references: the heads predict deltas, not sizes from scratch
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    @classmethod
    def from_config(cls, cfg: dict) -> DeformableDETR:
        """Build from the ``model`` section of params.yaml (keys for other architectures are ignored)."""
        if cfg.get("arch", "deformable_detr") != "deformable_detr":
            raise ValueError(f"model.arch: expected deformable_detr, got {cfg.get('arch')!r}")
        backbone = Backbone(
            cfg.get("backbone", "resnet50"),
            tuple(cfg.get("strides", (8, 16, 32))),
            cfg.get("backbone_weights"),
            cfg.get("backbone_norm", "auto"),
            trainable_layers=cfg.get("backbone_trainable_layers"),
        )
        keys = (
            "hidden_dim", "nheads", "enc_layers", "dec_layers", "ffn_dim", "dropout", "num_queries",
            "num_classes", "extra_levels", "enc_points", "dec_points", "two_stage", "box_refine", "dn_groups",
            "dn_label_noise", "dn_box_noise", "activation", "one2many_queries", "look_forward_twice",
            "mixed_query_selection",
        )  # fmt: skip
        return cls(backbone, **{k: cfg[k] for k in keys if k in cfg})

    def native_queries(self) -> Tensor | None:
        """The learned detection queries in ``query_format``: [Q, 2D] embeddings, [Q, 4] unsigmoided anchors,
        or None in two-stage mode (queries depend on the image; see ``out.detection.queries``)."""
        if self.query_format == "embed":
            return self.query_embed.weight
        return None if self.two_stage else self.refpoint_embed.weight

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        images: Tensor,
        mask: Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        extra_queries: dict[str, Tensor] | None = None,
        return_attention: bool = False,
    ) -> DetectorOutput:
        """Detect objects.

        Args:
            images: [B, 3, H, W] normalised; mask: [B, H, W] bool, True on padding.
            targets: ground truth (only used for the denoising groups, in training mode).
            extra_queries: {name: [B or 1, M, 4] unsigmoided anchors ("box" format) or [B or 1, M, 2D]
                embeddings ("embed" format)}; each group is decoded isolated from all other queries.
            return_attention: fill ``sampling_locations`` / ``attention_weights`` of every group.
        """
        srcs, masks = self.project_features(images, mask)
        return self.forward_features(srcs, masks, targets, extra_queries, return_attention)

    def project_features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone + input projections: V x [B, D, H_v, W_v] encoder inputs and V x [B, H_v, W_v] masks."""
        feats = self.backbone(images, mask)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, feats, strict=False)]
        masks = [m for _, m in feats]
        for lvl in range(len(feats), self.num_feature_levels):
            srcs.append(self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1]))
            masks.append(F.interpolate(mask[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0])
        return srcs, masks

    def forward_features(
        self,
        srcs: list[Tensor],
        masks: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
        extra_queries: dict[str, Tensor] | None = None,
        return_attention: bool = False,
    ) -> DetectorOutput:
        """Transformer and heads on projected features (see :meth:`forward`; srcs/masks as returned by
        :meth:`project_features`)."""
        b = srcs[0].shape[0]
        extra = {name: self._query_group(q, b, name) for name, q in (extra_queries or {}).items()}
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks, strict=True)]
        memory, memory_mask, spatial_shapes, ratios = self.transformer.encode(srcs, masks, pos)
        proposals, one2many = None, []
        if self.two_stage:
            m = self.one2many_queries if self.training else 0
            proposals, anchors = self._proposals(memory, memory_mask, spatial_shapes, self.num_queries + m)
            q = self.num_queries
            content = None
            if self.mixed_query_selection:  # DINO: learned content, positions from the proposals
                content = self.tgt_embed.weight[None, : q + m].expand(b, -1, -1)
            det = self._box_group(anchors[:, :q], None if content is None else content[:, :q])
            if m:
                one2many = [self._box_group(anchors[:, q:], None if content is None else content[:, q:])]
        else:
            det = self._query_group(self.native_queries()[None], b)
        dn = None
        if self.training and targets is not None and self.dn_groups > 0:
            dn = build_dn_queries(
                targets, self.num_classes, self.dn_groups, self.dn_label_noise, self.dn_box_noise,
                self.label_enc, self.num_queries,
            )  # fmt: skip
        groups = [det] if dn is None else [self._dn_group(dn), det]
        outs = self._decode(
            [*groups, *one2many, *extra.values()], memory, memory_mask, spatial_shapes, ratios, dn,
            return_attention,
        )  # fmt: skip
        if dn is not None:
            dn_out, det_out = self._split_dn(outs[0], dn.meta)
            outs = [det_out, *outs[1:]]
        one2many_out = outs.pop(1) if one2many else None
        return DetectorOutput(
            detection=outs[0],
            memory=memory,
            memory_mask=memory_mask,
            spatial_shapes=spatial_shapes,
            features=srcs,
            feature_masks=masks,
            extra=dict(zip(extra, outs[1:], strict=True)),
            denoising=dn_out if dn is not None else None,
            dn_meta=dn.meta if dn is not None else None,
            proposals=proposals,
            one2many=one2many_out,
        )

    # ------------------------------------------------------------------ queries

    def _proposals(
        self, memory: Tensor, memory_mask: Tensor, spatial_shapes: Tensor, k: int
    ) -> tuple[dict, Tensor]:
        """Two-stage: score every memory token with the extra heads, keep the top-k as anchors.

        Returns ({"logits" [B, S, C], "boxes" [B, S, 4], "valid" [B, S] bool}, anchors [B, k, 4] detached
        unsigmoided, best first). As official, ranking uses class 0 (the criterion trains proposals
        class-agnostic); padded and out-of-range tokens are ranked last.
        """
        if memory.shape[1] < k:
            what = "num_queries + one2many_queries" if k > self.num_queries else "num_queries"
            raise ValueError(
                f"deformable_detr: {memory.shape[1]} memory tokens < {k} queries ({what}); use larger images "
                "or fewer queries"
            )
        base, valid = encoder_proposals(memory_mask, spatial_shapes)
        out_memory = self.transformer.proposal_memory(memory, valid)
        lid = self.transformer.decoder.num_layers
        logits = self.class_embed[lid](out_memory)
        coords = self.bbox_embed[lid](out_memory) + base
        score = logits[..., 0].detach().float().masked_fill(~valid, float("-inf"))
        idx = score.topk(k, dim=1).indices
        anchors = coords.gather(1, idx[..., None].expand(-1, -1, 4)).detach()
        return {"logits": logits, "boxes": coords.sigmoid(), "valid": valid}, anchors

    def _box_group(self, anchors: Tensor, content: Tensor | None = None) -> _QueryGroup:
        """Anchor boxes [B, N, 4] (unsigmoided) -> decoder inputs; ``content`` overrides pos_trans's."""
        query_pos, box_content = self.transformer.box_query(anchors)
        return _QueryGroup(box_content if content is None else content, query_pos, anchors.sigmoid(), anchors)

    def _dn_group(self, dn: DNQueries) -> _QueryGroup:
        return self._box_group(dn.anchors, dn.content)

    def _query_group(self, queries: Tensor, batch: int, name: str = "detection") -> _QueryGroup:
        """Queries [B or 1, N, K] in ``query_format`` -> decoder inputs for B images."""
        k = 4 if self.query_format == "box" else 2 * self.hidden_dim
        if queries.dim() != 3 or queries.shape[0] not in (1, batch) or queries.shape[-1] != k:
            raise ValueError(
                f"deformable_detr: queries {name!r} must be [{batch} or 1, N, {k}] ({self.query_format}), "
                f"got {list(queries.shape)}"
            )
        queries = queries.expand(batch, -1, -1)
        if self.query_format == "box":
            return self._box_group(queries)
        query_pos, content, reference = self.transformer.embed_query(queries)
        return _QueryGroup(content, query_pos, reference, queries)

    # ------------------------------------------------------------------ decoding

    @staticmethod
    def _attn_mask(groups: list[_QueryGroup], dn: DNQueries | None, device: torch.device) -> Tensor | None:
        """Block-diagonal self-attention mask [N, N] (True = blocked); DN's own mask on its block."""
        if dn is None and len(groups) == 1:
            return None
        sizes = [g.size for g in groups]
        total = sum(sizes)
        mask = torch.ones(total, total, dtype=torch.bool, device=device)
        first = 1 if dn is None else 2  # [dn | det] form the first block
        start = sum(sizes[:first])
        mask[:start, :start] = False if dn is None else dn.attn_mask
        for size in sizes[first:]:
            mask[start : start + size, start : start + size] = False
            start += size
        return mask

    def _decode(
        self,
        groups: list[_QueryGroup],
        memory: Tensor,
        memory_mask: Tensor,
        spatial_shapes: Tensor,
        ratios: Tensor,
        dn: DNQueries | None,
        return_attention: bool,
    ) -> list[DecoderOutput]:
        """Decode all groups in one pass and split the outputs back (the DN block stays joined to the
        detection block: ``[dn | det]`` is the first output)."""
        content = torch.cat([g.content for g in groups], 1)
        query_pos = torch.cat([g.pos for g in groups], 1)
        reference = torch.cat([g.reference for g in groups], 1)
        mask = self._attn_mask(groups, dn, memory.device)
        hidden, refs, locations, weights = self.transformer.decoder(
            content, query_pos, reference, memory, spatial_shapes, ratios, memory_mask, mask
        )
        logits, boxes = self._heads(hidden, refs)
        width = max(r.shape[-1] for r in refs)
        refs = torch.stack([F.pad(r, (0, width - r.shape[-1])) for r in refs])  # plain+refine: layer 0 w=h=0
        sizes = [g.size for g in groups]
        if dn is not None:
            sizes = [sizes[0] + sizes[1], *sizes[2:]]
            queries = [torch.cat([groups[0].queries, groups[1].queries], 1), *[g.queries for g in groups[2:]]]
        else:
            queries = [g.queries for g in groups]
        parts = [t.split(sizes, dim=2) for t in (logits, boxes, hidden, refs)]
        attn = [locations.split(sizes, dim=2), weights.split(sizes, dim=2)] if return_attention else None
        return [
            DecoderOutput(
                logits=parts[0][i],
                boxes=parts[1][i],
                hidden=parts[2][i],
                references=parts[3][i],
                queries=queries[i],
                sampling_locations=attn[0][i] if attn else None,
                attention_weights=attn[1][i] if attn else None,
            )
            for i in range(len(sizes))
        ]

    def _heads(self, hidden: Tensor, refs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-layer class logits [L, B, N, C] and boxes [L, B, N, 4] relative to each layer's reference.

        With ``look_forward_twice`` layer l (> 0) adds its delta to layer l-1's refined box before the detach
        (same value as ``refs[l]``, which the decoder detached), so its loss reaches layer l-1 too (DINO).
        """
        logits, boxes = [], []
        undetached = None  # layer l-1's refined box on its detached reference, [B, N, 4] sigmoided
        for lid, (h, ref) in enumerate(zip(hidden, refs, strict=True)):
            logits.append(self.class_embed[lid](h))
            delta = self.bbox_embed[lid](h)
            refined = _refine(delta, ref)
            boxes.append(refined.sigmoid() if undetached is None else _refine(delta, undetached).sigmoid())
            if self.look_forward_twice:
                undetached = refined.sigmoid()
        return torch.stack(logits), torch.stack(boxes)

    @staticmethod
    def _split_dn(out: DecoderOutput, meta: dict) -> tuple[DecoderOutput, DecoderOutput]:
        """Split the joint ``[dn | det]`` output into the denoising and the detection outputs."""
        fields = ("logits", "boxes", "hidden", "references", "sampling_locations", "attention_weights")
        dn_kw, det_kw = {}, {}
        for name in fields:
            t = getattr(out, name)
            dn_kw[name], det_kw[name] = (None, None) if t is None else split_dn(t, meta, dim=2)
        dn_kw["queries"], det_kw["queries"] = split_dn(out.queries, meta, dim=1)
        return DecoderOutput(**dn_kw), DecoderOutput(**det_kw)
