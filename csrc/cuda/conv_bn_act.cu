// Fused convolution + folded BatchNorm (+ residual) (+ ReLU) as an implicit GEMM on tensor cores, NHWC.
//
//   GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin with k = (kh*KW + kw)*Cin + ci
//   A[m, k] = x[n, oh*s - p + kh, ow*s - p + kw, ci]   (0 outside the image: the padding)
//   B[k, co] = w[co, kh, kw, ci]                        (the channels_last weight is B stored K-contiguous)
//   acc[m, co] = sum_k A[m, k] * B[k, co]               (fp32 accumulation)
//   y[m, co] = act(acc[m, co] * scale[co] + shift[co] (+ residual[m, co]))   act = ReLU if relu else identity
//
// Per block: a BM x BN tile of y. The K loop walks BK-wide slices through a STAGES-deep ring of shared-memory
// buffers filled with cp.async (16-byte copies, zero-filled outside the image / past M, K or Cout) while the
// warps run WMMA on the slice loaded STAGES-1 iterations earlier: m16n16k16 for fp16/bf16, m16n16k8 TF32 for
// fp32, fp32 accumulators. The epilogue stages the accumulators through shared memory (the WMMA fragment layout
// is opaque), applies scale/shift/residual/ReLU in fp32 and writes y once, 16 bytes at a time when aligned.
//
// Generic path (kVecLoads = false): when Cin is not a multiple of 16 / sizeof(T) (the 7x7 stem's Cin = 3 or 1)
// or a pointer is not 16-byte aligned, the tiles are filled with scalar zero-filled loads instead of cp.async.
//
// Offsets into x, w, residual and y are 64-bit; per-element sizes (H, W, C, K) are 32-bit (checked on the host).
// Tile configs: SmallTile (64x64, 4 warps) for small M*Cout (batch 1, late stages) and the generic path,
// LargeTile (128x128, 8 warps) when it still gives two waves of blocks.
#include <atomic>
#include <cstdint>

#include <mma.h>

#include "device_utils.cuh"
#include "kernels.h"

namespace resnet_fused {
namespace cuda_kernels {
namespace {

namespace wmma = nvcuda::wmma;

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WARP_M = BM / WARPS_M, WARP_N = BN / WARPS_N;  // each warp's sub-tile of y
  static constexpr int FRAGS_M = WARP_M / 16, FRAGS_N = WARP_N / 16;   // 16x16 accumulator fragments
  static_assert(WARP_M % 16 == 0 && WARP_N % 16 == 0, "warp tile must be whole 16x16 fragments");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
};
using SmallTile = TileConfig<64, 64, 2, 2, 3>;
using LargeTile = TileConfig<128, 128, 2, 4, 3>;

// WMMA operand type and K step per element type: TF32 tensor cores for fp32 inputs.
template <typename T> struct Mma;
template <> struct Mma<__half> { using Operand = __half; static constexpr int K = 16; };
template <> struct Mma<__nv_bfloat16> { using Operand = __nv_bfloat16; static constexpr int K = 16; };
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <> struct Mma<float> { using Operand = wmma::precision::tf32; static constexpr int K = 8; };
#else  // pre-sm_80 device pass: no TF32 type; the kernel body is compiled out there (see __trap below)
template <> struct Mma<float> { using Operand = float; static constexpr int K = 8; };
#endif

// Shared-memory geometry per element type: every tile row holds 64 bytes of K (BK elements) plus 16 bytes of
// skew against bank conflicts; 80-byte rows keep WMMA pointers 32-byte aligned at every 16-row fragment.
template <typename T>
struct Smem {
  static constexpr int BK = 64 / sizeof(T);
  static constexpr int LDS = BK + 16 / sizeof(T);
};

struct RowInfo {         // per output pixel m of the block's tile, computed once
  long long image_base;  // n * H * W * Cin
  int ih0, iw0;          // top-left input tap: oh * stride - padding, ow * stride - padding
};
constexpr int kInvalidRow = -(1 << 30);  // ih0 of rows past M: every tap test fails, so they load zeros

struct Params {
  const void* x;
  const void* w;
  const float* scale;
  const float* shift;
  const void* residual;
  void* y;
  long long M;
  int K;
  int H, W, Cin, Cout, KW, stride, padding, Ho, Wo;
  bool relu;
  bool vec_epilogue;  // Cout % EV == 0 and y / residual 16-byte aligned
};

// fp32 operands loaded into TF32 fragments must be rounded to TF32 before mma_sync.
template <typename Fragment>
__device__ __forceinline__ void round_to_tf32(Fragment& f) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#pragma unroll
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
#endif
}

template <typename T, typename Cfg>
__host__ __device__ constexpr size_t smem_bytes() {
  constexpr size_t pipeline = size_t(Cfg::STAGES) * (Cfg::BM + Cfg::BN) * Smem<T>::LDS * sizeof(T);
  constexpr size_t staging = size_t(Cfg::BM) * (Cfg::BN + 4) * sizeof(float);
  constexpr size_t shared = pipeline > staging ? pipeline : staging;
  return (shared + 15) / 16 * 16 + size_t(Cfg::BM) * sizeof(RowInfo);
}

template <typename T, typename Cfg, bool kVecLoads>
__global__ void __launch_bounds__(Cfg::THREADS) conv_bn_act_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // tensor-core bf16/tf32 WMMA and cp.async need sm_80; the host refuses older devices first
#else
  constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES, THREADS = Cfg::THREADS;
  constexpr int BK = Smem<T>::BK, LDS = Smem<T>::LDS, LDC = BN + 4;
  constexpr int VEC = kVecLoads ? 16 / int(sizeof(T)) : 1;  // elements per load
  constexpr int CHUNKS_PER_ROW = BK / VEC;
  constexpr int ROWS_PER_PASS = THREADS / CHUNKS_PER_ROW;
  static_assert(THREADS % CHUNKS_PER_ROW == 0 && BM % ROWS_PER_PASS == 0 && BN % ROWS_PER_PASS == 0,
                "the loaders must tile the A and B slices exactly");
  constexpr int A_STAGE = BM * LDS, B_STAGE = BN * LDS;
  constexpr int MMA_K = Mma<T>::K;
  using Operand = typename Mma<T>::Operand;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + STAGES * A_STAGE;
  float* smem_c = reinterpret_cast<float*>(smem_raw);  // reuses the pipeline buffers after the K loop
  constexpr size_t kRowTableOffset = smem_bytes<T, Cfg>() - size_t(BM) * sizeof(RowInfo);
  RowInfo* rows = reinterpret_cast<RowInfo*>(smem_raw + kRowTableOffset);

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const int tid = threadIdx.x;
  const long long m0 = static_cast<long long>(blockIdx.x) * BM;
  const int n0 = blockIdx.y * BN;

  // Decode each output pixel of the tile once: m -> (n, oh, ow) -> image base and top-left input tap.
  const long long pixels_per_image = static_cast<long long>(p.Ho) * p.Wo;
  for (int r = tid; r < BM; r += THREADS) {
    const long long m = m0 + r;
    RowInfo info{0, kInvalidRow, kInvalidRow};
    if (m < p.M) {
      const long long n = m / pixels_per_image;
      const int rem = static_cast<int>(m - n * pixels_per_image);
      const int oh = rem / p.Wo, ow = rem - (rem / p.Wo) * p.Wo;
      info.image_base = n * p.H * p.W * p.Cin;
      info.ih0 = oh * p.stride - p.padding;
      info.iw0 = ow * p.stride - p.padding;
    }
    rows[r] = info;
  }
  __syncthreads();

  // Fill ring slot `stage` with K slice `k_tile`: A rows are output pixels, B rows are output channels.
  // Each thread owns one VEC-wide column chunk (fixed k) and every ROWS_PER_PASS-th row.
  const int chunk = tid % CHUNKS_PER_ROW;
  const int first_row = tid / CHUNKS_PER_ROW;
  auto load_slice = [&](int stage, int k_tile) {
    const int k = k_tile * BK + chunk * VEC;
    const bool k_ok = k < p.K;  // Cin % VEC == 0 on the vector path, so a chunk never straddles K or a tap
    const int tap = k / p.Cin;
    const int ci = k - tap * p.Cin;
    const int kh = tap / p.KW;
    const int kw = tap - kh * p.KW;
    T* a_dst = smem_a + stage * A_STAGE + chunk * VEC;
#pragma unroll
    for (int i = 0; i < BM / ROWS_PER_PASS; ++i) {
      const int r = first_row + i * ROWS_PER_PASS;
      const RowInfo info = rows[r];
      const int ih = info.ih0 + kh, iw = info.iw0 + kw;
      const bool ok = k_ok && static_cast<unsigned>(ih) < static_cast<unsigned>(p.H) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(p.W);
      const T* src = ok ? x + info.image_base + (static_cast<long long>(ih) * p.W + iw) * p.Cin + ci : x;
      if constexpr (kVecLoads) {
        cp_async_16_zfill(a_dst + r * LDS, src, ok);
      } else {
        a_dst[r * LDS] = ok ? *src : from_float<T>(0.f);
      }
    }
    T* b_dst = smem_b + stage * B_STAGE + chunk * VEC;
#pragma unroll
    for (int i = 0; i < BN / ROWS_PER_PASS; ++i) {
      const int r = first_row + i * ROWS_PER_PASS;
      const int co = n0 + r;
      const bool ok = k_ok && co < p.Cout;
      const T* src = ok ? w + static_cast<long long>(co) * p.K + k : w;
      if constexpr (kVecLoads) {
        cp_async_16_zfill(b_dst + r * LDS, src, ok);
      } else {
        b_dst[r * LDS] = ok ? *src : from_float<T>(0.f);
      }
    }
  };

  const int warp = tid / 32;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  wmma::fragment<wmma::accumulator, 16, 16, MMA_K, float> acc[Cfg::FRAGS_M][Cfg::FRAGS_N];
#pragma unroll
  for (int i = 0; i < Cfg::FRAGS_M; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::FRAGS_N; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // Multiply the slice in ring slot `stage`: A row-major [m][k], B column-major (stored [co][k]).
  auto mma_slice = [&](int stage) {
    const T* a_base = smem_a + stage * A_STAGE + (warp_m * Cfg::WARP_M) * LDS;
    const T* b_base = smem_b + stage * B_STAGE + (warp_n * Cfg::WARP_N) * LDS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += MMA_K) {
      wmma::fragment<wmma::matrix_a, 16, 16, MMA_K, Operand, wmma::row_major> a[Cfg::FRAGS_M];
      wmma::fragment<wmma::matrix_b, 16, 16, MMA_K, Operand, wmma::col_major> b[Cfg::FRAGS_N];
#pragma unroll
      for (int i = 0; i < Cfg::FRAGS_M; ++i) {
        wmma::load_matrix_sync(a[i], a_base + i * 16 * LDS + kk, LDS);
        if constexpr (sizeof(T) == 4) round_to_tf32(a[i]);
      }
#pragma unroll
      for (int j = 0; j < Cfg::FRAGS_N; ++j) {
        wmma::load_matrix_sync(b[j], b_base + j * 16 * LDS + kk, LDS);
        if constexpr (sizeof(T) == 4) round_to_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < Cfg::FRAGS_M; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::FRAGS_N; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  };

  // Pipeline: slices 0..STAGES-2 in flight before the loop; iteration t waits for slice t, issues slice
  // t+STAGES-1 into the slot freed by iteration t-1 (every warp is past it: the barrier), then multiplies t.
  // One commit per slice (empty groups past the end) keeps the wait count exact.
  const int k_tiles = (p.K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_slice(s, s);
    cp_async_commit();
  }
  for (int t = 0; t < k_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = t + STAGES - 1;
    if (next < k_tiles) load_slice(next % STAGES, next);
    cp_async_commit();
    mma_slice(t % STAGES);
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with the ring before the accumulators overwrite it

  // Epilogue: accumulators -> shared (fp32, row-major [m][co]) -> scale, shift, residual, ReLU -> y.
#pragma unroll
  for (int i = 0; i < Cfg::FRAGS_M; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::FRAGS_N; ++j) {
      float* dst = smem_c + (warp_m * Cfg::WARP_M + i * 16) * LDC + warp_n * Cfg::WARP_N + j * 16;
      wmma::store_matrix_sync(dst, acc[i][j], LDC, wmma::mem_row_major);
    }
  __syncthreads();

  const T* __restrict__ residual = static_cast<const T*>(p.residual);
  T* __restrict__ y = static_cast<T*>(p.y);
  if (p.vec_epilogue) {
    constexpr int EV = VecWidth<T>::value;
    constexpr int VECS_PER_ROW = BN / EV;
    for (int i = tid; i < BM * VECS_PER_ROW; i += THREADS) {
      const int r = i / VECS_PER_ROW;
      const int c = (i - r * VECS_PER_ROW) * EV;
      const long long m = m0 + r;
      const int co = n0 + c;
      if (m >= p.M || co >= p.Cout) continue;  // Cout % EV == 0: a vector is wholly in or out
      const long long offset = m * p.Cout + co;
      float v[EV];
      float res[EV];
      if (residual != nullptr) unpack<T>(load128(residual + offset), res);
#pragma unroll
      for (int e = 0; e < EV; ++e) {
        float out = smem_c[r * LDC + c + e] * __ldg(p.scale + co + e) + __ldg(p.shift + co + e);
        if (residual != nullptr) out += res[e];
        v[e] = p.relu ? relu_keep_nan(out) : out;
      }
      store128(y + offset, pack<T>(v));
    }
  } else {
    for (int i = tid; i < BM * BN; i += THREADS) {
      const int r = i / BN;
      const int c = i - r * BN;
      const long long m = m0 + r;
      const int co = n0 + c;
      if (m >= p.M || co >= p.Cout) continue;
      const long long offset = m * p.Cout + co;
      float out = smem_c[r * LDC + c] * __ldg(p.scale + co) + __ldg(p.shift + co);
      if (residual != nullptr) out += to_float(residual[offset]);
      y[offset] = from_float<T>(p.relu ? relu_keep_nan(out) : out);
    }
  }
#endif
}

template <typename T, typename Cfg, bool kVecLoads>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<T, Cfg>();
  auto kernel = conv_bn_act_kernel<T, Cfg, kVecLoads>;
  static std::atomic<bool> opted_in[kMaxCachedDevices] = {};
  const cudaError_t err = opt_in_dynamic_smem(kernel, smem, opted_in);
  if (err != cudaSuccess) return err;
  const long long grid_m = (p.M + Cfg::BM - 1) / Cfg::BM;
  const int grid_n = (p.Cout + Cfg::BN - 1) / Cfg::BN;
  if (grid_m > 0x7fffffffLL || grid_n > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n)), Cfg::THREADS, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_shape(const ConvBnActArgs& a, cudaStream_t stream) {
  constexpr int EV = VecWidth<T>::value;
  Params p{};
  p.x = a.x;
  p.w = a.weight;
  p.scale = a.scale;
  p.shift = a.shift;
  p.residual = a.residual;
  p.y = a.y;
  p.M = static_cast<long long>(a.n) * a.h_out * a.w_out;
  p.K = a.kh * a.kw * a.c_in;
  p.H = a.h;
  p.W = a.w;
  p.Cin = a.c_in;
  p.Cout = a.c_out;
  p.KW = a.kw;
  p.stride = a.stride;
  p.padding = a.padding;
  p.Ho = a.h_out;
  p.Wo = a.w_out;
  p.relu = a.relu;
  p.vec_epilogue = a.c_out % EV == 0 && aligned16(a.y) && (a.residual == nullptr || aligned16(a.residual));

  const bool vec_loads = a.c_in % EV == 0 && aligned16(a.x) && aligned16(a.weight);
  if (!vec_loads) return launch<T, SmallTile, false>(p, stream);
  // Large tiles only when they still make two full waves; otherwise (batch 1, late stages) the small tile
  // keeps every SM busy.
  const long long large_blocks = ((p.M + LargeTile::BM - 1) / LargeTile::BM) *
                                 ((p.Cout + LargeTile::BN - 1) / LargeTile::BN);
  if (p.Cout >= LargeTile::BN && large_blocks >= 2LL * current_sm_count()) {
    return launch<T, LargeTile, true>(p, stream);
  }
  return launch<T, SmallTile, true>(p, stream);
}

// Explicit instantiations of every kernel the dispatcher above can launch.
#define RF_INSTANTIATE(T)                                                         \
  template __global__ void conv_bn_act_kernel<T, SmallTile, false>(const Params); \
  template __global__ void conv_bn_act_kernel<T, SmallTile, true>(const Params);  \
  template __global__ void conv_bn_act_kernel<T, LargeTile, true>(const Params);
RF_INSTANTIATE(float)
RF_INSTANTIATE(__half)
RF_INSTANTIATE(__nv_bfloat16)
#undef RF_INSTANTIATE

}  // namespace

cudaError_t conv_bn_act_wmma(DType dtype, const ConvBnActArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return launch_for_shape<float>(a, stream);
    case DType::Float16: return launch_for_shape<__half>(a, stream);
    case DType::BFloat16: return launch_for_shape<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernels
}  // namespace resnet_fused
