// Torch-free CUDA kernels of maep_fast::masked_patch_attention_fwd / _bwd:
// raw pointers, sizes and a stream, so nvcc can compile-check them without torch.
//
// q, k, v, out, grad_out, dq, dk, dv: [B, H, L, D] contiguous, storage T in
// {float, __half, __nv_bfloat16}, fp32 math; lse, delta: [B, H, L] fp32.
// Visibility: vis [B, L] int32 holds, per sample, the visible patch indices
// first (ascending), count [B] int32 their number; vis == nullptr means every
// patch is visible (keep = None). Only visible rows are read or written:
// the caller zero-fills out / lse / dq / dk / dv for hidden rows.
// fp16 / bf16 run on tensor cores (mma.sync m16n8k16, sm_80+), fp32 on exact
// scalar kernels. Limits (the launchers return cudaErrorInvalidValue beyond
// them; the torch glue refuses such inputs first, naming the argument):
// B, H, L >= 1, 1 <= D <= kMpaMaxHeadDim, L <= kMpaMaxSeqLen,
// B*H*ceil(L / kMpaRowsPerBlock) <= kMpaMaxGridBlocks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace maep_fast {
namespace cuda {

enum class MpaDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMpaMaxHeadDim = 128;
constexpr int64_t kMpaMaxSeqLen = 65535LL * 4;          // grid.y of the per-row kernels: ceil(L / 4) <= 65535
constexpr int64_t kMpaRowsPerBlock = 64;                // rows per block of the tensor-core kernels
constexpr int64_t kMpaMaxGridBlocks = 2147483647LL;     // grid.x limit

struct MpaShape {
  int64_t b, h, l, d;
};

// out = softmax(scale q k^T over visible keys) v; lse = per-row logsumexp (fp32).
cudaError_t launch_masked_patch_attention_fwd(MpaDType dtype, const void* q, const void* k, const void* v, void* out,
                                              float* lse, const int32_t* vis, const int32_t* count, MpaShape shape,
                                              float scale, cudaStream_t stream);

// dq, dk, dv of the visible rows; delta: [B, H, L] fp32 workspace.
cudaError_t launch_masked_patch_attention_bwd(MpaDType dtype, const void* grad_out, const void* q, const void* k,
                                              const void* v, const void* out, const float* lse, float* delta,
                                              void* dq, void* dk, void* dv, const int32_t* vis, const int32_t* count,
                                              MpaShape shape, float scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace maep_fast
