"""kd: knowledge distillation of DETR object detectors (QSKD, KD-DETR, DETRDistill)."""

from kd.runtime import tune_malloc

__version__ = "0.1.0"

tune_malloc()  # glibc keeps training-sized temporaries in the heap (kd/runtime.py); KD_TUNE_MALLOC=0 disables
