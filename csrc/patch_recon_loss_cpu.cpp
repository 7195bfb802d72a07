// CPU kernels of maep_fast::patch_recon_loss and patch_recon_loss_backward.
//
// Semantics and contract: maep_fast/ops/patch_recon_loss.py (module docstring; the
// reference is patch_recon_loss_reference). One fused pass per patch: the patch is gathered from imgs into a small
// buffer (never materializing patchify(imgs)), normalized, compared with the
// contiguous pred row and reduced. Backward recomputes the statistics
// (no saved activations) and writes d pred and d imgs in one pass; patches
// tile the image, so every imgs element is written by exactly one patch and
// no accumulation between threads is needed. Patches of zero weight (mask 0,
// or an empty mask under a mean) get zero gradients without computing.
//
// Math in fp32 for fp32/fp16/bf16 storage (fp64 for double); per-patch sums
// and the final reduction accumulate in fp64. Parallel over patches
// (at::parallel_for over N*L).
#include "native_cpu_utils.h"
#include "patch_recon_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace maep_fast {
namespace {

using cpu::compute_t;

// imgs sample n -> t[dim] in patch layout (channel-last): t[(pi*ps+qi)*C + c].
template <typename S>
MAEP_INLINE void gather_patch(const S* img, const PrlGeometry& g, int64_t l, compute_t<S>* t) {
  const int64_t gy = l / g.gw, gx = l % g.gw, hw = g.h * g.w, cc = g.c, ps = g.ps;
  const S* base = img + gy * ps * g.w + gx * ps;
  for (int64_t c = 0; c < cc; ++c) {
    for (int64_t pi = 0; pi < ps; ++pi) {
      const S* row = base + c * hw + pi * g.w;
      compute_t<S>* dst = t + pi * ps * cc + c;
      for (int64_t qi = 0; qi < ps; ++qi) dst[qi * cc] = cpu::ld(row[qi]);
    }
  }
}

template <typename S>
MAEP_INLINE void scatter_patch(S* img, const PrlGeometry& g, int64_t l, const compute_t<S>* t) {
  const int64_t gy = l / g.gw, gx = l % g.gw, hw = g.h * g.w, cc = g.c, ps = g.ps;
  S* base = img + gy * ps * g.w + gx * ps;
  for (int64_t c = 0; c < cc; ++c) {
    for (int64_t pi = 0; pi < ps; ++pi) {
      S* row = base + c * hw + pi * g.w;
      const compute_t<S>* src = t + pi * ps * cc + c;
      for (int64_t qi = 0; qi < ps; ++qi) row[qi] = cpu::st<S>(src[qi * cc]);
    }
  }
}

// Per-patch mean and std sqrt(var_unbiased + 1e-6) of t[0..dim), in one pass: sums of the values
// shifted by t[0] (so the variance does not cancel catastrophically), accumulated in fp64.
// dim == 1: 0/0 = NaN, like torch.var's unbiased estimate of one element.
template <typename C>
struct PatchStats {
  C mean, sd;
};
template <typename C>
MAEP_INLINE PatchStats<C> patch_stats(const C* t, int64_t dim) {
  const double k = static_cast<double>(t[0]);
  double s = 0.0, ss = 0.0;
#pragma omp simd reduction(+ : s, ss)
  for (int64_t j = 0; j < dim; ++j) {
    const double d = static_cast<double>(t[j]) - k;
    s += d;
    ss += d * d;
  }
  const double md = s / static_cast<double>(dim);  // mean - k
  const C var = static_cast<C>((ss - s * md) / static_cast<double>(dim - 1));
  return {static_cast<C>(k + md), std::sqrt(var + static_cast<C>(1e-6))};
}

// In place t -> (t - mean) / sd; returns sd.
template <typename C>
MAEP_INLINE C normalize_in_place(C* t, int64_t dim) {
  const PatchStats<C> st = patch_stats<C>(t, dim);
  for (int64_t j = 0; j < dim; ++j) t[j] = (t[j] - st.mean) / st.sd;
  return st.sd;
}

// ---- forward: err[n*L + l] for patches [i0, i1) ----------------------------
template <typename S>
MAEP_INLINE void prl_fwd_chunk_impl(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix, int64_t p,
                                    double* err, int64_t i0, int64_t i1) {
  using C = compute_t<S>;
  const int64_t dim = g.dim;
  std::vector<C> tbuf(dim);
  C* t = tbuf.data();
  const int64_t img_stride = g.c * g.h * g.w;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / g.length, l = i % g.length;
    gather_patch<S>(imgs + n * img_stride, g, l, t);
    // The normalization is folded into the error pass: target = (t - mean) / sd.
    PatchStats<C> st{C(0), C(1)};
    if (norm_pix) st = patch_stats<C>(t, dim);
    const S* pr = pred + i * dim;
    double acc = 0.0;
    if (p == 2) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < dim; ++j) {
        const C d = cpu::ld(pr[j]) - (t[j] - st.mean) / st.sd;
        acc += static_cast<double>(d * d);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < dim; ++j) {
        const C d = cpu::ld(pr[j]) - (t[j] - st.mean) / st.sd;
        acc += static_cast<double>(std::abs(d));
      }
    }
    err[i] = acc / static_cast<double>(dim);
  }
}

// ---- backward: d pred, d imgs for patches [i0, i1) given per-patch weights ----
template <typename S>
MAEP_INLINE void prl_bwd_chunk_impl(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix, int64_t p,
                                    const double* weight, S* dpred, S* dimgs, int64_t i0, int64_t i1) {
  using C = compute_t<S>;
  const int64_t dim = g.dim;
  std::vector<C> tbuf(dim), gbuf(dim);
  C* t = tbuf.data();
  C* gt = gbuf.data();
  const int64_t img_stride = g.c * g.h * g.w;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t n = i / g.length, l = i % g.length;
    S* dp = dpred + i * dim;
    const double w = weight[i];
    if (w == 0.0) {
      for (int64_t j = 0; j < dim; ++j) dp[j] = S(0);
      for (int64_t j = 0; j < dim; ++j) gt[j] = C(0);
      scatter_patch<S>(dimgs + n * img_stride, g, l, gt);
      continue;
    }
    gather_patch<S>(imgs + n * img_stride, g, l, t);
    C sd = C(1);
    if (norm_pix) sd = normalize_in_place<C>(t, dim);
    const S* pr = pred + i * dim;
    if (p == 2) {
      const C k = static_cast<C>(2.0 * w / static_cast<double>(dim));
      for (int64_t j = 0; j < dim; ++j) {
        const C gv = k * (cpu::ld(pr[j]) - t[j]);
        dp[j] = cpu::st<S>(gv);
        gt[j] = -gv;  // d target
      }
    } else {
      const C k = static_cast<C>(w / static_cast<double>(dim));
      for (int64_t j = 0; j < dim; ++j) {
        const C d = cpu::ld(pr[j]) - t[j];
        const C sg = d > C(0) ? C(1) : (d < C(0) ? C(-1) : C(0));
        const C gv = k * sg;
        dp[j] = cpu::st<S>(gv);
        gt[j] = -gv;
      }
    }
    if (norm_pix) {
      // t is x_hat; d imgs = (g - mean(g)) / sd - x_hat * sum(g * x_hat) / ((dim - 1) * sd)
      double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t j = 0; j < dim; ++j) {
        sg += static_cast<double>(gt[j]);
        sgx += static_cast<double>(gt[j]) * static_cast<double>(t[j]);
      }
      const C mg = static_cast<C>(sg / static_cast<double>(dim));
      const C kx = static_cast<C>(sgx / (static_cast<double>(dim - 1) * static_cast<double>(sd)));
      const C inv = C(1) / sd;
      for (int64_t j = 0; j < dim; ++j) gt[j] = (gt[j] - mg) * inv - t[j] * kx;
    }
    scatter_patch<S>(dimgs + n * img_stride, g, l, gt);
  }
}

#define MAEP_DEFINE_PRL(S, SUF)                                                                               \
  MAEP_CLONES void prl_fwd_chunk_##SUF(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix,     \
                                       int64_t p, double* err, int64_t i0, int64_t i1) {                      \
    prl_fwd_chunk_impl<S>(pred, imgs, g, norm_pix, p, err, i0, i1);                                          \
  }                                                                                                          \
  MAEP_CLONES void prl_bwd_chunk_##SUF(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix,     \
                                       int64_t p, const double* w, S* dpred, S* dimgs, int64_t i0,            \
                                       int64_t i1) {                                                          \
    prl_bwd_chunk_impl<S>(pred, imgs, g, norm_pix, p, w, dpred, dimgs, i0, i1);                              \
  }                                                                                                          \
  void prl_fwd_chunk(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix, int64_t p,           \
                     double* err, int64_t i0, int64_t i1) {                                                   \
    prl_fwd_chunk_##SUF(pred, imgs, g, norm_pix, p, err, i0, i1);                                            \
  }                                                                                                          \
  void prl_bwd_chunk(const S* pred, const S* imgs, const PrlGeometry& g, bool norm_pix, int64_t p,           \
                     const double* w, S* dpred, S* dimgs, int64_t i0, int64_t i1) {                           \
    prl_bwd_chunk_##SUF(pred, imgs, g, norm_pix, p, w, dpred, dimgs, i0, i1);                                \
  }

MAEP_DEFINE_PRL(float, f32)
MAEP_DEFINE_PRL(double, f64)
MAEP_DEFINE_PRL(c10::Half, f16)
MAEP_DEFINE_PRL(c10::BFloat16, bf16)
#undef MAEP_DEFINE_PRL

int64_t patch_grain(int64_t dim) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)); }

// Mask as fp64 [N, L] (empty vector: no mask), read in its own dtype: no conversion op and no
// temporary tensor per call.
std::vector<double> mask_values(const c10::optional<at::Tensor>& mask) {
  std::vector<double> out;
  if (!mask.has_value() || !mask->defined()) return out;
  const at::Tensor m = mask->contiguous();
  out.resize(m.numel());
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, m.scalar_type(), "maep_fast::patch_recon_loss mask",
                             [&] {
                               const scalar_t* mp = m.const_data_ptr<scalar_t>();
                               for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(mp[i]);
                             });
  return out;
}

at::Tensor patch_recon_loss_cpu(const at::Tensor& pred_in, const at::Tensor& imgs_in,
                                const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix, int64_t p,
                                c10::string_view reduction) {
  const PrlGeometry g = check_patch_recon_loss_args("maep_fast::patch_recon_loss", c10::DeviceType::CPU, pred_in,
                                                    imgs_in, mask, patch_size, p, reduction);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const int64_t np = g.n * g.length;
  std::vector<double> err(np);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "maep_fast::patch_recon_loss", [&] {
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* ip = imgs.const_data_ptr<scalar_t>();
    at::parallel_for(0, np, patch_grain(g.dim), [&](int64_t i0, int64_t i1) {
      prl_fwd_chunk(pp, ip, g, norm_pix, p, err.data(), i0, i1);
    });
  });
  const std::vector<double> m = mask_values(mask);
  const bool has_mask = !m.empty();
  at::Tensor out = at::empty(prl_out_shape(g), pred.options());
  std::vector<double> res;  // values of out, fp64
  switch (g.reduction) {
    case PrlReduction::kNone:
      res.resize(np);
      for (int64_t i = 0; i < np; ++i) res[i] = has_mask ? err[i] * m[i] : err[i];
      break;
    case PrlReduction::kSum:
    case PrlReduction::kMean: {
      double s = 0.0, den = 0.0;
      for (int64_t i = 0; i < np; ++i) {
        s += has_mask ? err[i] * m[i] : err[i];
        den += has_mask ? m[i] : 1.0;
      }
      if (g.reduction == PrlReduction::kSum) {
        res.push_back(s);
      } else {
        res.push_back(den > 0.0 ? s / std::max(den, 1e-12) : 0.0);
      }
      break;
    }
    case PrlReduction::kPerSample:
      res.resize(g.n);
      for (int64_t n = 0; n < g.n; ++n) {
        double s = 0.0, den = 0.0;
        for (int64_t l = 0; l < g.length; ++l) {
          const int64_t i = n * g.length + l;
          s += has_mask ? err[i] * m[i] : err[i];
          den += has_mask ? m[i] : 1.0;
        }
        res[n] = den > 0.0 ? s / std::max(den, 1e-12) : 0.0;
      }
      break;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "maep_fast::patch_recon_loss", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < res.size(); ++i) op[i] = static_cast<scalar_t>(res[i]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> patch_recon_loss_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& pred_in, const at::Tensor& imgs_in,
    const c10::optional<at::Tensor>& mask, int64_t patch_size, bool norm_pix, int64_t p,
    c10::string_view reduction) {
  const char* op = "maep_fast::patch_recon_loss_backward";
  const PrlGeometry g =
      check_patch_recon_loss_args(op, c10::DeviceType::CPU, pred_in, imgs_in, mask, patch_size, p, reduction);
  check_prl_grad_out(op, g, grad_out_in, pred_in);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor imgs = imgs_in.contiguous();
  const at::Tensor go_t = grad_out_in.to(at::kDouble).contiguous();
  const double* go = go_t.const_data_ptr<double>();
  const int64_t np = g.n * g.length;
  const std::vector<double> m = mask_values(mask);
  const bool has_mask = !m.empty();

  // Per-patch weight d loss / d err[n, l].
  std::vector<double> w(np);
  switch (g.reduction) {
    case PrlReduction::kNone:
      for (int64_t i = 0; i < np; ++i) w[i] = has_mask ? go[i] * m[i] : go[i];
      break;
    case PrlReduction::kSum:
      for (int64_t i = 0; i < np; ++i) w[i] = has_mask ? go[0] * m[i] : go[0];
      break;
    case PrlReduction::kMean: {
      double den = 0.0;
      for (int64_t i = 0; i < np; ++i) den += has_mask ? m[i] : 1.0;
      const double k = den > 0.0 ? go[0] / std::max(den, 1e-12) : 0.0;
      for (int64_t i = 0; i < np; ++i) w[i] = has_mask ? k * m[i] : k;
      break;
    }
    case PrlReduction::kPerSample:
      for (int64_t n = 0; n < g.n; ++n) {
        double den = 0.0;
        for (int64_t l = 0; l < g.length; ++l) den += has_mask ? m[n * g.length + l] : 1.0;
        const double k = den > 0.0 ? go[n] / std::max(den, 1e-12) : 0.0;
        for (int64_t l = 0; l < g.length; ++l) w[n * g.length + l] = has_mask ? k * m[n * g.length + l] : k;
      }
      break;
  }

  at::Tensor dpred = at::empty(pred.sizes(), pred.options());
  at::Tensor dimgs = at::empty(imgs.sizes(), imgs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "maep_fast::patch_recon_loss_backward",
                                  [&] {
                                    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
                                    const scalar_t* ip = imgs.const_data_ptr<scalar_t>();
                                    scalar_t* dpp = dpred.mutable_data_ptr<scalar_t>();
                                    scalar_t* dip = dimgs.mutable_data_ptr<scalar_t>();
                                    at::parallel_for(0, np, patch_grain(g.dim), [&](int64_t i0, int64_t i1) {
                                      prl_bwd_chunk(pp, ip, g, norm_pix, p, w.data(), dpp, dip, i0, i1);
                                    });
                                  });
  return {dpred, dimgs};
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CPU, m) {
  m.impl("patch_recon_loss", &patch_recon_loss_cpu);
  m.impl("patch_recon_loss_backward", &patch_recon_loss_backward_cpu);
}

}  // namespace maep_fast
