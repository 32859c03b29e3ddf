"""The one interface every distiller implements, and the loss function that plugs it into the engine.

A distiller sees the teacher's and the student's ``DetectorOutput``, the targets and the student's
Hungarian matching, and returns a dict of named, *weighted* loss tensors (each logged separately).
It may ask both models to decode extra, isolated query groups first (KD-DETR's distillation points,
DETRDistill's teacher queries) through ``queries``. Its only parameters are its own adapters: the
teacher is never a submodule, runs in eval mode under ``torch.no_grad()``, and never enters the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kd.models.backbone import can_share, share_features
from kd.models.outputs import DetectorOutput

Targets = list[dict[str, Any]]
Indices = list[tuple[Tensor, Tensor]]


class Distiller(nn.Module):
    """Base class. Subclasses override ``queries`` (optional) and ``forward``.

    Attributes:
        needs_attention: ask both models for cross-attention maps / sampling locations.
    """

    needs_attention: bool = False

    def queries(
        self, teacher: nn.Module, student: nn.Module, batch_size: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Extra query groups to decode this step: (teacher groups, student groups), each {name: [B|1, M, K]}
        in the respective model's ``query_format``. Default: none."""
        return {}, {}

    def student_queries(self, teacher_out: DetectorOutput, groups: dict[str, Tensor]) -> dict[str, Tensor]:
        """Student groups that depend on the teacher's output this step (e.g. a two-stage teacher's
        per-image proposals as KD-DETR specific points); called after the teacher's forward."""
        return groups

    def forward(
        self,
        teacher_out: DetectorOutput,
        student_out: DetectorOutput,
        targets: Targets,
        student_indices: Indices,
    ) -> dict[str, Tensor]:
        raise NotImplementedError


class DistillLoss(nn.Module):
    """``loss_fn(model, images, mask, targets)`` for ``kd.engine``: detection loss plus distillation.

    The teacher is held outside the module tree (so it is neither optimised nor checkpointed with the
    student); the distiller's adapters are submodules and so train with the student. When teacher and
    student use the same frozen backbone (the embedded default: both load the pretrain stage's ResNet and
    do not train it), its features are computed once per step and given to both (the one with more feature
    levels computes them).
    """

    def __init__(self, teacher: nn.Module, criterion: nn.Module, distiller: Distiller):
        super().__init__()
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.criterion = criterion
        self.distiller = distiller
        self._shared_backbone: bool | None = None  # decided at the first step (the optimizer freezes)
        self._share_from = "teacher"  # whose backbone computes the shared features (the one with more levels)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def train(self, mode: bool = True) -> DistillLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode whatever the engine does
        return self

    def forward(self, model: nn.Module, images: Tensor, mask: Tensor, targets: Targets) -> dict[str, Tensor]:
        student = model.module if hasattr(model, "module") else model
        t_bb, s_bb = self.teacher.backbone, student.backbone
        if self._shared_backbone is None:
            from_teacher = can_share(t_bb, s_bb)
            self._share_from = "teacher" if from_teacher else "student"
            self._shared_backbone = from_teacher or can_share(s_bb, t_bb)
        if self._shared_backbone:
            share_features(t_bb if self._share_from == "teacher" else s_bb, [t_bb, s_bb], images, mask)
        t_groups, s_groups = self.distiller.queries(self.teacher, student, images.shape[0])
        attn = self.distiller.needs_attention
        with torch.no_grad():
            t_out = self.teacher(images, mask, extra_queries=t_groups or None, return_attention=attn)
        s_groups = self.distiller.student_queries(t_out, s_groups)
        s_out = model(images, mask, targets=targets, extra_queries=s_groups or None, return_attention=attn)
        losses = self.criterion(s_out, targets)
        losses.update(self.distiller(t_out, s_out, targets, self.criterion.last_indices))
        return losses
