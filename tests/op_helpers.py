"""Helpers shared by the op tests (tests/ops/<op>/): inputs and design.md's equivalence rule.

Imported as ``from op_helpers import ...`` (tests/ is on sys.path: pytest's prepend import mode
puts the rootdir conftest's folder there).
"""
from __future__ import annotations

import pytest
import torch


def maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def amax(t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_fp(fast, ref64, ref_lp, dtype, what, k=2, *, fp32_atol=None, scale_rel=False):
    """design.md's equivalence rule for ``fast`` (a kernel's result in ``dtype``) against ``ref64``
    (the fp64 reference); ``ref_lp`` is the reference run in ``dtype`` (None: fp32 must then pass
    the plain allclose bound).

    - fp64: allclose(rtol=1e-12, atol=1e-12).
    - fp32: allclose(rtol=1e-5, atol=1e-6); where that bound is not meaningful (gradients of the
      flash-style attention backward, ill-conditioned norm_pix patches) the stated fallback
      max|fast - ref64| <= k * max|ref_lp - ref64| + atol, atol = ``fp32_atol`` if given, else
      1e-6 * (1 + max|ref64|).
    - fp16 / bf16: max|fast - ref64| <= k * max|ref_lp - ref64| + atol, atol = eps(dtype) *
      (1 + max|ref64|), or eps(dtype) * max|ref64| with ``scale_rel`` (values whose scale is far
      below 1, e.g. patch_recon_loss gradients O(1 / (N L D))).
    Always: the dtype and shape match, and every element is finite (outputs written into buffers
    poisoned with NaN).
    """
    assert fast.dtype == dtype, (what, fast.dtype, dtype)
    assert fast.shape == ref64.shape, (what, tuple(fast.shape), tuple(ref64.shape))
    assert torch.isfinite(fast).all(), f"non-finite value (unwritten / poisoned element): {what}"
    if dtype == torch.float64:
        torch.testing.assert_close(fast, ref64, rtol=1e-12, atol=1e-12, msg=what)
        return
    if dtype == torch.float32:
        if torch.allclose(fast.double(), ref64.double(), rtol=1e-5, atol=1e-6):
            return
        atol = 1e-6 * (1 + amax(ref64)) if fp32_atol is None else fp32_atol
    else:
        eps = torch.finfo(dtype).eps
        atol = eps * amax(ref64) if scale_rel else eps * (1 + amax(ref64))
    assert ref_lp is not None, f"{what}: outside allclose(rtol=1e-5, atol=1e-6) of the fp64 reference"
    err, err_ref = maxerr(fast, ref64), maxerr(ref_lp, ref64)
    assert err <= k * err_ref + atol, (what, str(dtype), err, err_ref, atol)


def make_qkv(shape, dtype=torch.float32, *, device="cpu", gen=None, draw_dtype=None, n=3):
    """``n`` standard-normal tensors of ``shape`` ([B, H, L, D]: q, k, v, and a 4th for dO), drawn
    in ``draw_dtype`` (default ``dtype``) and cast to ``dtype``."""
    return [torch.randn(shape, generator=gen, dtype=draw_dtype or dtype, device=device).to(dtype)
            for _ in range(n)]


def make_keep(kind, b, length, *, device="cpu", gen=None, density=None, one_at=None, empty_at=None):
    """A [B, L] bool keep mask (True = visible) of a named pattern, or None for ``"none"``.

    all: every token. one: one token per sample, at ``one_at`` (None: a random one per sample).
    ragged: each token with probability ``density`` (None: a random per-sample density in
    [0.2, 0.9]), token 0 always visible. empty_sample: ragged, with sample ``empty_at`` (default
    b // 2) hiding every token. mixed: ragged, with samples cycling through fully visible, only the
    last token visible, none visible, ragged.
    """
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(b, length, dtype=torch.bool, device=device)
    if kind == "one":
        keep = torch.zeros(b, length, dtype=torch.bool, device=device)
        if one_at is None:
            keep[torch.arange(b, device=device), torch.randint(0, length, (b,), generator=gen, device=device)] = True
        else:
            keep[:, one_at] = True
        return keep
    if kind not in ("ragged", "empty_sample", "mixed"):
        raise ValueError(f"unknown keep pattern {kind!r}")
    u = torch.rand(b, length, generator=gen, device=device)
    keep = u < (density if density is not None else torch.rand(b, 1, generator=gen, device=device).clamp(0.2, 0.9))
    keep[:, 0] = True  # the cls token is always visible
    if kind == "empty_sample":
        keep[b // 2 if empty_at is None else empty_at] = False
    if kind == "mixed":
        for i in range(b):
            if i % 4 == 0:
                keep[i] = True
            elif i % 4 == 1:
                keep[i] = False
                keep[i, -1] = True
            elif i % 4 == 2:
                keep[i] = False
    return keep


# ---------------------------------------------------------------- GPU backends (tests/ops/*/test_*_gpu.py)
CUDA = torch.device("cuda")
GPU_BACKENDS = ("cuda", "triton")
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EVERY_BACKEND = ("auto", "cuda", "triton", "torch")
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# a GPU-backend equivalence module: GPU_ONLY and TF32 off (the module imports the fixture no_tf32)
GPU_MODULE_MARKS = GPU_ONLY + [pytest.mark.usefixtures("no_tf32")]


@pytest.fixture
def no_tf32():
    """TF32 off (torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32), restored afterwards: fp32
    matmuls and Triton's fp32 tl.dot run in IEEE fp32."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def need(op: str, backend: str, device=CUDA) -> None:
    """Skip the test, with the reason, where ``backend`` cannot run ``op`` on ``device``."""
    from maep_fast.ops._dispatch import unavailable_reason  # no public name says why a backend is unavailable

    why = unavailable_reason(op, backend, torch.device(device))
    if why:
        pytest.skip(why)


def poison(numel: int, device=CUDA, dtype=torch.float32) -> None:
    """Fill a block with NaN and free it: the caching allocator is likely to hand it to the outputs."""
    t = torch.full((max(int(numel), 1),), float("nan"), device=device, dtype=dtype)
    del t


def assert_sync_free(run, rtol=None, atol=None):
    """Once warmed up (Triton JIT, lazy init), ``run()`` -> tuple of CUDA tensors synchronizes nothing
    with the host (conftest.no_sync raises on ``.item()``, ``bool(tensor)``, a blocking
    copy) and gives what the warm-up call gave."""
    from conftest import no_sync

    want = run()
    with no_sync():
        got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
