// Stored values <-> fp32 vectors for the per-instruction-set kernels (csrc/cpu/isa/*: batch_norm_kernels.h,
// edges_kernels.h): a group of Lanes<T>::kGroup stored values is kParts fp32 vectors (one for float, two for
// bfloat16 / float16, widened on load and rounded once on store). A partial group (count < kGroup) loads zeros into
// its missing lanes and stores only its `count` values. In each capability's inline namespace, as at::vec is.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>

namespace resnet_fused::cpu {
inline namespace CPU_CAPABILITY {

template <typename T>
struct Lanes {
  using FVec = at::vec::Vectorized<float>;
  static constexpr int kParts = 2;
  static constexpr int64_t kGroup = 2 * FVec::size();
  static void load(const T* p, int64_t count, FVec* v) {
    using SVec = at::vec::Vectorized<T>;
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(count == kGroup ? SVec::loadu(p) : SVec::loadu(p, count));
  }
  static void store(T* p, int64_t count, const FVec* v) {
    const auto packed = at::vec::convert_from_float<T>(v[0], v[1]);
    count == kGroup ? packed.store(p) : packed.store(p, static_cast<int>(count));
  }
};
template <>
struct Lanes<float> {
  using FVec = at::vec::Vectorized<float>;
  static constexpr int kParts = 1;
  static constexpr int64_t kGroup = FVec::size();
  static void load(const float* p, int64_t count, FVec* v) {
    v[0] = count == kGroup ? FVec::loadu(p) : FVec::loadu(p, count);
  }
  static void store(float* p, int64_t count, const FVec* v) {
    count == kGroup ? v[0].store(p) : v[0].store(p, static_cast<int>(count));
  }
};

}  // namespace CPU_CAPABILITY
}  // namespace resnet_fused::cpu
