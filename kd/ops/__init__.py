"""Custom operators: multi-scale deformable attention in pure PyTorch."""

from kd.ops.msdeform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
    use_gather,
)

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_grid_sample",
    "use_gather",
]
