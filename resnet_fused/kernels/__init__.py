"""Kernel sources, one sub-package per language.

    triton/   @triton.jit kernels and their launchers (imported lazily by the "triton" backend, so that
              `import resnet_fused` neither needs triton nor fixes TRITON_INTERPRET before tests set it)

The C++/CUDA kernels live under csrc/ and are compiled into resnet_fused._C.
"""
