// A cache of large CPU blocks for the fused modules' activations (block_cache.cpp): what they allocate while a
// thread has the cache on is kept when freed and handed out again, instead of going back to malloc.
#pragma once

#include <cstdint>

namespace resnet_fused::cpu {

struct BlockCacheInfo {
  int64_t cached_bytes;  // freed blocks kept for reuse
  int64_t in_use_bytes;  // blocks handed out and not yet freed
  int64_t limit_bytes;   // most bytes kept cached (0: the cache is off)
  int64_t hits;          // allocations served from the cache
  int64_t misses;        // allocations that needed a new block
  bool installed;        // whether the cache is torch's CPU allocator (false: another allocator outranks it)
};

// Turns the cache on (true) or off for the calling thread's CPU allocations; returns the previous state. The
// first call installs the cache as torch's CPU allocator, forwarding everything it does not cache to the one
// installed before it.
bool block_cache_scope(bool on);
BlockCacheInfo block_cache_info();
void block_cache_set_limit(int64_t bytes);  // evicts down to it; 0 turns caching off
void block_cache_empty();                   // frees every cached block

}  // namespace resnet_fused::cpu
