// Torch-free CUDA kernels of maep_fast::patch_recon_loss (per-patch part):
// raw pointers, sizes and a stream, so nvcc can compile-check them without torch.
//
// The op's contract and per-patch error err[n, l]: maep_fast/ops/patch_recon_loss.py.
// Here imgs [N, C, H, W] and pred [N, L, ps*ps*C] are contiguous, already checked, and the
// target column j of patch (n, l) is patchify's channel-last j = (pi*ps + qi)*C + c.
// Forward writes err (fp32; fp64 for double storage); the mask weighting and
// the reduction over [N, L] are done by the torch glue.
// Backward takes the per-patch weight w = d loss / d err[n, l] and writes
// d pred [N, L, dim] and d imgs [N, C, H, W] (every pixel belongs to exactly
// one patch: plain stores, no atomics).
// One warp per patch; storage T in {float, __half, __nv_bfloat16} with fp32
// math, or double with fp64 math.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace maep_fast {
namespace cuda {

enum class PrlDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct PrlShape {
  int64_t n, c, h, w, ps;  // imgs [n, c, h, w], patch size ps (h % ps == 0, w % ps == 0)
};

// err: [N*L] float (double when dtype == kFloat64).
cudaError_t launch_patch_recon_loss_fwd(PrlDType dtype, const void* pred, const void* imgs, void* err, PrlShape shape,
                                        bool norm_pix, int p, cudaStream_t stream);

// weight: [N*L] float (double when dtype == kFloat64); dpred, dimgs in dtype.
cudaError_t launch_patch_recon_loss_bwd(PrlDType dtype, const void* pred, const void* imgs, const void* weight,
                                        void* dpred, void* dimgs, PrlShape shape, bool norm_pix, int p,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace maep_fast
