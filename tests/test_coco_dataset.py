"""Tests of kd/data/coco.py: targets, label maps, crowd/degenerate filtering, collation, builders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torch.utils.data import DataLoader

from kd.data.coco import CocoDetection, build_dataset, collate_fn, split_paths
from kd.data.synthetic import CATEGORIES, SyntheticConfig, generate

PARAMS = {"train_sizes": [128, 144, 160, 176, 192], "val_size": 160, "max_size": 256, "crop": True}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "synthetic"
    generate(SyntheticConfig(seed=3, num_train=8, num_val=4), root, workers=1)
    return root


@pytest.fixture(scope="module")
def train_set(root) -> CocoDetection:
    return CocoDetection(root / "train", root / "annotations" / "instances_train.json")


def _write_single_image(tmp_path: Path, annotations: list[dict]) -> tuple[Path, Path]:
    """A 40x30 image with the given annotations; returns (img_dir, ann_file)."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.new("RGB", (40, 30)).save(img_dir / "a.png")
    data = {
        "images": [{"id": 5, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"area": 1.0, "iscrowd": 0, "image_id": 5, **a} for a in annotations],
        "categories": [{"id": 2, "name": "x"}, {"id": 9, "name": "y"}],
    }
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    return img_dir, ann_file


def test_item_follows_the_target_convention(train_set):
    image, target = train_set[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size"}
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
    assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
    assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert ((target["labels"] >= 0) & (target["labels"] < train_set.num_classes)).all()
    assert isinstance(target["image_id"], int)
    assert target["size"].tolist() == list(image.shape[-2:]) == target["orig_size"].tolist()


def test_boxes_and_labels_match_the_annotation_file(root, train_set):
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    for index in range(len(train_set)):
        image, target = train_set[index]
        h, w = image.shape[-2:]
        anns = [a for a in data["annotations"] if a["image_id"] == target["image_id"]]
        cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(1)
        xywh = torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], 1)
        assert_close(xywh, torch.tensor([a["bbox"] for a in anns]).reshape(-1, 4))
        cat_ids = [train_set.label_to_cat_id[int(label)] for label in target["labels"]]
        assert cat_ids == [a["category_id"] for a in anns]


def test_label_maps_round_trip(train_set):
    cat_ids = [c["id"] for c in CATEGORIES]
    assert train_set.num_classes == len(cat_ids)
    assert sorted(train_set.cat_id_to_label.values()) == list(range(len(cat_ids)))
    assert all(train_set.label_to_cat_id[train_set.cat_id_to_label[c]] == c for c in cat_ids)
    assert all(train_set.cat_id_to_label[train_set.label_to_cat_id[k]] == k for k in range(len(cat_ids)))
    assert train_set.label_to_cat_id != {k: k for k in range(len(cat_ids))}  # the gaps matter


def test_crowd_and_degenerate_boxes_are_not_targets(tmp_path):
    img_dir, ann_file = _write_single_image(
        tmp_path,
        [
            {"id": 1, "category_id": 9, "bbox": [2, 3, 10, 5]},
            {"id": 2, "category_id": 2, "bbox": [0, 0, 40, 30], "iscrowd": 1},
            {"id": 3, "category_id": 2, "bbox": [40, 0, 1, 5]},  # within tolerance, empty once clipped
            {"id": 4, "category_id": 2, "bbox": [5, 5, 6, 0]},  # zero height, allowed with "skip"
        ],
    )
    dataset = CocoDetection(img_dir, ann_file, degenerate="skip")
    _, target = dataset[0]
    assert_close(target["boxes"], torch.tensor([[7 / 40, 5.5 / 30, 10 / 40, 5 / 30]]))
    assert target["labels"].tolist() == [dataset.cat_id_to_label[9]] == [1]


def test_collate_pads_with_zeros_and_masks_the_padding():
    a = torch.ones(3, 4, 6)
    b = torch.full((3, 5, 3), 2.0)
    images, mask, targets = collate_fn([(a, {"image_id": 1}), (b, {"image_id": 2})])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6)
    assert [t["image_id"] for t in targets] == [1, 2]
    assert_close(images[0, :, :4, :6], a)
    assert_close(images[1, :, :5, :3], b)
    assert images[0, :, 4:].abs().sum() == 0 and images[1, :, :, 3:].abs().sum() == 0
    expected = torch.ones(2, 5, 6, dtype=torch.bool)
    expected[0, :4, :6] = False
    expected[1, :5, :3] = False
    assert torch.equal(mask, expected)


def test_build_dataset_with_params_transforms(root):
    val = build_dataset(root, "val", PARAMS, train=False)
    assert len(val) == 4
    image, target = val[0]
    assert min(image.shape[-2:]) == PARAMS["val_size"]
    assert target["size"].tolist() == list(image.shape[-2:])
    torch.manual_seed(0)
    train = build_dataset(root, "train", PARAMS, train=True)
    images, mask, targets = next(iter(DataLoader(train, batch_size=4, collate_fn=collate_fn)))
    assert images.shape[:2] == (4, 3) and mask.shape == (4, *images.shape[-2:])
    for i, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert (~mask[i]).sum() == h * w


def test_coco_preset_layout(root, tmp_path):
    assert split_paths("data/coco", "train", "coco") == (
        Path("data/coco/train2017"),
        Path("data/coco/annotations/instances_train2017.json"),
    )
    coco_root = tmp_path / "coco"
    shutil.copytree(root / "val", coco_root / "val2017")
    data = json.loads((root / "annotations" / "instances_val.json").read_text())
    first = data["annotations"][0]
    data["annotations"].append({**first, "id": 10**6, "bbox": [1.0, 1.0, 4.0, 0.0], "area": 0.0})
    (coco_root / "annotations").mkdir()
    (coco_root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    dataset = build_dataset(coco_root, "val", None, train=False, preset="coco")
    assert len(dataset) == 4
    total = sum(len(dataset[i][1]["boxes"]) for i in range(len(dataset)))
    assert total == len(data["annotations"]) - 1  # the zero-height box is skipped


def test_explicit_paths_override_the_layout(root):
    dataset = build_dataset(
        "nowhere",
        "val",
        None,
        False,
        img_dir=root / "val",
        ann_file=root / "annotations" / "instances_val.json",
    )
    assert len(dataset) == 4


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="preset"):
        split_paths("data", "train", "voc")
