// Shared argument checks of the maep_fast::pgd_step / pgd_step_ ops
// (CPU kernel in pgd_step_cpu.cpp, CUDA glue in pgd_step_cuda.cpp). The op's contract is
// stated once, in the module docstring of maep_fast/ops/pgd_step.py; these checks are the
// native side's own guard of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <string_view>

namespace maep_fast {

// step size / eps of one call: a [B] tensor (overload .default) or one number for every
// sample (overload .scalar; `tensor` is nullptr). The kernels read `values`, else `value`.
struct PgdScalarArg {
  const at::Tensor* tensor;
  double value;
};

// Validates every argument of pgd_step / pgd_step_ and returns true for
// norm == "l2", false for norm == "linf". `op` names the op in messages.
// Only metadata is checked: per-sample tensors are not read on the host (that would
// synchronize a CUDA stream); their values are the caller's to validate (the Python API checks
// numbers, and data at its edges).
inline bool check_pgd_step_args(
    const char* op,
    c10::DeviceType device_type,
    const at::Tensor& x,
    const at::Tensor& grad,
    const at::Tensor& x0,
    PgdScalarArg step_size,
    PgdScalarArg eps,
    std::string_view norm,
    int64_t direction,
    double clamp_min,
    double clamp_max) {
  TORCH_CHECK(x.defined() && grad.defined() && x0.defined(), op, ": x, grad and x0 must all be defined tensors");
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be on ", c10::DeviceTypeName(device_type),
              " for this kernel, got ", x.device());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": x must have dtype float32, float64, float16 or bfloat16, got ", st);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension (the batch), got a 0-d tensor");
  TORCH_CHECK(grad.scalar_type() == st, op, ": grad must have the dtype of x (", st, "), got ",
              grad.scalar_type());
  TORCH_CHECK(x0.scalar_type() == st, op, ": x0 must have the dtype of x (", st, "), got ", x0.scalar_type());
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have the shape of x ", x.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(x0.sizes() == x.sizes(), op, ": x0 must have the shape of x ", x.sizes(), ", got ", x0.sizes());
  TORCH_CHECK(grad.device() == x.device(), op, ": grad is on ", grad.device(), " but x is on ", x.device());
  TORCH_CHECK(x0.device() == x.device(), op, ": x0 is on ", x0.device(), " but x is on ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous");
  TORCH_CHECK(x0.is_contiguous(), op, ": x0 must be contiguous");

  const int64_t batch = x.size(0);
  const auto ct = st == at::kDouble ? at::kDouble : at::kFloat;  // compute dtype
  for (const auto& [arg, name] : {std::pair<PgdScalarArg, const char*>{step_size, "step_size"},
                                  std::pair<PgdScalarArg, const char*>{eps, "eps"}}) {
    if (arg.tensor == nullptr) {
      TORCH_CHECK(std::isfinite(arg.value) && arg.value >= 0.0, op, ": ", name,
                  " must be a finite number >= 0, got ", arg.value);
      continue;
    }
    const at::Tensor& t = *arg.tensor;
    TORCH_CHECK(t.defined(), op, ": ", name, " must be a defined tensor");
    TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, op, ": ", name, " must have shape [", batch,
                "] (one value per sample), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == ct, op, ": ", name, " must have dtype ", ct, " for x of dtype ", st,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(norm == "linf" || norm == "l2", op, ": norm must be 'linf' or 'l2', got '", norm, "'");
  TORCH_CHECK(direction == 1 || direction == -1, op,
              ": direction must be +1 (ascent, attack) or -1 (descent, purification), got ", direction);
  TORCH_CHECK(clamp_min <= clamp_max, op, ": clamp_min must be <= clamp_max (and not NaN), got ", clamp_min,
              " and ", clamp_max);
  return norm == "l2";
}

// A backend's step: run(x, grad, x0, step, eps, out, l2, direction, clamp_min, clamp_max) writes out
// (which may be x) from validated, contiguous arguments.
using PgdRunFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, PgdScalarArg, PgdScalarArg,
                          const at::Tensor&, bool, int64_t, double, double);

// The four kernels of one backend (pgd_step / pgd_step_, with [B] tensors or numbers for step_size
// and eps) around its Run: argument checks, then Run on a new output or on x itself.
template <c10::DeviceType kDevice, PgdRunFn Run>
struct PgdStepKernels {
  static at::Tensor out_of_place(const char* op, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                                 PgdScalarArg step_size, PgdScalarArg eps, c10::string_view norm, int64_t direction,
                                 double clamp_min, double clamp_max) {
    const bool l2 =
        check_pgd_step_args(op, kDevice, x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max);
    at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
    Run(x, grad, x0, step_size, eps, out, l2, direction, clamp_min, clamp_max);
    return out;
  }
  static void in_place(const char* op, const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                       PgdScalarArg step_size, PgdScalarArg eps, c10::string_view norm, int64_t direction,
                       double clamp_min, double clamp_max) {
    const bool l2 =
        check_pgd_step_args(op, kDevice, x, grad, x0, step_size, eps, norm, direction, clamp_min, clamp_max);
    Run(x, grad, x0, step_size, eps, x, l2, direction, clamp_min, clamp_max);
  }
  static at::Tensor tensors(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0,
                            const at::Tensor& step_size, const at::Tensor& eps, c10::string_view norm,
                            int64_t direction, double clamp_min, double clamp_max) {
    return out_of_place("maep_fast::pgd_step", x, grad, x0, {&step_size, 0.0}, {&eps, 0.0}, norm, direction,
                        clamp_min, clamp_max);
  }
  static at::Tensor numbers(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0, double step_size,
                            double eps, c10::string_view norm, int64_t direction, double clamp_min,
                            double clamp_max) {
    return out_of_place("maep_fast::pgd_step.scalar", x, grad, x0, {nullptr, step_size}, {nullptr, eps}, norm,
                        direction, clamp_min, clamp_max);
  }
  static void tensors_(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0, const at::Tensor& step_size,
                       const at::Tensor& eps, c10::string_view norm, int64_t direction, double clamp_min,
                       double clamp_max) {
    in_place("maep_fast::pgd_step_", x, grad, x0, {&step_size, 0.0}, {&eps, 0.0}, norm, direction, clamp_min,
             clamp_max);
  }
  static void numbers_(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0, double step_size,
                       double eps, c10::string_view norm, int64_t direction, double clamp_min, double clamp_max) {
    in_place("maep_fast::pgd_step_.scalar", x, grad, x0, {nullptr, step_size}, {nullptr, eps}, norm, direction,
             clamp_min, clamp_max);
  }
  static void register_in(torch::Library& m) {
    m.impl("pgd_step", &tensors);
    m.impl("pgd_step_", &tensors_);
    m.impl("pgd_step.scalar", &numbers);
    m.impl("pgd_step_.scalar", &numbers_);
  }
};

}  // namespace maep_fast
