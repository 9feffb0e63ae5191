// Argument checks for the CPU kernels: each failure is a TORCH_CHECK naming the argument and what was expected,
// so that direct torch.ops.resnet_fused.* calls fail as clearly as the Python ops (which validate first); and where
// an op told into_residual puts its output (output_buffer), with the channels_last strides every oneDNN version takes
// (channels_last_canonical).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include <vector>

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

// t in channels_last, with plain row-major strides where its size-1 dims make it contiguous in both layouts
// (batch 1 with 1x1 spatial, say). Such a tensor may carry any strides on its size-1 dims, and oneDNN's own outputs
// come as (C, 1, C, C) for (1, C, 1, 1), which torch 2.11's oneDNN rejects as an input ("could not create a
// memory"); row-major strides are the ones every version takes. Restriding is a view: size-1 dims are never
// stepped over, so the bytes and their order are the same.
inline at::Tensor channels_last_canonical(const at::Tensor& t) {
  const at::Tensor c = t.contiguous(at::MemoryFormat::ChannelsLast);
  // a true channels_last tensor: its strides are already the canonical ones; an empty one keeps channels_last
  // strides, which row-major ones would not count as (its layout is what callers check, no byte is stepped over)
  if (!c.is_contiguous() || c.numel() == 0) return c;
  const auto size = c.sizes();
  const std::vector<int64_t> row_major{size[1] * size[2] * size[3], size[2] * size[3], size[3], 1};
  return c.strides() == at::IntArrayRef(row_major) ? c : c.as_strided(size, row_major);
}

// The output of an op told into_residual (the caller's residual is dead after the call): the residual's own buffer
// where that is dense channels_last and shares no memory with x, which other threads may still be reading; else a new
// channels_last tensor with canonical strides (as conv_bias_act returns its outputs). The kernels read each output's
// residual once, just before writing that output.
inline at::Tensor output_buffer(const at::Tensor& x, const std::optional<at::Tensor>& residual, bool into_residual,
                                at::IntArrayRef out_shape) {
  if (into_residual && residual.has_value() && residual->is_contiguous(at::MemoryFormat::ChannelsLast) &&
      at::get_overlap_status(x, *residual) == at::MemOverlapStatus::No)
    return *residual;
  return channels_last_canonical(at::empty(out_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast)));
}

}  // namespace resnet_fused::cpu
