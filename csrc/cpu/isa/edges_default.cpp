// The edge kernels (../edges_kernels.h) for the build's baseline instruction set, compiled with its flags by
// setup.py.
#include "../edges_kernels.h"

namespace resnet_fused::cpu::edges {
Kernels default_kernels() { return capability_kernels(); }
}  // namespace resnet_fused::cpu::edges
