"""Custom operators: multi-scale deformable attention in pure PyTorch."""

from kd.ops.msdeform_attn import MSDeformAttn, ms_deform_attn

__all__ = ["MSDeformAttn", "ms_deform_attn"]
