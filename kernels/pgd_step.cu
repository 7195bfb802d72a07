// Torch-free CUDA kernels of maep_fast::pgd_step; see pgd_step.cuh.
//
// Designed for bandwidth: 128-bit loads and stores (16-byte packs) whenever the pointers are
// aligned and a sample's size is a multiple of the pack, grids of several waves, fp32 math for
// half / bfloat16 storage.
// L-inf: elementwise; grid.y walks samples (grid-stride), grid.x the packs of a sample.
// L2:    a sample of <= 4096 elements: one block per sample keeps x, g, x0 in registers (one
//        pass over memory, two block reductions); larger samples: three kernels per group of
//        samples that fits in half the L2 cache (partial sums of g^2; gradient norm + partial
//        sums of delta^2; projection and store), so the second and third re-read from L2.
//        Every element is read and written by the same thread, so out == x is safe.
// The products whose rounding matters (x0 + delta*f) use __fmul_rn /
// __dmul_rn so nvcc does not contract them into FMAs: results match the
// PyTorch reference (which rounds every operation) up to the norms'
// summation order.
#include "pgd_step.cuh"

#include "cvt.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace maep_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // multiple of 32 (block_sum relies on it)

using detail::Cvt;  // kernels/cvt.cuh

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sqrt_c(float a) { return sqrtf(a); }
__device__ __forceinline__ double sqrt_c(double a) { return sqrt(a); }

// NaN-propagating like torch.maximum / torch.minimum / torch.clamp / torch.sign.
template <typename C>
__device__ __forceinline__ C nan_max(C a, C b) {
  const C m = a < b ? b : a;
  return b != b ? b : m;
}
template <typename C>
__device__ __forceinline__ C nan_min(C a, C b) {
  const C m = b < a ? b : a;
  return b != b ? b : m;
}
template <typename C>
__device__ __forceinline__ C clamp_range(C v, C lo, C hi) {
  const C t = v < lo ? lo : v;
  return v > hi ? hi : t;
}
template <typename C>
__device__ __forceinline__ C sign_of(C g) {
  const C t = g > C(0) ? C(1) : g;
  return g < C(0) ? C(-1) : t;
}

// Sum over the block; every thread gets the result. shm: >= 32 entries.
template <typename C>
__device__ __forceinline__ C block_sum(C v, C* shm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  if (wid == 0) {
    const int nwarps = blockDim.x >> 5;
    v = lane < nwarps ? shm[lane] : C(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shm[0] = v;
  }
  __syncthreads();
  return shm[0];
}

// ---- the L2 step's formulas, one place each (the one-pass and the grouped kernels share them)
template <typename C>
__device__ __forceinline__ C l2_grad_norm(C sumsq) {  // torch: grad.norm().clamp_min(1e-12), NaN kept
  return nan_max(sqrt_c(sumsq), static_cast<C>(1e-12));
}
template <typename C>
__device__ __forceinline__ C l2_delta(C x, C g, C x0, C ds, C gn) {  // (x + ds * g / ||g||) - x0
  return (x + (ds * g) / gn) - x0;
}
template <typename C>
__device__ __forceinline__ C l2_factor(C delta_sumsq, C e) {  // where(||delta|| > e, e / ||delta||, 1)
  const C dn = sqrt_c(delta_sumsq);
  return dn > e ? e / nan_max(dn, static_cast<C>(1e-12)) : C(1);
}

// ---- 128-bit accesses ---------------------------------------------------------------------
// A pack of V elements read or written in one access: V = 16 bytes / sizeof(T) when every
// pointer is 16-byte aligned and a sample's element count is a multiple of V (then no pack
// straddles two samples), else V = 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- L-inf: elementwise ---------------------------------------------------------------------
// grid.y walks samples, grid.x the packs of a sample (both grid-stride): step/eps are read once
// per sample and no 64-bit division per element is needed. out may be x (each pack is read, then
// written, by the same thread).
template <typename T, typename S, int V>
__global__ void __launch_bounds__(kThreads) pgd_linf_kernel(const T* x, const T* __restrict__ g,
                                                             const T* __restrict__ x0, T* out, PerSample<S> step,
                                                             PerSample<S> eps, int64_t batch, int64_t npack,
                                                             int direction, double cmin, double cmax) {
  using C = typename Cvt<T>::C;
  using P = Pack<T, V>;
  const C lo = static_cast<C>(cmin);
  const C hi = static_cast<C>(cmax);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
    const C e = static_cast<C>(eps[b]);
    const P* xp = reinterpret_cast<const P*>(x) + b * npack;
    const P* gp = reinterpret_cast<const P*>(g) + b * npack;
    const P* x0p = reinterpret_cast<const P*>(x0) + b * npack;
    P* op = reinterpret_cast<P*>(out) + b * npack;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < npack; i += stride) {
      const P xv = xp[i], gv = gp[i], x0v = x0p[i];
      P o;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const C c0 = Cvt<T>::ld(x0v.v[k]);
        C v = Cvt<T>::ld(xv.v[k]) + ds * sign_of(Cvt<T>::ld(gv.v[k]));  // ds*sign is exact
        v = nan_min(nan_max(v, c0 - e), c0 + e);
        o.v[k] = Cvt<T>::st(clamp_range(v, lo, hi));
      }
      op[i] = o;
    }
  }
}

// ---- L2, a sample that fits in registers: one pass over memory ------------------------------
// One block per sample (grid-stride). Each thread loads its ITEMS packs of x, g, x0 once into
// registers; the two norms are block reductions over registers; the result is written once:
// HBM traffic is the minimal 3 reads + 1 write. Needs npack <= kThreads * ITEMS.
template <typename T, typename S, int V, int ITEMS>
__global__ void __launch_bounds__(kThreads) pgd_l2_resident_kernel(const T* x, const T* __restrict__ g,
                                                                    const T* __restrict__ x0, T* out,
                                                                    PerSample<S> step, PerSample<S> eps,
                                                                    int64_t batch, int64_t npack, int direction,
                                                                    double cmin, double cmax) {
  using C = typename Cvt<T>::C;
  using P = Pack<T, V>;
  __shared__ C shm[32];
  const C lo = static_cast<C>(cmin);
  const C hi = static_cast<C>(cmax);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const P* xp = reinterpret_cast<const P*>(x) + b * npack;
    const P* gp = reinterpret_cast<const P*>(g) + b * npack;
    const P* x0p = reinterpret_cast<const P*>(x0) + b * npack;
    P* op = reinterpret_cast<P*>(out) + b * npack;
    const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
    const C e = static_cast<C>(eps[b]);
    C xr[ITEMS][V], gr[ITEMS][V], cr[ITEMS][V];
    C acc = C(0);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t i = static_cast<int64_t>(it) * kThreads + threadIdx.x;
      if (i < npack) {
        const P xv = xp[i], gv = gp[i], x0v = x0p[i];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          xr[it][k] = Cvt<T>::ld(xv.v[k]);
          gr[it][k] = Cvt<T>::ld(gv.v[k]);
          cr[it][k] = Cvt<T>::ld(x0v.v[k]);
          acc += gr[it][k] * gr[it][k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) xr[it][k] = gr[it][k] = cr[it][k] = C(0);
      }
    }
    const C gn = l2_grad_norm(block_sum(acc, shm));
    acc = C(0);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const C d = l2_delta(xr[it][k], gr[it][k], cr[it][k], ds, gn);  // padding slots: 0 + 0/gn - 0 = 0
        xr[it][k] = d;
        acc += d * d;
      }
    }
    const C f = l2_factor(block_sum(acc, shm), e);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t i = static_cast<int64_t>(it) * kThreads + threadIdx.x;
      if (i < npack) {
        P o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = Cvt<T>::st(clamp_range(cr[it][k] + mul_rn(xr[it][k], f), lo, hi));
        op[i] = o;
      }
    }
  }
}

// ---- L2, samples too large for one block: three kernels per L2-sized group of samples -------
// (1) partial sums of g^2 per (sample, part); (2) the gradient norm (every block re-reduces its
// sample's partials, deterministically) and partial sums of delta^2; (3) both norms, the
// projection factor, x0 + delta * f, clamp, store. The host launches the three for a group of
// samples whose x, g, x0 fit in half the L2 cache, so (2) and (3) re-read g, x, x0 from L2, not
// HBM: 3 reads + 1 write of HBM traffic per element when the group fits (the first kernel's
// read of g is the only extra one when it does not). Partials: ws[0 .. 2 * batch * parts).
__device__ __forceinline__ void chunk_bounds(int64_t npack, int64_t parts, int64_t part, int64_t* begin,
                                             int64_t* end) {
  const int64_t per = (npack + parts - 1) / parts;
  *begin = part * per;
  *end = min(npack, *begin + per);
}

template <typename C>
__device__ __forceinline__ C sum_partials(const C* part, int64_t parts, C* shm) {
  C acc = C(0);
  for (int64_t i = threadIdx.x; i < parts; i += blockDim.x) acc += part[i];
  return block_sum(acc, shm);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) pgd_l2_gsq_kernel(const T* __restrict__ g, typename Cvt<T>::C* gpart,
                                                               int64_t b0, int64_t npack, int64_t parts) {
  using C = typename Cvt<T>::C;
  using P = Pack<T, V>;
  __shared__ C shm[32];
  const int64_t b = b0 + blockIdx.y;
  int64_t begin, end;
  chunk_bounds(npack, parts, blockIdx.x, &begin, &end);
  const P* gp = reinterpret_cast<const P*>(g) + b * npack;
  C acc = C(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const P gv = gp[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C c = Cvt<T>::ld(gv.v[k]);
      acc += c * c;
    }
  }
  acc = block_sum(acc, shm);
  if (threadIdx.x == 0) gpart[b * parts + blockIdx.x] = acc;
}

template <typename T, typename S, int V>
__global__ void __launch_bounds__(kThreads) pgd_l2_dsq_kernel(const T* x, const T* __restrict__ g,
                                                               const T* __restrict__ x0,
                                                               const typename Cvt<T>::C* gpart,
                                                               typename Cvt<T>::C* dpart, PerSample<S> step,
                                                               int64_t b0, int64_t npack, int64_t parts,
                                                               int direction) {
  using C = typename Cvt<T>::C;
  using P = Pack<T, V>;
  __shared__ C shm[32];
  const int64_t b = b0 + blockIdx.y;
  const C gn = l2_grad_norm(sum_partials(gpart + b * parts, parts, shm));
  const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
  int64_t begin, end;
  chunk_bounds(npack, parts, blockIdx.x, &begin, &end);
  const P* xp = reinterpret_cast<const P*>(x) + b * npack;
  const P* gp = reinterpret_cast<const P*>(g) + b * npack;
  const P* x0p = reinterpret_cast<const P*>(x0) + b * npack;
  C acc = C(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const P xv = xp[i], gv = gp[i], x0v = x0p[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C d = l2_delta(Cvt<T>::ld(xv.v[k]), Cvt<T>::ld(gv.v[k]), Cvt<T>::ld(x0v.v[k]), ds, gn);
      acc += d * d;
    }
  }
  acc = block_sum(acc, shm);
  if (threadIdx.x == 0) dpart[b * parts + blockIdx.x] = acc;
}

template <typename T, typename S, int V>
__global__ void __launch_bounds__(kThreads) pgd_l2_apply_kernel(const T* x, const T* __restrict__ g,
                                                                 const T* __restrict__ x0, T* out,
                                                                 const typename Cvt<T>::C* gpart,
                                                                 const typename Cvt<T>::C* dpart, PerSample<S> step,
                                                                 PerSample<S> eps, int64_t b0, int64_t npack,
                                                                 int64_t parts, int direction, double cmin,
                                                                 double cmax) {
  using C = typename Cvt<T>::C;
  using P = Pack<T, V>;
  __shared__ C shm[32];
  const int64_t b = b0 + blockIdx.y;
  const C gn = l2_grad_norm(sum_partials(gpart + b * parts, parts, shm));
  const C f = l2_factor(sum_partials(dpart + b * parts, parts, shm), static_cast<C>(eps[b]));
  const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
  const C lo = static_cast<C>(cmin);
  const C hi = static_cast<C>(cmax);
  int64_t begin, end;
  chunk_bounds(npack, parts, blockIdx.x, &begin, &end);
  const P* xp = reinterpret_cast<const P*>(x) + b * npack;
  const P* gp = reinterpret_cast<const P*>(g) + b * npack;
  const P* x0p = reinterpret_cast<const P*>(x0) + b * npack;
  P* op = reinterpret_cast<P*>(out) + b * npack;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const P xv = xp[i], gv = gp[i], x0v = x0p[i];
    P o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C c0 = Cvt<T>::ld(x0v.v[k]);
      const C d = l2_delta(Cvt<T>::ld(xv.v[k]), Cvt<T>::ld(gv.v[k]), c0, ds, gn);
      o.v[k] = Cvt<T>::st(clamp_range(c0 + mul_rn(d, f), lo, hi));
    }
    op[i] = o;
  }
}

// Elements of a sample one thread keeps in registers in the resident L2 kernel (V * ITEMS).
constexpr int kResidentElems = 16;

// Partial sums per sample (large L2 path): about 8 packs per thread per block, at most 1024.
inline int64_t l2_parts(int64_t npack) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * 8;
  return std::max<int64_t>(1, std::min<int64_t>(1024, (npack + per_block - 1) / per_block));
}

inline int64_t l2_cache_bytes() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error: a fallback size is fine
    return 40LL << 20;
  }
  return bytes > 0 ? bytes : (40LL << 20);
}

template <typename T, typename S, int V>
cudaError_t launch_typed_v(const T* x, const T* grad, const T* x0, T* out, PerSample<S> step, PerSample<S> eps,
                           int64_t batch, int64_t per_sample, PgdNorm norm, int direction, double clamp_min,
                           double clamp_max, void* workspace, cudaStream_t stream) {
  using C = typename Cvt<T>::C;
  const int64_t npack = per_sample / V;
  if (norm == PgdNorm::kLinf) {
    const int64_t grid_y = std::min<int64_t>(batch, 65535);
    const int64_t want_x = (npack + kThreads - 1) / kThreads;
    const int64_t cap_x = std::max<int64_t>(1, 16384 / grid_y);  // a few waves over the SMs, then grid-stride
    const dim3 grid(static_cast<unsigned>(std::min(want_x, cap_x)), static_cast<unsigned>(grid_y));
    pgd_linf_kernel<T, S, V><<<grid, kThreads, 0, stream>>>(x, grad, x0, out, step, eps, batch, npack, direction,
                                                           clamp_min, clamp_max);
    return cudaGetLastError();
  }
  if (npack <= static_cast<int64_t>(kThreads) * (kResidentElems / V)) {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
    pgd_l2_resident_kernel<T, S, V, kResidentElems / V><<<grid, kThreads, 0, stream>>>(
        x, grad, x0, out, step, eps, batch, npack, direction, clamp_min, clamp_max);
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t parts = l2_parts(npack);
  C* gpart = static_cast<C*>(workspace);
  C* dpart = gpart + batch * parts;
  const int64_t sample_bytes = 3 * per_sample * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(65535, (l2_cache_bytes() / 2) / sample_bytes));
  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(std::min(group, batch - b0)));
    pgd_l2_gsq_kernel<T, V><<<grid, kThreads, 0, stream>>>(grad, gpart, b0, npack, parts);
    pgd_l2_dsq_kernel<T, S, V><<<grid, kThreads, 0, stream>>>(x, grad, x0, gpart, dpart, step, b0, npack, parts,
                                                             direction);
    pgd_l2_apply_kernel<T, S, V><<<grid, kThreads, 0, stream>>>(x, grad, x0, out, gpart, dpart, step, eps, b0, npack,
                                                               parts, direction, clamp_min, clamp_max);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t pgd_step_workspace_bytes(PgdDType dtype, int64_t batch, int64_t per_sample, PgdNorm norm) {
  // Only the large-sample L2 path needs one: 2 * batch * parts partial sums in the compute dtype.
  // Sized with the unpacked count (V = 1 gives the most parts): an upper bound for every V.
  if (norm != PgdNorm::kL2 || batch <= 0 || per_sample <= static_cast<int64_t>(kThreads) * kResidentElems) return 0;
  const int64_t compute = dtype == PgdDType::kFloat64 ? 8 : 4;
  return 2 * batch * l2_parts(per_sample) * compute;
}

template <typename T, typename S>
cudaError_t launch_pgd_step_typed(const T* x, const T* grad, const T* x0, T* out, PerSample<S> step_size,
                                  PerSample<S> eps, int64_t batch, int64_t per_sample, PgdNorm norm, int direction,
                                  double clamp_min, double clamp_max, void* workspace, cudaStream_t stream) {
  static_assert(std::is_same<S, typename Cvt<T>::C>::value, "step/eps must be in the compute dtype");
  if (batch < 0 || per_sample < 0 || (direction != 1 && direction != -1) || !(clamp_min <= clamp_max)) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0 || per_sample == 0) return cudaSuccess;
  if (x == nullptr || grad == nullptr || x0 == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (norm != PgdNorm::kLinf && norm != PgdNorm::kL2) return cudaErrorInvalidValue;
  constexpr int V = kVec<T>;
  const bool packed = per_sample % V == 0 && aligned16(x) && aligned16(grad) && aligned16(x0) && aligned16(out);
  if (packed) {
    return launch_typed_v<T, S, V>(x, grad, x0, out, step_size, eps, batch, per_sample, norm, direction, clamp_min,
                                   clamp_max, workspace, stream);
  }
  return launch_typed_v<T, S, 1>(x, grad, x0, out, step_size, eps, batch, per_sample, norm, direction, clamp_min,
                                 clamp_max, workspace, stream);
}

template cudaError_t launch_pgd_step_typed<float, float>(const float*, const float*, const float*, float*,
                                                         PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm,
                                                         int, double, double, void*, cudaStream_t);
template cudaError_t launch_pgd_step_typed<__half, float>(const __half*, const __half*, const __half*, __half*,
                                                          PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm,
                                                          int, double, double, void*, cudaStream_t);
template cudaError_t launch_pgd_step_typed<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                 const __nv_bfloat16*, __nv_bfloat16*, PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm, int,
                                                                 double, double, void*, cudaStream_t);
template cudaError_t launch_pgd_step_typed<double, double>(const double*, const double*, const double*, double*,
                                                           PerSample<double>, PerSample<double>, int64_t, int64_t, PgdNorm, int, double, double, void*, cudaStream_t);

cudaError_t launch_pgd_step(PgdDType dtype, const void* x, const void* grad, const void* x0, void* out,
                            const void* step_size, double step_value, const void* eps, double eps_value,
                            int64_t batch, int64_t per_sample,
                            PgdNorm norm, int direction, double clamp_min, double clamp_max, void* workspace,
                            cudaStream_t stream) {
  switch (dtype) {
    case PgdDType::kFloat32:
      return launch_pgd_step_typed<float, float>(
          static_cast<const float*>(x), static_cast<const float*>(grad), static_cast<const float*>(x0),
          static_cast<float*>(out), PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, workspace, stream);
    case PgdDType::kFloat16:
      return launch_pgd_step_typed<__half, float>(
          static_cast<const __half*>(x), static_cast<const __half*>(grad), static_cast<const __half*>(x0),
          static_cast<__half*>(out), PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, workspace, stream);
    case PgdDType::kBFloat16:
      return launch_pgd_step_typed<__nv_bfloat16, float>(
          static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(grad),
          static_cast<const __nv_bfloat16*>(x0), static_cast<__nv_bfloat16*>(out),
          PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch, per_sample, norm, direction,
          clamp_min, clamp_max, workspace, stream);
    case PgdDType::kFloat64:
      return launch_pgd_step_typed<double, double>(
          static_cast<const double*>(x), static_cast<const double*>(grad), static_cast<const double*>(x0),
          static_cast<double*>(out), PerSample<double>{static_cast<const double*>(step_size), static_cast<double>(step_value)},
          PerSample<double>{static_cast<const double*>(eps), static_cast<double>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace maep_fast
