// The edge kernels (../edges_kernels.h) for AVX2 + FMA + F16C, compiled with that set's flags by setup.py.
#include "../edges_kernels.h"

namespace resnet_fused::cpu::edges {
Kernels avx2_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::edges
