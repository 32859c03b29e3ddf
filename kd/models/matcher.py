"""Hungarian matching of predictions to ground-truth boxes (DETR ``models/matcher.py``).

The classification cost is the focal-loss cost of Deformable / Conditional DETR: for predicted probability
``p`` of the target class, ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))``. Box costs are
the L1 distance of normalised (cx, cy, w, h) boxes and the negative generalised IoU. One cost matrix is
built for the whole batch, split per image and solved with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


def focal_cost(prob: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal classification cost of every prediction for every target label.

    Args:
        prob: [N, C] sigmoid probabilities.
        labels: [T] int64 target labels in 0..C-1.

    Returns:
        [N, T] cost (lower is better).
    """
    prob = prob[:, labels]
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising ``cost_class*focal + cost_bbox*L1 +
    cost_giou*(-GIoU)`` (DETR Sec. 3.1, costs 2/5/2 as in Deformable / Conditional DETR)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Matching cost of every prediction against every target.

        Args:
            logits: [N, C] class logits; boxes: [N, 4] normalised cxcywh.
            labels: [T] int64; tgt_boxes: [T, 4] normalised cxcywh.

        Returns:
            [N, T] float cost.
        """
        prob = logits.float().sigmoid()
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        c_cls = focal_cost(prob, labels, self.focal_alpha, self.focal_gamma)
        c_l1 = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return self.cost_class * c_cls + self.cost_bbox * c_l1 + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]] | dict[str, Tensor]
    ) -> Indices | tuple[Tensor, Tensor]:
        """Match predictions to targets.

        Args:
            logits: [B, Q, C] class logits (or [Q, C] for a single image).
            boxes: [B, Q, 4] normalised cxcywh (or [Q, 4]).
            targets: B dicts with ``labels [T_b]`` int64 and ``boxes [T_b, 4]`` normalised cxcywh
                (or one dict when the predictions are for a single image).

        Returns:
            Per image ``(src_idx, tgt_idx)``, two int64 CPU tensors of length ``min(Q, T_b)``: query
            ``src_idx[k]`` is assigned target ``tgt_idx[k]``. A single tuple for single-image input.
        """
        if logits.dim() == 2:
            single = targets if isinstance(targets, dict) else targets[0]
            return self.forward(logits[None], boxes[None], [single])[0]
        if logits.dim() != 3 or boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
            raise ValueError(f"matcher: logits {tuple(logits.shape)} / boxes {tuple(boxes.shape)} mismatch")
        if len(targets) != logits.shape[0]:
            raise ValueError(f"matcher: {len(targets)} targets for a batch of {logits.shape[0]}")
        bs, num_queries = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device)
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes)
        if not torch.isfinite(cost).all():
            raise ValueError("matcher: non-finite matching cost (NaN/inf predictions or degenerate boxes)")
        cost = cost.view(bs, num_queries, -1).cpu()
        indices = []
        for i, c in enumerate(cost.split(sizes, -1)):
            src, tgt = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(src, dtype=torch.int64), torch.as_tensor(tgt, dtype=torch.int64)))
        return indices
