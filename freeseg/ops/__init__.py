"""Custom operators: multi-scale deformable attention (reference, CPU and CUDA kernels)."""

from freeseg.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["ms_deform_attn", "ms_deform_attn_pytorch"]
