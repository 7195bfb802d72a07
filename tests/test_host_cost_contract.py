"""The host-cost contract of every op call, checked without timing anything
(timings live in bench/bench_overhead.py):

- an explicit ``backend="cuda"`` attention call the CUDA kernel cannot run is refused in Python,
  before the native op is called (the first GPU run crashed its process on head dim 160);
- step sizes and eps travel as Python floats: ``pgd_step_`` allocates nothing for them and reaches
  the native ``.scalar`` overload;
- validation reads no tensor values of non-CPU tensors (here: ``meta`` tensors, which have none),
  so an op never synchronizes a CUDA stream for its checks.
"""
import functools
import importlib

import pytest
import torch

from maep_fast import native_available
from maep_fast.ops.masked_patch_attention import masked_patch_attention

mpa_mod = importlib.import_module("maep_fast.ops.masked_patch_attention")
pgd_mod = importlib.import_module("maep_fast.ops.pgd_step")
prl_mod = importlib.import_module("maep_fast.ops.patch_recon_loss")


@pytest.fixture
def cuda_resolved(monkeypatch):
    """Attention resolved to the CUDA backend, with a native op that must never be reached."""
    monkeypatch.setattr(mpa_mod, "resolve_backend", lambda op, backend, device: "cuda")

    def reached(*args):
        raise AssertionError("the native CUDA op was called with inputs its kernel cannot run")

    monkeypatch.setattr(mpa_mod, "_native_attention", lambda: reached)


def test_explicit_cuda_attention_refuses_fp64_before_the_op(cuda_resolved):
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        masked_patch_attention(q, q, q, backend="cuda")


@pytest.mark.parametrize("d", [129, 160, 256])
def test_explicit_cuda_attention_refuses_wide_heads_before_the_op(cuda_resolved, d):
    q = torch.randn(1, 1, 4, d)
    with pytest.raises(ValueError, match="head dim"):
        masked_patch_attention(q, q, q, backend="cuda")


def test_auto_cuda_attention_falls_back_to_the_reference_for_what_the_kernel_cannot_run(cuda_resolved):
    q = torch.randn(1, 2, 5, 160)
    ref = mpa_mod.masked_patch_attention_reference(q, q, q)
    torch.testing.assert_close(masked_patch_attention(q, q, q, backend="auto"), ref)


@pytest.mark.skipif(not native_available(), reason="needs the native extension")
def test_float_step_and_eps_allocate_nothing(monkeypatch):
    x, g, x0 = torch.rand(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    expect = pgd_mod.pgd_step_reference(x, g, x0, 0.01, 0.03, "linf", -1, 0.0, 1.0)
    used = []
    real = torch.ops.maep_fast.pgd_step_.scalar
    monkeypatch.setitem(pgd_mod._NATIVE, ("pgd_step_", False), _Spy(real, used))

    def no_alloc(*a, **k):
        raise AssertionError("pgd_step_ allocated a tensor for a Python-float step / eps")

    for name in ("full", "tensor", "as_tensor", "empty", "zeros", "ones"):
        monkeypatch.setattr(torch, name, no_alloc)
    pgd_mod.pgd_step_(x, g, x0, 0.01, 0.03, direction=-1, backend="cpp")
    monkeypatch.undo()
    assert used == ["scalar"]
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


class _Spy:
    def __init__(self, op, log):
        self._op_real, self._log = op, log

    def __call__(self, *a):
        self._log.append("scalar")
        return self._op_real(*a)

    @property
    def _op(self):
        return self


def _meta(*shape):
    return torch.empty(*shape, device="meta")


def test_pgd_validation_reads_no_device_values():
    x = _meta(4, 3, 8, 8)
    step, eps, lo, hi = pgd_mod._validate(x, _meta(4, 3, 8, 8), _meta(4, 3, 8, 8), _meta(4), _meta(4), "linf", 1,
                                          (0.0, 1.0))
    assert step.device.type == "meta" and eps.shape == (4,) and (lo, hi) == (0.0, 1.0)
    assert pgd_mod._validate(x, _meta(4, 3, 8, 8), _meta(4, 3, 8, 8), 0.1, 0.2, "l2", -1, None)[:2] == (0.1, 0.2)


def test_loss_and_attention_validation_read_no_device_values():
    """Meta tensors have no values: reading one (``.item()``, ``bool(t)``, ``.tolist()``) raises. So
    validation that accepts good meta calls and refuses bad ones, naming the argument, decides from
    shapes, dtypes and devices alone, on the one-expression fast path and on the full checks."""
    pred, imgs, mask = _meta(2, 16, 12), _meta(2, 3, 8, 8), _meta(2, 16)
    keep = torch.ones(2, 5, dtype=torch.bool, device="meta")
    q = _meta(2, 3, 5, 8)
    with pytest.raises(RuntimeError):
        bool(mask.sum() > 0)  # what a value-reading check would do: meta refuses it
    for validate in (prl_mod._validate, functools.partial(prl_mod._validate, full=True)):
        assert validate(pred, imgs, mask, 2, 2, "per_sample") is None
        assert validate(pred, imgs, None, 2, 1, "mean") is None
        with pytest.raises(ValueError, match="mask must have shape"):
            validate(pred, imgs, _meta(2, 15), 2, 2, "per_sample")
        with pytest.raises(ValueError, match="pred must have shape"):
            validate(_meta(2, 16, 13), imgs, mask, 2, 2, "mean")
    for validate in (mpa_mod._validate, functools.partial(mpa_mod._validate, full=True)):
        assert validate(q, q, q, keep, None) is None
        assert validate(q, q, q, None, 0.5) is None
        with pytest.raises(ValueError, match="keep must have shape"):
            validate(q, q, q, torch.ones(2, 4, dtype=torch.bool, device="meta"), None)
        with pytest.raises(ValueError, match="share one shape"):
            validate(q, q, _meta(2, 3, 6, 8), None, None)


def test_cpu_per_sample_values_are_still_checked():
    x, g, x0 = torch.rand(2, 3), torch.randn(2, 3), torch.rand(2, 3)
    with pytest.raises(ValueError, match="eps"):
        pgd_mod.pgd_step(x, g, x0, 0.01, torch.tensor([0.1, -0.1]), backend="torch")
    with pytest.raises(ValueError, match="step_size"):
        pgd_mod.pgd_step(x, g, x0, torch.tensor([0.1, float("nan")]), 0.1, backend="torch")


def test_auto_order_by_op_overrides_the_device_order_and_the_cache_sees_it(monkeypatch):
    """One op's own order (AUTO_ORDER_BY_OP, e.g. pgd_step -> cuda first on a GPU) wins over its
    device's AUTO_ORDER for that op alone, and a change to it is not hidden by the resolution cache."""
    from maep_fast import native_available
    from maep_fast.ops import _dispatch

    if not native_available():
        pytest.skip("needs the native extension (cpp backend)")
    cpu = torch.device("cpu")
    assert _dispatch.resolve_backend("pgd_step", "auto", cpu) == "cpp"
    monkeypatch.setitem(_dispatch.AUTO_ORDER_BY_OP, ("cpu", "pgd_step"), ("torch", "cpp"))
    assert _dispatch.resolve_backend("pgd_step", "auto", cpu) == "torch"
    assert _dispatch.resolve_backend("patch_recon_loss", "auto", cpu) == "cpp"
    monkeypatch.undo()
    assert _dispatch.resolve_backend("pgd_step", "auto", cpu) == "cpp"
