// Fragment index math of the warp-level tensor-core instruction
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// written once, __host__ __device__ and torch-free, so that the CUDA kernels
// (masked_patch_attention.cu) and a plain g++ emulation test
// (tests/mma_layout_emulation.cpp, run by tests/test_cuda_mma_layout.py) use the
// same code.
//
// Layouts from the PTX ISA, section "Matrix Fragments for mma.m16n8k16 with
// floating point type" (.f16 / .bf16 multiplicands, .f32 accumulators), with
//   groupID = laneid >> 2,  threadID_in_group = laneid % 4:
//   A (16 x 16, row-major), 4 .b32 registers = 8 elements a0..a7:
//     row = groupID       for a_i, 0 <= i < 2 or 4 <= i < 6;  groupID + 8 otherwise
//     col = tig * 2 + (i & 1)  for i < 4;  tig * 2 + (i & 1) + 8  for i >= 4
//   B (16 x 8, K x N, "col"), 2 .b32 registers = 4 elements b0..b3:
//     row (k) = tig * 2 + (i & 1)  for i < 2;  tig * 2 + (i & 1) + 8  for i >= 2
//     col (n) = groupID
//   C / D (16 x 8, .f32), 4 registers c0..c3:
//     row = groupID for c0, c1;  groupID + 8 for c2, c3
//     col = tig * 2 + (i & 1)
// A .f16x2 / .bf16x2 register holds element 2r in its low 16 bits and element
// 2r + 1 in its high 16 bits (register r of A holds a_{2r}, a_{2r+1}).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MAEP_MMA_HD __host__ __device__ __forceinline__
#else
#define MAEP_MMA_HD inline
#endif

namespace maep_fast {
namespace cuda {
namespace mma {

constexpr int kM = 16;  // rows of A / C
constexpr int kN = 8;   // columns of B / C
constexpr int kK = 16;  // reduction

MAEP_MMA_HD int group_id(int lane) { return lane >> 2; }
MAEP_MMA_HD int tig(int lane) { return lane & 3; }

// ---- element ownership (i = element index within the lane's fragment) ----
// A: i in 0..7
MAEP_MMA_HD int a_row(int lane, int i) { return group_id(lane) + (((i >> 1) & 1) ? 8 : 0); }
MAEP_MMA_HD int a_col(int lane, int i) { return tig(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0); }
// B: i in 0..3; b_k = row of the K x N operand, b_n = its column
MAEP_MMA_HD int b_k(int lane, int i) { return tig(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0); }
MAEP_MMA_HD int b_n(int lane, int /*i*/) { return group_id(lane); }
// C / D: i in 0..3
MAEP_MMA_HD int c_row(int lane, int i) { return group_id(lane) + (i >= 2 ? 8 : 0); }
MAEP_MMA_HD int c_col(int lane, int i) { return tig(lane) * 2 + (i & 1); }
// Which of the lane's two accumulator rows (0: groupID, 1: groupID + 8) c_i is in.
// The four lanes of a quad (same groupID, lanes 4g .. 4g+3) share these rows:
// row reductions over a C tile are a shuffle-xor over lane bits 1 and 2.
MAEP_MMA_HD int c_half(int i) { return i >> 1; }

// ---- accumulator -> A operand (flash-attention's register reuse) ----
// The C fragments of two adjacent 16 x 8 tiles (columns 16kc .. 16kc+7 and
// 16kc+8 .. 16kc+15) hold exactly the elements the lane owns of the 16 x 16 A
// fragment of k-chunk kc: A register r = (C tile 2kc + c2a_tile(r),
// elements c2a_elem(r) [low half] and c2a_elem(r) + 1 [high half]).
MAEP_MMA_HD int c2a_tile(int r) { return r >> 1; }
MAEP_MMA_HD int c2a_elem(int r) { return (r & 1) * 2; }

// ---- loads of .b32 operand registers from 16-bit storage (shared memory) ----
// 32-bit read of two adjacent 16-bit elements (p is 4-byte aligned: every
// caller passes an even element offset from a 4-byte aligned base with an even stride).
MAEP_MMA_HD uint32_t ld_u32(const uint16_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
MAEP_MMA_HD uint32_t pack_u16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// A register r (0..3) of the 16 x 16 tile whose (0, 0) element is tile[0],
// stored row-major [m][k] with row stride `stride` elements.
MAEP_MMA_HD uint32_t load_a_reg(const uint16_t* tile, int stride, int lane, int r) {
  return ld_u32(tile + a_row(lane, 2 * r) * stride + a_col(lane, 2 * r));
}
// B register r (0..1) of the 16 x 8 (K x N) tile stored as [n][k] (B^T row-major,
// e.g. K rows for S = Q K^T): the pair (k, k+1) is contiguous -> one 32-bit load.
MAEP_MMA_HD uint32_t load_b_reg_nk(const uint16_t* tile, int stride, int lane, int r) {
  return ld_u32(tile + b_n(lane, 2 * r) * stride + b_k(lane, 2 * r));
}
// B register r (0..1) of the 16 x 8 (K x N) tile stored as [k][n] (B row-major,
// e.g. V rows for O = P V): the pair (k, k+1) is a column pair -> two 16-bit loads.
MAEP_MMA_HD uint32_t load_b_reg_kn(const uint16_t* tile, int stride, int lane, int r) {
  const int k = b_k(lane, 2 * r), n = b_n(lane, 2 * r);
  return pack_u16(tile[k * stride + n], tile[(k + 1) * stride + n]);
}

}  // namespace mma
}  // namespace cuda
}  // namespace maep_fast
