"""Tests for kd/distill/base.py: the teacher stays frozen, and a shared frozen backbone runs once per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.testing import assert_close

from kd.distill.base import DistillLoss
from kd.distill.kd_detr import KDDETR, KDDETRConfig
from kd.models import build_criterion, build_model

torch.set_num_threads(1)
C = 4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return str(path)


def detector(weights: str | None, hidden: int, **kw) -> torch.nn.Module:
    torch.manual_seed(hidden)
    cfg = {"arch": "deformable_detr", "backbone": "resnet18", "backbone_weights": weights,
           "strides": [16, 32], "hidden_dim": hidden, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
           "ffn_dim": 32, "dropout": 0.0, "num_queries": 6, "num_classes": C, "enc_points": 2,
           "dec_points": 2, "dn_groups": 0, **kw}  # fmt: skip
    model = build_model(cfg)
    model.backbone.requires_grad_(False)  # what the optimizer does with lr_backbone 0
    return model


def step(loss_fn: DistillLoss, student) -> dict:
    g = torch.Generator().manual_seed(1)
    images, mask = torch.randn(2, 3, 64, 64, generator=g), torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}] * 2
    torch.manual_seed(2)  # KD-DETR draws its general points
    return loss_fn(student, images, mask, targets)


def calls(module: torch.nn.Module) -> list:
    seen: list = []
    module.body.register_forward_hook(lambda *_: seen.append(1))
    return seen


@pytest.mark.parametrize(
    ("t_strides", "s_strides"),
    [([16, 32], [16, 32]), ([8, 16, 32], [16, 32]), ([16, 32], [8, 16, 32])],
    ids=["same strides", "teacher has a finer level", "student has a finer level"],
)
def test_shared_frozen_backbone_runs_once_with_the_same_losses(weights, t_strides, s_strides):
    teacher, student = detector(weights, 16, strides=t_strides), detector(weights, 8, strides=s_strides)
    loss_fn = DistillLoss(teacher, build_criterion({}, C), KDDETR(KDDETRConfig(), teacher, student))
    t_calls, s_calls = calls(teacher.backbone), calls(student.backbone)
    shared = step(loss_fn, student)
    assert loss_fn._shared_backbone and len(t_calls) + len(s_calls) == 1  # the trunk ran once
    assert len(t_calls if len(t_strides) >= len(s_strides) else s_calls) == 1  # the one with more levels
    separate_fn = copy.copy(loss_fn)
    separate_fn._shared_backbone = False
    separate = step(separate_fn, student)
    assert len(t_calls) + len(s_calls) == 3
    assert shared.keys() == separate.keys()
    for k in shared:
        assert_close(shared[k], separate[k], msg=k)
    sum(shared.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("case", ["other weights", "trainable", "other strides"])
def test_backbone_is_not_shared_unless_frozen_and_identical(weights, tmp_path, case):
    teacher, student = detector(weights, 16), detector(weights, 8)
    if case == "other weights":
        student = detector(None, 8, backbone_norm="frozen_bn")  # random weights
        student.backbone.requires_grad_(False)
    elif case == "trainable":
        student.backbone.requires_grad_(True)
    else:  # neither reads all of the other's levels
        student = detector(weights, 8, strides=[8, 16])
    loss_fn = DistillLoss(teacher, build_criterion({}, C), KDDETR(KDDETRConfig(), teacher, student))
    s_calls = calls(student.backbone)
    step(loss_fn, student)
    assert loss_fn._shared_backbone is False and len(s_calls) == 1
