"""Importing this package registers every backend; each decides at call time whether it can run."""

from . import torch_backend  # noqa: F401
from . import extension  # noqa: F401  ("cpu" and "cuda": the C++/CUDA extension)
from . import triton_backend  # noqa: F401  ("triton")
