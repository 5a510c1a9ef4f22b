// Tensor-core and async-copy helpers (inline PTX, sm_80+; they also run on sm_90):
//   smem_u32          generic -> shared-window address
//   ldmatrix_x4       four 8x8 b16 matrices from shared memory into mma fragments
//   ldmatrix_x4_trans the same, each 8x8 matrix transposed (V as the B operand of P V)
//   mma_16816         mma.sync.m16n8k16 row.col, fp16 / bf16 inputs, fp32 accumulate; plain
//                     `asm` (no side effects) so the compiler may schedule it
//   cp_async_16       16-byte global -> shared async copy with zero fill
//   fast_exp2         ex2.approx.ftz.f32 (2 ulp; subnormal results flush to zero)
//   swizzle_offset    XOR swizzle of 16-byte chunks for row-major [rows][D] b16 tiles, so that
//                     ldmatrix (8 rows, one chunk column) and row-wise cp.async are both
//                     free of shared-memory bank conflicts (needs D >= 64).
//   ldsm_a_offsets /  per-lane ldmatrix_x4 offsets into such a tile for the A operand (16 rows
//   ldsm_b_offsets    x 16 k, row-major) and the B operand ([n][k]: 16 n x 16 k, two n8 tiles)
// The shared-memory asm (ldmatrix, cp.async and its commit / wait) clobbers "memory", so the
// compiler keeps ordinary shared-memory loads and stores on their side of it.
// Used by the score (score_kernel.cuh), value-norm (value_norm.cu) and decode (decode_kernel.cuh)
// kernels; decode_gemm.cu takes smem_u32 (its MMAs are hopper.cuh's wgmma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace adakv {
namespace cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of 16-byte chunk `chunk` (8 b16 elements) of row `row` in a [rows][D] tile of
// 16-bit elements: chunk index XOR (row % 8) inside each row.
template <int D>
__device__ __forceinline__ uint32_t swizzle_offset(int row, int chunk) {
  static_assert(D % 64 == 0, "swizzle needs rows of at least 8 chunks");
  return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
}

// ldmatrix_x4 addresses inside a swizzled [rows][D] b16 tile (swizzle_offset), relative to the
// first row of a 16-row block (add block_row * D * 2): k-step kk = 4 a + c (16 k each) reads at
// off[c] + a * 128. In both operands lane reads a row whose index is lane % 8 modulo 8, so the
// swizzled chunk 2 kk + hi of k-step kk is 8 a + ((2 c) ^ y) with a per-lane y = hi ^ (lane % 8):
// four offsets per operand, the rest are immediates.
//   A (mma row-major 16 x 16, registers a0..a3 = rows 0-7 / 8-15 x k 0-7 / 8-15): lane reads row
//     lane % 16, chunk 2 kk + lane / 16.
//   B ([n][k] rows, i.e. "col" 16 k x 16 n: registers {0, 1} = n 0-7, {2, 3} = n 8-15, each
//     k 0-7 / 8-15): lane reads row 8 (lane / 16) + lane % 8, chunk 2 kk + (lane / 8) % 2.
template <int D>
__device__ __forceinline__ void ldsm_a_offsets(uint32_t (&off)[4], int lane) {
  static_assert(D % 64 == 0, "swizzled tiles need rows of at least 8 chunks");
  const int y = (lane >> 4) ^ (lane & 7);
  const uint32_t row = static_cast<uint32_t>(lane & 15) * D * 2;
#pragma unroll
  for (int c = 0; c < 4; ++c) off[c] = row + (((2 * c) ^ y) << 4);
}

template <int D>
__device__ __forceinline__ void ldsm_b_offsets(uint32_t (&off)[4], int lane) {
  static_assert(D % 64 == 0, "swizzled tiles need rows of at least 8 chunks");
  const int y = ((lane >> 3) & 1) ^ (lane & 7);
  const uint32_t row = static_cast<uint32_t>(((lane >> 4) & 1) * 8 + (lane & 7)) * D * 2;
#pragma unroll
  for (int c = 0; c < 4; ++c) off[c] = row + (((2 * c) ^ y) << 4);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d += a * b for one 16x8x16 tile (A row-major 16x16, B "col" = [n][k] row-major 8x16).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte async copy; src_bytes == 0 writes 16 zero bytes and reads nothing (gptr must still
// be a valid address expression, callers pass the tensor base then).
__device__ __forceinline__ void cp_async_16(uint32_t saddr, const void* gptr, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gptr),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuda
}  // namespace adakv
