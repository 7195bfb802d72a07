// Torch-free CUDA kernels of maep_fast::pgd_step; see pgd_step.cuh.
//
// L-inf: elementwise; grid.y walks samples (grid-stride), grid.x the
//        elements of a sample (grid-stride), so per-sample step/eps are read
//        once per thread and no 64-bit division per element is needed.
// L2:    one block per sample (grid-stride over samples); two block
//        reductions (||g||^2, then ||delta||^2) and a final write pass. Each
//        thread owns the same indices in every pass, so out == x is safe.
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

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) pgd_linf_kernel(const T* x, const T* __restrict__ g,
                                                             const T* __restrict__ x0, T* out,
                                                             PerSample<S> step, PerSample<S> eps,
                                                             int64_t batch, int64_t n, int direction, double cmin,
                                                             double cmax) {
  using C = typename Cvt<T>::C;
  const C lo = static_cast<C>(cmin);
  const C hi = static_cast<C>(cmax);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
    const C e = static_cast<C>(eps[b]);
    const int64_t off = b * n;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
      const C x0v = Cvt<T>::ld(x0[off + i]);
      C v = Cvt<T>::ld(x[off + i]) + ds * sign_of(Cvt<T>::ld(g[off + i]));  // ds*sign is exact
      v = nan_min(nan_max(v, x0v - e), x0v + e);
      out[off + i] = Cvt<T>::st(clamp_range(v, lo, hi));
    }
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads) pgd_l2_kernel(const T* x, const T* __restrict__ g,
                                                           const T* __restrict__ x0, T* out,
                                                           PerSample<S> step, PerSample<S> eps,
                                                           int64_t batch, int64_t n, int direction, double cmin,
                                                           double cmax) {
  using C = typename Cvt<T>::C;
  __shared__ C shm[32];
  const C lo = static_cast<C>(cmin);
  const C hi = static_cast<C>(cmax);
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    const int64_t off = b * n;
    const T* xb = x + off;
    const T* gb = g + off;
    const T* x0b = x0 + off;
    T* ob = out + off;
    const C ds = static_cast<C>(direction) * static_cast<C>(step[b]);
    const C e = static_cast<C>(eps[b]);

    C acc = C(0);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const C v = Cvt<T>::ld(gb[i]);
      acc += v * v;
    }
    const C gn = nan_max(sqrt_c(block_sum(acc, shm)), static_cast<C>(1e-12));

    acc = C(0);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const C d = (Cvt<T>::ld(xb[i]) + (ds * Cvt<T>::ld(gb[i])) / gn) - Cvt<T>::ld(x0b[i]);
      acc += d * d;
    }
    const C dn = sqrt_c(block_sum(acc, shm));
    const C f = dn > e ? e / nan_max(dn, static_cast<C>(1e-12)) : C(1);

    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const C x0v = Cvt<T>::ld(x0b[i]);
      const C d = (Cvt<T>::ld(xb[i]) + (ds * Cvt<T>::ld(gb[i])) / gn) - x0v;
      ob[i] = Cvt<T>::st(clamp_range(x0v + mul_rn(d, f), lo, hi));
    }
  }
}

}  // namespace

template <typename T, typename S>
cudaError_t launch_pgd_step_typed(const T* x, const T* grad, const T* x0, T* out, PerSample<S> step_size,
                                  PerSample<S> eps, int64_t batch, int64_t per_sample, PgdNorm norm, int direction,
                                  double clamp_min, double clamp_max, cudaStream_t stream) {
  static_assert(std::is_same<S, typename Cvt<T>::C>::value, "step/eps must be in the compute dtype");
  if (batch < 0 || per_sample < 0 || (direction != 1 && direction != -1) || !(clamp_min <= clamp_max)) {
    return cudaErrorInvalidValue;
  }
  if (batch == 0 || per_sample == 0) return cudaSuccess;
  if (x == nullptr || grad == nullptr || x0 == nullptr || out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (norm == PgdNorm::kLinf) {
    const int64_t grid_y = std::min<int64_t>(batch, 65535);
    const int64_t want_x = (per_sample + kThreads - 1) / kThreads;
    const int64_t cap_x = std::max<int64_t>(1, 8192 / grid_y);
    const dim3 grid(static_cast<unsigned>(std::min(want_x, cap_x)), static_cast<unsigned>(grid_y));
    pgd_linf_kernel<T, S><<<grid, kThreads, 0, stream>>>(x, grad, x0, out, step_size, eps, batch, per_sample,
                                                        direction, clamp_min, clamp_max);
  } else if (norm == PgdNorm::kL2) {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(batch, 65535)));
    pgd_l2_kernel<T, S><<<grid, kThreads, 0, stream>>>(x, grad, x0, out, step_size, eps, batch, per_sample,
                                                      direction, clamp_min, clamp_max);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template cudaError_t launch_pgd_step_typed<float, float>(const float*, const float*, const float*, float*,
                                                         PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm,
                                                         int, double, double, cudaStream_t);
template cudaError_t launch_pgd_step_typed<__half, float>(const __half*, const __half*, const __half*, __half*,
                                                          PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm,
                                                          int, double, double, cudaStream_t);
template cudaError_t launch_pgd_step_typed<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                                 const __nv_bfloat16*, __nv_bfloat16*, PerSample<float>, PerSample<float>, int64_t, int64_t, PgdNorm, int,
                                                                 double, double, cudaStream_t);
template cudaError_t launch_pgd_step_typed<double, double>(const double*, const double*, const double*, double*,
                                                           PerSample<double>, PerSample<double>, int64_t, int64_t, PgdNorm, int, double, double, cudaStream_t);

cudaError_t launch_pgd_step(PgdDType dtype, const void* x, const void* grad, const void* x0, void* out,
                            const void* step_size, double step_value, const void* eps, double eps_value,
                            int64_t batch, int64_t per_sample,
                            PgdNorm norm, int direction, double clamp_min, double clamp_max, cudaStream_t stream) {
  switch (dtype) {
    case PgdDType::kFloat32:
      return launch_pgd_step_typed<float, float>(
          static_cast<const float*>(x), static_cast<const float*>(grad), static_cast<const float*>(x0),
          static_cast<float*>(out), PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, stream);
    case PgdDType::kFloat16:
      return launch_pgd_step_typed<__half, float>(
          static_cast<const __half*>(x), static_cast<const __half*>(grad), static_cast<const __half*>(x0),
          static_cast<__half*>(out), PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, stream);
    case PgdDType::kBFloat16:
      return launch_pgd_step_typed<__nv_bfloat16, float>(
          static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(grad),
          static_cast<const __nv_bfloat16*>(x0), static_cast<__nv_bfloat16*>(out),
          PerSample<float>{static_cast<const float*>(step_size), static_cast<float>(step_value)},
          PerSample<float>{static_cast<const float*>(eps), static_cast<float>(eps_value)}, batch, per_sample, norm, direction,
          clamp_min, clamp_max, stream);
    case PgdDType::kFloat64:
      return launch_pgd_step_typed<double, double>(
          static_cast<const double*>(x), static_cast<const double*>(grad), static_cast<const double*>(x0),
          static_cast<double*>(out), PerSample<double>{static_cast<const double*>(step_size), static_cast<double>(step_value)},
          PerSample<double>{static_cast<const double*>(eps), static_cast<double>(eps_value)}, batch,
          per_sample, norm, direction, clamp_min, clamp_max, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace maep_fast
