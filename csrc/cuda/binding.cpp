// CUDA kernels of torch.ops.resnet_fused.{conv_bn_act, bn_act, add_relu} and training BatchNorm's
// {batch_norm_stats, batch_norm_apply, batch_norm_backward} (schemas in csrc/ops.cpp).
// Built only as part of the CUDAExtension (RESNET_FUSED_WITH_CUDA); the kernels live in the .cu files of this
// folder behind kernels.h. This file checks arguments (messages name the argument), converts x / weight /
// residual to channels_last and scale / shift to contiguous fp32, allocates the channels_last output and launches
// on the current stream of x's device. Semantics: see kernels.h.
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernel_dtype.h"
#include "kernels.h"

namespace {

namespace ck = resnet_fused::cuda_kernels;

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(), "-D with shape ",
              t.sizes());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
}

// Every per-element extent must fit the kernels' 32-bit sizes (offsets are 64-bit).
void check_fits_int32(const at::Tensor& t, const char* name) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) <= std::numeric_limits<int32_t>::max(), name, " dimension ", d, " is ", t.size(d),
                ", larger than the kernels support (2^31 - 1)");
  }
}

// fp32, contiguous, length `channels`, on x's device: what the kernels read.
at::Tensor channel_vector(const at::Tensor& v, const char* name, int64_t channels, const at::Tensor& x) {
  check_same_device(v, name, x);
  TORCH_CHECK_TYPE(v.is_floating_point(), name, " must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.numel() == channels, name, " must be a 1-D tensor of length ", channels,
              " (one per output channel), got shape ", v.sizes());
  return v.to(at::kFloat).contiguous();
}

// The residual as the kernels read it: x's dtype, the output's shape, channels_last; nullopt when absent.
std::optional<at::Tensor> residual_operand(const std::optional<at::Tensor>& residual, at::IntArrayRef out_shape,
                                           const at::Tensor& x) {
  if (!residual.has_value() || !residual->defined()) return std::nullopt;
  const at::Tensor& r = *residual;
  check_same_device(r, "residual", x);
  TORCH_CHECK(r.sizes() == out_shape, "residual must have the output's shape ", out_shape, ", got ", r.sizes());
  TORCH_CHECK_TYPE(r.scalar_type() == x.scalar_type(), "residual must have x's dtype ", x.scalar_type(), ", got ",
                   r.scalar_type());
  return r.contiguous(kChannelsLast);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "resnet_fused::", op, " CUDA kernel failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidDeviceFunction ? " (conv_bn_act needs compute capability 8.0 or newer)" : "");
}

at::Tensor conv_bn_act_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& scale_in,
                            const at::Tensor& shift_in, const std::optional<at::Tensor>& residual_in,
                            int64_t stride, int64_t padding, bool relu) {
  check_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());  // allocations and the launch happen on x's device
  const ck::DType dtype = resnet_fused::kernel_dtype(x_in.scalar_type(), "x");
  TORCH_CHECK(weight_in.dim() == 4, "weight must be a 4-D (C_out, C_in, KH, KW) tensor, got ", weight_in.dim(),
              "-D with shape ", weight_in.sizes());
  check_same_device(weight_in, "weight", x_in);
  TORCH_CHECK_TYPE(weight_in.scalar_type() == x_in.scalar_type(), "weight must have x's dtype ",
                   x_in.scalar_type(), ", got ", weight_in.scalar_type());
  const int64_t n = x_in.size(0), c_in = x_in.size(1), h = x_in.size(2), w = x_in.size(3);
  const int64_t c_out = weight_in.size(0), kh = weight_in.size(2), kw = weight_in.size(3);
  TORCH_CHECK(weight_in.size(1) == c_in, "weight expects C_in=", weight_in.size(1), " input channels but x has ",
              c_in, " (grouped convolution is not supported)");
  TORCH_CHECK(c_out > 0 && c_in > 0 && kh > 0 && kw > 0, "weight must have non-zero C_out, C_in, KH and KW, got shape ",
              weight_in.sizes());
  TORCH_CHECK(h > 0 && w > 0, "x must have non-zero height and width for a convolution, got shape ", x_in.sizes());
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, "padding must be >= 0, got ", padding);
  check_fits_int32(x_in, "x");
  check_fits_int32(weight_in, "weight");
  TORCH_CHECK(stride <= std::numeric_limits<int32_t>::max() && padding <= std::numeric_limits<int32_t>::max() / 4,
              "stride and padding must fit in 32 bits, got stride=", stride, " padding=", padding);
  TORCH_CHECK(kh * kw * c_in <= std::numeric_limits<int32_t>::max(), "weight's reduction size C_in*KH*KW = ",
              kh * kw * c_in, " exceeds 2^31 - 1");
  const int64_t h_out = (h + 2 * padding - kh) / stride + 1;
  const int64_t w_out = (w + 2 * padding - kw) / stride + 1;
  TORCH_CHECK(h + 2 * padding >= kh && w + 2 * padding >= kw && h_out >= 1 && w_out >= 1, "x's spatial size (",
              h, ", ", w, ") is too small for a ", kh, "x", kw, " kernel with padding ", padding);

  const at::Tensor scale = channel_vector(scale_in, "scale", c_out, x_in);
  const at::Tensor shift = channel_vector(shift_in, "shift", c_out, x_in);
  const std::vector<int64_t> out_shape{n, c_out, h_out, w_out};
  const std::optional<at::Tensor> residual = residual_operand(residual_in, out_shape, x_in);

  const at::Tensor x = x_in.contiguous(kChannelsLast);
  const at::Tensor weight = weight_in.contiguous(kChannelsLast);  // physically [C_out, KH, KW, C_in]
  at::Tensor y = at::empty(out_shape, x.options().memory_format(kChannelsLast));
  if (y.numel() == 0) return y;

  ck::ConvBnActArgs args{};
  args.x = x.data_ptr();
  args.weight = weight.data_ptr();
  args.scale = scale.data_ptr<float>();
  args.shift = shift.data_ptr<float>();
  args.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  args.y = y.data_ptr();
  args.n = static_cast<int>(n);
  args.h = static_cast<int>(h);
  args.w = static_cast<int>(w);
  args.c_in = static_cast<int>(c_in);
  args.c_out = static_cast<int>(c_out);
  args.kh = static_cast<int>(kh);
  args.kw = static_cast<int>(kw);
  args.stride = static_cast<int>(stride);
  args.padding = static_cast<int>(padding);
  args.h_out = static_cast<int>(h_out);
  args.w_out = static_cast<int>(w_out);
  args.relu = relu;
  // The split-K path's partial sums come from the caching allocator, on the stream the kernels run on.
  const size_t workspace_bytes = ck::conv_bn_act_workspace_bytes(dtype, args);
  const at::Tensor workspace = workspace_bytes > 0
                                   ? at::empty({static_cast<int64_t>(workspace_bytes)}, x.options().dtype(at::kByte))
                                   : at::Tensor();
  check_launch(ck::conv_bn_act(dtype, args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, workspace_bytes,
                               c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "conv_bn_act");
  return y;
}

at::Tensor bn_act_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& shift_in,
                       const std::optional<at::Tensor>& residual_in, bool relu) {
  check_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());  // allocations and the launch happen on x's device
  const ck::DType dtype = resnet_fused::kernel_dtype(x_in.scalar_type(), "x");
  const int64_t channels = x_in.size(1);
  const at::Tensor scale = channel_vector(scale_in, "scale", channels, x_in);
  const at::Tensor shift = channel_vector(shift_in, "shift", channels, x_in);
  const std::optional<at::Tensor> residual = residual_operand(residual_in, x_in.sizes(), x_in);

  const at::Tensor x = x_in.contiguous(kChannelsLast);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(kChannelsLast));
  if (y.numel() == 0) return y;
  const int64_t rows = x.size(0) * x.size(2) * x.size(3);
  check_launch(ck::bn_act(dtype, x.data_ptr(), scale.data_ptr<float>(), shift.data_ptr<float>(),
                          residual.has_value() ? residual->data_ptr() : nullptr, y.data_ptr(), rows, channels, relu,
                          c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "bn_act");
  return y;
}

at::Tensor add_relu_cuda(const at::Tensor& x_in, const at::Tensor& residual_in) {
  check_activation(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());  // allocations and the launch happen on x's device
  const ck::DType dtype = resnet_fused::kernel_dtype(x_in.scalar_type(), "x");
  TORCH_CHECK(residual_in.defined(), "residual must be a defined tensor");
  const std::optional<at::Tensor> residual = residual_operand(residual_in, x_in.sizes(), x_in);

  const at::Tensor x = x_in.contiguous(kChannelsLast);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(kChannelsLast));
  if (y.numel() == 0) return y;
  // x, residual and y are all channels_last with one shape, so one flat index addresses the same element.
  check_launch(ck::add_relu(dtype, x.data_ptr(), residual->data_ptr(), y.data_ptr(), y.numel(),
                            c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "add_relu");
  return y;
}

// ---- training BatchNorm --------------------------------------------------------------------------------------------
// Outputs keep y's layout where y is channels_last (and not also contiguous, as a 1x1 or single-channel tensor is),
// else contiguous NCHW: batch_norm_reference.output_format's rule.
bool keeps_channels_last(const at::Tensor& y) {
  return y.is_contiguous(kChannelsLast) && !y.is_contiguous();
}

at::MemoryFormat output_format(const at::Tensor& y) {
  return keeps_channels_last(y) ? kChannelsLast : at::MemoryFormat::Contiguous;
}

ck::BatchNormShape batch_norm_shape(const at::Tensor& y) {
  return ck::BatchNormShape{y.size(0), y.size(1), y.size(2) * y.size(3), keeps_channels_last(y)};
}

// An optional per-channel fp32 vector on y's device (nullopt when absent).
std::optional<at::Tensor> optional_channel_vector(const std::optional<at::Tensor>& v, const char* name,
                                                  const at::Tensor& y) {
  if (!v.has_value() || !v->defined()) return std::nullopt;
  return channel_vector(*v, name, y.size(1), y);
}

const float* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// y's companion (residual, grad_out): y's shape and dtype, in the layout the kernels read.
std::optional<at::Tensor> like_y(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& y) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  check_same_device(*t, name, y);
  TORCH_CHECK(t->sizes() == y.sizes(), name, " must have y's shape ", y.sizes(), ", got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == y.scalar_type(), name, " must have y's dtype ", y.scalar_type(), ", got ",
                   t->scalar_type());
  return t->contiguous(output_format(y));
}

at::Tensor batch_norm_workspace(const at::Tensor& y) {
  return at::empty({static_cast<int64_t>(ck::batch_norm_workspace_floats(batch_norm_shape(y)))},
                   y.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& y_in) {
  check_activation(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ck::DType dtype = resnet_fused::kernel_dtype(y_in.scalar_type(), "y");
  const at::Tensor y = y_in.contiguous(output_format(y_in));
  at::Tensor mean = at::empty({y.size(1)}, y.options().dtype(at::kFloat));
  at::Tensor var = at::empty_like(mean);
  if (y.size(0) * y.size(2) * y.size(3) == 0) {  // no values: NaN, as torch.var_mean
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    var.fill_(std::numeric_limits<float>::quiet_NaN());
    return {mean, var};
  }
  const at::Tensor workspace = batch_norm_workspace(y);
  check_launch(ck::batch_norm_stats(dtype, y.data_ptr(), batch_norm_shape(y), workspace.data_ptr<float>(),
                                    mean.data_ptr<float>(), var.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream(y.device().index()).stream()),
               "batch_norm_stats");
  return {mean, var};
}

// The apply/backward operands as the kernels read them: y in its output layout, fp32 per-channel vectors, the
// residual in y's layout.
struct BatchNormOperands {
  at::Tensor y, mean, invstd;
  std::optional<at::Tensor> weight, bias, residual;
};

BatchNormOperands batch_norm_operands(const at::Tensor& y_in, const at::Tensor& mean, const at::Tensor& invstd,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual) {
  const at::Tensor y = y_in.contiguous(output_format(y_in));
  return BatchNormOperands{y,
                           channel_vector(mean, "mean", y.size(1), y),
                           channel_vector(invstd, "invstd", y.size(1), y),
                           optional_channel_vector(weight, "weight", y),
                           optional_channel_vector(bias, "bias", y),
                           like_y(residual, "residual", y)};
}

at::Tensor batch_norm_apply_cuda(const at::Tensor& y_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                 const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
                                 const std::optional<at::Tensor>& residual_in, bool relu) {
  check_activation(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ck::DType dtype = resnet_fused::kernel_dtype(y_in.scalar_type(), "y");
  const BatchNormOperands o = batch_norm_operands(y_in, mean_in, invstd_in, weight_in, bias_in, residual_in);
  at::Tensor out = at::empty_like(o.y);
  const ck::BatchNormApplyArgs args{o.y.data_ptr(), o.mean.data_ptr<float>(), o.invstd.data_ptr<float>(),
                                    data_or_null(o.weight), data_or_null(o.bias),
                                    o.residual.has_value() ? o.residual->data_ptr() : nullptr, out.data_ptr(), relu};
  check_launch(ck::batch_norm_apply(dtype, args, batch_norm_shape(o.y),
                                    c10::cuda::getCurrentCUDAStream(o.y.device().index()).stream()),
               "batch_norm_apply");
  return out;
}

// grad_residual has shape [0] without a residual (the schema returns a fixed number of tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& y_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in,
    const std::optional<at::Tensor>& residual_in, bool relu) {
  check_activation(y_in, "y");
  const c10::cuda::CUDAGuard guard(y_in.device());
  const ck::DType dtype = resnet_fused::kernel_dtype(y_in.scalar_type(), "y");
  const BatchNormOperands o = batch_norm_operands(y_in, mean_in, invstd_in, weight_in, bias_in, residual_in);
  const at::Tensor& y = o.y;
  const at::Tensor grad_out = *like_y(grad_out_in, "grad_out", y);
  at::Tensor grad_y = at::empty_like(y);
  at::Tensor grad_residual = o.residual.has_value() ? at::empty_like(y) : at::empty({0}, y.options());
  at::Tensor grad_weight = at::zeros({y.size(1)}, y.options().dtype(at::kFloat));
  at::Tensor grad_bias = at::zeros_like(grad_weight);
  if (y.numel() == 0) return {grad_y, grad_weight, grad_bias, grad_residual};
  const at::Tensor workspace = batch_norm_workspace(y);
  const ck::BatchNormBackwardArgs args{grad_out.data_ptr(), y.data_ptr(), o.mean.data_ptr<float>(),
                                       o.invstd.data_ptr<float>(), data_or_null(o.weight), data_or_null(o.bias),
                                       o.residual.has_value() ? o.residual->data_ptr() : nullptr, grad_y.data_ptr(),
                                       o.residual.has_value() ? grad_residual.data_ptr() : nullptr,
                                       grad_weight.data_ptr<float>(), grad_bias.data_ptr<float>(), relu};
  check_launch(ck::batch_norm_backward(dtype, args, batch_norm_shape(y), workspace.data_ptr<float>(),
                                       c10::cuda::getCurrentCUDAStream(y.device().index()).stream()),
               "batch_norm_backward");
  return {grad_y, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bn_act", &conv_bn_act_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("add_relu", &add_relu_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_apply", &batch_norm_apply_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
}
