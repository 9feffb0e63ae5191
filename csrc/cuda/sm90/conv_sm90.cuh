// conv_bn_act on Hopper (sm_90a): CUTLASS 3.x implicit-GEMM fprop with TMA loads, a warp-specialized wgmma
// mainloop and the whole epilogue fused (sm90_common.cuh's epilogue visitor tree), NHWC in and out.
//
//   GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin; A is x read through TMA's im2col mode (zero
//   fill outside the image is the padding), B is the channels_last weight [Cout, KH, KW, Cin] (K-contiguous).
//   acc[m, co] = sum_k A[m, k] * B[k, co]                                 (fp32; TF32 tensor cores for fp32)
//   y[m, co]   = relu?(acc * scale[co] + shift[co] (+ residual[m, co]))   in fp32, rounded once
//
// Each instantiation (one element type and tile shape) lives in its own translation unit (conv_sm90_*.cu) so the
// build compiles them in parallel; they need -arch=sm_90a and -DNDEBUG (without it ptxas serializes wgmma).
// Includes CUDA and CUTLASS headers only: the torch binding is binding.cpp.
#pragma once

#include "sm90_common.cuh"  // first: CUTLASS's basics, in the order its headers assume

#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"

#include "sm90_launchers.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace sm90 {

template <DType kDType, Sm90Tile kTile>
struct ConvKernel {
  using Element = typename CutlassElement<kDType>::type;
  static constexpr Sm90TileShape kShape = sm90_tile_shape(kTile, kDType);
  using TileShape = cute::Shape<cute::Int<kShape.m>, cute::Int<kShape.n>, cute::Shape<cute::Int<kShape.k>>>;
  using ClusterShape = cute::Shape<cute::_1, cute::_1, cute::_1>;
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // TMA: 16-byte rows
  using Epilogue = FusedEpilogue<TileShape, Element>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      Element, cutlass::layout::TensorNHWC, kAlignment,  // C: the residual
      Element, cutlass::layout::TensorNHWC, kAlignment,  // D: y
      cutlass::epilogue::TmaWarpSpecialized, typename Epilogue::Tree>::CollectiveOp;

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

  typename Kernel::Arguments args{
      problem,
      {static_cast<const Element*>(a.x), static_cast<const Element*>(a.weight)},
      {Conv::Epilogue::arguments(a), Conv::Epilogue::residual_or_y(a), stride_y, static_cast<Element*>(a.y),
       stride_y}};
  if (!Kernel::can_implement(args)) return cudaErrorNotSupported;  // the dispatcher falls back to WMMA
  // Builds the TMA descriptors on the host; this kernel needs no workspace.
  return launch<Kernel>(Kernel::to_underlying_arguments(args, nullptr), stream);
}

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused

// One instantiation per translation unit: conv_sm90_<dtype>_<tile>.cu expands RF_SM90_INSTANTIATE(dtype, tile).
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
