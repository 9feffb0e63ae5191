"""Builds resnet_fused._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

RESNET_FUSED_CUDA=1 forces the CUDA sources in (the build fails loudly if it cannot), RESNET_FUSED_CUDA=0 leaves
them out. Ninja builds it; MAX_JOBS bounds its parallelism.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern), recursive=True))


def _want_cuda():
    forced = os.environ.get("RESNET_FUSED_CUDA")
    if forced is not None:
        return forced.strip().lower() not in ("0", "false", "no", "off", "")
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # C++20: torch's own default for extensions, and what its headers require from torch 2.14 on (ATen.h)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if not _want_cuda():
        return CppExtension("resnet_fused._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=["-fopenmp"])
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("resnet_fused._C", sources,
                         define_macros=[("RESNET_FUSED_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
