// The implicit-GEMM convolution (math in ../conv_gemm.h) for AVX2 + FMA: a 6 x 16 register tile, 12 ymm
// accumulators fed by one broadcast of A and two loads of B per k, A read through one pointer per pixel and kernel
// row. setup.py compiles this file on x86-64 with -mavx2 -mfma. Each output accumulates over k in order with one
// fused multiply-add per term.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "../conv_gemm.h"

namespace resnet_fused::cpu::conv_gemm {
namespace {

// What the last K block does to the tile before storing it: + bias (+ residual), ReLU.
struct Epilogue {
  const float* bias;      // nullptr: not the last K block, the tile is stored as it is
  const float* residual;  // row stride ldc, may be nullptr
  bool relu;
};

// Where a micro-tile reads A: row r's taps of kernel row dy start at rows[r * segments + dy]; the K block of
// `depth` taps starts at tap `start` of kernel row `segment` and runs through the rows it covers, segment_depth taps
// each.
struct TileA {
  const float* const* rows;
  int64_t segments, segment_depth, segment, start, depth;
};

// c[r, 0:16] = (acc ? acc[r, 0:16] : 0) + sum_{k0 <= k < k0 + depth} A[r, k] * b[(k - k0) * 16 + 0:16] for
// r < ROWS, then the epilogue. Not inlined: in its own function the 12 accumulators, b's two vectors and the
// broadcast fit the 16 ymm registers and the six row pointers the general registers.
template <int ROWS>
__attribute__((noinline)) void micro_tile(const TileA& ta, const float* b, const float* acc, int64_t ld_acc, float* c,
                                          int64_t ldc, const Epilogue& e) {
  static_assert(ROWS >= 1 && ROWS <= kRows && kCols == 16, "a 6 x 16 tile of two ymm columns");
  // The residual's rows, asked for now so that they arrive while the K loop runs: the epilogue's loads of them
  // otherwise wait on memory once per tile (a residual written long before is out of the caches).
  if (e.residual)
    for (int r = 0; r < ROWS; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(e.residual + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(e.residual + r * ldc + kCols - 1), _MM_HINT_T0);
    }
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero, c30 = zero, c31 = zero,
         c40 = zero, c41 = zero, c50 = zero, c51 = zero;
#define RF_LOAD(r) \
  if (ROWS > r) { c##r##0 = _mm256_loadu_ps(acc + r * ld_acc); c##r##1 = _mm256_loadu_ps(acc + r * ld_acc + 8); }
  if (acc) { RF_LOAD(0) RF_LOAD(1) RF_LOAD(2) RF_LOAD(3) RF_LOAD(4) RF_LOAD(5) }
#undef RF_LOAD
  int64_t dy = ta.segment, start = ta.start;
  for (int64_t left = ta.depth; left > 0; ++dy, start = 0) {
    const int64_t run = std::min(left, ta.segment_depth - start);
    left -= run;
    // a short tile's missing rows have no pointers: theirs alias row 0's and are never read
    const float* const* p = ta.rows + dy;
    const float* a0 = p[0] + start;
    const float* a1 = ROWS > 1 ? p[1 * ta.segments] + start : a0;
    const float* a2 = ROWS > 2 ? p[2 * ta.segments] + start : a0;
    const float* a3 = ROWS > 3 ? p[3 * ta.segments] + start : a0;
    const float* a4 = ROWS > 4 ? p[4 * ta.segments] + start : a0;
    const float* a5 = ROWS > 5 ? p[5 * ta.segments] + start : a0;
#pragma GCC unroll 4
    for (int64_t k = 0; k < run; ++k) {
      const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
      b += kCols;
#define RF_STEP(r)                                     \
  if (ROWS > r) {                                      \
    const __m256 ar = _mm256_broadcast_ss(a##r + k);   \
    c##r##0 = _mm256_fmadd_ps(ar, b0, c##r##0);        \
    c##r##1 = _mm256_fmadd_ps(ar, b1, c##r##1);        \
  }
      RF_STEP(0) RF_STEP(1) RF_STEP(2) RF_STEP(3) RF_STEP(4) RF_STEP(5)
#undef RF_STEP
    }
  }
  if (e.bias) {
    const __m256 bias0 = _mm256_loadu_ps(e.bias), bias1 = _mm256_loadu_ps(e.bias + 8);
#define RF_EPILOGUE(r)                                                              \
  if (ROWS > r) {                                                                   \
    c##r##0 = _mm256_add_ps(c##r##0, bias0);                                        \
    c##r##1 = _mm256_add_ps(c##r##1, bias1);                                        \
    if (e.residual) {                                                               \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(e.residual + r * ldc));      \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(e.residual + r * ldc + 8));  \
    }                                                                               \
    if (e.relu) { /* max(0, v): a NaN v stays NaN, as in eager's ReLU */          \
      c##r##0 = _mm256_max_ps(zero, c##r##0);                                       \
      c##r##1 = _mm256_max_ps(zero, c##r##1);                                       \
    }                                                                               \
  }
    RF_EPILOGUE(0) RF_EPILOGUE(1) RF_EPILOGUE(2) RF_EPILOGUE(3) RF_EPILOGUE(4) RF_EPILOGUE(5)
#undef RF_EPILOGUE
  }
#define RF_STORE(r) \
  if (ROWS > r) { _mm256_storeu_ps(c + r * ldc, c##r##0); _mm256_storeu_ps(c + r * ldc + 8, c##r##1); }
  RF_STORE(0) RF_STORE(1) RF_STORE(2) RF_STORE(3) RF_STORE(4) RF_STORE(5)
#undef RF_STORE
}

void micro_tile_rows(int64_t rows, const TileA& ta, const float* b, const float* acc, int64_t ld_acc, float* c,
                     int64_t ldc, const Epilogue& e) {
  switch (rows) {
    case 6: return micro_tile<6>(ta, b, acc, ld_acc, c, ldc, e);
    case 5: return micro_tile<5>(ta, b, acc, ld_acc, c, ldc, e);
    case 4: return micro_tile<4>(ta, b, acc, ld_acc, c, ldc, e);
    case 3: return micro_tile<3>(ta, b, acc, ld_acc, c, ldc, e);
    case 2: return micro_tile<2>(ta, b, acc, ld_acc, c, ldc, e);
    default: return micro_tile<1>(ta, b, acc, ld_acc, c, ldc, e);
  }
}

// The last K block of a tile whose columns end before 16 (a channel count that is not a multiple of 16): through a
// 6 x 16 scratch tile, then the epilogue in scalar code on the columns that exist.
void partial_tile(int64_t rows, int64_t cols, const TileA& ta, const float* b, const float* acc, int64_t ld_acc,
                  float* c, int64_t ldc, const Epilogue& e) {
  alignas(32) float scratch[kRows * kCols];
  micro_tile_rows(rows, ta, b, acc, ld_acc, scratch, kCols, Epilogue{nullptr, nullptr, false});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j) {
      const float v = scratch[r * kCols + j] + e.bias[j] + (e.residual ? e.residual[r * ldc + j] : 0.f);
      c[r * ldc + j] = e.relu ? std::max(v, 0.f) : v;  // std::max(NaN, 0) is NaN
    }
}

// Where rows [m0, m1) read A, segment by segment: rows[(m - m0) * kernel_h + dy] (see TileA).
void row_pointers(const float* x, const Geometry& g, const Border& border, int64_t m0, int64_t m1,
                  std::vector<const float*>& rows) {
  const int64_t pixels = g.out_h * g.out_w, depth = g.depth(), segment_depth = g.segment_depth();
  const int64_t x_row = g.in_w * g.in_channels;  // floats between kernel rows in x
  rows.resize((m1 - m0) * g.kernel_h);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t n = m / pixels, pixel = m % pixels, oh = pixel / g.out_w, ow = pixel % g.out_w;
    const int32_t slot = border.slot ? border.slot[pixel] : -1;
    const float* first = slot >= 0
        ? border.rows + (n * border.per_image + slot) * depth
        : x + ((n * g.in_h + oh * g.stride - g.padding) * g.in_w + ow * g.stride - g.padding) * g.in_channels;
    const int64_t step = slot >= 0 ? segment_depth : x_row;
    for (int64_t dy = 0; dy < g.kernel_h; ++dy) rows[(m - m0) * g.kernel_h + dy] = first + dy * step;
  }
}

}  // namespace

void run_tasks_avx2(const float* x, const Geometry& g, const Border& border, const float* packed_weight,
                    const float* bias, const float* residual, float* y, bool relu, const Blocking& blocking,
                    TaskQueue& queue, int64_t lane) {
  const int64_t n_all = g.out_channels, k_all = g.depth(), segment_depth = g.segment_depth();
  // Where each thread sweeps B once and each slice of it serves at most kStreamRows rows (F(2x2)'s products in the
  // last stage at batch 1: 16 tiles, 3 micro-tiles), B is read in memory order instead: K not blocked, so that a task
  // reads its panels one after another, which the hardware prefetcher streams, and nothing fetched ahead. On 2 Zen 3
  // cores, B from memory: those products 1.07-1.16x, 1x1 and 3x3 convs of 16-25 pixels 1.03-1.15x; 36 pixels level,
  // 49 pixels 0.96-0.99x (blocked and fetched ahead stays there).
  const bool stream_b = blocking.one_sweep_of_b && blocking.rows <= kStreamRows;
  const int64_t k_block = stream_b ? k_all : kDepth;
  const bool blocked_k = k_all > k_block;
  // The sums of the K blocks before the last, per task: never in y, which may be the residual's buffer.
  std::vector<float> partial(blocked_k ? blocking.rows * blocking.cols : 0);
  const int64_t ld_partial = blocking.cols;
  std::vector<const float*> rows_a;
  // Where each thread sweeps every slice of B once per call, the slices come from memory: the next one is fetched
  // during the current sweep (late stages at batch 1: 1.03-1.17x). Where a thread has several row blocks, B stays in
  // L2 from block to block and fetching ahead cost 1-2%.
  const bool fetch_ahead = blocking.one_sweep_of_b && !stream_b;
  // the row block whose pointers rows_a holds: a lane takes a row block's tasks one after another, so they are made
  // once per block, not per task (a 256 -> 1024 1x1 on 196 pixels: 16 tasks per lane, one block; 1.02-1.04x)
  int64_t pointed_block = -1;
  for (int64_t task; (task = queue.next(lane)) >= 0;) {
    const int64_t row_block = task / blocking.col_blocks;
    const int64_t m0 = blocking.row_begin(row_block), m1 = blocking.row_begin(row_block + 1);
    const int64_t n0 = task % blocking.col_blocks * blocking.cols, n1 = std::min(n_all, n0 + blocking.cols);
    if (row_block != pointed_block) row_pointers(x, g, border, m0, m1, rows_a);
    pointed_block = row_block;
    // the task's rows in tiles as equal in height as the fewest tiles allow, the first `taller` one row taller (49
    // rows: 6,6,6,6,5,5,5,5,5, not eight of 6 and one of 1, whose FMAs wait on a broadcast and two loads each)
    const int64_t tiles = (m1 - m0 + kRows - 1) / kRows, height = (m1 - m0) / tiles, taller = (m1 - m0) % tiles;
    for (int64_t k0 = 0; k0 < k_all; k0 += k_block) {
      const int64_t depth = std::min(k_block, k_all - k0);
      const bool first = k0 == 0, last = k0 + depth == k_all;
      const int64_t segment = k0 / segment_depth, start = k0 % segment_depth;
      for (int64_t j = n0; j < n1; j += kCols) {
        const float* b = packed_weight + j * k_all + k0 * kCols;  // panel j / kCols, from row k0
        const int64_t cols = std::min(kCols, n1 - j);
        // B's next slice, fetched into L2 a share per tile while this one is swept
        const float* next_b = nullptr;
        int64_t next_depth = 0;  // its rows of kCols floats: one cache line each
        if (fetch_ahead && j + kCols < n1) {
          next_b = b + k_all * kCols;  // the next panel, same K block
          next_depth = depth;
        } else if (fetch_ahead && !last) {  // the task's first panel, from the next K block
          next_b = packed_weight + n0 * k_all + (k0 + k_block) * kCols;
          next_depth = std::min(k_block, k_all - k0 - k_block);
        }
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t i = m0 + t * height + std::min(t, taller), rows = height + (t < taller ? 1 : 0);
          for (int64_t l = t * next_depth / tiles; l < (t + 1) * next_depth / tiles; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(next_b + l * kCols), _MM_HINT_T1);
          const TileA ta{rows_a.data() + (i - m0) * g.kernel_h, g.kernel_h, segment_depth, segment, start, depth};
          // the partial sums' tile: 16 columns always lie within the task's block of `cols` (a multiple of 16)
          float* part = blocked_k ? partial.data() + (i - m0) * ld_partial + (j - n0) : nullptr;
          const float* acc = first ? nullptr : part;
          if (!last) {
            micro_tile_rows(rows, ta, b, acc, ld_partial, part, ld_partial, Epilogue{nullptr, nullptr, false});
            continue;
          }
          const Epilogue e{bias + j, residual ? residual + i * n_all + j : nullptr, relu};
          float* c = y + i * n_all + j;
          if (cols == kCols)
            micro_tile_rows(rows, ta, b, acc, ld_partial, c, n_all, e);
          else
            partial_tile(rows, cols, ta, b, acc, ld_partial, c, n_all, e);
        }
      }
    }
  }
}

void winograd_products_avx2(const float* v, int64_t v_position, int64_t rows, int64_t depth, const float* panels,
                            int64_t width, float* m, int64_t m_position) {
  for (int64_t p = 0; p < 36; ++p) {
    const float* u = panels + p * width * depth;
    for (int64_t i = 0; i < rows; i += kRows) {
      const int64_t tile_rows = std::min(kRows, rows - i);
      const float* a[kRows];  // the tile's rows of V[p]: one segment each
      for (int64_t r = 0; r < tile_rows; ++r) a[r] = v + p * v_position + (i + r) * depth;
      const TileA ta{a, 1, depth, 0, 0, depth};
      for (int64_t j = 0; j < width; j += kCols)  // panel j / kCols: depth x kCols floats
        micro_tile_rows(tile_rows, ta, u + j * depth, nullptr, 0, m + p * m_position + i * width + j, width,
                        Epilogue{nullptr, nullptr, false});
    }
  }
}

}  // namespace resnet_fused::cpu::conv_gemm
