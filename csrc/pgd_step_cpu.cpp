// CPU kernel of maep_fast::pgd_step / maep_fast::pgd_step_.
//
// Semantics equal maep_fast.ops.pgd_step.pgd_step_reference (see there):
//   L-inf: x' = clamp(min(max(x + d*s*sign(g), x0 - e), x0 + e), lo, hi)
//   L2:    xn = x + ((d*s)*g) / max(||g||, 1e-12);  delta = xn - x0
//          f  = ||delta|| > e ? e / max(||delta||, 1e-12) : 1
//          x' = clamp(x0 + delta*f, lo, hi)
// Math in fp32 (fp64 for double storage); norms accumulate in fp64.
// Compiled with -ffp-contract=off (no FMA changes the reference's rounding)
// and -fno-trapping-math (lets gcc if-convert the NaN-propagating selects).
// L-inf results are bitwise equal to the reference; L2 ones differ only by
// the norms' summation order (~1 ulp).
//
// Parallelism: L-inf is elementwise, split over the flattened [B*N] range.
// L2 is split over samples, or (few, large samples) over the elements of
// each sample with parallel reductions for the two norms.
// The per-run inner loops are plain counted loops over contiguous memory
// that gcc vectorizes; on x86-64 they are cloned for x86-64-v3 (AVX2) and
// the baseline, picked at load time (target_clones).
#include "pgd_step.h"
#include "native_cpu_utils.h"  // MAEP_CLONES, MAEP_INLINE

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace maep_fast {
namespace {

// Comparisons are evaluated unconditionally (selects, no branches) so that
// gcc if-converts and vectorizes the loops (with -fno-trapping-math).
// torch.maximum / torch.minimum: NaN in either operand propagates.
template <typename C>
MAEP_INLINE C nan_max(C a, C b) {
  const C m = a < b ? b : a;  // NaN a -> a
  return b != b ? b : m;
}
template <typename C>
MAEP_INLINE C nan_min(C a, C b) {
  const C m = b < a ? b : a;
  return b != b ? b : m;
}
// torch.clamp(v, lo, hi) with lo <= hi, not NaN: NaN in v propagates.
template <typename C>
MAEP_INLINE C clamp_range(C v, C lo, C hi) {
  const C t = v < lo ? lo : v;
  return v > hi ? hi : t;
}
// torch.sign: +-1, a zero stays (signed) zero, NaN stays NaN.
template <typename C>
MAEP_INLINE C sign_of(C g) {
  const C t = g > C(0) ? C(1) : g;
  return g < C(0) ? C(-1) : t;
}

// ---- storage <-> compute conversions on raw element types ------------------
// Loads/stores go through plain scalar types (not the c10 structs) so that gcc
// vectorizes them. Conversions round to nearest even, like c10 / Tensor.to().
typedef uint16_t u16_alias __attribute__((may_alias));

template <typename S>
struct Io {  // float, double: identity
  using raw = S;
  using C = S;
  static MAEP_INLINE C ld(raw v) { return v; }
  static MAEP_INLINE raw st(C v) { return v; }
};
template <>
struct Io<c10::Half> {
  // c10's branch-free bit-manipulation conversions (IEEE, round to nearest
  // even); unlike _Float16 casts (scalar vcvtph2ps in gcc 12) they vectorize.
  using raw = u16_alias;
  using C = float;
  static MAEP_INLINE C ld(raw v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static MAEP_INLINE raw st(C v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
};
template <>
struct Io<c10::BFloat16> {
  using raw = u16_alias;
  using C = float;
  static MAEP_INLINE C ld(raw v) { return c10::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
  static MAEP_INLINE raw st(C v) {
    // c10::detail::round_to_nearest_even, branch-free.
    const uint32_t u = c10::bit_cast<uint32_t>(v);
    const uint16_t r = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
    return v != v ? static_cast<uint16_t>(0x7FC0) : r;
  }
};

// ---- inner runs: n contiguous elements of ONE sample ----------------------
// `out` may alias `x` (in-place op): every element is read before it is
// written, at the same index, so vectorized code stays correct.

template <typename S, typename C = typename Io<S>::C>
MAEP_INLINE void linf_run_impl(const S* xs, const S* gs, const S* x0s, S* outs, int64_t n, C ds, C e, C lo, C hi) {
  using IO = Io<S>;
  using R = typename IO::raw;
  const R* x = reinterpret_cast<const R*>(xs);
  const R* g = reinterpret_cast<const R*>(gs);
  const R* x0 = reinterpret_cast<const R*>(x0s);
  R* out = reinterpret_cast<R*>(outs);
  for (int64_t i = 0; i < n; ++i) {
    const C x0v = IO::ld(x0[i]);
    C v = IO::ld(x[i]) + ds * sign_of(IO::ld(g[i]));
    v = nan_min(nan_max(v, x0v - e), x0v + e);
    out[i] = IO::st(clamp_range(v, lo, hi));
  }
}

template <typename S>
MAEP_INLINE double sumsq_run_impl(const S* gs, int64_t n) {
  using IO = Io<S>;
  using R = typename IO::raw;
  const R* g = reinterpret_cast<const R*>(gs);
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(IO::ld(g[i]));
    acc += v * v;
  }
  return acc;
}

// Sum of squares of delta = (x + (ds*g)/gn) - x0.
template <typename S, typename C = typename Io<S>::C>
MAEP_INLINE double l2_delta_sumsq_run_impl(const S* xs, const S* gs, const S* x0s, int64_t n, C ds, C gn) {
  using IO = Io<S>;
  using R = typename IO::raw;
  const R* x = reinterpret_cast<const R*>(xs);
  const R* g = reinterpret_cast<const R*>(gs);
  const R* x0 = reinterpret_cast<const R*>(x0s);
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const C d = (IO::ld(x[i]) + (ds * IO::ld(g[i])) / gn) - IO::ld(x0[i]);
    acc += static_cast<double>(d) * static_cast<double>(d);
  }
  return acc;
}

template <typename S, typename C = typename Io<S>::C>
MAEP_INLINE void l2_apply_run_impl(const S* xs, const S* gs, const S* x0s, S* outs, int64_t n, C ds, C gn, C f,
                                   C lo, C hi) {
  using IO = Io<S>;
  using R = typename IO::raw;
  const R* x = reinterpret_cast<const R*>(xs);
  const R* g = reinterpret_cast<const R*>(gs);
  const R* x0 = reinterpret_cast<const R*>(x0s);
  R* out = reinterpret_cast<R*>(outs);
  for (int64_t i = 0; i < n; ++i) {
    const C x0v = IO::ld(x0[i]);
    const C d = (IO::ld(x[i]) + (ds * IO::ld(g[i])) / gn) - x0v;
    out[i] = IO::st(clamp_range(x0v + d * f, lo, hi));
  }
}

// Non-template entry points per storage type, so target_clones applies.
#define MAEP_DEFINE_RUNS(S, C, SUF)                                                                \
  MAEP_CLONES void linf_run_##SUF(const S* x, const S* g, const S* x0, S* out, int64_t n, C ds, C e, \
                                  C lo, C hi) {                                                      \
    linf_run_impl<S>(x, g, x0, out, n, ds, e, lo, hi);                                               \
  }                                                                                                  \
  MAEP_CLONES double sumsq_run_##SUF(const S* g, int64_t n) { return sumsq_run_impl<S>(g, n); }      \
  MAEP_CLONES double l2_delta_sumsq_run_##SUF(const S* x, const S* g, const S* x0, int64_t n, C ds,  \
                                              C gn) {                                                \
    return l2_delta_sumsq_run_impl<S>(x, g, x0, n, ds, gn);                                          \
  }                                                                                                  \
  MAEP_CLONES void l2_apply_run_##SUF(const S* x, const S* g, const S* x0, S* out, int64_t n, C ds,  \
                                      C gn, C f, C lo, C hi) {                                       \
    l2_apply_run_impl<S>(x, g, x0, out, n, ds, gn, f, lo, hi);                                       \
  }

MAEP_DEFINE_RUNS(float, float, f32)
MAEP_DEFINE_RUNS(double, double, f64)
MAEP_DEFINE_RUNS(c10::Half, float, f16)
MAEP_DEFINE_RUNS(c10::BFloat16, float, bf16)
#undef MAEP_DEFINE_RUNS

template <typename S>
struct Runs;
#define MAEP_RUNS_TRAITS(S, C, SUF)                                         \
  template <>                                                               \
  struct Runs<S> {                                                          \
    using compute_t = C;                                                    \
    static constexpr auto linf = &linf_run_##SUF;                           \
    static constexpr auto sumsq = &sumsq_run_##SUF;                         \
    static constexpr auto delta_sumsq = &l2_delta_sumsq_run_##SUF;          \
    static constexpr auto apply = &l2_apply_run_##SUF;                      \
  };
MAEP_RUNS_TRAITS(float, float, f32)
MAEP_RUNS_TRAITS(double, double, f64)
MAEP_RUNS_TRAITS(c10::Half, float, f16)
MAEP_RUNS_TRAITS(c10::BFloat16, float, bf16)
#undef MAEP_RUNS_TRAITS

constexpr int64_t kGrain = 32768;  // elements per task (at::internal::GRAIN_SIZE)

// ---- per-sample L2 scalars -------------------------------------------------
template <typename C>
MAEP_INLINE C l2_gnorm(double sumsq_g) {
  // torch: grad.norm(dim=1).clamp_min(1e-12) in the compute dtype.
  const C gn = static_cast<C>(std::sqrt(sumsq_g));
  return nan_max(gn, static_cast<C>(1e-12));
}
template <typename C>
MAEP_INLINE C l2_factor(double sumsq_d, C e) {
  // torch: where(dnorm > e, e / dnorm.clamp_min(1e-12), 1)
  const C dn = static_cast<C>(std::sqrt(sumsq_d));
  return dn > e ? e / nan_max(dn, static_cast<C>(1e-12)) : C(1);
}

// step size / eps of sample b: the [B] array when given, else the one number.
template <typename C>
struct PerSample {
  const C* values;
  C scalar;
  C operator[](int64_t b) const { return values != nullptr ? values[b] : scalar; }
};

template <typename S>
void pgd_step_kernel(const S* x, const S* g, const S* x0, S* out, PerSample<typename Runs<S>::compute_t> step,
                     PerSample<typename Runs<S>::compute_t> eps, int64_t batch, int64_t n, bool l2, int64_t direction,
                     double clamp_min, double clamp_max) {
  using C = typename Runs<S>::compute_t;
  using R = Runs<S>;
  const C lo = static_cast<C>(clamp_min);
  const C hi = static_cast<C>(clamp_max);
  const C dir = static_cast<C>(direction);
  if (batch == 0 || n == 0) return;

  if (!l2) {
    // Elementwise: split the flattened range; each task walks the samples it covers.
    at::parallel_for(0, batch * n, kGrain, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      while (i < end) {
        const int64_t b = i / n;
        const int64_t stop = std::min(end, (b + 1) * n);
        R::linf(x + i, g + i, x0 + i, out + i, stop - i, dir * step[b], eps[b], lo, hi);
        i = stop;
      }
    });
    return;
  }

  const int64_t nthreads = at::get_num_threads();
  if (batch >= nthreads || batch * n <= kGrain || n < 4 * kGrain) {
    // One task = whole samples: three passes over a sample that stays in cache.
    const int64_t grain = std::max<int64_t>(1, kGrain / n);
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * n;
        const C ds = dir * step[b];
        const C gn = l2_gnorm<C>(R::sumsq(g + off, n));
        const C f = l2_factor<C>(R::delta_sumsq(x + off, g + off, x0 + off, n, ds, gn), eps[b]);
        R::apply(x + off, g + off, x0 + off, out + off, n, ds, gn, f, lo, hi);
      }
    });
    return;
  }

  // Few large samples: parallelize inside each sample.
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t off = b * n;
    const S* xb = x + off;
    const S* gb = g + off;
    const S* x0b = x0 + off;
    S* ob = out + off;
    const C ds = dir * step[b];
    const double sg = at::parallel_reduce(
        0, n, kGrain, 0.0, [&](int64_t i0, int64_t i1, double) { return R::sumsq(gb + i0, i1 - i0); },
        [](double a, double c) { return a + c; });
    const C gn = l2_gnorm<C>(sg);
    const double sd = at::parallel_reduce(
        0, n, kGrain, 0.0,
        [&](int64_t i0, int64_t i1, double) { return R::delta_sumsq(xb + i0, gb + i0, x0b + i0, i1 - i0, ds, gn); },
        [](double a, double c) { return a + c; });
    const C f = l2_factor<C>(sd, eps[b]);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      R::apply(xb + i0, gb + i0, x0b + i0, ob + i0, i1 - i0, ds, gn, f, lo, hi);
    });
  }
}

template <typename C>
PerSample<C> per_sample(PgdScalarArg a) {
  return {a.tensor == nullptr ? nullptr : a.tensor->const_data_ptr<C>(), static_cast<C>(a.value)};
}

void run_pgd_step(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& x0, PgdScalarArg step_size,
                  PgdScalarArg eps, const at::Tensor& out, bool l2, int64_t direction, double clamp_min,
                  double clamp_max) {
  const int64_t batch = x.size(0);
  const int64_t n = batch == 0 ? 0 : x.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "maep_fast::pgd_step", [&] {
    using C = typename Runs<scalar_t>::compute_t;
    pgd_step_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                              x0.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              per_sample<C>(step_size), per_sample<C>(eps), batch, n, l2, direction, clamp_min,
                              clamp_max);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CPU, m) { PgdStepKernels<c10::DeviceType::CPU, &run_pgd_step>::register_in(m); }

}  // namespace maep_fast
