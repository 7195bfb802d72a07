// Torch-free CUDA kernels of maep_fast::masked_patch_attention_fwd / _bwd;
// see masked_patch_attention.cuh.
//
// fp16 / bf16: tensor cores (mma.sync.m16n8k16, fp32 accumulation; sm_80+,
// also what runs on sm_90), flash-attention-2 structure:
//   fwd   grid = B*H*ceil(L/64) blocks of 4 warps; a block owns 64 query rows
//         (visible order: row r of the block is query vis[b, q0 + r]), a warp
//         16 of them with its Q fragments in registers. Key/value tiles of 64
//         rows are gathered through vis into shared memory (row stride DP + 8
//         halves, DP = D rounded up to 16, zero-filled beyond D and beyond the
//         visible count). S = Q K^T, online softmax in fp32 (exp2 domain, row
//         max/sum over the quad of lanes sharing a row), P re-used from the
//         accumulators as the A operand of O += P V; out = O / l, lse = m + log l.
//   bwd   delta = rowsum(dO * O) (one warp per visible row); then two
//         deterministic kernels (no atomics):
//         dq    64 query rows per block (Q, dO fragments in registers), key
//               tiles of 32: S = Q K^T, P = exp(S - lse), dP = dO V^T,
//               dS = P (dP - delta), dQ += dS K;
//         dkdv  64 key rows per block (K, V tiles in shared memory), query
//               tiles of 32: S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO,
//               dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//   Keep masks shrink the work: every kernel loops over ceil(count[b] / tile)
//   tiles of the sample's visible rows only, and blocks whose first row is
//   past count[b] exit at once (a sample with no visible row: every block).
//   Warps whose 16 rows are all past count skip the math (they still help load).
// fp32: the exact scalar kernels (one warp per row, fp32 FMA; below).
// Fragment index math: kernels/mma_layout.cuh (host-tested by
// tests/test_cuda_mma_layout.py).
// Hidden rows are never touched (the caller zero-fills them).
#include "masked_patch_attention.cuh"
#include "mma_layout.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace maep_fast {
namespace cuda {
namespace {

// =====================================================================================
// fp32: exact scalar kernels. Grid (B*H, ceil(L / kWarps)); a block of kWarps warps
// owns kWarps visible rows of one (b, h), one warp per row (its own vector staged in
// shared memory, its accumulators in registers: lane owns d = lane + 32*t). The other
// side's visible rows stream through shared memory in tiles of 32 (rows padded to
// kLd = kMaxD + 1 floats: conflict-free), lane j of a warp handles tile row j.
//   fwd:  rows = queries, tiles = keys + values, online softmax (m, l, acc).
//   bwd:  delta (one warp per query row, all dtypes); dq kernel: rows = queries;
//         dkdv kernel: rows = keys, tiles = queries + dO (+ lse, delta).
// =====================================================================================
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;  // one tile row per lane
constexpr int kMaxD = kMpaMaxHeadDim;
constexpr int kPerLane = kMaxD / 32;
constexpr int kLd = kMaxD + 1;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T st(float v);
template <>
__device__ __forceinline__ float st<float>(float v) {
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ int64_t vis_row(const int32_t* vis, int64_t b, int64_t L, int64_t r) {
  return vis != nullptr ? static_cast<int64_t>(vis[b * L + r]) : r;
}

template <typename T>
__device__ __forceinline__ void load_row(float* dst, const T* src, int64_t D, int lane) {
  for (int64_t d = lane; d < D; d += 32) dst[d] = ld(src[d]);
}

// Rows c0 .. c0+kTile-1 (visible order) of src [L, D] into tile [kTile][kLd]; all threads.
template <typename T>
__device__ __forceinline__ void load_tile(float* tile, const T* src, const int32_t* vis, int64_t b, int64_t L,
                                          int64_t D, int64_t c0, int64_t nv) {
  for (int64_t idx = threadIdx.x; idx < kTile * D; idx += kThreads) {
    const int64_t rr = idx / D;
    const int64_t d = idx - rr * D;
    if (c0 + rr < nv) tile[rr * kLd + d] = ld(src[vis_row(vis, b, L, c0 + rr) * D + d]);
  }
}

__device__ __forceinline__ float dot_tile(const float* own, const float* tile_row, int64_t D) {
  float a = 0.f;
  for (int64_t d = 0; d < D; ++d) a += own[d] * tile_row[d];
  return a;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mpa_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                            const T* __restrict__ v, T* __restrict__ out,
                                                            float* __restrict__ lse, const int32_t* __restrict__ vis,
                                                            const int32_t* __restrict__ count, int64_t H, int64_t L,
                                                            int64_t D, float scale) {
  __shared__ float own[kWarps][kMaxD];
  __shared__ float ks[kTile * kLd];
  __shared__ float vs[kTile * kLd];
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H;
  const int64_t nv = count != nullptr ? static_cast<int64_t>(count[b]) : L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (static_cast<int64_t>(blockIdx.y) * kWarps >= nv) return;  // block-uniform
  const bool active = r < nv;                                    // warp-uniform
  const int64_t row = active ? vis_row(vis, b, L, r) : 0;
  const int64_t base = bh * L * D;
  if (active) load_row(own[warp], q + base + row * D, D, lane);
  float m = -INFINITY, lsum = 0.f;
  float acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0.f;
  for (int64_t c0 = 0; c0 < nv; c0 += kTile) {
    __syncthreads();
    load_tile(ks, k + base, vis, b, L, D, c0, nv);
    load_tile(vs, v + base, vis, b, L, D, c0, nv);
    __syncthreads();
    if (!active) continue;
    const bool valid = c0 + lane < nv;
    const float s = valid ? dot_tile(own[warp], ks + lane * kLd, D) * scale : -INFINITY;
    const float mnew = fmaxf(m, warp_max(s));  // finite: tile row 0 is valid
    const float alpha = expf(m - mnew);        // m = -inf -> 0
    const float pj = valid ? expf(s - mnew) : 0.f;
    lsum = lsum * alpha + warp_sum(pj);
    const int nt = static_cast<int>(nv - c0 < kTile ? nv - c0 : kTile);
#pragma unroll
    for (int t = 0; t < kPerLane; ++t) acc[t] *= alpha;
    for (int jj = 0; jj < nt; ++jj) {
      const float pb = __shfl_sync(kFull, pj, jj);
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) acc[t] += pb * vs[jj * kLd + d];
      }
    }
    m = mnew;
  }
  if (!active) return;
  const float inv = 1.f / lsum;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) out[base + row * D + d] = st<T>(acc[t] * inv);
  }
  if (lane == 0) lse[bh * L + row] = m + logf(lsum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mpa_delta_kernel(const T* __restrict__ go, const T* __restrict__ o,
                                                              float* __restrict__ delta,
                                                              const int32_t* __restrict__ vis,
                                                              const int32_t* __restrict__ count, int64_t H, int64_t L,
                                                              int64_t D) {
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H;
  const int64_t nv = count != nullptr ? static_cast<int64_t>(count[b]) : L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (r >= nv) return;  // warp-uniform
  const int64_t row = vis_row(vis, b, L, r);
  const int64_t off = (bh * L + row) * D;
  float a = 0.f;
  for (int64_t d = lane; d < D; d += 32) a += ld(go[off + d]) * ld(o[off + d]);
  a = warp_sum(a);
  if (lane == 0) delta[bh * L + row] = a;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mpa_dq_kernel(const T* __restrict__ go, const T* __restrict__ q,
                                                           const T* __restrict__ k, const T* __restrict__ v,
                                                           const float* __restrict__ lse,
                                                           const float* __restrict__ delta, T* __restrict__ dq,
                                                           const int32_t* __restrict__ vis,
                                                           const int32_t* __restrict__ count, int64_t H, int64_t L,
                                                           int64_t D, float scale) {
  __shared__ float own_q[kWarps][kMaxD];
  __shared__ float own_g[kWarps][kMaxD];
  __shared__ float ks[kTile * kLd];
  __shared__ float vs[kTile * kLd];
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H;
  const int64_t nv = count != nullptr ? static_cast<int64_t>(count[b]) : L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (static_cast<int64_t>(blockIdx.y) * kWarps >= nv) return;
  const bool active = r < nv;
  const int64_t row = active ? vis_row(vis, b, L, r) : 0;
  const int64_t base = bh * L * D;
  if (active) {
    load_row(own_q[warp], q + base + row * D, D, lane);
    load_row(own_g[warp], go + base + row * D, D, lane);
  }
  const float li = active ? lse[bh * L + row] : 0.f;
  const float di = active ? delta[bh * L + row] : 0.f;
  float acc[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc[t] = 0.f;
  for (int64_t c0 = 0; c0 < nv; c0 += kTile) {
    __syncthreads();
    load_tile(ks, k + base, vis, b, L, D, c0, nv);
    load_tile(vs, v + base, vis, b, L, D, c0, nv);
    __syncthreads();
    if (!active) continue;
    float ds = 0.f;
    if (c0 + lane < nv) {
      const float p = expf(dot_tile(own_q[warp], ks + lane * kLd, D) * scale - li);
      const float dp = dot_tile(own_g[warp], vs + lane * kLd, D);
      ds = p * (dp - di);
    }
    const int nt = static_cast<int>(nv - c0 < kTile ? nv - c0 : kTile);
    for (int jj = 0; jj < nt; ++jj) {
      const float db = __shfl_sync(kFull, ds, jj);
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) acc[t] += db * ks[jj * kLd + d];
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) dq[base + row * D + d] = st<T>(acc[t] * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) mpa_dkdv_kernel(const T* __restrict__ go, const T* __restrict__ q,
                                                             const T* __restrict__ k, const T* __restrict__ v,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ delta, T* __restrict__ dk,
                                                             T* __restrict__ dv, const int32_t* __restrict__ vis,
                                                             const int32_t* __restrict__ count, int64_t H, int64_t L,
                                                             int64_t D, float scale) {
  __shared__ float own_k[kWarps][kMaxD];
  __shared__ float own_v[kWarps][kMaxD];
  __shared__ float qs[kTile * kLd];
  __shared__ float gs[kTile * kLd];
  __shared__ float tl[kTile];
  __shared__ float td[kTile];
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H;
  const int64_t nv = count != nullptr ? static_cast<int64_t>(count[b]) : L;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (static_cast<int64_t>(blockIdx.y) * kWarps >= nv) return;
  const bool active = r < nv;
  const int64_t row = active ? vis_row(vis, b, L, r) : 0;
  const int64_t base = bh * L * D;
  if (active) {
    load_row(own_k[warp], k + base + row * D, D, lane);
    load_row(own_v[warp], v + base + row * D, D, lane);
  }
  float acc_k[kPerLane], acc_v[kPerLane];
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) acc_k[t] = acc_v[t] = 0.f;
  for (int64_t c0 = 0; c0 < nv; c0 += kTile) {
    __syncthreads();
    load_tile(qs, q + base, vis, b, L, D, c0, nv);
    load_tile(gs, go + base, vis, b, L, D, c0, nv);
    if (threadIdx.x < kTile && c0 + threadIdx.x < nv) {
      const int64_t qi = vis_row(vis, b, L, c0 + threadIdx.x);
      tl[threadIdx.x] = lse[bh * L + qi];
      td[threadIdx.x] = delta[bh * L + qi];
    }
    __syncthreads();
    if (!active) continue;
    float p = 0.f, ds = 0.f;
    if (c0 + lane < nv) {
      p = expf(dot_tile(own_k[warp], qs + lane * kLd, D) * scale - tl[lane]);
      const float dp = dot_tile(own_v[warp], gs + lane * kLd, D);
      ds = p * (dp - td[lane]);
    }
    const int nt = static_cast<int>(nv - c0 < kTile ? nv - c0 : kTile);
    for (int ii = 0; ii < nt; ++ii) {
      const float pb = __shfl_sync(kFull, p, ii);
      const float db = __shfl_sync(kFull, ds, ii);
#pragma unroll
      for (int t = 0; t < kPerLane; ++t) {
        const int64_t d = lane + 32 * t;
        if (d < D) {
          acc_v[t] += pb * gs[ii * kLd + d];
          acc_k[t] += db * qs[ii * kLd + d];
        }
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int t = 0; t < kPerLane; ++t) {
    const int64_t d = lane + 32 * t;
    if (d < D) {
      dk[base + row * D + d] = st<T>(acc_k[t] * scale);
      dv[base + row * D + d] = st<T>(acc_v[t]);
    }
  }
}


// =====================================================================================
// fp16 / bf16: tensor-core kernels
// =====================================================================================
namespace tc {

namespace mma = ::maep_fast::cuda::mma;

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kRowsPerWarp = mma::kM;                // 16
constexpr int kBlockRows = kTcWarps * kRowsPerWarp;  // 64 rows owned per block
constexpr int kFwdKeys = 64;                         // keys per forward tile
constexpr int kDqKeys = 32;                          // keys per dq tile
constexpr int kDkvQueries = 32;                      // queries per dkdv tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory row stride (elements) of a tile with padded head dim DP: DP + 8
// halves = DP/2 + 4 words, == 4 (mod 8) words for DP % 16 == 0, so the 8 rows a
// fragment load touches (groupID) fall in distinct 4-bank groups: conflict-free.
template <int DP>
struct Tile {
  static constexpr int kStride = DP + 8;
};

template <typename T>
struct TcOps;
template <>
struct TcOps<__half> {
  // d += a b, m16n8k16, fp16 inputs, fp32 accumulation (layouts: mma_layout.cuh)
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  // (lo, hi) -> .f16x2 with lo in the low 16 bits
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static __half st(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float ld(__half v) { return __half2float(v); }
};
template <>
struct TcOps<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  __device__ __forceinline__ static __nv_bfloat16 st(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <typename T>
__device__ __forceinline__ const uint16_t* u16(const T* p) {
  return reinterpret_cast<const uint16_t*>(p);
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Global row of visible position r of sample b (vis_b = vis + b*L, or nullptr: all visible).
__device__ __forceinline__ int64_t grow(const int32_t* vis_b, int r) {
  return vis_b != nullptr ? static_cast<int64_t>(vis_b[r]) : static_cast<int64_t>(r);
}

// Gather visible rows r0 .. r0+ROWS-1 of src ([L, D] of one (b, h)) into the smem tile
// [ROWS][DP + 8]; rows >= nv and columns >= D are zero-filled (columns DP .. DP+7 are
// never read). vec: D % 8 == 0 and src 16-byte aligned -> 16-byte loads. All threads.
template <typename T, int DP, int ROWS>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ src, const int32_t* vis_b, int r0,
                                          int nv, int D, bool vec) {
  constexpr int S = Tile<DP>::kStride;
  if (vec) {
    constexpr int kChunks = DP / 8;  // 8 halves = 16 bytes
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kTcThreads) {
      const int rr = idx / kChunks, c = (idx - rr * kChunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + rr < nv && c < D) val = *reinterpret_cast<const uint4*>(src + grow(vis_b, r0 + rr) * D + c);
      *reinterpret_cast<uint4*>(s + rr * S + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * DP; idx += kTcThreads) {
      const int rr = idx / DP, c = idx - rr * DP;
      T val = TcOps<T>::st(0.f);
      if (r0 + rr < nv && c < D) val = src[grow(vis_b, r0 + rr) * D + c];
      s[rr * S + c] = val;
    }
  }
}

// A fragments (16 rows x DP) of rows row0.. of a smem tile, one per 16-wide k-chunk.
template <typename T, int DP>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[DP / 16][4], const T* s, int row0, int lane) {
  constexpr int S = Tile<DP>::kStride;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) a[kk][r] = mma::load_a_reg(u16(s) + row0 * S + kk * 16, S, lane, r);
}

// acc[nt] (16 x NCOLS) += A (16 x DP, registers) * B, B^T = rows n0.. of a smem tile
// stored [n][k] (K or V rows: S = Q K^T, dP = dO V^T).
template <typename T, int DP, int NCOLS>
__device__ __forceinline__ void mma_a_regs_b_nk(float (&acc)[NCOLS / 8][4], const uint32_t (&a)[DP / 16][4],
                                                const T* s, int lane) {
  constexpr int S = Tile<DP>::kStride;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk)
#pragma unroll
    for (int nt = 0; nt < NCOLS / 8; ++nt) {
      uint32_t b[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) b[r] = mma::load_b_reg_nk(u16(s) + nt * 8 * S + kk * 16, S, lane, r);
      TcOps<T>::mma(acc[nt], a[kk], b);
    }
}

// acc[nt] (16 x NCOLS) += A * B^T where A = rows arow0.. of smem tile sa ([m][k], DP
// wide) and B^T = rows of smem tile sb ([n][k]) (S^T = K Q^T, dP^T = V dO^T).
template <typename T, int DP, int NCOLS>
__device__ __forceinline__ void mma_a_smem_b_nk(float (&acc)[NCOLS / 8][4], const T* sa, int arow0, const T* sb,
                                                int lane) {
  constexpr int S = Tile<DP>::kStride;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = mma::load_a_reg(u16(sa) + arow0 * S + kk * 16, S, lane, r);
#pragma unroll
    for (int nt = 0; nt < NCOLS / 8; ++nt) {
      uint32_t b[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) b[r] = mma::load_b_reg_nk(u16(sb) + nt * 8 * S + kk * 16, S, lane, r);
      TcOps<T>::mma(acc[nt], a, b);
    }
  }
}

// out[dt] (16 x DP) += P (16 x KROWS, fp32 accumulators re-packed as A operands) * B,
// B = rows of a smem tile stored [k][n] (V, K, dO or Q rows: O += P V, dQ += dS K,
// dV += P^T dO, dK += dS^T Q).
template <typename T, int DP, int KROWS>
__device__ __forceinline__ void mma_p_b_kn(float (&out)[DP / 8][4], const float (&p)[KROWS / 8][4], const T* s,
                                           int lane) {
  constexpr int S = Tile<DP>::kStride;
#pragma unroll
  for (int kc = 0; kc < KROWS / 16; ++kc) {
    uint32_t a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float(&c)[4] = p[2 * kc + mma::c2a_tile(r)];
      a[r] = TcOps<T>::pack(c[mma::c2a_elem(r)], c[mma::c2a_elem(r) + 1]);
    }
#pragma unroll
    for (int dt = 0; dt < DP / 8; ++dt) {
      uint32_t b[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) b[r] = mma::load_b_reg_kn(u16(s) + kc * 16 * S + dt * 8, S, lane, r);
      TcOps<T>::mma(out[dt], a, b);
    }
  }
}

// Global rows (index into L) of the lane's two accumulator rows (c_half 0: groupID,
// 1: groupID + 8) of the warp slice starting at visible position row0; -1 past nv.
__device__ __forceinline__ void lane_rows(int (&gr)[2], const int32_t* vis_b, int row0, int nv, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + mma::group_id(lane) + 8 * h;
    gr[h] = r < nv ? static_cast<int>(grow(vis_b, r)) : -1;
  }
}

// Store a 16 x DP accumulator times mul[c_half] to dst [L, D] of one (b, h): rows
// gr[h] >= 0 (lane_rows) and columns < D only.
template <typename T, int DP>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float (&acc)[DP / 8][4], const float (&mul)[2],
                                           const int (&gr)[2], int D, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (gr[h] < 0) continue;
    T* dr = dst + static_cast<int64_t>(gr[h]) * D;
#pragma unroll
    for (int dt = 0; dt < DP / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = 2 * h + e;  // c_half(i) == h
        const int col = dt * 8 + mma::c_col(lane, i);
        if (col < D) dr[col] = TcOps<T>::st(acc[dt][i] * mul[h]);
      }
  }
}

// ------------------------------------- forward -------------------------------------
template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1)
    mpa_fwd_tc_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                      float* __restrict__ lse, const int32_t* __restrict__ vis, const int32_t* __restrict__ count,
                      int64_t H, int L, int D, float scale_log2, int num_blocks_l, bool vec) {
  constexpr int S = Tile<DP>::kStride;
  constexpr int BN = kFwdKeys;
  __shared__ __align__(16) T sK[BN * S];
  __shared__ __align__(16) T sV[BN * S];
  static_assert(BN >= kBlockRows, "Q is staged through sK");

  const int64_t bh = static_cast<int64_t>(blockIdx.x) / num_blocks_l;
  const int q0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) - bh * num_blocks_l) * kBlockRows;
  const int64_t b = bh / H;
  const int nv = count != nullptr ? count[b] : L;
  if (q0 >= nv) return;  // block-uniform: no visible query here
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t* vis_b = vis != nullptr ? vis + b * L : nullptr;
  const int64_t base = bh * static_cast<int64_t>(L) * D;
  const int wrow0 = warp * kRowsPerWarp;                 // warp's first row within the block
  const bool warp_active = q0 + wrow0 < nv;              // warp-uniform

  // Q rows q0.. -> registers (staged through sK)
  load_tile<T, DP, kBlockRows>(sK, q + base, vis_b, q0, nv, D, vec);
  __syncthreads();
  uint32_t qa[DP / 16][4];
  load_a_frags<T, DP>(qa, sK, wrow0, lane);

  float o[DP / 8][4];
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[dt][i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the two rows (log2 domain)
  float l[2] = {0.f, 0.f};              // this lane's partial row sums (quad-reduced at the end)

  for (int k0 = 0; k0 < nv; k0 += BN) {
    __syncthreads();  // previous tile (or the Q staging) fully consumed
    load_tile<T, DP, BN>(sK, k + base, vis_b, k0, nv, D, vec);
    load_tile<T, DP, BN>(sV, v + base, vis_b, k0, nv, D, vec);
    __syncthreads();
    if (!warp_active) continue;
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
    mma_a_regs_b_nk<T, DP, BN>(s, qa, sK, lane);
    // scale to the log2 domain, mask keys past the visible count (tile column k0 is
    // always visible, so every row keeps a finite maximum)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = k0 + nt * 8 + mma::c_col(lane, i);
        s[nt][i] = col < nv ? s[nt][i] * scale_log2 : -INFINITY;
        mx[mma::c_half(i)] = fmaxf(mx[mma::c_half(i)], s[nt][i]);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float mnew = fmaxf(m[h], quad_max(mx[h]));
      alpha[h] = exp2f(m[h] - mnew);  // m = -inf on the first tile -> 0
      m[h] = mnew;
      l[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float p = exp2f(s[nt][i] - m[mma::c_half(i)]);  // masked: exp2(-inf) = 0
        s[nt][i] = p;
        l[mma::c_half(i)] += p;
      }
#pragma unroll
    for (int dt = 0; dt < DP / 8; ++dt)
#pragma unroll
      for (int i = 0; i < 4; ++i) o[dt][i] *= alpha[mma::c_half(i)];
    mma_p_b_kn<T, DP, BN>(o, s, sV, lane);
  }
  if (!warp_active) return;
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] = quad_sum(l[h]);  // >= 1: the row maximum contributes exp2(0)
    inv[h] = 1.f / l[h];
  }
  int gr[2];
  lane_rows(gr, vis_b, q0 + wrow0, nv, lane);
  store_rows<T, DP>(out + base, o, inv, gr, D, lane);
  if (mma::tig(lane) == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (gr[h] >= 0) lse[bh * L + gr[h]] = (m[h] + log2f(l[h])) * kLn2;
  }
}

// --------------------------------------- dq ----------------------------------------
template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1)
    mpa_dq_tc_kernel(const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                     const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                     T* __restrict__ dq, const int32_t* __restrict__ vis, const int32_t* __restrict__ count,
                     int64_t H, int L, int D, float scale, float scale_log2, int num_blocks_l, bool vec) {
  constexpr int S = Tile<DP>::kStride;
  constexpr int BN = kDqKeys;
  // sK = buf[0 .. BN*S), sV = buf[BN*S .. 2*BN*S); Q and dO (64 rows) are staged through buf.
  __shared__ __align__(16) T buf[2 * BN * S];
  static_assert(2 * BN >= kBlockRows, "Q / dO are staged through the K/V buffer");
  T* sK = buf;
  T* sV = buf + BN * S;

  const int64_t bh = static_cast<int64_t>(blockIdx.x) / num_blocks_l;
  const int q0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) - bh * num_blocks_l) * kBlockRows;
  const int64_t b = bh / H;
  const int nv = count != nullptr ? count[b] : L;
  if (q0 >= nv) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t* vis_b = vis != nullptr ? vis + b * L : nullptr;
  const int64_t base = bh * static_cast<int64_t>(L) * D;
  const int wrow0 = warp * kRowsPerWarp;
  const bool warp_active = q0 + wrow0 < nv;

  uint32_t qa[DP / 16][4], ga[DP / 16][4];
  load_tile<T, DP, kBlockRows>(buf, q + base, vis_b, q0, nv, D, vec);
  __syncthreads();
  load_a_frags<T, DP>(qa, buf, wrow0, lane);
  __syncthreads();
  load_tile<T, DP, kBlockRows>(buf, go + base, vis_b, q0, nv, D, vec);
  __syncthreads();
  load_a_frags<T, DP>(ga, buf, wrow0, lane);

  // per-row statistics of the lane's two rows; rows past nv: P = exp2(-inf) = 0
  int gr[2];
  lane_rows(gr, vis_b, q0 + wrow0, nv, lane);
  float lse2[2], dl[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool ok = gr[h] >= 0;
    const int64_t gi = ok ? bh * L + gr[h] : 0;
    lse2[h] = ok ? lse[gi] * kLog2e : INFINITY;
    dl[h] = ok ? delta[gi] : 0.f;
  }
  float acc[DP / 8][4];
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.f;

  for (int k0 = 0; k0 < nv; k0 += BN) {
    __syncthreads();
    load_tile<T, DP, BN>(sK, k + base, vis_b, k0, nv, D, vec);
    load_tile<T, DP, BN>(sV, v + base, vis_b, k0, nv, D, vec);
    __syncthreads();
    if (!warp_active) continue;
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = dp[nt][i] = 0.f;
    mma_a_regs_b_nk<T, DP, BN>(s, qa, sK, lane);
    mma_a_regs_b_nk<T, DP, BN>(dp, ga, sV, lane);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = mma::c_half(i);
        const int col = k0 + nt * 8 + mma::c_col(lane, i);
        const float p = col < nv ? exp2f(s[nt][i] * scale_log2 - lse2[h]) : 0.f;
        s[nt][i] = p * (dp[nt][i] - dl[h]);  // dS
      }
    mma_p_b_kn<T, DP, BN>(acc, s, sK, lane);
  }
  if (!warp_active) return;
  const float mul[2] = {scale, scale};
  store_rows<T, DP>(dq + base, acc, mul, gr, D, lane);
}

// -------------------------------------- dk, dv -------------------------------------
template <int DP>
constexpr int dkdv_smem_bytes() {  // sK, sV: 64 rows; sQ, sG: 32 rows (2-byte elements); sL, sD: 32 floats
  return (2 * kBlockRows + 2 * kDkvQueries) * Tile<DP>::kStride * 2 + 2 * kDkvQueries * 4;
}

template <typename T, int DP>
__global__ void __launch_bounds__(kTcThreads, 1)
    mpa_dkdv_tc_kernel(const T* __restrict__ go, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dk, T* __restrict__ dv, const int32_t* __restrict__ vis,
                       const int32_t* __restrict__ count, int64_t H, int L, int D, float scale, float scale_log2,
                       int num_blocks_l, bool vec) {
  constexpr int S = Tile<DP>::kStride;
  constexpr int BM = kDkvQueries;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockRows * S;
  T* sQ = sV + kBlockRows * S;
  T* sG = sQ + BM * S;
  float* sL = reinterpret_cast<float*>(sG + BM * S);  // lse * log2(e); +inf past nv
  float* sD = sL + BM;                               // delta; 0 past nv

  const int64_t bh = static_cast<int64_t>(blockIdx.x) / num_blocks_l;
  const int k0 = static_cast<int>(static_cast<int64_t>(blockIdx.x) - bh * num_blocks_l) * kBlockRows;
  const int64_t b = bh / H;
  const int nv = count != nullptr ? count[b] : L;
  if (k0 >= nv) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t* vis_b = vis != nullptr ? vis + b * L : nullptr;
  const int64_t base = bh * static_cast<int64_t>(L) * D;
  const int wrow0 = warp * kRowsPerWarp;
  const bool warp_active = k0 + wrow0 < nv;

  load_tile<T, DP, kBlockRows>(sK, k + base, vis_b, k0, nv, D, vec);
  load_tile<T, DP, kBlockRows>(sV, v + base, vis_b, k0, nv, D, vec);
  float dka[DP / 8][4], dva[DP / 8][4];
#pragma unroll
  for (int dt = 0; dt < DP / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) dka[dt][i] = dva[dt][i] = 0.f;

  for (int i0 = 0; i0 < nv; i0 += BM) {
    __syncthreads();
    load_tile<T, DP, BM>(sQ, q + base, vis_b, i0, nv, D, vec);
    load_tile<T, DP, BM>(sG, go + base, vis_b, i0, nv, D, vec);
    for (int t = threadIdx.x; t < BM; t += kTcThreads) {
      const bool ok = i0 + t < nv;
      const int64_t gi = ok ? bh * L + grow(vis_b, i0 + t) : 0;
      sL[t] = ok ? lse[gi] * kLog2e : INFINITY;
      sD[t] = ok ? delta[gi] : 0.f;
    }
    __syncthreads();
    if (!warp_active) continue;
    float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.f;
    mma_a_smem_b_nk<T, DP, BM>(st, sK, wrow0, sQ, lane);   // S^T = K Q^T   (16 keys x BM queries)
    mma_a_smem_b_nk<T, DP, BM>(dpt, sV, wrow0, sG, lane);  // dP^T = V dO^T
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = nt * 8 + mma::c_col(lane, i);  // query within the tile
        const float p = exp2f(st[nt][i] * scale_log2 - sL[col]);  // past nv: exp2(-inf) = 0
        st[nt][i] = p;
        dpt[nt][i] = p * (dpt[nt][i] - sD[col]);  // dS^T
      }
    mma_p_b_kn<T, DP, BM>(dva, st, sG, lane);   // dV += P^T dO
    mma_p_b_kn<T, DP, BM>(dka, dpt, sQ, lane);  // dK += dS^T Q
  }
  if (!warp_active) return;
  const float mul_k[2] = {scale, scale}, mul_v[2] = {1.f, 1.f};
  int gr[2];
  lane_rows(gr, vis_b, k0 + wrow0, nv, lane);
  store_rows<T, DP>(dk + base, dka, mul_k, gr, D, lane);
  store_rows<T, DP>(dv + base, dva, mul_v, gr, D, lane);
}

}  // namespace tc

bool bad_shape(const MpaShape& s) {
  if (s.b < 1 || s.h < 1 || s.l < 1 || s.d < 1 || s.d > kMaxD) return true;
  if (s.l > kMpaMaxSeqLen) return true;                      // scalar / delta grids: ceil(L / 4) <= 65535
  if (s.b * s.h > kMpaMaxGridBlocks) return true;             // scalar grid.x
  const int64_t nbl = (s.l + kMpaRowsPerBlock - 1) / kMpaRowsPerBlock;
  return s.b * s.h > kMpaMaxGridBlocks / nbl;                 // tensor-core grids: B*H*ceil(L/64) blocks
}

dim3 grid_for(const MpaShape& s) {
  return dim3(static_cast<unsigned>(s.b * s.h), static_cast<unsigned>((s.l + kWarps - 1) / kWarps));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- fp32: scalar kernels ----
cudaError_t fwd_fp32(const void* q, const void* k, const void* v, void* out, float* lse, const int32_t* vis,
                     const int32_t* count, const MpaShape& s, float scale, cudaStream_t stream) {
  mpa_fwd_kernel<float><<<grid_for(s), kThreads, 0, stream>>>(
      static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
      static_cast<float*>(out), lse, vis, count, s.h, s.l, s.d, scale);
  return cudaGetLastError();
}

cudaError_t bwd_fp32(const void* go, const void* q, const void* k, const void* v, const float* lse,
                     const float* delta, void* dq, void* dk, void* dv, const int32_t* vis, const int32_t* count,
                     const MpaShape& s, float scale, cudaStream_t stream) {
  const dim3 grid = grid_for(s);
  mpa_dq_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(go), static_cast<const float*>(q),
                                                      static_cast<const float*>(k), static_cast<const float*>(v), lse,
                                                      delta, static_cast<float*>(dq), vis, count, s.h, s.l, s.d,
                                                      scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mpa_dkdv_kernel<float><<<grid, kThreads, 0, stream>>>(
      static_cast<const float*>(go), static_cast<const float*>(q), static_cast<const float*>(k),
      static_cast<const float*>(v), lse, delta, static_cast<float*>(dk), static_cast<float*>(dv), vis, count, s.h,
      s.l, s.d, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t delta_typed(const void* go, const void* o, float* delta, const int32_t* vis, const int32_t* count,
                        const MpaShape& s, cudaStream_t stream) {
  mpa_delta_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(static_cast<const T*>(go), static_cast<const T*>(o),
                                                            delta, vis, count, s.h, s.l, s.d);
  return cudaGetLastError();
}

// ---- fp16 / bf16: tensor-core kernels, one instantiation per padded head dim ----
struct TcArgs {
  const void *go, *q, *k, *v;
  void *out, *dq, *dk, *dv;
  float* lse_out;
  const float *lse, *delta;
  const int32_t *vis, *count;
  MpaShape s;
  float scale;
  cudaStream_t stream;
};

template <typename T, int DP>
cudaError_t fwd_tc(const TcArgs& a) {
  const int nbl = static_cast<int>((a.s.l + tc::kBlockRows - 1) / tc::kBlockRows);
  const unsigned blocks = static_cast<unsigned>(a.s.b * a.s.h * nbl);
  const bool vec = a.s.d % 8 == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v);
  tc::mpa_fwd_tc_kernel<T, DP><<<blocks, tc::kTcThreads, 0, a.stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.k), static_cast<const T*>(a.v), static_cast<T*>(a.out),
      a.lse_out, a.vis, a.count, a.s.h, static_cast<int>(a.s.l), static_cast<int>(a.s.d), a.scale * tc::kLog2e, nbl,
      vec);
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t bwd_tc(const TcArgs& a) {
  const int nbl = static_cast<int>((a.s.l + tc::kBlockRows - 1) / tc::kBlockRows);
  const unsigned blocks = static_cast<unsigned>(a.s.b * a.s.h * nbl);
  const bool vec = a.s.d % 8 == 0 && aligned16(a.go) && aligned16(a.q) && aligned16(a.k) && aligned16(a.v);
  const int L = static_cast<int>(a.s.l), D = static_cast<int>(a.s.d);
  const float scale_log2 = a.scale * tc::kLog2e;
  tc::mpa_dq_tc_kernel<T, DP><<<blocks, tc::kTcThreads, 0, a.stream>>>(
      static_cast<const T*>(a.go), static_cast<const T*>(a.q), static_cast<const T*>(a.k),
      static_cast<const T*>(a.v), a.lse, a.delta, static_cast<T*>(a.dq), a.vis, a.count, a.s.h, L, D, a.scale,
      scale_log2, nbl, vec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  constexpr int kSmem = tc::dkdv_smem_bytes<DP>();
  if (kSmem > 48 * 1024) {
    err = cudaFuncSetAttribute(tc::mpa_dkdv_tc_kernel<T, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  tc::mpa_dkdv_tc_kernel<T, DP><<<blocks, tc::kTcThreads, kSmem, a.stream>>>(
      static_cast<const T*>(a.go), static_cast<const T*>(a.q), static_cast<const T*>(a.k),
      static_cast<const T*>(a.v), a.lse, a.delta, static_cast<T*>(a.dk), static_cast<T*>(a.dv), a.vis, a.count,
      a.s.h, L, D, a.scale, scale_log2, nbl, vec);
  return cudaGetLastError();
}

// Head dim D -> DP = D rounded up to a multiple of 16 (16 .. 128).
#define MPA_TC_DISPATCH(FN, T, ARGS)            \
  switch ((ARGS).s.d <= 16 ? 16 : ((ARGS).s.d + 15) / 16 * 16) { \
    case 16: return FN<T, 16>(ARGS);           \
    case 32: return FN<T, 32>(ARGS);           \
    case 48: return FN<T, 48>(ARGS);           \
    case 64: return FN<T, 64>(ARGS);           \
    case 80: return FN<T, 80>(ARGS);           \
    case 96: return FN<T, 96>(ARGS);           \
    case 112: return FN<T, 112>(ARGS);         \
    case 128: return FN<T, 128>(ARGS);         \
    default: return cudaErrorInvalidValue;     \
  }

template <typename T>
cudaError_t fwd_tc_dispatch(const TcArgs& a) {
  MPA_TC_DISPATCH(fwd_tc, T, a)
}
template <typename T>
cudaError_t bwd_tc_dispatch(const TcArgs& a) {
  cudaError_t err = delta_typed<T>(a.go, a.out, const_cast<float*>(a.delta), a.vis, a.count, a.s, a.stream);
  if (err != cudaSuccess) return err;
  MPA_TC_DISPATCH(bwd_tc, T, a)
}
#undef MPA_TC_DISPATCH

}  // namespace

cudaError_t launch_masked_patch_attention_fwd(MpaDType dtype, const void* q, const void* k, const void* v, void* out,
                                              float* lse, const int32_t* vis, const int32_t* count, MpaShape shape,
                                              float scale, cudaStream_t stream) {
  if (bad_shape(shape) || (vis == nullptr) != (count == nullptr) || !(scale > 0.f) || !std::isfinite(scale)) {
    return cudaErrorInvalidValue;
  }
  if (q == nullptr || k == nullptr || v == nullptr || out == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  TcArgs a{};
  a.q = q, a.k = k, a.v = v, a.out = out, a.lse_out = lse, a.vis = vis, a.count = count;
  a.s = shape, a.scale = scale, a.stream = stream;
  switch (dtype) {
    case MpaDType::kFloat32:
      return fwd_fp32(q, k, v, out, lse, vis, count, shape, scale, stream);
    case MpaDType::kFloat16:
      return fwd_tc_dispatch<__half>(a);
    case MpaDType::kBFloat16:
      return fwd_tc_dispatch<__nv_bfloat16>(a);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_masked_patch_attention_bwd(MpaDType dtype, const void* grad_out, const void* q, const void* k,
                                              const void* v, const void* out, const float* lse, float* delta,
                                              void* dq, void* dk, void* dv, const int32_t* vis, const int32_t* count,
                                              MpaShape shape, float scale, cudaStream_t stream) {
  if (bad_shape(shape) || (vis == nullptr) != (count == nullptr) || !(scale > 0.f) || !std::isfinite(scale)) {
    return cudaErrorInvalidValue;
  }
  if (grad_out == nullptr || q == nullptr || k == nullptr || v == nullptr || out == nullptr || lse == nullptr ||
      delta == nullptr || dq == nullptr || dk == nullptr || dv == nullptr) {
    return cudaErrorInvalidValue;
  }
  TcArgs a{};
  a.go = grad_out, a.q = q, a.k = k, a.v = v, a.out = const_cast<void*>(out), a.dq = dq, a.dk = dk, a.dv = dv;
  a.lse = lse, a.delta = delta, a.vis = vis, a.count = count, a.s = shape, a.scale = scale, a.stream = stream;
  switch (dtype) {
    case MpaDType::kFloat32: {
      const cudaError_t err = delta_typed<float>(grad_out, out, delta, vis, count, shape, stream);
      if (err != cudaSuccess) return err;
      return bwd_fp32(grad_out, q, k, v, lse, delta, dq, dk, dv, vis, count, shape, scale, stream);
    }
    case MpaDType::kFloat16:
      return bwd_tc_dispatch<__half>(a);
    case MpaDType::kBFloat16:
      return bwd_tc_dispatch<__nv_bfloat16>(a);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace maep_fast
