// A cache of large CPU blocks for the fused modules' activations.
//
// Why: every forward allocates the same activation-sized blocks and frees them soon after. glibc hands large freed
// blocks back to the kernel (munmap above its mmap threshold, a heap trim above its trim threshold), so the next
// forward page-faults the same memory in again: 12-25 thousand faults of about 1-2 us each per resnet50 forward at
// batch 8, 5-10% of its time on the CPUs measured. ONNX Runtime and OpenVINO allocate from arenas of their own.
//
// What: a torch CPU allocator that forwards every allocation to the allocator installed before it, except the
// blocks of at least kMinCachedBytes that a thread allocates while it has the cache on (the fused modules turn it on
// around their forward and backward). Those come from a list of freed blocks when one fits (at least the size asked,
// at most twice it; the smallest such, the latest freed among equals) and go back to that list when freed, whichever
// thread frees them, up to a limit of cached bytes beyond which the oldest are freed for real.
//
// torch's oneDNN glue frees through the allocator current at free time (raw_deallocate): the deleter this allocator
// reports therefore frees any pointer, its own or one its predecessor made.
#include "block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <atomic>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t{256} << 10;  // smaller blocks stay in malloc's heap, which reuses them
constexpr int64_t kDefaultLimitBytes = int64_t{1} << 30;

thread_local bool t_cache_on = false;

struct Block {
  size_t bytes;
  c10::DataPtr backing;  // from the previous allocator: destroying it frees the memory
};

class BlockCache {
 public:
  // A block of at least n bytes (a new one from base when none fits), or nullptr when caching is off.
  void* take(size_t n, c10::Allocator* base) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (limit_ == 0) return nullptr;
      size_t best = free_.size();
      for (size_t i = free_.size(); i-- > 0;) {  // latest freed first, so that equals go to the warmest
        const size_t bytes = free_[i].bytes;
        if (bytes >= n && bytes / 2 <= n && (best == free_.size() || bytes < free_[best].bytes)) best = i;
      }
      if (best != free_.size()) {
        Block block = std::move(free_[best]);
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        cached_ -= static_cast<int64_t>(block.bytes);
        ++hits_;
        return hand_out(std::move(block));
      }
      ++misses_;
    }
    c10::DataPtr backing;
    try {
      backing = base->allocate(n);  // outside the lock: it may take a while (or throw)
    } catch (const c10::Error&) {
      empty();  // out of memory with blocks cached for other sizes: free them and try once more
      backing = base->allocate(n);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    return hand_out(Block{n, std::move(backing)});
  }

  // Takes p back if it is one of this cache's blocks; false otherwise.
  bool give_back(void* p) {
    std::vector<Block> to_free;  // freed after the lock is released
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = in_use_.find(p);
      if (it == in_use_.end()) return false;
      Block block = std::move(it->second);
      in_use_.erase(it);
      in_use_bytes_ -= static_cast<int64_t>(block.bytes);
      try {
        free_.push_back(std::move(block));
      } catch (const std::bad_alloc&) {
        return true;  // not cached: freed as it leaves this scope (a deleter must not throw)
      }
      cached_ += static_cast<int64_t>(free_.back().bytes);
      evict_to(limit_, to_free);
    }
    return true;
  }

  BlockCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, in_use_bytes_, limit_, hits_, misses_, /*installed=*/false};  // block_cache_info sets it
  }

  void set_limit(int64_t bytes) {
    std::vector<Block> to_free;
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    evict_to(limit_, to_free);
  }

  void empty() {
    std::vector<Block> to_free;
    std::lock_guard<std::mutex> lock(mutex_);
    evict_to(0, to_free);
  }

  // Held across fork(), so that a child never inherits it locked by a thread that does not exist there (its first
  // free would hang).
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  void* hand_out(Block block) {
    void* p = block.backing.get();
    const size_t bytes = block.bytes;
    // An address already handed out means a block was freed behind the cache's back (another allocator installed
    // after it that does not forward frees): handing it out twice would be a use after free.
    TORCH_INTERNAL_ASSERT(in_use_.emplace(p, std::move(block)).second, "block cache: address handed out twice");
    in_use_bytes_ += static_cast<int64_t>(bytes);
    return p;
  }

  // Moves the oldest cached blocks into to_free until at most target bytes stay cached.
  void evict_to(int64_t target, std::vector<Block>& to_free) {
    size_t drop = 0;
    for (int64_t cached = cached_; cached > target && drop < free_.size(); ++drop) {
      cached -= static_cast<int64_t>(free_[drop].bytes);
    }
    to_free.reserve(to_free.size() + drop);  // before anything moves: nothing below throws
    for (size_t i = 0; i < drop; ++i) {
      cached_ -= static_cast<int64_t>(free_[i].bytes);
      to_free.push_back(std::move(free_[i]));
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
  }

  std::mutex mutex_;
  std::unordered_map<void*, Block> in_use_;
  std::vector<Block> free_;  // in the order they were freed
  int64_t cached_ = 0, in_use_bytes_ = 0, limit_ = kDefaultLimitBytes, hits_ = 0, misses_ = 0;
};

// Created once and never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
BlockCache& cache() {
  static BlockCache* const instance = new BlockCache();
  return *instance;
}

// The previous allocator's, set when the cache is installed (before any thread can reach delete_any).
std::atomic<c10::DeleterFnPtr> g_base_raw_delete{nullptr};

void delete_cached(void* p) {
  const bool ours = cache().give_back(p);
  TORCH_INTERNAL_ASSERT(ours, "block cache: freeing a pointer it did not hand out");
}

void delete_any(void* p) {
  if (!cache().give_back(p)) g_base_raw_delete.load(std::memory_order_acquire)(p);
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override {
    if (t_cache_on && n >= kMinCachedBytes) {
      if (void* p = cache().take(n, base_)) return {p, p, &delete_cached, c10::Device(c10::DeviceType::CPU)};
    }
    return base_->allocate(n);
  }

  c10::DeleterFnPtr raw_deleter() const override { return &delete_any; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* const base_;
};

std::atomic<bool> g_installed{false};

// Installs the cache as torch's CPU allocator once; whether it is the current one.
bool installed() {
  static const bool ok = [] {
    c10::Allocator* base = c10::GetCPUAllocator();
    // Without a raw deleter of the previous allocator, the oneDNN glue's frees could not be forwarded.
    if (base == nullptr || base->raw_deleter() == nullptr) return false;
    g_base_raw_delete.store(base->raw_deleter(), std::memory_order_release);
    pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                   [] { cache().unlock_after_fork(); });
    auto* allocator = new CachingCpuAllocator(base);
    c10::SetCPUAllocator(allocator, /*priority=*/0);  // an allocator installed at a higher priority keeps its place
    g_installed = c10::GetCPUAllocator() == allocator;
    return g_installed.load();
  }();
  return ok;
}

}  // namespace

bool block_cache_scope(bool on) {
  const bool previous = t_cache_on;
  t_cache_on = on && installed();
  return previous;
}

BlockCacheInfo block_cache_info() {
  BlockCacheInfo info = cache().info();
  info.installed = g_installed.load();
  return info;
}

void block_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_cache_limit: limit_bytes must be >= 0, got ", bytes);
  cache().set_limit(bytes);
}

void block_cache_empty() { cache().empty(); }

}  // namespace resnet_fused::cpu
