// Winograd F(2x2, 3x3) convolution on the CPU (fp32, 3x3 kernel, stride 1, padding 1, channels_last): the layout
// and transform kernels (isa/winograd_f2_avx2.cpp) of the op in winograd_f2.cpp. Per 2x2 output tile, with d the 4x4
// input tile around it (rows 2 ty - 1 .. 2 ty + 2, columns 2 tx - 1 .. 2 tx + 2, zero outside x) and w[k, c] the 3x3
// kernel (Lavin and Gray, 2016, interpolation points 0, +-1, infinity):
//
//   y[k] = A^T ( sum_c (G w[k, c] G^T) (.) (B^T d[c] B) ) A + bias[k] (+ residual), ReLU if asked
//
//   B^T = [1  0 -1  0]    G = [ 1    0    0 ]    A^T = [1  1  1  0]
//         [0  1  1  0]        [1/2  1/2  1/2]          [0  1 -1 -1]
//         [0 -1  1  0]        [1/2 -1/2  1/2]
//         [0  1  0 -1]        [ 0    0    1 ]
//
// The sum over c is 16 matrix products, one per position p = (i, j) of the 4x4 transformed tiles:
//   V[p]: (tiles, C) = (B^T d B)[i, j];  U[p]: (C, K) = (G w G^T)[i, j];  M[p] = V[p] @ U[p]
// V and M are position-major, (16, tiles, C) and (16, tiles, K), so that each product reads and writes dense
// matrices. Against F(4x4, 3x3) (winograd.cpp) this costs 4 multiply-adds per output and input channel instead of
// 2.25, but its transformed weight is 16/9 of the weight, not 36/9, and its transforms only add: where the transformed
// weight is read from memory for few tiles (late stages at small batches) it is the faster of the two, and its
// rounding is close to a direct convolution's (A, B and G hold only 0, +-1 and +-1/2). B^T's columns and A^T's rows
// hold exact zeros where an output's window ends (in one dimension y0 reads d0 .. d2 only, y1 d1 .. d3 only), so a NaN
// input makes NaN exactly where a direct convolution's does; an infinite one can make NaN there where it gives +-inf.
#pragma once

#include <cstdint>

namespace resnet_fused::cpu::winograd_f2 {

constexpr int64_t kPositions = 16;  // of a 4x4 transformed tile
constexpr int64_t kOut = 2;         // output tile side

// The tile grid over (N, H, W): rows x cols tiles per image.
struct Tiles {
  int64_t n, h, w, rows, cols;
  int64_t count() const { return n * rows * cols; }
};

#ifdef RESNET_FUSED_X86_KERNELS  // setup.py builds isa/ kernels on x86-64 only
// V[p, t, c] = (B^T d B)[p] for tiles [begin, end) of channels_last x (V position-major over all g.count() tiles).
void input_transform_avx2(const float* x, float* v, const Tiles& g, int64_t channels, int64_t begin, int64_t end);

// y = act(A^T M A + bias (+ residual)) for tiles [begin, end), stored where the tile lies inside y (channels_last);
// residual may be nullptr, and y may be residual (each output reads its residual once, just before it is written).
void output_transform_avx2(const float* m, const float* bias, const float* residual, float* y, const Tiles& g,
                           int64_t channels, bool relu, int64_t begin, int64_t end);
#endif

}  // namespace resnet_fused::cpu::winograd_f2
