"""kd: knowledge distillation of DETR object detectors (QSKD, KD-DETR, DETRDistill)."""

__version__ = "0.1.0"
