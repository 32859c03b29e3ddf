"""Tests for kd.models.matcher: optimality against brute force, batching, empty targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kd.models.matcher import HungarianMatcher, focal_cost


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    cxcy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([cxcy, wh], dim=1)


def _random_case(bs: int, num_queries: int, num_classes: int, counts: list[int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(bs, num_queries, num_classes, generator=gen)
    boxes = torch.stack([_random_boxes(num_queries, gen) for _ in range(bs)])
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=gen), "boxes": _random_boxes(n, gen)}
        for n in counts
    ]
    return logits, boxes, targets


def _brute_force_cost(cost: torch.Tensor) -> float:
    """Minimum total cost assigning each of the T columns to a distinct row (T <= Q)."""
    num_queries, num_targets = cost.shape
    return min(
        sum(cost[q, t].item() for t, q in enumerate(perm))
        for perm in itertools.permutations(range(num_queries), num_targets)
    )


class TestFocalCost:
    def test_matches_formula(self):
        p = torch.tensor([[0.3, 0.8]])
        cost = focal_cost(p, torch.tensor([1, 0]), alpha=0.25, gamma=2.0)
        expected = [
            0.25 * 0.2**2 * -math.log(0.8) - 0.75 * 0.8**2 * -math.log(0.2),
            0.25 * 0.7**2 * -math.log(0.3) - 0.75 * 0.3**2 * -math.log(0.7),
        ]
        torch.testing.assert_close(cost, torch.tensor([expected]), rtol=1e-5, atol=1e-6)


class TestHungarianMatcher:
    @pytest.mark.parametrize("seed", range(6))
    def test_optimal_against_brute_force(self, seed):
        matcher = HungarianMatcher()
        counts = [seed % 4, 4, 1]
        logits, boxes, targets = _random_case(3, 5, 4, counts, seed)
        indices = matcher(logits, boxes, targets)
        for b, (src, tgt) in enumerate(indices):
            n = counts[b]
            assert len(src) == len(tgt) == n
            assert len(set(src.tolist())) == n and sorted(tgt.tolist()) == list(range(n))
            if n == 0:
                continue
            cost = matcher.cost_matrix(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
            got = cost[src, tgt].sum().item()
            assert got == pytest.approx(_brute_force_cost(cost), abs=1e-5)

    def test_cost_matrix_terms(self):
        matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
        tgt = torch.tensor([[0.6, 0.5, 0.2, 0.4]])
        cost = matcher.cost_matrix(torch.zeros(1, 3), boxes, torch.tensor([0]), tgt)
        torch.testing.assert_close(cost, torch.tensor([[0.1 + 0.2]]))
        giou_only = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
        cost = giou_only.cost_matrix(torch.zeros(1, 3), boxes, torch.tensor([0]), boxes)
        torch.testing.assert_close(cost, torch.tensor([[-1.0]]))

    def test_prefers_exact_box_and_class(self):
        matcher = HungarianMatcher()
        boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
        logits = torch.full((1, 3, 2), -5.0)
        logits[0, 1, 1] = 5.0
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}]
        ((src, tgt),) = matcher(logits, boxes, targets)
        assert src.tolist() == [1] and tgt.tolist() == [0]
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64

    def test_batched_equals_per_image(self):
        matcher = HungarianMatcher()
        counts = [3, 0, 5, 2]
        logits, boxes, targets = _random_case(4, 6, 3, counts, seed=11)
        batched = matcher(logits, boxes, targets)
        for b in range(4):
            single = matcher(logits[b : b + 1], boxes[b : b + 1], targets[b : b + 1])[0]
            torch.testing.assert_close(batched[b][0], single[0])
            torch.testing.assert_close(batched[b][1], single[1])
            src, tgt = matcher(logits[b], boxes[b], targets[b])  # 2-D input, one dict
            torch.testing.assert_close(src, single[0])
            torch.testing.assert_close(tgt, single[1])

    def test_empty_targets(self):
        matcher = HungarianMatcher()
        logits, boxes, targets = _random_case(2, 4, 3, [0, 0], seed=0)
        for src, tgt in matcher(logits, boxes, targets):
            assert src.numel() == 0 and tgt.numel() == 0
            assert src.dtype == torch.int64

    def test_more_targets_than_queries(self):
        matcher = HungarianMatcher()
        logits, boxes, targets = _random_case(1, 2, 3, [4], seed=3)
        ((src, tgt),) = matcher(logits, boxes, targets)
        assert sorted(src.tolist()) == [0, 1] and len(set(tgt.tolist())) == 2

    def test_non_finite_raises(self):
        matcher = HungarianMatcher()
        logits, boxes, targets = _random_case(1, 3, 3, [2], seed=0)
        boxes[0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            matcher(logits, boxes, targets)

    def test_batch_size_mismatch_raises(self):
        logits, boxes, targets = _random_case(2, 3, 3, [1, 1], seed=0)
        with pytest.raises(ValueError, match="targets"):
            HungarianMatcher()(logits, boxes, targets[:1])
