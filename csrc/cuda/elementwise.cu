// Elementwise epilogue kernels over channels_last (NHWC) data, viewed as rows x C with rows = N*H*W:
//   bn_act:   y[r, c] = act(x[r, c] * scale[c] + shift[c] (+ residual[r, c])),  act = ReLU if relu else identity
//   add_relu: y[i]    = max(x[i] + residual[i], 0)
// T in {float, __half, __nv_bfloat16}; scale/shift are fp32; all math is fp32, rounded once to T on the store.
//
// Vector path: 16-byte loads/stores of EV = 16 / sizeof(T) elements when every pointer is 16-byte aligned (and,
// for bn_act, C is a multiple of EV so a vector never straddles two rows); add_relu then finishes the
// numel % EV tail with scalar accesses. Otherwise a scalar path. Grid-stride loops with 64-bit indices, so
// tensors past 2^31 elements are fine; the channel index is advanced incrementally (no 64-bit modulo per element).
#include <cstdint>

#include "device_utils.cuh"
#include "kernels.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;

// Grid for `work` items handled by a grid-stride loop: enough blocks to fill the GPU, never more than needed.
unsigned grid_for(int64_t work) {
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * kBlocksPerSm;
  const int64_t blocks = needed < cap ? needed : cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Elements are handled in groups of W (W = EV on the vector path, 1 on the scalar one); group g covers
// channels [c*W, c*W + W) with c = g mod groups_per_row, tracked incrementally across the grid stride.
template <typename T, bool kVector>
__global__ void bn_act_kernel(const T* __restrict__ x, const float* __restrict__ scale,
                              const float* __restrict__ shift, const T* __restrict__ residual, T* __restrict__ y,
                              int64_t groups, int64_t groups_per_row, bool relu) {
  constexpr int W = kVector ? VecWidth<T>::value : 1;
  const int64_t stride = grid_threads();
  int64_t g = global_thread();
  int64_t c = g % groups_per_row;
  const int64_t c_step = stride % groups_per_row;
  for (; g < groups; g += stride) {
    float v[VecWidth<T>::value];
    float r[VecWidth<T>::value];
    if constexpr (kVector) {
      unpack<T>(load128(x + g * W), v);
      if (residual != nullptr) unpack<T>(load128(residual + g * W), r);
    } else {
      v[0] = to_float(x[g]);
      if (residual != nullptr) r[0] = to_float(residual[g]);
    }
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int64_t ch = c * W + j;
      float out = v[j] * __ldg(scale + ch) + __ldg(shift + ch);
      if (residual != nullptr) out += r[j];
      v[j] = relu ? relu_keep_nan(out) : out;
    }
    if constexpr (kVector) {
      store128(y + g * W, pack<T>(v));
    } else {
      y[g] = from_float<T>(v[0]);
    }
    c += c_step;
    if (c >= groups_per_row) c -= groups_per_row;
  }
}

// Vector body over the first vectors * EV elements, then the scalar tail [vectors * EV, numel).
template <typename T, bool kVector>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ y,
                                int64_t numel) {
  constexpr int EV = VecWidth<T>::value;
  const int64_t stride = grid_threads();
  int64_t tail_start = 0;
  if constexpr (kVector) {
    const int64_t vectors = numel / EV;
    for (int64_t g = global_thread(); g < vectors; g += stride) {
      float a[EV], b[EV];
      unpack<T>(load128(x + g * EV), a);
      unpack<T>(load128(residual + g * EV), b);
#pragma unroll
      for (int j = 0; j < EV; ++j) a[j] = relu_keep_nan(a[j] + b[j]);
      store128(y + g * EV, pack<T>(a));
    }
    tail_start = vectors * EV;
  }
  for (int64_t i = tail_start + global_thread(); i < numel; i += stride) {
    y[i] = from_float<T>(relu_keep_nan(to_float(x[i]) + to_float(residual[i])));
  }
}

template <typename T>
cudaError_t launch_bn_act(const void* x, const float* scale, const float* shift, const void* residual, void* y,
                          int64_t rows, int64_t channels, bool relu, cudaStream_t stream) {
  constexpr int EV = VecWidth<T>::value;
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(residual);
  T* yt = static_cast<T*>(y);
  const bool vector = channels % EV == 0 && aligned16(x) && aligned16(y) &&
                      (residual == nullptr || aligned16(residual));
  if (vector) {
    const int64_t groups = rows * (channels / EV);
    bn_act_kernel<T, true><<<grid_for(groups), kThreads, 0, stream>>>(xt, scale, shift, rt, yt, groups,
                                                                     channels / EV, relu);
  } else {
    const int64_t groups = rows * channels;
    bn_act_kernel<T, false><<<grid_for(groups), kThreads, 0, stream>>>(xt, scale, shift, rt, yt, groups,
                                                                      channels, relu);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_add_relu(const void* x, const void* residual, void* y, int64_t numel, cudaStream_t stream) {
  constexpr int EV = VecWidth<T>::value;
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(residual);
  T* yt = static_cast<T*>(y);
  if (aligned16(x) && aligned16(residual) && aligned16(y)) {
    const int64_t work = numel / EV > 0 ? numel / EV : numel;
    add_relu_kernel<T, true><<<grid_for(work), kThreads, 0, stream>>>(xt, rt, yt, numel);
  } else {
    add_relu_kernel<T, false><<<grid_for(numel), kThreads, 0, stream>>>(xt, rt, yt, numel);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bn_act(DType dtype, const void* x, const float* scale, const float* shift, const void* residual,
                   void* y, int64_t rows, int64_t channels, bool relu, cudaStream_t stream) {
  if (rows < 0 || channels < 0) return cudaErrorInvalidValue;
  if (rows == 0 || channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32:
      return launch_bn_act<float>(x, scale, shift, residual, y, rows, channels, relu, stream);
    case DType::Float16:
      return launch_bn_act<__half>(x, scale, shift, residual, y, rows, channels, relu, stream);
    case DType::BFloat16:
      return launch_bn_act<__nv_bfloat16>(x, scale, shift, residual, y, rows, channels, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t add_relu(DType dtype, const void* x, const void* residual, void* y, int64_t numel,
                     cudaStream_t stream) {
  if (numel < 0) return cudaErrorInvalidValue;
  if (numel == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_add_relu<float>(x, residual, y, numel, stream);
    case DType::Float16: return launch_add_relu<__half>(x, residual, y, numel, stream);
    case DType::BFloat16: return launch_add_relu<__nv_bfloat16>(x, residual, y, numel, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
