"""Group Query Selection (QSKD, methods.md §4.2.1) and the local teacher-student pairing it enables (§4.2.3).

For one model's predictions on one image (one decoder layer):

* positives ``P``: the Hungarian match of the predictions to the ground truth (the detector's matcher);
* hard negatives ``H = {q not in P : max_j GIoU(b_q, g_j) > tau}`` (strictly greater), each with the GT of
  its best GIoU (``argmax``; ties go to the lowest GT index) and that GIoU;
* the group of GT ``j``: its positive plus the hard negatives whose best GT is ``j`` (a query joins exactly
  one group; the paper's rule for several groups was not retrieved).

:func:`pair_selections` pairs a student's and a teacher's selections locally (LAPD): positives through the
shared GT index, hard negatives by a small Hungarian inside each GT group (``grouping="per_gt"``) or over
the whole image (``"global"``, as the third-party TPRD port). The side whose GQS defines the hard negatives
is a parameter: ``pool="selected"`` uses that side's hard negatives, ``"candidates"`` every non-positive
query of it (so that the other side's hard negatives alone decide what is distilled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

from kd.models.matcher import HungarianMatcher

GROUPINGS = ("per_gt", "global")
POOLS = ("selected", "candidates")
CostFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class GroupSelection:
    """GQS result for one image and one set of predictions (Q queries, T ground-truth boxes).

    ``positives`` and ``hard_negatives`` are sorted by query index.
    """

    positives: Tensor  # [P, 2] int64 (query index, matched GT index)
    pos_giou: Tensor  # [P] GIoU of each positive with its matched GT
    hard_negatives: Tensor  # [N, 2] int64 (query index, index of its best-GIoU GT)
    neg_giou: Tensor  # [N] that best GIoU (> tau)
    best_gt: Tensor  # [Q] int64 best-GIoU GT of every query (-1 when the image has no GT)
    best_giou: Tensor  # [Q] its GIoU (-inf when the image has no GT)
    num_gt: int

    @property
    def num_queries(self) -> int:
        return self.best_gt.numel()

    def groups(self) -> list[tuple[Tensor, Tensor]]:
        """Per GT j: (its positive query, [0] or [1] int64; its hard-negative queries [n_j] int64)."""
        return [
            (
                self.positives[self.positives[:, 1] == j, 0],
                self.hard_negatives[self.hard_negatives[:, 1] == j, 0],
            )
            for j in range(self.num_gt)
        ]

    def selected(self, with_negatives: bool = True) -> tuple[Tensor, Tensor]:
        """Selected queries and their GIoU: positives (GIoU with their GT) then hard negatives (best GIoU).

        Returns (queries [P + N] int64, giou [P + N] float); hard negatives left out when not
        ``with_negatives``.
        """
        if not with_negatives:
            return self.positives[:, 0], self.pos_giou
        return (
            torch.cat([self.positives[:, 0], self.hard_negatives[:, 0]]),
            torch.cat([self.pos_giou, self.neg_giou]),
        )

    def query_giou(self) -> Tensor:
        """GIoU of every query [Q]: with its matched GT for positives, its best GIoU otherwise."""
        giou = self.best_giou.clone()
        giou[self.positives[:, 0]] = self.pos_giou
        return giou

    def negative_pool(self, pool: str) -> tuple[Tensor, Tensor]:
        """Negatives offered for pairing: ``"selected"`` the hard negatives, ``"candidates"`` every
        non-positive query. Returns (queries [n] int64, their best GT [n] int64), by query index."""
        if pool == "selected":
            return self.hard_negatives[:, 0], self.hard_negatives[:, 1]
        if pool != "candidates":
            raise ValueError(f"selection: pool must be one of {POOLS}, got {pool!r}")
        if self.num_gt == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty
        free = torch.ones(self.num_queries, dtype=torch.bool)
        free[self.positives[:, 0]] = False
        queries = free.nonzero().squeeze(1)
        return queries, self.best_gt[queries]


def _check_tau(tau: float) -> None:
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"selection: tau must be in [-1, 1] (a GIoU), got {tau}")


@torch.no_grad()
def select_groups(
    logits: Tensor,
    boxes: Tensor,
    target: dict[str, Tensor],
    matcher: HungarianMatcher | None = None,
    indices: tuple[Tensor, Tensor] | None = None,
    tau: float = 0.0,
) -> GroupSelection:
    """Group Query Selection for one image (QSKD Sec. GQS).

    Args:
        logits: [Q, C] class logits (only read by ``matcher``); boxes: [Q, 4] normalised cxcywh.
        target: ``boxes [T, 4]`` normalised cxcywh and ``labels [T]``.
        matcher: computes the positives when ``indices`` is not given.
        indices: a precomputed match ``(query idx [P], gt idx [P])`` (e.g. the criterion's).
        tau: GIoU threshold in [-1, 1]; hard negatives have a best GIoU strictly above it.
    """
    _check_tau(tau)
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or logits.shape[0] != boxes.shape[0]:
        raise ValueError(f"selection: logits {tuple(logits.shape)} / boxes {tuple(boxes.shape)} mismatch")
    if indices is None:
        if matcher is None:
            raise ValueError("selection: give a matcher or the match indices")
        indices = matcher(logits, boxes, target)
    num_q, num_gt = boxes.shape[0], len(target["boxes"])
    src, tgt = (torch.as_tensor(i, dtype=torch.int64).cpu() for i in indices)
    order = src.argsort()
    positives = torch.stack([src[order], tgt[order]], 1)
    empty_long, empty_float = torch.empty(0, 2, dtype=torch.int64), torch.empty(0)
    if num_gt == 0:
        best_gt, best_giou = torch.full((num_q,), -1), torch.full((num_q,), float("-inf"))
        return GroupSelection(positives, empty_float, empty_long, empty_float, best_gt, best_giou, 0)
    giou = generalized_box_iou(
        box_convert(boxes.detach().float().cpu(), "cxcywh", "xyxy"),
        box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy"),
    )  # [Q, T]
    best_giou, best_gt = giou.max(dim=1)  # first maximum on ties
    hard = best_giou > tau
    hard[positives[:, 0]] = False
    neg = hard.nonzero().squeeze(1)
    return GroupSelection(
        positives=positives,
        pos_giou=giou[positives[:, 0], positives[:, 1]],
        hard_negatives=torch.stack([neg, best_gt[neg]], 1),
        neg_giou=best_giou[neg],
        best_gt=best_gt,
        best_giou=best_giou,
        num_gt=num_gt,
    )


@torch.no_grad()
def select_groups_batch(
    logits: Tensor,
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    matcher: HungarianMatcher | None = None,
    indices: list[tuple[Tensor, Tensor]] | None = None,
    tau: float = 0.0,
) -> list[GroupSelection]:
    """:func:`select_groups` for a batch: logits [B, Q, C], boxes [B, Q, 4], B targets; the matcher runs
    once on the whole batch when ``indices`` is not given."""
    if len(targets) != boxes.shape[0]:
        raise ValueError(f"selection: {len(targets)} targets for a batch of {boxes.shape[0]}")
    if indices is None:
        if matcher is None:
            raise ValueError("selection: give a matcher or the match indices")
        indices = matcher(logits, boxes, targets)
    return [select_groups(logits[b], boxes[b], t, indices=indices[b], tau=tau) for b, t in enumerate(targets)]


def _hungarian(rows: Tensor, cols: Tensor, cost_fn: CostFn) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one pairs between query sets ``rows`` [n] and ``cols`` [m] (min(n, m) pairs)."""
    if rows.numel() == 0 or cols.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    cost = cost_fn(rows, cols).detach().float().cpu()
    if not torch.isfinite(cost).all():
        raise ValueError("selection: non-finite pairing cost (NaN/inf predictions)")
    r, c = linear_sum_assignment(cost.numpy())
    return rows[torch.as_tensor(r, dtype=torch.int64)], cols[torch.as_tensor(c, dtype=torch.int64)]


@torch.no_grad()
def pair_selections(
    student: GroupSelection,
    teacher: GroupSelection,
    cost_fn: CostFn,
    with_negatives: bool = True,
    grouping: str = "per_gt",
    student_pool: str = "selected",
    teacher_pool: str = "selected",
) -> tuple[Tensor, Tensor, Tensor]:
    """Local pairing of a student's and a teacher's predictions for one image (QSKD LAPD).

    Positives pair through the shared GT index (GTs matched on both sides). Negatives from each side's
    pool (:meth:`GroupSelection.negative_pool`) are paired by a Hungarian on ``cost_fn`` inside each GT
    group (``grouping="per_gt"``) or over the whole image (``"global"``).

    Args:
        cost_fn: (student queries [n], teacher queries [m]) -> [n, m] pairing cost.
        with_negatives: pair the negatives too (False: positives only, QSKD without GQS).

    Returns:
        (student queries [M], teacher queries [M], is_positive [M] bool), positives first (by GT index).
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"selection: grouping must be one of {GROUPINGS}, got {grouping!r}")
    if student.num_gt != teacher.num_gt:
        raise ValueError(f"selection: student has {student.num_gt} GTs, teacher {teacher.num_gt}")
    t_of_gt = torch.full((teacher.num_gt,), -1, dtype=torch.int64)
    t_of_gt[teacher.positives[:, 1]] = teacher.positives[:, 0]
    s_gt = student.positives[:, 1].sort()
    s_pos = student.positives[s_gt.indices, 0]
    shared = t_of_gt[s_gt.values] >= 0
    s_idx, t_idx = [s_pos[shared]], [t_of_gt[s_gt.values[shared]]]
    num_pos = int(shared.sum())
    if with_negatives:
        s_neg, s_grp = student.negative_pool(student_pool)
        t_neg, t_grp = teacher.negative_pool(teacher_pool)
        if grouping == "global":
            s_grp, t_grp = torch.zeros_like(s_grp), torch.zeros_like(t_grp)
        for g in torch.unique(t_grp).tolist():
            s, t = _hungarian(s_neg[s_grp == g], t_neg[t_grp == g], cost_fn)
            s_idx.append(s)
            t_idx.append(t)
    s_all, t_all = torch.cat(s_idx), torch.cat(t_idx)
    is_pos = torch.arange(s_all.numel()) < num_pos
    return s_all, t_all, is_pos
