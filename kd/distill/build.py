"""From ``params.yaml``'s ``distill`` section to the engine's loss factory.

``distill.method`` picks the method (none | qskd | kd_detr | detrdistill); ``distill.<method>`` holds its
config (each part switchable); ``distill.teacher_checkpoint`` the trained or imported teacher.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

from torch import nn

from kd.checkpoint import load_checkpoint, load_model_state
from kd.config import model_config
from kd.distill.base import DistillLoss

# method -> (module, config class, distiller class)
METHODS = {
    "qskd": ("kd.distill.qskd", "QSKDConfig", "QSKD"),
    "kd_detr": ("kd.distill.kd_detr", "KDDETRConfig", "KDDETR"),
    "detrdistill": ("kd.distill.detrdistill", "DETRDistillConfig", "DETRDistill"),
}


def load_detector(params: dict, role: str, checkpoint: str | Path) -> nn.Module:
    """The ``role`` (teacher | student) detector of ``params`` with the checkpoint's weights, in eval mode and
    frozen. A checkpoint of another architecture or class count fails naming the keys."""
    from kd.models import build_model

    path = Path(checkpoint)
    model = build_model(model_config(params, role))
    load_model_state(model, load_checkpoint(path)["model"], path)
    return model.eval().requires_grad_(False)


def load_teacher(params: dict, checkpoint: str | Path) -> nn.Module:
    """The teacher of ``params`` (``model`` merged with ``teacher.model``): :func:`load_detector`."""
    return load_detector(params, "teacher", checkpoint)


def distiller_fields(method: str) -> tuple[str, ...]:
    """The config field names of ``method`` (empty for an unknown method)."""
    if method not in METHODS:
        return ()
    module, cfg_name, _ = METHODS[method]
    return tuple(f.name for f in dataclasses.fields(getattr(importlib.import_module(module), cfg_name)))


def distiller_config(params: dict, method: str):
    """The method's config dataclass from ``distill.<method>`` (unknown keys are errors)."""
    module, cfg_name, _ = METHODS[method]
    cfg_cls = getattr(importlib.import_module(module), cfg_name)
    return cfg_cls.from_dict(dict((params.get("distill") or {}).get(method) or {}))


def loss_factory(params: dict, teacher: nn.Module | None = None) -> Callable | None:
    """``(student, criterion) -> DistillLoss`` for ``distill.method``, or None when the method is none.

    The teacher is loaded from ``distill.teacher_checkpoint`` unless given.
    """
    distill = params.get("distill") or {}
    method = distill.get("method", "none")
    if method == "none":
        return None
    if method not in METHODS:
        raise ValueError(f"distill.method: expected one of none, {', '.join(METHODS)}; got {method!r}")
    cfg = distiller_config(params, method)
    if teacher is None:
        if not distill.get("teacher_checkpoint"):
            raise ValueError("distill.teacher_checkpoint: needed when distill.method is not none")
        teacher = load_teacher(params, distill["teacher_checkpoint"])
    distiller_cls = getattr(importlib.import_module(METHODS[method][0]), METHODS[method][2])

    def factory(student: nn.Module, criterion: nn.Module) -> DistillLoss:
        teacher.to(next(student.parameters()).device)
        return DistillLoss(teacher, criterion, distiller_cls(cfg, teacher, student))

    return factory
