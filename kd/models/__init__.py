"""Detectors, criterion and post-processing. ``build_model`` / ``build_criterion`` import lazily, so that
``import kd.models`` stays cheap and an architecture's module is loaded only when it is used."""

from __future__ import annotations

import importlib

from torch import nn

# arch name in params.yaml -> (module, class); each class has ``from_config(cfg: dict)``
ARCHITECTURES = {
    "conditional_detr": ("kd.models.conditional_detr", "ConditionalDETR"),
    "dab_detr": ("kd.models.dab_detr", "DABDETR"),
    "deformable_detr": ("kd.models.deformable_detr", "DeformableDETR"),
}


def build_model(cfg: dict) -> nn.Module:
    """The detector of ``cfg["arch"]`` from a merged ``model`` config (:func:`kd.config.model_config`)."""
    arch = cfg.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch: expected one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    module, name = ARCHITECTURES[arch]
    return getattr(importlib.import_module(module), name).from_config(cfg)


def build_criterion(cfg_loss: dict, num_classes: int) -> nn.Module:
    """``SetCriterion`` with its ``HungarianMatcher`` from a ``loss`` section (``kd.config.loss_config``)."""
    from kd.models.criterion import SetCriterion
    from kd.models.matcher import HungarianMatcher

    alpha, gamma = cfg_loss.get("focal_alpha", 0.25), cfg_loss.get("focal_gamma", 2.0)
    matcher = HungarianMatcher(
        cost_class=cfg_loss.get("match_cls", 2.0),
        cost_bbox=cfg_loss.get("match_l1", 5.0),
        cost_giou=cfg_loss.get("match_giou", 2.0),
        focal_alpha=alpha,
        focal_gamma=gamma,
    )
    return SetCriterion(
        num_classes,
        matcher,
        weight_cls=cfg_loss.get("cls", 2.0),
        weight_l1=cfg_loss.get("l1", 5.0),
        weight_giou=cfg_loss.get("giou", 2.0),
        focal_alpha=alpha,
        focal_gamma=gamma,
        cls_loss=cfg_loss.get("cls_loss", "focal"),
        vfl_alpha=cfg_loss.get("vfl_alpha", 0.75),
        one2many_k=cfg_loss.get("one2many_k", 6),
        one2many_weight=cfg_loss.get("one2many_weight", 1.0),
    )
