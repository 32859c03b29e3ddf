"""Tests for kd/models/deformable_detr.py (and kd/models/deformable_transformer.py), tiny configs."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

from kd.models.backbone import Backbone
from kd.models.deformable_detr import DeformableDETR

B, Q, C, D, L = 2, 10, 5, 32, 2
OPTIONS = {
    "plain": {},
    "box_refine": {"box_refine": True},
    "two_stage": {"two_stage": True},
    "two_stage_refine": {"two_stage": True, "box_refine": True},
    "dn": {"dn_groups": 2},
    "two_stage_refine_dn": {"two_stage": True, "box_refine": True, "dn_groups": 3},
    "extra_level": {"extra_levels": 1, "box_refine": True},
    "dino": {
        "two_stage": True,
        "box_refine": True,
        "dn_groups": 3,
        "look_forward_twice": True,
        "mixed_query_selection": True,
    },
}


@functools.cache
def _cached_model(options: tuple) -> DeformableDETR:
    torch.manual_seed(0)
    backbone = Backbone("resnet18", (8, 16, 32))
    return DeformableDETR(
        backbone, hidden_dim=D, nheads=2, enc_layers=1, dec_layers=L, ffn_dim=64, dropout=0.0,
        num_queries=Q, num_classes=C, enc_points=2, dec_points=2, **dict(options),
    )  # fmt: skip


def _model(**kw) -> DeformableDETR:
    """A fresh copy of the tiny model for these options (built once per option set: ResNet init is slow)."""
    return copy.deepcopy(_cached_model(tuple(sorted(kw.items()))))


def _batch(size: int = 64):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, size, size, generator=g)
    mask = torch.zeros(B, size, size, dtype=torch.bool)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]]),
         "labels": torch.tensor([0, 2, 4])},
    ]  # fmt: skip
    return images, mask, targets


def _extra(model: DeformableDETR, m: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    k = 4 if model.query_format == "box" else 2 * D
    return torch.randn(1, m, k, generator=g)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_output_shapes(name):
    kw = OPTIONS[name]
    model = _model(**kw).train()
    images, mask, targets = _batch()
    out = model(images, mask, targets, extra_queries={"kd": _extra(model)}, return_attention=True)
    box = kw.get("two_stage") or kw.get("dn_groups")
    assert model.query_format == ("box" if box else "embed")
    det = out.detection
    assert (
        det.logits.shape == (L, B, Q, C)
        and det.boxes.shape == (L, B, Q, 4)
        and det.hidden.shape == (L, B, Q, D)
    )
    ref_dim = 4 if box or kw.get("box_refine") else 2
    assert det.references.shape == (L, B, Q, ref_dim)
    assert det.queries.shape == (B, Q, 4 if box else 2 * D)
    levels = 3 + kw.get("extra_levels", 0)
    assert det.sampling_locations.shape == (L, B, Q, 2, levels, 2, 2)
    assert det.attention_weights.shape == (L, B, Q, 2, levels, 2)
    assert_close(det.attention_weights.sum((-2, -1)), torch.ones(L, B, Q, 2))
    assert ((det.boxes > 0) & (det.boxes < 1)).all()
    assert out.extra["kd"].boxes.shape == (L, B, 7, 4) and out.extra["kd"].sampling_locations.shape[2] == 7
    s = 8 * 8 + 4 * 4 + 2 * 2 + (1 if levels == 4 else 0)
    assert out.memory.shape == (B, s, D) and out.memory_mask.shape == (B, s)
    assert out.spatial_shapes.tolist() == [[8, 8], [4, 4], [2, 2], [1, 1]][:levels]
    assert [f.shape for f in out.features] == [(B, D, h, w) for h, w in out.spatial_shapes.tolist()]
    assert [m.shape for m in out.feature_masks] == [(B, h, w) for h, w in out.spatial_shapes.tolist()]
    if kw.get("two_stage"):
        assert out.proposals["logits"].shape == (B, s, C) and out.proposals["boxes"].shape == (B, s, 4)
    else:
        assert out.proposals is None
    if kw.get("dn_groups"):
        n_dn = kw["dn_groups"] * 3  # max 3 boxes per image
        assert out.denoising.boxes.shape == (L, B, n_dn, 4) and out.dn_meta["pad_size"] == n_dn
        assert out.denoising.queries.shape == (B, n_dn, 4)
    else:
        assert out.denoising is None and out.dn_meta is None


def test_no_denoising_in_eval_or_without_targets():
    model = _model(dn_groups=2)
    images, mask, targets = _batch()
    assert model.train()(images, mask).denoising is None
    assert model.eval()(images, mask, targets).denoising is None


@pytest.mark.parametrize("name", ["dn", "two_stage_refine_dn"])
def test_denoising_groups_are_invisible_to_detection(name):
    model = _model(**OPTIONS[name]).train()
    images, mask, targets = _batch()
    with_dn, without = model(images, mask, targets), model(images, mask)
    assert with_dn.denoising is not None and without.denoising is None
    assert_close(with_dn.detection.logits, without.detection.logits, rtol=1e-5, atol=1e-5)
    assert_close(with_dn.detection.boxes, without.detection.boxes, rtol=1e-5, atol=1e-5)


def test_plain_queries_follow_official_split():
    model = _model().eval()
    images, mask, _ = _batch()
    out = model(images, mask)
    pos = model.query_embed.weight[:, :D]
    assert_close(
        out.detection.references[0], model.transformer.reference_points(pos).sigmoid().expand(B, -1, -1)
    )
    assert_close(out.detection.references[1], out.detection.references[0])  # no refinement


def test_box_refine_detaches_and_chains_references():
    model = _model(two_stage=True, box_refine=True).eval()
    images, mask, _ = _batch()
    out = model(images, mask)
    det = out.detection
    assert_close(det.references[0], det.queries.sigmoid())  # layer 0 starts from the proposals
    assert_close(det.references[1], det.boxes[0])  # layer 1 starts from layer 0's boxes
    assert not det.references[1].requires_grad


@pytest.mark.parametrize("name", ["plain", "two_stage_refine_dn", "dn"])
def test_extra_groups_do_not_change_detection(name):
    model = _model(**OPTIONS[name]).train()
    images, mask, targets = _batch()
    torch.manual_seed(5)  # same denoising noise in both passes
    ref = model(images, mask, targets)
    torch.manual_seed(5)
    out = model(
        images, mask, targets, extra_queries={"a": _extra(model), "b": _extra(model, 3).expand(B, -1, -1)}
    )
    for got, want in ((out.detection, ref.detection), (out.denoising, ref.denoising)):
        if want is not None:
            assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert_close(got.boxes, want.boxes, rtol=1e-5, atol=1e-5)
    assert set(out.extra) == {"a", "b"} and out.extra["b"].logits.shape == (L, B, 3, C)


def test_one2many_group_is_isolated_and_training_only():
    """H-DETR: the next M proposals form their own group; detection, denoising and extras do not change."""
    model = _model(two_stage=True, box_refine=True, dn_groups=2).train()
    images, mask, targets = _batch()
    torch.manual_seed(5)
    ref = model(images, mask, targets, extra_queries={"a": _extra(model)})
    hybrid = copy.deepcopy(model)
    hybrid.one2many_queries = 6
    torch.manual_seed(5)
    out = hybrid(images, mask, targets, extra_queries={"a": _extra(model)})
    assert ref.one2many is None and out.one2many.logits.shape == (L, B, 6, C)
    for got, want in (
        (out.detection, ref.detection),
        (out.denoising, ref.denoising),
        (out.extra["a"], ref.extra["a"]),
    ):
        assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        assert_close(got.boxes, want.boxes, rtol=1e-5, atol=1e-5)
    # the one-to-many anchors are the proposals ranked Q+1 .. Q+M
    score = out.proposals["logits"][..., 0].masked_fill(~out.proposals["valid"], float("-inf"))
    ranked = out.proposals["boxes"].gather(1, score.topk(Q + 6, dim=1).indices[..., None].expand(-1, -1, 4))
    assert_close(out.one2many.queries.sigmoid(), ranked[:, Q:], rtol=1e-5, atol=1e-6)
    assert hybrid.eval()(images, mask).one2many is None


def test_one2many_needs_two_stage():
    with pytest.raises(ValueError, match="one2many_queries > 0 needs two_stage"):
        DeformableDETR(Backbone("resnet18", (32,)), hidden_dim=D, nheads=2, num_queries=Q, one2many_queries=4)


@pytest.mark.parametrize(
    "options", [{"box_refine": True}, {"two_stage": True, "box_refine": True, "dn_groups": 2}]
)
def test_look_forward_twice_changes_gradients_not_outputs(options):
    """DINO: same boxes; the last layer's box loss reaches the previous layer's box head only with it on."""
    images, mask, targets = _batch()
    base = _model(**options).train()
    lft = copy.deepcopy(base)
    lft.look_forward_twice = True
    boxes, grads = [], []
    for model in (base, lft):
        torch.manual_seed(5)  # same denoising noise
        out = model(images, mask, targets)
        boxes.append(out.detection.boxes.detach())
        last_box = out.detection.boxes[-1].sum()
        grads.append(torch.autograd.grad(last_box, model.bbox_embed[L - 2].layers[-1].bias)[0])
    assert_close(boxes[1], boxes[0])
    assert grads[0].abs().max() == 0  # the reference entering the last layer is detached
    assert grads[1].abs().max() > 0


def test_mixed_query_selection_learns_content_keeps_anchors():
    """DINO: the proposals' anchors stay the queries; the content embedding is ``tgt_embed`` and trains."""
    model = _model(two_stage=True, box_refine=True, mixed_query_selection=True).train()
    plain = _model(two_stage=True, box_refine=True).train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "tgt_embed.weight"})
    images, mask, targets = _batch()
    out, ref = model(images, mask, targets), plain(images, mask, targets)
    assert_close(out.detection.queries, ref.detection.queries)  # same encoder, same top-k anchors
    assert not torch.allclose(out.detection.logits, ref.detection.logits)
    out.detection.logits.sum().backward()
    assert model.tgt_embed.weight.grad[:Q].abs().sum() > 0
    hybrid = copy.deepcopy(model)
    hybrid.one2many_queries = 4
    hybrid.tgt_embed = torch.nn.Embedding(Q + 4, D)
    assert hybrid(images, mask, targets).one2many.logits.shape == (L, B, 4, C)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"look_forward_twice": True}, "look_forward_twice needs box_refine"),
        ({"mixed_query_selection": True, "box_refine": True}, "mixed_query_selection needs two_stage"),
    ],
)
def test_dino_options_need_their_base(options, message):
    with pytest.raises(ValueError, match=message):
        DeformableDETR(Backbone("resnet18", (32,)), hidden_dim=D, nheads=2, num_queries=Q, **options)


@pytest.mark.parametrize("name", ["plain", "dn"])
def test_native_queries_as_extra_group_reproduce_detection(name):
    model = _model(**OPTIONS[name]).eval()
    images, mask, _ = _batch()
    out = model(images, mask, extra_queries={"same": model.native_queries()[None]})
    assert_close(out.extra["same"].logits, out.detection.logits, rtol=1e-5, atol=1e-5)
    assert_close(out.extra["same"].boxes, out.detection.boxes, rtol=1e-5, atol=1e-5)


def test_two_stage_has_no_native_queries_and_reuses_its_anchors():
    model = _model(two_stage=True).eval()
    images, mask, _ = _batch()
    assert model.native_queries() is None
    out = model(images, mask)
    again = model(images, mask, extra_queries={"same": out.detection.queries})
    assert_close(again.extra["same"].boxes, out.detection.boxes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["plain", "two_stage_refine"])
def test_padding_mask_is_respected(name):
    """An image decodes the same alone or padded next to a larger one (garbage in the padded features).

    Checked on the encoder inputs: the backbone convolutions and the input projections' GroupNorm
    (official) see the padding, so only the transformer is padding-invariant."""
    model = _model(**OPTIONS[name]).eval()
    g = torch.Generator().manual_seed(3)
    small = torch.randn(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        srcs, masks = model.project_features(small, torch.zeros(1, 64, 64, dtype=torch.bool))
        alone = model.forward_features(srcs, masks)
        big = torch.randn(1, 3, 128, 96, generator=g)
        big_srcs, big_masks = model.project_features(big, torch.zeros(1, 128, 96, dtype=torch.bool))
        pad_srcs, pad_masks = [], []
        for s, m, bs, bm in zip(srcs, masks, big_srcs, big_masks, strict=True):
            dh, dw = bs.shape[-2] - s.shape[-2], bs.shape[-1] - s.shape[-1]
            pad_mask = F.pad(m, (0, dw, 0, dh), value=True)
            garbage = torch.randn(bs[:1].shape, generator=g) * 10
            pad_srcs.append(
                torch.cat([torch.where(pad_mask[:, None], garbage, F.pad(s, (0, dw, 0, dh))), bs])
            )
            pad_masks.append(torch.cat([pad_mask, bm]))
        padded = model.forward_features(pad_srcs, pad_masks)
    assert_close(padded.detection.logits[:, :1], alone.detection.logits, rtol=1e-4, atol=1e-4)
    assert_close(padded.detection.boxes[:, :1], alone.detection.boxes, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["plain", "two_stage_refine_dn"])
def test_gradient_reaches_backbone(name):
    model = _model(**OPTIONS[name]).train()
    images, mask, targets = _batch()
    out = model(images, mask, targets)
    loss = out.detection.logits.sum() + out.detection.boxes.sum()
    if out.denoising is not None:
        loss = loss + out.denoising.boxes.sum()
    if out.proposals is not None:
        loss = loss + out.proposals["logits"].sum()
    loss.backward()
    grad = model.backbone.body.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.input_proj[0][0].weight.grad.abs().sum() > 0


def test_bfloat16_autocast_forward_backward():
    model = _model(**OPTIONS["two_stage_refine_dn"]).train()
    images, mask, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask, targets)
    assert torch.isfinite(out.detection.boxes).all() and torch.isfinite(out.detection.logits).all()
    out.detection.boxes.float().sum().backward()
    assert torch.isfinite(model.backbone.body.conv1.weight.grad).all()
    assert out.memory.dtype == torch.bfloat16 and out.detection.boxes.dtype == torch.float32


def test_from_config_reads_params_yaml():
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    cfg = {**params["model"], **params["student"]["model"], "some_other_arch_key": 1}
    cfg["backbone_weights"] = None  # the pretrain stage writes it
    model = DeformableDETR.from_config(cfg)
    assert model.hidden_dim == cfg["hidden_dim"] and model.num_queries == cfg["num_queries"]
    assert model.two_stage == cfg["two_stage"] and model.box_refine == cfg["box_refine"]
    assert len(model.transformer.decoder.layers) == cfg["dec_layers"]
    assert model.num_feature_levels == len(cfg["strides"])
    with pytest.raises(ValueError, match="arch"):
        DeformableDETR.from_config({**cfg, "arch": "dab_detr"})


def test_official_init():
    model = _model(box_refine=True)
    for head in model.class_embed:
        assert_close(head.bias.detach(), torch.full((C,), -4.59512), atol=1e-4, rtol=0)
    assert_close(model.bbox_embed[0].layers[-1].bias.detach(), torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert_close(model.bbox_embed[1].layers[-1].bias.detach(), torch.zeros(4))
    assert model.class_embed[0] is not model.class_embed[1]  # refinement: one head per layer
    shared = _model()
    assert shared.class_embed[0] is shared.class_embed[1]


def test_bad_extra_queries():
    model = _model().eval()
    images, mask, _ = _batch()
    with pytest.raises(ValueError, match="'kd'"):
        model(images, mask, extra_queries={"kd": torch.randn(1, 3, 4)})
