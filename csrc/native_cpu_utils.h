// Small helpers shared by the CPU kernels of patch_recon_loss and
// masked_patch_attention: function multiversioning and storage<->compute
// conversions.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Per-chunk workers are cloned for x86-64-v3 (AVX2 + FMA) and the baseline,
// picked at load time, like csrc/pgd_step_cpu.cpp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MAEP_FAST_NO_CLONES)
#define MAEP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MAEP_CLONES
#endif

#if defined(__GNUC__)
#define MAEP_INLINE inline __attribute__((always_inline))
#else
#define MAEP_INLINE inline
#endif

namespace maep_fast {
namespace cpu {

// float for float/half/bfloat16 storage, double for double.
template <typename S>
using compute_t = at::opmath_type<S>;

template <typename S>
MAEP_INLINE compute_t<S> ld(S v) {
  return static_cast<compute_t<S>>(v);
}
template <typename S>
MAEP_INLINE S st(compute_t<S> v) {
  return static_cast<S>(v);
}

}  // namespace cpu
}  // namespace maep_fast
