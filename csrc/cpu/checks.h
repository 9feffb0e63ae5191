// Argument checks for the CPU kernels: each failure is a TORCH_CHECK naming the argument and what was expected,
// so that direct torch.ops.resnet_fused.* calls fail as clearly as the Python ops (which validate first).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

// Dispatch over the three supported storage types (float32, bfloat16, float16), with scalar_t bound.
#define RESNET_FUSED_DISPATCH(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace resnet_fused::cpu {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A 4-D (N, C, H, W) float32/bfloat16/float16 tensor on the CPU.
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(), "-D with shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

// A 1-D floating-point CPU vector of length `channels` (scale, shift, bias).
inline void check_channel_vector(const char* op, const char* name, const at::Tensor& t, int64_t channels) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, op, ": ", name, " must be a 1-D tensor of length ", channels,
              " (one per output channel), got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

// An optional residual with the output's shape and x's dtype.
inline void check_residual(const char* op, const std::optional<at::Tensor>& residual, at::IntArrayRef out_shape,
                           at::ScalarType dtype) {
  if (!residual.has_value()) return;
  check_activation(op, "residual", *residual);
  TORCH_CHECK(residual->sizes() == out_shape, op, ": residual must have the output's shape ", out_shape, ", got ",
              residual->sizes());
  TORCH_CHECK(residual->scalar_type() == dtype, op, ": residual must have x's dtype ", dtype, ", got ",
              residual->scalar_type());
}

}  // namespace resnet_fused::cpu
