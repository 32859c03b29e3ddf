"""Tests for kd.models.denoising: attention mask, bounded noise, splitting, DN targets and DN loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.models.criterion import SetCriterion
from kd.models.denoising import (
    build_dn_queries,
    dn_attn_mask,
    dn_targets,
    dn_valid_mask,
    noise_boxes,
    split_dn,
)
from kd.models.matcher import HungarianMatcher
from kd.models.outputs import DecoderOutput, DetectorOutput

C, D, Q = 5, 8, 4

TARGETS = [
    {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
]


def _build(targets=TARGETS, groups=3, label_noise=0.0, box_noise=0.0, seed=0):
    torch.manual_seed(seed)
    embed = nn.Embedding(C + 1, D)
    dn = build_dn_queries(targets, C, groups, label_noise, box_noise, embed, Q)
    return dn, embed


class TestAttnMask:
    def test_structure(self):
        mask = dn_attn_mask(num_groups=3, max_gt=2, num_queries=4)
        assert mask.shape == (10, 10) and mask.dtype == torch.bool
        assert mask[6:, :6].all()  # detection queries see no DN query
        assert not mask[6:, 6:].any() and not mask[:6, 6:].any()  # everyone sees detection queries
        expected = torch.block_diag(*[torch.ones(2, 2)] * 3) == 0
        torch.testing.assert_close(mask[:6, :6], expected)

    def test_single_group(self):
        mask = dn_attn_mask(num_groups=1, max_gt=3, num_queries=2)
        assert not mask[:3].any() and mask[3:, :3].all()


class TestBuild:
    def test_shapes_and_meta(self):
        dn, _ = _build()
        assert dn.content.shape == (3, 6, D) and dn.anchors.shape == (3, 6, 4)
        assert dn.attn_mask.shape == (6 + Q, 6 + Q)
        assert dn.meta == {
            "pad_size": 6,
            "num_groups": 3,
            "max_gt": 2,
            "gt_counts": [2, 0, 1],
            "num_queries": Q,
        }

    def test_no_noise_reproduces_targets(self):
        dn, embed = _build()
        valid = dn_valid_mask(dn.meta)
        for b, (src, tgt) in enumerate(dn_targets(dn.meta, TARGETS)):
            torch.testing.assert_close(dn.anchors[b, src].sigmoid(), TARGETS[b]["boxes"][tgt])
            torch.testing.assert_close(dn.content[b, src], embed(TARGETS[b]["labels"][tgt]))
        assert (dn.content[~valid] == 0).all() and (dn.anchors[~valid] == 0).all()

    def test_none(self):
        assert _build(groups=0)[0] is None
        empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
        assert _build(targets=empty)[0] is None

    def test_gradient_reaches_label_embedding(self):
        dn, embed = _build(label_noise=0.5)
        dn.content.sum().backward()
        assert embed.weight.grad.abs().sum() > 0


class TestNoise:
    def test_box_noise_bounded(self):
        gen = torch.Generator().manual_seed(0)
        boxes = torch.cat(
            [torch.rand(2000, 2, generator=gen) * 0.6 + 0.2, torch.rand(2000, 2, generator=gen) * 0.3 + 0.01],
            1,
        )
        lam = 0.4
        noised = noise_boxes(boxes, lam, generator=gen)
        bound = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1) * lam
        dev = (noised - boxes).abs()
        assert (dev <= bound + 1e-6).all()
        assert (dev > 0.5 * bound).any(dim=0).all()  # the noise actually uses its range
        assert (noised >= 0).all() and (noised <= 1).all()

    def test_label_noise_rate(self):
        targets = [{"labels": torch.zeros(500, dtype=torch.int64), "boxes": torch.full((500, 4), 0.5)}]
        dn, embed = _build(targets, groups=2, label_noise=0.5)
        # recover the noised labels from the embeddings
        dist = torch.cdist(dn.content[0], embed.weight[:C])
        labels = dist.argmin(-1)
        changed = (labels != 0).float().mean().item()
        assert changed == pytest.approx(0.5 * (1 - 1 / C), abs=0.05)
        assert labels.max() < C

    def test_anchors_bounded(self):
        dn, _ = _build(box_noise=1.0)
        assert torch.isfinite(dn.anchors).all()
        boxes = dn.anchors.sigmoid()[dn_valid_mask(dn.meta)]
        assert (boxes >= 0).all() and (boxes <= 1).all()


class TestSplitAndTargets:
    def test_split_round_trip(self):
        dn, _ = _build()
        t = torch.randn(2, 3, 6 + Q, 7)
        dn_part, det = split_dn(t, dn.meta)
        assert dn_part.shape == (2, 3, 6, 7) and det.shape == (2, 3, Q, 7)
        torch.testing.assert_close(torch.cat([dn_part, det], dim=2), t)
        a, b = split_dn(t[0], dn.meta, dim=1)
        torch.testing.assert_close(a, dn_part[0])

    def test_targets_and_valid_mask(self):
        dn, _ = _build()
        pairs = dn_targets(dn.meta, TARGETS)
        assert pairs[0][0].tolist() == [0, 1, 2, 3, 4, 5] and pairs[0][1].tolist() == [0, 1, 0, 1, 0, 1]
        assert pairs[1][0].numel() == 0
        assert pairs[2][0].tolist() == [0, 2, 4] and pairs[2][1].tolist() == [0, 0, 0]
        valid = dn_valid_mask(dn.meta)
        expected = torch.tensor([[1, 1] * 3, [0, 0] * 3, [1, 0] * 3], dtype=torch.bool)
        torch.testing.assert_close(valid, expected)

    def test_targets_mismatch_raises(self):
        dn, _ = _build()
        with pytest.raises(ValueError, match="dn_targets"):
            dn_targets(dn.meta, TARGETS[:2])


def _dn_output(dn_logits: torch.Tensor, dn_boxes: torch.Tensor, meta: dict) -> DetectorOutput:
    L, B = dn_logits.shape[:2]
    det_logits = torch.zeros(L, B, Q, C)
    det_boxes = torch.full((L, B, Q, 4), 0.5)
    dec = DecoderOutput(det_logits, det_boxes, hidden=torch.zeros(L, B, Q, D), references=det_boxes[..., :2])
    dn = DecoderOutput(dn_logits, dn_boxes, hidden=torch.zeros(*dn_logits.shape[:3], D), references=dn_boxes)
    return DetectorOutput(
        detection=dec,
        memory=torch.zeros(B, 2, D),
        memory_mask=torch.zeros(B, 2, dtype=torch.bool),
        spatial_shapes=torch.tensor([[1, 2]]),
        features=[torch.zeros(B, D, 1, 2)],
        feature_masks=[torch.zeros(B, 1, 2, dtype=torch.bool)],
        denoising=dn,
        dn_meta=meta,
    )


class TestDNLoss:
    def _clean_reconstruction(self, num_layers: int = 2):
        """A decoder that returns the clean GT in every DN slot, and garbage in the padding slots."""
        dn, _ = _build(label_noise=0.5, box_noise=0.4)
        pad = dn.meta["pad_size"]
        logits = torch.full((num_layers, 3, pad, C), 30.0)  # padding: confident in every class
        boxes = torch.tensor([0.9, 0.1, 0.05, 0.5]).repeat(num_layers, 3, pad, 1)
        for b, (src, tgt) in enumerate(dn_targets(dn.meta, TARGETS)):
            logits[:, b, src] = -30.0
            logits[:, b, src, TARGETS[b]["labels"][tgt]] = 30.0
            boxes[:, b, src] = TARGETS[b]["boxes"][tgt]
        return _dn_output(logits, boxes, dn.meta), dn

    def test_zero_for_clean_reconstruction(self):
        out, _ = self._clean_reconstruction()
        losses = SetCriterion(C, HungarianMatcher())(out, TARGETS)
        dn_names = {f"loss_{t}{s}" for t in ("cls", "bbox", "giou") for s in ("_dn", "_dn_0")}
        assert dn_names <= set(losses)
        for name in dn_names:
            torch.testing.assert_close(losses[name], torch.tensor(0.0), atol=1e-6, rtol=0)

    def test_value_normalised_by_groups(self):
        out, dn = self._clean_reconstruction(num_layers=1)
        out.denoising.boxes[0, 0, 0] += torch.tensor([0.1, 0.0, 0.0, 0.0])  # image 0, group 0, gt 0
        losses = SetCriterion(C, HungarianMatcher())(out, TARGETS)
        # L1 0.1, weight 5, normalised by 3 boxes * 3 groups
        torch.testing.assert_close(losses["loss_bbox_dn"], torch.tensor(5 * 0.1 / 9))

    def test_missing_meta_raises(self):
        out, _ = self._clean_reconstruction()
        out.dn_meta = None
        with pytest.raises(ValueError, match="dn_meta"):
            SetCriterion(C, HungarianMatcher())(out, TARGETS)
