// What the CPU training BatchNorm kernels (batch_norm.cpp) tell the Python module.
#pragma once

#include <string>

namespace resnet_fused::cpu {

// The instruction set the kernels run with in this process: "avx512", "avx2" or "default".
std::string batch_norm_isa();

}  // namespace resnet_fused::cpu
