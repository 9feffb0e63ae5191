// Which of the per-instruction-set kernel builds (csrc/cpu/isa/<name>_<isa>.cpp) runs here: ATen's choice
// ("DEFAULT", "AVX2", "AVX512", ...), which honors ATEN_CPU_CAPABILITY, capped by what was built.
#pragma once

#include <ATen/Context.h>

#include <string>

namespace resnet_fused::cpu {

enum class IsaLevel { Default, Avx2, Avx512 };

inline IsaLevel isa_level() {
  const std::string aten = at::get_cpu_capability();
#ifdef RESNET_FUSED_X86_KERNELS
  if (aten == "AVX512") return IsaLevel::Avx512;
  if (aten == "AVX2") return IsaLevel::Avx2;
#endif
  return IsaLevel::Default;
}

inline const char* isa_name(IsaLevel level) {
  return level == IsaLevel::Avx512 ? "avx512" : level == IsaLevel::Avx2 ? "avx2" : "default";
}

}  // namespace resnet_fused::cpu
