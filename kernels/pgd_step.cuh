// Torch-free CUDA implementation of the fused PGD / purification step
// (maep_fast::pgd_step). Raw pointers, sizes and a stream; compiled by nvcc
// without any torch header, so it can be compile-checked on a CPU machine.
//
// Semantics (per sample b, the rest of the tensor flattened to n elements;
// s = step[b], e = eps[b], d = direction in {+1, -1}):
//   L-inf: x' = clamp(min(max(x + d*s*sign(g), x0 - e), x0 + e), lo, hi)
//   L2:    gn = max(||g||_2, 1e-12);  delta = (x + (d*s)*g/gn) - x0
//          f  = ||delta|| > e ? e / max(||delta||, 1e-12) : 1
//          x' = clamp(x0 + delta*f, lo, hi)
// Storage T in {float, __half, __nv_bfloat16} with fp32 math and fp32 step /
// eps arrays; T = double computes in double with double step / eps.
// `out` may equal `x` (in-place); other overlaps are not allowed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace maep_fast {
namespace cuda {

enum class PgdNorm : int { kLinf = 0, kL2 = 1 };

// A per-sample scalar (step size or eps): values[b] when `values` is set (a [batch] device
// array), else `scalar` for every sample (a Python float: no device buffer, no copy per call).
template <typename S>
struct PerSample {
  const S* values;
  S scalar;
  __host__ __device__ S operator[](int64_t b) const { return values != nullptr ? values[b] : scalar; }
};
enum class PgdDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Typed launcher, T in {float, __half, __nv_bfloat16, double};
// S = float (double for T = double).
template <typename T, typename S>
cudaError_t launch_pgd_step_typed(const T* x, const T* grad, const T* x0, T* out, PerSample<S> step_size,
                                  PerSample<S> eps, int64_t batch, int64_t per_sample, PgdNorm norm, int direction,
                                  double clamp_min, double clamp_max, void* workspace, cudaStream_t stream);

// Type-erased launcher used by the torch glue (csrc/pgd_step_cuda.cpp).
// x, grad, x0, out: [batch, per_sample] contiguous in `dtype`;
// step_size, eps: [batch] float32 (float64 when dtype is kFloat64), or nullptr to use
// step_value / eps_value for every sample.
// Returns cudaSuccess, cudaErrorInvalidValue for bad arguments, or the launch error.
cudaError_t launch_pgd_step(PgdDType dtype, const void* x, const void* grad, const void* x0, void* out,
                            const void* step_size, double step_value, const void* eps, double eps_value,
                            int64_t batch, int64_t per_sample,
                            PgdNorm norm, int direction, double clamp_min, double clamp_max, void* workspace,
                            cudaStream_t stream);

// Bytes of device workspace launch_pgd_step needs (0: pass nullptr): the large-sample L2 path
// keeps per-(sample, part) partial sums there.
int64_t pgd_step_workspace_bytes(PgdDType dtype, int64_t batch, int64_t per_sample, PgdNorm norm);

}  // namespace cuda
}  // namespace maep_fast
