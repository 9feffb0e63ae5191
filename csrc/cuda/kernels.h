// Launchers of the resnet_fused CUDA kernels: plain C++ over raw pointers, sizes and a cudaStream_t, so that the
// kernels (.cu, CUDA headers only) and the torch binding (binding.cpp) compile separately.
//
// Layouts are channels_last (NHWC), element type `dtype` unless stated; scale/shift are fp32 [C].
//   conv_bn_act: y[n,oh,ow,co] = act(sum_{kh,kw,ci} x[n, oh*s-p+kh, ow*s-p+kw, ci] * w[co,kh,kw,ci]
//                                    * scale[co] + shift[co] (+ residual[n,oh,ow,co]))
//   bn_act:      y[r,c] = act(x[r,c] * scale[c] + shift[c] (+ residual[r,c]))   over rows = N*H*W
//   add_relu:    y[i]   = max(x[i] + residual[i], 0)
//   batch_norm_*: training BatchNorm's passes (batch_norm.cu has their math), NHWC or NCHW.
// act is ReLU when relu is true, else the identity. Accumulation and epilogue math are fp32.
// Each launcher returns cudaSuccess or the first CUDA error (argument or launch); it never synchronizes.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "conv_plan.h"  // DType

namespace resnet_fused {
namespace cuda_kernels {

struct ConvBnActArgs {
  const void* x;         // [n, h, w, c_in]
  const void* weight;    // [c_out, kh, kw, c_in]
  const float* scale;    // [c_out]
  const float* shift;    // [c_out]
  const void* residual;  // [n, h_out, w_out, c_out], or nullptr
  void* y;               // [n, h_out, w_out, c_out]
  int n, h, w, c_in, c_out, kh, kw, stride, padding, h_out, w_out;
  bool relu;
};

// Needs compute capability 8.0+ (tensor-core mma for fp16/bf16/tf32, cp.async); returns
// cudaErrorInvalidDeviceFunction on older devices. Runs the kernel conv_plan.h picks for the current device: the
// Hopper kernels (sm90/) where they can take the call, else the portable one. `workspace` is device memory of
// conv_bn_act_workspace_bytes(dtype, args) bytes (nullptr when that is 0), used on `stream` only.
cudaError_t conv_bn_act(DType dtype, const ConvBnActArgs& args, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

// Device workspace conv_bn_act needs for these arguments on the current device: 0 but on the split-K path (its
// fp32 partial sums, flags and im2col copy).
size_t conv_bn_act_workspace_bytes(DType dtype, const ConvBnActArgs& args);

// The portable kernel alone (conv_bn_act.cu, WMMA + cp.async); conv_bn_act's fallback. Arguments as checked there.
cudaError_t conv_bn_act_wmma(DType dtype, const ConvBnActArgs& args, cudaStream_t stream);

// Whether conv_bn_act may use the Hopper kernels (default true); false runs the portable kernel everywhere (to test
// or compare it on a Hopper GPU). Process-wide.
void set_sm90_enabled(bool enabled);

// The plan conv_bn_act follows for these arguments on the current device (conv_plan.h).
ConvPlan conv_plan_for_current_device(DType dtype, const ConvBnActArgs& args);

cudaError_t bn_act(DType dtype, const void* x, const float* scale, const float* shift, const void* residual,
                   void* y, int64_t rows, int64_t channels, bool relu, cudaStream_t stream);

cudaError_t add_relu(DType dtype, const void* x, const void* residual, void* y, int64_t numel,
                     cudaStream_t stream);

// Training BatchNorm: y is (n, channels, plane = H*W) logical, laid out NHWC when channels_last, else NCHW.
struct BatchNormShape {
  int64_t n, channels, plane;
  bool channels_last;
};

struct BatchNormApplyArgs {
  const void* y;
  const float* mean;
  const float* invstd;
  const float* weight;    // or nullptr (1)
  const float* bias;      // or nullptr (0)
  const void* residual;   // y's dtype and layout, or nullptr
  void* out;              // y's dtype and layout
  bool relu;
};

struct BatchNormBackwardArgs {
  const void* grad_out;   // y's dtype and layout
  const void* y;
  const float* mean;
  const float* invstd;
  const float* weight;
  const float* bias;
  const void* residual;
  void* grad_y;           // y's dtype and layout
  void* grad_residual;    // y's dtype and layout, or nullptr (then no residual)
  float* grad_weight;     // [channels]: sum g * xhat (written even without a weight)
  float* grad_bias;       // [channels]: sum g
  bool relu;
};

// Partials per channel the reductions write for this shape on the current device, and the fp32 workspace
// (3 * partials * channels floats) batch_norm_stats and batch_norm_backward take.
int64_t batch_norm_partials(const BatchNormShape& shape);
size_t batch_norm_workspace_floats(const BatchNormShape& shape);

// (mean, var) fp32 [channels]; needs n * plane > 0.
cudaError_t batch_norm_stats(DType dtype, const void* y, const BatchNormShape& shape, float* workspace, float* mean,
                             float* var, cudaStream_t stream);

cudaError_t batch_norm_apply(DType dtype, const BatchNormApplyArgs& args, const BatchNormShape& shape,
                             cudaStream_t stream);

// Needs n * plane > 0.
cudaError_t batch_norm_backward(DType dtype, const BatchNormBackwardArgs& args, const BatchNormShape& shape,
                                float* workspace, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace resnet_fused
