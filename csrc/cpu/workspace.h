// Scratch for the Winograd convolutions' transformed buffers (winograd.cpp, winograd_f2.cpp), from a buffer kept
// per thread between calls: fresh multi-megabyte buffers are page-faulted in (and zeroed by the kernel) on first
// touch, about 1 us per 4 KiB page here, and these were 8-14 thousand faults of a resnet50 batch 8 forward (2 cores).
// Buffers past kKeptWorkspaceFloats are made per call, so that a large batch does not keep its workspace for the life
// of the thread. The kept memory is raw (a DataPtr, not a tensor), and each call views it afresh: a tensor kept from a
// call under inference_mode would be an inference tensor, which a later call outside it may not write. The view never
// leaves the op that asked for it, and one op's view is dead before the next op on the thread asks.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

namespace resnet_fused::cpu {

constexpr int64_t kKeptWorkspaceFloats = int64_t{16} << 20;  // 64 MiB

inline at::Tensor workspace(int64_t floats) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  if (floats > kKeptWorkspaceFloats) return at::empty({floats}, options);
  thread_local c10::DataPtr kept;
  thread_local int64_t kept_floats = 0;
  if (kept_floats < floats) {
    kept = c10::DataPtr();  // the old buffer goes before the new one comes
    kept = c10::GetCPUAllocator()->allocate(static_cast<size_t>(floats) * sizeof(float));
    kept_floats = floats;
  }
  return at::from_blob(kept.get(), {floats}, options);
}

}  // namespace resnet_fused::cpu
