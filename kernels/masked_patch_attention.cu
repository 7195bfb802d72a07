// Torch-free CUDA kernels of maep_fast::masked_patch_attention_fwd / _bwd;
// see masked_patch_attention.cuh. Deliberately simple (correctness first):
//
// Grid (B*H, ceil(L / kWarps)); a block of kWarps warps owns kWarps visible
// rows of one (b, h), one warp per row (its own vector staged in shared
// memory, its accumulators in registers: lane owns d = lane + 32*t). The
// other side's visible rows stream through shared memory in tiles of 32
// (rows padded to kLd = kMaxD + 1 floats: conflict-free), lane j of a warp
// handles tile row j (dot product over D), warp shuffles give the tile's
// max / sum and broadcast the per-column weights for the accumulation.
//   fwd:  rows = queries, tiles = keys + values, online softmax (m, l, acc),
//         out = acc / l, lse = m + log l.
//   bwd:  delta = rowsum(dO * O) (one warp per query row); then
//         dq   kernel: rows = queries, tiles = keys + values:
//                      ds = p (dO.v - delta), dq += scale ds k;
//         dkdv kernel: rows = keys, tiles = queries + dO (+ lse, delta):
//                      dv += p dO, dk += scale ds q.
// Hidden rows are never touched (the caller zero-fills them); a sample with
// no visible patch launches blocks that exit at once.
#include "masked_patch_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace maep_fast {
namespace cuda {
namespace {

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
template <>
__device__ __forceinline__ __half st<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
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

bool bad_shape(const MpaShape& s) {
  return s.b < 0 || s.h < 0 || s.l < 0 || s.d < 1 || s.d > kMaxD || (s.l + kWarps - 1) / kWarps > 65535 ||
         s.b * s.h > 2147483647LL;
}

dim3 grid_for(const MpaShape& s) {
  return dim3(static_cast<unsigned>(s.b * s.h), static_cast<unsigned>((s.l + kWarps - 1) / kWarps));
}

template <typename T>
cudaError_t fwd_typed(const void* q, const void* k, const void* v, void* out, float* lse, const int32_t* vis,
                      const int32_t* count, const MpaShape& s, float scale, cudaStream_t stream) {
  mpa_fwd_kernel<T><<<grid_for(s), kThreads, 0, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                         static_cast<const T*>(v), static_cast<T*>(out), lse, vis,
                                                         count, s.h, s.l, s.d, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* go, const void* q, const void* k, const void* v, const void* o, const float* lse,
                      float* delta, void* dq, void* dk, void* dv, const int32_t* vis, const int32_t* count,
                      const MpaShape& s, float scale, cudaStream_t stream) {
  const dim3 grid = grid_for(s);
  mpa_delta_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(go), static_cast<const T*>(o), delta, vis,
                                                     count, s.h, s.l, s.d);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mpa_dq_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(go), static_cast<const T*>(q),
                                                  static_cast<const T*>(k), static_cast<const T*>(v), lse, delta,
                                                  static_cast<T*>(dq), vis, count, s.h, s.l, s.d, scale);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mpa_dkdv_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(go), static_cast<const T*>(q),
                                                    static_cast<const T*>(k), static_cast<const T*>(v), lse, delta,
                                                    static_cast<T*>(dk), static_cast<T*>(dv), vis, count, s.h, s.l,
                                                    s.d, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_masked_patch_attention_fwd(MpaDType dtype, const void* q, const void* k, const void* v, void* out,
                                              float* lse, const int32_t* vis, const int32_t* count, MpaShape shape,
                                              float scale, cudaStream_t stream) {
  if (bad_shape(shape) || (vis == nullptr) != (count == nullptr) || !(scale > 0.f)) return cudaErrorInvalidValue;
  if (shape.b * shape.h * shape.l == 0) return cudaSuccess;
  if (q == nullptr || k == nullptr || v == nullptr || out == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case MpaDType::kFloat32:
      return fwd_typed<float>(q, k, v, out, lse, vis, count, shape, scale, stream);
    case MpaDType::kFloat16:
      return fwd_typed<__half>(q, k, v, out, lse, vis, count, shape, scale, stream);
    case MpaDType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(q, k, v, out, lse, vis, count, shape, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_masked_patch_attention_bwd(MpaDType dtype, const void* grad_out, const void* q, const void* k,
                                              const void* v, const void* out, const float* lse, float* delta,
                                              void* dq, void* dk, void* dv, const int32_t* vis, const int32_t* count,
                                              MpaShape shape, float scale, cudaStream_t stream) {
  if (bad_shape(shape) || (vis == nullptr) != (count == nullptr) || !(scale > 0.f)) return cudaErrorInvalidValue;
  if (shape.b * shape.h * shape.l == 0) return cudaSuccess;
  if (grad_out == nullptr || q == nullptr || k == nullptr || v == nullptr || out == nullptr || lse == nullptr ||
      delta == nullptr || dq == nullptr || dk == nullptr || dv == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case MpaDType::kFloat32:
      return bwd_typed<float>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, vis, count, shape, scale, stream);
    case MpaDType::kFloat16:
      return bwd_typed<__half>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, vis, count, shape, scale, stream);
    case MpaDType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(grad_out, q, k, v, out, lse, delta, dq, dk, dv, vis, count, shape, scale,
                                      stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace maep_fast
