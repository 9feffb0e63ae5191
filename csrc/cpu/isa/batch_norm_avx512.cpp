// The training BatchNorm kernels (../batch_norm_kernels.h) for AVX-512 (F, BW, VL, DQ). setup.py compiles this file
// on x86-64 with those flags and -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512, as ATen compiles its own.
#include "../batch_norm_kernels.h"

namespace resnet_fused::cpu::batch_norm {
Kernels avx512_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::batch_norm
