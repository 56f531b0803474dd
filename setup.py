"""Install the `freeseg` package (pure Python) and, when a compiler is there, its kernels.

`pip install --no-build-isolation -e .` must succeed on any machine: the compiled
multi-scale deformable attention kernels are optional, and `freeseg.ops` falls back to
its PyTorch reference when they are missing.

Kernels (sources in kernels/, built as the extension `freeseg._C`):
- the C++ CPU kernel is built whenever PyTorch is importable and a C++ compiler is found;
- the CUDA kernel is added when the CUDA toolkit is found (CUDA_HOME) and either a GPU is
  visible or FORCE_CUDA=1 (to build on a machine without a GPU, e.g. for a cluster image);
- FREESEG_NO_KERNELS=1 skips the extension entirely.
A failed kernel build prints a warning and the pure-Python install goes on.
"""

import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.errors import CCompilerError, CompileError, LinkError, PlatformError

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")


def warn(message: str) -> None:
    print(f"\n*** freeseg: {message}\n*** freeseg falls back to the PyTorch reference of "
          "multi-scale deformable attention (slower, same results).\n", file=sys.stderr)


def kernel_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the kernels, or ([], {}) when they cannot be built here."""
    if os.environ.get("FREESEG_NO_KERNELS") == "1":
        warn("FREESEG_NO_KERNELS=1: not building the compiled kernels.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        warn(f"PyTorch is not importable ({error}); install it first and use --no-build-isolation "
             "to get the compiled kernels.")
        return [], {}
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        warn(f"no C++ compiler ({compiler!r} not found): not building the compiled kernels.")
        return [], {}

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """BuildExtension whose failure is a warning, not a failed install."""

        def run(self) -> None:
            try:
                super().run()
            except (CCompilerError, CompileError, LinkError, PlatformError, OSError, RuntimeError,
                    subprocess.CalledProcessError) as error:
                warn(f"building the kernel extension freeseg._C failed: {error}")

    sources = [os.path.join("kernels", name) for name in ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp")]
    # -g0: no debug info; it would double the compile time and the size of the library.
    compile_args = {"cxx": ["-O3", "-g0"]}
    link_args = []
    if torch._C.has_openmp:
        # The CPU kernel splits work with at::parallel_for, whose OpenMP version is a header-only
        # `#pragma omp parallel`: without -fopenmp it silently runs on one thread. Linking
        # libgomp.so.1 reuses the runtime PyTorch has already loaded (same soname), so
        # torch.set_num_threads applies.
        compile_args["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    with_cuda = cpp_extension.CUDA_HOME is not None and (
        torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1")
    if with_cuda:
        sources.append(os.path.join("kernels", "ms_deform_attn_cuda.cu"))
        compile_args["nvcc"] = ["-O3"]
        extension_class = cpp_extension.CUDAExtension
    else:
        extension_class = cpp_extension.CppExtension
    extension = extension_class(
        "freeseg._C",
        sources,
        include_dirs=[KERNEL_DIR],
        define_macros=[("FREESEG_WITH_CUDA", "1" if with_cuda else "0")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = kernel_extensions()

setup(
    name="freeseg",
    version="0.1.0",
    description="FreeSeg (CVPR 2023) from scratch: open-vocabulary universal segmentation",
    packages=find_packages(include=["freeseg", "freeseg.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch", "torchvision", "numpy", "pillow", "pycocotools", "ftfy", "regex", "scipy",
    ],
    extras_require={
        # clip-anytorch is OpenAI's reference CLIP, used only as a test oracle; it imports
        # pkg_resources, which setuptools 81 and newer no longer ship.
        "test": ["pytest", "clip-anytorch", "setuptools<81"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
