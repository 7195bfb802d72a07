// Torch-free CUDA kernels of maep_fast::patch_recon_loss; see patch_recon_loss.cuh.
//
// Default: the patch-row kernels further down (one block per row of patches, both tensors
// staged through shared memory with 16-byte accesses: one HBM pass). Fallback for rows whose
// tiles do not fit in shared memory: one warp per patch (grid-stride over patches), kWarps warps per block.
// Passes over the patch (each lane strides over j = lane, lane + 32, ...):
// sum t -> mean; sum (t - mean)^2 -> std; then the error (forward) or the
// gradients (backward: one pass writes d pred and accumulates sum(g), sum(g*x_hat)
// for the normalization backward, a second pass writes d imgs).
// Patch elements are re-read from global memory (L1/L2 resident: a patch is
// at most a few KB), which keeps the kernel register-light for any dim.
#include "patch_recon_loss.cuh"

#include "cvt.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace maep_fast {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

using detail::Cvt;  // kernels/cvt.cuh

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Geo {
  int64_t c, h, w, ps, gw, length, dim;
};

// Offset of patch element j of patch l inside one image [C, H, W].
__device__ __forceinline__ int64_t img_offset(const Geo& g, int64_t l, int64_t j) {
  const int64_t gy = l / g.gw, gx = l - gy * g.gw;
  const int64_t row = j / (g.ps * g.c);
  const int64_t rem = j - row * (g.ps * g.c);
  const int64_t col = rem / g.c;
  const int64_t ch = rem - col * g.c;
  return (ch * g.h + gy * g.ps + row) * g.w + gx * g.ps + col;
}

// Mean and std sqrt(var_unbiased + 1e-6) of a patch's dim values, element j read by load(j), over
// one warp (std = 1, mean = 0 without norm_pix). dim == 1: NaN, like torch.var.
template <typename C, typename Idx, typename Load>
__device__ __forceinline__ void warp_patch_stats(Idx dim, bool norm_pix, int lane, const Load& load, C& mean, C& sd) {
  mean = C(0);
  sd = C(1);
  if (!norm_pix) return;
  C s = C(0);
  for (Idx j = lane; j < dim; j += 32) s += load(j);
  mean = warp_sum(s) / static_cast<C>(dim);
  C ss = C(0);
  for (Idx j = lane; j < dim; j += 32) {
    const C d = load(j) - mean;
    ss += d * d;
  }
  sd = sqrt(warp_sum(ss) / static_cast<C>(dim - 1) + static_cast<C>(1e-6));
}

// d loss / d pred of one element, d = pred - target: k * d (p = 2, k = 2 w / dim) or k * sign(d)
// (p = 1, k = w / dim). d target = -(that).
template <typename C>
__device__ __forceinline__ C prl_dpred(C d, C k, int p) {
  return p == 2 ? k * d : k * (d > C(0) ? C(1) : (d < C(0) ? C(-1) : C(0)));
}

// The per-patch terms of the norm_pix backward, from sums over the warp of sg = sum(d target) and
// sgx = sum(d target * x_hat): d imgs = (d target - mg) / sd - x_hat * kx. Zero without norm_pix.
template <typename C, typename Idx>
__device__ __forceinline__ void norm_pix_terms(C sg, C sgx, Idx dim, C sd, bool norm_pix, C& mg, C& kx) {
  mg = C(0);
  kx = C(0);
  if (norm_pix) {
    mg = warp_sum(sg) / static_cast<C>(dim);
    kx = warp_sum(sgx) / (static_cast<C>(dim - 1) * sd);
  }
}

// mean and std of patch (n, l), read from global memory.
template <typename T, typename C>
__device__ __forceinline__ void patch_stats(const T* img, const Geo& g, int64_t l, bool norm_pix, int lane, C& mean,
                                            C& sd) {
  warp_patch_stats<C>(g.dim, norm_pix, lane, [&](int64_t j) { return static_cast<C>(Cvt<T>::ld(img[img_offset(g, l, j)])); },
                      mean, sd);
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) prl_fwd_kernel(const T* __restrict__ pred, const T* __restrict__ imgs,
                                                            C* __restrict__ err, int64_t num_patches, Geo g,
                                                            bool norm_pix, int p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t img_stride = g.c * g.h * g.w;
  for (int64_t patch = warp0; patch < num_patches; patch += nwarps) {
    const int64_t n = patch / g.length, l = patch - n * g.length;
    const T* img = imgs + n * img_stride;
    const T* pr = pred + patch * g.dim;
    C mean, sd;
    patch_stats<T, C>(img, g, l, norm_pix, lane, mean, sd);
    C acc = C(0);
    for (int64_t j = lane; j < g.dim; j += 32) {
      const C t = (Cvt<T>::ld(img[img_offset(g, l, j)]) - mean) / sd;
      const C d = Cvt<T>::ld(pr[j]) - t;
      acc += p == 2 ? d * d : fabs(d);
    }
    acc = warp_sum(acc);
    if (lane == 0) err[patch] = acc / static_cast<C>(g.dim);
  }
}

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) prl_bwd_kernel(const T* __restrict__ pred, const T* __restrict__ imgs,
                                                            const C* __restrict__ weight, T* __restrict__ dpred,
                                                            T* __restrict__ dimgs, int64_t num_patches, Geo g,
                                                            bool norm_pix, int p) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t img_stride = g.c * g.h * g.w;
  for (int64_t patch = warp0; patch < num_patches; patch += nwarps) {
    const int64_t n = patch / g.length, l = patch - n * g.length;
    const T* img = imgs + n * img_stride;
    T* dimg = dimgs + n * img_stride;
    const T* pr = pred + patch * g.dim;
    T* dp = dpred + patch * g.dim;
    const C w = weight[patch];
    if (w == C(0)) {  // not counted: zero gradients, nothing to compute
      for (int64_t j = lane; j < g.dim; j += 32) {
        dp[j] = Cvt<T>::st(C(0));
        dimg[img_offset(g, l, j)] = Cvt<T>::st(C(0));
      }
      continue;
    }
    C mean, sd;
    patch_stats<T, C>(img, g, l, norm_pix, lane, mean, sd);
    const C k = (p == 2 ? C(2) : C(1)) * w / static_cast<C>(g.dim);
    C sg = C(0), sgx = C(0);
    for (int64_t j = lane; j < g.dim; j += 32) {
      const C t = (Cvt<T>::ld(img[img_offset(g, l, j)]) - mean) / sd;
      const C d = Cvt<T>::ld(pr[j]) - t;
      const C gv = prl_dpred(d, k, p);
      dp[j] = Cvt<T>::st(gv);
      sg -= gv;  // d target = -gv
      sgx -= gv * t;
    }
    C mg, kx;
    norm_pix_terms(sg, sgx, g.dim, sd, norm_pix, mg, kx);
    for (int64_t j = lane; j < g.dim; j += 32) {
      const int64_t off = img_offset(g, l, j);
      const C t = (Cvt<T>::ld(img[off]) - mean) / sd;
      const C d = Cvt<T>::ld(pr[j]) - t;
      const C gt = -prl_dpred(d, k, p);
      dimg[off] = Cvt<T>::st(norm_pix ? (gt - mg) / sd - t * kx : gt);
    }
  }
}

// ---- patch-row kernels: one block per row of patches, both tensors staged in shared memory ----
// A row of patches (n, gy) covers C * ps image rows of W contiguous pixels, and its gw patches
// are gw * dim = C * ps * W contiguous values of pred: the block copies both into shared memory
// with coalesced 16-byte accesses (when W and the row's pred span are multiples of the pack and
// the pointers aligned), computes each patch from shared memory (one warp per patch), and the
// backward writes d pred and d imgs back the same way. HBM traffic is the minimal one: read pred
// and imgs once; the backward writes d pred and d imgs once. Used when the two staged tiles fit
// in kRowSmemMax bytes; else the warp-per-patch kernels above (re-reading from L1/L2).
constexpr int kRowThreads = 256;
constexpr int64_t kRowSmemMax = 96 * 1024;  // <= 2 blocks per SM on sm_80 / sm_90 at the largest tiles

template <typename T, int V>
struct alignas(sizeof(T) * V) RowPack {
  T v[V];
};

inline bool row_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Shared-memory tile geometry in 32-bit ints (a staged row holds < 2^31 values: kRowSmemMax);
// 64-bit division compiles to a called routine whose ABI shows up as local-memory spills.
struct RowGeo {
  int c, ps, w, gw, dim;
};

__device__ __forceinline__ RowGeo row_geo(const Geo& g) {
  return {static_cast<int>(g.c), static_cast<int>(g.ps), static_cast<int>(g.w), static_cast<int>(g.gw),
          static_cast<int>(g.dim)};
}

// Image rows of the patch row -> tile[(c * ps + r) * W + x] (compute dtype); V-wide packs.
// `img` points at image n; `row0` = gy * ps.
template <typename T, typename C, int V>
__device__ __forceinline__ void load_img_rows(const T* img, const RowGeo& r, int64_t plane, int64_t row0, C* tile) {
  using P = RowPack<T, V>;
  const int wp = r.w / V, rows = r.c * r.ps;
  for (int i = threadIdx.x; i < rows * wp; i += blockDim.x) {
    const int row = i / wp, col = i - row * wp;
    const int ch = row / r.ps, rr = row - ch * r.ps;
    const P v = reinterpret_cast<const P*>(img + ch * plane + (row0 + rr) * r.w)[col];
#pragma unroll
    for (int k = 0; k < V; ++k) tile[row * r.w + col * V + k] = Cvt<T>::ld(v.v[k]);
  }
}

template <typename T, typename C, int V>
__device__ __forceinline__ void store_img_rows(T* img, const RowGeo& r, int64_t plane, int64_t row0, const C* tile) {
  using P = RowPack<T, V>;
  const int wp = r.w / V, rows = r.c * r.ps;
  for (int i = threadIdx.x; i < rows * wp; i += blockDim.x) {
    const int row = i / wp, col = i - row * wp;
    const int ch = row / r.ps, rr = row - ch * r.ps;
    P v;
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = Cvt<T>::st(tile[row * r.w + col * V + k]);
    reinterpret_cast<P*>(img + ch * plane + (row0 + rr) * r.w)[col] = v;
  }
}

// A contiguous span of `count` values (count % V == 0) <-> tile[0 .. count).
template <typename T, typename C, int V>
__device__ __forceinline__ void load_span(const T* src, int count, C* tile) {
  using P = RowPack<T, V>;
  for (int i = threadIdx.x; i < count / V; i += blockDim.x) {
    const P v = reinterpret_cast<const P*>(src)[i];
#pragma unroll
    for (int k = 0; k < V; ++k) tile[i * V + k] = Cvt<T>::ld(v.v[k]);
  }
}

template <typename T, typename C, int V>
__device__ __forceinline__ void store_span(T* dst, int count, const C* tile) {
  using P = RowPack<T, V>;
  for (int i = threadIdx.x; i < count / V; i += blockDim.x) {
    P v;
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = Cvt<T>::st(tile[i * V + k]);
    reinterpret_cast<P*>(dst)[i] = v;
  }
}

// Index in the image tile of element j (channel-last: j = (pi * ps + qi) * C + ch) of patch gx.
__device__ __forceinline__ int tile_index(const RowGeo& r, int gx, int j) {
  const int pq = j / r.c, ch = j - pq * r.c;
  const int pi = pq / r.ps, qi = pq - pi * r.ps;
  return (ch * r.ps + pi) * r.w + gx * r.ps + qi;
}

// mean and std of patch gx of a staged row, read from the shared-memory tile.
template <typename C>
__device__ __forceinline__ void tile_stats(const C* it, const RowGeo& r, int gx, bool norm_pix, int lane, C& mean,
                                           C& sd) {
  warp_patch_stats<C>(r.dim, norm_pix, lane, [&](int j) { return it[tile_index(r, gx, j)]; }, mean, sd);
}

template <typename T, typename C, int V>
__global__ void __launch_bounds__(kRowThreads) prl_row_fwd_kernel(const T* __restrict__ pred,
                                                                   const T* __restrict__ imgs, C* __restrict__ err,
                                                                   Geo g, bool norm_pix, int p) {
  extern __shared__ __align__(16) unsigned char row_smem[];
  C* it = reinterpret_cast<C*>(row_smem);  // image tile [C * ps * W]
  const RowGeo r = row_geo(g);
  const int span = r.c * r.ps * r.w;  // = gw * dim
  C* pt = it + span;                  // pred tile [gw * dim]
  const int gh = static_cast<int>(g.h / g.ps);
  const int64_t n = blockIdx.x / gh;
  const int gy = static_cast<int>(blockIdx.x - n * gh);
  const int64_t l0 = static_cast<int64_t>(gy) * r.gw;
  const int64_t plane = g.h * g.w;
  load_img_rows<T, C, V>(imgs + n * g.c * plane, r, plane, static_cast<int64_t>(gy) * r.ps, it);
  load_span<T, C, V>(pred + (n * g.length + l0) * g.dim, span, pt);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int gx = threadIdx.x >> 5; gx < r.gw; gx += kRowThreads / 32) {
    C mean, sd;
    tile_stats(it, r, gx, norm_pix, lane, mean, sd);
    C acc = C(0);
    for (int j = lane; j < r.dim; j += 32) {
      const C d = pt[gx * r.dim + j] - (it[tile_index(r, gx, j)] - mean) / sd;
      acc += p == 2 ? d * d : fabs(d);
    }
    acc = warp_sum(acc);
    if (lane == 0) err[n * g.length + l0 + gx] = acc / static_cast<C>(r.dim);
  }
}

template <typename T, typename C, int V>
__global__ void __launch_bounds__(kRowThreads) prl_row_bwd_kernel(const T* __restrict__ pred,
                                                                   const T* __restrict__ imgs,
                                                                   const C* __restrict__ weight, T* __restrict__ dpred,
                                                                   T* __restrict__ dimgs, Geo g, bool norm_pix,
                                                                   int p) {
  extern __shared__ __align__(16) unsigned char row_smem[];
  C* it = reinterpret_cast<C*>(row_smem);  // image tile; becomes the d imgs tile in place
  const RowGeo r = row_geo(g);
  const int span = r.c * r.ps * r.w;
  C* pt = it + span;  // pred tile; becomes the d pred tile in place
  const int gh = static_cast<int>(g.h / g.ps);
  const int64_t n = blockIdx.x / gh;
  const int gy = static_cast<int>(blockIdx.x - n * gh);
  const int64_t l0 = static_cast<int64_t>(gy) * r.gw;
  const int64_t plane = g.h * g.w;
  const int64_t img_off = n * g.c * plane, pred_off = (n * g.length + l0) * g.dim;
  const int64_t row0 = static_cast<int64_t>(gy) * r.ps;
  load_img_rows<T, C, V>(imgs + img_off, r, plane, row0, it);
  load_span<T, C, V>(pred + pred_off, span, pt);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int gx = threadIdx.x >> 5; gx < r.gw; gx += kRowThreads / 32) {
    const C w = weight[n * g.length + l0 + gx];
    C* pp = pt + gx * r.dim;
    if (w == C(0)) {  // not counted: zero gradients
      for (int j = lane; j < r.dim; j += 32) {
        pp[j] = C(0);
        it[tile_index(r, gx, j)] = C(0);
      }
      continue;
    }
    C mean, sd;
    tile_stats(it, r, gx, norm_pix, lane, mean, sd);
    const C k = (p == 2 ? C(2) : C(1)) * w / static_cast<C>(r.dim);
    C sg = C(0), sgx = C(0);
    for (int j = lane; j < r.dim; j += 32) {
      const C t = (it[tile_index(r, gx, j)] - mean) / sd;
      const C d = pp[j] - t;
      const C gv = prl_dpred(d, k, p);
      pp[j] = gv;  // d pred, in place (this lane read pp[j] just above)
      sg -= gv;    // d target = -gv
      sgx -= gv * t;
    }
    C mg, kx;
    norm_pix_terms(sg, sgx, r.dim, sd, norm_pix, mg, kx);
    for (int j = lane; j < r.dim; j += 32) {
      const int ti = tile_index(r, gx, j);
      const C t = (it[ti] - mean) / sd;
      const C gt = -pp[j];
      it[ti] = norm_pix ? (gt - mg) / sd - t * kx : gt;  // d imgs, in place (same lane, same element)
    }
  }
  __syncthreads();
  store_span<T, C, V>(dpred + pred_off, span, pt);
  store_img_rows<T, C, V>(dimgs + img_off, r, plane, row0, it);
}

template <typename K>
bool allow_row_smem(K kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return true;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
         cudaSuccess;
}

// Bytes of the two staged tiles, or -1 when the patch-row kernels do not apply.
template <typename C>
int64_t row_smem_bytes(const Geo& g, int64_t n) {
  const int64_t bytes = 2 * g.c * g.ps * g.w * static_cast<int64_t>(sizeof(C));
  const int64_t blocks = n * (g.h / g.ps);
  return (bytes <= kRowSmemMax && blocks <= 0x7fffffffLL) ? bytes : -1;
}

// Pack width for the staged copies: 16-byte packs when every image row and the pred span split
// into whole packs and every pointer is 16-byte aligned.
template <typename T>
bool row_packed(const Geo& g, std::initializer_list<const void*> ptrs) {
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  if (g.w % V != 0) return false;  // also makes the pred span (a multiple of W) whole packs
  for (const void* q : ptrs) {
    if (!row_aligned16(q)) return false;
  }
  return true;
}

bool make_geo(const PrlShape& s, Geo& g, int64_t& num_patches) {
  if (s.n < 0 || s.c < 1 || s.h < 1 || s.w < 1 || s.ps < 1 || s.h % s.ps != 0 || s.w % s.ps != 0) return false;
  g.c = s.c;
  g.h = s.h;
  g.w = s.w;
  g.ps = s.ps;
  g.gw = s.w / s.ps;
  g.length = (s.h / s.ps) * g.gw;
  g.dim = s.ps * s.ps * s.c;
  num_patches = s.n * g.length;
  return true;
}

unsigned grid_for(int64_t num_patches) {
  const int64_t blocks = (num_patches + kWarps - 1) / kWarps;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

template <typename T, typename C, int V>
cudaError_t row_fwd(const void* pred, const void* imgs, void* err, const Geo& g, int64_t n, int64_t bytes,
                    bool norm_pix, int p, cudaStream_t stream) {
  auto kernel = prl_row_fwd_kernel<T, C, V>;
  if (!allow_row_smem(kernel, bytes)) return cudaGetLastError();
  kernel<<<static_cast<unsigned>(n * (g.h / g.ps)), kRowThreads, static_cast<size_t>(bytes), stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(imgs), static_cast<C*>(err), g, norm_pix, p);
  return cudaGetLastError();
}

template <typename T, typename C>
cudaError_t fwd_typed(const void* pred, const void* imgs, void* err, const Geo& g, int64_t np, bool norm_pix, int p,
                      cudaStream_t stream) {
  const int64_t n = np / g.length;
  const int64_t bytes = row_smem_bytes<C>(g, n);
  if (bytes > 0) {
    if (row_packed<T>(g, {pred, imgs})) {
      return row_fwd<T, C, 16 / static_cast<int>(sizeof(T))>(pred, imgs, err, g, n, bytes, norm_pix, p, stream);
    }
    return row_fwd<T, C, 1>(pred, imgs, err, g, n, bytes, norm_pix, p, stream);
  }
  prl_fwd_kernel<T, C><<<grid_for(np), kThreads, 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(imgs), static_cast<C*>(err), np, g, norm_pix, p);
  return cudaGetLastError();
}

template <typename T, typename C, int V>
cudaError_t row_bwd(const void* pred, const void* imgs, const void* weight, void* dpred, void* dimgs, const Geo& g,
                    int64_t n, int64_t bytes, bool norm_pix, int p, cudaStream_t stream) {
  auto kernel = prl_row_bwd_kernel<T, C, V>;
  if (!allow_row_smem(kernel, bytes)) return cudaGetLastError();
  kernel<<<static_cast<unsigned>(n * (g.h / g.ps)), kRowThreads, static_cast<size_t>(bytes), stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(imgs), static_cast<const C*>(weight), static_cast<T*>(dpred),
      static_cast<T*>(dimgs), g, norm_pix, p);
  return cudaGetLastError();
}

template <typename T, typename C>
cudaError_t bwd_typed(const void* pred, const void* imgs, const void* weight, void* dpred, void* dimgs, const Geo& g,
                      int64_t np, bool norm_pix, int p, cudaStream_t stream) {
  const int64_t n = np / g.length;
  const int64_t bytes = row_smem_bytes<C>(g, n);
  if (bytes > 0) {
    if (row_packed<T>(g, {pred, imgs, dpred, dimgs})) {
      return row_bwd<T, C, 16 / static_cast<int>(sizeof(T))>(pred, imgs, weight, dpred, dimgs, g, n, bytes, norm_pix,
                                                              p, stream);
    }
    return row_bwd<T, C, 1>(pred, imgs, weight, dpred, dimgs, g, n, bytes, norm_pix, p, stream);
  }
  prl_bwd_kernel<T, C><<<grid_for(np), kThreads, 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(imgs), static_cast<const C*>(weight), static_cast<T*>(dpred),
      static_cast<T*>(dimgs), np, g, norm_pix, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_patch_recon_loss_fwd(PrlDType dtype, const void* pred, const void* imgs, void* err, PrlShape shape,
                                        bool norm_pix, int p, cudaStream_t stream) {
  Geo g{};
  int64_t np = 0;
  if (!make_geo(shape, g, np) || (p != 1 && p != 2)) return cudaErrorInvalidValue;
  if (np == 0) return cudaSuccess;
  if (pred == nullptr || imgs == nullptr || err == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case PrlDType::kFloat32:
      return fwd_typed<float, float>(pred, imgs, err, g, np, norm_pix, p, stream);
    case PrlDType::kFloat16:
      return fwd_typed<__half, float>(pred, imgs, err, g, np, norm_pix, p, stream);
    case PrlDType::kBFloat16:
      return fwd_typed<__nv_bfloat16, float>(pred, imgs, err, g, np, norm_pix, p, stream);
    case PrlDType::kFloat64:
      return fwd_typed<double, double>(pred, imgs, err, g, np, norm_pix, p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_patch_recon_loss_bwd(PrlDType dtype, const void* pred, const void* imgs, const void* weight,
                                        void* dpred, void* dimgs, PrlShape shape, bool norm_pix, int p,
                                        cudaStream_t stream) {
  Geo g{};
  int64_t np = 0;
  if (!make_geo(shape, g, np) || (p != 1 && p != 2)) return cudaErrorInvalidValue;
  if (np == 0) return cudaSuccess;
  if (pred == nullptr || imgs == nullptr || weight == nullptr || dpred == nullptr || dimgs == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case PrlDType::kFloat32:
      return bwd_typed<float, float>(pred, imgs, weight, dpred, dimgs, g, np, norm_pix, p, stream);
    case PrlDType::kFloat16:
      return bwd_typed<__half, float>(pred, imgs, weight, dpred, dimgs, g, np, norm_pix, p, stream);
    case PrlDType::kBFloat16:
      return bwd_typed<__nv_bfloat16, float>(pred, imgs, weight, dpred, dimgs, g, np, norm_pix, p, stream);
    case PrlDType::kFloat64:
      return bwd_typed<double, double>(pred, imgs, weight, dpred, dimgs, g, np, norm_pix, p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace maep_fast
