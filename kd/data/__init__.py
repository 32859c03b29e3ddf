"""Data: the COCO-format dataset and its transforms, annotation checks, and the synthetic generator.

``python -m kd.data generate --root data/synthetic`` writes the generated dataset (``params.yaml``
``data.synthetic``); ``python -m kd.data check <annotation json> <image dir>`` validates any COCO split.
Names are imported lazily so that the generator and the checker do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # eager names for type checkers and editors
    from kd.data.coco import CocoDetection, build_dataset, collate_fn, split_paths
    from kd.data.synthetic import SyntheticConfig, generate
    from kd.data.transforms import build_transforms, coco_recipe
    from kd.data.validate import validate_coco

_EXPORTS = {
    "CocoDetection": "kd.data.coco",
    "build_dataset": "kd.data.coco",
    "collate_fn": "kd.data.coco",
    "split_paths": "kd.data.coco",
    "SyntheticConfig": "kd.data.synthetic",
    "generate": "kd.data.synthetic",
    "build_transforms": "kd.data.transforms",
    "coco_recipe": "kd.data.transforms",
    "validate_coco": "kd.data.validate",
}
__all__ = [
    "CocoDetection",
    "SyntheticConfig",
    "build_dataset",
    "build_transforms",
    "coco_recipe",
    "collate_fn",
    "generate",
    "split_paths",
    "validate_coco",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kd.data' has no attribute {name!r}")
