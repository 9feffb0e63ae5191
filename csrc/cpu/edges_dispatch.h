// The CPU kernels of a ResNet's edges, the ops around its blocks (edges_kernels.h has their math), one set per CPU
// instruction set: edges.cpp binds them to tensors and calls the widest set this CPU runs, as batch_norm.cpp does.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resnet_fused::cpu::edges {

// A max pooling window over channels_last (N, H, W, C) values: kernel, stride and padding per axis, no dilation,
// output sizes rounded down (ceil_mode off). Every window holds at least one value of x (padding <= kernel / 2).
struct PoolGeometry {
  int64_t batch, in_h, in_w, channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w;
};

struct Kernels {
  // y (N, out_h, out_w, C) = max over each window of x; float32, bfloat16 or float16 (`dtype`), NaN propagates
  void (*max_pool)(c10::ScalarType dtype, const void* x, void* y, const PoolGeometry& g);
  // y[n, c] = (sum over the `pixels` rows of image n of x[n, p, c]) / pixels, summed in fp32 in pixel order
  void (*mean_pool)(c10::ScalarType dtype, const void* x, void* y, int64_t batch, int64_t pixels, int64_t channels);
  // y[n, j] = sum_k x[n, k] * w[j, k] (+ bias[j]), float32; bias may be nullptr
  void (*linear)(const float* x, const float* w, const float* bias, float* y, int64_t rows, int64_t in_features,
                 int64_t out_features);
};

Kernels default_kernels();  // isa/edges_default.cpp: the build's baseline instruction set
#ifdef RESNET_FUSED_X86_KERNELS
Kernels avx2_kernels();    // isa/edges_avx2.cpp: AVX2 + FMA + F16C
Kernels avx512_kernels();  // isa/edges_avx512.cpp: AVX-512 F/BW/VL/DQ
#endif

}  // namespace resnet_fused::cpu::edges
