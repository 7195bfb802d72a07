"""GPU backends ("cuda" = native kernels of maep_fast._C, "triton") of the three fused ops together, on
CUDA tensors (skipped without a CUDA device): what backend "auto" picks; native ops and the public
entry points on a non-default stream behind a long matmul (kernels launched on the wrong stream race:
pytorch/extension-cpp#118) and inside torch.compile(mode="reduce-overhead") (CUDA graphs); end to end,
Purifier fused vs reference (fp32) and a MAEP training step under bf16 autocast.

Each op alone, against the fp64 reference: tests/ops/<op>/test_<op>_gpu.py.
"""
from __future__ import annotations

import copy

import pytest
import torch
from op_helpers import CUDA as DEV
from op_helpers import GPU_BACKENDS as BACKENDS
from op_helpers import GPU_MODULE_MARKS, make_keep, need, no_tf32  # noqa: F401  (no_tf32: a fixture)

from maep_fast.ops._dispatch import resolve_backend, unavailable_reason  # no public names for these

pytestmark = GPU_MODULE_MARKS
MPA, PRL, PGD = "masked_patch_attention", "patch_recon_loss", "pgd_step"


@pytest.mark.parametrize("op", (PGD, PRL, MPA))
def test_auto_on_cuda_picks_a_gpu_backend(monkeypatch, op):
    monkeypatch.delenv("MAEP_FAST_BACKEND", raising=False)
    if all(unavailable_reason(op, b, DEV) for b in BACKENDS):
        pytest.skip(f"neither GPU backend can run {op} here")
    assert resolve_backend(op, "auto", DEV) in BACKENDS


# ==========================================================================================
# streams and CUDA graphs: native kernels must launch on the current stream
# ==========================================================================================
def native_inputs():
    b, h, length, d = 3, 2, 65, 64
    imgs = torch.rand(5, 3, 32, 32, device=DEV)
    return {
        "q": torch.randn(b, h, length, d, device=DEV),
        "k": torch.randn(b, h, length, d, device=DEV),
        "v": torch.randn(b, h, length, d, device=DEV),
        "go": torch.randn(b, h, length, d, device=DEV),
        "keep": make_keep("empty_sample", b, length, device=DEV),
        "pred": torch.randn(5, 64, 48, device=DEV),
        "imgs": imgs,
        "mask": (torch.rand(5, 64, device=DEV) < 0.6).float(),
        "gl": torch.linspace(0.5, 1.5, 5, device=DEV),
        "x": (imgs + 0.02 * torch.randn_like(imgs)).clamp(0, 1),
        "g": torch.randn_like(imgs),
        "step": torch.rand(5, device=DEV) * 0.05,
        "eps": torch.rand(5, device=DEV) * 0.1,
    }


def native_suite(t):
    ops = torch.ops.maep_fast
    out, lse = ops.masked_patch_attention_fwd(t["q"], t["k"], t["v"], t["keep"], 0.125)
    dq, dk, dv = ops.masked_patch_attention_bwd(t["go"], t["q"], t["k"], t["v"], out, lse, t["keep"], 0.125)
    loss = ops.patch_recon_loss(t["pred"], t["imgs"], t["mask"], 4, True, 2, "per_sample")
    gp, gi = ops.patch_recon_loss_backward(t["gl"], t["pred"], t["imgs"], t["mask"], 4, True, 2, "per_sample")
    x1 = ops.pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], "linf", 1, 0.0, 1.0)
    x2 = ops.pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], "l2", -1, 0.0, 1.0)
    return [out, lse, dq, dk, dv, loss, gp, gi, x1, x2]


SUITE_NAMES = ("out", "lse", "dq", "dk", "dv", "loss", "dpred", "dimgs", "pgd_linf", "pgd_l2")


def need_native_cuda():
    for op in (PGD, PRL, MPA):
        need(op, "cuda")


def busy(stream):
    """A long kernel chain on ``stream`` (~tens of ms): later work on it must wait for it."""
    a = torch.randn(6144, 6144, device=DEV) / 80.0
    for _ in range(3):
        a = a @ a
    return a


def compare_lists(got, want, what):
    for name, a, b in zip(SUITE_NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{what} {n}: {m}")


def test_native_ops_on_a_side_stream():
    need_native_cuda()
    src = native_inputs()
    want = [t.clone() for t in native_suite(src)]
    dst = {n: torch.zeros_like(t) for n, t in src.items()}  # what a too-early read would see
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        busy(s)
        for n in src:
            dst[n].copy_(src[n])  # queued behind the matmuls on s
        got = native_suite(dst)
        # the in-place step too
        xi = dst["x"].clone()
        torch.ops.maep_fast.pgd_step_(xi, dst["g"], dst["imgs"], dst["step"], dst["eps"], "l2", -1, 0.0, 1.0)
    torch.cuda.synchronize()
    compare_lists(got, want, "side stream")
    torch.testing.assert_close(xi, want[-1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_ops_on_a_side_stream(backend):
    """The public entry points (autograd included) on a non-default stream."""
    for op in (PGD, PRL, MPA):
        need(op, backend)
    from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step

    def run(t):
        q, k, v = (t[n].detach().clone().requires_grad_(True) for n in "qkv")
        out = masked_patch_attention(q, k, v, t["keep"], backend=backend)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), t["go"])
        pred = t["pred"].detach().clone().requires_grad_(True)
        imgs = t["imgs"].detach().clone().requires_grad_(True)
        loss = patch_recon_loss(pred, imgs, t["mask"], patch_size=4, reduction="per_sample", backend=backend)
        gp, gi = torch.autograd.grad(loss, (pred, imgs), t["gl"])
        x2 = pgd_step(t["x"], t["g"], t["imgs"], t["step"], t["eps"], norm="l2", direction=-1, backend=backend)
        return [out.detach(), dq, dk, dv, loss.detach(), gp, gi, x2]

    src = native_inputs()
    want = [t.clone() for t in run(src)]
    dst = {n: torch.zeros_like(t) for n, t in src.items()}
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        busy(s)
        for n in src:
            dst[n].copy_(src[n])
        got = run(dst)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{backend} output {i}: {m}")


def test_native_ops_under_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures the ops into a CUDA graph on a capture
    stream; a kernel launched on the legacy default stream breaks the capture or reads stale data."""
    need_native_cuda()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(native_suite, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for it in range(4):  # warm-up, record, replays with fresh inputs each time
            t = native_inputs()
            want = native_suite(t)
            got = [g.clone() for g in compiled(t)]
            torch.cuda.synchronize()
            compare_lists(got, want, f"cuda graph call {it}")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()


# ==========================================================================================
# end to end
# ==========================================================================================
def test_purifier_fused_matches_reference_fp32():
    import maep_fast
    from maep_fast import Purifier

    model = maep_fast.create_mae("mae_vit_tiny_patch4").cuda()
    x = torch.rand(6, 3, 32, 32, device=DEV)
    x_big = torch.rand(2, 3, 45, 40, device=DEV)  # tiled path
    fused = Purifier(model, fused=True)
    a, a_big = fused.purify(x), fused.purify(x_big)
    ref = Purifier(model, fused=False)  # same weights, reference ops everywhere
    b, b_big = ref.purify(x), ref.purify(x_big)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a_big, b_big, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ("auto", "cuda", "triton"))
def test_maep_training_step_bf16_autocast_matches_reference(backend):
    import maep_fast
    from maep_fast.train.maep import maep_loss

    if backend != "auto":
        for op in (PRL, MPA):
            need(op, backend)
    base = maep_fast.create_mae("mae_vit_tiny_patch4").cuda().train()
    x = torch.rand(4, 3, 32, 32, device=DEV)
    x_adv = (x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1)

    def step(be):
        model = copy.deepcopy(base).set_backend(be)
        torch.manual_seed(1234)  # same random masking in both runs
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, parts = maep_loss(model, x_adv, x, mask_ratio=0.75, w_pur=1.0, w_mae=1.0)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach().float(), parts, grads

    l_fast, p_fast, g_fast = step(backend)
    l_ref, p_ref, g_ref = step("torch")
    assert torch.isfinite(l_fast) and torch.isfinite(g_fast).all()
    assert abs(l_fast.item() - l_ref.item()) <= 2e-2 * abs(l_ref.item()) + 1e-3, (l_fast.item(), l_ref.item())
    for key in ("l1_pur", "mae"):
        a, b = p_fast[key].float().item(), p_ref[key].float().item()
        assert abs(a - b) <= 3e-2 * abs(b) + 1e-3, (key, a, b)
    assert g_fast.shape == g_ref.shape
    cos = torch.nn.functional.cosine_similarity(g_fast.double(), g_ref.double(), dim=0).item()
    rel = ((g_fast - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
    assert cos > 0.99 and rel < 0.1, (cos, rel)
