// CUDA glue of maep_fast::masked_patch_attention_fwd / _bwd: argument checks,
// device guard, visible-index lists (stable sort of ~keep: visible indices
// first, ascending; counts = keep.sum(1)), zero-filled outputs (hidden rows),
// launch of the torch-free kernels (kernels/masked_patch_attention.cu) on the
// current stream. CUDA kernels: fp16 / bf16 on tensor cores (fp32 accumulation
// and statistics), fp32 exact (scalar fp32 math); head dim 1 <= D <= 128, L and
// grid limits of kernels/masked_patch_attention.cuh; everything else (fp64, D > 128,
// too long / too many sequences) is refused here with a TORCH_CHECK naming the
// argument, before any allocation or launch (use the cpp or torch backend).
// Built only with MAEP_FAST_CUDA=ON (CMakeLists.txt).
#include "masked_patch_attention.h"

#include "kernels/masked_patch_attention.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace maep_fast {
namespace {

cuda::MpaDType to_kernel_dtype(const char* op, at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return cuda::MpaDType::kFloat32;
    case at::kHalf:
      return cuda::MpaDType::kFloat16;
    case at::kBFloat16:
      return cuda::MpaDType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernel supports q of dtype float32, float16 or bfloat16, got ", st,
                  " (use the cpp or torch backend for float64)");
  }
}

// Every input the CUDA kernels cannot run is refused here, before any allocation or
// launch (kernels/masked_patch_attention.cuh lists the limits; the launchers would
// only return cudaErrorInvalidValue).
void check_cuda_limits(const char* op, const MpaGeometry& g) {
  TORCH_CHECK(g.d >= 1 && g.d <= cuda::kMpaMaxHeadDim, op, ": the CUDA kernel supports head dim D (q.size(3)) in [1, ",
              cuda::kMpaMaxHeadDim, "], got q of shape [", g.b, ", ", g.h, ", ", g.l, ", ", g.d,
              "] (use the cpp or torch backend)");
  TORCH_CHECK(g.b >= 1 && g.h >= 1 && g.l >= 1, op, ": q must have B, H, L >= 1, got q of shape [", g.b, ", ", g.h,
              ", ", g.l, ", ", g.d, "]");
  TORCH_CHECK(g.l <= cuda::kMpaMaxSeqLen, op, ": the CUDA kernel supports sequence length L (q.size(2)) <= ",
              cuda::kMpaMaxSeqLen, " (its grid and int32 visible-index lists), got L = ", g.l);
  TORCH_CHECK(g.b <= cuda::kMpaMaxGridBlocks / g.h, op, ": B * H = ", g.b, " * ", g.h,
              " of q is too large for the CUDA kernel's grid (limit ", cuda::kMpaMaxGridBlocks, ")");
  const int64_t row_blocks = (g.l + cuda::kMpaRowsPerBlock - 1) / cuda::kMpaRowsPerBlock;
  TORCH_CHECK(g.b * g.h <= cuda::kMpaMaxGridBlocks / row_blocks, op, ": q of shape [", g.b, ", ", g.h, ", ", g.l,
              ", ", g.d, "] needs B * H * ceil(L / ", cuda::kMpaRowsPerBlock,
              ") blocks, more than the CUDA kernel's grid limit ", cuda::kMpaMaxGridBlocks);
}

// (vis [B, L] int32 visible-first, count [B] int32), or undefined tensors for keep = None.
std::pair<at::Tensor, at::Tensor> visible_lists(const c10::optional<at::Tensor>& keep) {
  if (!keep.has_value() || !keep->defined()) return {at::Tensor(), at::Tensor()};
  const at::Tensor hidden = keep->logical_not().to(at::kByte);
  const at::Tensor vis = std::get<1>(at::sort(hidden, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  return {vis.to(at::kInt).contiguous(), keep->sum(1).to(at::kInt).contiguous()};
}

const int32_t* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<int32_t>() : nullptr; }

std::tuple<at::Tensor, at::Tensor> masked_patch_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                   const at::Tensor& v_in,
                                                                   const c10::optional<at::Tensor>& keep,
                                                                   double scale) {
  const char* op = "maep_fast::masked_patch_attention_fwd";
  const MpaGeometry g = check_mpa_args(op, c10::DeviceType::CUDA, q_in, k_in, v_in, keep, scale);
  const auto kdt = to_kernel_dtype(op, q_in.scalar_type());
  check_cuda_limits(op, g);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto [vis, count] = visible_lists(keep);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::zeros({g.b, g.h, g.l}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_masked_patch_attention_fwd(
      kdt, q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), out.mutable_data_ptr(),
      lse.mutable_data_ptr<float>(), ptr_or_null(vis), ptr_or_null(count), cuda::MpaShape{g.b, g.h, g.l, g.d},
      static_cast<float>(scale), c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_patch_attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& keep, double scale) {
  const char* op = "maep_fast::masked_patch_attention_bwd";
  const MpaGeometry g = check_mpa_args(op, c10::DeviceType::CUDA, q_in, k_in, v_in, keep, scale);
  check_mpa_bwd_extra(op, g, q_in, grad_out_in, out_in, lse_in);
  const auto kdt = to_kernel_dtype(op, q_in.scalar_type());
  check_cuda_limits(op, g);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous(), o = out_in.contiguous(), lse = lse_in.contiguous();
  const auto [vis, count] = visible_lists(keep);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(q.sizes(), q.options());
  at::Tensor dv = at::zeros(q.sizes(), q.options());
  at::Tensor delta = at::empty({g.b, g.h, g.l}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_masked_patch_attention_bwd(
      kdt, go.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), o.const_data_ptr(),
      lse.const_data_ptr<float>(), delta.mutable_data_ptr<float>(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
      dv.mutable_data_ptr(), ptr_or_null(vis), ptr_or_null(count), cuda::MpaShape{g.b, g.h, g.l, g.d},
      static_cast<float>(scale), c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return {dq, dk, dv};
}

at::Tensor masked_patch_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const c10::optional<at::Tensor>& keep, double scale) {
  return std::get<0>(masked_patch_attention_fwd_cuda(q, k, v, keep, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CUDA, m) {
  m.impl("masked_patch_attention", &masked_patch_attention_cuda);
  m.impl("masked_patch_attention_fwd", &masked_patch_attention_fwd_cuda);
  m.impl("masked_patch_attention_bwd", &masked_patch_attention_bwd_cuda);
}

}  // namespace maep_fast
