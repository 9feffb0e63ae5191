// Small device helpers shared by the resnet_fused CUDA kernels (CUDA headers only, no torch):
//   element <-> fp32 conversion for float / __half / __nv_bfloat16 (explicit intrinsics: torch builds with
//   __CUDA_NO_HALF_CONVERSIONS__ and friends, so no implicit conversions or operators are used),
//   128-bit vectors of EV = 16 / sizeof(T) elements unpacked to and packed from fp32 through their raw bits,
//   cp.async (sm_80+) with zero fill, and the device's SM count for grid sizing.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace resnet_fused {
namespace cuda_kernels {

// ---- scalar conversions ----------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ReLU that keeps NaN (as torch.relu does); fmaxf would turn NaN into 0.
__device__ __forceinline__ float relu_keep_nan(float v) { return v < 0.f ? 0.f : v; }

// ---- 128-bit vectors -------------------------------------------------------------------------------------
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

__device__ __forceinline__ float word_lo16_to_float(uint32_t w, __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float word_hi16_to_float(uint32_t w, __half*) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ float word_lo16_to_float(uint32_t w, __nv_bfloat16*) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float word_hi16_to_float(uint32_t w, __nv_bfloat16*) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Element i of a 16-byte vector sits in 32-bit word i (fp32) or in the low/high half of word i/2 (16-bit types:
// little-endian, element 2j in the low half).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float (&f)[VecWidth<T>::value]) {
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(words[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = word_lo16_to_float(words[i], static_cast<T*>(nullptr));
      f[2 * i + 1] = word_hi16_to_float(words[i], static_cast<T*>(nullptr));
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&f)[VecWidth<T>::value]) {
  uint32_t words[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = __float_as_uint(f[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      words[i] = bits16(from_float<T>(f[2 * i])) | (bits16(from_float<T>(f[2 * i + 1])) << 16);
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ uint4 load128(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store128(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---- cp.async (sm_80+) -----------------------------------------------------------------------------------
// Copies 16 bytes global -> shared without staging in registers; when `valid` is false it reads nothing and
// writes 16 zero bytes (src-size 0), which is how out-of-image taps and out-of-range rows become zero padding.
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// ---- host: device facts for launch decisions -------------------------------------------------------------
constexpr int kMaxCachedDevices = 64;

// The current device's ordinal, or -1.
inline int current_device() {
  int device = 0;
  return cudaGetDevice(&device) == cudaSuccess ? device : -1;
}

inline bool cacheable_device(int device) { return device >= 0 && device < kMaxCachedDevices; }

// An attribute of the current device, read once per device: launches consult these on every call.
// -1 if it cannot be read. The cache holds value + 1, so that 0 means "not read yet" (a minor version may be 0).
template <cudaDeviceAttr kAttr>
inline int current_device_attribute() {
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  const int device = current_device();
  if (device < 0) return -1;
  if (cacheable_device(device)) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached - 1;
  }
  int value = 0;
  if (cudaDeviceGetAttribute(&value, kAttr, device) != cudaSuccess) return -1;
  if (cacheable_device(device) && value >= 0) cache[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

// SM count of the current device (grid sizing); at least 1.
inline int current_sm_count() {
  const int count = current_device_attribute<cudaDevAttrMultiProcessorCount>();
  return count > 0 ? count : 1;
}

inline int current_compute_capability_major() {
  return current_device_attribute<cudaDevAttrComputeCapabilityMajor>();
}

inline int current_compute_capability_minor() {
  return current_device_attribute<cudaDevAttrComputeCapabilityMinor>();
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device. Above 48 KiB a kernel must opt in,
// once per device (the attribute lives in the device's context); not on every launch: cudaFuncSetAttribute can
// wait for pending host-device copies. `opted_in` is the caller's per-kernel record of devices already done.
template <typename Kernel>
inline cudaError_t opt_in_dynamic_smem(Kernel kernel, size_t bytes, std::atomic<bool> (&opted_in)[kMaxCachedDevices]) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  const int device = current_device();
  if (cacheable_device(device) && opted_in[device].load(std::memory_order_relaxed)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (err != cudaSuccess) return err;
  if (cacheable_device(device)) opted_in[device].store(true, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
