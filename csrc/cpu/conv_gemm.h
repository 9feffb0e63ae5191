// The implicit-GEMM convolution's shapes, blocking and kernel entry points (isa/conv_gemm_avx2.cpp has the kernel,
// conv_gemm.cpp binds it to tensors). fp32, channels_last, groups 1, dilation 1:
//
//   y[m, j] = act( sum_k A[m, k] * B[k, j] + bias[j] (+ residual[m, j]) )
//
// with m = (n, oh, ow) an output pixel, j an output channel, k = (dy, dx, c) a kernel tap and input channel,
// A[m, k] = x[n, oh * stride - padding + dy, ow * stride - padding + dx, c] (0 outside x) and
// B[k, j] = w[j, c, dy, dx].
// A is never formed: for each kernel row dy, row m's taps (dx, c) are one contiguous run of kernel_w * C_in floats
// of channels_last x (a "segment"), so the kernel reads them through one pointer per (pixel, dy). Only the pixels
// whose window crosses x's border (padding) have their row of A gathered, with its zeros, once per call.
// B is packed once per weight into panels of kCols output channels, [ceil(C_out / kCols)][K][kCols], zero past
// C_out; its k order is A's, so a K block of B spans the segments it covers in turn.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace resnet_fused::cpu::conv_gemm {

constexpr int64_t kRows = 6;    // output pixels per micro-tile: 12 ymm accumulators with kCols = 16
constexpr int64_t kCols = 16;   // output channels per micro-tile (two 8-float vectors)
constexpr int64_t kDepth = 256; // K per block: a B micro-panel (kDepth x kCols floats, 16 KiB) stays in L1
constexpr int64_t kMinRowsPerThread = 96;  // few pixels split by rows only from here (see Blocking)
constexpr int64_t kStreamRows = 5 * kRows;  // B read in memory order up to here (see run_tasks_avx2)

struct Geometry {
  int64_t batch, in_h, in_w, in_channels, kernel_h, kernel_w, stride, padding, out_h, out_w, out_channels;
  int64_t rows() const { return batch * out_h * out_w; }
  int64_t depth() const { return kernel_h * kernel_w * in_channels; }
  int64_t segment_depth() const { return kernel_w * in_channels; }  // one kernel row's taps
  // whether output pixel (oh, ow)'s window lies inside x (else its row of A is gathered)
  bool inside(int64_t oh, int64_t ow) const {
    const int64_t ih = oh * stride - padding, iw = ow * stride - padding;
    return ih >= 0 && iw >= 0 && ih + kernel_h <= in_h && iw + kernel_w <= in_w;
  }
};

// The gathered rows of A: the pixels whose window crosses the border, the same positions in every image.
// slot[oh * out_w + ow] is -1 for a pixel inside, else its index among the image's per_image border pixels; row
// (n * per_image + slot) of `rows` (depth() floats each) is its row of A. slot is nullptr when no window crosses.
struct Border {
  const int32_t* slot;
  int64_t per_image;
  const float* rows;
};

inline int64_t packed_weight_numel(int64_t out_channels, int64_t depth) {
  return (out_channels + kCols - 1) / kCols * kCols * depth;
}

// The work split into tasks of about `rows` x `cols` outputs, each computed by one thread over all of K. Few pixels
// (batch 1, late stages): one row block, so that each thread reads the weight columns of its tasks once, and 64
// columns per task so that there are tasks for every thread; but where each thread still gets kMinRowsPerThread rows,
// one row block per thread, so that each reads its share of x and not all of it (ResNet-50's 196-row 1x1 convs at
// batch 1: 1.016-1.030x inside the model, 4 runs with either order first; 49 rows split so ran 0.78-0.87x, their 4-5
// tiles per thread too few to reuse B over). Many pixels: blocks of about 60 rows (A's block stays in L2 while the
// task walks its 128 columns). Measured on 2 cores of an AMD EPYC (Zen 3) against 48/96/198 rows and
// 64/128/256 columns over ResNet-50's 1x1 shapes at batch 1 and 8. The row blocks start on whole 6-row tiles and
// differ by one tile at most, and their number makes the task count a multiple of the thread count where it can
// (784 rows on 2 threads: 14 blocks of 54-60 rows, not 13 of 60 and one of 4, which left one thread 7% more work).
// Fewer tasks than threads (few pixels and few channels): the rows split further.
struct Blocking {
  int64_t pixels, rows, cols, row_blocks, col_blocks;  // rows: the tallest block's
  bool one_sweep_of_b;  // each thread sweeps B once per call (at most one row block per thread): B comes from memory
  int64_t tasks() const { return row_blocks * col_blocks; }
  // the first row of row block `block`: blocks start on whole kRows tiles, so only the last one ends in a short tile
  int64_t row_begin(int64_t block) const {
    return std::min(pixels, block * ((pixels + kRows - 1) / kRows) / row_blocks * kRows);
  }
};

inline Blocking blocking(const Geometry& g, int64_t threads) {
  auto ceil_div = [](int64_t v, int64_t by) { return (v + by - 1) / by; };
  const int64_t m = g.rows(), n = g.out_channels;
  const bool few_pixels = m <= 256;
  int64_t row_blocks = !few_pixels ? ceil_div(m, 60) : m >= kMinRowsPerThread * threads ? threads : 1;
  const int64_t cols = few_pixels ? 64 : 128, col_blocks = ceil_div(n, cols);
  if (row_blocks * col_blocks < threads) row_blocks = std::min(ceil_div(m, kRows), ceil_div(threads, col_blocks));
  // up to threads - 1 blocks more, for a task count that every thread gets the same share of
  for (int64_t more = 0; row_blocks > 1 && more < threads && row_blocks + more <= ceil_div(m, kRows); ++more)
    if ((row_blocks + more) * col_blocks % threads == 0) {
      row_blocks += more;
      break;
    }
  return {m, ceil_div(ceil_div(m, kRows), row_blocks) * kRows, cols, row_blocks, col_blocks, row_blocks <= threads};
}

// The tasks of a Blocking handed out to `lanes` threads: lane i starts on its own contiguous share (the static split,
// so that a thread keeps to the same rows from conv to conv) and, when that is done, takes what the other lanes have
// not begun. On a machine whose cores are shared, a thread that the OS holds up no longer holds up the whole conv:
// resnet50 under one competing busy process on 2 cores ran 1.04x (batch 1) and 1.09x (batch 8) faster, and level
// without one.
class TaskQueue {
 public:
  TaskQueue(int64_t tasks, int64_t lanes) : shares_(static_cast<size_t>(lanes)) {
    for (int64_t i = 0; i < lanes; ++i) {
      shares_[i].next.store(i * tasks / lanes, std::memory_order_relaxed);
      shares_[i].end = (i + 1) * tasks / lanes;
    }
  }
  // The next task for `lane`, or -1 when every task has been taken.
  int64_t next(int64_t lane) {
    const int64_t lanes = static_cast<int64_t>(shares_.size());
    for (int64_t k = 0; k < lanes; ++k) {
      Share& share = shares_[(lane + k) % lanes];
      if (share.next.load(std::memory_order_relaxed) >= share.end) continue;
      const int64_t task = share.next.fetch_add(1, std::memory_order_relaxed);
      if (task < share.end) return task;
    }
    return -1;
  }

 private:
  struct alignas(64) Share {  // a cache line each: the lanes take from their own without contention
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::vector<Share> shares_;
};

// Whether the kernel runs here: an x86-64 build on a CPU with AVX2 and FMA whose ATen dispatch allows AVX2
// (ATEN_CPU_CAPABILITY=default turns it off, as it does ATen's own kernels). Defined in conv_gemm.cpp.
bool available();

#ifdef RESNET_FUSED_X86_KERNELS  // setup.py builds isa/ kernels on x86-64 only
// Lane `lane`'s tasks of `blocking` as `queue` hands them out (AVX2 + FMA), on channels_last x. residual may be
// nullptr; y may be residual (each output is read from it once, just before it is written there).
void run_tasks_avx2(const float* x, const Geometry& g, const Border& border, const float* packed_weight,
                    const float* bias, const float* residual, float* y, bool relu, const Blocking& blocking,
                    TaskQueue& queue, int64_t lane);

// Winograd's 36 products on one block of `rows` tiles, with the same 6 x 16 register tile (AVX2 + FMA):
//   m[p, r, 0:width] = v[p, r, 0:depth] @ panels[p]   for p < 36, r < rows,
// v position-major with rows of `depth` <= kDepth floats (v_position floats from p to p + 1), panels[p] B's
// panels of `width` / kCols columns over `depth` rows (packed as conv_gemm_weight packs a 1x1 weight: panel j's
// depth x kCols floats after panel j - 1's; 32-byte aligned), m position-major with rows of `width` floats.
void winograd_products_avx2(const float* v, int64_t v_position, int64_t rows, int64_t depth, const float* panels,
                            int64_t width, float* m, int64_t m_position);
#endif

}  // namespace resnet_fused::cpu::conv_gemm
