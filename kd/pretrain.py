"""Backbone pre-training on the generated data: the small-scale analogue of ImageNet pre-training.

Nothing can be downloaded here, so detectors would otherwise start from a random ResNet and DETRs converge
slowly from scratch. This stage trains a torchvision ResNet on the training split and saves the trunk as a
plain torchvision state dict that ``kd.models.backbone.Backbone(weights=...)`` loads like any ImageNet
checkpoint. Two tasks:

- ``dense`` (default): whole images at the detectors' scale; a 1x1 convolution on C4 (stride 16) and one on
  C5 (stride 32) predict, at every feature location, the category of the smallest ground-truth box that
  contains the location's centre (or background) and the log-distances to that box's sides (FCOS-style).
  The features the frozen detector then reads already say *what* is where and how far its edges are.
- ``crops``: classify object crops (plus background crops) resized to ``crop_size`` (ImageNet-style).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor

from kd.io import save_torch_atomic
from kd.pretrain_dense import check_strides

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class PretrainConfig:
    """Knobs of the backbone pre-training (params.yaml ``pretrain``).

    ``task`` is ``dense`` or ``crops`` (module docstring); ``crop_size``, ``context`` and
    ``background_per_image`` are read by ``crops`` only, ``strides``, ``image_sizes``, ``max_size`` and
    ``box_weight`` by ``dense`` only (``strides``: the levels given a head; ``image_sizes``: the shorter side
    is drawn from these, as the detectors' training transforms do).
    """

    backbone: str = "resnet18"
    task: str = "dense"
    image_sizes: tuple[int, ...] = (112, 128, 144)
    max_size: int = 192
    box_weight: float = 1.0
    strides: tuple[int, ...] = (16, 32)  # dense only: the levels with a head (8 = C3, 16 = C4, 32 = C5)
    crop_size: int = 64
    context: float = 0.25  # crop = box enlarged by this fraction on each side, jittered
    background_per_image: int = 2
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    amp: str = "bf16"  # bf16 | none (CPU autocast)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_sizes", tuple(int(v) for v in self.image_sizes))
        object.__setattr__(self, "strides", check_strides(self.strides))
        if self.task not in ("dense", "crops"):
            raise ValueError(f"pretrain.task: must be 'dense' or 'crops' (got {self.task!r})")


def _crop(image: Image.Image, box: tuple[float, ...], size: int) -> np.ndarray:
    """Crop ``box`` (x0, y0, x1, y1; may leave the image, filled with black) and resize to size x size."""
    return np.asarray(image.crop(tuple(round(v) for v in box)).resize((size, size), Image.BILINEAR))


def extract_crops(
    coco: COCO, img_dir: Path, crop_size: int, context: float, background_per_image: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Cut one crop per annotation and a few background crops per image.

    Returns (crops [N, 3, crop_size, crop_size] uint8, labels [N] int64); label 0 is background and
    label k >= 1 is the k-th category id in sorted order.
    """
    rng = np.random.default_rng(seed)
    cat_to_label = {c: i + 1 for i, c in enumerate(sorted(coco.getCatIds()))}
    crops, labels = [], []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        image = Image.open(img_dir / info["file_name"]).convert("RGB")
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
        for a in anns:
            x, y, w, h = a["bbox"]
            jitter = rng.uniform(-0.1, 0.1, size=4) * [w, h, w, h]
            pad_w, pad_h = context * w, context * h
            box = (
                x - pad_w + jitter[0],
                y - pad_h + jitter[1],
                x + w + pad_w + jitter[2],
                y + h + pad_h + jitter[3],
            )
            crops.append(_crop(image, box, crop_size))
            labels.append(cat_to_label[a["category_id"]])
        for _ in range(background_per_image):
            side = rng.uniform(0.15, 0.5) * min(info["width"], info["height"])
            x0 = rng.uniform(0, info["width"] - side)
            y0 = rng.uniform(0, info["height"] - side)
            crops.append(_crop(image, (x0, y0, x0 + side, y0 + side), crop_size))
            labels.append(0)
    stacked = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)


def _normalise(crops: Tensor) -> Tensor:
    return (crops.float() / 255.0 - MEAN) / STD


def _augment(crops: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flip of a uint8 batch [B, 3, S, S]."""
    flip = torch.rand(crops.shape[0], generator=generator) < 0.5
    crops = crops.clone()
    crops[flip] = crops[flip].flip(-1)
    return crops


def pretrain_backbone(
    coco: COCO, img_dir: Path, cfg: PretrainConfig, out_path: Path, log=print
) -> dict[str, float]:
    """Train ``cfg.backbone`` on ``cfg.task`` and save its trunk to ``out_path`` (atomically).

    Returns the training summary: final train loss and accuracy (per crop, or per feature location for
    ``dense``), the number of crops or images, seconds.
    """
    if cfg.task == "dense":
        from kd.pretrain_dense import pretrain_dense

        return pretrain_dense(coco, Path(img_dir), cfg, Path(out_path), log=log)
    start = time.time()
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    crops, labels = extract_crops(
        coco, Path(img_dir), cfg.crop_size, cfg.context, cfg.background_per_image, cfg.seed
    )
    num_classes = int(labels.max()) + 1
    net = getattr(torchvision.models, cfg.backbone)(weights=None, num_classes=num_classes)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    log(f"pretrain {cfg.backbone}: {len(labels)} crops, {num_classes - 1} categories + bg, {total} steps")
    net.train()
    stats = {"loss": math.nan, "accuracy": math.nan}
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        correct, seen, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x = _normalise(_augment(crops[idx], generator))
            y = labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        stats = {"loss": loss_sum / seen, "accuracy": correct / seen}
        log(f"pretrain epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.3f} acc {stats['accuracy']:.3f}")
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    save_torch_atomic(state, out_path)
    return {**stats, "crops": float(len(labels)), "seconds": time.time() - start}
