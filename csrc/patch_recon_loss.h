// Shared argument checks of maep_fast::patch_recon_loss / patch_recon_loss_backward
// (CPU kernel in patch_recon_loss_cpu.cpp, CUDA glue in patch_recon_loss_cuda.cpp).
//
// The op's contract (argument rules, loss shape, dtypes) is stated once, in the module
// docstring of maep_fast/ops/patch_recon_loss.py. These checks are the native side's own
// guard of it (a direct torch.ops call reaches no Python); the Python entry point relies on
// them for eager CPU calls and, when they refuse one, raises its own named error instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string_view>
#include <vector>

namespace maep_fast {

enum class PrlReduction : int { kMean = 0, kSum = 1, kPerSample = 2, kNone = 3 };

struct PrlGeometry {
  int64_t n, c, h, w, ps, gh, gw, length, dim;  // dim = ps*ps*c
  PrlReduction reduction;
};

inline PrlReduction parse_prl_reduction(const char* op, std::string_view reduction) {
  if (reduction == "mean") return PrlReduction::kMean;
  if (reduction == "sum") return PrlReduction::kSum;
  if (reduction == "per_sample") return PrlReduction::kPerSample;
  if (reduction == "none") return PrlReduction::kNone;
  TORCH_CHECK(false, op, ": reduction must be 'mean', 'sum', 'per_sample' or 'none', got '", reduction, "'");
}

// Shape of the loss for a reduction (the contract's; _out_shape on the Python side).
inline std::vector<int64_t> prl_out_shape(const PrlGeometry& g) {
  switch (g.reduction) {
    case PrlReduction::kPerSample:
      return {g.n};
    case PrlReduction::kNone:
      return {g.n, g.length};
    default:
      return {};
  }
}

// Checks every argument against the contract; returns the geometry.
inline PrlGeometry check_patch_recon_loss_args(const char* op, c10::DeviceType device_type, const at::Tensor& pred,
                                               const at::Tensor& imgs, const c10::optional<at::Tensor>& mask,
                                               int64_t patch_size, int64_t p, std::string_view reduction) {
  TORCH_CHECK(pred.defined() && imgs.defined(), op, ": pred and imgs must be defined tensors");
  TORCH_CHECK(pred.device().type() == device_type, op, ": pred must be on ", c10::DeviceTypeName(device_type),
              " for this kernel, got ", pred.device());
  TORCH_CHECK(imgs.device() == pred.device(), op, ": imgs is on ", imgs.device(), " but pred is on ", pred.device());
  const auto st = pred.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": pred must have dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(imgs.scalar_type() == st, op, ": imgs must have the dtype of pred (", st, "), got ",
              imgs.scalar_type());
  TORCH_CHECK(imgs.dim() == 4, op, ": imgs must have rank 4 [N, C, H, W], got shape ", imgs.sizes());
  TORCH_CHECK(pred.dim() == 3, op, ": pred must have rank 3 [N, L, patch_size*patch_size*C], got shape ",
              pred.sizes());
  TORCH_CHECK(patch_size >= 1, op, ": patch_size must be a positive int, got ", patch_size);
  PrlGeometry g{};
  g.n = imgs.size(0);
  g.c = imgs.size(1);
  g.h = imgs.size(2);
  g.w = imgs.size(3);
  g.ps = patch_size;
  TORCH_CHECK(g.h % patch_size == 0 && g.w % patch_size == 0, op, ": imgs height/width (", g.h, "x", g.w,
              ") must be divisible by patch_size=", patch_size);
  g.gh = g.h / patch_size;
  g.gw = g.w / patch_size;
  g.length = g.gh * g.gw;
  g.dim = patch_size * patch_size * g.c;
  TORCH_CHECK(pred.size(0) == g.n && pred.size(1) == g.length && pred.size(2) == g.dim, op,
              ": pred must have shape [", g.n, ", ", g.length, ", ", g.dim, "] for imgs ", imgs.sizes(),
              " and patch_size=", patch_size, ", got ", pred.sizes());
  TORCH_CHECK(g.n >= 1 && g.length >= 1 && g.dim >= 1, op, ": pred and imgs must not be empty, got imgs ",
              imgs.sizes());
  if (mask.has_value() && mask->defined()) {
    const auto& m = *mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == g.n && m.size(1) == g.length, op, ": mask must have shape [", g.n,
                ", ", g.length, "], got ", m.sizes());
    TORCH_CHECK(m.device() == pred.device(), op, ": mask is on ", m.device(), " but pred is on ", pred.device());
    TORCH_CHECK(!m.is_complex(), op, ": mask must be a real (bool, integer or floating) tensor, got ",
                m.scalar_type());
  }
  TORCH_CHECK(p == 1 || p == 2, op, ": p must be 1 or 2, got ", p);
  g.reduction = parse_prl_reduction(op, reduction);
  return g;
}

inline void check_prl_grad_out(const char* op, const PrlGeometry& g, const at::Tensor& grad_out,
                               const at::Tensor& pred) {
  TORCH_CHECK(grad_out.defined(), op, ": grad_out must be a defined tensor");
  TORCH_CHECK(grad_out.device() == pred.device(), op, ": grad_out is on ", grad_out.device(), " but pred is on ",
              pred.device());
  TORCH_CHECK(grad_out.scalar_type() == pred.scalar_type(), op, ": grad_out must have the dtype of pred (",
              pred.scalar_type(), "), got ", grad_out.scalar_type());
  const auto want = prl_out_shape(g);
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(want), op, ": grad_out must have the loss shape ",
              c10::IntArrayRef(want), " for this reduction, got ", grad_out.sizes());
}

}  // namespace maep_fast
