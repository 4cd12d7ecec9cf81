"""koala_triton: KOALA (Kalman Optimization Algorithm with Loss Adaptivity) for PyTorch.

The algorithm (Davtyan et al., AAAI 2022, arXiv 2107.03331; KOALA++: Xia, Davtyan and Favaro,
NeurIPS 2025, arXiv 2506.04432) and this package's deviations from the authors' code:
``koala_triton/ALGORITHM.md``.

``KoalaV``, ``KoalaM`` and ``KoalaPlusPlus`` are ``torch.optim.Optimizer`` subclasses with a sync-free PyTorch
path (any device) and fused Triton kernels (CUDA). Importing this package never imports
triton.
"""

from ._dispatch import triton_available
from ._version import __version__
from .koala_m import KoalaM
from .koala_pp import KoalaPlusPlus
from .koala_v import KoalaV

__all__ = ["KoalaV", "KoalaM", "KoalaPlusPlus", "triton_available", "__version__"]
