"""Box helpers that torchvision.ops does not provide.

Everything else (``box_convert``, ``generalized_box_iou``, ``box_iou``) is used from torchvision directly.
"""

from __future__ import annotations

from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to [0, 1], safe at the ends (Deformable DETR ``util/misc.py``).

    Args:
        x: any shape, values expected in [0, 1] (e.g. normalised cxcywh boxes or reference points).
        eps: lower clamp of ``x`` and ``1 - x`` before the log.

    Returns:
        ``log(x / (1 - x))``, same shape as ``x``, finite (within ``±log(1/eps)``).
    """
    x = x.clamp(min=0.0, max=1.0)
    return (x.clamp(min=eps) / (1.0 - x).clamp(min=eps)).log()
