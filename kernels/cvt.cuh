// Storage <-> compute conversions shared by the torch-free CUDA kernels:
// fp32 math for half / bfloat16 storage, native math for float / double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace maep_fast {
namespace cuda {
namespace detail {

template <typename T>
struct Cvt {  // float, double
  using C = T;
  __device__ __forceinline__ static C ld(T v) { return v; }
  __device__ __forceinline__ static T st(C v) { return v; }
};
template <>
struct Cvt<__half> {
  using C = float;
  __device__ __forceinline__ static float ld(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half st(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  using C = float;
  __device__ __forceinline__ static float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 st(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace detail
}  // namespace cuda
}  // namespace maep_fast
