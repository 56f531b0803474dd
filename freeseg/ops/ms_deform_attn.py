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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "pytorch", "cpu", "cuda")
# dtypes each compiled kernel is instantiated for (kernels/ms_deform_attn_{cpu.cpp,cuda.cu}).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# The extension is optional (setup.py skips it without a compiler). Importing it registers
# torch.ops.freeseg.ms_deform_attn_{forward,backward}. The import error (not built, or built
# against another torch) is kept so that the fallback warning and the explicit-backend error
# say why the kernel is missing; errors raised by a loaded kernel are never caught.
try:
    from freeseg import _C as _kernels
    _KERNEL_IMPORT_ERROR = ""
except ImportError as error:
    _kernels = None
    _KERNEL_IMPORT_ERROR = str(error)
_fallback_warned = False


def kernel_available(device_type: str) -> bool:
    """Whether the compiled kernel for `device_type` ("cpu" or "cuda") was built and loaded."""
    if _kernels is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_kernels.with_cuda))


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


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd over the compiled kernels (torch.ops.freeseg.ms_deform_attn_{forward,backward}).

    Gradients flow to value, sampling_locations and attention_weights; spatial_shapes and
    level_start_index are integer metadata. The backward kernel is not itself differentiable.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return torch.ops.freeseg.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )  # (B, Lq, M*D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = torch.ops.freeseg.ms_deform_attn_backward(
            *ctx.saved_tensors, grad_output.contiguous()
        )
        return grad_value, None, None, grad_loc, grad_attn


def _check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Raise a ValueError naming the offending argument when shapes, dtypes or devices disagree."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (B, S, M, D), got {tuple(value.shape)}")
    B, S, M, D = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be (B, Lq, M, L, P, 2), "
                         f"got {tuple(sampling_locations.shape)}")
    _, Lq, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not "
                         f"match value (B={B}, M={M})")
    if attention_weights.shape != (B, Lq, M, L, P):
        raise ValueError(f"ms_deform_attn: attention_weights must be (B, Lq, M, L, P) = {(B, Lq, M, L, P)}, "
                         f"got {tuple(attention_weights.shape)}")
    if spatial_shapes.shape != (L, 2) or spatial_shapes.dtype != torch.long:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be an int64 (L, 2) = ({L}, 2) tensor of (H, W), "
                         f"got {spatial_shapes.dtype} {tuple(spatial_shapes.shape)}")
    if level_start_index.shape != (L,) or level_start_index.dtype != torch.long:
        raise ValueError(f"ms_deform_attn: level_start_index must be an int64 ({L},) tensor, "
                         f"got {level_start_index.dtype} {tuple(level_start_index.shape)}")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise ValueError(f"ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, "
                         f"got {value.dtype}, {sampling_locations.dtype}, {attention_weights.dtype}")
    if not (value.device == sampling_locations.device == attention_weights.device):
        raise ValueError("ms_deform_attn: value, sampling_locations and attention_weights must be on one device, "
                         f"got {value.device}, {sampling_locations.device}, {attention_weights.device}")
    # The levels must tile the S tokens in order: the kernels index value through
    # level_start_index, the reference through spatial_shapes, and both must read the same pixels.
    sizes = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    starts = [sum(sizes[:lvl]) for lvl in range(L)]
    if (spatial_shapes <= 0).any() or sum(sizes) != S or level_start_index.tolist() != starts:
        raise ValueError(f"ms_deform_attn: levels {spatial_shapes.tolist()} with level_start_index "
                         f"{level_start_index.tolist()} do not tile value's S={S} tokens "
                         f"(expected starts {starts}, total {sum(sizes)})")


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    backend: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention with an explicit backend choice.

    Shapes:
        value               (B, S, M, D)
        spatial_shapes      (L, 2) int64, (H, W) per level, S = sum H * W
        level_start_index   (L,) int64, offset of each level in S
        sampling_locations  (B, Lq, M, L, P, 2), (x, y) in [0, 1]; outside samples zeros
        attention_weights   (B, Lq, M, L, P)
        returns             (B, Lq, M * D)

    backend: "auto" uses the compiled kernel for the tensors' device when it is built and
    supports their dtype, else the PyTorch reference (warning once when the kernel is not built);
    "pytorch" is the reference; "cpu" and "cuda" are the compiled kernels and raise if they are
    not available. Kernel errors are never caught.
    """
    global _fallback_warned
    if backend not in BACKENDS:
        raise ValueError(f"ms_deform_attn: unknown backend {backend!r}; choose one of {BACKENDS}")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    device = value.device.type
    if backend == "auto":
        backend = device if kernel_available(device) and value.dtype in KERNEL_DTYPES[device] else "pytorch"
        if backend == "pytorch" and not kernel_available(device) and not _fallback_warned:
            _fallback_warned = True
            reason = f"({_KERNEL_IMPORT_ERROR})" if _KERNEL_IMPORT_ERROR else "(built without it)"
            logger.warning("ms_deform_attn: no compiled kernel for %s %s; using the slower PyTorch reference. "
                           "Reinstall with a C++ compiler (and CUDA_HOME for GPUs) to build it.", device, reason)
    if backend == "pytorch":
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    if not kernel_available(backend):
        reason = _KERNEL_IMPORT_ERROR or "freeseg._C was built without it"
        raise RuntimeError(f"ms_deform_attn: backend {backend!r} requested but its compiled kernel is not "
                           f"available ({reason}); reinstall with `pip install --no-build-isolation -e .` where "
                           "a C++ compiler (and, for 'cuda', the CUDA toolkit) is present, or use backend='pytorch'")
    if device != backend:
        raise ValueError(f"ms_deform_attn: backend {backend!r} but the tensors are on {value.device}")
    if value.dtype not in KERNEL_DTYPES[backend]:
        raise ValueError(f"ms_deform_attn: the {backend} kernel supports {KERNEL_DTYPES[backend]}, got {value.dtype}")
    # The kernels take the level metadata on the tensors' device.
    spatial_shapes = spatial_shapes.to(value.device)
    level_start_index = level_start_index.to(value.device)
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
