"""A stand-in detector, loss and dataset for engine / checkpoint / DDP tests (no real model needed).

TinyDetector follows the detector contract (returns :class:`kd.models.outputs.DetectorOutput`), has a
``backbone`` and a ``sampling_offsets`` parameter (to exercise the optimizer's groups) and dropout (to
exercise RNG restoration). FakeDetection draws a random flip from the global torch RNG per item, as
data augmentation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from kd.models.outputs import DecoderOutput, DetectorOutput


class TinyDetector(nn.Module):
    def __init__(self, num_classes: int = 3, num_queries: int = 4, hidden: int = 8, dropout: float = 0.2):
        super().__init__()
        self.backbone = nn.Conv2d(3, hidden, 3, stride=4, padding=1)
        self.sampling_offsets = nn.Linear(hidden, hidden)
        self.query = nn.Embedding(num_queries, hidden)
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Linear(hidden, num_classes)
        self.box = nn.Linear(hidden, 4)

    def forward(self, images: Tensor, mask: Tensor, targets=None, extra_queries=None, return_attention=False):
        feat = self.backbone(images)  # [B, D, h, w]
        pooled = self.sampling_offsets(feat.flatten(2).mean(-1))  # [B, D]
        h = self.drop(torch.relu(pooled[:, None] + self.query.weight[None]))  # [B, Q, D]
        logits, boxes = self.cls(h), self.box(h).sigmoid()
        det = DecoderOutput(
            logits=logits[None], boxes=boxes[None], hidden=h[None], references=boxes[None].detach()
        )
        memory = feat.flatten(2).transpose(1, 2)
        return DetectorOutput(
            detection=det,
            memory=memory,
            memory_mask=torch.zeros(memory.shape[:2], dtype=torch.bool),
            spatial_shapes=torch.tensor([feat.shape[-2:]]),
            features=[feat],
            feature_masks=[torch.zeros(feat.shape[0], *feat.shape[-2:], dtype=torch.bool)],
        )


def tiny_loss(model: nn.Module, images: Tensor, mask: Tensor, targets: list[dict]) -> dict[str, Tensor]:
    """Query 0 predicts each image's first box and label (no matching needed)."""
    out = model(images, mask, targets=targets)
    labels = torch.stack([t["labels"][0] for t in targets])
    boxes = torch.stack([t["boxes"][0] for t in targets])
    onehot = F.one_hot(labels, out.logits.shape[-1]).float()
    return {
        "loss_cls": F.binary_cross_entropy_with_logits(out.logits[:, 0], onehot),
        "loss_bbox": 5.0 * F.l1_loss(out.boxes[:, 0], boxes),
    }


class FakeDetection(Dataset):
    def __init__(self, n: int = 8, size: int = 16, num_classes: int = 3, seed: int = 0, augment: bool = True):
        self.augment = augment
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.boxes = torch.rand(n, 1, 4, generator=g) * 0.5 + 0.25
        self.labels = torch.randint(0, num_classes, (n, 1), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, boxes = self.images[i], self.boxes[i].clone()
        if self.augment and torch.rand(()) < 0.5:  # augmentation from the global RNG
            image = image.flip(-1)
            boxes[:, 0] = 1 - boxes[:, 0]
        target = {
            "boxes": boxes,
            "labels": self.labels[i],
            "image_id": i,
            "orig_size": torch.tensor([16, 16]),
        }
        return image, target


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    return images, mask, [b[1] for b in batch]


def coco_gt(data: FakeDetection) -> dict:
    """COCO ground truth (category ids 1..C) matching ``data``'s first box per image, in 16x16 pixels."""
    annotations = []
    for i in range(len(data)):
        cx, cy, w, h = (data.boxes[i, 0] * 16).tolist()
        annotations.append(
            {
                "id": i + 1,
                "image_id": i,
                "category_id": int(data.labels[i, 0]) + 1,
                "iscrowd": 0,
                "bbox": [cx - w / 2, cy - h / 2, w, h],
                "area": w * h,
            }
        )
    return {
        "images": [{"id": i, "width": 16, "height": 16} for i in range(len(data))],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(3)],
        "annotations": annotations,
    }
