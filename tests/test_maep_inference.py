"""MAEP / MAE-Pure inference in a low-precision compute dtype, on the CPU (bf16 and fp16 run there):

- bf16/fp16 run a copy of the model cast once (no weight cast per call, counted with a dispatch
  mode), the residual stream stays in the compute dtype, outputs match the fp64 reference within
  the equivalence rule (2x the autocast path's error + atol);
- the copy follows in-place weight updates (optimizer steps) without moving its storages, and
  ``refresh_weights()`` catches writes that bypass the version counter;
- pixel value checks: immediate on the CPU, deferred (no host sync) for a known input key where
  the deferred mode applies (forced onto the CPU here), ``validate=False`` skips them;
- MAE-Pure's step as one captured callable: a stand-in ``torch.cuda`` namespace records the
  capture (3 side-stream warm-ups, one step captured, S replays on fixed buffers), the result is
  the eager path's, and the step calls no op that syncs or has a data-dependent output shape.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import no_sync, tiny_mae
from maep_fast.purify import maep as maep_mod
from maep_fast.purify.mae_pure import MAEPure, _StepGraph
from maep_fast.purify.maep import CastModelCache, PixelGuard, Purifier


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _model(depth=3):
    torch.manual_seed(0)
    return tiny_mae(in_chans=3, img_size=16, patch_size=4, depth=depth).eval()


# ------------------------------------------------------------------ MAEP
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_low_precision_runs_a_cast_copy_with_a_low_precision_residual(dtype, precision):
    m = _model()
    pur = Purifier(m, precision=precision)
    x = torch.rand(5, 3, 16, 16)
    y = pur.purify(x)
    cp = pur.compute_model(dtype)
    assert cp is not m and cp is pur.compute_model(dtype)  # cached
    assert all(p.dtype == dtype and not p.requires_grad for p in cp.parameters())
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the model itself is untouched
    seen = {}
    hooks = [cp.blocks[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("block", o.dtype)),
             cp.blocks[0].norm1.register_forward_hook(lambda mod, i, o: seen.__setitem__("ln", o.dtype))]
    try:
        y2 = pur.purify(x)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"block": dtype, "ln": dtype}  # residual stream and LayerNorm output in the compute dtype
    torch.testing.assert_close(y2, y, atol=0, rtol=0)
    assert y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
    # with autocast instead (cast_weights=False) LayerNorm returns fp32: the fp32 residual this avoids
    seen.clear()
    h = m.blocks[0].register_forward_hook(lambda mod, i, o: seen.__setitem__("block", o.dtype))
    try:
        Purifier(m, precision=precision, cast_weights=False).purify(x)
    finally:
        h.remove()
    assert seen["block"] == torch.float32


def test_bf16_matches_the_fp64_reference_within_the_equivalence_rule():
    m = _model()
    x = torch.rand(7, 3, 16, 16)
    ref = Purifier(_model().double(), precision="fp32").purify(x.double())
    fast = Purifier(m, precision="bf16").purify(x).double()
    amp = Purifier(m, precision="bf16", cast_weights=False).purify(x).double()
    err, err_amp = (fast - ref).abs().max().item(), (amp - ref).abs().max().item()
    assert err <= 2 * err_amp + 1e-2, (err, err_amp)
    assert err < 0.05
    y32 = Purifier(m, precision="fp32").purify(x).double()
    assert (y32 - ref).abs().max().item() < 1e-5


def test_no_weight_is_cast_per_call():
    """Weight casts per call: 0 with the cached copy (2 input/output casts + none per layer), one
    per weight under autocast. The count with the copy does not grow with depth."""
    counts = {}
    for depth in (1, 4):
        m = _model(depth)
        x = torch.rand(2, 3, 16, 16)
        for cw in (True, False):
            pur = Purifier(m, precision="bf16", cast_weights=cw)
            pur.purify(x)  # builds the copy
            with OpCount() as c:
                pur.purify(x, validate=False)
            counts[depth, cw] = c.ops.get("_to_copy", 0)
    assert counts[1, True] == counts[4, True] <= 3, counts
    assert counts[4, False] >= counts[1, False] + 3 * 4, counts  # qkv, proj, fc1, fc2 of 3 more blocks


def test_forward_uses_the_copy_and_differentiates_to_the_input():
    m = _model()
    pur = Purifier(m, precision="bf16")
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    y = pur(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())  # the copy holds no weight gradients either
    torch.testing.assert_close(y.detach(), pur.purify(x.detach()), atol=0, rtol=0)


def test_the_copy_follows_weight_updates_in_place():
    m = _model()
    pur = Purifier(m, precision="bf16")
    x = torch.rand(4, 3, 16, 16)
    y0 = pur.purify(x)
    cp = pur.compute_model(torch.bfloat16)
    ptrs = [p.data_ptr() for p in cp.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    (m.reconstruct(x) - x).pow(2).mean().backward()
    opt.step()  # in place: bumps the parameters' versions
    y1 = pur.purify(x)
    assert pur.compute_model(torch.bfloat16) is cp and [p.data_ptr() for p in cp.parameters()] == ptrs
    torch.testing.assert_close(y1, Purifier(m, precision="bf16").purify(x), atol=0, rtol=0)
    assert not torch.equal(y1, y0) and 0 < y1.mean() < 1
    # a write that bypasses the version counter is seen after refresh_weights()
    with torch.no_grad():
        m.decoder_pred.bias.data.add_(0.05)
    stale = pur.purify(x)
    torch.testing.assert_close(stale, y1, atol=0, rtol=0)
    pur.refresh_weights()
    fresh = pur.purify(x)
    torch.testing.assert_close(fresh, Purifier(m, precision="bf16").purify(x), atol=0, rtol=0)
    assert not torch.equal(fresh, y1)


def test_attention_settings_get_their_own_copy():
    m = _model()
    cache = CastModelCache(m)
    a = cache.get(torch.bfloat16)
    m.set_fused_attn(False)
    b = cache.get(torch.bfloat16)
    assert b is not a and all(not blk.attn.fused_attn for blk in b.blocks)
    m.set_fused_attn(True)
    assert cache.get(torch.bfloat16) is a
    assert cache.get(torch.float32) is m and cache.get(torch.float64) is m


def test_the_copy_follows_a_device_move_and_a_replaced_model():
    m = _model()
    pur = Purifier(m, precision="bf16")
    x = torch.rand(2, 3, 16, 16)
    pur.purify(x)
    pur.model = _model(depth=1)  # replaced: the next call casts the new one
    torch.testing.assert_close(pur.purify(x), Purifier(_model(depth=1), precision="bf16").purify(x), atol=0, rtol=0)
    cache = CastModelCache(m)
    cp = cache.get(torch.bfloat16)
    m.to(torch.device("meta"))  # any other device: the copy is rebuilt there, not refreshed across devices
    cp2 = cache.get(torch.bfloat16)
    assert cp2 is not cp and cp2.patch_embed.proj.weight.device.type == "meta"
    assert cp2.patch_embed.proj.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------ input checks
def test_cpu_checks_every_call_and_validate_false_skips():
    pur = Purifier(_model())
    x = torch.rand(2, 3, 16, 16)
    pur.purify(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pur.purify(bad)  # same key as before: on the CPU still checked at once
    with pytest.raises(ValueError, match="pixel values in"):
        pur.purify(x + 2)
    assert torch.isnan(pur.purify(bad, validate=False)).any()  # skipped: the NaN goes through


def test_deferred_check_for_a_known_key(monkeypatch):
    """The CUDA policy, forced onto the CPU: the first input of a key is checked at once, later ones
    of that key by a flag read back later (never waiting); the next call raises for it."""
    calls = []
    real = maep_mod.check_pixels
    monkeypatch.setattr(maep_mod, "check_pixels", lambda x, name="x": (calls.append(tuple(x.shape)), real(x, name)))
    pur = Purifier(_model())
    pur._guard = PixelGuard(async_devices=("cpu",))
    x = torch.rand(2, 3, 16, 16)
    bad = x.clone()
    bad[1, 2, 3, 4] = 1.5
    with pytest.raises(ValueError, match="pixel values in"):
        pur.purify(bad)  # new key: synchronous
    pur.purify(x)  # a key becomes known once an input of it passed the synchronous check
    pur.purify(x)  # known key: no longer checked synchronously
    assert calls == [(2, 3, 16, 16)] * 2
    pur.purify(bad)  # deferred: this call does not raise...
    with pytest.raises(ValueError, match="earlier input"):
        pur.purify(x)  # ...the next one does
    pur.purify(x)  # the failure is reported once
    pur.purify(bad)
    with pytest.raises(ValueError, match="earlier input"):
        pur.check_pending()
    pur.purify(torch.rand(3, 3, 16, 16))  # a new shape is checked synchronously again
    assert calls == [(2, 3, 16, 16)] * 2 + [(3, 3, 16, 16)]


def test_mae_pure_uses_the_same_checks():
    pur = MAEPure(tiny_mae().eval(), steps=1, seed=0)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="NaN"):
        pur.purify(torch.full_like(x, float("nan")))
    pur._guard = PixelGuard(async_devices=("cpu",))
    pur.purify(x)
    pur.purify(x + 3)
    with pytest.raises(ValueError, match="earlier input"):
        pur.check_pending()


# ------------------------------------------------------------------ MAE-Pure
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mae_pure_bf16_runs_the_cast_copy(precision):
    m = tiny_mae().eval()
    kw = dict(steps=4, step_size=2 / 255, eta=8 / 255, seed=0, precision=precision)
    pur = MAEPure(m, **kw)
    x = torch.rand(3, 1, 8, 8)
    y = pur.purify(x)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    cm = pur.compute_model(want)
    assert (cm is m) == (precision == "fp32") and cm.patch_embed.proj.weight.dtype == want
    y_amp = MAEPure(m, cast_weights=False, **kw).purify(x)
    assert y.dtype == torch.float32 and (y - x).abs().max().item() <= 8 / 255 + 1e-6
    if precision == "fp32":
        torch.testing.assert_close(y, y_amp, atol=0, rtol=0)
    else:  # both in the eta-ball; sign(grad) may differ on a few pixels between the two bf16 paths
        assert ((y - y_amp).abs() > 1e-6).float().mean().item() < 0.5


class _FakeStream:
    def __init__(self, log):
        self.log = log

    def wait_stream(self, other):
        self.log.append("wait_stream")


class _FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.replays = cuda, 0

    def replay(self):  # the stand-in re-runs the captured callable on the same buffers
        self.replays += 1
        self.cuda.check_buffers()
        self.cuda.captured()


class FakeCuda:
    """What ``_StepGraph._capture`` calls on ``torch.cuda``, recorded on the CPU."""

    def __init__(self):
        self.log, self.sg, self.capturing, self.captured = [], None, False, None

    def device(self, dev):
        return contextlib.nullcontext()

    def Stream(self):  # noqa: N802
        return _FakeStream(self.log)

    def current_stream(self):
        return _FakeStream(self.log)

    def stream(self, s):
        @contextlib.contextmanager
        def ctx():
            self.log.append("side_stream_enter")
            yield
            self.log.append("side_stream_exit")
        return ctx()

    def CUDAGraph(self):  # noqa: N802
        self.made = _FakeGraph(self)
        return self.made

    def graph(self, g):
        fake = self

        @contextlib.contextmanager
        def ctx():
            fake.capturing = True
            fake.log.append("capture_begin")
            yield
            fake.log.append("capture_end")
            fake.capturing = False
        return ctx()

    def check_buffers(self):
        sg = self.sg
        assert [t.data_ptr() for t in (sg.x, sg.x0, sg.noise, sg.step, sg.eps)] == self.ptrs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_step_with_a_stand_in_cuda(monkeypatch, precision):
    m = tiny_mae().eval()
    kw = dict(steps=5, step_size=2 / 255, eta=8 / 255, seed=4, precision=precision, batch_size=8)
    x = torch.rand(4, 1, 8, 8)
    eager = MAEPure(m, **kw).purify(x)
    pur = MAEPure(m, **kw)
    grads_before = [p.requires_grad for p in m.parameters()]
    fake = FakeCuda()
    steps_in_capture = []
    real_step = pur.purification_step_

    def step(*a, **k):
        steps_in_capture.append(fake.capturing)
        return real_step(*a, **k)

    monkeypatch.setattr(pur, "purification_step_", step)
    real_init = _StepGraph.__init__

    def init(self, p, x0, capture, amp_dtype=torch.float32, cuda=None):
        real_init(self, p, x0, False, amp_dtype)  # buffers on the CPU, then the capture on the stand-in
        fake.sg, fake.ptrs = self, [t.data_ptr() for t in (self.x, self.x0, self.noise, self.step, self.eps)]
        fake.captured = self._step
        self._capture(x0.device, fake)

    monkeypatch.setattr(_StepGraph, "__init__", init)
    gen = pur._generator(x.device)
    y, _ = pur._purify_chunk_graph(x, gen, capture=True, amp_dtype=pur.compute_dtype(x.device))
    assert fake.log.count("side_stream_enter") == 1 and fake.log.index("capture_begin") > fake.log.index("side_stream_exit")
    assert steps_in_capture[:4] == [False, False, False, True]  # 3 warm-ups, then one captured step
    assert fake.made.replays == 5 and len(steps_in_capture) == 4 + 5
    assert len(pur._graphs) == 1
    sg = next(iter(pur._graphs.values()))
    assert sg.model.patch_embed.proj.weight.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    # the warm-ups moved the placeholder buffers, the real run starts from x: same result as eager
    torch.testing.assert_close(y, eager, atol=1e-6, rtol=0)
    assert [p.requires_grad for p in m.parameters()] == grads_before and any(grads_before)  # restored


DATA_DEPENDENT = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                  "nonzero_static", "index_put_", "repeat_interleave", "equal", "is_nonzero"}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_reads_no_device_value_and_has_static_shapes(precision):
    """Run the step on the CPU under a dispatch mode: no op that copies a value to the host
    (``_local_scalar_dense``: .item(), bool(), ...) or whose output shape depends on values; the
    iterate is updated in place; at bf16 no weight is cast inside the step."""
    m = tiny_mae(depth=3).eval()
    pur = MAEPure(m, steps=1, seed=0, precision=precision, n_masks=2)
    amp = pur.compute_dtype(torch.device("cpu"))
    sg = pur._step_graph(torch.rand(3, 1, 8, 8), capture=False, amp_dtype=amp)
    ptr = sg.x.data_ptr()
    before = sg.x.clone()
    with OpCount() as c:
        loss = pur.purification_step_(sg.x, sg.x0, sg.noise, sg.step, sg.eps, amp, sg.model, sg.backend)
    assert not (set(c.ops) & DATA_DEPENDENT), set(c.ops) & DATA_DEPENDENT
    assert sg.x.data_ptr() == ptr and not torch.equal(sg.x, before)
    assert loss.shape == (3,) and loss.dtype == torch.float32
    if precision == "bf16":
        n_weights = sum(1 for p in m.parameters() if p.dim() >= 2)
        assert c.ops.get("_to_copy", 0) < n_weights // 2, c.ops.get("_to_copy")


# ------------------------------------------------------------------ GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_steady_state_purify_with_validation_never_syncs(precision):
    """validate=True (the default): the first call of a shape checks synchronously, later calls of
    that shape check on the device and read the flag back without waiting."""
    from maep_fast.models.presets import create_mae

    torch.manual_seed(0)
    pur = Purifier(create_mae("mae_vit_tiny_patch4").cuda().eval(), precision=precision)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    pur.purify(x)
    with no_sync():
        for _ in range(3):
            pur.purify(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with no_sync():
        pur.purify(bad)  # deferred
    with pytest.raises(ValueError, match="earlier input"):
        pur.check_pending(wait=True)


@pytest.mark.gpu
@cuda
def test_cuda_bf16_copy_matches_fp64_reference():
    m = _model().cuda()
    x = torch.rand(16, 3, 16, 16, device="cuda")
    ref = Purifier(_model().double().cuda(), precision="fp32").purify(x.double())
    fast = Purifier(m, precision="bf16").purify(x).double()
    amp = Purifier(m, precision="bf16", cast_weights=False).purify(x).double()
    err, err_amp = (fast - ref).abs().max().item(), (amp - ref).abs().max().item()
    assert err <= 2 * err_amp + 1e-2, (err, err_amp)


@pytest.mark.gpu
@cuda
def test_cuda_graph_bf16_replays_the_cast_copy_and_follows_weight_updates():
    torch.manual_seed(0)
    m = tiny_mae(img_size=16, in_chans=3).cuda().eval()
    x = torch.rand(6, 3, 16, 16, device="cuda")
    kw = dict(steps=4, step_size=2 / 255, eta=8 / 255, seed=0, precision="bf16")
    pur = MAEPure(m, cuda_graph=True, **kw)
    y = pur.purify(x)
    bad = ((y - MAEPure(m, **kw).purify(x)).abs() > 1e-5).float().mean().item()
    assert bad <= 5e-3
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)  # in place: the copy is re-cast in place, the captured graph stays valid
    y2 = pur.purify(x)
    assert len(pur._graphs) == 1
    bad = ((y2 - MAEPure(m, **kw).purify(x)).abs() > 1e-5).float().mean().item()
    assert bad <= 5e-3
