// The edge kernels (../edges_kernels.h) for AVX-512 F/BW/VL/DQ, compiled with that set's flags by setup.py.
#include "../edges_kernels.h"

namespace resnet_fused::cpu::edges {
Kernels avx512_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::edges
