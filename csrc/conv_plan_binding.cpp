#include "conv_plan_binding.h"

#include <string>
#include <tuple>

#include "cuda/conv_plan.h"
#include "kernel_dtype.h"

namespace resnet_fused {

namespace ck = cuda_kernels;

#ifdef RESNET_FUSED_WITH_CUDA
namespace cuda_kernels {
void set_sm90_enabled(bool enabled);  // csrc/cuda/conv_dispatch.cu (kernels.h, which needs CUDA's headers)
}  // namespace cuda_kernels
#endif

namespace {

// (kernel, tile, splits, reason) for a square-kernel conv of x [n, c_in, h, w] to c_out channels on a GPU of
// compute capability cc = (major, minor) with sm_count SMs.
std::tuple<std::string, std::string, int, std::string> plan(at::ScalarType dtype, int64_t n, int64_t h, int64_t w,
                                                       int64_t c_in, int64_t c_out, int64_t kernel_size,
                                                       int64_t stride, int64_t padding,
                                                       std::tuple<int, int> cc, int sm_count, bool sm90_built,
                                                       bool aligned) {
  TORCH_CHECK(n >= 0 && h > 0 && w > 0 && c_in > 0 && c_out > 0 && kernel_size > 0 && stride > 0 && padding >= 0,
              "cuda_conv_plan: sizes must be positive (n, padding non-negative)");
  TORCH_CHECK(h + 2 * padding >= kernel_size && w + 2 * padding >= kernel_size,
              "cuda_conv_plan: the input is smaller than the kernel");
  const int64_t h_out = (h + 2 * padding - kernel_size) / stride + 1;
  const int64_t w_out = (w + 2 * padding - kernel_size) / stride + 1;
  const ck::ConvCall call{kernel_dtype(dtype, "dtype"), n, h, w, c_in, c_out, kernel_size, kernel_size, stride, padding,
                          h_out, w_out, aligned};
  const ck::GpuInfo gpu{std::get<0>(cc), std::get<1>(cc), sm_count, sm90_built};
  const ck::ConvPlan p = ck::plan_conv(call, gpu);
  switch (p.kind) {
    case ck::ConvKernelKind::Sm90: return {"sm90", ck::sm90_tile_name(p.tile), 1, p.reason};
    case ck::ConvKernelKind::Sm90SplitK:
      return {"sm90_split_k", std::to_string(ck::kSplitKTile.m) + "x" + std::to_string(ck::kSplitKTile.n), p.splits,
              p.reason};
    case ck::ConvKernelKind::Wmma: break;
  }
  return {"wmma", "", 1, p.reason};
}

}  // namespace

void register_conv_plan(pybind11::module& m) {
#ifdef RESNET_FUSED_WITH_SM90
  m.attr("cuda_sm90_built") = true;
#else
  m.attr("cuda_sm90_built") = false;
#endif
  m.def("cuda_conv_plan", &plan,
        "The kernel the CUDA conv_bn_act runs for a call on a GPU, computed without one (csrc/cuda/conv_plan.h): "
        "(kernel 'sm90', 'sm90_split_k' or 'wmma', tile, K splits, reason).",
        pybind11::arg("dtype"), pybind11::arg("n"), pybind11::arg("h"), pybind11::arg("w"), pybind11::arg("c_in"),
        pybind11::arg("c_out"), pybind11::arg("kernel_size"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("cc"), pybind11::arg("sm_count"), pybind11::arg("sm90_built"), pybind11::arg("aligned") = true);
#ifdef RESNET_FUSED_WITH_CUDA
  m.def("cuda_set_sm90_enabled", &ck::set_sm90_enabled,
        "Let the CUDA conv_bn_act use the Hopper kernels (default) or not: False runs the portable WMMA kernel on "
        "every GPU, process-wide (to test or compare it on a Hopper GPU).",
        pybind11::arg("enabled"));
#endif
}

}  // namespace resnet_fused
