// The dtype of the CPU convolution for bf16/fp16 inputs: their own where this CPU has hardware for it, else fp32.
//
//   bf16: torch's oneDNN runs bf16 convolutions on every AVX-512 CPU, but only AVX512-BF16 or AMX-BF16 compute bf16
//         dot products in hardware. Other AVX-512 cores (Skylake, Cascade Lake, Ice Lake) emulate them: a fused
//         bf16 ResNet-50 (batch 2) took 122 ms with emulated bf16 convolutions and 51 ms with fp32 ones (oneDNN
//         limited to ONEDNN_MAX_CPU_ISA=AVX512_CORE on an AVX512-BF16 EPYC, 2 cores; see README).
//   fp16: torch's oneDNN has fp16 convolutions only with AVX512-FP16 or AMX-FP16, both in hardware.
//
// fp32 costs no accuracy: x widens exactly, and the fp32 result is rounded once to x's dtype.
#include "conv_dtype.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define RESNET_FUSED_X86_CPUID 1
#endif

namespace resnet_fused::cpu {
namespace {

bool onednn_query(const char* op_name) {
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "");
  return handle.typed<bool()>().call();
}

// AVX512-BF16 (CPUID.(7,1):EAX[5]) or AMX-BF16 (CPUID.(7,0):EDX[22]). Elsewhere (aarch64: oneDNN asks for the
// BF16 extension itself) torch's own check is the answer.
bool cpu_has_bf16_dot() {
#ifdef RESNET_FUSED_X86_CPUID
  unsigned max_subleaf = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &max_subleaf, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u;
  unsigned eax = 0;
  const bool avx512_bf16 = max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
  return avx512_bf16 || amx_bf16;
#else
  return true;
#endif
}

bool convolves_natively(c10::ScalarType dtype) {
  static const bool has_onednn = at::hasMKLDNN();
  static const bool bf16 =
      has_onednn && onednn_query("mkldnn::_is_mkldnn_bf16_supported") && cpu_has_bf16_dot();
  static const bool fp16 = has_onednn && onednn_query("mkldnn::_is_mkldnn_fp16_supported");
  switch (dtype) {
    case c10::ScalarType::BFloat16: return bf16;
    case c10::ScalarType::Half: return fp16;
    default: return false;
  }
}

}  // namespace

c10::ScalarType conv_dtype(c10::ScalarType x_dtype, c10::ScalarType weight_dtype) {
  if (x_dtype == c10::ScalarType::Float || weight_dtype == c10::ScalarType::Float) return c10::ScalarType::Float;
  return convolves_natively(x_dtype) ? x_dtype : c10::ScalarType::Float;
}

}  // namespace resnet_fused::cpu
