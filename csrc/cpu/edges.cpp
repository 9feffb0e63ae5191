// CPU kernels of the ops around a ResNet's blocks (edges_kernels.h has their math):
//
//   max_pool2d_cl(x, kernel_size, stride, padding) -> y    max pooling, no dilation, sizes rounded down
//   mean_pool_cl(x) -> y (N, C, 1, 1)                        average pooling to 1x1 (global average pooling)
//   linear_rows(x, weight, bias?) -> y (R, J)                 x @ weight^T + bias, fp32, for few rows of x
//
// Pooling takes float32, bfloat16 or float16 x in any layout (brought to channels_last once) and returns x's dtype,
// channels_last. They compute what ATen's max_pool2d (the same values, NaN included) and adaptive_avg_pool2d(x, 1)
// (within rounding) do, without ATen's pooling indices or its per-window bookkeeping.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "edges_dispatch.h"
#include "isa_level.h"

namespace resnet_fused::cpu {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

edges::Kernels choose_kernels() {
#ifdef RESNET_FUSED_X86_KERNELS
  const IsaLevel level = isa_level();
  if (level == IsaLevel::Avx512) return edges::avx512_kernels();
  if (level == IsaLevel::Avx2) return edges::avx2_kernels();
#endif
  return edges::default_kernels();
}

const edges::Kernels& kernels() {
  static const edges::Kernels chosen = choose_kernels();
  return chosen;
}

void check_pair(const char* name, at::IntArrayRef v, int64_t least) {
  TORCH_CHECK(v.size() == 2 && v[0] >= least && v[1] >= least, "max_pool2d_cl: ", name, " must be two integers >= ",
              least, ", got ", v);
}

at::Tensor max_pool2d_cl_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  check_activation("max_pool2d_cl", "x", x);
  check_pair("kernel_size", kernel_size, 1);
  check_pair("stride", stride, 1);
  check_pair("padding", padding, 0);
  TORCH_CHECK(padding[0] * 2 <= kernel_size[0] && padding[1] * 2 <= kernel_size[1],
              "max_pool2d_cl: padding must be at most half the kernel size, got padding ", padding, " for kernel_size ",
              kernel_size);
  const int64_t in_h = x.size(2), in_w = x.size(3);
  TORCH_CHECK(in_h + 2 * padding[0] >= kernel_size[0] && in_w + 2 * padding[1] >= kernel_size[1],
              "max_pool2d_cl: x of spatial size (", in_h, ", ", in_w, ") with padding ", padding,
              " is smaller than the kernel ", kernel_size);
  const edges::PoolGeometry g{x.size(0), in_h, in_w, x.size(1), kernel_size[0], kernel_size[1], stride[0], stride[1],
                              padding[0], padding[1], (in_h + 2 * padding[0] - kernel_size[0]) / stride[0] + 1,
                              (in_w + 2 * padding[1] - kernel_size[1]) / stride[1] + 1};
  at::Tensor y = at::empty({g.batch, g.channels, g.out_h, g.out_w}, x.options().memory_format(kCL));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(kCL);
  kernels().max_pool(x.scalar_type(), xc.const_data_ptr(), y.mutable_data_ptr(), g);
  return y;
}

at::Tensor mean_pool_cl_cpu(const at::Tensor& x) {
  check_activation("mean_pool_cl", "x", x);
  const int64_t pixels = x.size(2) * x.size(3);
  TORCH_CHECK(pixels > 0, "mean_pool_cl: x must have at least one pixel, got shape ", x.sizes());
  at::Tensor y = at::empty({x.size(0), x.size(1), 1, 1}, x.options().memory_format(kCL));
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(kCL);
  kernels().mean_pool(x.scalar_type(), xc.const_data_ptr(), y.mutable_data_ptr(), x.size(0), pixels, x.size(1));
  return y;
}

at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "linear_rows: x must be a 2-D float32 CPU tensor, got ", x.dim(), "-D ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "linear_rows: weight must be a 2-D float32 CPU tensor, got ", weight.dim(), "-D ", weight.scalar_type(),
              " on ", weight.device());
  TORCH_CHECK(weight.size(1) == x.size(1), "linear_rows: weight must have x's ", x.size(1),
              " in_features as its second size, got shape ", weight.sizes());
  const int64_t out_features = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "linear_rows: bias must be a float32 CPU tensor, got ", bias->scalar_type(), " on ", bias->device());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "linear_rows: bias must be a 1-D tensor of length ",
                out_features, " (weight's out_features), got shape ", bias->sizes());
  }
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  if (y.numel() == 0) return y;
  if (x.size(1) == 0) return bias.has_value() ? y.copy_(bias->expand_as(y)) : y.zero_();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  kernels().linear(xc.const_data_ptr<float>(), wc.const_data_ptr<float>(),
                   bc.defined() ? bc.const_data_ptr<float>() : nullptr, y.mutable_data_ptr<float>(), x.size(0),
                   x.size(1), out_features);
  return y;
}

}  // namespace
}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("max_pool2d_cl", &resnet_fused::cpu::max_pool2d_cl_cpu);
  m.impl("mean_pool_cl", &resnet_fused::cpu::mean_pool_cl_cpu);
  m.impl("linear_rows", &resnet_fused::cpu::linear_rows_cpu);
}
