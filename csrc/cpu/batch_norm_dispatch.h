// The CPU training BatchNorm kernels' entry points (batch_norm_kernels.h has their math), one set per CPU
// instruction set: batch_norm.cpp binds them to tensors and calls the widest set this CPU runs.
#pragma once

#include <cstdint>

namespace resnet_fused::cpu::batch_norm {

enum class Storage { Float32, BFloat16, Float16 };

// The 4-D tensors' common shape and layout: NCHW (channel c is `batch` planes of `plane` = H*W contiguous values)
// or channels_last (batch * plane rows of `channels` contiguous values).
struct Geometry {
  int64_t batch, channels, plane;
  bool channels_last;
  int64_t per_channel() const { return batch * plane; }
};

// Per-channel fp32 vectors of length `channels`; weight and bias may be nullptr (1 and 0).
struct ChannelParams {
  const float* mean;
  const float* invstd;
  const float* weight;
  const float* bias;
};

// One capability's kernels. Tensors are `storage` values in the geometry's layout; residual, grad_residual may be
// nullptr (no residual). stats writes mean and var (biased); backward writes grad_y, grad_residual (the gradient
// that passes the ReLU), grad_weight = sum g * xhat and grad_bias = sum g.
struct Kernels {
  void (*stats)(Storage storage, const void* y, const Geometry& g, float* mean, float* var);
  void (*apply)(Storage storage, const void* y, const void* residual, void* out, const Geometry& g,
                const ChannelParams& p, bool relu);
  void (*backward)(Storage storage, const void* grad_out, const void* y, const void* residual, void* grad_y,
                   void* grad_residual, const Geometry& g, const ChannelParams& p, bool relu, float* grad_weight,
                   float* grad_bias);
};

Kernels default_kernels();  // isa/batch_norm_default.cpp: the build's baseline instruction set
#ifdef RESNET_FUSED_X86_KERNELS  // setup.py builds these on x86-64 only
Kernels avx2_kernels();    // isa/batch_norm_avx2.cpp: AVX2 + FMA + F16C
Kernels avx512_kernels();  // isa/batch_norm_avx512.cpp: AVX-512 F/BW/VL/DQ
#endif

}  // namespace resnet_fused::cpu::batch_norm
