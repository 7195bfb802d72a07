"""Random inputs for pgd_step tests, shared by the per-backend test files."""
import torch


def make_pgd_inputs(shape, dtype=torch.float32, *, zero_grad_sample=True, seed=None):
    """(x, grad, x0) in ``dtype`` and per-sample (step, eps) in fp64, on the CPU.

    The gradient has exact zeros (sign(0) = 0), one all-zero sample (it must not
    move before projection) when ``zero_grad_sample``, and the last sample gets
    eps = 0 when there are more than two.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    b = shape[0]
    x0 = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = (x0 + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = g.view(b, -1)
    flat[:, ::7] = 0.0
    if zero_grad_sample and b > 1:
        flat[b // 2] = 0.0
    step = torch.rand(b, generator=gen, dtype=torch.float64) * 0.05
    eps = torch.rand(b, generator=gen, dtype=torch.float64) * 0.08
    if b > 2:
        eps[-1] = 0.0
    return x.to(dtype), g.to(dtype), x0.to(dtype), step, eps


def assert_in_ball_and_range(out, x0, eps, norm, dtype):
    """``out`` lies in [0, 1] and within ``eps`` of ``x0`` (per sample, [B, n] inputs) in ``norm``."""
    assert out.min() >= 0.0 and out.max() <= 1.0
    d = (out - x0).double()
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    if norm == "linf":
        assert d.abs().max().item() <= eps + atol
    else:
        assert (d.norm(dim=1) <= eps * (1 + 1e-5) + atol).all()
