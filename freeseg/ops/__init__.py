"""Custom operators: multi-scale deformable attention (reference, CPU and CUDA kernels)."""

from freeseg.ops.ms_deform_attn import kernel_available, ms_deform_attn, ms_deform_attn_pytorch

__all__ = ["kernel_available", "ms_deform_attn", "ms_deform_attn_pytorch"]
