"""Tests for kd/distill/detrdistill.py: HMLD, TAFD, QPAD and the MoCo term on tiny models (CPU)."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from torchvision.ops import box_convert, generalized_box_iou

from kd.distill.base import DistillLoss
from kd.distill.detrdistill import (
    DETRDistill,
    DETRDistillConfig,
    MoCoHead,
    clamp_boxes,
    hmld_match,
    hmld_terms,
    level_pairs,
    query_quality,
    tafd_mask,
    teacher_layers,
)
from kd.models import build_criterion, build_model

C = 5
BASE = {
    "backbone": "resnet18", "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 2, "ffn_dim": 64,
    "dropout": 0.0, "num_queries": 10, "num_classes": C, "enc_points": 2, "dec_points": 2,
}  # fmt: skip
KINDS = {
    "conditional": {"arch": "conditional_detr", "strides": (32,)},
    "dab": {"arch": "dab_detr", "strides": (32,)},
    "deformable": {"arch": "deformable_detr", "strides": (8, 16, 32)},
    "two_stage": {"arch": "deformable_detr", "strides": (8, 16, 32), "two_stage": True, "box_refine": True},
}
DISTILL_PREFIXES = ("loss_hmld_", "loss_tafd_", "loss_qpad_", "loss_contrastive_")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded on a shared CPU; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _cached(items: tuple) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dict(items))


def _model(kind: str, **kw) -> nn.Module:
    """A fresh copy of a tiny detector (built once per configuration: ResNet init is slow)."""
    return copy.deepcopy(_cached(tuple(sorted({**BASE, **KINDS[kind], **kw}.items()))))


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 56:] = True  # padding on the second image
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]]),
         "labels": torch.tensor([0, 2, 4])},
    ]  # fmt: skip
    return images, mask, targets


def _distill_only(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in losses.items() if k.startswith(DISTILL_PREFIXES)}


def _run(teacher, student, cfg: DETRDistillConfig | None = None):
    """(distiller, all losses) of one DistillLoss step."""
    distiller = DETRDistill(cfg or DETRDistillConfig(), teacher, student)
    criterion = build_criterion({}, C)
    images, mask, targets = _batch()
    losses = DistillLoss(teacher, criterion, distiller)(student, images, mask, targets)
    return distiller, losses


# ---------------------------------------------------------------------------- config


class TestConfig:
    def test_defaults_are_the_official_values(self):
        cfg = DETRDistillConfig.from_dict({})
        assert cfg == DETRDistillConfig()
        assert (cfg.hmld, cfg.tafd, cfg.qpad, cfg.contrastive, cfg.layer_by_layer) == (
            True,
            True,
            True,
            False,
            True,
        )
        assert (cfg.hmld_cost_cls, cfg.hmld_cost_bbox, cfg.hmld_cost_giou) == (1.0, 5.0, 2.0)
        assert (cfg.qpad_weight_cls, cfg.qpad_weight_bbox, cfg.qpad_weight_giou) == (2.0, 5.0, 2.0)
        assert (cfg.tafd_topk, cfg.contrastive_weight, cfg.qpad_adapter) == (100, 0.2, False)

    @pytest.mark.parametrize(
        ("values", "key"),
        [
            ({"bogus": 1}, "bogus"),
            ({"hmld_weight_cls": -1.0}, "hmld_weight_cls"),
            ({"tafd_topk": 0}, "tafd_topk"),
            ({"tafd_topk": 2.5}, "tafd_topk"),
            ({"hmld": "yes"}, "hmld"),
            ({"contrastive_temperature": 0.0}, "contrastive_temperature"),
            ({"focal_alpha": 1.5}, "focal_alpha"),
            ({"qpad_cost_cls": 0.0, "qpad_cost_bbox": 0.0, "qpad_cost_giou": 0.0}, "qpad_cost"),
        ],
    )
    def test_bad_values_name_the_key(self, values, key):
        with pytest.raises(ValueError, match=key):
            DETRDistillConfig.from_dict(values)


# ---------------------------------------------------------------------------- HMLD


def _pair_cost(s_logit, s_box, t_prob, t_box) -> torch.Tensor:
    """Official HMLD cost of one (student, teacher) pair, written independently of hmld_cost."""
    cls = F.binary_cross_entropy_with_logits(s_logit, t_prob, reduction="sum")
    giou = generalized_box_iou(
        box_convert(s_box[None], "cxcywh", "xyxy"), box_convert(t_box[None], "cxcywh", "xyxy")
    )
    return cls + 5 * (s_box - t_box).abs().sum() - 2 * giou[0, 0]


class TestHMLD:
    @pytest.mark.parametrize(("n_s", "n_t"), [(4, 3), (3, 4), (4, 4)])
    def test_matching_is_the_brute_force_optimum(self, n_s, n_t):
        g = torch.Generator().manual_seed(n_s * 10 + n_t)
        s_logits = torch.randn(1, n_s, 3, generator=g) * 2
        s_boxes = torch.rand(1, n_s, 4, generator=g) * 0.6 + 0.2  # some boxes leave the image
        t_probs = torch.rand(1, n_t, 3, generator=g)
        t_boxes = clamp_boxes(torch.rand(1, n_t, 4, generator=g) * 0.6 + 0.2)
        cost = torch.stack(
            [torch.stack([_pair_cost(s_logits[0, i], s_boxes[0, i], t_probs[0, j], t_boxes[0, j])
                          for j in range(n_t)]) for i in range(n_s)]
        )  # fmt: skip
        k = min(n_s, n_t)
        best = min(
            (sum(cost[i, j] for i, j in zip(rows, cols, strict=True)).item(), rows, cols)
            for rows in itertools.combinations(range(n_s), k)
            for cols in itertools.permutations(range(n_t), k)
        )
        rows, cols = hmld_match(s_logits, s_boxes, t_probs, t_boxes, (1.0, 5.0, 2.0))[0]
        assert_close(cost[rows, cols].sum().item(), best[0], rtol=0, atol=1e-5)
        assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == dict(
            zip(best[1], best[2], strict=True)
        )

    def test_unmatched_student_rows_get_background(self):
        g = torch.Generator().manual_seed(3)
        s_logits = torch.randn(1, 5, C, generator=g, requires_grad=True)
        s_boxes = torch.rand(1, 5, 4, generator=g) * 0.4 + 0.3
        t_probs = torch.rand(1, 3, C, generator=g)
        t_boxes = torch.rand(1, 3, 4, generator=g) * 0.4 + 0.3
        indices = hmld_match(s_logits.detach(), s_boxes, t_probs, t_boxes, (1.0, 5.0, 2.0))
        rows, cols = indices[0]
        cls, l1, giou = hmld_terms(s_logits, s_boxes, t_probs, t_boxes, indices)
        target = torch.zeros(5, C)
        target[rows] = t_probs[0, cols]
        expected = F.binary_cross_entropy_with_logits(s_logits[0], target, reduction="sum") / 3
        assert_close(cls, expected)
        unmatched = sorted(set(range(5)) - set(rows.tolist()))
        assert len(unmatched) == 2
        # background rows count against target 0 (the official code used target 80: a loss in the thousands)
        assert cls.item() < 3 * C
        expected_l1 = (s_boxes[0, rows] - t_boxes[0, cols]).abs().sum() / 3
        assert_close(l1, expected_l1)
        assert giou.item() > 0

    def test_terms_at_minimum_for_identical_predictions(self):
        g = torch.Generator().manual_seed(4)
        logits = torch.randn(2, 6, C, generator=g)
        boxes = torch.rand(2, 6, 4, generator=g) * 0.2 + torch.tensor(
            [0.4, 0.4, 0.1, 0.1]
        )  # inside the image
        indices = hmld_match(logits, boxes, logits.sigmoid(), boxes, (1.0, 5.0, 2.0))
        for rows, cols in indices:
            assert rows.tolist() == cols.tolist() == list(range(6))
        cls, l1, giou = hmld_terms(logits, boxes, logits.sigmoid(), boxes, indices)
        p = logits.sigmoid()
        entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum() / 12
        assert_close(cls, entropy)
        assert_close(l1, torch.tensor(0.0))
        assert_close(giou, torch.tensor(0.0), atol=1e-5, rtol=0)  # torchvision's GIoU eps (1e-7 / area)


# ---------------------------------------------------------------------------- TAFD


class TestTAFD:
    def test_quality_is_score_times_max_iou(self):
        logits = torch.tensor([[[2.0, -1.0], [0.5, 1.0]], [[2.0, -1.0], [0.5, 1.0]]])  # [B=2, Q=2, C=2]
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]).expand(2, -1, -1)
        hidden = torch.arange(2 * 2 * 3, dtype=torch.float).view(2, 2, 3)
        targets = [
            {
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]),
                "labels": torch.tensor([0, 1]),
            },
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        ]
        quality, emb = query_quality(logits, boxes, hidden, targets, topk=3)
        scores = torch.sigmoid(torch.tensor([2.0, 1.0, 0.5]))  # pairs (q0,c0), (q1,c1), (q1,c0)
        assert_close(quality[0], scores * torch.tensor([1.0, 0.0, 0.0]))  # query 1 misses both GT boxes
        assert_close(quality[1], scores)  # no GT: the score alone
        assert_close(emb[0], hidden[0, [0, 1, 1]])
        assert query_quality(logits, boxes, hidden, targets, topk=100)[0].shape == (2, 4)  # capped at Q*C

    def test_mask_formula(self):
        g = torch.Generator().manual_seed(5)
        quality = torch.tensor([[0.9, 0.2]])
        emb = torch.randn(1, 2, 4, generator=g)
        feat = torch.randn(1, 4, 3, 3, generator=g)
        mask = tafd_mask(quality, emb, feat)
        cos = torch.stack(
            [F.cosine_similarity(emb[0, n][:, None, None], feat[0], dim=0) for n in range(2)]
        )  # [2, 3, 3]
        raw = (quality[0][:, None, None] * cos).sum(0).clamp(min=0.01)
        assert_close(mask[0, 0], raw / raw.max())
        assert mask.shape == (1, 1, 3, 3)

    def test_levels_pair_by_size(self):
        t = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 2, 2)]
        assert level_pairs(t, [torch.zeros(1, 2, 2, 2)]) == [(2, 0)]
        assert level_pairs(t, t) == [(0, 0), (1, 1), (2, 2)]
        with pytest.raises(ValueError, match="TAFD"):
            level_pairs(t, [torch.zeros(1, 2, 3, 3)])


# ---------------------------------------------------------------------------- layer pairing


def test_teacher_layers():
    assert teacher_layers(2, 2, True) == [0, 1]
    assert teacher_layers(3, 2, True) == [0, 0, 1]
    assert teacher_layers(2, 4, True) == [1, 3]
    assert teacher_layers(3, 2, False) == [1, 1, 1]


def test_last_layer_mode_uses_the_teachers_last_layer():
    teacher = _model("deformable").eval()
    student = copy.deepcopy(teacher).eval()
    _, by_layer = _run(teacher, student, DETRDistillConfig(tafd=False, qpad=False))
    _, last = _run(teacher, student, DETRDistillConfig(tafd=False, qpad=False, layer_by_layer=False))
    assert_close(last["loss_hmld_cls_1"], by_layer["loss_hmld_cls_1"])
    assert (last["loss_hmld_cls_0"] - by_layer["loss_hmld_cls_0"]).abs().item() > 1e-4


# ---------------------------------------------------------------------------- student == teacher


@pytest.mark.parametrize("kind", list(KINDS))
def test_student_copy_of_teacher(kind):
    """HMLD at its minimum (entropy; boxes off only by the teacher's clamping), TAFD 0, QPAD = the teacher's
    own detection loss."""
    teacher = _model(kind).eval()
    student = copy.deepcopy(teacher).eval()
    distiller, losses = _run(teacher, student)
    images, mask, targets = _batch()
    with torch.no_grad():
        t_out = teacher(images, mask)
    t_losses = build_criterion({}, C)(t_out, targets)
    last = t_out.detection.num_layers - 1
    for layer in range(t_out.detection.num_layers):
        assert_close(losses[f"loss_tafd_feat_{layer}"], torch.tensor(0.0))
        suffix = "" if layer == last else f"_{layer}"
        for term in ("cls", "bbox", "giou"):
            assert_close(losses[f"loss_qpad_{term}_{layer}"], t_losses[f"loss_{term}{suffix}"])
        logits, boxes = t_out.detection.logits[layer], t_out.detection.boxes[layer]
        clamped = clamp_boxes(boxes)
        for rows, cols in hmld_match(logits, boxes, logits.sigmoid(), clamped, (1.0, 5.0, 2.0)):
            assert rows.tolist() == cols.tolist() == list(range(10))
        p = logits.sigmoid()
        m = p.shape[0] * p.shape[1]
        entropy = F.binary_cross_entropy(p, p, reduction="sum") / m
        assert_close(losses[f"loss_hmld_cls_{layer}"], entropy)
        assert_close(losses[f"loss_hmld_bbox_{layer}"], 5 * (boxes - clamped).abs().sum() / m)
        b, c = (
            box_convert(boxes.flatten(0, 1), "cxcywh", "xyxy"),
            box_convert(clamped.flatten(0, 1), "cxcywh", "xyxy"),
        )
        expected_giou = 2 * (1 - torch.diag(generalized_box_iou(b, c))).sum() / m
        assert_close(losses[f"loss_hmld_giou_{layer}"], expected_giou, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- QPAD


@pytest.mark.parametrize(
    ("t_kind", "t_kw", "s_kind", "s_kw"),
    [
        ("conditional", {}, "conditional", {"dec_layers": 3, "num_queries": 12}),
        ("two_stage", {}, "dab", {}),
    ],
)
def test_qpad_targets_are_the_teachers_assignment(t_kind, t_kw, s_kind, s_kw):
    teacher, student = _model(t_kind, **t_kw).eval(), _model(s_kind, **s_kw).train()
    distiller = DETRDistill(DETRDistillConfig(hmld=False, tafd=False), teacher, student)
    images, mask, targets = _batch()
    t_groups, s_groups = distiller.queries(teacher, student, 2)
    with torch.no_grad():
        t_out = teacher(images, mask, extra_queries=t_groups or None)
    s_out = student(images, mask, targets=targets, extra_queries=distiller.student_queries(t_out, s_groups))
    criterion = build_criterion({}, C)
    criterion(t_out, targets)  # the teacher's own matching, layer by layer
    pairs = teacher_layers(s_out.detection.num_layers, t_out.detection.num_layers, True)
    assignment = distiller.qpad_assignment(t_out, targets, pairs)
    for indices, l_t in zip(assignment, pairs, strict=True):
        for (src, tgt), (t_src, t_tgt) in zip(indices, criterion.last_layer_indices[l_t], strict=True):
            assert src.tolist() == t_src.tolist() and tgt.tolist() == t_tgt.tolist()
    losses = distiller(t_out, s_out, targets, criterion.last_indices)
    group = s_out.extra["qpad"]
    assert group.logits.shape[2] == t_out.detection.logits.shape[2]  # one student slot per teacher query
    for l_s, (indices, _) in enumerate(zip(assignment, pairs, strict=True)):
        expected = criterion.layer_losses(group.logits[l_s], group.boxes[l_s], targets, indices, 4.0)
        for term in ("cls", "bbox", "giou"):
            assert_close(losses[f"loss_qpad_{term}_{l_s}"], expected[f"loss_{term}"])


def test_qpad_query_mismatch_raises_unless_adapter():
    cond_t, cond_s = _model("conditional", hidden_dim=48), _model("conditional")
    with pytest.raises(ValueError, match="qpad_adapter"):
        DETRDistill(DETRDistillConfig(), cond_t, cond_s)  # embed width 48 vs 32
    with pytest.raises(ValueError, match="qpad_adapter"):
        DETRDistill(
            DETRDistillConfig(), _model("conditional"), _model("deformable")
        )  # embed of another model
    with pytest.raises(ValueError, match="qpad_adapter"):
        DETRDistill(DETRDistillConfig(), _model("dab"), _model("deformable"))  # box -> embed
    assert DETRDistill(DETRDistillConfig(qpad=False), cond_t, cond_s).qpad_adapter is None
    adapter = DETRDistill(DETRDistillConfig(qpad_adapter=True), cond_t, cond_s).qpad_adapter
    assert (adapter.in_features, adapter.out_features) == (48, 32)
    assert (
        DETRDistill(DETRDistillConfig(), _model("two_stage"), _model("dab")).qpad_adapter is None
    )  # box -> box


def test_missing_qpad_group_is_an_error():
    teacher, student = _model("two_stage").eval(), _model("two_stage")
    distiller = DETRDistill(DETRDistillConfig(hmld=False, tafd=False), teacher, student)
    assert distiller.queries(teacher, student, 2) == ({}, {})  # a two-stage teacher's come after its forward
    images, mask, targets = _batch()
    with torch.no_grad():
        t_out = teacher(images, mask)
    s_out = student(images, mask)  # student_queries not called: no "qpad" group
    with pytest.raises(ValueError, match="student_queries"):
        distiller(t_out, s_out, targets, [])


def test_dab_teacher_with_patterns_decodes_its_anchors():
    teacher, student = _model("dab", num_patterns=2).eval(), _model("dab")
    distiller = DETRDistill(DETRDistillConfig(hmld=False, tafd=False), teacher, student)
    t_groups, s_groups = distiller.queries(teacher, student, 2)
    assert_close(t_groups["qpad"], teacher.native_queries()[None])
    assert_close(s_groups["qpad"], teacher.native_queries()[None])
    _, losses = _run(teacher, student, DETRDistillConfig(hmld=False, tafd=False))
    assert {f"loss_qpad_{t}_{l}" for t in ("cls", "bbox", "giou") for l in range(2)} == set(
        _distill_only(losses)
    )


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("t_kind", "t_kw", "s_kind", "levels"),
    [
        ("deformable", {"hidden_dim": 48}, "deformable", {"0", "1", "2"}),
        ("two_stage", {"hidden_dim": 48}, "dab", {"2"}),
    ],
)
def test_gradients_reach_student_and_adapters_only(t_kind, t_kw, s_kind, levels):
    teacher = _model(t_kind, **t_kw).eval()  # requires_grad left on: the distiller itself must detach
    student = _model(s_kind).train()
    cfg = DETRDistillConfig(contrastive=True, qpad_adapter=True)
    distiller = DETRDistill(cfg, teacher, student)
    images, mask, targets = _batch()
    t_groups, s_groups = distiller.queries(teacher, student, 2)
    t_out = teacher(images, mask, extra_queries=t_groups or None)
    s_out = student(images, mask, targets=targets, extra_queries=distiller.student_queries(t_out, s_groups))
    losses = distiller(t_out, s_out, targets, [])
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert set(distiller.tafd_adapters) == levels  # 1x1 convs only for teacher levels a student level meets
    assert distiller.moco is not None
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for module in (student.backbone, student.input_proj, student.class_embed):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# ---------------------------------------------------------------------------- mismatched pairs


MISMATCHED = [
    # (teacher kind, teacher overrides, student kind, student overrides, qpad_adapter)
    (
        "conditional",
        {"hidden_dim": 48, "dec_layers": 3, "num_queries": 8},
        "conditional",
        {"num_queries": 12},
        True,
    ),
    ("dab", {"backbone": "resnet34", "dec_layers": 3}, "dab", {"num_queries": 12, "dn_groups": 2}, False),
    (
        "deformable",
        {"hidden_dim": 48, "num_queries": 8},
        "deformable",
        {"dec_layers": 3, "box_refine": True},
        True,
    ),
    (
        "two_stage",
        {"hidden_dim": 48, "num_queries": 8},
        "two_stage",
        {"num_queries": 12, "dn_groups": 2},
        False,
    ),
    ("two_stage", {}, "dab", {"num_queries": 12, "dec_layers": 3}, False),
    ("dab", {"hidden_dim": 48}, "deformable", {"num_queries": 12}, True),
    ("deformable", {"dec_layers": 3}, "conditional", {"num_queries": 12}, True),
    ("conditional", {"dec_layers": 1}, "deformable", {"dn_groups": 2, "two_stage": True}, True),
]


@pytest.mark.parametrize(("t_kind", "t_kw", "s_kind", "s_kw", "adapter"), MISMATCHED)
def test_mismatched_pairs(t_kind, t_kw, s_kind, s_kw, adapter):
    teacher, student = _model(t_kind, **t_kw).eval(), _model(s_kind, **s_kw).train()
    distiller, losses = _run(teacher, student, DETRDistillConfig(contrastive=True, qpad_adapter=adapter))
    n_s = s_kw.get("dec_layers", BASE["dec_layers"])
    n_t = t_kw.get("dec_layers", BASE["dec_layers"])
    expected = {
        f"loss_{p}_{t}_{l}" for p in ("hmld", "qpad") for t in ("cls", "bbox", "giou") for l in range(n_s)
    }
    expected |= {f"loss_contrastive_nce_{l}" for l in range(n_s)} | {
        f"loss_tafd_feat_{l}" for l in range(n_t)
    }
    distilled = _distill_only(losses)
    assert set(distilled) == expected
    for name, value in distilled.items():
        assert torch.isfinite(value) and value.item() >= 0, name
    for l in range(n_s):  # student rows without a teacher partner are background, not an invalid target
        assert losses[f"loss_hmld_cls_{l}"].item() < 2 * C
    sum(distilled.values()).backward()
    assert any(p.grad is not None for p in student.parameters())


def test_moco_head_is_contrastive():
    torch.manual_seed(0)
    head = MoCoHead(8, 12, mid_channels=16)
    s, t = torch.randn(6, 8), torch.randn(6, 12)
    loss = head(s, t)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for p in head.parameters())
