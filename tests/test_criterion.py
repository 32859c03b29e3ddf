"""Tests for kd.models.criterion: hand-computed loss values, loss names, gradients, empty targets."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from kd.models.criterion import SetCriterion, check_finite, num_boxes_global, total
from kd.models.matcher import HungarianMatcher
from kd.models.outputs import DecoderOutput, DetectorOutput

C = 4


def _decoder(logits: torch.Tensor, boxes: torch.Tensor) -> DecoderOutput:
    """DecoderOutput from [L, B, Q, C] logits and [L, B, Q, 4] boxes (other fields are dummies)."""
    L, B, Q = logits.shape[:3]
    return DecoderOutput(logits, boxes, hidden=torch.zeros(L, B, Q, 8), references=boxes[..., :2])


def _output(logits: torch.Tensor, boxes: torch.Tensor, **kwargs) -> DetectorOutput:
    B = logits.shape[1]
    return DetectorOutput(
        detection=_decoder(logits, boxes),
        memory=torch.zeros(B, 6, 8),
        memory_mask=torch.zeros(B, 6, dtype=torch.bool),
        spatial_shapes=torch.tensor([[2, 3]]),
        features=[torch.zeros(B, 8, 2, 3)],
        feature_masks=[torch.zeros(B, 2, 3, dtype=torch.bool)],
        **kwargs,
    )


def _criterion(**kwargs) -> SetCriterion:
    return SetCriterion(C, HungarianMatcher(), **kwargs)


def _focal(logits: torch.Tensor, onehot: torch.Tensor, alpha=0.25, gamma=2.0) -> torch.Tensor:
    """Elementwise focal loss written out (RetinaNet eq. 5)."""
    p = logits.sigmoid()
    p_t = torch.where(onehot > 0, p, 1 - p)
    alpha_t = torch.where(onehot > 0, torch.tensor(alpha), torch.tensor(1 - alpha))
    return -alpha_t * (1 - p_t) ** gamma * p_t.log()


TARGETS = [
    {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
    {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
]


def _perfect(num_layers: int = 1, num_queries: int = 5):
    """Predictions where queries 1 and 3 (image 0) and 2 (image 1) hit their targets exactly."""
    logits = torch.full((num_layers, 2, num_queries, C), -8.0)
    boxes = torch.tensor([0.1, 0.9, 0.05, 0.05]).repeat(num_layers, 2, num_queries, 1)
    for b, slots in enumerate([[1, 3], [2]]):
        for k, q in enumerate(slots):
            logits[:, b, q, TARGETS[b]["labels"][k]] = 8.0
            boxes[:, b, q] = TARGETS[b]["boxes"][k]
    return logits, boxes


class TestValues:
    def test_perfect_prediction_has_zero_box_losses(self):
        logits, boxes = _perfect()
        crit = _criterion()
        losses = crit(_output(logits, boxes), TARGETS)
        assert set(losses) == {"loss_cls", "loss_bbox", "loss_giou"}
        torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.0))
        torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.0), atol=1e-6, rtol=0)
        assert losses["loss_cls"].item() < 1e-4
        assert [s.tolist() for s, _ in crit.last_indices] == [[1, 3], [2]]

    def test_known_offset(self):
        gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
        pred = torch.tensor([[0.6, 0.5, 0.2, 0.3]])
        targets = [{"labels": torch.tensor([2]), "boxes": gt}]
        losses = _criterion()(_output(torch.zeros(1, 1, 1, C), pred[None, None]), targets)
        torch.testing.assert_close(losses["loss_bbox"], torch.tensor(5.0 * (0.1 + 0.1)))
        # xyxy pred (0.5, 0.35, 0.7, 0.65), gt (0.4, 0.4, 0.6, 0.6): inter 0.1*0.2, union 0.06+0.04-0.02,
        # enclosing box (0.4, 0.35, 0.7, 0.65) of area 0.09
        giou = 0.02 / 0.08 - (0.09 - 0.08) / 0.09
        torch.testing.assert_close(losses["loss_giou"], torch.tensor(2.0 * (1 - giou)))

    def test_focal_matches_manual_formula(self):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(1, 2, 3, C, generator=gen)
        boxes = torch.rand(1, 2, 3, 4, generator=gen) * 0.3 + 0.3
        crit = _criterion()
        losses = crit(_output(logits, boxes), TARGETS)
        onehot = torch.zeros(2, 3, C)
        for b, (src, tgt) in enumerate(crit.last_indices):
            onehot[b, src, TARGETS[b]["labels"][tgt]] = 1.0
        expected = 2.0 * _focal(logits[0], onehot).sum() / 3  # 3 target boxes in the batch
        torch.testing.assert_close(losses["loss_cls"], expected)

    def test_weights_scale_terms(self):
        logits, boxes = _perfect()
        boxes = boxes + 0.01
        base = _criterion()(_output(logits, boxes), TARGETS)
        scaled = _criterion(weight_cls=1.0, weight_l1=10.0, weight_giou=0.0)(_output(logits, boxes), TARGETS)
        torch.testing.assert_close(scaled["loss_cls"], base["loss_cls"] / 2)
        torch.testing.assert_close(scaled["loss_bbox"], base["loss_bbox"] * 2)
        torch.testing.assert_close(scaled["loss_giou"], torch.tensor(0.0))

    def test_batch_duplication_keeps_value(self):
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(1, 2, 4, C, generator=gen)
        boxes = torch.rand(1, 2, 4, 4, generator=gen) * 0.3 + 0.3
        one = _criterion()(_output(logits, boxes), TARGETS)
        two = _criterion()(_output(logits.repeat(1, 2, 1, 1), boxes.repeat(1, 2, 1, 1)), TARGETS * 2)
        for k in one:
            torch.testing.assert_close(two[k], one[k])


class TestVarifocal:
    def test_matches_manual_formula(self):
        """RT-DETR's loss_labels_vfl written out: IoU targets, weight alpha * p^gamma or the target."""
        gen = torch.Generator().manual_seed(5)
        logits = torch.randn(1, 2, 3, C, generator=gen)
        boxes = torch.rand(1, 2, 3, 4, generator=gen) * 0.3 + 0.3
        crit = _criterion(cls_loss="varifocal")
        losses = crit(_output(logits, boxes), TARGETS)
        score = torch.zeros(2, 3, C)
        for b, (src, tgt) in enumerate(crit.last_indices):
            for s, t in zip(src.tolist(), tgt.tolist(), strict=True):
                iou = box_iou(
                    box_convert(boxes[0, b, s][None], "cxcywh", "xyxy"),
                    box_convert(TARGETS[b]["boxes"][t][None], "cxcywh", "xyxy"),
                )
                score[b, s, TARGETS[b]["labels"][t]] = iou.item()
        p = logits[0].sigmoid()
        weight = 0.75 * p**2 * (score == 0) + score
        bce = -(score * p.log() + (1 - score) * (1 - p).log())
        torch.testing.assert_close(losses["loss_cls"], 2.0 * (weight * bce).sum() / 3)
        focal = _criterion()(_output(logits, boxes), TARGETS)
        torch.testing.assert_close(losses["loss_bbox"], focal["loss_bbox"])
        torch.testing.assert_close(losses["loss_giou"], focal["loss_giou"])

    def test_well_localised_positive_is_pulled_higher(self):
        """Two matched queries with equal logits: the better box gets the larger push upwards."""
        targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]] * 2)}]
        boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.35, 0.3, 0.2, 0.2], [0.9, 0.9, 0.05, 0.05]]])
        logits = torch.zeros(1, 1, 3, C, requires_grad=True)
        crit = _criterion(cls_loss="varifocal")
        total(crit(_output(logits, boxes[None]), targets)).backward()
        src, tgt = crit.last_indices[0]
        pairs = zip(src.tolist(), tgt.tolist(), strict=True)
        grad = {t: logits.grad[0, 0, s, int(targets[0]["labels"][t])] for s, t in pairs}
        exact = 0 if int(src[tgt.tolist().index(0)]) == 0 else 1
        assert grad[exact] < grad[1 - exact] < 0

    def test_unknown_cls_loss_is_refused(self):
        with pytest.raises(ValueError, match="loss.cls_loss"):
            _criterion(cls_loss="softmax")


class TestOneToMany:
    def test_each_target_matched_k_times_and_normalised_by_k(self):
        """Two one-to-many queries offset like test_known_offset both match the single target (k=2)."""
        gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
        targets = [{"labels": torch.tensor([2]), "boxes": gt}]
        pred = torch.tensor([[0.6, 0.5, 0.2, 0.3], [0.4, 0.5, 0.2, 0.3], [0.9, 0.9, 0.05, 0.05]])
        o2m = _decoder(torch.zeros(2, 1, 3, C), pred.expand(2, 1, 3, 4))
        out = _output(torch.zeros(1, 1, 1, C), pred[None, None, :1], one2many=o2m)
        crit = _criterion(one2many_k=2, one2many_weight=0.5)
        losses = crit(out, targets)
        assert {"loss_bbox_o2m", "loss_bbox_o2m_0", "loss_cls_o2m", "loss_giou_o2m_0"} <= set(losses)
        assert sorted(crit.last_indices[0][0].tolist()) == [0]  # the detection matching, not the o2m one
        torch.testing.assert_close(losses["loss_bbox_o2m"], 0.5 * losses["loss_bbox"])  # mean over 2 pairs
        torch.testing.assert_close(losses["loss_giou_o2m_0"], 0.5 * losses["loss_giou"])

    def test_absent_group_adds_nothing(self):
        logits, boxes = _perfect()
        assert not any("o2m" in k for k in _criterion()(_output(logits, boxes), TARGETS))


class TestNames:
    def test_aux_layers(self):
        logits, boxes = _perfect(num_layers=3)
        losses = _criterion()(_output(logits, boxes), TARGETS)
        names = {f"loss_{t}{s}" for t in ("cls", "bbox", "giou") for s in ("", "_0", "_1")}
        assert set(losses) == names
        for s in ("_0", "_1"):
            torch.testing.assert_close(losses["loss_bbox" + s], losses["loss_bbox"])

    def test_layer_matching_recorded(self):
        logits, boxes = _perfect(num_layers=2)
        crit = _criterion()
        crit(_output(logits, boxes), TARGETS)
        assert len(crit.last_layer_indices) == 2
        direct = crit.match(_output(logits, boxes), TARGETS)
        for (a, b), (c, d) in zip(direct, crit.last_indices, strict=True):
            torch.testing.assert_close(a, c)
            torch.testing.assert_close(b, d)

    def test_two_stage_proposals_use_class_agnostic_targets(self):
        logits, boxes = _perfect()
        gen = torch.Generator().manual_seed(2)
        enc_logits = torch.randn(2, 6, C, generator=gen)
        enc_boxes = torch.rand(2, 6, 4, generator=gen) * 0.3 + 0.3
        crit = _criterion()
        out = _output(logits, boxes, proposals={"logits": enc_logits, "boxes": enc_boxes})
        losses = crit(out, TARGETS)
        assert {"loss_cls_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
        bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in TARGETS]
        indices = crit.matcher(enc_logits, enc_boxes, bin_targets)
        onehot = torch.zeros_like(enc_logits)
        for b, (src, _) in enumerate(indices):
            onehot[b, src, 0] = 1.0
        torch.testing.assert_close(losses["loss_cls_enc"], 2.0 * _focal(enc_logits, onehot).sum() / 3)


class TestEdgeCases:
    def test_gradient_flows(self):
        gen = torch.Generator().manual_seed(3)
        logits = torch.randn(2, 2, 4, C, generator=gen, requires_grad=True)
        raw = torch.randn(2, 2, 4, 4, generator=gen, requires_grad=True)
        losses = _criterion()(_output(logits, raw.sigmoid()), TARGETS)
        total(losses).backward()
        assert logits.grad.abs().sum() > 0 and raw.grad.abs().sum() > 0
        assert raw.grad[:, :, :, :].abs().sum(-1).gt(0).sum() == 2 * 3  # matched queries of both layers

    def test_empty_targets(self):
        gen = torch.Generator().manual_seed(4)
        logits = torch.randn(2, 2, 3, C, generator=gen, requires_grad=True)
        boxes = torch.rand(2, 2, 3, 4, generator=gen)
        empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
        losses = _criterion()(_output(logits, boxes), empty)
        check_finite(losses)
        torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.0))
        torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.0))
        expected = 2.0 * _focal(logits[-1], torch.zeros(2, 3, C)).sum()  # num_boxes clamped to 1
        torch.testing.assert_close(losses["loss_cls"], expected)
        total(losses).backward()
        assert logits.grad.abs().sum() > 0

    def test_num_boxes_clamped(self):
        assert num_boxes_global([{"labels": torch.zeros(0)}]) == 1.0
        assert num_boxes_global(TARGETS) == 3.0

    def test_total_and_check_finite(self):
        losses = {
            "loss_a": torch.tensor(1.5),
            "loss_b": torch.tensor(float("nan")),
            "loss_c": torch.tensor(2.0),
        }
        with pytest.raises(FloatingPointError, match="loss_b"):
            check_finite(losses)
        torch.testing.assert_close(total({"a": torch.tensor(1.5), "b": torch.tensor(2.0)}), torch.tensor(3.5))

    def test_bad_labels_raise(self):
        logits, boxes = _perfect()
        bad = [{"labels": torch.tensor([C]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}, TARGETS[1]]
        with pytest.raises(ValueError, match=r"targets\[0\].labels"):
            _criterion()(_output(logits, boxes), bad)


def test_giou_reference_is_torchvision():
    """The GIoU term equals 1 - torchvision's generalized_box_iou on the matched pair."""
    pred = torch.tensor([[0.4, 0.45, 0.3, 0.2]])
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.3]])
    losses = _criterion()(
        _output(torch.zeros(1, 1, 1, C), pred[None, None]), [{"labels": torch.tensor([0]), "boxes": gt}]
    )
    ref = generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))[0, 0]
    torch.testing.assert_close(losses["loss_giou"], 2.0 * (1 - ref))


def _num_boxes_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        targets = TARGETS if rank == 0 else [{"labels": torch.zeros(0, dtype=torch.int64)}]
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(str(num_boxes_global(targets)))
    finally:
        dist.destroy_process_group()


def test_num_boxes_all_reduced(tmp_path):
    """Under torch.distributed num_boxes is the mean over ranks (3 and 0 boxes -> 1.5 on both)."""
    import torch.multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    args = (str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_num_boxes_worker, args=args, nprocs=2, join=True, start_method="fork")
    assert [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)] == [1.5, 1.5]
