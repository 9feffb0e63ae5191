// CPU kernels of the elementwise ops (one parallel, vectorized pass each; see epilogue.h):
//   bn_act:   y = x * scale[c] + shift[c] (+ residual), ReLU if relu
//   add_relu: y = max(x + residual, 0)
// Inputs may be NCHW-contiguous or channels_last (converted once); the output is channels_last, x's dtype.
#include <torch/library.h>

#include "checks.h"
#include "epilogue.h"

namespace resnet_fused::cpu {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

at::Tensor bn_act_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                      const std::optional<at::Tensor>& residual, bool relu) {
  check_activation("bn_act", "x", x);
  const int64_t channels = x.size(1);
  check_channel_vector("bn_act", "scale", scale, channels);
  check_channel_vector("bn_act", "shift", shift, channels);
  check_residual("bn_act", residual, x.sizes(), x.scalar_type());

  const at::Tensor xc = x.contiguous(kCL);
  const at::Tensor scale32 = scale.to(at::kFloat).contiguous();
  const at::Tensor shift32 = shift.to(at::kFloat).contiguous();
  const at::Tensor res = residual.has_value() ? residual->contiguous(kCL) : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(kCL));
  if (out.numel() == 0) return out;
  const int64_t rows = out.numel() / channels;
  RESNET_FUSED_DISPATCH(x.scalar_type(), "bn_act_cpu", [&] {
    epilogue_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), scale32.const_data_ptr<float>(),
                            shift32.const_data_ptr<float>(), res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
                            out.mutable_data_ptr<scalar_t>(), rows, channels, relu);
  });
  return out;
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  check_activation("add_relu", "x", x);
  check_residual("add_relu", residual, x.sizes(), x.scalar_type());
  const at::Tensor xc = x.contiguous(kCL);
  const at::Tensor rc = residual.contiguous(kCL);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(kCL));
  if (out.numel() == 0) return out;
  RESNET_FUSED_DISPATCH(x.scalar_type(), "add_relu_cpu", [&] {
    epilogue_flat<scalar_t>(xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(), out.numel(), /*relu=*/true);
  });
  return out;
}

}  // namespace
}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("bn_act", &resnet_fused::cpu::bn_act_cpu);
  m.impl("add_relu", &resnet_fused::cpu::add_relu_cpu);
}
