"""Multi-scale deformable attention: reference vs explicit math, kernels vs reference.

Shows: the grid_sample reference equals a per-point loop with hand-written bilinear math
(pixel-centre convention, zeros outside); the compiled CPU kernel equals the reference in
float64 (< 1e-10) and float32, forward and all three gradients, on odd sizes and with locations
outside [0, 1]; gradcheck passes; threads do not change results; backend="auto" falls back with
one warning when the kernel is missing and explicit backends fail loudly. The CUDA source is
compiled in a slow test; numeric CUDA tests run when a GPU is present.
"""

import importlib
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from freeseg.ops import ms_deform_attn, ms_deform_attn_pytorch

# The module, not the function of the same name that freeseg.ops exports.
msda = importlib.import_module("freeseg.ops.ms_deform_attn")
REPO = Path(__file__).resolve().parents[1]
needs_cpu_kernel = pytest.mark.skipif(not msda.kernel_available("cpu"), reason="freeseg._C (CPU kernel) not built")
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and msda.kernel_available("cuda")), reason="needs a GPU and the CUDA kernel"
)

# (B, Lq, M, D, level shapes (H, W), P): levels of different shapes, D not a multiple of 8 or
# 32 (the kernels' inner loops have an 8-wide main part and a remainder), 1..8 points.
CONFIGS = [
    (1, 1, 1, 1, [(1, 1)], 1),
    (2, 7, 3, 5, [(6, 4), (3, 7), (1, 2)], 4),
    (3, 5, 2, 13, [(5, 5)], 8),
    (1, 9, 8, 32, [(10, 12), (5, 6)], 2),
]


def make_inputs(B, Lq, M, D, shapes, P, dtype=torch.float64, seed=0, device="cpu"):
    """Random inputs; locations drawn from [-0.2, 1.2] so some samples fall (partly) outside."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    L, S = len(shapes), int(sizes.sum())
    value = torch.randn(B, S, M, D, generator=gen, dtype=torch.float64)
    locations = torch.rand(B, Lq, M, L, P, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(B, Lq, M, L, P, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                 for t in (value, spatial_shapes, level_start_index, locations, weights))


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """One Python loop iteration per (b, q, m, l, p): the bilinear formula written out."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = torch.zeros(B, Lq, M, D, dtype=value.dtype)
    for b, q, m, lvl, p in torch.cartesian_prod(*(torch.arange(n) for n in (B, Lq, M, L, P))).tolist():
        H, W = spatial_shapes[lvl].tolist()
        start = int(level_start_index[lvl])
        x = float(sampling_locations[b, q, m, lvl, p, 0]) * W - 0.5  # pixel centres at integers
        y = float(sampling_locations[b, q, m, lvl, p, 1]) * H - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < H and 0 <= xx < W:  # corners outside the map count as zero
                weight = (1 - abs(x - xx)) * (1 - abs(y - yy))
                out[b, q, m] += attention_weights[b, q, m, lvl, p] * weight * value[b, start + yy * W + xx, m]
    return out.view(B, Lq, M * D)


def outputs_and_grads(backend, inputs, grad_seed=1):
    value, shapes, starts, locations, weights = inputs
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad.to(out))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def test_reference_hand_values():
    # One 2x2 level, one head, D = 1, values 1..4 (row-major), weight 1.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    locs = torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.75, 0.25], [0.0, 0.25], [-0.5, 0.5]], dtype=torch.float64)
    locations = locs.view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_pytorch(value, shapes, starts, locations, weights).flatten()
    # Centre of the map: mean of all four; (0.25, 0.25) is pixel (0, 0)'s centre; (0.75, 0.25)
    # is pixel (0, 1); x = 0 is the left edge: half of pixel (0, 0), half of the zero padding;
    # far outside: nothing.
    assert torch.allclose(out, torch.tensor([2.5, 1.0, 2.0, 0.5, 0.0], dtype=torch.float64), atol=1e-12)


def test_reference_matches_naive_loop():
    inputs = make_inputs(2, 3, 2, 5, [(4, 6), (3, 2)], 3)
    expected = naive_ms_deform_attn(*inputs)
    assert (ms_deform_attn_pytorch(*inputs) - expected).abs().max() < 1e-12
    # The sampled locations really do cover the outside and the border of the maps.
    assert (inputs[3] < 0).any() and (inputs[3] > 1).any()


@needs_cpu_kernel
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_kernel_matches_reference_float64(config):
    inputs = make_inputs(*config, seed=len(config[4]))
    for name, got, ref in zip(("out", "value", "loc", "weight"), outputs_and_grads("cpu", inputs),
                              outputs_and_grads("pytorch", inputs)):
        assert (got - ref).abs().max() < 1e-10, name


@needs_cpu_kernel
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_kernel_matches_reference_float32(config):
    inputs = make_inputs(*config, dtype=torch.float32, seed=7)
    for name, got, ref in zip(("out", "value", "loc", "weight"), outputs_and_grads("cpu", inputs),
                              outputs_and_grads("pytorch", inputs)):
        assert got.dtype == torch.float32
        # Location gradients carry a factor W or H; compare relative to the tensor's scale.
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), name


@needs_cpu_kernel
def test_cpu_kernel_gradcheck():
    value, shapes, starts, locations, weights = make_inputs(2, 3, 2, 3, [(3, 4), (2, 2)], 2, seed=3)
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: msda.MSDeformAttnFunction.apply(v, shapes, starts, loc, w), leaves, eps=1e-6, atol=1e-6
    )


@needs_cpu_kernel
def test_cpu_kernel_threads_do_not_change_results():
    inputs = make_inputs(2, 40, 3, 5, [(6, 4), (3, 7)], 4, dtype=torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = outputs_and_grads("cpu", inputs)
        torch.set_num_threads(2)
        multi = outputs_and_grads("cpu", inputs)
    finally:
        torch.set_num_threads(threads)
    # Each thread owns disjoint output rows / grad_value slices: bitwise identical.
    assert all(torch.equal(a, b) for a, b in zip(single, multi))


@needs_cpu_kernel
def test_auto_uses_cpu_kernel():
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(*CONFIGS[1])]
    assert type(ms_deform_attn(*inputs).grad_fn).__name__ == "MSDeformAttnFunctionBackward"
    # dtypes the CPU kernel lacks go to the reference.
    half = [t.bfloat16() if t.is_floating_point() else t for t in inputs]
    assert ms_deform_attn(*half).dtype == torch.bfloat16


def test_auto_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(msda, "_kernels", None)
    monkeypatch.setattr(msda, "_KERNEL_IMPORT_ERROR", "No module named 'freeseg._C'")
    monkeypatch.setattr(msda, "_fallback_warned", False)
    inputs = make_inputs(*CONFIGS[1])
    with caplog.at_level(logging.WARNING, logger=msda.__name__):
        first = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    warnings = [r for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert len(warnings) == 1 and "freeseg._C" in warnings[0].getMessage()
    assert torch.equal(first, ms_deform_attn_pytorch(*inputs))


def test_explicit_backend_unavailable_raises(monkeypatch):
    inputs = make_inputs(*CONFIGS[1])
    monkeypatch.setattr(msda, "_kernels", None)
    monkeypatch.setattr(msda, "_KERNEL_IMPORT_ERROR", "No module named 'freeseg._C'")
    with pytest.raises(RuntimeError, match="backend 'cpu' requested but its compiled kernel is not available"):
        ms_deform_attn(*inputs, backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        ms_deform_attn(*inputs, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        ms_deform_attn(*inputs, backend="triton")


@needs_cpu_kernel
def test_explicit_backend_wrong_device_or_dtype():
    inputs = make_inputs(*CONFIGS[1])
    if msda.kernel_available("cuda"):
        with pytest.raises(ValueError, match="backend 'cuda' but the tensors are on cpu"):
            ms_deform_attn(*inputs, backend="cuda")
    half = [t.half() if t.is_floating_point() else t for t in inputs]
    with pytest.raises(ValueError, match="cpu kernel supports"):
        ms_deform_attn(*half, backend="cpu")


def test_bad_shapes_raise_clear_errors():
    value, shapes, starts, locations, weights = make_inputs(*CONFIGS[1])
    with pytest.raises(ValueError, match="attention_weights must be"):
        ms_deform_attn(value, shapes, starts, locations, weights[..., :-1])
    with pytest.raises(ValueError, match="do not tile value's S"):
        ms_deform_attn(value[:, :-1], shapes, starts, locations, weights)
    with pytest.raises(ValueError, match="expected starts"):
        ms_deform_attn(value, shapes, starts.flip(0), locations, weights)
    with pytest.raises(ValueError, match="spatial_shapes must be an int64"):
        ms_deform_attn(value, shapes.int(), starts, locations, weights)
    with pytest.raises(ValueError, match="share a dtype"):
        ms_deform_attn(value.float(), shapes, starts, locations, weights)


@needs_cpu_kernel
def test_kernel_op_checks_direct_calls():
    # In a child process: an extension linked against a C++ runtime other than PyTorch's can
    # crash on its first thrown error instead of raising (seen on a GPU machine whose default g++
    # was a wrapper around a separately installed GCC); that should fail this test with a hint,
    # not kill the whole test session.
    script = textwrap.dedent("""
        import torch
        from freeseg.ops import ms_deform_attn  # loads freeseg._C
        value = torch.randn(2, 5, 3, 4)  # S = 5 tokens, but the level below has 16
        shapes, starts = torch.tensor([[4, 4]]), torch.tensor([0])
        try:
            torch.ops.freeseg.ms_deform_attn_forward(value, shapes, starts, torch.rand(2, 7, 3, 1, 2, 2),
                                                     torch.rand(2, 7, 3, 1, 2))
        except RuntimeError as error:
            print(str(error).splitlines()[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        f"an error raised inside freeseg._C ended the process (exit code {result.returncode}) instead of "
        "raising RuntimeError: rebuild the extension with the compiler PyTorch was built with, e.g. "
        "`CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED='/usr/bin/g++ -shared' pip install --no-build-isolation -e .`"
        f"\n{result.stderr[-2000:]}")
    assert "level 0 (H=4, W=4, start=0) does not fit in value's S=5 tokens" in result.stdout, result.stdout


@needs_cpu_kernel
@pytest.mark.skipif(not torch._C.has_openmp, reason="PyTorch built without OpenMP")
def test_cpu_kernel_is_built_with_openmp():
    # at::parallel_for's OpenMP version is a pragma in a header: compiled without -fopenmp the
    # CPU kernel runs on one thread whatever torch.set_num_threads says (this happened here once).
    assert b"GOMP_parallel" in Path(msda._kernels.__file__).read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc / CUDA toolkit (CUDA_HOME=/usr/local/cuda) not found")
def test_cuda_source_compiles(tmp_path):
    # A fresh interpreter: the JIT module registers the same torch.ops.freeseg namespace as an
    # installed freeseg._C would, and a namespace can only be defined once per process. One
    # GPU architecture keeps the compile to minutes on a machine without a GPU.
    script = textwrap.dedent(f"""
        import torch
        from torch.utils.cpp_extension import load
        module = load(name="freeseg_msda_cuda_check", build_directory={str(tmp_path)!r},
                      sources=[{str(REPO / 'kernels/ms_deform_attn.cpp')!r},
                               {str(REPO / 'kernels/ms_deform_attn_cpu.cpp')!r},
                               {str(REPO / 'kernels/ms_deform_attn_cuda.cu')!r}],
                      extra_include_paths=[{str(REPO / 'kernels')!r}],
                      extra_cflags=["-O3", "-g0", "-DFREESEG_WITH_CUDA=1"], extra_cuda_cflags=["-O3"])
        assert module.with_cuda == 1
        assert torch._C._dispatch_has_kernel_for_dispatch_key("freeseg::ms_deform_attn_forward", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("freeseg::ms_deform_attn_backward", "CUDA")
    """)
    env = dict(os.environ, CUDA_HOME="/usr/local/cuda", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"CUDA extension compiled in {time.perf_counter() - start:.0f} s")


# A broken source costs a (failing) compile of ~10 s; the other two cases build nothing.
@pytest.mark.parametrize("breakage", [pytest.param("broken_source", marks=pytest.mark.slow), "no_compiler", "no_kernels"])
def test_install_survives_missing_or_broken_kernels(tmp_path, breakage):
    # Build an editable wheel (what `pip install -e .` does) of a copy of the project whose
    # kernel cannot be built: the build must succeed and say why the kernel is missing.
    shutil.copy(REPO / "setup.py", tmp_path)
    shutil.copytree(REPO / "kernels", tmp_path / "kernels")
    (tmp_path / "freeseg").mkdir()
    shutil.copy(REPO / "freeseg" / "__init__.py", tmp_path / "freeseg")
    env = dict(os.environ)
    if breakage == "broken_source":
        with open(tmp_path / "kernels" / "ms_deform_attn_cpu.cpp", "a") as f:
            f.write("\nthis line is not C++;\n")
    elif breakage == "no_compiler":
        env["CXX"] = str(tmp_path / "no-such-compiler")
    else:
        env["FREESEG_NO_KERNELS"] = "1"
    script = f"from setuptools import build_meta; print(build_meta.build_editable({str(tmp_path / 'dist')!r}))"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "freeseg-0.1.0" in result.stdout.strip().splitlines()[-1]
    assert "falls back to the PyTorch reference" in result.stderr
    assert not list(tmp_path.glob("freeseg/_C*.so"))


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_kernel_matches_reference(config, dtype, tol):
    inputs = make_inputs(*config, dtype=dtype, seed=11, device="cuda")
    for name, got, ref in zip(("out", "value", "loc", "weight"), outputs_and_grads("cuda", inputs),
                              outputs_and_grads("pytorch", inputs)):
        assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), name


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_half_types(dtype):
    # Half inputs, float accumulation: compare with the float64 reference on the same
    # (rounded) inputs; the error is the output rounding, not accumulated.
    inputs = make_inputs(*CONFIGS[3], dtype=dtype, seed=13, device="cuda")
    wide = [t.double() if t.is_floating_point() else t for t in inputs]
    for name, got, ref in zip(("out", "value", "loc", "weight"), outputs_and_grads("cuda", inputs),
                              outputs_and_grads("pytorch", wide)):
        assert got.dtype == dtype
        assert (got.double() - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item()), name


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_kernel_gradcheck():
    value, shapes, starts, locations, weights = make_inputs(2, 3, 2, 3, [(3, 4), (2, 2)], 2, seed=3, device="cuda")
    leaves = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: msda.MSDeformAttnFunction.apply(v, shapes, starts, loc, w), leaves, eps=1e-6, atol=1e-6
    )


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_kernel_grid_stride_loops():
    # The kernels cap the grid at 65535 blocks of 256 threads (16,776,960 threads); with
    # 2.1M queries x 8 heads the forward (one thread per (b, q, m, d)) and the backward (one per
    # (b, q, m)) both have 16.8M items, so every thread loops at least once more. Many queries
    # share a 4x4 map: the backward's atomic adds into grad_value collide heavily.
    inputs = make_inputs(1, 2_100_000, 8, 1, [(4, 4)], 1, seed=17, device="cuda")
    assert 1 * 2_100_000 * 8 > 65535 * 256
    for name, got, ref in zip(("out", "value", "loc", "weight"), outputs_and_grads("cuda", inputs),
                              outputs_and_grads("pytorch", inputs)):
        assert (got - ref).abs().max().item() <= 1e-9 * max(1.0, ref.abs().max().item()), name


@pytest.mark.gpu
@needs_cuda_kernel
def test_auto_uses_cuda_kernel_for_every_dtype():
    for dtype in msda.KERNEL_DTYPES["cuda"]:
        inputs = [t.requires_grad_() if t.is_floating_point() else t
                  for t in make_inputs(*CONFIGS[1], dtype=dtype, device="cuda")]
        out = ms_deform_attn(*inputs)
        assert out.is_cuda and out.dtype == dtype
        assert type(out.grad_fn).__name__ == "MSDeformAttnFunctionBackward", dtype
    # Level metadata given on the CPU is moved to the tensors' device.
    value, shapes, starts, locations, weights = make_inputs(*CONFIGS[1], device="cuda")
    expected = ms_deform_attn(value, shapes, starts, locations, weights, backend="pytorch")
    got = ms_deform_attn(value, shapes.cpu(), starts.cpu(), locations, weights, backend="cuda")
    assert (got - expected).abs().max().item() < 1e-10

