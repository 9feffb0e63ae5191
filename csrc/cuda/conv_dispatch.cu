// conv_bn_act's entry point: checks the sizes, asks conv_plan.h which kernel takes the call on the current device,
// and launches it. A call the Hopper kernels turn down at launch (CUTLASS's own can_implement, a safety net behind
// the plan's checks) runs on the portable kernel instead, so the result never depends on the path.
#include <atomic>
#include <cstdint>

#include "conv_plan.h"
#include "device_utils.cuh"
#include "kernels.h"
#ifdef RESNET_FUSED_WITH_SM90
#include "sm90/sm90_launchers.h"
#endif

namespace resnet_fused {
namespace cuda_kernels {
namespace {

#ifdef RESNET_FUSED_WITH_SM90
constexpr bool kSm90Built = true;

cudaError_t launch_sm90(DType dtype, Sm90Tile tile, const ConvBnActArgs& a, cudaStream_t stream) {
#define RF_SM90_CASE(DTYPE, TILE) \
  if (dtype == DType::DTYPE && tile == Sm90Tile::TILE) return sm90::conv_bn_act<DType::DTYPE, Sm90Tile::TILE>(a, stream);
  RF_SM90_CONV_KERNELS(RF_SM90_CASE)
#undef RF_SM90_CASE
  return cudaErrorNotSupported;
}

size_t split_k_workspace_bytes(DType dtype, const ConvBnActArgs& a, int splits) {
#define RF_SM90_CASE(DTYPE) \
  if (dtype == DType::DTYPE) return sm90::split_k_workspace_bytes<DType::DTYPE>(a, splits);
  RF_SM90_SPLIT_K_KERNELS(RF_SM90_CASE)
#undef RF_SM90_CASE
  return 0;
}

cudaError_t launch_split_k(DType dtype, const ConvBnActArgs& a, int splits, void* workspace, cudaStream_t stream) {
#define RF_SM90_CASE(DTYPE) \
  if (dtype == DType::DTYPE) return sm90::conv_bn_act_split_k<DType::DTYPE>(a, splits, workspace, stream);
  RF_SM90_SPLIT_K_KERNELS(RF_SM90_CASE)
#undef RF_SM90_CASE
  return cudaErrorNotSupported;
}
#else
constexpr bool kSm90Built = false;

cudaError_t launch_sm90(DType, Sm90Tile, const ConvBnActArgs&, cudaStream_t) { return cudaErrorNotSupported; }
size_t split_k_workspace_bytes(DType, const ConvBnActArgs&, int) { return 0; }
cudaError_t launch_split_k(DType, const ConvBnActArgs&, int, void*, cudaStream_t) { return cudaErrorNotSupported; }
#endif

bool valid_sizes(const ConvBnActArgs& a) {
  return a.n >= 0 && a.h >= 0 && a.w >= 0 && a.c_in >= 0 && a.c_out >= 0 && a.kh >= 1 && a.kw >= 1 &&
         a.stride >= 1 && a.padding >= 0 && a.h_out >= 0 && a.w_out >= 0 &&
         static_cast<long long>(a.kh) * a.kw * a.c_in <= 0x7fffffffLL;
}

bool empty_output(const ConvBnActArgs& a) { return a.n == 0 || a.h_out == 0 || a.w_out == 0 || a.c_out == 0; }

std::atomic<bool> sm90_enabled{true};

}  // namespace

void set_sm90_enabled(bool enabled) { sm90_enabled.store(enabled, std::memory_order_relaxed); }

ConvPlan conv_plan_for_current_device(DType dtype, const ConvBnActArgs& a) {
  const bool aligned = aligned16(a.x) && aligned16(a.weight) && aligned16(a.y) && aligned16(a.scale) &&
                       aligned16(a.shift) && (a.residual == nullptr || aligned16(a.residual));
  const ConvCall call{dtype, a.n, a.h, a.w, a.c_in, a.c_out, a.kh, a.kw, a.stride, a.padding, a.h_out, a.w_out,
                      aligned};
  const GpuInfo gpu{current_compute_capability_major(), current_compute_capability_minor(), current_sm_count(),
                    kSm90Built && sm90_enabled.load(std::memory_order_relaxed)};
  return plan_conv(call, gpu);
}

size_t conv_bn_act_workspace_bytes(DType dtype, const ConvBnActArgs& a) {
  if (!valid_sizes(a) || empty_output(a) || current_compute_capability_major() < 8) return 0;
  const ConvPlan plan = conv_plan_for_current_device(dtype, a);
  return plan.kind == ConvKernelKind::Sm90SplitK ? split_k_workspace_bytes(dtype, a, plan.splits) : 0;
}

cudaError_t conv_bn_act(DType dtype, const ConvBnActArgs& a, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  if (!valid_sizes(a)) return cudaErrorInvalidValue;
  if (empty_output(a)) return cudaSuccess;
  if (current_compute_capability_major() < 8) return cudaErrorInvalidDeviceFunction;
  const ConvPlan plan = conv_plan_for_current_device(dtype, a);
  // Each Hopper path answers cudaErrorNotSupported for a call it turns down; the next one down takes it.
  if (plan.kind == ConvKernelKind::Sm90SplitK && workspace != nullptr &&
      workspace_bytes >= split_k_workspace_bytes(dtype, a, plan.splits)) {
    const cudaError_t err = launch_split_k(dtype, a, plan.splits, workspace, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  if (plan.kind != ConvKernelKind::Wmma) {
    const cudaError_t err = launch_sm90(dtype, plan.tile, a, stream);
    if (err != cudaErrorNotSupported) return err;
  }
  return conv_bn_act_wmma(dtype, a, stream);
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
