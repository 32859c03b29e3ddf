"""Tests for kd/distill/qskd.py: config, copied student at the minimum, gradients, AGFD wiring, mismatches."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from kd.distill.attention import query_attention_maps
from kd.distill.base import DistillLoss
from kd.distill.qskd import QSKD, QSKDConfig, to_student_grid
from kd.distill.selection import select_groups_batch
from kd.models import build_criterion, build_model
from kd.models.matcher import HungarianMatcher

torch.set_num_threads(1)
ARCHS = ("conditional_detr", "dab_detr", "deformable_detr")
BASE = {
    "backbone": "resnet18", "strides": [8, 16, 32], "hidden_dim": 32, "nheads": 2, "enc_layers": 1,
    "dec_layers": 2, "ffn_dim": 64, "dropout": 0.0, "num_queries": 10, "num_classes": 5, "enc_points": 2,
    "dec_points": 2,
}  # fmt: skip


@functools.cache
def _cached(arch: str, options: tuple, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({**BASE, "arch": arch, **dict(options)})


def _model(arch: str, seed: int = 0, **kw) -> nn.Module:
    """A fresh copy of a tiny detector (built once per configuration: ResNet init is slow)."""
    return copy.deepcopy(_cached(arch, tuple(sorted(kw.items())), seed))


def _batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 40:] = True  # the second image is padded on the right
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), "labels": torch.tensor([0, 2])},
    ]
    return images, mask, targets


def _outputs(teacher, student, attention=True, teacher_grad=False):
    images, mask, targets = _batch()
    with torch.set_grad_enabled(teacher_grad):
        t_out = teacher(images, mask, return_attention=attention)
    s_out = student(images, mask, targets=targets, return_attention=attention)
    return t_out, s_out, targets


def _final_indices(out, targets):
    return HungarianMatcher()(out.logits, out.boxes, targets)


class TestConfig:
    def test_defaults(self):
        cfg = QSKDConfig.from_dict({})
        assert (cfg.gqs, cfg.agfd, cfg.lapd, cfg.tau, cfg.grouping, cfg.select_on) == (
            True, True, True, 0.0, "per_gt", "teacher",
        )  # fmt: skip
        assert (cfg.lapd_cls, cfg.lapd_l1, cfg.lapd_giou, cfg.agfd_weight) == (1.0, 5.0, 2.0, 100.0)
        assert cfg.lapd_neg_box == 1.0
        assert QSKDConfig.from_dict({"tau": -1, "select_on": "both"}).tau == -1

    @pytest.mark.parametrize(
        ("d", "match"),
        [
            ({"taus": 0.1}, "unknown key 'taus'"),
            ({"tau": 1.5}, r"tau: expected a value in \[-1.0, 1.0\]"),
            ({"grouping": "image"}, "grouping: expected one of"),
            ({"gqs": 1}, "gqs: expected true/false"),
            ({"lapd_l1": -1.0}, "lapd_l1"),
            ({"lapd_neg_box": -0.5}, "lapd_neg_box"),
            ({"agfd_mask_floor": 0.0}, "agfd_mask_floor"),
            ({"agfd_weight": "100"}, "agfd_weight: expected a finite number"),
            ({"agfd_weight": float("inf")}, "agfd_weight"),
        ],
    )
    def test_bad_values(self, d, match):
        with pytest.raises(ValueError, match=match):
            QSKDConfig.from_dict(d)

    def test_adapter_and_attention_flag(self):
        teacher, wide = _model("conditional_detr"), _model("conditional_detr", hidden_dim=16)
        distiller = QSKD(QSKDConfig(), teacher, wide)
        assert distiller.needs_attention and isinstance(distiller.adapter, nn.Linear)
        assert (distiller.adapter.in_features, distiller.adapter.out_features) == (16, 32)
        assert isinstance(QSKD(QSKDConfig(), teacher, teacher).adapter, nn.Identity)
        off = QSKD(QSKDConfig(agfd=False), teacher, wide)
        assert not off.needs_attention and isinstance(off.adapter, nn.Identity)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("select_on", "tau"), [("teacher", 0.0), ("both", -1.0), ("student", -1.0)])
def test_copied_student_is_at_the_minimum(arch, select_on, tau):
    teacher = _model(arch).eval()
    student = copy.deepcopy(teacher)
    t_out, s_out, targets = _outputs(teacher, student)
    cfg = QSKDConfig(select_on=select_on, tau=tau, agfd_features="neck" if arch == "dab_detr" else "memory")
    losses = QSKD(cfg, teacher, student)(t_out, s_out, targets, _final_indices(s_out, targets))
    assert len(losses) == 4 * 2
    for lid in range(2):
        assert_close(losses[f"loss_agfd_feat_{lid}"], torch.tensor(0.0))
        assert_close(losses[f"loss_lapd_bbox_{lid}"], torch.tensor(0.0))
        # torchvision's GIoU loss has an eps of 1e-7 in its divisions: identical small boxes give ~1e-5
        assert_close(losses[f"loss_lapd_giou_{lid}"], torch.tensor(0.0), rtol=0, atol=1e-4)
    # soft BCE against the student's own probabilities: at its minimum (zero gradient, = the entropy)
    cls = losses["loss_lapd_cls_0"] + losses["loss_lapd_cls_1"]
    (grad,) = torch.autograd.grad(cls, s_out.detection.logits)
    assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-7)
    assert float(cls.detach()) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_student_and_adapter_never_teacher(arch):
    teacher = _model(arch).eval()  # parameters left trainable: only detaching can keep them out
    student = _model(arch, seed=1, hidden_dim=16).train()
    t_out, s_out, targets = _outputs(teacher, student, teacher_grad=True)
    distiller = QSKD(QSKDConfig(tau=-1.0), teacher, student)
    losses = distiller(t_out, s_out, targets, _final_indices(s_out, targets))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert float(distiller.adapter.weight.grad.abs().sum()) > 0
    assert float(student.backbone.body.conv1.weight.grad.abs().sum()) > 0
    assert float(student.class_embed.weight.grad.abs().sum() if hasattr(student.class_embed, "weight")
                 else student.class_embed[0].weight.grad.abs().sum()) > 0  # fmt: skip


@pytest.mark.parametrize("select_on", ["teacher", "both", "student"])
def test_without_gqs_is_positives_only(select_on):
    """gqs=False equals tau=1 (no GIoU exceeds 1: no hard negatives) and differs from tau=-1."""
    teacher, student = _model("deformable_detr").eval(), _model("deformable_detr", seed=1).eval()
    t_out, s_out, targets = _outputs(teacher, student)
    indices = _final_indices(s_out, targets)

    def run(**kw):
        torch.manual_seed(0)
        return QSKD(QSKDConfig(select_on=select_on, **kw), teacher, student)(t_out, s_out, targets, indices)

    off, tau1, all_neg = run(gqs=False), run(tau=1.0), run(tau=-1.0)
    for key in off:
        assert_close(off[key], tau1[key])
    assert any(abs(float(off[k].detach() - all_neg[k].detach())) > 1e-4 for k in off)


def test_lapd_neg_box_weights_only_the_negatives_box_terms():
    """lapd_neg_box scales the hard-negative pairs' L1/GIoU and leaves the scores and the positives alone:
    the box terms are linear in it."""
    teacher, student = _model("deformable_detr").eval(), _model("deformable_detr", seed=1).eval()
    t_out, s_out, targets = _outputs(teacher, student)
    indices = _final_indices(s_out, targets)

    def run(w):
        return QSKD(QSKDConfig(agfd=False, tau=-1.0, lapd_neg_box=w), teacher, student)(
            t_out, s_out, targets, indices
        )

    full, none, half = run(1.0), run(0.0), run(0.5)
    for layer in range(2):
        assert_close(none[f"loss_lapd_cls_{layer}"], full[f"loss_lapd_cls_{layer}"])
        for k in ("bbox", "giou"):
            key = f"loss_lapd_{k}_{layer}"
            # tau = -1: every non-positive query is a hard negative, so some pairs are negatives
            assert float(none[key].detach()) < float(full[key].detach())
            assert_close(half[key], (full[key] + none[key]) / 2)
    pos_only = [  # without hard negatives the weight has nothing to act on
        QSKD(QSKDConfig(agfd=False, gqs=False, lapd_neg_box=w), teacher, student) for w in (0.0, 1.0)
    ]
    pos_only = [distiller(t_out, s_out, targets, indices) for distiller in pos_only]
    for key in pos_only[0]:
        assert_close(pos_only[0][key], pos_only[1][key])


def test_agfd_matches_a_direct_computation():
    """Student layer 0 of 1 meets teacher layer 1 of 2; the mask from the teacher selection, no padding."""
    teacher = _model("deformable_detr").eval()
    student = _model("deformable_detr", seed=1, dec_layers=1).eval()
    t_out, s_out, targets = _outputs(teacher, student)
    cfg = QSKDConfig(lapd=False, tau=-0.5)
    losses = QSKD(cfg, teacher, student)(t_out, s_out, targets, _final_indices(s_out, targets))
    assert list(losses) == ["loss_agfd_feat_0"]
    dec = t_out.detection
    sels = select_groups_batch(dec.logits[1], dec.boxes[1], targets, HungarianMatcher(), tau=-0.5)
    maps = query_attention_maps(dec, 1, t_out.spatial_shapes)  # [B, Q, S]
    expected = []
    for b, sel in enumerate(sels):
        queries, giou = sel.selected()
        assert sel.hard_negatives.shape[0] > 0
        m = ((1 + giou)[:, None] * maps[b, queries]).mean(0).masked_fill(t_out.memory_mask[b], 0)
        m = m / m.max().clamp(min=0.01)
        valid = ~t_out.memory_mask[b]
        expected.append(((m[valid, None] * (t_out.memory[b, valid] - s_out.memory[b, valid])) ** 2).sum())
    n = (~t_out.memory_mask).sum() * t_out.memory.shape[-1]
    assert_close(losses["loss_agfd_feat_0"], 100.0 * sum(expected) / n)


def test_layer_selection_and_switches():
    teacher, student = _model("dab_detr").eval(), _model("dab_detr", seed=1, dec_layers=3).eval()
    t_out, s_out, targets = _outputs(teacher, student)
    indices = _final_indices(s_out, targets)

    def keys(**kw):
        return set(QSKD(QSKDConfig(**kw), teacher, student)(t_out, s_out, targets, indices))

    lapd_last = {f"loss_lapd_{k}_2" for k in ("cls", "bbox", "giou")}
    assert keys(agfd=False, lapd_layers="last") == lapd_last
    assert keys(lapd=False) == {f"loss_agfd_feat_{i}" for i in range(3)}
    assert keys(agfd_layers="last", lapd_layers="last") == lapd_last | {"loss_agfd_feat_2"}
    assert keys(agfd=False, lapd=False) == set()


def test_student_matching_modes_and_missing_attention():
    teacher, student = _model("conditional_detr").eval(), _model("conditional_detr", seed=1).eval()
    t_out, s_out, targets = _outputs(teacher, student)
    indices = _final_indices(s_out, targets)
    per_layer = QSKD(QSKDConfig(agfd=False), teacher, student)(t_out, s_out, targets, indices)
    rematched = QSKD(QSKDConfig(agfd=False), teacher, student)(t_out, s_out, targets, None)
    for key in per_layer:
        assert_close(per_layer[key], rematched[key])  # the final layer re-matched gives the same indices
    final = QSKD(QSKDConfig(agfd=False, student_matching="final"), teacher, student)
    assert set(final(t_out, s_out, targets, indices)) == set(per_layer)
    t_plain, s_plain, _ = _outputs(teacher, student, attention=False)
    with pytest.raises(ValueError, match="return_attention"):
        QSKD(QSKDConfig(), teacher, student)(t_plain, s_plain, targets, indices)


def test_to_student_grid():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    same = torch.tensor([[2, 2]])
    assert to_student_grid(x, same, same) is x
    out = to_student_grid(x, same, torch.tensor([[4, 4], [2, 2], [1, 1]]))
    assert out.shape == (2, 16 + 4 + 1, 3)
    assert_close(out[:, 16:20], x)  # the level of the same shape is copied
    const = torch.ones(1, 4, 1)
    assert_close(to_student_grid(const, same, torch.tensor([[4, 4], [1, 1]])), torch.ones(1, 17, 1))


MISMATCHED = [
    # (teacher arch, teacher options, student arch, student options, qskd options)
    ("deformable_detr", {}, "conditional_detr", {"hidden_dim": 16, "dec_layers": 3, "num_queries": 7}, {}),
    ("conditional_detr", {"strides": (16,)}, "dab_detr", {"dn_groups": 2, "num_queries": 12},
     {"select_on": "both", "grouping": "global"}),
    ("dab_detr", {"dec_layers": 3}, "deformable_detr",
     {"two_stage": True, "box_refine": True, "dn_groups": 2, "hidden_dim": 16, "dec_layers": 1},
     {"select_on": "student", "agfd_features": "neck"}),
    ("deformable_detr", {"two_stage": True}, "deformable_detr", {"box_refine": True, "extra_levels": 1,
     "num_queries": 6}, {"tau": -1.0, "agfd_query_weight": "uniform"}),
]  # fmt: skip


@pytest.mark.parametrize(("t_arch", "t_kw", "s_arch", "s_kw", "q_kw"), MISMATCHED)
def test_mismatched_pairs_through_distill_loss(t_arch, t_kw, s_arch, s_kw, q_kw):
    teacher, student = _model(t_arch, **t_kw), _model(s_arch, seed=1, **s_kw).train()
    distiller = QSKD(QSKDConfig(**q_kw), teacher, student)
    loss_fn = DistillLoss(teacher, build_criterion({}, BASE["num_classes"]), distiller)
    images, mask, targets = _batch()
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})  # no GT
    images, mask = torch.cat([images, images[:1]]), torch.cat([mask, mask[:1]])
    losses = loss_fn(student, images, mask, targets)
    layers = s_kw.get("dec_layers", 2)
    expected = {f"loss_agfd_feat_{i}" for i in range(layers)}
    expected |= {f"loss_lapd_{k}_{i}" for k in ("cls", "bbox", "giou") for i in range(layers)}
    assert expected <= set(losses)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    sum(losses[k] for k in expected).backward()
    assert all(p.grad is None for p in teacher.parameters())
    adapter = distiller.adapter
    if isinstance(adapter, nn.Linear):
        assert float(adapter.weight.grad.abs().sum()) > 0
