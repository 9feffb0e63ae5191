// The implicit-GEMM convolution as ops (math and layout in conv_gemm.h, the kernel in isa/conv_gemm_avx2.cpp):
//
//   conv_gemm_weight(w):  B, the (C_out, C_in, kh, kw) weight packed into 16-channel panels, made once per pack
//   conv_gemm(x, b, bias, residual, kernel_size, stride, padding, relu, into_residual):
//                         y = act(conv2d(x, w, stride, padding) + bias[j] (+ residual)), channels_last, in the
//                         residual's buffer if into_residual (and that buffer is dense channels_last)
//
// fp32 only; runs where this CPU and ATen's dispatch allow AVX2 (conv_gemm::available).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "checks.h"
#include "conv_gemm.h"

namespace resnet_fused::cpu {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

at::Tensor conv_gemm_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "conv_gemm_weight: weight must be a 4-D (C_out, C_in, kh, kw) float32 CPU tensor, got ",
              weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device());
  using conv_gemm::kCols;
  const int64_t c_out = weight.size(0), depth = weight.size(1) * weight.size(2) * weight.size(3);
  // channels_last storage is [C_out][kh][kw][C_in]: row j of it is B[:, j] in k = (dy, dx, c) order
  const at::Tensor rows = weight.contiguous(kCL);
  at::Tensor packed = at::zeros({conv_gemm::packed_weight_numel(c_out, depth)}, weight.options());
  const float* w = rows.const_data_ptr<float>();
  float* out = packed.mutable_data_ptr<float>();
  at::parallel_for(0, (c_out + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel)
      for (int64_t j = panel * kCols; j < std::min(c_out, (panel + 1) * kCols); ++j)
        for (int64_t k = 0; k < depth; ++k) out[(panel * depth + k) * kCols + j % kCols] = w[j * depth + k];
  });
  return packed;
}

// Row (oh, ow) of image n's A, with its zeros: per kernel row dy, the taps that fall inside x are one contiguous
// run of (dx, c) in channels_last x.
void gather_row(const float* x, const conv_gemm::Geometry& g, int64_t n, int64_t oh, int64_t ow, float* a) {
  const int64_t c_in = g.in_channels, row_run = g.segment_depth();
  const int64_t iw0 = ow * g.stride - g.padding;
  const int64_t dx_lo = std::max<int64_t>(0, -iw0), dx_hi = std::min(g.kernel_w, g.in_w - iw0);
  for (int64_t dy = 0; dy < g.kernel_h; ++dy) {
    float* out = a + dy * row_run;
    const int64_t ih = oh * g.stride - g.padding + dy;
    if (ih < 0 || ih >= g.in_h || dx_lo >= dx_hi) {
      std::fill(out, out + row_run, 0.f);
      continue;
    }
    std::fill(out, out + dx_lo * c_in, 0.f);
    std::copy_n(x + ((n * g.in_h + ih) * g.in_w + iw0 + dx_lo) * c_in, (dx_hi - dx_lo) * c_in, out + dx_lo * c_in);
    std::fill(out + dx_hi * c_in, out + row_run, 0.f);
  }
}

// The rows of A of the pixels whose window crosses x's border (conv_gemm::Border), gathered; `slot` and `rows`
// keep what Border points to alive.
struct GatheredBorder {
  at::Tensor slot, rows;
  conv_gemm::Border border{nullptr, 0, nullptr};
};

GatheredBorder gather_border(const at::Tensor& x, const conv_gemm::Geometry& g) {
  GatheredBorder out;
  if (g.padding == 0) return out;  // every window inside x
  std::vector<int64_t> pixels;  // oh * out_w + ow of each border pixel
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t ow = 0; ow < g.out_w; ++ow)
      if (!g.inside(oh, ow)) pixels.push_back(oh * g.out_w + ow);
  if (pixels.empty()) return out;
  out.slot = at::full({g.out_h * g.out_w}, -1, x.options().dtype(at::kInt));
  int32_t* slot = out.slot.mutable_data_ptr<int32_t>();
  for (size_t i = 0; i < pixels.size(); ++i) slot[pixels[i]] = static_cast<int32_t>(i);
  const int64_t per_image = static_cast<int64_t>(pixels.size()), depth = g.depth();
  out.rows = at::empty({g.batch * per_image, depth}, x.options());
  const float* x_ptr = x.const_data_ptr<float>();
  float* rows = out.rows.mutable_data_ptr<float>();
  at::parallel_for(0, g.batch * per_image, std::max<int64_t>(1, 16384 / depth), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / per_image, pixel = pixels[r % per_image];
      gather_row(x_ptr, g, n, pixel / g.out_w, pixel % g.out_w, rows + r * depth);
    }
  });
  out.border = {slot, per_image, rows};
  return out;
}

at::Tensor conv_gemm_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
                         const std::optional<at::Tensor>& residual, at::IntArrayRef kernel_size, int64_t stride,
                         int64_t padding, bool relu, bool into_residual) {
  TORCH_CHECK(conv_gemm::available(), "conv_gemm: needs a CPU with AVX2 and FMA (and ATen's dispatch allowing AVX2); "
              "this one runs '", at::get_cpu_capability(), "'");
  check_activation("conv_gemm", "x", x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv_gemm: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0,
              "conv_gemm: kernel_size must be two positive sizes, got ", kernel_size);
  TORCH_CHECK(stride > 0 && padding >= 0, "conv_gemm: stride must be positive and padding non-negative, got stride ",
              stride, ", padding ", padding);
  const int64_t c_out = bias.numel();
  check_channel_vector("conv_gemm", "bias", bias, c_out);
  TORCH_CHECK(bias.scalar_type() == at::kFloat, "conv_gemm: bias must be float32, got ", bias.scalar_type());
  const conv_gemm::Geometry g{x.size(0), x.size(2), x.size(3), x.size(1), kernel_size[0], kernel_size[1], stride,
                              padding, (x.size(2) + 2 * padding - kernel_size[0]) / stride + 1,
                              (x.size(3) + 2 * padding - kernel_size[1]) / stride + 1, c_out};
  TORCH_CHECK(c_out > 0 && g.in_channels > 0 && x.size(2) + 2 * padding >= kernel_size[0] &&
                  x.size(3) + 2 * padding >= kernel_size[1],
              "conv_gemm: x of shape ", x.sizes(), " with padding ", padding, " is smaller than the kernel ",
              kernel_size, " or has no channels (bias gives C_out = ", c_out, ")");
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
                  packed.numel() == conv_gemm::packed_weight_numel(c_out, g.depth()),
              "conv_gemm: packed must be conv_gemm_weight's float32 vector for a (", c_out, ", ", g.in_channels, ", ",
              kernel_size[0], ", ", kernel_size[1], ") weight, ", conv_gemm::packed_weight_numel(c_out, g.depth()),
              " values; got ", packed.scalar_type(), " of shape ", packed.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 32 == 0,
              "conv_gemm: packed must be 32-byte aligned (a tensor of its own, not a view into one)");
  const std::vector<int64_t> out_shape{g.batch, c_out, g.out_h, g.out_w};
  check_residual("conv_gemm", residual, out_shape, at::kFloat);
  at::Tensor y = output_buffer(x, residual, into_residual, out_shape);
  if (y.numel() == 0) return y;
  const at::Tensor xc = x.contiguous(kCL), bc = bias.contiguous();
  const at::Tensor rc = residual.has_value() ? residual->contiguous(kCL) : at::Tensor();
  const conv_gemm::Blocking blocking = conv_gemm::blocking(g, at::get_num_threads());
  const GatheredBorder gathered = gather_border(xc, g);
  const float* x_ptr = xc.const_data_ptr<float>();
  const float* b_ptr = packed.const_data_ptr<float>();
  const float* bias_ptr = bc.const_data_ptr<float>();
  const float* r_ptr = rc.defined() ? rc.const_data_ptr<float>() : nullptr;
  float* y_ptr = y.mutable_data_ptr<float>();
#ifdef RESNET_FUSED_X86_KERNELS
  const int64_t lanes = std::min<int64_t>(at::get_num_threads(), blocking.tasks());
  conv_gemm::TaskQueue queue(blocking.tasks(), lanes);
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane)
      conv_gemm::run_tasks_avx2(x_ptr, g, gathered.border, b_ptr, bias_ptr, r_ptr, y_ptr, relu, blocking, queue, lane);
  });
#endif
  return y;
}

}  // namespace

bool conv_gemm::available() {
#ifdef RESNET_FUSED_X86_KERNELS
  const std::string isa = at::get_cpu_capability();
  return isa == "AVX2" || isa == "AVX512";
#else
  return false;
#endif
}

}  // namespace resnet_fused::cpu

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_gemm_weight", &resnet_fused::cpu::conv_gemm_weight_cpu);
  m.impl("conv_gemm", &resnet_fused::cpu::conv_gemm_cpu);
}
