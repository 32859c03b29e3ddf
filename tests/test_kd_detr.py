"""Tests for kd/distill/kd_detr.py: shared distillation points, official loss, switches, mismatched pairs."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from kd.distill.base import DistillLoss
from kd.distill.kd_detr import (
    GENERAL,
    KDDETR,
    SPECIFIC,
    KDDETRConfig,
    box_to_embedding,
    kd_detr_terms,
    sample_anchors,
    sample_embeddings,
)
from kd.models import build_criterion, build_model
from kd.models.outputs import DecoderOutput, DetectorOutput

torch.set_num_threads(1)

B, C, SIZE = 2, 5, 64
BASE = {
    "backbone": "resnet18", "strides": [32], "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2,
    "ffn_dim": 64, "dropout": 0.0, "num_queries": 10, "num_classes": C,
}  # fmt: skip
DEFORMABLE = {"strides": [8, 16, 32], "enc_points": 2, "dec_points": 2}


@functools.cache
def _cached(arch: str, options: tuple) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"arch": arch, **BASE, **(DEFORMABLE if arch == "deformable_detr" else {}), **dict(options)}
    return build_model(cfg)


def tiny(arch: str, **kw) -> torch.nn.Module:
    """A fresh copy of a tiny detector (built once per configuration: the ResNet init is slow)."""
    return copy.deepcopy(_cached(arch, tuple(sorted(kw.items()))))


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(B, SIZE, SIZE, dtype=torch.bool)
    mask[1, :, SIZE // 2 :] = True
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]]), "labels": torch.tensor([0, 4])},
    ]
    return images, mask, targets


def kd_loss(teacher, student, **cfg) -> tuple[DistillLoss, KDDETR]:
    distiller = KDDETR(KDDETRConfig.from_dict(cfg), teacher, student)
    return DistillLoss(teacher, build_criterion({}, C), distiller), distiller


def kd_keys(losses: dict) -> dict:
    return {k: v for k, v in losses.items() if k.startswith("loss_kd_")}


# ---------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    cfg = KDDETRConfig.from_dict({})
    assert (cfg.temperature, cfg.weight_cls, cfg.weight_l1, cfg.weight_giou) == (10.0, 1.0, 5.0, 2.0)
    assert cfg.general and cfg.specific and cfg.fg_rebalance and not cfg.normalize_cls
    with pytest.raises(ValueError, match="unknown key"):
        KDDETRConfig.from_dict({"temprature": 5})
    for key, value in [("temperature", 0), ("num_general", 0), ("distribution", "beta"), ("general", 1),
                       ("weight_l1", -1.0), ("embed_points", "linear")]:  # fmt: skip
        with pytest.raises(ValueError, match=key):
            KDDETRConfig.from_dict({key: value})


def test_mismatched_classes_rejected():
    with pytest.raises(ValueError, match="classes"):
        KDDETR(KDDETRConfig(), tiny("dab_detr"), tiny("dab_detr", num_classes=3))


# ---------------------------------------------------------------------------- points


def test_points_shared_within_a_step_and_new_across_steps():
    teacher, student = tiny("dab_detr"), tiny("dab_detr", hidden_dim=16, num_queries=6)
    distiller = KDDETR(KDDETRConfig(), teacher, student)
    t1, s1 = distiller.queries(teacher, student, B)
    assert t1[GENERAL] is s1[GENERAL]  # one tensor for both models
    assert s1[GENERAL].shape == (1, 6, 4)  # default: the student's num_queries
    assert_close(s1[SPECIFIC][0], teacher.refpoint_embed.weight)
    assert not s1[SPECIFIC].requires_grad and SPECIFIC not in t1  # teacher: its detection output
    t2, s2 = distiller.queries(teacher, student, B)
    assert (t2[GENERAL] - t1[GENERAL]).abs().min() > 0


def test_distributions():
    torch.manual_seed(0)
    normal = sample_anchors(4000, "normal")
    uniform = sample_anchors(4000, "uniform").sigmoid()
    assert abs(normal.mean().item()) < 0.05 and abs(normal.std().item() - 1) < 0.05
    assert abs(uniform.mean().item() - 0.5) < 0.02 and abs(uniform.var().item() - 1 / 12) < 0.01
    emb = sample_embeddings(1000, 8, "uniform")
    assert emb.min() >= -1 and emb.max() <= 1 and emb.shape == (1, 1000, 8)


def test_embed_points_equal_widths_are_sampled_directly():
    teacher, student = tiny("conditional_detr"), tiny("conditional_detr", dec_layers=1, num_queries=6)
    distiller = KDDETR(KDDETRConfig(num_general=7), teacher, student)
    torch.manual_seed(3)
    t, s = distiller.queries(teacher, student, B)
    torch.manual_seed(3)
    assert t[GENERAL] is s[GENERAL]
    assert_close(t[GENERAL], sample_embeddings(7, 32, "normal"))
    assert distiller.specific_adapter is None
    assert_close(s[SPECIFIC][0], teacher.query_embed.weight)


def test_points_through_sine_map_are_the_same_boxes():
    """Different formats/widths: each model gets its own rendering of the same anchors."""
    teacher, student = tiny("conditional_detr"), tiny("conditional_detr", hidden_dim=16)
    distiller = KDDETR(KDDETRConfig(), teacher, student)
    torch.manual_seed(4)
    t, s = distiller.queries(teacher, student, B)
    torch.manual_seed(4)
    anchors = sample_anchors(10, "normal")
    assert_close(t[GENERAL], box_to_embedding(anchors, 32))
    assert_close(s[GENERAL], box_to_embedding(anchors, 16))
    assert s[SPECIFIC].shape == (1, 10, 16)  # the teacher's [10, 32] embeddings through the adapter
    dab = tiny("dab_detr")
    distiller = KDDETR(KDDETRConfig(), dab, teacher)  # box teacher -> embed student
    t, s = distiller.queries(dab, teacher, B)
    assert_close(s[GENERAL], box_to_embedding(t[GENERAL], 32))
    assert_close(s[SPECIFIC], box_to_embedding(dab.refpoint_embed.weight[None], 32))
    assert distiller.specific_adapter is None


def test_box_to_embedding_recovers_the_box():
    """The first (sin, cos) pair of each coordinate's block encodes 2*pi*sigmoid(a): the map keeps the box."""
    anchors = torch.randn(1, 6, 4)
    emb = box_to_embedding(anchors, 32).view(1, 6, 4, 8)
    angle = torch.atan2(emb[..., 0], emb[..., 1]).remainder(2 * torch.pi)
    assert_close(angle / (2 * torch.pi), anchors.sigmoid())


# ---------------------------------------------------------------------------- loss


def test_terms_match_the_official_formulas():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(6, C), torch.randn(6, C) * 3
    s_boxes, t_boxes = torch.rand(6, 2) * 0.5 + 0.25, torch.rand(6, 2) * 0.5 + 0.25
    s_boxes = torch.cat([s_boxes, torch.rand(6, 2) * 0.3 + 0.1], -1)
    t_boxes = torch.cat([t_boxes, torch.rand(6, 2) * 0.3 + 0.1], -1)
    w = t_logits.sigmoid().max(1)[0]
    cls, l1, giou = kd_detr_terms(s_logits, s_boxes, t_logits, t_boxes, w, 10.0)
    target = F.softmax(t_logits / 10, dim=1)  # the official loss_kl_div / loss_boxes, written out
    kl = F.kl_div(F.log_softmax(s_logits / 10, dim=1), target, reduction="none").mean(1) * 100
    assert_close(cls, (kl * w).sum())
    assert_close(l1, (F.l1_loss(s_boxes, t_boxes, reduction="none").mean(1) * w).sum() / w.sum())
    from torchvision.ops import box_convert, generalized_box_iou

    g = torch.diag(
        generalized_box_iou(box_convert(s_boxes, "cxcywh", "xyxy"), box_convert(t_boxes, "cxcywh", "xyxy"))
    )
    assert_close(giou, ((1 - g) * w).sum() / w.sum())
    cls_n, _, _ = kd_detr_terms(s_logits, s_boxes, t_logits, t_boxes, w, 10.0, normalize_cls=True)
    assert_close(cls_n, cls / 6)


def _fake_output(logits: torch.Tensor, boxes: torch.Tensor, group: str) -> DetectorOutput:
    """A DetectorOutput whose detection and ``group`` are the given [L, B, M, ...] predictions."""
    dec = DecoderOutput(logits=logits, boxes=boxes, hidden=logits, references=boxes)
    return DetectorOutput(
        detection=dec, memory=logits[0], memory_mask=logits[0, ..., 0] > 0, spatial_shapes=torch.ones(1, 2),
        features=[], feature_masks=[], extra={group: dec, GENERAL: dec},
    )  # fmt: skip


@pytest.mark.parametrize("fg_rebalance", [True, False])
def test_foreground_weights_are_teacher_max_prob(fg_rebalance):
    teacher, student = tiny("dab_detr"), tiny("dab_detr")
    distiller = KDDETR(KDDETRConfig(fg_rebalance=fg_rebalance), teacher, student)
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(2, B, 4, C) * 3, torch.randn(3, B, 4, C)
    t_boxes, s_boxes = torch.rand(2, B, 4, 4) * 0.2 + 0.4, torch.rand(3, B, 4, 4) * 0.2 + 0.4
    losses = distiller(
        _fake_output(t_logits, t_boxes, SPECIFIC), _fake_output(s_logits, s_boxes, SPECIFIC), [], []
    )
    assert sorted(losses) == sorted(
        f"loss_kd_{g}_{t}_{lid}"
        for g in ("general", "specific")
        for t in ("cls", "bbox", "giou")
        for lid in range(3)
    )
    w = t_logits[-1].sigmoid().amax(-1).flatten() if fg_rebalance else torch.ones(B * 4)
    for lid in range(3):  # every student layer against the teacher's final layer; weights 1 / 5 / 2
        cls, l1, giou = kd_detr_terms(
            s_logits[lid].flatten(0, 1), s_boxes[lid].flatten(0, 1), t_logits[-1].flatten(0, 1),
            t_boxes[-1].flatten(0, 1), w, 10.0,
        )  # fmt: skip
        assert_close(losses[f"loss_kd_specific_cls_{lid}"], cls)
        assert_close(losses[f"loss_kd_specific_bbox_{lid}"], 5 * l1)
        assert_close(losses[f"loss_kd_specific_giou_{lid}"], 2 * giou)
    if not fg_rebalance:  # w = 1: box terms are plain means, the class term still a sum
        l1 = (s_boxes[0] - t_boxes[-1]).abs().mean()
        assert_close(losses["loss_kd_general_bbox_0"], 5 * l1)


def test_switches():
    teacher, student = tiny("dab_detr"), tiny("dab_detr")
    for cfg, present, absent in [
        (KDDETRConfig(general=False), "specific", "general"),
        (KDDETRConfig(specific=False), "general", "specific"),
    ]:
        distiller = KDDETR(cfg, teacher, student)
        t, s = distiller.queries(teacher, student, B)
        assert (GENERAL in s) == cfg.general and (SPECIFIC in s) == cfg.specific
        loss_fn = DistillLoss(teacher, build_criterion({}, C), distiller)
        losses = kd_keys(loss_fn(student, *batch()))
        assert losses and all(f"_{present}_" in k for k in losses)
        assert not any(f"_{absent}_" in k for k in losses)
    loss_fn, _ = kd_loss(teacher, student, all_layers=False)
    assert sorted(kd_keys(loss_fn(student, *batch()))) == sorted(
        f"loss_kd_{g}_{t}_1" for g in ("general", "specific") for t in ("cls", "bbox", "giou")
    )


# ---------------------------------------------------------------------------- student == teacher, gradients

COPIES = {
    "dab_detr": {},
    "conditional_detr": {},
    "deformable_two_stage": {"two_stage": True, "box_refine": True},
    "deformable_plain": {},
}


@pytest.mark.parametrize("name", list(COPIES))
def test_zero_when_student_is_teacher(name):
    arch = "deformable_detr" if name.startswith("deformable") else name
    teacher = tiny(arch, **COPIES[name])
    with torch.no_grad():  # the official zero init of the box heads would make every layer's boxes equal
        for p in teacher.bbox_embed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    student = tiny(arch, **COPIES[name])
    student.load_state_dict(teacher.state_dict())
    loss_fn, _ = kd_loss(teacher, student)
    student.eval()
    losses = kd_keys(loss_fn(student, *batch()))
    last = BASE["dec_layers"] - 1
    for group in ("specific", "general"):  # the final layer meets the teacher's final layer exactly
        assert_close(losses[f"loss_kd_{group}_cls_{last}"], torch.tensor(0.0), atol=1e-5, rtol=0)
        assert_close(losses[f"loss_kd_{group}_bbox_{last}"], torch.tensor(0.0), atol=1e-6, rtol=0)
        assert losses[f"loss_kd_{group}_giou_{last}"] < 1e-3  # torchvision GIoU eps floor (~1e-7 / area)
    assert all(v > -1e-6 for v in losses.values())
    assert losses[f"loss_kd_general_bbox_{last - 1}"] > 1e-4  # earlier layers still have something to learn


def test_gradients_reach_student_and_adapter_never_teacher():
    teacher = tiny("conditional_detr")  # "embed" teacher -> "box" student: a learned specific adapter
    student = tiny("dab_detr", hidden_dim=16, dec_layers=1, num_queries=6)
    distiller = KDDETR(KDDETRConfig(), teacher, student)
    assert distiller.specific_adapter is not None
    assert [p.requires_grad for p in teacher.parameters()][0]
    images, mask, targets = batch()
    t_groups, s_groups = distiller.queries(teacher, student, B)
    t_out = teacher(images, mask, extra_queries=t_groups)  # not under no_grad: the distiller must detach
    s_out = student(images, mask, targets=targets, extra_queries=s_groups)
    losses = distiller(t_out, s_out, targets, [])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.class_embed.weight.grad.abs().sum() > 0
    assert student.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert distiller.specific_adapter.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- mismatched pairs

PAIRS = {
    "dab_to_dab": (
        ("dab_detr", {}),
        ("dab_detr", {"hidden_dim": 16, "dec_layers": 1, "num_queries": 6, "dn_groups": 2}),
    ),
    "dab_patterns_to_dab": (("dab_detr", {"num_patterns": 2}), ("dab_detr", {"dec_layers": 3})),
    "deformable_two_stage_to_plain": (
        ("deformable_detr", {"two_stage": True, "box_refine": True}),
        ("deformable_detr", {"hidden_dim": 16, "dec_layers": 1, "num_queries": 6}),
    ),
    "deformable_two_stage_to_two_stage_dn": (
        ("deformable_detr", {"two_stage": True, "box_refine": True}),
        (
            "deformable_detr",
            {"hidden_dim": 16, "num_queries": 6, "two_stage": True, "box_refine": True, "dn_groups": 2},
        ),
    ),  # fmt: skip
    "conditional_to_conditional": (
        ("conditional_detr", {}),
        ("conditional_detr", {"hidden_dim": 16, "dec_layers": 3, "num_queries": 6}),
    ),
    "conditional_to_dab": (("conditional_detr", {}), ("dab_detr", {"hidden_dim": 16})),
    "dab_to_deformable_plain": (("dab_detr", {}), ("deformable_detr", {"num_queries": 6})),
    "deformable_plain_to_conditional": (("deformable_detr", {}), ("conditional_detr", {"hidden_dim": 16})),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_mismatched_pairs(name):
    (t_arch, t_kw), (s_arch, s_kw) = PAIRS[name]
    teacher, student = tiny(t_arch, **t_kw), tiny(s_arch, **s_kw).train()
    loss_fn, distiller = kd_loss(teacher, student, num_general=5)
    losses = loss_fn(student, *batch())
    kd = kd_keys(losses)
    layers = s_kw.get("dec_layers", BASE["dec_layers"])
    assert len(kd) == 2 * 3 * layers
    assert all(torch.isfinite(v) for v in kd.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
