// conv_bn_act on Hopper (sm_90a): CUTLASS 3.x implicit-GEMM fprop with TMA loads, a warp-specialized wgmma
// mainloop and the whole epilogue fused (an epilogue visitor tree), NHWC in and out.
//
//   GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin; A is x read through TMA's im2col mode (zero
//   fill outside the image is the padding), B is the channels_last weight [Cout, KH, KW, Cin] (K-contiguous).
//   acc[m, co] = sum_k A[m, k] * B[k, co]                                 (fp32; TF32 tensor cores for fp32)
//   y[m, co]   = max_nan(acc * scale[co] + shift[co] + beta * residual[m, co], floor)   in fp32, rounded once
//   beta = 1 with a residual, 0 without (the epilogue then never loads it); floor = 0 for ReLU, -inf without
//   (max_nan keeps NaN, as torch.relu does).
//
// Each instantiation (one element type and tile shape) lives in its own translation unit (conv_sm90_*.cu) so the
// build compiles them in parallel; they need -arch=sm_90a and -DNDEBUG (without it ptxas serializes wgmma).
// Includes CUDA and CUTLASS headers only: the torch binding is binding.cpp.
#pragma once

#include <atomic>
#include <cmath>

// Order as in CUTLASS's own conv tests: the collective headers assume the kernel and device layers came first.
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/device_kernel.h"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "../device_utils.cuh"
#include "sm90_launchers.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace sm90 {

// The CUTLASS element type of a kernel element type (fp32 runs on TF32 tensor cores).
template <DType kDType> struct CutlassElement;
template <> struct CutlassElement<DType::Float32> { using type = float; };
template <> struct CutlassElement<DType::Float16> { using type = cutlass::half_t; };
template <> struct CutlassElement<DType::BFloat16> { using type = cutlass::bfloat16_t; };

template <DType kDType, Sm90Tile kTile>
struct ConvKernel {
  using Element = typename CutlassElement<kDType>::type;
  static constexpr Sm90TileShape kShape = sm90_tile_shape(kTile, kDType);
  using TileShape = cute::Shape<cute::Int<kShape.m>, cute::Int<kShape.n>, cute::Shape<cute::Int<kShape.k>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // TMA: 16-byte rows
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // y = max_nan(beta * residual + (acc * scale + shift), floor): children first, the node's own op last.
  template <template <class> class Op, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Op, Out, float, kRound>;
  using ChannelVector = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                                     cute::Stride<cute::_0, cute::_1, int64_t>>;
  using ScaleShift = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, float>,
                                                        cutlass::epilogue::fusion::Sm90AccFetch, ChannelVector,
                                                        ChannelVector>;
  using AddResidual = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, float>,
                                                         cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>,
                                                         cutlass::epilogue::fusion::Sm90SrcFetch<Element>, ScaleShift>;
  using Epilogue = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::epilogue::thread::LowerBound, Element>,
                                                      AddResidual>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, cutlass::layout::TensorNHWC, kAlignment,  // C: the residual
      Element, cutlass::layout::TensorNHWC, kAlignment,  // D: y
      cutlass::epilogue::TmaWarpSpecialized, Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cutlass::conv::Operator::kFprop,
      Element, cutlass::layout::TensorNHWC, kAlignment,  // A: x
      Element, cutlass::layout::TensorNHWC, kAlignment,  // B: weight [Cout, KH, KW, Cin]
      float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::conv::KernelImplicitTmaWarpSpecializedSm90>::CollectiveOp;

  using ProblemShape = cutlass::conv::ConvProblemShape<cutlass::conv::Operator::kFprop, 2>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  static_assert(cute::size(ClusterShape{}) == 1, "launch_conv launches without cluster dimensions");
};

template <DType kDType, Sm90Tile kTile>
cudaError_t launch_conv(const ConvBnActArgs& a, cudaStream_t stream) {
  using Conv = ConvKernel<kDType, kTile>;
  using Kernel = typename Conv::Kernel;
  using Problem = typename Conv::ProblemShape;
  using Element = typename Conv::Element;

  const Problem problem(cutlass::conv::Mode::kCrossCorrelation, {a.n, a.h, a.w, a.c_in},
                        {a.c_out, a.kh, a.kw, a.c_in}, {a.padding, a.padding}, {a.padding, a.padding},
                        {a.stride, a.stride}, {1, 1}, 1);
  // The epilogue addresses y and the residual as ((Wo, Ho, N), Cout) with 64-bit strides.
  typename Kernel::StrideC stride_y{};
  cute::for_each(cute::make_seq<cute::rank<0>(typename Kernel::StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(stride_y) = problem.stride_C[Problem::RankT - 2 - i];
  });

  const bool has_residual = a.residual != nullptr;
  typename Conv::Epilogue::Arguments epilogue{
      {                                                 // beta * residual + (acc * scale + shift)
       {{has_residual ? 1.f : 0.f}},                    //   beta: 0 leaves the residual unread
       {},                                              //   residual
       {{}, {a.scale, 0.f, {}}, {a.shift, 0.f, {}}, {}},  //   acc * scale[co] + shift[co]
       {}},
      {a.relu ? 0.f : -INFINITY}};                      // floor
  // Without a residual C is never loaded, but its TMA descriptor still needs a valid tensor: y.
  const auto* residual = static_cast<const Element*>(has_residual ? a.residual : a.y);
  typename Kernel::Arguments args{
      problem,
      {static_cast<const Element*>(a.x), static_cast<const Element*>(a.weight)},
      {epilogue, residual, stride_y, static_cast<Element*>(a.y), stride_y}};

  if (!Kernel::can_implement(args)) return cudaErrorNotSupported;  // the dispatcher falls back to WMMA
  static std::atomic<bool> opted_in[kMaxCachedDevices] = {};
  cudaError_t err = opt_in_dynamic_smem(cutlass::device_kernel<Kernel>, Kernel::SharedStorageSize, opted_in);
  if (err != cudaSuccess) return err;
  // Builds the TMA descriptors (host side, no workspace); a 1x1x1 cluster launches like any kernel.
  const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  cutlass::device_kernel<Kernel>
      <<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), Kernel::SharedStorageSize, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused

// One instantiation per translation unit: conv_sm90_<dtype>_<tile>.cu defines RF_SM90_DTYPE and RF_SM90_TILE.
#define RF_SM90_INSTANTIATE(DTYPE, TILE)                                                            \
  namespace resnet_fused {                                                                          \
  namespace cuda_kernels {                                                                          \
  namespace sm90 {                                                                                  \
  template <>                                                                                       \
  cudaError_t conv_bn_act<DType::DTYPE, Sm90Tile::TILE>(const ConvBnActArgs& a, cudaStream_t s) {   \
    return launch_conv<DType::DTYPE, Sm90Tile::TILE>(a, s);                                         \
  }                                                                                                 \
  }                                                                                                 \
  }                                                                                                 \
  }
