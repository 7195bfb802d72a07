// CUDA glue of maep_fast::pgd_step / pgd_step_: argument checks, device
// guard, launch of the torch-free kernels (kernels/pgd_step.cu) on the
// current stream (c10::cuda::getCurrentCUDAStream is what
// at::cuda::getCurrentCUDAStream re-exports; c10/cuda/CUDAStream.h avoids
// ATen/cuda/CUDAContext.h's cuBLAS/cuSPARSE includes).
// Built only with MAEP_FAST_CUDA=ON (CMakeLists.txt).
#include "pgd_step.h"

#include "kernels/pgd_step.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace maep_fast {
namespace {

cuda::PgdDType to_kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return cuda::PgdDType::kFloat32;
    case at::kHalf:
      return cuda::PgdDType::kFloat16;
    case at::kBFloat16:
      return cuda::PgdDType::kBFloat16;
    case at::kDouble:
      return cuda::PgdDType::kFloat64;
    default:
      TORCH_CHECK(false, "maep_fast::pgd_step: unsupported dtype ", st);
  }
}

const void* values_or_null(PgdScalarArg a) { return a.tensor == nullptr ? nullptr : a.tensor->const_data_ptr(); }

void launch(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0, PgdScalarArg step_size,
            PgdScalarArg eps, const at::Tensor& out, bool l2, int64_t direction, double clamp_min,
            double clamp_max) {
  const int64_t batch = x.size(0);
  const int64_t n = batch == 0 ? 0 : x.numel() / batch;
  if (batch == 0 || n == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto kdt = to_kernel_dtype(x.scalar_type());
  const auto knorm = l2 ? cuda::PgdNorm::kL2 : cuda::PgdNorm::kLinf;
  // Partial sums of the large-sample L2 path: from the caching allocator, on the current stream.
  const int64_t ws_bytes = cuda::pgd_step_workspace_bytes(kdt, batch, n, knorm);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  const cudaError_t err = cuda::launch_pgd_step(
      kdt, x.const_data_ptr(), grad.const_data_ptr(), x0.const_data_ptr(), out.mutable_data_ptr(),
      values_or_null(step_size), step_size.value, values_or_null(eps), eps.value, batch, n, knorm,
      static_cast<int>(direction), clamp_min, clamp_max, ws_bytes > 0 ? ws.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  C10_CUDA_CHECK(err);
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CUDA, m) { PgdStepKernels<c10::DeviceType::CUDA, &launch>::register_in(m); }

}  // namespace maep_fast
