// CPU kernels of maep_fast::masked_patch_attention_fwd / _bwd and of the public
// maep_fast::masked_patch_attention, whose autograd (a hand-written autograd Node
// recorded at the Autograd key, backend-independent; autograd_node.h) saves lse and
// calls _bwd.
//
// Semantics equal maep_fast.ops.masked_patch_attention.masked_patch_attention_reference:
// softmax(scale * q k^T) v over the visible keys of the sample (keep[b, j]);
// rows of hidden queries are 0 and get 0 gradient; hidden keys get 0 dk/dv;
// a sample with no visible patch outputs zeros. keep = None: plain attention.
//
// Blocked (flash-style) per (b, h): the visible rows of q, k, v (gathered
// once, converted to the compute dtype: fp32 for fp32/fp16/bf16, fp64 for
// fp64) are processed in query blocks of kBQ rows x key blocks of kBK keys
// with an online softmax (running max m, running sum l, rescaled output);
// hidden queries and keys never enter a product. Products are small GEMMs
// through the BLAS torch links (sgemm_/dgemm_, MKL in the x86 wheels, called
// inside the parallel region so it runs single-threaded). lse = m + log(l)
// per visible query row is saved for the backward (0 for hidden rows).
// Backward per (b, h): P = exp(scale q k^T - lse), dV += P^T dO,
// dP = dO V^T, dS = P * (dP - Delta) with Delta = rowsum(dO * O),
// dQ += scale dS K, dK += scale dS^T Q. Parallel over (b, h) with
// at::parallel_for; dK/dV of a (b, h) are owned by one task (no atomics).
// exp: a branch-free, vectorizable Cody-Waite + degree-6 polynomial (~1-2 ulp
// in fp32); std::exp in fp64.
#include "autograd_node.h"
#include "masked_patch_attention.h"
#include "native_cpu_utils.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace maep_fast {
namespace {

using cpu::compute_t;

constexpr int64_t kBQ = 64;   // query rows per block
constexpr int64_t kBK = 512;  // keys per block (ViT lengths up to 512 visible keys: one block)

// Fortran BLAS of the BLAS torch links (MKL in the x86 wheels; exported by
// libtorch_cpu, as used by ATen's own CPUBlas.cpp). Declared weak: where the
// symbol is missing, a plain loop GEMM is used instead.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// Plain-loop GEMM, Cm[M, N] = alpha * op(A) op(B) + beta * Cm, row-major, no allocation: the
// path for small products (a BLAS call's fixed cost dominates below kSmallGemm multiply-adds)
// and the fallback where no BLAS symbol is found.
template <typename C>
void loop_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, C alpha, const C* A, int64_t lda, const C* B,
               int64_t ldb, C beta, C* Cm, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    C* c = Cm + i * ldc;
    for (int64_t j = 0; j < N; ++j) {
      C acc = C(0);
      for (int64_t p = 0; p < K; ++p) acc += (ta ? A[p * lda + i] : A[i * lda + p]) * (tb ? B[j * ldb + p] : B[p * ldb + j]);
      c[j] = alpha * acc + (beta == C(0) ? C(0) : beta * c[j]);
    }
  }
}

constexpr int64_t kSmallGemm = 16384;

// Row-major Cm[M, N] = alpha * op(A) op(B) + beta * Cm (column-major BLAS on transposed views).
template <typename C>
inline void rm_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, C alpha, const C* A, int64_t lda, const C* B,
                    int64_t ldb, C beta, C* Cm, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const char tA = tb ? 'T' : 'N', tB = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  // MAEP_FAST_CPU_NO_BLAS=1 forces the loop GEMM (tests exercise the fallback with it).
  static const bool use_blas = std::getenv("MAEP_FAST_CPU_NO_BLAS") == nullptr;
  if (!use_blas || M * N * K <= kSmallGemm) {
    loop_gemm<C>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
    return;
  }
  if constexpr (std::is_same_v<C, float>) {
    if (sgemm_ != nullptr && K > 0) {
      sgemm_(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, Cm, &lc);
      return;
    }
  } else {
    if (dgemm_ != nullptr && K > 0) {
      dgemm_(&tA, &tB, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, Cm, &lc);
      return;
    }
  }
  loop_gemm<C>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc);
}

MAEP_INLINE float exp_c(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x / ln2) in the low mantissa bits
  const float n = t - 12582912.0f;
  int32_t ni;
  std::memcpy(&ni, &t, sizeof(ni));
  ni -= 0x4B400000;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return y * s;
}
MAEP_INLINE double exp_c(double x) { return std::exp(x); }

template <typename C>
MAEP_INLINE C log_c(C x) {
  return std::log(x);
}

// Visible indices of every sample: vis[b*L + i], count[b].
void visible_lists(const c10::optional<at::Tensor>& keep, const MpaGeometry& g, std::vector<int64_t>& vis,
                   std::vector<int64_t>& count) {
  vis.resize(g.b * g.l);
  count.assign(g.b, 0);
  if (!keep.has_value() || !keep->defined()) {
    for (int64_t b = 0; b < g.b; ++b) {
      for (int64_t i = 0; i < g.l; ++i) vis[b * g.l + i] = i;
      count[b] = g.l;
    }
    return;
  }
  const at::Tensor kp = keep->contiguous();
  const bool* kd = kp.const_data_ptr<bool>();
  for (int64_t b = 0; b < g.b; ++b) {
    int64_t c = 0;
    for (int64_t i = 0; i < g.l; ++i) {
      if (kd[b * g.l + i]) vis[b * g.l + c++] = i;
    }
    count[b] = c;
  }
}

// Gather rows idx[0..n) of src [L, D] into dst [n, D] in the compute dtype.
template <typename S>
MAEP_INLINE void gather_rows(const S* src, const int64_t* idx, int64_t n, int64_t d, compute_t<S>* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const S* s = src + idx[r] * d;
    compute_t<S>* o = dst + r * d;
    for (int64_t j = 0; j < d; ++j) o[j] = cpu::ld(s[j]);
  }
}

// Call fn(i) for every row i in [0, L) that is not in the sorted visible list vis[0..nv).
template <typename Fn>
MAEP_INLINE void for_each_hidden_row(const int64_t* vis, int64_t nv, int64_t L, Fn&& fn) {
  int64_t c = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (c < nv && vis[c] == i) {
      ++c;
      continue;
    }
    fn(i);
  }
}

// ---- forward of one (b, h) -------------------------------------------------
template <typename S>
MAEP_INLINE void mpa_fwd_one_impl(const S* q, const S* k, const S* v, S* out, compute_t<S>* lse, const int64_t* vis,
                                  int64_t nv, int64_t L, int64_t D, compute_t<S> scale) {
  using C = compute_t<S>;
  // Hidden rows (and everything when no key is visible): zeros.
  for_each_hidden_row(vis, nv, L, [&](int64_t i) {
    std::fill(out + i * D, out + (i + 1) * D, S(0));
    lse[i] = C(0);
  });
  if (nv == 0) return;
  const int64_t bk_max = std::min(nv, kBK), bq_max = std::min(nv, kBQ);
  // One scratch allocation per (b, h): visible q, k, v; scores; output block; row max and sum.
  std::vector<C> scratch(3 * nv * D + bq_max * bk_max + bq_max * D + 2 * bq_max);
  C* const qc = scratch.data();
  C* const kc = qc + nv * D;
  C* const vc = kc + nv * D;
  C* const sbuf = vc + nv * D;
  C* const obuf = sbuf + bq_max * bk_max;
  C* const mrow = obuf + bq_max * D;
  C* const lrow = mrow + bq_max;
  gather_rows<S>(q, vis, nv, D, qc);
  gather_rows<S>(k, vis, nv, D, kc);
  gather_rows<S>(v, vis, nv, D, vc);
  for (int64_t q0 = 0; q0 < nv; q0 += kBQ) {
    const int64_t bq = std::min(kBQ, nv - q0);
    std::fill(mrow, mrow + bq_max, -std::numeric_limits<C>::infinity());
    std::fill(lrow, lrow + bq_max, C(0));
    for (int64_t k0 = 0; k0 < nv; k0 += kBK) {
      const int64_t bk = std::min(kBK, nv - k0);
      C* s = sbuf;
      rm_gemm<C>(false, true, bq, bk, D, scale, qc + q0 * D, D, kc + k0 * D, D, C(0), s, bk);
      for (int64_t r = 0; r < bq; ++r) {
        C* sr = s + r * bk;
        C mx = mrow[r];
#pragma omp simd reduction(max : mx)
        for (int64_t j = 0; j < bk; ++j) mx = sr[j] > mx ? sr[j] : mx;
        C sum = C(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < bk; ++j) {
          const C e = exp_c(sr[j] - mx);
          sr[j] = e;
          sum += e;
        }
        if (k0 == 0) {
          lrow[r] = sum;
        } else {
          const C alpha = exp_c(mrow[r] - mx);
          lrow[r] = lrow[r] * alpha + sum;
          C* orow = obuf + r * D;
          for (int64_t j = 0; j < D; ++j) orow[j] *= alpha;
        }
        mrow[r] = mx;
      }
      rm_gemm<C>(false, false, bq, D, bk, C(1), s, bk, vc + k0 * D, D, k0 == 0 ? C(0) : C(1), obuf, D);
    }
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t row = vis[q0 + r];
      const C inv = C(1) / lrow[r];
      const C* orow = obuf + r * D;
      S* dst = out + row * D;
      for (int64_t j = 0; j < D; ++j) dst[j] = cpu::st<S>(orow[j] * inv);
      lse[row] = mrow[r] + log_c(lrow[r]);
    }
  }
}

// ---- backward of one (b, h) ------------------------------------------------
template <typename S>
MAEP_INLINE void mpa_bwd_one_impl(const S* go, const S* q, const S* k, const S* v, const S* o,
                                  const compute_t<S>* lse, S* dq, S* dk, S* dv, const int64_t* vis, int64_t nv,
                                  int64_t L, int64_t D, compute_t<S> scale) {
  using C = compute_t<S>;
  for_each_hidden_row(vis, nv, L, [&](int64_t i) {
    std::fill(dq + i * D, dq + (i + 1) * D, S(0));
    std::fill(dk + i * D, dk + (i + 1) * D, S(0));
    std::fill(dv + i * D, dv + (i + 1) * D, S(0));
  });
  if (nv == 0) return;
  std::vector<C> qc(nv * D), kc(nv * D), vc(nv * D), gc(nv * D);
  gather_rows<S>(q, vis, nv, D, qc.data());
  gather_rows<S>(k, vis, nv, D, kc.data());
  gather_rows<S>(v, vis, nv, D, vc.data());
  gather_rows<S>(go, vis, nv, D, gc.data());
  std::vector<C> delta(nv), lsev(nv);
  for (int64_t r = 0; r < nv; ++r) {
    const S* orow = o + vis[r] * D;
    const C* grow = gc.data() + r * D;
    C acc = C(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < D; ++j) acc += grow[j] * cpu::ld(orow[j]);
    delta[r] = acc;
    lsev[r] = lse[vis[r]];
  }
  std::vector<C> dqc(nv * D, C(0)), dkc(nv * D, C(0)), dvc(nv * D, C(0));
  const int64_t bk_max = std::min(nv, kBK);
  std::vector<C> pbuf(kBQ * bk_max), dpbuf(kBQ * bk_max);
  for (int64_t q0 = 0; q0 < nv; q0 += kBQ) {
    const int64_t bq = std::min(kBQ, nv - q0);
    for (int64_t k0 = 0; k0 < nv; k0 += kBK) {
      const int64_t bk = std::min(kBK, nv - k0);
      C* pm = pbuf.data();
      C* dpm = dpbuf.data();
      rm_gemm<C>(false, true, bq, bk, D, scale, qc.data() + q0 * D, D, kc.data() + k0 * D, D, C(0), pm, bk);
      for (int64_t r = 0; r < bq; ++r) {
        C* pr = pm + r * bk;
        const C ls = lsev[q0 + r];
#pragma omp simd
        for (int64_t j = 0; j < bk; ++j) pr[j] = exp_c(pr[j] - ls);
      }
      // dV[k] += P^T dO[q]
      rm_gemm<C>(true, false, bk, D, bq, C(1), pm, bk, gc.data() + q0 * D, D, C(1), dvc.data() + k0 * D, D);
      // dP = dO[q] V[k]^T
      rm_gemm<C>(false, true, bq, bk, D, C(1), gc.data() + q0 * D, D, vc.data() + k0 * D, D, C(0), dpm, bk);
      for (int64_t r = 0; r < bq; ++r) {
        const C* pr = pm + r * bk;
        C* dr = dpm + r * bk;
        const C dl = delta[q0 + r];
#pragma omp simd
        for (int64_t j = 0; j < bk; ++j) dr[j] = pr[j] * (dr[j] - dl);
      }
      // dQ[q] += scale dS K[k];  dK[k] += scale dS^T Q[q]
      rm_gemm<C>(false, false, bq, D, bk, scale, dpm, bk, kc.data() + k0 * D, D, C(1), dqc.data() + q0 * D, D);
      rm_gemm<C>(true, false, bk, D, bq, scale, dpm, bk, qc.data() + q0 * D, D, C(1), dkc.data() + k0 * D, D);
    }
  }
  for (int64_t r = 0; r < nv; ++r) {
    const int64_t row = vis[r];
    for (int64_t j = 0; j < D; ++j) {
      dq[row * D + j] = cpu::st<S>(dqc[r * D + j]);
      dk[row * D + j] = cpu::st<S>(dkc[r * D + j]);
      dv[row * D + j] = cpu::st<S>(dvc[r * D + j]);
    }
  }
}

#define MAEP_DEFINE_MPA(S, SUF)                                                                                   \
  MAEP_CLONES void mpa_fwd_one_##SUF(const S* q, const S* k, const S* v, S* out, compute_t<S>* lse,               \
                                     const int64_t* vis, int64_t nv, int64_t L, int64_t D, compute_t<S> scale) {  \
    mpa_fwd_one_impl<S>(q, k, v, out, lse, vis, nv, L, D, scale);                                                 \
  }                                                                                                               \
  MAEP_CLONES void mpa_bwd_one_##SUF(const S* go, const S* q, const S* k, const S* v, const S* o,                 \
                                     const compute_t<S>* lse, S* dq, S* dk, S* dv, const int64_t* vis, int64_t nv, \
                                     int64_t L, int64_t D, compute_t<S> scale) {                                  \
    mpa_bwd_one_impl<S>(go, q, k, v, o, lse, dq, dk, dv, vis, nv, L, D, scale);                                   \
  }                                                                                                               \
  void mpa_fwd_one(const S* q, const S* k, const S* v, S* out, compute_t<S>* lse, const int64_t* vis, int64_t nv, \
                   int64_t L, int64_t D, compute_t<S> scale) {                                                    \
    mpa_fwd_one_##SUF(q, k, v, out, lse, vis, nv, L, D, scale);                                                   \
  }                                                                                                               \
  void mpa_bwd_one(const S* go, const S* q, const S* k, const S* v, const S* o, const compute_t<S>* lse, S* dq,   \
                   S* dk, S* dv, const int64_t* vis, int64_t nv, int64_t L, int64_t D, compute_t<S> scale) {      \
    mpa_bwd_one_##SUF(go, q, k, v, o, lse, dq, dk, dv, vis, nv, L, D, scale);                                     \
  }

MAEP_DEFINE_MPA(float, f32)
MAEP_DEFINE_MPA(double, f64)
MAEP_DEFINE_MPA(c10::Half, f16)
MAEP_DEFINE_MPA(c10::BFloat16, bf16)
#undef MAEP_DEFINE_MPA

// (b, h) pairs per task: about 64k multiply-adds of work per task.
int64_t bh_grain(const MpaGeometry& g) {
  const int64_t work = std::max<int64_t>(1, g.l * g.l * g.d);
  return std::max<int64_t>(1, 65536 / work);
}

// fn(t, b) for every (sample, head) t = b * H + h, in parallel over heads.
template <typename F>
void for_each_head(const MpaGeometry& g, const F& fn) {
  at::parallel_for(0, g.b * g.h, bh_grain(g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(t, t / g.h);
  });
}

std::tuple<at::Tensor, at::Tensor> masked_patch_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                  const at::Tensor& v_in,
                                                                  const c10::optional<at::Tensor>& keep,
                                                                  double scale) {
  const MpaGeometry g =
      check_mpa_args("maep_fast::masked_patch_attention_fwd", c10::DeviceType::CPU, q_in, k_in, v_in, keep, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  std::vector<int64_t> vis, count;
  visible_lists(keep, g, vis, count);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.b, g.h, g.l}, q.options().dtype(mpa_stat_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "maep_fast::masked_patch_attention_fwd",
                                  [&] {
                                    using C = compute_t<scalar_t>;
                                    const scalar_t* qp = q.const_data_ptr<scalar_t>();
                                    const scalar_t* kp = k.const_data_ptr<scalar_t>();
                                    const scalar_t* vp = v.const_data_ptr<scalar_t>();
                                    scalar_t* op = out.mutable_data_ptr<scalar_t>();
                                    C* lp = lse.mutable_data_ptr<C>();
                                    const int64_t LD = g.l * g.d;
                                    for_each_head(g, [&](int64_t t, int64_t b) {
                                      mpa_fwd_one(qp + t * LD, kp + t * LD, vp + t * LD, op + t * LD, lp + t * g.l,
                                                  vis.data() + b * g.l, count[b], g.l, g.d, static_cast<C>(scale));
                                    });
                                  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_patch_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& keep, double scale) {
  const char* op = "maep_fast::masked_patch_attention_bwd";
  const MpaGeometry g = check_mpa_args(op, c10::DeviceType::CPU, q_in, k_in, v_in, keep, scale);
  check_mpa_bwd_extra(op, g, q_in, grad_out_in, out_in, lse_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous(), o = out_in.contiguous(), lse = lse_in.contiguous();
  std::vector<int64_t> vis, count;
  visible_lists(keep, g, vis, count);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "maep_fast::masked_patch_attention_bwd",
                                  [&] {
                                    using C = compute_t<scalar_t>;
                                    const scalar_t* qp = q.const_data_ptr<scalar_t>();
                                    const scalar_t* kp = k.const_data_ptr<scalar_t>();
                                    const scalar_t* vp = v.const_data_ptr<scalar_t>();
                                    const scalar_t* gp = go.const_data_ptr<scalar_t>();
                                    const scalar_t* opp = o.const_data_ptr<scalar_t>();
                                    const C* lp = lse.const_data_ptr<C>();
                                    scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
                                    scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
                                    scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
                                    const int64_t LD = g.l * g.d;
                                    for_each_head(g, [&](int64_t t, int64_t b) {
                                      mpa_bwd_one(gp + t * LD, qp + t * LD, kp + t * LD, vp + t * LD, opp + t * LD,
                                                  lp + t * g.l, dqp + t * LD, dkp + t * LD, dvp + t * LD,
                                                  vis.data() + b * g.l, count[b], g.l, g.d, static_cast<C>(scale));
                                    });
                                  });
  return {dq, dk, dv};
}

// ---- the public differentiable op ---------------------------------------------
using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&, double);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const c10::optional<at::Tensor>&, double);

const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maep_fast::masked_patch_attention_fwd", "")
                             .typed<FwdFn>();
  return op;
}
const c10::TypedOperatorHandle<BwdFn>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("maep_fast::masked_patch_attention_bwd", "")
                             .typed<BwdFn>();
  return op;
}

// (dq, dk, dv), each only where needed; shared by the node and its compiled-autograd form.
// An undefined grad counts as zeros (the kernel still runs: dq, dk, dv of 0 are 0).
torch::autograd::variable_list mpa_backward(const at::Tensor& grad, bool need_q, bool need_k, bool need_v,
                                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const c10::optional<at::Tensor>& keep, const at::Tensor& out,
                                            const at::Tensor& lse, double scale) {
  if (!(need_q || need_k || need_v)) return {at::Tensor(), at::Tensor(), at::Tensor()};
  const at::Tensor go = grad.defined() ? grad.contiguous() : at::zeros_like(out);
  auto [dq, dk, dv] = bwd_op().call(go, q, k, v, out, lse, keep, scale);
  return {need_q ? dq : at::Tensor(), need_k ? dk : at::Tensor(), need_v ? dv : at::Tensor()};
}

torch::autograd::variable_list mpa_backward_packed(const torch::autograd::variable_list& grads,
                                                   const std::vector<c10::IValue>& args) {
  torch::autograd::PackedArgs r(args);
  const auto need_q = r.unpack<bool>();
  const auto need_k = r.unpack<bool>();
  const auto need_v = r.unpack<bool>();
  const auto q = r.unpack<at::Tensor>();
  const auto k = r.unpack<at::Tensor>();
  const auto v = r.unpack<at::Tensor>();
  const auto keep = r.unpack<std::optional<at::Tensor>>();
  const auto out = r.unpack<at::Tensor>();
  const auto lse = r.unpack<at::Tensor>();
  const auto scale = r.unpack<double>();
  return mpa_backward(grads[0], need_q, need_k, need_v, q, k, v, keep, out, lse, scale);
}

// Autograd node of maep_fast::masked_patch_attention: saves (q, k, v, keep, out, lse) of
// masked_patch_attention_fwd; backward runs masked_patch_attention_bwd. keep gets no gradient.
struct MaskedPatchAttentionBackward : torch::autograd::Node {
  torch::autograd::SavedVariable q_, k_, v_, keep_, out_, lse_;
  bool has_keep = false;
  double scale = 0.0;

  std::string name() const override { return "MaskedPatchAttentionBackward"; }

  c10::optional<at::Tensor> keep() const {
    return has_keep ? c10::optional<at::Tensor>(keep_.unpack()) : c10::nullopt;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return mpa_backward(grads[0], task_should_compute_output(0), task_should_compute_output(1),
                        task_should_compute_output(2), q_.unpack(), k_.unpack(), v_.unpack(), keep(),
                        out_.unpack(getptr()), lse_.unpack(), scale);
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    q_.reset_data();
    k_.reset_data();
    v_.reset_data();
    keep_.reset_data();
    out_.reset_data();
    lse_.reset_data();
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    args.collect(q_, false);
    args.collect(k_, false);
    args.collect(v_, false);
    args.collect(keep_, false);
    args.collect(out_, true);
    args.collect(lse_, false);
    args.collect(has_keep);
    args.collect(scale);
  }

  torch::autograd::variable_list apply_with_saved(const torch::autograd::variable_list& grads,
                                                  torch::autograd::SwapSavedVariables& saved) override {
    using torch::dynamo::autograd::IValuePacker;
    torch::autograd::SavedVariable* vars[] = {&q_, &k_, &v_, &keep_, &out_, &lse_};
    for (auto* sv : vars) saved.before(*sv);
    torch::autograd::PackedArgs args;
    args.pack(task_should_compute_output(0));
    args.pack(task_should_compute_output(1));
    args.pack(task_should_compute_output(2));
    args.pack(q_.unpack());
    args.pack(k_.unpack());
    args.pack(v_.unpack());
    args.pack(keep());
    args.pack(out_.unpack(getptr()));
    args.pack(lse_.unpack());
    args.pack(scale);
    const auto b = IValuePacker<bool>::packed_type();
    const auto t = IValuePacker<at::Tensor>::packed_type();
    static bool bound = false;
    auto result = compiled_apply_functional(
        saved, "maep_fast_" + name(), bound, mpa_backward_packed,
        {b, b, b, t, t, t, IValuePacker<std::optional<at::Tensor>>::packed_type(), t, t,
         IValuePacker<double>::packed_type()},
        args, next_edges(), grads);
    for (auto* sv : vars) saved.after(*sv);
    return result;
  }
};

at::Tensor masked_patch_attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const c10::optional<at::Tensor>& keep, double scale) {
  const bool record = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  at::Tensor out, lse;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(out, lse) = fwd_op().call(q, k, v, keep, scale);
  }
  if (!record) return out;
  TORCH_CHECK_NOT_IMPLEMENTED(!(q._fw_grad(0).defined() || k._fw_grad(0).defined() || v._fw_grad(0).defined()),
                              "maep_fast::masked_patch_attention: forward-mode AD is not implemented");
  auto node = make_node<MaskedPatchAttentionBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, v));
  node->q_ = torch::autograd::SavedVariable(q, false);
  node->k_ = torch::autograd::SavedVariable(k, false);
  node->v_ = torch::autograd::SavedVariable(v, false);
  node->has_keep = keep.has_value() && keep->defined();
  if (node->has_keep) node->keep_ = torch::autograd::SavedVariable(*keep, false);
  node->lse_ = torch::autograd::SavedVariable(lse, false);
  node->scale = scale;
  torch::autograd::set_history(out, node);
  node->out_ = torch::autograd::SavedVariable(out, true);
  return out;
}

// Backend kernel of the public op (reached below autograd, e.g. under no_grad or
// inside AOTAutograd's traced graph): the out of masked_patch_attention_fwd.
at::Tensor masked_patch_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& keep, double scale) {
  return std::get<0>(masked_patch_attention_fwd_cpu(q, k, v, keep, scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(maep_fast, CPU, m) {
  m.impl("masked_patch_attention", &masked_patch_attention_cpu);
  m.impl("masked_patch_attention_fwd", &masked_patch_attention_fwd_cpu);
  m.impl("masked_patch_attention_bwd", &masked_patch_attention_bwd_cpu);
}

TORCH_LIBRARY_IMPL(maep_fast, Autograd, m) {
  m.impl("masked_patch_attention", &masked_patch_attention_autograd);
}

}  // namespace maep_fast
