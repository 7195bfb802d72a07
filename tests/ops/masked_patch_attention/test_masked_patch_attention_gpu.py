"""GPU backends ("cuda" = native kernels of maep_fast._C, "triton") of masked_patch_attention against
the fp64 torch reference, on CUDA tensors (skipped without a CUDA device): forward + dq/dk/dv
(B = 1, primes, L in {1, 17, 65, 257}, D in {16, 48, 64, 96, 128}; keep None / all / one / ragged /
a sample with none kept; hidden query rows exactly 0 in out and dq, hidden keys exactly 0 in dk and
dv; B*H > 65535), explicit scale and non-contiguous inputs, "cuda" vs "triton", what "auto" and
"cuda" do with inputs no GPU kernel takes.

Equivalence rule: op_helpers.assert_close_fp (design.md), TF32 off. fp32 attention gradients
(flash-style backward, dS = P (dP - Delta) is a difference of O(|dO| |V|) terms) may also pass with
max err <= 3 * err(fp32 reference) + 1e-5 * (1 + max|grad|). Outputs are written into allocator
blocks poisoned with NaN first; every output must be finite.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from op_helpers import GPU_BACKENDS as BACKENDS
from op_helpers import GPU_DTYPES as DTYPES
from op_helpers import GPU_MODULE_MARKS, amax, maxerr, need, no_tf32, poison  # noqa: F401  (no_tf32: a fixture)
from op_helpers import assert_close_fp, make_keep, make_qkv

pytestmark = GPU_MODULE_MARKS
DEV = torch.device("cuda")
KEEPS = ("none", "all", "one", "ragged", "empty_sample")


MPA = "masked_patch_attention"
# (B, H, L, D), keep patterns
MPA_CASES = [
    ((1, 1, 1, 16), ("none", "all", "empty_sample")),
    ((1, 3, 17, 48), ("none", "one", "ragged")),
    ((3, 2, 65, 96), KEEPS),
    ((2, 1, 257, 128), KEEPS),
    ((5, 2, 257, 64), ("none", "ragged")),
    ((1, 2, 65, 16), ("ragged",)),
]
MPA_PARAMS = [(s, kp) for s, kps in MPA_CASES for kp in kps]


def mpa_ref(q, k, v, keep, go, dtype, scale=None):
    from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference

    xs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = masked_patch_attention_reference(*xs, keep, scale)
    return (out.detach(),) + torch.autograd.grad(out, xs, go.to(dtype))


def mpa_fast(q, k, v, keep, go, backend, scale=None):
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    poison(8 * q.numel())
    out = masked_patch_attention(*xs, keep, scale=scale, backend=backend)
    poison(8 * q.numel())
    return (out.detach(),) + torch.autograd.grad(out, xs, go)


def mpa_check(res, q, k, v, keep, go, scale=None, what=""):
    dtype = q.dtype
    r64 = mpa_ref(q, k, v, keep, go, torch.float64, scale)
    rlp = mpa_ref(q, k, v, keep, go, dtype, scale)
    gmag = max(amax(t) for t in r64[1:])
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_fp(res[i], r64[i], rlp[i], dtype, f"{name} {what}", k=2 if i == 0 else 3,
                     fp32_atol=None if i == 0 else 1e-5 * (1 + gmag))
    if keep is not None:
        hid_q = (~keep)[:, None, :, None].expand_as(q)
        for name, t in (("out", res[0]), ("dq", res[1]), ("dk", res[2]), ("dv", res[3])):
            assert torch.all(t[hid_q] == 0), f"{name} not exactly 0 on hidden rows {what}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,keep_kind", MPA_PARAMS, ids=[f"{s}-{kp}" for s, kp in MPA_PARAMS])
def test_mpa_vs_fp64_reference(backend, dtype, shape, keep_kind):
    need(MPA, backend)
    q, k, v, go = make_qkv(shape, dtype, device=DEV, n=4)
    keep = make_keep(keep_kind, shape[0], shape[2], device=DEV)
    res = mpa_fast(q, k, v, keep, go, backend)
    mpa_check(res, q, k, v, keep, go, what=f"{backend} {shape} {dtype} keep={keep_kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpa_explicit_scale_and_noncontiguous(backend):
    need(MPA, backend)
    b, h, length, d = 2, 3, 33, 48
    qkv = torch.randn(b, length, 3, h, d, device=DEV).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D] views
    q, k, v = qkv.unbind(0)
    go = torch.randn(b, h, length, d, device=DEV)
    keep = make_keep("ragged", b, length, device=DEV)
    res = mpa_fast(q, k, v, keep, go, backend, scale=0.37)
    mpa_check(res, q, k, v, keep, go, scale=0.37, what=f"{backend} non-contiguous scale=0.37")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpa_many_heads_times_batch(backend):
    """B*H > 65535 programs: a launch grid must not put B*H on a 65535-limited axis."""
    need(MPA, backend)
    shape = (4099, 16, 2, 16)
    q, k, v, go = make_qkv(shape, device=DEV, n=4)
    keep = make_keep("ragged", shape[0], shape[2], device=DEV)
    res = mpa_fast(q, k, v, keep, go, backend)
    torch.cuda.synchronize()
    mpa_check(res, q, k, v, keep, go, what=f"{backend} B*H={shape[0] * shape[1]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mpa_cuda_vs_triton(dtype):
    need(MPA, "cuda")
    need(MPA, "triton")
    shape = (3, 2, 65, 96)
    q, k, v, go = make_qkv(shape, dtype, device=DEV, n=4)
    keep = make_keep("empty_sample", shape[0], shape[2], device=DEV)
    a = mpa_fast(q, k, v, keep, go, "cuda")
    b = mpa_fast(q, k, v, keep, go, "triton")
    r64 = mpa_ref(q, k, v, keep, go, torch.float64)
    rlp = mpa_ref(q, k, v, keep, go, dtype)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        kk = 2 if i == 0 else 3
        if dtype == torch.float32:
            bound = 2 * (1e-5 * amax(r64[i]) + 1e-6) if i == 0 else 2e-5 * (1 + max(amax(t) for t in r64[1:]))
        else:
            bound = 2 * (kk * maxerr(rlp[i], r64[i]) + torch.finfo(dtype).eps * (1 + amax(r64[i])))
        assert maxerr(a[i], b[i]) <= bound, (name, str(dtype), maxerr(a[i], b[i]), bound)


@pytest.mark.parametrize("dtype,d", [(torch.float64, 16), (torch.float32, 320)], ids=("fp64", "D320"))
def test_mpa_auto_runs_inputs_no_gpu_kernel_takes(monkeypatch, dtype, d):
    """backend='auto' must not raise on CUDA inputs that neither Triton (fp64, D > 256) nor the
    CUDA kernel (fp64, D > 128) takes: the docstring promises the next available backend."""
    monkeypatch.delenv("MAEP_FAST_BACKEND", raising=False)
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    shape = (2, 2, 17, d)
    q, k, v, go = make_qkv(shape, dtype, device=DEV, n=4)
    keep = make_keep("ragged", 2, 17, device=DEV)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_patch_attention(*xs, keep, backend="auto")
    grads = torch.autograd.grad(out, xs, go)
    r64 = mpa_ref(q, k, v, keep, go, torch.float64)
    rlp = mpa_ref(q, k, v, keep, go, dtype)
    for i, t in enumerate((out.detach(),) + grads):
        assert_close_fp(t, r64[i], rlp[i], dtype, f"auto {i}",
                     k=2 if i == 0 else 3, fp32_atol=1e-5 * (1 + max(amax(g) for g in r64[1:])))


def test_mpa_cuda_rejects_what_it_cannot_run():
    need(MPA, "cuda")
    from maep_fast.ops.masked_patch_attention import masked_patch_attention

    q = torch.randn(1, 1, 4, 16, device=DEV, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        masked_patch_attention(q, q, q, backend="cuda")
    q = torch.randn(1, 1, 4, 160, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        masked_patch_attention(q, q, q, backend="cuda")


def test_mpa_cuda_native_op_refuses_wide_heads():
    """The native op called directly (below the Python refusal) refuses in its C++ host checks.
    This call crashed the H200 runs' worker: formatting the message's integers went through a copy
    of libstdc++ that the toolchain had linked into _C (bench/gpu_runs/2026-11-29-s4/README.md;
    CMakeLists.txt now keeps such copies local, tests/test_native_error_messages.py)."""
    need(MPA, "cuda")
    q = torch.randn(1, 1, 4, 160, device=DEV)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.maep_fast.masked_patch_attention(q, q, q, None, 0.1)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.maep_fast.masked_patch_attention(q.double(), q.double(), q.double(), None, 0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_does_not_run_reference(monkeypatch, backend):
    """An explicitly requested backend runs its kernels, not the torch reference."""
    need(MPA, backend)
    mod = importlib.import_module("maep_fast.ops.masked_patch_attention")  # the module, not the re-exported function
    monkeypatch.setattr(mod, "masked_patch_attention_reference",
                        lambda *a, **k: pytest.fail(f"backend={backend!r} ran the reference"))
    q = torch.randn(2, 2, 5, 16, device=DEV)
    out = mod.masked_patch_attention(q, q, q, make_keep("ragged", 2, 5, device=DEV), backend=backend)
    torch.cuda.synchronize()
    assert out.shape == q.shape and torch.isfinite(out).all()
