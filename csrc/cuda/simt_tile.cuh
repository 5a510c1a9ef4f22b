// The CUDA-core (FFMA) dot-product tile shared by the SIMT paths of the score kernel family
// (score_kernel.cuh: Q K^T of fp32 inputs and head dims without a tensor-core path) and of
// value_norm (value_norm.cu: V W_o^T of fp32 inputs). A correctness path: no tensor cores, no
// asynchronous copies, any head dim, any alignment.
//
//   acc[ii][jj] = a[row0 + 4 ty + ii] . b[col0 + tx + 16 jj]   (fp32, ty = tid / 16, tx = tid % 16)
//
// over the D elements of each row, staged through shared memory kSimtDK elements at a time.
// Rows of `a` at or past a_rows and rows of `b` outside [b_lo, b_hi) read as zero (so their
// products are exactly 0), and neither is ever addressed.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace adakv {
namespace cuda {

constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kSimtTile = 64;      // rows of a / rows of b per tile
constexpr int kSimtDK = 32;        // D slice staged in shared memory

struct SimtTileSmem {
  float a[kSimtTile][kSimtDK + 1];
  float b[kSimtTile][kSimtDK + 1];
};

// Block-wide: every thread of the kSimtThreads must call it (two barriers per D slice; the last
// one lets the caller reuse `sm` and anything written before the call is visible after it).
template <typename T>
__device__ __forceinline__ void simt_dot_tile(const T* a, int64_t a_stride, int row0, int a_rows,
                                              const T* b, int64_t b_stride, int col0, int b_lo,
                                              int b_hi, int D, SimtTileSmem& sm,
                                              float (&acc)[4][4]) {
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
#pragma unroll
  for (int ii = 0; ii < 4; ++ii)
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = 0.f;
  for (int d0 = 0; d0 < D; d0 += kSimtDK) {
    for (int e = tid; e < kSimtTile * kSimtDK; e += kSimtThreads) {
      const int r = e / kSimtDK, d = e % kSimtDK;
      const int row = row0 + r, col = col0 + r, dd = d0 + d;
      // bounds: rows of a in [0, a_rows), rows of b in [b_lo, b_hi), dims < D.
      sm.a[r][d] = (row < a_rows && dd < D) ? to_float(a[static_cast<int64_t>(row) * a_stride + dd])
                                            : 0.f;
      sm.b[r][d] = (col >= b_lo && col < b_hi && dd < D)
                       ? to_float(b[static_cast<int64_t>(col) * b_stride + dd])
                       : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int d = 0; d < kSimtDK; ++d) {
      float x[4], y[4];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii) x[ii] = sm.a[ty * 4 + ii][d];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) y[jj] = sm.b[tx + 16 * jj][d];
#pragma unroll
      for (int ii = 0; ii < 4; ++ii)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[ii][jj] = fmaf(x[ii], y[jj], acc[ii][jj]);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace adakv
