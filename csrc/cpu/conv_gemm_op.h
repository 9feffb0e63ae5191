// Whether the CPU implicit-GEMM convolution (conv_gemm.cpp) runs here: an x86-64 build on a CPU with AVX2 and FMA
// whose ATen dispatch allows AVX2 (ATEN_CPU_CAPABILITY=default turns it off, as it does ATen's own kernels).
#pragma once

namespace resnet_fused::cpu {
bool conv_gemm_available();
}  // namespace resnet_fused::cpu
