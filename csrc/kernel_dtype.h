// The CUDA kernels' element type (cuda/conv_plan.h's DType) for a torch dtype: shared by the CUDA binding and the
// plan's Python binding (compiled in every build).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "cuda/conv_plan.h"

namespace resnet_fused {

// A TypeError naming `what` for any dtype the kernels do not take.
inline cuda_kernels::DType kernel_dtype(at::ScalarType dtype, const char* what) {
  switch (dtype) {
    case at::kFloat: return cuda_kernels::DType::Float32;
    case at::kHalf: return cuda_kernels::DType::Float16;
    case at::kBFloat16: return cuda_kernels::DType::BFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16, got ", dtype);
  return cuda_kernels::DType::Float32;  // unreachable
}

}  // namespace resnet_fused
