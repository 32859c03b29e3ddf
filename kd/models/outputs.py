"""The output contract shared by every detector (Conditional DETR, DAB-DETR, Deformable DETR).

Distillers and the criterion read these dataclasses and never look inside a model. Boxes are always
normalised (cx, cy, w, h) in [0, 1] relative to the unpadded image; logits are pre-sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DecoderOutput:
    """One query group decoded by the decoder, all layers stacked (the last layer is the final output).

    Shapes: L decoder layers, B images, Q queries, C classes, D hidden size, S memory tokens,
    H heads, V feature levels, P sampling points.
    """

    logits: Tensor  # [L, B, Q, C]
    boxes: Tensor  # [L, B, Q, 4] normalised cxcywh
    hidden: Tensor  # [L, B, Q, D] decoder output embeddings per layer
    references: Tensor  # [L, B, Q, 2|4] normalised reference point/box each layer used as input
    queries: Tensor | None = None  # [B, Q, K] the queries the group was decoded from (model's own format)
    cross_attn: Tensor | None = None  # [L, B, Q, S] head-averaged cross-attention (dense attention)
    sampling_locations: Tensor | None = None  # [L, B, Q, H, V, P, 2] (deformable attention)
    attention_weights: Tensor | None = None  # [L, B, Q, H, V, P] (deformable attention)

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    def layer(self, i: int) -> dict[str, Tensor]:
        """Predictions of decoder layer ``i`` as ``{"logits": [B,Q,C], "boxes": [B,Q,4]}``."""
        return {"logits": self.logits[i], "boxes": self.boxes[i]}


@dataclass
class DetectorOutput:
    """Everything a detector's forward returns.

    ``detection`` holds the learned detection queries; ``extra`` the isolated query groups that were
    requested (KD-DETR distillation points, DETRDistill teacher queries), decoded by the same decoder
    without influencing the detection queries; ``denoising`` the DN-DETR groups and ``one2many`` the hybrid
    matching group (Deformable DETR, ``one2many_queries``) during training.
    """

    detection: DecoderOutput
    memory: Tensor  # [B, S, D] encoder output, levels flattened in order
    memory_mask: Tensor  # [B, S] bool, True on padding
    spatial_shapes: Tensor  # [V, 2] long, (H_v, W_v) of each level
    features: list[Tensor]  # V x [B, D, H_v, W_v] projected encoder inputs (the "neck" outputs)
    feature_masks: list[Tensor]  # V x [B, H_v, W_v] bool, True on padding
    extra: dict[str, DecoderOutput] = field(default_factory=dict)
    denoising: DecoderOutput | None = None
    dn_meta: dict | None = None  # how the denoising queries were built (see kd.models.denoising)
    proposals: dict[str, Tensor] | None = None  # two-stage encoder proposals {"logits", "boxes"}
    one2many: DecoderOutput | None = None  # H-DETR one-to-many group (training, ``one2many_queries > 0``)

    @property
    def logits(self) -> Tensor:
        """Final-layer class logits [B, Q, C]."""
        return self.detection.logits[-1]

    @property
    def boxes(self) -> Tensor:
        """Final-layer boxes [B, Q, 4], normalised cxcywh."""
        return self.detection.boxes[-1]
