// conv_bn_act on Hopper for small M (batch 1, late stages): split-K over a CUTLASS 3.x GEMM.
//
// Where even 64x64 output tiles leave most SMs idle (layer4's 3x3 conv at batch 1 is 8 of them for 132 SMs) and
// the conv kernel would walk K serially, the reduction is split across CTAs instead: CUTLASS's stream-K scheduler in
// split-K mode runs `splits` CTAs per 128x64 output tile, each over its share of K, reduces their fp32 partials
// through a workspace in a fixed order (deterministic), and the last one applies the same fused epilogue as the conv
// kernel (sm90_common.cuh). Persistent, cooperative (two consumer warpgroups), TMA loads, wgmma.
//
//   A[m, k] = x[n, oh*s - p + kh, ow*s - p + kw, ci], k = (kh*KW + kw)*Cin + ci: x itself for a 1x1 stride-1
//             unpadded conv ([M, Cin] row-major), else an im2col copy in the workspace (small: M is small here)
//   B[k, co] = w[co, kh, kw, ci]: the channels_last weight is [Cout, K], K-contiguous
//   y[m, co] = relu?(sum_k A[m, k] B[k, co] * scale[co] + shift[co] (+ residual[m, co]))
//
// Workspace: the im2col copy (when needed), then CUTLASS's split-K partials and flags (zeroed per call).
#pragma once

#include <cstdint>

#include "sm90_common.cuh"  // first: CUTLASS's basics, in the order its headers assume

#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "sm90_launchers.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace sm90 {

// a[m, k] for m < M, k < K; 16 bytes (8 channels of one tap) per thread and step: Cin % 8 == 0 here.
template <class T>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ a, const ConvBnActArgs p, long long vectors) {
  constexpr int kVec = 16 / sizeof(T);
  const int k_vectors = p.kh * p.kw * p.c_in / kVec;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long m = v / k_vectors;
    const int k = static_cast<int>(v - m * k_vectors) * kVec;
    const int tap = k / p.c_in, ci = k - tap * p.c_in;
    const int kh = tap / p.kw, kw = tap - kh * p.kw;
    const long long pixels = static_cast<long long>(p.h_out) * p.w_out;
    const long long n = m / pixels;
    const int rem = static_cast<int>(m - n * pixels);
    const int ih = (rem / p.w_out) * p.stride - p.padding + kh;
    const int iw = (rem % p.w_out) * p.stride - p.padding + kw;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (static_cast<unsigned>(ih) < static_cast<unsigned>(p.h) && static_cast<unsigned>(iw) < static_cast<unsigned>(p.w)) {
      value = load128(x + ((n * p.h + ih) * p.w + iw) * p.c_in + ci);
    }
    store128(a + v * kVec, value);
  }
}

template <DType kDType>
struct SplitKGemm {
  using Element = typename CutlassElement<kDType>::type;
  using TileShape = cute::Shape<cute::_128, cute::_64, cute::_64>;  // cooperative: two 64-row warpgroups
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;
  using Epilogue = FusedEpilogue<TileShape, Element>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, cutlass::layout::RowMajor, kAlignment,  // C: the residual [M, Cout]
      Element, cutlass::layout::RowMajor, kAlignment,  // D: y [M, Cout]
      cutlass::epilogue::TmaWarpSpecializedCooperative, typename Epilogue::Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      Element, cutlass::layout::RowMajor, kAlignment,     // A [M, K]
      Element, cutlass::layout::ColumnMajor, kAlignment,  // B as [Cout, K], K-contiguous
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;

  static bool needs_im2col(const ConvBnActArgs& a) {
    return !(a.kh == 1 && a.kw == 1 && a.stride == 1 && a.padding == 0);
  }

  static size_t im2col_bytes(const ConvBnActArgs& a) {
    if (!needs_im2col(a)) return 0;
    const size_t bytes = static_cast<size_t>(a.n) * a.h_out * a.w_out * a.kh * a.kw * a.c_in * sizeof(Element);
    return (bytes + 255) / 256 * 256;  // keeps CUTLASS's part of the workspace aligned
  }

  static typename Kernel::Arguments arguments(const ConvBnActArgs& a, const void* operand_a, int splits) {
    const int m = a.n * a.h_out * a.w_out, n = a.c_out, k = a.kh * a.kw * a.c_in;
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideC = typename Kernel::StrideC;
    const StrideC stride_y = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(m, n, 1));
    cutlass::KernelHardwareInfo hw{};
    hw.device_id = current_device();
    hw.sm_count = current_sm_count();
    typename Kernel::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const Element*>(operand_a), cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1)),
         static_cast<const Element*>(a.weight), cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1))},
        {Epilogue::arguments(a), Epilogue::residual_or_y(a), stride_y, static_cast<Element*>(a.y), stride_y},
        hw};
    args.scheduler.splits = splits;  // > 1: split-K instead of stream-K's own decomposition
    return args;
  }
};

template <DType kDType>
size_t gemm_workspace_bytes(const ConvBnActArgs& a, int splits) {
  using Gemm = SplitKGemm<kDType>;
  return Gemm::im2col_bytes(a) + Gemm::Kernel::get_workspace_size(Gemm::arguments(a, a.x, splits));
}

template <DType kDType>
cudaError_t launch_gemm(const ConvBnActArgs& a, int splits, void* workspace, cudaStream_t stream) {
  using Gemm = SplitKGemm<kDType>;
  using Kernel = typename Gemm::Kernel;
  using Element = typename Gemm::Element;
  const bool im2col = Gemm::needs_im2col(a);
  char* cutlass_workspace = static_cast<char*>(workspace) + Gemm::im2col_bytes(a);
  const typename Kernel::Arguments args = Gemm::arguments(a, im2col ? workspace : a.x, splits);
  if (!Kernel::can_implement(args)) return cudaErrorNotSupported;
  if (im2col) {
    constexpr int kVec = 16 / sizeof(Element);
    const long long vectors = static_cast<long long>(a.n) * a.h_out * a.w_out * a.kh * a.kw * a.c_in / kVec;
    const int threads = 256;
    const long long blocks = (vectors + threads - 1) / threads, max_blocks = 8LL * current_sm_count();
    im2col_kernel<Element><<<static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks), threads, 0, stream>>>(
        static_cast<const Element*>(a.x), static_cast<Element*>(workspace), a, vectors);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (Kernel::initialize_workspace(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorUnknown;
  }
  return launch<Kernel>(Kernel::to_underlying_arguments(args, cutlass_workspace), stream);
}

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused

// One instantiation per translation unit: gemm_sm90_<dtype>.cu expands RF_SM90_GEMM_INSTANTIATE(dtype).
#define RF_SM90_GEMM_INSTANTIATE(DTYPE)                                                                      \
  namespace resnet_fused {                                                                                   \
  namespace cuda_kernels {                                                                                   \
  namespace sm90 {                                                                                           \
  template <>                                                                                                \
  size_t split_k_workspace_bytes<DType::DTYPE>(const ConvBnActArgs& a, int splits) {                         \
    return gemm_workspace_bytes<DType::DTYPE>(a, splits);                                                    \
  }                                                                                                          \
  template <>                                                                                                \
  cudaError_t conv_bn_act_split_k<DType::DTYPE>(const ConvBnActArgs& a, int splits, void* workspace,         \
                                                cudaStream_t s) {                                            \
    return launch_gemm<DType::DTYPE>(a, splits, workspace, s);                                               \
  }                                                                                                          \
  }                                                                                                          \
  }                                                                                                          \
  }
