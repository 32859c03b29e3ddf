"""COCO-format detection dataset (pycocotools), its batch collation and the dataset builder.

The same class reads the generated dataset and real COCO 2017. Targets follow the project convention:
``boxes [N, 4]`` normalised (cx, cy, w, h), ``labels [N]`` contiguous in 0..C-1 (``cat_id_to_label`` /
``label_to_cat_id`` map to and from the COCO category ids), ``image_id``, ``orig_size`` and ``size``
(h, w). Crowd annotations (``iscrowd=1``) and boxes that are empty after clipping to the image are not
training targets (the evaluator still reads them from the annotation file).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from kd.data.transforms import Compose, Normalize, ToTensor, build_transforms
from kd.data.validate import validate_coco

# split name -> folder/file stem, per dataset preset
SPLIT_NAMES = {
    "synthetic": {"train": "train", "val": "val"},
    "coco": {"train": "train2017", "val": "val2017"},
}
# how much of the image folder to check at construction, per preset (COCO train has 118k files)
CHECK_IMAGES = {"synthetic": True, "coco": "exists"}


class CocoDetection(Dataset):
    """Images and targets from a COCO instances file.

    Args:
        img_dir: folder holding the images named by ``file_name``.
        ann_file: COCO instances JSON; validated at construction (``kd.data.validate.validate_coco``).
        transforms: joint (PIL image, target) transforms ending in ``Normalize``; default ToTensor +
            Normalize (no resizing).
        check_images: passed to ``validate_coco`` (True, "exists" or False).
        degenerate: "error" or "skip" boxes of zero width/height (see ``validate_coco``).

    ``dataset[i]`` is ``(image [3, H, W] float, target)`` with the target keys listed in the module doc.
    """

    def __init__(
        self,
        img_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        check_images: bool | str = True,
        degenerate: str = "error",
    ):
        self.img_dir, self.ann_file = Path(img_dir), Path(ann_file)
        data = validate_coco(self.ann_file, self.img_dir, check_images=check_images, degenerate=degenerate)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids)}
        self.label_to_cat_id = dict(enumerate(cat_ids))
        self.class_names = [self.coco.cats[c]["name"] for c in cat_ids]
        self.transforms = transforms if transforms is not None else Compose([ToTensor(), Normalize()])

    @property
    def num_classes(self) -> int:
        return len(self.cat_id_to_label)

    def __len__(self) -> int:
        return len(self.ids)

    def load_target(self, image_id: int) -> dict[str, Tensor]:
        """Raw target of one image: ``boxes [N, 4]`` absolute xyxy clipped to the image, ``labels [N]``,
        ``image_id``, ``orig_size`` and ``size`` (h, w); crowd and empty boxes removed."""
        info = self.coco.imgs[image_id]
        w, h = info["width"], info["height"]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        size = torch.tensor([h, w])
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": image_id,
            "orig_size": size,
            "size": size,
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.ids[index]
        path = self.img_dir / self.coco.imgs[image_id]["file_name"]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return self.transforms(image, self.load_target(image_id))


def collate_fn(batch: list[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """Zero-pad images to the largest H and W of the batch.

    Returns:
        images: [B, 3, H, W]; mask: [B, H, W] bool, True on padding; targets: list of B dicts.
    """
    images, targets = zip(*batch, strict=True)
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask, list(targets)


def split_paths(root: str | Path, split: str, preset: str = "synthetic") -> tuple[Path, Path]:
    """(image folder, annotation file) of a split: ``<root>/<name>/`` and
    ``<root>/annotations/instances_<name>.json`` with ``name = SPLIT_NAMES[preset].get(split, split)``."""
    if preset not in SPLIT_NAMES:
        raise ValueError(f"data preset must be one of {sorted(SPLIT_NAMES)}, got {preset!r}")
    name = SPLIT_NAMES[preset].get(split, split)
    root = Path(root)
    return root / name, root / "annotations" / f"instances_{name}.json"


def build_dataset(
    root: str | Path,
    split: str,
    transforms_cfg: dict | None,
    train: bool,
    preset: str = "synthetic",
    img_dir: str | Path | None = None,
    ann_file: str | Path | None = None,
) -> CocoDetection:
    """The dataset of one split with the transforms of ``params.yaml`` ``data.transforms``.

    Presets (``params.yaml`` ``data.name``):
        - ``synthetic``: ``<root>/annotations/instances_{train,val}.json``, images in ``<root>/{train,val}/``;
          every image file is verified at construction.
        - ``coco`` (real COCO 2017, e.g. ``root=data/coco``): ``annotations/instances_train2017.json`` with
          ``train2017/`` and ``instances_val2017.json`` with ``val2017/``; only file existence is checked,
          and the two zero-height boxes of train2017 are dropped (``degenerate="skip"``). Use
          ``transforms_cfg=kd.data.transforms.COCO_TRANSFORMS`` for DETR's recipe.
    ``img_dir`` / ``ann_file`` override the derived paths (any other layout). ``transforms_cfg=None``
    gives ToTensor + Normalize only.
    """
    default_img_dir, default_ann = split_paths(root, split, preset)
    transforms = build_transforms(transforms_cfg, train) if transforms_cfg is not None else None
    return CocoDetection(
        img_dir if img_dir is not None else default_img_dir,
        ann_file if ann_file is not None else default_ann,
        transforms=transforms,
        check_images=CHECK_IMAGES[preset],
        degenerate="skip" if preset == "coco" else "error",
    )
