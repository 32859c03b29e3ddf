"""Tests for kd/distill/selection.py: Group Query Selection on hand-built boxes and the local pairing."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import box_convert

from kd.distill.selection import GroupSelection, pair_selections, select_groups, select_groups_batch
from kd.models.matcher import HungarianMatcher

# dyadic coordinates: every GIoU below is exact in float32
GT_XYXY = torch.tensor([[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]])
QUERY_XYXY = torch.tensor(
    [
        [0.0, 0.0, 0.25, 0.25],  # 0: = GT 0 (its positive)
        [0.5, 0.5, 0.75, 0.75],  # 1: = GT 1 (its positive)
        [0.0, 0.0, 0.25, 0.5],  # 2: GIoU 0.5 with GT 0
        [0.75, 0.5, 1.0, 0.75],  # 3: touches GT 1: GIoU exactly 0
        [0.25, 0.5, 0.5, 0.75],  # 4: touches GT 1: GIoU exactly 0
        [0.25, 0.25, 0.5, 0.5],  # 5: GIoU -0.5 with both GTs (tie -> GT 0)
        [0.875, 0.875, 1.0, 1.0],  # 6: best GIoU -0.6875 (GT 1)
        [0.0, 0.0, 0.25, 0.25],  # 7: duplicate of GT 0, not matched: GIoU 1
        [0.5, 0.5, 0.75, 1.0],  # 8: GIoU 0.5 with GT 1
    ]
)
BEST_GT = [0, 1, 0, 1, 1, 0, 1, 0, 1]
BEST_GIOU = [1.0, 1.0, 0.5, 0.0, 0.0, -0.5, -0.6875, 1.0, 0.5]
INDICES = (torch.tensor([1, 0]), torch.tensor([1, 0]))  # unsorted on purpose


def _target() -> dict:
    return {"boxes": box_convert(GT_XYXY, "xyxy", "cxcywh"), "labels": torch.tensor([0, 2])}


def _boxes() -> torch.Tensor:
    return box_convert(QUERY_XYXY, "xyxy", "cxcywh")


def _logits() -> torch.Tensor:
    logits = torch.full((9, 3), -5.0)
    logits[0, 0] = logits[1, 2] = 5.0  # queries 0 and 1 win the matching against duplicate 7
    return logits


def _long(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).view(-1, 2)


# tau -> expected hard negatives (query, best GT)
EXPECTED = {
    0.0: [[2, 0], [7, 0], [8, 1]],
    -0.5: [[2, 0], [3, 1], [4, 1], [7, 0], [8, 1]],  # 5 sits exactly at -0.5: excluded (strict)
    -0.6: [[2, 0], [3, 1], [4, 1], [5, 0], [7, 0], [8, 1]],
    -1.0: [[2, 0], [3, 1], [4, 1], [5, 0], [6, 1], [7, 0], [8, 1]],
    0.5: [[7, 0]],  # 2 and 8 sit exactly at 0.5
    1.0: [],  # no GIoU is > 1, not even a duplicate's
}


class TestSelectGroups:
    @pytest.mark.parametrize("tau", list(EXPECTED))
    def test_exact_positives_and_hard_negatives(self, tau):
        sel = select_groups(_logits(), _boxes(), _target(), indices=INDICES, tau=tau)
        torch.testing.assert_close(sel.positives, _long([[0, 0], [1, 1]]))
        assert_close(sel.pos_giou, torch.tensor([1.0, 1.0]))
        torch.testing.assert_close(sel.hard_negatives, _long(EXPECTED[tau]))
        expected_giou = torch.tensor([BEST_GIOU[q] for q, _ in EXPECTED[tau]])
        assert_close(sel.neg_giou, expected_giou, rtol=0, atol=1e-6)
        torch.testing.assert_close(sel.best_gt, torch.tensor(BEST_GT))
        assert_close(sel.best_giou, torch.tensor(BEST_GIOU), rtol=0, atol=1e-6)

    def test_groups_per_gt(self):
        groups = select_groups(_logits(), _boxes(), _target(), indices=INDICES, tau=0.0).groups()
        assert len(groups) == 2
        torch.testing.assert_close(groups[0][0], torch.tensor([0]))
        torch.testing.assert_close(groups[0][1], torch.tensor([2, 7]))
        torch.testing.assert_close(groups[1][0], torch.tensor([1]))
        torch.testing.assert_close(groups[1][1], torch.tensor([8]))

    def test_selected_and_query_giou(self):
        sel = select_groups(_logits(), _boxes(), _target(), indices=INDICES, tau=0.0)
        queries, giou = sel.selected()
        torch.testing.assert_close(queries, torch.tensor([0, 1, 2, 7, 8]))
        assert_close(giou, torch.tensor([1.0, 1.0, 0.5, 1.0, 0.5]))
        torch.testing.assert_close(sel.selected(with_negatives=False)[0], torch.tensor([0, 1]))
        assert_close(sel.query_giou(), torch.tensor(BEST_GIOU), rtol=0, atol=1e-6)

    def test_matcher_gives_the_same_positives(self):
        matcher = HungarianMatcher(2.0, 5.0, 2.0)
        by_matcher = select_groups(_logits(), _boxes(), _target(), matcher=matcher, tau=0.0)
        by_indices = select_groups(_logits(), _boxes(), _target(), indices=INDICES, tau=0.0)
        torch.testing.assert_close(by_matcher.positives, by_indices.positives)
        torch.testing.assert_close(by_matcher.hard_negatives, by_indices.hard_negatives)

    def test_image_without_gt(self):
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        sel = select_groups(_logits(), _boxes(), target, matcher=HungarianMatcher(), tau=-1.0)
        assert sel.positives.shape == (0, 2) and sel.hard_negatives.shape == (0, 2)
        assert sel.groups() == [] and sel.num_gt == 0
        torch.testing.assert_close(sel.best_gt, torch.full((9,), -1))
        assert sel.selected()[0].numel() == 0
        assert sel.negative_pool("candidates")[0].numel() == 0

    def test_gt_without_positive(self):
        """Fewer queries than GTs: a GT's group has no positive; its hard negatives still gather."""
        sel = select_groups(_logits(), _boxes(), _target(), indices=(torch.tensor([0]), torch.tensor([0])))
        groups = sel.groups()
        assert groups[1][0].numel() == 0
        torch.testing.assert_close(groups[1][1], torch.tensor([1, 8]))  # query 1 is now a hard negative

    @pytest.mark.parametrize("tau", [-1.01, 1.5, float("nan")])
    def test_bad_tau(self, tau):
        with pytest.raises(ValueError, match="tau"):
            select_groups(_logits(), _boxes(), _target(), indices=INDICES, tau=tau)

    def test_needs_matcher_or_indices(self):
        with pytest.raises(ValueError, match="matcher"):
            select_groups(_logits(), _boxes(), _target())

    def test_batch_matches_single(self):
        target2 = {"boxes": _target()["boxes"][:1], "labels": torch.tensor([1])}
        logits, boxes = torch.stack([_logits(), _logits()]), torch.stack([_boxes(), _boxes().flip(0)])
        matcher = HungarianMatcher()
        sels = select_groups_batch(logits, boxes, [_target(), target2], matcher, tau=-0.5)
        for b, target in enumerate([_target(), target2]):
            single = select_groups(logits[b], boxes[b], target, matcher=matcher, tau=-0.5)
            torch.testing.assert_close(sels[b].positives, single.positives)
            torch.testing.assert_close(sels[b].hard_negatives, single.hard_negatives)
        with pytest.raises(ValueError, match="targets"):
            select_groups_batch(logits, boxes, [_target()], matcher)


def _selection(positives, negatives, best_gt, num_gt=2) -> GroupSelection:
    """A hand-written selection: positives/negatives as (query, gt) rows, best_gt of every query."""
    pos, neg = _long(positives), _long(negatives)
    best = torch.tensor(best_gt)
    return GroupSelection(
        pos, torch.ones(len(pos)), neg, torch.ones(len(neg)), best, torch.zeros(len(best)), num_gt
    )


class TestPairSelections:
    # student: positives q0->GT0, q1->GT1; hard negatives q2 (GT 0), q3 (GT 1); q4 an easy negative of GT 0
    STUDENT = ([[0, 0], [1, 1]], [[2, 0], [3, 1]], [0, 1, 0, 1, 0])
    # teacher: positive q5 -> GT 0 only; hard negatives q1 (GT 0), q2 (GT 1); q0 an easy negative of GT 1
    TEACHER = ([[5, 0]], [[1, 0], [2, 1]], [1, 0, 1, 0, 0, 0])
    # position of each query on a line: cost = |x_s - x_t|; a global match would cross the groups
    X_S = torch.tensor([0.0, 0.0, 10.0, 0.0, 1.0])
    X_T = torch.tensor([0.0, 0.0, 10.0, 0.0, 0.0, 0.0])

    def _cost(self, s, t):
        return (self.X_S[s][:, None] - self.X_T[t][None]).abs()

    def _pair(self, **kw):
        return pair_selections(_selection(*self.STUDENT), _selection(*self.TEACHER), self._cost, **kw)

    def test_per_gt(self):
        s, t, pos = self._pair()
        torch.testing.assert_close(s, torch.tensor([0, 2, 3]))  # GT 1 has no teacher positive
        torch.testing.assert_close(t, torch.tensor([5, 1, 2]))
        torch.testing.assert_close(pos, torch.tensor([True, False, False]))

    def test_global(self):
        s, t, pos = self._pair(grouping="global")
        torch.testing.assert_close(s, torch.tensor([0, 2, 3]))
        torch.testing.assert_close(t, torch.tensor([5, 2, 1]))  # by position: 2 <-> 2, 3 <-> 1
        torch.testing.assert_close(pos, torch.tensor([True, False, False]))

    def test_positives_only(self):
        s, t, pos = self._pair(with_negatives=False)
        torch.testing.assert_close(s, torch.tensor([0]))
        torch.testing.assert_close(t, torch.tensor([5]))
        assert bool(pos.all())

    def test_candidate_pool(self):
        """Teacher-defined hard negatives paired with any non-positive student query of the same GT."""
        s, t, _ = self._pair(student_pool="candidates")
        # group 0: student candidates {2, 4} vs teacher {1} -> 4 (x=1) is closer to x=0 than 2 (x=10)
        # group 1: student candidates {3} vs teacher {2}
        torch.testing.assert_close(s, torch.tensor([0, 4, 3]))
        torch.testing.assert_close(t, torch.tensor([5, 1, 2]))

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="grouping"):
            self._pair(grouping="image")
        with pytest.raises(ValueError, match="pool"):
            self._pair(student_pool="all")
        with pytest.raises(ValueError, match="GTs"):
            pair_selections(_selection(*self.STUDENT, num_gt=3), _selection(*self.TEACHER), self._cost)
