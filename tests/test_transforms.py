"""Tests of kd/data/transforms.py: boxes stay on the same pixels through every transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from kd.data.transforms import (
    COCO_TRANSFORMS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    build_transforms,
    coco_recipe,
    crop,
    hflip,
    resize,
    resized_shape,
)

PARAMS = {"train_sizes": [128, 144, 160, 176, 192], "val_size": 160, "max_size": 256, "crop": True}


def _scene(w: int = 100, h: int = 80) -> tuple[Image.Image, dict]:
    """Black image with two white rectangles; target in absolute xyxy."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[10:40, 20:50] = 255
    arr[50:70, 70:95] = 255
    boxes = torch.tensor([[20.0, 10.0, 50.0, 40.0], [70.0, 50.0, 95.0, 70.0]])
    target = {"boxes": boxes, "labels": torch.tensor([3, 7]), "image_id": 1, "size": torch.tensor([h, w])}
    return Image.fromarray(arr), target


def _bright_box(image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Pixel xyxy extent of the bright pixels inside (a margin around) a normalised cxcywh box."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    grey = (image * std + mean).mean(0)
    h, w = grey.shape
    cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
    x0, y0 = max(int(cx - bw / 2) - 3, 0), max(int(cy - bh / 2) - 3, 0)
    x1, y1 = min(int(cx + bw / 2) + 4, w), min(int(cy + bh / 2) + 4, h)
    ys, xs = torch.nonzero(grey[y0:y1, x0:x1] > 0.5, as_tuple=True)
    return torch.tensor(
        [xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1], dtype=torch.float32
    )


def test_hflip_moves_boxes_and_twice_is_identity():
    image, target = _scene()
    flipped, t1 = hflip(image, target)
    assert_close(t1["boxes"][0], torch.tensor([50.0, 10.0, 80.0, 40.0]))
    back, t2 = hflip(flipped, t1)
    assert_close(t2["boxes"], target["boxes"])
    assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize(
    ("hw", "size", "max_size", "expected"),
    [
        ((80, 100), 160, None, (160, 200)),
        ((80, 100), 160, 150, (120, 150)),
        ((500, 1000), 800, 1333, (666, 1332)),
    ],
)
def test_resized_shape(hw, size, max_size, expected):
    assert resized_shape(*hw, size, max_size) == expected


def test_resize_scales_boxes_and_sets_size():
    image, target = _scene()
    out, t = resize(image, target, 160)
    assert out.size == (200, 160)
    assert_close(t["boxes"], target["boxes"] * 2)
    assert t["size"].tolist() == [160, 200]


def test_crop_shifts_clips_and_drops_vanished_boxes():
    image, target = _scene()
    out, t = crop(image, target, top=20, left=30, height=40, width=40)
    assert out.size == (40, 40)
    assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 20.0, 20.0]]))  # second box is outside: dropped
    assert t["labels"].tolist() == [3]
    assert t["size"].tolist() == [40, 40]


def test_random_size_crop_keeps_boxes_inside():
    image, target = _scene()
    torch.manual_seed(0)
    for _ in range(30):
        out, t = RandomSizeCrop(30, 70)(image, target)
        assert 30 <= out.width <= 70 and 30 <= out.height <= 70
        b = t["boxes"]
        assert len(b) == len(t["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, 2] <= out.width).all() and (b[:, 3] <= out.height).all()


def test_random_size_crop_on_an_image_smaller_than_min_size():
    image, target = _scene(w=20, h=16)
    out, _ = RandomSizeCrop(30, 70)(image, {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
    assert out.size == (20, 16)


def test_random_select_takes_both_branches():
    torch.manual_seed(0)
    pick = RandomSelect(lambda im, t: (im, "first"), lambda im, t: (im, "second"))
    assert {pick(None, {})[1] for _ in range(50)} == {"first", "second"}


def test_normalize_gives_normalised_cxcywh():
    image, target = _scene()
    tensor, t = Normalize()(*ToTensor()(image, target))
    assert_close(t["boxes"][0], torch.tensor([35 / 100, 25 / 80, 30 / 100, 30 / 80]))
    assert t["boxes"].dtype == torch.float32
    assert_close(tensor[:, 0, 0], -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))


@pytest.mark.parametrize("seed", range(8))
def test_boxes_stay_on_their_pixels_through_the_train_pipeline(seed):
    image, target = _scene()
    torch.manual_seed(seed)
    out, t = build_transforms(PARAMS, train=True)(image, target)
    assert t["size"].tolist() == list(out.shape[-2:])
    assert len(t["boxes"]) == len(t["labels"])
    for box in t["boxes"]:
        h, w = out.shape[-2:]
        pixels = box.new_tensor([w, h, w, h])
        from_box = torch.cat([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2]) * pixels
        assert_close(_bright_box(out, box), from_box, atol=2.0, rtol=0.0)


def test_val_pipeline_is_deterministic_and_uses_val_size():
    image, target = _scene()
    a, ta = build_transforms(PARAMS, train=False)(image, target)
    b, tb = build_transforms(PARAMS, train=False)(image, target)
    assert_close(a, b)
    assert_close(ta["boxes"], tb["boxes"])
    assert min(a.shape[-2:]) == PARAMS["val_size"]


def test_empty_target_passes_the_train_pipeline():
    image, target = _scene()
    target = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    torch.manual_seed(0)
    _, t = build_transforms(PARAMS, train=True)(image, target)
    assert t["boxes"].shape == (0, 4)


def test_coco_recipe_is_detrs():
    train = coco_recipe(train=True)
    scale = train.transforms[1].first
    assert isinstance(scale, RandomResize)
    assert scale.sizes == list(range(480, 801, 32)) and scale.max_size == 1333
    branch = train.transforms[1].second.transforms
    assert branch[0].sizes == [400, 500, 600]
    assert (branch[1].min_size, branch[1].max_size) == (384, 600)
    image = Image.new("RGB", (1000, 500))
    out, _ = coco_recipe(train=False)(image, {"boxes": torch.zeros(0, 4)})
    assert tuple(out.shape[-2:]) == resized_shape(500, 1000, COCO_TRANSFORMS["val_size"], 1333)


def test_missing_transform_keys_are_a_value_error():
    with pytest.raises(ValueError, match=r"data.transforms: missing key\(s\) \['val_size', 'max_size'\]"):
        build_transforms({}, train=False)
