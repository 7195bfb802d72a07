// Torch-free CUDA kernels of maep_fast::patch_recon_loss; see patch_recon_loss.cuh.
//
// One warp per patch (grid-stride over patches), kWarps warps per block.
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

// mean and std of patch (n, l) (std = 1 without norm_pix, mean = 0).
template <typename T, typename C>
__device__ __forceinline__ void patch_stats(const T* img, const Geo& g, int64_t l, bool norm_pix, int lane, C& mean,
                                            C& sd) {
  mean = C(0);
  sd = C(1);
  if (!norm_pix) return;
  C s = C(0);
  for (int64_t j = lane; j < g.dim; j += 32) s += Cvt<T>::ld(img[img_offset(g, l, j)]);
  mean = warp_sum(s) / static_cast<C>(g.dim);
  C ss = C(0);
  for (int64_t j = lane; j < g.dim; j += 32) {
    const C d = Cvt<T>::ld(img[img_offset(g, l, j)]) - mean;
    ss += d * d;
  }
  const C var = warp_sum(ss) / static_cast<C>(g.dim - 1);  // dim == 1: NaN, like torch.var
  sd = sqrt(var + static_cast<C>(1e-6));
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
      const C gv = p == 2 ? k * d : k * (d > C(0) ? C(1) : (d < C(0) ? C(-1) : C(0)));
      dp[j] = Cvt<T>::st(gv);
      sg -= gv;  // d target = -gv
      sgx -= gv * t;
    }
    C mg = C(0), kx = C(0);
    if (norm_pix) {
      mg = warp_sum(sg) / static_cast<C>(g.dim);
      kx = warp_sum(sgx) / (static_cast<C>(g.dim - 1) * sd);
    }
    for (int64_t j = lane; j < g.dim; j += 32) {
      const int64_t off = img_offset(g, l, j);
      const C t = (Cvt<T>::ld(img[off]) - mean) / sd;
      const C d = Cvt<T>::ld(pr[j]) - t;
      const C gt = -(p == 2 ? k * d : k * (d > C(0) ? C(1) : (d < C(0) ? C(-1) : C(0))));
      dimg[off] = Cvt<T>::st(norm_pix ? (gt - mg) / sd - t * kx : gt);
    }
  }
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

template <typename T, typename C>
cudaError_t fwd_typed(const void* pred, const void* imgs, void* err, const Geo& g, int64_t np, bool norm_pix, int p,
                      cudaStream_t stream) {
  prl_fwd_kernel<T, C><<<grid_for(np), kThreads, 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(imgs), static_cast<C*>(err), np, g, norm_pix, p);
  return cudaGetLastError();
}

template <typename T, typename C>
cudaError_t bwd_typed(const void* pred, const void* imgs, const void* weight, void* dpred, void* dimgs, const Geo& g,
                      int64_t np, bool norm_pix, int p, cudaStream_t stream) {
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
