"""Distillers for DETR detectors: QSKD, KD-DETR and DETRDistill behind one interface (kd.distill.base)."""
