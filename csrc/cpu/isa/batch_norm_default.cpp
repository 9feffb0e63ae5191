// The training BatchNorm kernels (../batch_norm_kernels.h) for the build's baseline instruction set: what runs where
// the CPU (or ATEN_CPU_CAPABILITY) allows neither AVX2 nor AVX-512, and on other architectures. setup.py compiles
// this file with -DCPU_CAPABILITY=DEFAULT.
#include "../batch_norm_kernels.h"

namespace resnet_fused::cpu::batch_norm {
Kernels default_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::batch_norm
