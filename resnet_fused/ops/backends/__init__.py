"""Importing this package registers every backend; each decides at call time whether it can run.

    torch_backend   plain PyTorch: the oracle and the fallback
    cpu, cuda       the C++/CUDA extension (extension.py loads it, extension_library.py registers its autograd)
    triton_backend  the Triton kernels (triton_library.py registers them as torch.library ops)
"""

from . import torch_backend  # noqa: F401
from . import cpu, cuda  # noqa: F401
from . import triton_backend  # noqa: F401
