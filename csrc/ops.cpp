// The op schemas of resnet_fused: one TORCH_LIBRARY block, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels. Semantics (logical NCHW in, channels_last out, fp32 accumulation and epilogue):
//   conv_bn_act: y = conv2d(x, weight, stride, padding) * scale[c] + shift[c] (+ residual), ReLU if relu
//   bn_act:      y = x * scale[c] + shift[c] (+ residual), ReLU if relu
//   add_relu:    y = max(x + residual, 0)
// scale and shift are fp32 vectors of length C (BatchNorm folded, conv bias included).
// Training BatchNorm's passes (resnet_fused/ops/batch_norm_reference.py has their math; outputs keep y's dtype and
// layout, statistics and parameter gradients are fp32):
//   batch_norm_stats:    (mean, var) of y per channel, var biased
//   batch_norm_apply:    act((y - mean[c]) * invstd[c] * weight[c] + bias[c] (+ residual))
//   batch_norm_backward: (grad_y, grad_weight, grad_bias, grad_residual) of batch_norm_apply at fixed mean and
//                        invstd; grad_residual has shape [0] when there is no residual
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/batch_norm.h"
#include "cpu/block_cache.h"
#include "cpu/conv_dtype.h"
#include "cpu/conv_gemm.h"
#include "bound_program.h"
#include "conv_plan_binding.h"
#include "tensor_watch.h"

TORCH_LIBRARY(resnet_fused, m) {
  m.def("conv_bn_act(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
        "int stride, int padding, bool relu) -> Tensor");
  m.def("bn_act(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool relu) -> Tensor");
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  // Internal (CPU only): the "cpu" backend's packed path, y = conv2d(x, weight) + bias[c] (+ residual), ReLU if
  // relu, with the BN fold already in weight (x's dtype, channels_last) and bias (the folded shift).
  m.def("conv_bias_act(Tensor x, Tensor weight, Tensor bias, Tensor? residual, "
        "int stride, int padding, bool relu) -> Tensor");
  // Internal (CPU only): the "cpu" backend's Winograd F(4x4, 3x3) path for fp32 3x3 convs with stride 1 and padding
  // 1, y = conv2d(x, w, 1, 1) + bias[c] (+ residual), ReLU if relu, where u = winograd_weight(w)
  // (csrc/cpu/winograd.cpp) as MKL's, oneDNN's or the implicit GEMM's products read it; position_major picks the
  // layout of its transformed buffers (not asked with the GEMM's panels, which run per block of tiles); into_residual
  // writes y into the residual's buffer (a residual the caller donates: nothing reads it after the call).
  m.def("winograd_weight(Tensor weight) -> Tensor");
  m.def("conv3x3_winograd(Tensor x, Tensor u, Tensor bias, Tensor(a!)? residual, bool relu, bool position_major, "
        "bool into_residual=False) -> Tensor");
  // Internal (CPU only): Winograd F(2x2, 3x3) (csrc/cpu/winograd_f2.h), y as for conv3x3_winograd, its 16 products by
  // the implicit GEMM with panels = winograd2_weight(w)'s U[p] each packed as conv_gemm_weight packs a 1x1 weight.
  m.def("winograd2_weight(Tensor weight) -> Tensor");
  m.def("conv3x3_winograd2(Tensor x, Tensor panels, Tensor bias, Tensor(a!)? residual, bool relu, "
        "bool into_residual=False) -> Tensor");
  // Internal (CPU only): the "cpu" backend's implicit-GEMM convolution for fp32 (csrc/cpu/conv_gemm.h), y =
  // conv2d(x, w, stride, padding) + bias[c] (+ residual), ReLU if relu, where packed = conv_gemm_weight(w);
  // into_residual as for conv3x3_winograd.
  m.def("conv_gemm_weight(Tensor weight) -> Tensor");
  m.def("conv_gemm(Tensor x, Tensor packed, Tensor bias, Tensor(a!)? residual, int[2] kernel_size, int stride, "
        "int padding, bool relu, bool into_residual=False) -> Tensor");
  // Internal (CPU only): the ops around the blocks that fuse_model swaps in for the "cpu" backend
  // (csrc/cpu/edges.cpp): max pooling and average pooling to 1x1 of channels_last x, and x @ weight^T + bias for
  // few rows of fp32 x.
  m.def("max_pool2d_cl(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def("mean_pool_cl(Tensor x) -> Tensor");
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("batch_norm_stats(Tensor y) -> (Tensor, Tensor)");
  m.def("batch_norm_apply(Tensor y, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
        "bool relu) -> Tensor");
  m.def("batch_norm_backward(Tensor grad_out, Tensor y, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
        "Tensor? residual, bool relu) -> (Tensor, Tensor, Tensor, Tensor)");
}

// Importing resnet_fused._C runs the registrations above and in the kernel files; the module itself answers the
// "cpu" backend's question of which dtype to fold a pack into, and which kernel the CUDA conv runs (conv_plan.h),
// and checks the fused modules' tensors for changes (tensor_watch.h).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def(
      "cpu_conv_dtype", [](at::ScalarType dtype) { return resnet_fused::cpu::conv_dtype(dtype, dtype); },
      "The dtype the CPU convolution runs for inputs of `dtype`: its own, or float32 where this CPU has no "
      "hardware convolution for it (bf16 without AVX512-BF16/AMX, fp16 without AVX512-FP16/AMX-FP16).");
  m.def("cpu_batch_norm_isa", &resnet_fused::cpu::batch_norm_isa,
        "The instruction set the CPU training BatchNorm kernels run with here: 'avx512', 'avx2' or 'default' (the "
        "widest this build has that ATen's own dispatch allows; ATEN_CPU_CAPABILITY lowers it).");
  m.def("cpu_conv_gemm_available", &resnet_fused::cpu::conv_gemm::available,
        "Whether the CPU implicit-GEMM convolution (conv_gemm) runs here: an x86-64 build, AVX2 and FMA, and ATen's "
        "dispatch allowing AVX2.");
  m.def("cpu_cache_scope", &resnet_fused::cpu::block_cache_scope, pybind11::arg("on"),
        "Turn the CPU block cache on or off for this thread's allocations; returns the previous state.");
  m.def(
      "cpu_cache_info",
      [] {
        const auto info = resnet_fused::cpu::block_cache_info();
        pybind11::dict d;
        d["cached_bytes"] = info.cached_bytes;
        d["in_use_bytes"] = info.in_use_bytes;
        d["limit_bytes"] = info.limit_bytes;
        d["hits"] = info.hits;
        d["misses"] = info.misses;
        d["installed"] = info.installed;
        return d;
      },
      "The CPU block cache's counters.");
  m.def("cpu_cache_set_limit", &resnet_fused::cpu::block_cache_set_limit, pybind11::arg("limit_bytes"));
  m.def("cpu_cache_empty", &resnet_fused::cpu::block_cache_empty);
  resnet_fused::register_conv_plan(m);  // the CUDA kernels' plan, for tests and reports (CPU build too)
  resnet_fused::register_tensor_watch(m);  // the fused modules' staleness check (resnet_fused/fusion/changes.py)
  resnet_fused::register_bound_program(m);  // fused blocks replayed without the interpreter (fusion/binding.py)
}
