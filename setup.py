"""Install the `freeseg` package (pure Python) and, when a compiler is there, its kernels.

`pip install --no-build-isolation -e .` must succeed on any machine: the compiled
multi-scale deformable attention kernels are optional, and `freeseg.ops` falls back to
its PyTorch reference when they are missing.
"""

from setuptools import find_packages, setup

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
)
