"""FreeSeg from scratch: unified, universal and open-vocabulary image segmentation.

Qin et al., "FreeSeg: Unified, Universal and Open-Vocabulary Image Segmentation", CVPR 2023.
"""

__version__ = "0.1.0"
