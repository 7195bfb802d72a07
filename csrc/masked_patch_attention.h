// Shared argument checks of maep_fast::masked_patch_attention_fwd / _bwd
// (CPU kernels in masked_patch_attention_cpu.cpp, CUDA glue in
// masked_patch_attention_cuda.cpp).
//
// The op's contract is stated once, in the module docstring of
// maep_fast/ops/masked_patch_attention.py; check_mpa_args is the native side's own guard of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

namespace maep_fast {

struct MpaGeometry {
  int64_t b, h, l, d;
};

// Compute (statistics) dtype of the logsumexp: fp64 for fp64 inputs, else fp32.
inline at::ScalarType mpa_stat_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

inline MpaGeometry check_mpa_args(const char* op, c10::DeviceType device_type, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& keep,
                                  double scale) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), op, ": q, k and v must be defined tensors");
  TORCH_CHECK(q.device().type() == device_type, op, ": q must be on ", c10::DeviceTypeName(device_type),
              " for this kernel, got ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(v.device() == q.device(), op, ": v is on ", v.device(), " but q is on ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": q must have dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(k.scalar_type() == st, op, ": k must have the dtype of q (", st, "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == st, op, ": v must have the dtype of q (", st, "), got ", v.scalar_type());
  TORCH_CHECK(q.dim() == 4, op, ": q must have rank 4 [B, H, L, D], got shape ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.numel() > 0, op, ": q must not be empty, got shape ", q.sizes());
  MpaGeometry g{q.size(0), q.size(1), q.size(2), q.size(3)};
  if (keep.has_value() && keep->defined()) {
    const auto& kp = *keep;
    TORCH_CHECK(kp.scalar_type() == at::kBool, op, ": keep must have dtype bool, got ", kp.scalar_type());
    TORCH_CHECK(kp.dim() == 2 && kp.size(0) == g.b && kp.size(1) == g.l, op, ": keep must have shape [B, L] = [",
                g.b, ", ", g.l, "], got ", kp.sizes());
    TORCH_CHECK(kp.device() == q.device(), op, ": keep is on ", kp.device(), " but q is on ", q.device());
  }
  TORCH_CHECK(std::isfinite(scale) && scale > 0.0, op, ": scale must be a positive finite number, got ", scale);
  return g;
}

inline void check_mpa_bwd_extra(const char* op, const MpaGeometry& g, const at::Tensor& q,
                                 const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse) {
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  }
  TORCH_CHECK(lse.defined(), op, ": lse must be a defined tensor");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == g.b && lse.size(1) == g.h && lse.size(2) == g.l, op,
              ": lse must have shape [B, H, L] = [", g.b, ", ", g.h, ", ", g.l, "], got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == mpa_stat_dtype(q.scalar_type()), op, ": lse must have dtype ",
              mpa_stat_dtype(q.scalar_type()), " for q of dtype ", q.scalar_type(), ", got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
}

}  // namespace maep_fast
