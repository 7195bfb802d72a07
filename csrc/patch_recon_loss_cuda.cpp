// CUDA glue of maep_fast::patch_recon_loss / patch_recon_loss_backward:
// argument checks, device guard, the torch-free per-patch kernels
// (kernels/patch_recon_loss.cu) on the current stream; the tiny [N, L] mask
// weighting / reduction (forward) and per-patch weights (backward) are ATen
// ops on the same stream. Built only with MAEP_FAST_CUDA=ON (CMakeLists.txt).
#include "patch_recon_loss.h"

#include "kernels/patch_recon_loss.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

namespace maep_fast {
namespace {

cuda::PrlDType to_kernel_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return cuda::PrlDType::kFloat32;
    case at::kHalf:
      return cuda::PrlDType::kFloat16;
    case at::kBFloat16:
      return cuda::PrlDType::kBFloat16;
    case at::kDouble:
      return cuda::PrlDType::kFloat64;
    default:
      TORCH_CHECK(false, "maep_fast::patch_recon_loss: unsupported dtype ", st);
  }
}

at::ScalarType compute_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

cuda::PrlShape kernel_shape(const PrlGeometry& g) { return cuda::PrlShape{g.n, g.c, g.h, g.w, g.ps}; }

at::Tensor patch_recon_loss_cuda(const at::Tensor& pred_in, const at::Tensor& imgs_in,
                                 const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix, int64_t p,
                                 c10::string_view reduction) {
  const PrlGeometry g = check_patch_recon_loss_args("maep_fast::patch_recon_loss", c10::DeviceType::CUDA, pred_in,
                                                    imgs_in, mask, patch_size, p, reduction);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const auto ct = compute_dtype(pred.scalar_type());
  at::Tensor err = at::empty({g.n, g.length}, pred.options().dtype(ct));
  C10_CUDA_CHECK(cuda::launch_patch_recon_loss_fwd(to_kernel_dtype(pred.scalar_type()), pred.const_data_ptr(),
                                                   imgs.const_data_ptr(), err.mutable_data_ptr(), kernel_shape(g),
                                                   norm_pix, static_cast<int>(p),
                                                   c10::cuda::getCurrentCUDAStream(pred.device().index()).stream()));
  const bool has_mask = mask.has_value() && mask->defined();
  if (!has_mask) {  // every patch counts: reduce err itself (no all-ones mask allocated per call)
    at::Tensor out;
    switch (g.reduction) {
      case PrlReduction::kNone:
        out = err;
        break;
      case PrlReduction::kSum:
        out = err.sum();
        break;
      case PrlReduction::kMean:
        out = err.mean();
        break;
      case PrlReduction::kPerSample:
        out = err.mean(1);
        break;
    }
    return out.to(pred.scalar_type());
  }
  const at::Tensor m = mask->to(ct);
  const at::Tensor weighted = err * m;
  at::Tensor res;
  switch (g.reduction) {
    case PrlReduction::kNone:
      res = weighted;
      break;
    case PrlReduction::kSum:
      res = weighted.sum();
      break;
    case PrlReduction::kMean: {
      const at::Tensor den = m.sum();
      res = at::where(den > 0, weighted.sum() / den.clamp_min(1e-12), at::zeros_like(den));
      break;
    }
    case PrlReduction::kPerSample: {
      const at::Tensor den = m.sum(1);
      res = at::where(den > 0, weighted.sum(1) / den.clamp_min(1e-12), at::zeros_like(den));
      break;
    }
  }
  return res.to(pred.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> patch_recon_loss_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& pred_in, const at::Tensor& imgs_in,
    const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix, int64_t p,
    c10::string_view reduction) {
  const char* op = "maep_fast::patch_recon_loss_backward";
  const PrlGeometry g =
      check_patch_recon_loss_args(op, c10::DeviceType::CUDA, pred_in, imgs_in, mask, patch_size, p, reduction);
  check_prl_grad_out(op, g, grad_out, pred_in);
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const auto ct = compute_dtype(pred.scalar_type());
  const at::Tensor go = grad_out.to(ct);
  const bool has_mask = mask.has_value() && mask->defined();
  at::Tensor w;  // d loss / d err[n, l]
  if (!has_mask) {  // every patch counts: the weights follow from grad_out alone
    switch (g.reduction) {
      case PrlReduction::kNone:
        w = go;
        break;
      case PrlReduction::kSum:
        w = go.expand({g.n, g.length});
        break;
      case PrlReduction::kMean:
        w = (go / static_cast<double>(g.n * g.length)).expand({g.n, g.length});
        break;
      case PrlReduction::kPerSample:
        w = (go / static_cast<double>(g.length)).unsqueeze(1).expand({g.n, g.length});
        break;
    }
  }
  if (has_mask) {
    const at::Tensor m = mask->to(ct);
    switch (g.reduction) {
      case PrlReduction::kNone:
      case PrlReduction::kSum:
        w = go * m;
        break;
      case PrlReduction::kMean: {
        const at::Tensor den = m.sum();
        w = at::where(den > 0, go / den.clamp_min(1e-12), at::zeros_like(den)) * m;
        break;
      }
      case PrlReduction::kPerSample: {
        const at::Tensor den = m.sum(1);
        w = at::where(den > 0, go / den.clamp_min(1e-12), at::zeros_like(den)).unsqueeze(1) * m;
        break;
      }
    }
  }
  w = w.contiguous();
  at::Tensor dpred = at::empty(pred.sizes(), pred.options());
  at::Tensor dimgs = at::empty(imgs.sizes(), imgs.options());
  C10_CUDA_CHECK(cuda::launch_patch_recon_loss_bwd(
      to_kernel_dtype(pred.scalar_type()), pred.const_data_ptr(), imgs.const_data_ptr(), w.const_data_ptr(),
      dpred.mutable_data_ptr(), dimgs.mutable_data_ptr(), kernel_shape(g), norm_pix, static_cast<int>(p),
      c10::cuda::getCurrentCUDAStream(pred.device().index()).stream()));
  return {dpred, dimgs};
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CUDA, m) {
  m.impl("patch_recon_loss", &patch_recon_loss_cuda);
  m.impl("patch_recon_loss_backward", &patch_recon_loss_backward_cuda);
}

}  // namespace maep_fast
