// The training BatchNorm kernels (../batch_norm_kernels.h) for AVX2 + FMA + F16C. setup.py compiles this file on
// x86-64 with those flags and -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2, as ATen compiles its own AVX2 kernels.
#include "../batch_norm_kernels.h"

namespace resnet_fused::cpu::batch_norm {
Kernels avx2_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::batch_norm
