"""Small pieces shared by the distillers: decoder layer mapping and the soft-label / box losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou_loss

from kd.models.outputs import DetectorOutput


def layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher layer paired with each student decoder layer when depths differ.

    Rule (documented in the README): student layer i (0-based) is paired with teacher layer
    ``round((i + 1) * L_T / L_S) - 1``, so the student's last layer always meets the teacher's last layer
    and equal depths map one to one. DETRDistill's code pairs layer i with layer i (only for equal depth).
    """
    return [round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)]


def soft_bce(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Binary cross-entropy of student logits against soft teacher probabilities, summed over classes.

    student_logits, teacher_probs: [N, C] -> [N].
    """
    return F.binary_cross_entropy_with_logits(student_logits, teacher_probs, reduction="none").sum(-1)


def l1_giou(student_boxes: Tensor, teacher_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair L1 (summed over the 4 coordinates) and 1 - GIoU of normalised cxcywh boxes.

    student_boxes, teacher_boxes: [N, 4] -> ([N], [N]).
    """
    l1 = (student_boxes - teacher_boxes).abs().sum(-1)
    s = box_convert(student_boxes, "cxcywh", "xyxy")
    t = box_convert(teacher_boxes, "cxcywh", "xyxy")
    return l1, generalized_box_iou_loss(s, t, reduction="none")


def proposal_anchors(teacher_out: DetectorOutput, method: str) -> Tensor:
    """A two-stage teacher's queries this step: its per-image proposal anchors
    ``teacher_out.detection.queries`` [B, Q_T, 4] (unsigmoided), detached."""
    anchors = teacher_out.detection.queries
    if anchors is None:
        raise ValueError(f"{method}: the two-stage teacher's output has no detection.queries")
    return anchors.detach()
