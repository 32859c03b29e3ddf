"""Tests for kd/pretrain.py and kd/pretrain_dense.py: targets on hand-built boxes, both tasks end to end."""

from __future__ import annotations

import math

import pytest
import torch
from pycocotools.coco import COCO

from kd.data.synthetic import SyntheticConfig, generate
from kd.models.backbone import Backbone
from kd.pretrain import PretrainConfig, pretrain_backbone
from kd.pretrain_dense import IGNORE, DenseNet, dense_loss, dense_targets, make_batch


def test_locations_take_the_smallest_containing_box():
    # stride 16, grid 4 x 4 (centres 8, 24, 40, 56); a big box and a small one inside it
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0], [16.0, 16.0, 48.0, 32.0]])
    labels = torch.tensor([3, 7])
    cls, sides = dense_targets(boxes, labels, size=(64, 64), grid=(4, 4), stride=16)
    expected = torch.tensor([[3, 3, 3, 3], [3, 7, 7, 3], [3, 3, 3, 3], [0, 0, 0, 0]])
    assert torch.equal(cls, expected)
    # location (row 1, col 1), centre (24, 24): small box sides l=8, t=8, r=24, b=8, in units of 16
    assert torch.allclose(sides[1, 1], torch.log(torch.tensor([8.0, 8.0, 24.0, 8.0]) / 16))
    assert torch.equal(sides[3], torch.zeros(4, 4))  # background


def test_a_box_between_centres_keeps_its_centre_cell():
    # 10 px box centred at (36, 20): no location centre inside it, the cell holding its centre is positive
    box = torch.tensor([[31.0, 15.0, 41.0, 25.0]])
    cls, sides = dense_targets(box, torch.tensor([5]), (64, 64), (4, 4), 16)
    assert cls.sum() == 5 and cls[1, 2] == 5
    assert torch.isfinite(sides).all() and (sides[1, 2] >= math.log(1 / 16) - 1e-6).all()


def test_padding_is_ignored_and_no_boxes_is_background():
    cls, sides = dense_targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), (48, 64), (4, 4), 16)
    assert (cls[:3] == 0).all() and (cls[3] == IGNORE).all()  # the last row (centre 56) is below 48 px
    assert not sides.any()


def test_flipped_batch_mirrors_the_targets():
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    boxes, labels = [torch.tensor([[0.0, 0.0, 40.0, 64.0]])], [torch.tensor([2])]
    _, plain = make_batch([image], boxes, labels, 64, 96, torch.tensor([False]))
    _, flipped = make_batch([image], boxes, labels, 64, 96, torch.tensor([True]))
    assert torch.equal(plain[0][0].flip(-1), flipped[0][0])


def test_loss_is_lower_for_the_right_answer():
    boxes, labels = torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([1])
    cls, sides = dense_targets(boxes, labels, (64, 64), (4, 4), 16)
    good = torch.zeros(1, 2 + 4, 4, 4)
    good[0, 1], good[0, 2:] = 10.0, sides.permute(2, 0, 1)
    bad = torch.zeros(1, 2 + 4, 4, 4)
    target = [(cls[None], sides[None])]
    low, correct, seen = dense_loss([good], target, num_classes=1, box_weight=1.0)
    high, _, _ = dense_loss([bad], target, num_classes=1, box_weight=1.0)
    assert (correct, seen) == (16, 16) and low < 1e-3 < high


def test_dense_net_shapes():
    out = DenseNet("resnet18", num_classes=10)(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 15, 4, 6), (2, 15, 2, 3)]
    out = DenseNet("resnet50", num_classes=3, strides=(32, 8))(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(1, 8, 8, 12), (1, 8, 2, 3)]  # sorted: C3 then C5


def test_c3_targets_in_the_batch():
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    boxes, labels = [torch.tensor([[6.0, 6.0, 22.0, 22.0]])], [torch.tensor([3])]
    x, targets = make_batch([image], boxes, labels, 64, 96, torch.tensor([False]), strides=(8, 16, 32))
    assert [t[0].shape[1:] for t in targets] == [(8, 12), (4, 6), (2, 3)]
    assert int((targets[0][0] == 3).sum()) == 2 * 2  # the 16-px box holds 2 x 2 stride-8 centres
    assert int((targets[1][0] == 3).sum()) == 1


@pytest.mark.parametrize("strides", [[4, 16], [16, 16], []])
def test_bad_strides(strides):
    with pytest.raises(ValueError, match="pretrain.strides"):
        PretrainConfig(strides=strides)


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="pretrain.task"):
        PretrainConfig(task="segment")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate(SyntheticConfig(seed=0, num_train=6, num_val=2), root, workers=1)
    return root


@pytest.mark.parametrize("task", ["dense", "crops"])
def test_pretrain_writes_a_backbone_the_detectors_load(tiny_root, tmp_path, task):
    coco = COCO(str(tiny_root / "annotations" / "instances_train.json"))
    cfg = PretrainConfig(task=task, epochs=1, batch_size=4, crop_size=32, amp="none")
    out = tmp_path / "r18.pt"
    result = pretrain_backbone(coco, tiny_root / "train", cfg, out, log=lambda *_: None)
    assert math.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    state = torch.load(out, weights_only=True)
    assert "conv1.weight" in state and not any(k.startswith(("fc.", "heads.")) for k in state)
    Backbone("resnet18", strides=(16, 32), weights=str(out))  # strict load
