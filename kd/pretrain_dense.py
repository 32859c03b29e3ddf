"""Dense backbone pre-training: per-location category and box sides on C4 and C5 (``pretrain.task: dense``).

At every feature location of each stride of ``pretrain.strides`` (default 16 = C4 and 32 = C5; 8 = C3 too for
a teacher that reads C3), a 1x1 convolution predicts the category of the
smallest ground-truth box containing the location's centre (background when none; the cell holding a box's
centre always counts, so small boxes are not lost) and, for such locations, the log-distances from the
location to the box's left, top, right and bottom sides in units of the stride (FCOS's targets). A linear
head keeps the information in the backbone's features, which the detectors then read frozen.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from kd.io import save_torch_atomic
from kd.models.backbone import STAGE_STRIDES, stage_channels

if TYPE_CHECKING:
    from kd.pretrain import PretrainConfig

STRIDES = (16, 32)  # the default pretrain.strides
LAYERS = {s: stage for stage, s in STAGE_STRIDES.items() if s >= 8}  # stride -> ResNet stage (C3, C4, C5)
IGNORE = -100  # padded locations
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def dense_targets(
    boxes: Tensor, labels: Tensor, size: tuple[int, int], grid: tuple[int, int], stride: int
) -> tuple[Tensor, Tensor]:
    """Targets of one image on a ``grid`` of feature locations.

    Args:
        boxes: [N, 4] xyxy in pixels of the (resized) image. labels: [N] in 1..K.
        size: (height, width) of the image; the grid may be larger (batch padding).
        grid: (gh, gw) feature locations; location (i, j) has its centre at ((j + .5) s, (i + .5) s).
        stride: s.

    Returns:
        cls [gh, gw] int64: the label of the smallest box assigned to the location, 0 for background,
            ``IGNORE`` outside the image.
        sides [gh, gw, 4]: log((l, t, r, b) / s) to that box's sides (clamped at 1/16 s), 0 on background.
    """
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float32) + 0.5) * stride  # [gh]
    xs = (torch.arange(gw, dtype=torch.float32) + 0.5) * stride  # [gw]
    cls = torch.zeros(gh, gw, dtype=torch.int64)
    sides = torch.zeros(gh, gw, 4)
    if len(boxes):
        b = boxes[:, :, None, None]  # [N, 4, 1, 1]
        X, Y = xs[None, :].expand(gh, gw), ys[:, None].expand(gh, gw)  # location centres [gh, gw]
        ltrb = torch.stack([X - b[:, 0], Y - b[:, 1], b[:, 2] - X, b[:, 3] - Y], dim=-1)  # [N, gh, gw, 4]
        inside = ltrb.amin(-1) > 0  # [N, gh, gw]
        centre = ((boxes[:, :2] + boxes[:, 2:]) / 2 / stride).floor().long()  # [N, 2] (col, row)
        centre[:, 0].clamp_(0, gw - 1)
        centre[:, 1].clamp_(0, gh - 1)
        inside[torch.arange(len(boxes)), centre[:, 1], centre[:, 0]] = True
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[:, None, None]
        area = torch.where(inside, area.expand_as(inside), torch.inf)
        best_area, best = area.min(0)  # [gh, gw]
        positive = torch.isfinite(best_area)
        cls = torch.where(positive, labels[best], 0)
        chosen = ltrb.gather(0, best[None, :, :, None].expand(1, gh, gw, 4))[0]  # [gh, gw, 4]
        sides = torch.where(positive[..., None], torch.log(chosen.clamp(min=stride / 16) / stride), 0.0)
    outside = (ys >= size[0])[:, None] | (xs >= size[1])[None, :]
    cls[outside] = IGNORE
    return cls, sides


def check_strides(strides: tuple[int, ...]) -> tuple[int, ...]:
    """``strides`` sorted, or ValueError unless they are distinct values of 8, 16, 32 (C3, C4, C5)."""
    out = tuple(sorted(int(s) for s in strides))
    if not out or len(set(out)) != len(out) or not set(out) <= set(LAYERS):
        raise ValueError(
            f"pretrain.strides: distinct values of {sorted(LAYERS)} expected, got {list(strides)}"
        )
    return out


class DenseNet(nn.Module):
    """A torchvision ResNet trunk with a linear (1x1 conv) head on each level of ``strides``."""

    def __init__(self, backbone: str, num_classes: int, strides: tuple[int, ...] = STRIDES) -> None:
        super().__init__()
        self.strides = check_strides(strides)
        trunk = getattr(torchvision.models, backbone)(weights=None)
        self.body = IntermediateLayerGetter(trunk, {LAYERS[s]: str(s) for s in self.strides})
        channels = [stage_channels(backbone, s) for s in self.strides]
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes + 1 + 4, 1) for c in channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x [B, 3, H, W] -> per stride s: [B, K + 1 + 4, H / s, W / s] (class logits, then sides)."""
        feats = self.body(x)
        return [head(feats[str(s)]) for head, s in zip(self.heads, self.strides, strict=True)]


def load_split(coco: COCO, img_dir: Path) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Every image of ``coco``: uint8 [3, H, W], boxes [N, 4] xyxy and labels [N] (1..K, by sorted id)."""
    cat_to_label = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    images, boxes, labels = [], [], []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        image = np.asarray(Image.open(img_dir / info["file_name"]).convert("RGB"))
        images.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False)) if a["bbox"][2] > 0]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes.append(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))
        labels.append(torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64))
    return images, boxes, labels


def make_batch(
    images: list[Tensor],
    boxes: list[Tensor],
    labels: list[Tensor],
    short: int,
    max_size: int,
    flips: Tensor,
    strides: tuple[int, ...] = STRIDES,
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Resize (shorter side ``short``, longer at most ``max_size``), flip, pad and build the targets.

    Returns (x [B, 3, H, W] normalised, [(cls [B, gh, gw], sides [B, gh, gw, 4]) per stride]).
    """
    resized, scaled = [], []
    for img, box, flip in zip(images, boxes, flips.tolist(), strict=True):
        h, w = img.shape[1:]
        scale = min(short / min(h, w), max_size / max(h, w))
        nh, nw = round(h * scale), round(w * scale)
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
        box = box * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if flip:
            x = x.flip(-1)
            box = torch.stack([nw - box[:, 2], box[:, 1], nw - box[:, 0], box[:, 3]], 1)
        resized.append(x)
        scaled.append(box)
    H = math.ceil(max(x.shape[1] for x in resized) / 32) * 32  # C5's stride: every level tiles the canvas
    W = math.ceil(max(x.shape[2] for x in resized) / 32) * 32
    batch = torch.zeros(len(resized), 3, H, W)
    for i, x in enumerate(resized):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    batch = (batch / 255.0 - MEAN) / STD
    targets = []
    for s in strides:
        per_image = [
            dense_targets(b, lab, tuple(x.shape[1:]), (H // s, W // s), s)
            for x, b, lab in zip(resized, scaled, labels, strict=True)
        ]
        targets.append((torch.stack([c for c, _ in per_image]), torch.stack([d for _, d in per_image])))
    return batch, targets


def dense_loss(
    outputs: list[Tensor], targets: list[tuple[Tensor, Tensor]], num_classes: int, box_weight: float
) -> tuple[Tensor, int, int]:
    """Cross-entropy over locations + ``box_weight`` x L1 on the sides of positive locations, per stride.

    Returns (loss, correctly classified locations, counted locations).
    """
    loss, correct, seen = outputs[0].new_zeros(()), 0, 0
    for out, (cls, sides) in zip(outputs, targets, strict=True):
        logits = out[:, : num_classes + 1].float()  # [B, K+1, h, w]
        pred_sides = out[:, num_classes + 1 :].float().permute(0, 2, 3, 1)  # [B, h, w, 4]
        loss = loss + F.cross_entropy(logits, cls, ignore_index=IGNORE)
        positive = cls > 0
        if positive.any():
            loss = loss + box_weight * F.l1_loss(pred_sides[positive], sides[positive])
        valid = cls != IGNORE
        correct += int((logits.argmax(1) == cls)[valid].sum())
        seen += int(valid.sum())
    return loss, correct, seen


def pretrain_dense(
    coco: COCO, img_dir: Path, cfg: PretrainConfig, out_path: Path, log=print
) -> dict[str, float]:
    """Train ``cfg.backbone`` on the dense task and save its trunk to ``out_path`` (atomically)."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    images, boxes, labels = load_split(coco, img_dir)
    num_classes = len(coco.getCatIds())
    net = DenseNet(cfg.backbone, num_classes, cfg.strides)
    net = net.to(memory_format=torch.channels_last)  # oneDNN's fast path
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    log(
        f"pretrain {cfg.backbone} (dense, strides {list(net.strides)}): {len(images)} images, "
        f"{num_classes} categories, {total} steps"
    )
    net.train()
    stats = {"loss": math.nan, "accuracy": math.nan}
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(images), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size].tolist()
            short = cfg.image_sizes[int(torch.randint(len(cfg.image_sizes), (1,), generator=generator))]
            flips = torch.rand(len(idx), generator=generator) < 0.5
            x, targets = make_batch(
                [images[j] for j in idx], [boxes[j] for j in idx], [labels[j] for j in idx],
                short, cfg.max_size, flips, net.strides,
            )  # fmt: skip
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                outputs = net(x.contiguous(memory_format=torch.channels_last))
            loss, c, n = dense_loss(outputs, targets, num_classes, cfg.box_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct, seen = correct + c, seen + n
        stats = {"loss": loss_sum / len(images), "accuracy": correct / max(seen, 1)}
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.3f} acc {stats['accuracy']:.3f}")
    save_torch_atomic(net.body.state_dict(), out_path)
    return {**stats, "images": float(len(images)), "seconds": time.time() - start}
