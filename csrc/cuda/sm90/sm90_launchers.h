// Launchers of the Hopper conv_bn_act kernels (conv_sm90.cuh), one explicit specialization per translation unit
// conv_sm90_<dtype>_<tile>.cu, so that the host code that picks one (conv_dispatch.cu) compiles without CUTLASS.
// Each returns cudaSuccess, cudaErrorNotSupported where CUTLASS cannot implement the call (the caller then runs
// the portable kernel), or the launch's CUDA error. Semantics: kernels.h.
#pragma once

#include <cuda_runtime_api.h>

#include "../conv_plan.h"
#include "../kernels.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace sm90 {

template <DType kDType, Sm90Tile kTile>
cudaError_t conv_bn_act(const ConvBnActArgs& args, cudaStream_t stream);

// Every (dtype, tile) the build instantiates: X(dtype, tile) for each.
#define RF_SM90_CONV_KERNELS(X) \
  X(BFloat16, Large)            \
  X(BFloat16, Narrow)           \
  X(BFloat16, Small)            \
  X(Float16, Large)             \
  X(Float16, Narrow)            \
  X(Float16, Small)             \
  X(Float32, Large)             \
  X(Float32, Narrow)            \
  X(Float32, Small)

#define RF_SM90_DECLARE(DTYPE, TILE) \
  template <>                        \
  cudaError_t conv_bn_act<DType::DTYPE, Sm90Tile::TILE>(const ConvBnActArgs& args, cudaStream_t stream);
RF_SM90_CONV_KERNELS(RF_SM90_DECLARE)
#undef RF_SM90_DECLARE

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused
