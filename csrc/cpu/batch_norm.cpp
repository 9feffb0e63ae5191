// CPU kernels of torch.ops.resnet_fused.batch_norm_{stats, apply, backward}: training BatchNorm's passes
// (batch_norm_kernels.h has the math and the algorithms, resnet_fused/ops/batch_norm_reference.py the oracle).
//
//   batch_norm_stats(y) -> (mean, var)                       fp32, var biased; NaN for a batch with no values
//   batch_norm_apply(y, mean, invstd, weight?, bias?, residual?, relu) -> out
//   batch_norm_backward(grad_out, y, mean, invstd, weight?, bias?, residual?, relu)
//       -> (grad_y, grad_weight, grad_bias, grad_residual)   grad_residual: shape [0] without a residual
//
// Outputs keep y's dtype and layout (channels_last where y is channels_last and not also contiguous, else NCHW);
// other operands are brought to that layout first. grad_weight and grad_bias are fp32 (grad_weight is
// sum g * xhat whether or not a weight was given). This file checks arguments, allocates, and calls the kernels
// of the widest instruction set that both this build and ATen's own dispatch (ATEN_CPU_CAPABILITY) allow.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "batch_norm.h"
#include "batch_norm_dispatch.h"
#include "checks.h"
#include "isa_level.h"

namespace resnet_fused::cpu {
namespace {

namespace bn = batch_norm;

struct Isa {
  const char* name;
  bn::Kernels kernels;
};

Isa choose_isa() {
  const IsaLevel level = isa_level();
#ifdef RESNET_FUSED_X86_KERNELS
  if (level == IsaLevel::Avx512) return {isa_name(level), bn::avx512_kernels()};
  if (level == IsaLevel::Avx2) return {isa_name(level), bn::avx2_kernels()};
#endif
  return {isa_name(level), bn::default_kernels()};
}

const Isa& isa() {
  static const Isa chosen = choose_isa();
  return chosen;
}

bn::Storage storage_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return bn::Storage::BFloat16;
    case at::kHalf: return bn::Storage::Float16;
    default: return bn::Storage::Float32;
  }
}

at::MemoryFormat layout_of(const at::Tensor& y) {
  return y.is_contiguous(at::MemoryFormat::ChannelsLast) && !y.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                                : at::MemoryFormat::Contiguous;
}

bn::Geometry geometry_of(const at::Tensor& y, at::MemoryFormat layout) {
  return {y.size(0), y.size(1), y.size(2) * y.size(3), layout == at::MemoryFormat::ChannelsLast};
}

// mean and invstd: fp32 statistics; weight and bias: any floating dtype, converted. All length C.
struct Params {
  at::Tensor mean, invstd, weight, bias;
  bn::ChannelParams pointers() const {
    return {mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
            weight.defined() ? weight.const_data_ptr<float>() : nullptr,
            bias.defined() ? bias.const_data_ptr<float>() : nullptr};
  }
};

Params channel_params(const char* op, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  const int64_t channels = y.size(1);
  Params p;
  for (auto [name, t, out] : {std::tuple{"mean", &mean, &p.mean}, std::tuple{"invstd", &invstd, &p.invstd}}) {
    check_channel_vector(op, name, *t, channels);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32 (batch statistics are fp32), "
                     "got ", t->scalar_type());
    *out = t->contiguous();
  }
  for (auto [name, t, out] : {std::tuple{"weight", &weight, &p.weight}, std::tuple{"bias", &bias, &p.bias}}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    check_channel_vector(op, name, **t, channels);
    *out = (*t)->to(at::kFloat).contiguous();
  }
  return p;
}

// residual (or grad_out) as the kernels read it: y's shape, dtype and layout.
at::Tensor operand_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& y,
                        at::MemoryFormat layout) {
  check_activation(op, name, t);
  TORCH_CHECK(t.sizes() == y.sizes(), op, ": ", name, " must have y's shape ", y.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == y.scalar_type(), op, ": ", name, " must have y's dtype ", y.scalar_type(),
                   ", got ", t.scalar_type());
  return t.contiguous(layout);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cpu(const at::Tensor& y_in) {
  check_activation("batch_norm_stats", "y", y_in);
  const auto layout = layout_of(y_in);
  const at::Tensor y = y_in.contiguous(layout);
  at::Tensor mean = at::empty({y.size(1)}, y.options().dtype(at::kFloat));
  at::Tensor var = at::empty_like(mean);
  isa().kernels.stats(storage_of(y), y.const_data_ptr(), geometry_of(y, layout), mean.mutable_data_ptr<float>(),
                      var.mutable_data_ptr<float>());
  return {mean, var};
}

// y, its channel parameters and the residual as the kernels read them: in y's layout, contiguous.
struct Operands {
  Params params;
  at::MemoryFormat layout;
  at::Tensor y, residual;  // residual undefined when there is none
  const void* residual_data() const { return residual.defined() ? residual.const_data_ptr() : nullptr; }
  at::Tensor empty_like_y() const { return at::empty(y.sizes(), y.options().memory_format(layout)); }
};

Operands operands(const char* op, const at::Tensor& y_in, const at::Tensor& mean, const at::Tensor& invstd,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual) {
  check_activation(op, "y", y_in);
  Operands o{channel_params(op, y_in, mean, invstd, weight, bias), layout_of(y_in), {}, {}};
  o.y = y_in.contiguous(o.layout);
  if (residual.has_value() && residual->defined()) o.residual = operand_like(op, "residual", *residual, o.y, o.layout);
  return o;
}

at::Tensor batch_norm_apply_cpu(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool relu) {
  const Operands o = operands("batch_norm_apply", y, mean, invstd, weight, bias, residual);
  at::Tensor out = o.empty_like_y();
  if (out.numel() == 0) return out;
  isa().kernels.apply(storage_of(o.y), o.y.const_data_ptr(), o.residual_data(), out.mutable_data_ptr(),
                      geometry_of(o.y, o.layout), o.params.pointers(), relu);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "batch_norm_backward";
  const Operands o = operands(op, y, mean, invstd, weight, bias, residual);
  const at::Tensor grad_out = operand_like(op, "grad_out", grad_out_in, o.y, o.layout);
  at::Tensor grad_y = o.empty_like_y();
  at::Tensor grad_residual = o.residual.defined() ? o.empty_like_y() : at::empty({0}, o.y.options());
  at::Tensor grad_weight = at::empty({o.y.size(1)}, o.y.options().dtype(at::kFloat));
  at::Tensor grad_bias = at::empty_like(grad_weight);
  isa().kernels.backward(storage_of(o.y), grad_out.const_data_ptr(), o.y.const_data_ptr(), o.residual_data(),
                         grad_y.mutable_data_ptr(), o.residual.defined() ? grad_residual.mutable_data_ptr() : nullptr,
                         geometry_of(o.y, o.layout), o.params.pointers(), relu, grad_weight.mutable_data_ptr<float>(),
                         grad_bias.mutable_data_ptr<float>());
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

std::string batch_norm_isa() { return isa().name; }

}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("batch_norm_stats", &resnet_fused::cpu::batch_norm_stats_cpu);
  m.impl("batch_norm_apply", &resnet_fused::cpu::batch_norm_apply_cpu);
  m.impl("batch_norm_backward", &resnet_fused::cpu::batch_norm_backward_cpu);
}
