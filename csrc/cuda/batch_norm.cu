// Training BatchNorm's three passes over NHWC (channels_last) or NCHW (contiguous) data, viewed per channel c as
// M = N*H*W values: element (r, c) sits at r*C + c (NHWC) or ((r / HW)*C + c)*HW + r % HW (NCHW).
// T in {float, __half, __nv_bfloat16}; statistics, parameters and gradients of parameters are fp32; all math is fp32.
//
//   stats:    mean[c] = sum y / M,  var[c] = sum (y - mean[c])^2 / M                                     (biased)
//   apply:    xhat = (y - mean[c]) * invstd[c],  z = xhat * weight[c] + bias[c] (+ residual)
//             out = relu(z) if relu else z                                           (rounded once to T)
//   backward: g = g_out where not z <= 0 (ReLU's backward: NaN passes) if relu else g_out
//             sum_g[c] = sum g,  sum_gx[c] = sum g * xhat
//             grad_y = weight[c] * invstd[c] * (g - (sum_g[c] + xhat * sum_gx[c]) / M),  grad_residual = g
// weight and bias may be null (1 and 0).
//
// Reductions: a grid of (row chunks x channel blocks); each thread runs Welford's update over its rows of
// y - pivot[c] (pivot: the channel's first value, so every sum is taken at the scale of the spread and var stays
// exact when |mean| >> std), the block merges its threads' (n, mean, M2) with Chan et al.'s formula
//   n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n
// and writes one partial per (chunk, channel); a second kernel merges the partials the same way (grid-level
// combine). The backward's partials are plain fp32 sums of g and g * xhat (xhat is centered already).
// Elementwise passes: 16-byte vectors of EV = 16 / sizeof(T) elements when every pointer is 16-byte aligned and a
// vector never leaves one row's channels (NHWC: C % EV == 0) or one channel's plane (NCHW: HW % EV == 0), else
// scalar accesses; grid-stride loops with 64-bit indices.
#include <cstdint>
#include <initializer_list>

#include "device_utils.cuh"
#include "kernels.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kChannelLanesNhwc = 32;  // NHWC: a warp reads 32 adjacent channels of one row
constexpr int kBlocksPerSm = 4;        // reduction blocks to aim for per SM
constexpr int kElementwiseBlocksPerSm = 8;
constexpr int kCombineRowLanes = kThreads / kChannelLanesNhwc;

// ---- accumulators ----------------------------------------------------------------------------------------------
// Aggregates without initializers (they live in __shared__ arrays): start them as `Moments acc{}` (zeros).
struct Moments {
  float n, mean, m2;

  __device__ __forceinline__ void push(float x) {
    n += 1.f;
    const float delta = x - mean;
    mean += delta / n;
    m2 += delta * (x - mean);
  }
  __device__ __forceinline__ void merge(const Moments& o) {
    if (o.n == 0.f) return;
    const float total = n + o.n;
    const float delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n * o.n / total);
    n = total;
  }
};

struct GradSums {
  float g, gx;

  __device__ __forceinline__ void merge(const GradSums& o) {
    g += o.g;
    gx += o.gx;
  }
};

// Merge the accumulators of a block's row lanes (lane = threadIdx.x / channel_lanes) into lane 0's, through
// shared memory: a tree over kThreads / channel_lanes lanes.
template <typename Acc>
__device__ Acc block_merge(Acc acc, int channel_lanes) {
  __shared__ Acc shared[kThreads];
  const int tid = threadIdx.x;
  shared[tid] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride >= channel_lanes; stride /= 2) {
    if (tid < stride) shared[tid].merge(shared[tid + stride]);
    __syncthreads();
  }
  return shared[tid];
}

// ---- indexing ---------------------------------------------------------------------------------------------------
struct Layout {
  int64_t rows;      // M = N*H*W
  int64_t channels;  // C
  int64_t plane;     // H*W
  bool channels_last;

  __host__ __device__ __forceinline__ int64_t offset(int64_t r, int64_t c) const {
    if (channels_last) return r * channels + c;
    const int64_t image = r / plane;
    return (image * channels + c) * plane + (r - image * plane);
  }
};

// A reduction block's share: channel c and the rows [begin, end) its lane walks with stride `lanes`.
struct ReductionSlot {
  int64_t c, row, end;
  int lanes, channel_lanes;
  bool active;
};

// NHWC: 32 channel lanes x 8 row lanes, channels blockIdx.y*32..; NCHW: 1 channel (blockIdx.y) x 256 row lanes.
__device__ __forceinline__ ReductionSlot reduction_slot(const Layout& layout, int64_t rows_per_chunk) {
  const int channel_lanes = layout.channels_last ? kChannelLanesNhwc : 1;
  ReductionSlot s;
  s.channel_lanes = channel_lanes;
  s.lanes = kThreads / channel_lanes;
  s.c = static_cast<int64_t>(blockIdx.y) * channel_lanes + threadIdx.x % channel_lanes;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  s.row = begin + threadIdx.x / channel_lanes;
  s.end = begin + rows_per_chunk < layout.rows ? begin + rows_per_chunk : layout.rows;
  s.active = s.c < layout.channels;
  return s;
}

// Partial (chunk, c) of a [P, C] matrix.
__device__ __forceinline__ int64_t partial_index(const Layout& layout, int64_t c) {
  return static_cast<int64_t>(blockIdx.x) * layout.channels + c;
}

// ---- statistics -------------------------------------------------------------------------------------------------
template <typename T>
__global__ void stats_partials_kernel(const T* __restrict__ y, Layout layout, int64_t rows_per_chunk,
                                      float* __restrict__ part_n, float* __restrict__ part_mean,
                                      float* __restrict__ part_m2) {
  const ReductionSlot s = reduction_slot(layout, rows_per_chunk);
  Moments acc{};
  if (s.active) {
    const float pivot = to_float(y[layout.offset(0, s.c)]);
    for (int64_t r = s.row; r < s.end; r += s.lanes) acc.push(to_float(y[layout.offset(r, s.c)]) - pivot);
  }
  acc = block_merge(acc, s.channel_lanes);
  if (s.active && threadIdx.x < s.channel_lanes) {
    const int64_t p = partial_index(layout, s.c);
    part_n[p] = acc.n;
    part_mean[p] = acc.mean;
    part_m2[p] = acc.m2;
  }
}

// One block per 32 channels; row lane k merges partials k, k + 8, ..., then the block merges its lanes.
template <typename T>
__global__ void stats_combine_kernel(const T* __restrict__ y, Layout layout, int64_t partials,
                                     const float* __restrict__ part_n, const float* __restrict__ part_mean,
                                     const float* __restrict__ part_m2, float* __restrict__ mean,
                                     float* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelLanesNhwc + threadIdx.x % kChannelLanesNhwc;
  const bool active = c < layout.channels;
  Moments acc{};
  if (active) {
    for (int64_t p = threadIdx.x / kChannelLanesNhwc; p < partials; p += kCombineRowLanes) {
      const int64_t i = p * layout.channels + c;
      acc.merge(Moments{part_n[i], part_mean[i], part_m2[i]});
    }
  }
  acc = block_merge(acc, kChannelLanesNhwc);
  if (active && threadIdx.x < kChannelLanesNhwc) {
    mean[c] = to_float(y[layout.offset(0, c)]) + acc.mean;
    var[c] = acc.m2 / static_cast<float>(layout.rows);
  }
}

// ---- per-element math, shared by apply and backward ----------------------------------------------------------------
struct ChannelParams {
  const float* mean;
  const float* invstd;
  const float* weight;  // or null: 1
  const float* bias;    // or null: 0

  __device__ __forceinline__ float xhat(float v, int64_t c) const {
    return (v - __ldg(mean + c)) * __ldg(invstd + c);
  }
  __device__ __forceinline__ float scale(int64_t c) const { return weight != nullptr ? __ldg(weight + c) : 1.f; }
  __device__ __forceinline__ float shift(int64_t c) const { return bias != nullptr ? __ldg(bias + c) : 0.f; }
  // z = xhat * weight + bias (+ residual), in the reference's order of operations.
  __device__ __forceinline__ float pre_activation(float xh, int64_t c, bool has_residual, float r) const {
    const float z = xh * scale(c) + shift(c);
    return has_residual ? z + r : z;
  }
};

// The gradient that passes the ReLU: 0 where z <= 0 (NaN passes).
__device__ __forceinline__ float passed_gradient(float g, float z, bool relu) {
  return relu && z <= 0.f ? 0.f : g;
}

// ---- backward reduction -------------------------------------------------------------------------------------------
template <typename T>
__global__ void backward_partials_kernel(const T* __restrict__ grad_out, const T* __restrict__ y,
                                         const T* __restrict__ residual, ChannelParams params, bool relu,
                                         Layout layout, int64_t rows_per_chunk, float* __restrict__ part_g,
                                         float* __restrict__ part_gx) {
  const ReductionSlot s = reduction_slot(layout, rows_per_chunk);
  GradSums acc{};
  if (s.active) {
    const bool needs_z = relu;
    for (int64_t r = s.row; r < s.end; r += s.lanes) {
      const int64_t i = layout.offset(r, s.c);
      const float xh = params.xhat(to_float(y[i]), s.c);
      float g = to_float(grad_out[i]);
      if (needs_z) {
        const float res = residual != nullptr ? to_float(residual[i]) : 0.f;
        g = passed_gradient(g, params.pre_activation(xh, s.c, residual != nullptr, res), true);
      }
      acc.g += g;
      acc.gx += g * xh;
    }
  }
  acc = block_merge(acc, s.channel_lanes);
  if (s.active && threadIdx.x < s.channel_lanes) {
    const int64_t p = partial_index(layout, s.c);
    part_g[p] = acc.g;
    part_gx[p] = acc.gx;
  }
}

__global__ void sum_partials_kernel(Layout layout, int64_t partials, const float* __restrict__ part_g,
                                    const float* __restrict__ part_gx, float* __restrict__ sum_g,
                                    float* __restrict__ sum_gx) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kChannelLanesNhwc + threadIdx.x % kChannelLanesNhwc;
  const bool active = c < layout.channels;
  GradSums acc{};
  if (active) {
    for (int64_t p = threadIdx.x / kChannelLanesNhwc; p < partials; p += kCombineRowLanes) {
      acc.g += part_g[p * layout.channels + c];
      acc.gx += part_gx[p * layout.channels + c];
    }
  }
  acc = block_merge(acc, kChannelLanesNhwc);
  if (active && threadIdx.x < kChannelLanesNhwc) {
    sum_g[c] = acc.g;
    sum_gx[c] = acc.gx;
  }
}

// ---- elementwise ----------------------------------------------------------------------------------------------------
// Vector g covers elements [g*W, g*W + W): channels c0.. (NHWC) or channel c0 throughout (NCHW).
template <int W>
__device__ __forceinline__ int64_t first_channel(const Layout& layout, int64_t g) {
  const int64_t i = g * W;
  return layout.channels_last ? i % layout.channels : (i / layout.plane) % layout.channels;
}

template <int W>
__device__ __forceinline__ int64_t channel_of(const Layout& layout, int64_t c0, int j) {
  return layout.channels_last ? c0 + j : c0;
}

template <typename T, int W>
__device__ __forceinline__ void load_vector(const T* p, int64_t g, float (&f)[VecWidth<T>::value]) {
  if constexpr (W > 1) {
    unpack<T>(load128(p + g * W), f);
  } else {
    f[0] = to_float(p[g]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void store_vector(T* p, int64_t g, const float (&f)[VecWidth<T>::value]) {
  if constexpr (W > 1) {
    store128(p + g * W, pack<T>(f));
  } else {
    p[g] = from_float<T>(f[0]);
  }
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T, int W>
__global__ void apply_kernel(const T* __restrict__ y, const T* __restrict__ residual, ChannelParams params,
                             bool relu, Layout layout, int64_t vectors, T* __restrict__ out) {
  for (int64_t g = global_thread(); g < vectors; g += grid_threads()) {
    float v[VecWidth<T>::value];
    float r[VecWidth<T>::value] = {};
    load_vector<T, W>(y, g, v);
    if (residual != nullptr) load_vector<T, W>(residual, g, r);
    const int64_t c0 = first_channel<W>(layout, g);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int64_t c = channel_of<W>(layout, c0, j);
      const float z = params.pre_activation(params.xhat(v[j], c), c, residual != nullptr, r[j]);
      v[j] = relu ? relu_keep_nan(z) : z;
    }
    store_vector<T, W>(out, g, v);
  }
}

template <typename T, int W>
__global__ void grad_input_kernel(const T* __restrict__ grad_out, const T* __restrict__ y,
                                  const T* __restrict__ residual, ChannelParams params, bool relu,
                                  const float* __restrict__ sum_g, const float* __restrict__ sum_gx, Layout layout,
                                  int64_t vectors, T* __restrict__ grad_y, T* __restrict__ grad_residual) {
  const float count = static_cast<float>(layout.rows);
  for (int64_t g = global_thread(); g < vectors; g += grid_threads()) {
    float v[VecWidth<T>::value];
    float go[VecWidth<T>::value];
    float r[VecWidth<T>::value] = {};
    load_vector<T, W>(y, g, v);
    load_vector<T, W>(grad_out, g, go);
    if (relu && residual != nullptr) load_vector<T, W>(residual, g, r);
    const int64_t c0 = first_channel<W>(layout, g);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int64_t c = channel_of<W>(layout, c0, j);
      const float xh = params.xhat(v[j], c);
      const float gp = relu ? passed_gradient(go[j], params.pre_activation(xh, c, residual != nullptr, r[j]), true)
                            : go[j];
      go[j] = gp;
      v[j] = params.scale(c) * __ldg(params.invstd + c) * (gp - (__ldg(sum_g + c) + xh * __ldg(sum_gx + c)) / count);
    }
    store_vector<T, W>(grad_y, g, v);
    if (grad_residual != nullptr) store_vector<T, W>(grad_residual, g, go);
  }
}

// ---- launch helpers ------------------------------------------------------------------------------------------------
Layout layout_of(const BatchNormShape& s) {
  return Layout{s.n * s.plane, s.channels, s.plane, s.channels_last};
}

int64_t channel_blocks(const BatchNormShape& s) {
  return s.channels_last ? (s.channels + kChannelLanesNhwc - 1) / kChannelLanesNhwc : s.channels;
}

unsigned elementwise_grid(int64_t vectors) {
  const int64_t needed = (vectors + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(current_sm_count()) * kElementwiseBlocksPerSm;
  return static_cast<unsigned>(needed < cap ? (needed > 0 ? needed : 1) : cap);
}

unsigned combine_grid(int64_t channels) {
  return static_cast<unsigned>((channels + kChannelLanesNhwc - 1) / kChannelLanesNhwc);
}

// Whether the elementwise passes may read and write 16-byte vectors of T.
template <typename T>
bool vectorizable(const BatchNormShape& s, std::initializer_list<const void*> pointers) {
  constexpr int EV = VecWidth<T>::value;
  if ((s.channels_last ? s.channels : s.plane) % EV != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

int64_t numel(const BatchNormShape& s) { return s.n * s.channels * s.plane; }

template <typename T>
cudaError_t launch_stats(const void* y, const BatchNormShape& s, float* workspace, float* mean, float* var,
                         cudaStream_t stream) {
  const Layout layout = layout_of(s);
  const int64_t partials = batch_norm_partials(s);
  const int64_t rows_per_chunk = (layout.rows + partials - 1) / partials;
  const int64_t matrix = partials * s.channels;
  const T* yt = static_cast<const T*>(y);
  const dim3 grid(static_cast<unsigned>(partials), static_cast<unsigned>(channel_blocks(s)));
  stats_partials_kernel<T><<<grid, kThreads, 0, stream>>>(yt, layout, rows_per_chunk, workspace,
                                                           workspace + matrix, workspace + 2 * matrix);
  stats_combine_kernel<T><<<combine_grid(s.channels), kThreads, 0, stream>>>(
      yt, layout, partials, workspace, workspace + matrix, workspace + 2 * matrix, mean, var);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_apply(const BatchNormApplyArgs& a, const BatchNormShape& s, cudaStream_t stream) {
  constexpr int EV = VecWidth<T>::value;
  const Layout layout = layout_of(s);
  const ChannelParams params{a.mean, a.invstd, a.weight, a.bias};
  const T* yt = static_cast<const T*>(a.y);
  const T* rt = static_cast<const T*>(a.residual);
  T* ot = static_cast<T*>(a.out);
  if (vectorizable<T>(s, {a.y, a.residual, a.out})) {
    const int64_t vectors = numel(s) / EV;
    apply_kernel<T, EV><<<elementwise_grid(vectors), kThreads, 0, stream>>>(yt, rt, params, a.relu, layout,
                                                                            vectors, ot);
  } else {
    apply_kernel<T, 1><<<elementwise_grid(numel(s)), kThreads, 0, stream>>>(yt, rt, params, a.relu, layout,
                                                                           numel(s), ot);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BatchNormBackwardArgs& a, const BatchNormShape& s, float* workspace,
                            cudaStream_t stream) {
  constexpr int EV = VecWidth<T>::value;
  const Layout layout = layout_of(s);
  const ChannelParams params{a.mean, a.invstd, a.weight, a.bias};
  const T* gt = static_cast<const T*>(a.grad_out);
  const T* yt = static_cast<const T*>(a.y);
  const T* rt = static_cast<const T*>(a.residual);
  const int64_t partials = batch_norm_partials(s);
  const int64_t rows_per_chunk = (layout.rows + partials - 1) / partials;
  const int64_t matrix = partials * s.channels;
  const dim3 grid(static_cast<unsigned>(partials), static_cast<unsigned>(channel_blocks(s)));
  backward_partials_kernel<T><<<grid, kThreads, 0, stream>>>(gt, yt, rt, params, a.relu, layout, rows_per_chunk,
                                                             workspace, workspace + matrix);
  sum_partials_kernel<<<combine_grid(s.channels), kThreads, 0, stream>>>(layout, partials, workspace,
                                                                         workspace + matrix, a.grad_bias,
                                                                         a.grad_weight);
  T* gy = static_cast<T*>(a.grad_y);
  T* gr = static_cast<T*>(a.grad_residual);
  if (vectorizable<T>(s, {a.grad_out, a.y, a.residual, a.grad_y, a.grad_residual})) {
    const int64_t vectors = numel(s) / EV;
    grad_input_kernel<T, EV><<<elementwise_grid(vectors), kThreads, 0, stream>>>(
        gt, yt, rt, params, a.relu, a.grad_bias, a.grad_weight, layout, vectors, gy, gr);
  } else {
    grad_input_kernel<T, 1><<<elementwise_grid(numel(s)), kThreads, 0, stream>>>(
        gt, yt, rt, params, a.relu, a.grad_bias, a.grad_weight, layout, numel(s), gy, gr);
  }
  return cudaGetLastError();
}

bool valid(const BatchNormShape& s) { return s.n >= 0 && s.channels >= 0 && s.plane >= 0; }

}  // namespace

int64_t batch_norm_partials(const BatchNormShape& s) {
  if (s.channels <= 0) return 1;
  const int64_t rows = s.n * s.plane;
  const int64_t lanes = s.channels_last ? kThreads / kChannelLanesNhwc : kThreads;
  const int64_t wanted = static_cast<int64_t>(current_sm_count()) * kBlocksPerSm / channel_blocks(s);
  const int64_t most = (rows + lanes - 1) / lanes;  // every lane of a chunk has at least one row
  const int64_t partials = wanted < most ? wanted : most;
  return partials > 1 ? partials : 1;
}

size_t batch_norm_workspace_floats(const BatchNormShape& s) {
  return static_cast<size_t>(3 * batch_norm_partials(s) * s.channels);
}

cudaError_t batch_norm_stats(DType dtype, const void* y, const BatchNormShape& s, float* workspace, float* mean,
                             float* var, cudaStream_t stream) {
  if (!valid(s) || s.n * s.plane == 0) return cudaErrorInvalidValue;  // the binding answers empty inputs itself
  if (s.channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_stats<float>(y, s, workspace, mean, var, stream);
    case DType::Float16: return launch_stats<__half>(y, s, workspace, mean, var, stream);
    case DType::BFloat16: return launch_stats<__nv_bfloat16>(y, s, workspace, mean, var, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t batch_norm_apply(DType dtype, const BatchNormApplyArgs& args, const BatchNormShape& s,
                             cudaStream_t stream) {
  if (!valid(s)) return cudaErrorInvalidValue;
  if (numel(s) == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_apply<float>(args, s, stream);
    case DType::Float16: return launch_apply<__half>(args, s, stream);
    case DType::BFloat16: return launch_apply<__nv_bfloat16>(args, s, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t batch_norm_backward(DType dtype, const BatchNormBackwardArgs& args, const BatchNormShape& s,
                                float* workspace, cudaStream_t stream) {
  if (!valid(s) || s.n * s.plane == 0) return cudaErrorInvalidValue;
  if (s.channels == 0) return cudaSuccess;
  switch (dtype) {
    case DType::Float32: return launch_backward<float>(args, s, workspace, stream);
    case DType::Float16: return launch_backward<__half>(args, s, workspace, stream);
    case DType::BFloat16: return launch_backward<__nv_bfloat16>(args, s, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
