// CPU kernels of the convolution ops, on oneDNN through ATen's mkldnn::_convolution_pointwise op family (what
// Inductor uses on CPU), in channels_last, with the whole epilogue fused into the convolution as oneDNN post-ops:
//
//   conv_bias_act(x, w', b, residual, stride, padding, relu):   (internal; the "cpu" backend's packed path)
//       y = conv2d(x, w', stride, padding) + b[c] (+ residual), ReLU if relu
//   conv_bn_act(x, w, scale, shift, residual, stride, padding, relu):
//       the same with the BN fold done here: w' = w * scale[c] (in fp32, rounded once to x's dtype), b = shift
//
// oneDNN accumulates in fp32 and applies bias / residual add / ReLU to the fp32 accumulator before the single
// rounding to x's dtype. ATen requires the bias in the convolution's dtype, so for bf16/fp16 the folded shift is
// rounded to that dtype (as the folded weight is). The output is channels_last in x's dtype.
//
// The convolution's dtype is x's, or fp32 when the weight is fp32 or this CPU has no hardware bf16/fp16 convolution
// (conv_dtype.cpp): x, bias and residual are then widened exactly to fp32 and the output rounded once to x's dtype,
// so every CPU runs every dtype.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "conv_dtype.h"
#include "epilogue.h"

namespace resnet_fused::cpu {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

// Checks shared by both conv ops; returns the output shape (N, C_out, H_out, W_out).
std::vector<int64_t> check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride,
                                int64_t padding) {
  check_activation(op, "x", x);
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be a 4-D (C_out, C_in, KH, KW) tensor, got ", weight.dim(),
              "-D with shape ", weight.sizes());
  TORCH_CHECK(weight.device().is_cpu(), op, ": weight must be a CPU tensor, got device ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op,
              ": weight must have x's dtype ", x.scalar_type(), " (or float32), got ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": weight expects C_in=", weight.size(1), " input channels but x has ",
              x.size(1), " (grouped convolution is not supported)");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0 && weight.size(2) > 0 && weight.size(3) > 0, op,
              ": weight must have non-zero C_out, C_in, KH and KW, got shape ", weight.sizes());
  TORCH_CHECK(x.size(2) > 0 && x.size(3) > 0, op, ": x must have non-zero height and width for a convolution, "
              "got shape ", x.sizes());
  // Bounded so that the output size arithmetic cannot overflow.
  constexpr int64_t kMaxGeometry = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(stride >= 1 && stride <= kMaxGeometry, op, ": stride must be in [1, 2^31 - 1], got ", stride);
  TORCH_CHECK(padding >= 0 && padding <= kMaxGeometry, op, ": padding must be in [0, 2^31 - 1], got ", padding);
  const int64_t h_out = conv_out_size(x.size(2), weight.size(2), stride, padding);
  const int64_t w_out = conv_out_size(x.size(3), weight.size(3), stride, padding);
  TORCH_CHECK(h_out >= 1 && w_out >= 1, op, ": x's spatial size ", x.sizes().slice(2), " is too small for a ",
              weight.size(2), "x", weight.size(3), " kernel with padding ", padding);
  TORCH_CHECK(at::hasMKLDNN(), op, ": torch was built without oneDNN (mkldnn), which this convolution runs on; "
              "use the 'torch' backend");
  return {x.size(0), weight.size(0), h_out, w_out};
}

// y = act(conv2d(x, weight) + bias (+ residual)) in one oneDNN primitive (`residual` must then be channels_last).
at::Tensor onednn_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor* residual, int64_t stride, int64_t padding, bool relu) {
  static const auto unary_op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  static const auto binary_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary");
  const std::vector<int64_t> pad{padding, padding}, str{stride, stride}, dil{1, 1};
  const c10::IValue no_value;
  torch::jit::Stack stack;
  stack.reserve(13);
  stack.emplace_back(x);
  if (residual) stack.emplace_back(*residual);
  stack.emplace_back(weight);
  stack.emplace_back(bias);
  stack.emplace_back(pad);
  stack.emplace_back(str);
  stack.emplace_back(dil);
  stack.emplace_back(int64_t{1});  // groups
  if (residual) {
    // binary_attr, alpha, unary_attr, unary_scalars, unary_algorithm
    stack.emplace_back(std::string("add"));
    stack.emplace_back(no_value);
    stack.emplace_back(relu ? c10::IValue(std::string("relu")) : no_value);
  } else {
    stack.emplace_back(std::string(relu ? "relu" : "none"));  // attr
  }
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());  // (unary_)scalars
  stack.emplace_back(no_value);                                  // (unary_)algorithm
  (residual ? binary_op : unary_op).callBoxed(&stack);
  // oneDNN follows x's suggested format; an x that is NCHW-contiguous too (C_in=1, or 1x1 spatial) may get NCHW.
  return channels_last_canonical(stack.back().toTensor());
}

// The fused conv with arguments already checked, in `dtype` (conv_dtype's choice; x, weight, bias and residual
// are all converted to it). Conversions and channels_last are no-ops for a pack made by the "cpu" backend.
at::Tensor fused_conv_in(at::ScalarType dtype, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, bool relu) {
  const at::Tensor xc = channels_last_canonical(x.to(dtype));
  // A weight the "cpu" backend prepacked into oneDNN's blocked layout (an opaque mkldnn tensor) is used as is.
  const at::Tensor wc = weight.is_mkldnn() ? weight : channels_last_canonical(weight.to(dtype));
  const at::Tensor bc = bias.to(dtype).contiguous();
  if (!residual.has_value()) return onednn_conv(xc, wc, bc, nullptr, stride, padding, relu);
  const at::Tensor rc = channels_last_canonical(residual->to(dtype));
  // oneDNN's binary post-op is used only where x and the output are both unambiguously channels_last: for an
  // ambiguous x ATen falls back to an add_relu that has no bf16/fp16 kernel, and torch 2.11's oneDNN rejects an
  // ambiguous output ("could not create a memory"). There (C_in=1 stems, 1x1 inputs or outputs, C_out=1) the
  // add+ReLU is our own single pass over the conv's output.
  if (xc.suggest_memory_format() == kCL && !rc.is_contiguous()) {
    return onednn_conv(xc, wc, bc, &rc, stride, padding, relu);
  }
  at::Tensor y = onednn_conv(xc, wc, bc, nullptr, stride, padding, /*relu=*/false);
  RESNET_FUSED_DISPATCH(y.scalar_type(), "conv_bn_act_residual_cpu", [&] {
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    epilogue_flat<scalar_t>(out, rc.const_data_ptr<scalar_t>(), out, y.numel(), relu);
  });
  return y;
}

// y in x's dtype; an fp32 convolution of bf16/fp16 x is rounded once at the end.
at::Tensor fused_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, bool relu) {
  const at::ScalarType dtype = conv_dtype(x.scalar_type(), weight.scalar_type());
  TORCH_CHECK(!weight.is_mkldnn() || weight.scalar_type() == dtype, "conv_bias_act: a prepacked (mkldnn) weight "
              "must be in the convolution's dtype ", dtype, ", got ", weight.scalar_type());
  const at::Tensor y = fused_conv_in(dtype, x, weight, bias, residual, stride, padding, relu);
  return dtype == x.scalar_type() ? y : y.to(x.scalar_type());  // to() keeps y's (canonical) strides
}

// conv_bn_act without the fold, for a fold that is not finite (an infinite or NaN scale, or w * scale overflowing the
// convolution's dtype): folded, an infinite scale puts inf into every tap of its channel, and the taps that meet a
// zero (or opposite-signed) input give NaN across the channel, where eager's conv(x, w) * inf is +-inf. So the
// convolution runs on the unfolded weight and the epilogue (scale, shift, residual, ReLU) in fp32 after it, as eager
// does; its ReLU keeps NaN (oneDNN's ReLU post-op would map a NaN scale's channel to 0).
at::Tensor unfolded_conv_bn_act(at::ScalarType dtype, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, bool relu) {
  const at::Tensor y = fused_conv_in(dtype, x, weight, at::zeros({weight.size(0)}, weight.options().dtype(dtype)),
                                     std::nullopt, stride, padding, /*relu=*/false);
  const at::Tensor scale32 = scale.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  const at::Tensor rc = residual.has_value() ? residual->to(dtype).contiguous(kCL) : at::Tensor();
  // y is channels_last (canonical strides): rows of C contiguous channels, as the epilogue reads them.
  at::Tensor out = at::empty(y.sizes(), y.options().memory_format(kCL));
  const int64_t channels = y.size(1);
  RESNET_FUSED_DISPATCH(dtype, "conv_bn_act_unfolded_cpu", [&] {
    epilogue_rows<scalar_t>(y.const_data_ptr<scalar_t>(), scale32.const_data_ptr<float>(),
                            shift32.const_data_ptr<float>(), rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                            out.mutable_data_ptr<scalar_t>(), y.numel() / channels, channels, relu);
  });
  return dtype == x.scalar_type() ? out : out.to(x.scalar_type());
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const std::optional<at::Tensor>& residual, int64_t stride, int64_t padding, bool relu) {
  const auto out_shape = check_conv("conv_bias_act", x, weight, stride, padding);
  check_channel_vector("conv_bias_act", "bias", bias, out_shape[1]);
  check_residual("conv_bias_act", residual, out_shape, x.scalar_type());
  if (out_shape[0] == 0) return at::empty(out_shape, x.options().memory_format(kCL));
  return fused_conv(x, weight, bias, residual, stride, padding, relu);
}

at::Tensor conv_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& shift, const std::optional<at::Tensor>& residual, int64_t stride,
                           int64_t padding, bool relu) {
  const auto out_shape = check_conv("conv_bn_act", x, weight, stride, padding);
  check_channel_vector("conv_bn_act", "scale", scale, out_shape[1]);
  check_channel_vector("conv_bn_act", "shift", shift, out_shape[1]);
  check_residual("conv_bn_act", residual, out_shape, x.scalar_type());
  if (out_shape[0] == 0) return at::empty(out_shape, x.options().memory_format(kCL));
  // The BN fold (per call here; the "cpu" backend's pack does it once and calls conv_bias_act), in fp32, rounded
  // once to the convolution's dtype.
  const at::ScalarType dtype = conv_dtype(x.scalar_type(), weight.scalar_type());
  const at::Tensor folded =
      (weight.to(at::kFloat) * scale.to(at::kFloat).view({-1, 1, 1, 1})).to(dtype).contiguous(kCL);
  if (at::isfinite(folded).all().item<bool>()) return fused_conv(x, folded, shift, residual, stride, padding, relu);
  return unfolded_conv_bn_act(dtype, x, weight, scale, shift, residual, stride, padding, relu);
}

}  // namespace
}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bn_act", &resnet_fused::cpu::conv_bn_act_cpu);
  m.impl("conv_bias_act", &resnet_fused::cpu::conv_bias_act_cpu);
}

// A prepacked (mkldnn-layout) weight makes the dispatcher pick the MkldnnCPU key: the same kernel serves it.
TORCH_LIBRARY_IMPL(resnet_fused, MkldnnCPU, m) {
  m.impl("conv_bias_act", &resnet_fused::cpu::conv_bias_act_cpu);
}
