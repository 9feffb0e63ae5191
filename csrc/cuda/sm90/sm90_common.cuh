// What the Hopper conv_bn_act kernels share (conv_sm90.cuh, gemm_sm90.cuh): the CUTLASS element types, the fused
// epilogue as one CUTLASS epilogue visitor tree, and the launch of a CUTLASS 3.x kernel.
//
//   y[m, co] = max_nan(beta * residual[m, co] + (acc[m, co] * scale[co] + shift[co]), floor)
//
// in fp32, rounded once to y's type. beta = 1 with a residual, 0 without (the epilogue then never loads it);
// floor = 0 for ReLU, -inf without (max_nan keeps NaN, as torch.relu does, and -inf stays -inf). Both are run-time
// arguments, so one kernel serves all four residual/ReLU variants. CUDA and CUTLASS headers only.
#pragma once

#include <atomic>
#include <cmath>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"  // before the conv collectives, which use it without including it
#include "cutlass/device_kernel.h"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"

#include "../device_utils.cuh"
#include "../kernels.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace sm90 {

// The CUTLASS element type of a kernel element type (fp32 runs on TF32 tensor cores).
template <DType kDType> struct CutlassElement;
template <> struct CutlassElement<DType::Float32> { using type = float; };
template <> struct CutlassElement<DType::Float16> { using type = cutlass::half_t; };
template <> struct CutlassElement<DType::BFloat16> { using type = cutlass::bfloat16_t; };

template <class TileShape, class Element>
struct FusedEpilogue {
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  template <template <class> class Op, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Op, Out, float, kRound>;
  // A tree node lists its children first and its own op last.
  using ChannelVector = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                                     cute::Stride<cute::_0, cute::_1, int64_t>>;
  using ScaleShift = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, float>,
                                                        cutlass::epilogue::fusion::Sm90AccFetch, ChannelVector,
                                                        ChannelVector>;
  using AddResidual = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::homogeneous_multiply_add, float>,
                                                         cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>,
                                                         cutlass::epilogue::fusion::Sm90SrcFetch<Element>, ScaleShift>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::epilogue::thread::LowerBound, Element>,
                                                  AddResidual>;

  static typename Tree::Arguments arguments(const ConvBnActArgs& a) {
    return {{                                                   // beta * residual + (acc * scale + shift)
             {{a.residual != nullptr ? 1.f : 0.f}},             //   beta: 0 leaves the residual unread
             {},                                                //   residual
             {{}, {a.scale, 0.f, {}}, {a.shift, 0.f, {}}, {}},  //   acc * scale[co] + shift[co]
             {}},
            {a.relu ? 0.f : -INFINITY}};                        // floor
  }

  // Without a residual C is never loaded, but its TMA descriptor still needs a valid tensor: y.
  static const Element* residual_or_y(const ConvBnActArgs& a) {
    return static_cast<const Element*>(a.residual != nullptr ? a.residual : a.y);
  }
};

// Launches a CUTLASS 3.x kernel whose cluster is 1x1x1 (then it launches like any kernel) from its Params.
template <class Kernel>
cudaError_t launch(const typename Kernel::Params& params, cudaStream_t stream) {
  static_assert(cute::size(typename Kernel::DispatchPolicy::ClusterShape{}) == 1,
                "launch() has no cluster dimensions");
  static std::atomic<bool> opted_in[kMaxCachedDevices] = {};
  const cudaError_t err = opt_in_dynamic_smem(cutlass::device_kernel<Kernel>, Kernel::SharedStorageSize, opted_in);
  if (err != cudaSuccess) return err;
  cutlass::device_kernel<Kernel>
      <<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), Kernel::SharedStorageSize, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused
