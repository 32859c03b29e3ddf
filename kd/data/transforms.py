"""DETR-style joint transforms of a PIL image and its target, keeping the boxes consistent.

Before ``Normalize`` the target holds ``boxes [N, 4]`` absolute (x0, y0, x1, y1) pixels, ``labels [N]``
and ``size [2]`` (h, w); ``Normalize`` turns the boxes into normalised (cx, cy, w, h) in [0, 1], the
convention of every model and loss. Randomness comes from torch's global generator (seed it, or let the
DataLoader seed each worker).

The recipes follow DETR (Carion et al. 2020, appendix A.4): the shorter side drawn from a list of sizes
with the longer side capped, and with probability 0.5 a branch that resizes, crops a random region and
resizes again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")  # fields indexed like the boxes
# DETR's COCO recipe; coco_recipe() and build_transforms(COCO_TRANSFORMS, ...) are the same thing
COCO_TRANSFORMS = {
    "train_sizes": list(range(480, 801, 32)),
    "val_size": 800,
    "max_size": 1333,
    "crop": True,
    "crop_resize_sizes": [400, 500, 600],
    "crop_min": 384,
    "crop_max": 600,
}

Target = dict[str, Tensor]
Transform = Callable[[Image.Image | Tensor, Target], tuple[Image.Image | Tensor, Target]]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


def _keep(target: Target, keep: Tensor) -> Target:
    """Index every per-box field of ``target`` with the bool mask ``keep [N]``."""
    return {k: (v[keep] if k in PER_BOX_KEYS else v) for k, v in target.items()}


def hflip(image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
    """Mirror left-right; boxes [N, 4] xyxy become (w - x1, y0, w - x0, y1)."""
    w = image.width
    target = dict(target)
    if "boxes" in target:
        b = target["boxes"]
        target["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return F.hflip(image), target


def crop(image: Image.Image, target: Target, top: int, left: int, height: int, width: int):
    """Crop the region (top, left, height, width); boxes are shifted, clipped, and dropped when empty."""
    target = dict(target)
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        b = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        b = torch.minimum(b.clamp(min=0), torch.tensor([width, height, width, height], dtype=b.dtype))
        target["boxes"] = b
        if "area" in target:
            target["area"] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        target = _keep(target, (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    return F.crop(image, top, left, height, width), target


def resized_shape(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
    """(new_h, new_w) with the shorter side ``size`` and the longer side at most ``max_size``."""
    short, long = min(h, w), max(h, w)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if w <= h:
        return int(round(size * h / w)), size
    return size, int(round(size * w / h))


def resize(image: Image.Image, target: Target, size: int, max_size: int | None = None):
    """Resize so the shorter side is ``size`` (longer side <= ``max_size``); boxes scale with the image."""
    new_h, new_w = resized_shape(image.height, image.width, size, max_size)
    sx, sy = new_w / image.width, new_h / image.height
    target = dict(target)
    target["size"] = torch.tensor([new_h, new_w])
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=target["boxes"].dtype)
    if "area" in target:
        target["area"] = target["area"] * (sx * sy)
    return image.resize((new_w, new_h), Image.BILINEAR), target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image, target: Target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target: Target):
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes``, the longer side capped."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image, target: Target):
        size = self.sizes[_randint(0, len(self.sizes) - 1)]
        return resize(image, target, size, self.max_size)


class RandomSizeCrop:
    """Crop a random region with sides in [min_size, max_size] (bounded by the image); empty boxes go."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target: Target):
        w = _randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = _randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top, left = _randint(0, image.height - h), _randint(0, image.width - w)
        return crop(image, target, top, left, h, w)


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target: Target):
        if torch.rand(()).item() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]; target unchanged."""

    def __call__(self, image, target: Target):
        return F.to_tensor(image), target


class Normalize:
    """Normalise the image [3, H, W] (ImageNet mean/std) and turn boxes into normalised cxcywh.

    Boxes: absolute xyxy [N, 4] -> (cx, cy, w, h) / (W, H, W, H), float32. Sets ``size`` to (H, W).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Tensor, target: Target):
        image = F.normalize(image, mean=self.mean, std=self.std)
        h, w = image.shape[-2:]
        target = dict(target)
        target["size"] = torch.tensor([h, w])
        if "boxes" in target:
            boxes = box_convert(target["boxes"].float(), "xyxy", "cxcywh")
            target["boxes"] = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


def build_transforms(cfg: dict, train: bool) -> Compose:
    """Transforms from ``params.yaml`` ``data.transforms``.

    Keys: ``train_sizes`` (shorter-side choices), ``val_size``, ``max_size``, ``crop`` (bool) and the
    optional ``crop_resize_sizes``, ``crop_min``, ``crop_max``; when absent they scale DETR's COCO values
    (400/500/600 and 384..600 for a largest train size of 800) to ``max(train_sizes)``.

    Train: flip, then either a plain multi-scale resize or (``crop``, probability 0.5) resize -> random
    crop -> multi-scale resize. Val: resize to ``val_size``. Both end with ToTensor and Normalize.
    """
    required = ("train_sizes", "crop") if train else ("val_size",)
    missing = [k for k in (*required, "max_size") if k not in cfg]
    if missing:
        raise ValueError(f"data.transforms: missing key(s) {missing} (have {sorted(cfg)})")
    max_size = cfg["max_size"]
    tail = [ToTensor(), Normalize()]
    if not train:
        return Compose([RandomResize([cfg["val_size"]], max_size), *tail])
    sizes = list(cfg["train_sizes"])
    scale = RandomResize(sizes, max_size)
    if not cfg["crop"]:
        return Compose([RandomHorizontalFlip(), scale, *tail])
    top = max(sizes)
    crop_sizes = cfg.get("crop_resize_sizes") or [round(top * r) for r in (0.5, 0.625, 0.75)]
    branch = Compose(
        [
            RandomResize(crop_sizes),
            RandomSizeCrop(cfg.get("crop_min", round(0.48 * top)), cfg.get("crop_max", round(0.75 * top))),
            scale,
        ]
    )
    return Compose([RandomHorizontalFlip(), RandomSelect(scale, branch), *tail])


def coco_recipe(train: bool) -> Compose:
    """DETR's COCO recipe: shorter side 480..800 step 32, longer <= 1333; 50% resize {400, 500, 600} ->
    crop 384..600 -> resize. Val: shorter side 800, longer <= 1333."""
    return build_transforms(COCO_TRANSFORMS, train)
