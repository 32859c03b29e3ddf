"""Turn detector outputs into scored boxes in image pixels (Deformable DETR ``PostProcess``).

The top ``num_select`` (query, class) pairs by sigmoid score are kept, so one query may yield several
detections with different classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert


class PostProcess(nn.Module):
    """Top-k over all ``Q * C`` sigmoid scores, boxes scaled to absolute xyxy pixels."""

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, logits: Tensor, boxes: Tensor, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Select detections.

        Args:
            logits: [B, Q, C] class logits.
            boxes: [B, Q, 4] normalised cxcywh.
            target_sizes: [B, 2] (h, w) in pixels of the image each result is expressed in (usually the
                original image size, ``targets[b]["orig_size"]``).

        Returns:
            B dicts with ``scores [K]`` (descending), ``labels [K]`` int64, ``boxes [K, 4]`` absolute xyxy,
            K = min(num_select, Q * C).
        """
        if logits.dim() != 3 or boxes.shape != (*logits.shape[:2], 4):
            raise ValueError(
                f"PostProcess: logits {tuple(logits.shape)} / boxes {tuple(boxes.shape)} mismatch"
            )
        if target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(f"PostProcess: target_sizes {tuple(target_sizes.shape)}, expected [B, 2]")
        bs, _, num_classes = logits.shape
        k = min(self.num_select, logits.shape[1] * num_classes)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = flat // num_classes
        labels = flat % num_classes
        xyxy = box_convert(boxes, "cxcywh", "xyxy").gather(1, query[..., None].expand(bs, k, 4))
        h, w = target_sizes.to(xyxy).unbind(1)
        xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None, :]
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, xyxy, strict=True)]
