// Launchers of the Hopper conv_bn_act kernels (conv_sm90.cuh, gemm_sm90.cuh), one explicit specialization per
// translation unit, so that the host code that picks one (conv_dispatch.cu) compiles without CUTLASS.
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

// The split-K GEMM (gemm_sm90.cuh, one translation unit gemm_sm90_<dtype>.cu per dtype): the workspace bytes it
// needs for these arguments, and the launch with that workspace.
template <DType kDType>
size_t split_k_workspace_bytes(const ConvBnActArgs& args, int splits);
template <DType kDType>
cudaError_t conv_bn_act_split_k(const ConvBnActArgs& args, int splits, void* workspace, cudaStream_t stream);

#define RF_SM90_SPLIT_K_KERNELS(X) \
  X(BFloat16)                      \
  X(Float16)

#define RF_SM90_DECLARE_SPLIT_K(DTYPE)                                                             \
  template <>                                                                                      \
  size_t split_k_workspace_bytes<DType::DTYPE>(const ConvBnActArgs& args, int splits);            \
  template <>                                                                                      \
  cudaError_t conv_bn_act_split_k<DType::DTYPE>(const ConvBnActArgs& args, int splits, void* workspace, \
                                                cudaStream_t stream);
RF_SM90_SPLIT_K_KERNELS(RF_SM90_DECLARE_SPLIT_K)
#undef RF_SM90_DECLARE_SPLIT_K

}  // namespace sm90
}  // namespace cuda_kernels
}  // namespace resnet_fused
