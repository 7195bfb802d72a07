"""Exercise the native kernels on small, awkward shapes: the program bench/gpu_check.sh runs under
``compute-sanitizer --tool memcheck`` (with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor
is its own allocation and an out-of-bounds access is not hidden inside a cached block).

    compute-sanitizer --tool memcheck --error-exitcode 86 python3 bench/memcheck_ops.py
    python3 bench/memcheck_ops.py --device cpu --backends cpp      # the same calls on the CPU kernels

Each call runs forward and, where the op has one, backward; results are compared with the
reference at a loose tolerance (this is a memory check, the tests hold the exact tolerances),
and every output is checked finite. Exits 1 if a backend is unavailable or a call fails or
disagrees, 0 otherwise; prints one line per case.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step, pgd_step_
from maep_fast.ops._dispatch import unavailable_reason


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with a floor on ||b|| so exact zeros (L = 1 gradients) compare absolutely."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(b.norm()), 1e-3 * b.numel() ** 0.5))


def attention_cases(device, backend, dtypes, gen):
    shapes = [(2, 3, 17, 16), (1, 2, 65, 48), (2, 2, 33, 64), (1, 1, 1, 64), (1, 2, 40, 96), (1, 1, 257, 128)]
    for dtype in dtypes:
        for (b, h, length, d) in shapes:
            for keep_kind in ("none", "ragged", "single"):
                q, k, v = (torch.randn(b, h, length, d, generator=gen).to(device, dtype).requires_grad_(True)
                           for _ in range(3))
                keep = None
                if keep_kind == "ragged":
                    keep = torch.rand(b, length, generator=gen) < 0.4
                    keep[:, 0] = True
                    keep = keep.to(device)
                elif keep_kind == "single":  # every sample with one visible token
                    keep = torch.zeros(b, length, dtype=torch.bool, device=device)
                    keep[:, length // 2] = True
                name = f"attention {str(dtype)[6:]} B{b} H{h} L{length} D{d} keep={keep_kind}"

                def run(be, q=q, k=k, v=v, keep=keep):
                    for t in (q, k, v):
                        t.grad = None
                    out = masked_patch_attention(q, k, v, keep, backend=be)
                    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
                    out.backward(g)
                    return [out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
                yield name, run, (1e-1 if dtype != torch.float32 else 1e-3)


def loss_cases(device, backend, dtypes, gen):
    geoms = [(3, 3, 8, 2), (2, 3, 32, 4), (1, 3, 48, 16), (5, 1, 12, 4)]
    for dtype in dtypes:
        for (n, c, s, p) in geoms:
            for norm_pix, pw, masked in ((True, 2, True), (False, 1, False), (True, 1, True)):
                length = (s // p) ** 2
                imgs = torch.rand(n, c, s, s, generator=gen).to(device, dtype).requires_grad_(True)
                pred = torch.randn(n, length, p * p * c, generator=gen).to(device, dtype).requires_grad_(True)
                mask = (torch.rand(n, length, generator=gen) < 0.6).to(device, dtype) if masked else None
                name = f"patch_recon_loss {str(dtype)[6:]} N{n} C{c} {s}x{s} p{p} norm_pix={norm_pix} p={pw} mask={masked}"

                def run(be, imgs=imgs, pred=pred, mask=mask, p=p, norm_pix=norm_pix, pw=pw):
                    imgs.grad = pred.grad = None
                    loss = patch_recon_loss(pred, imgs, mask, patch_size=p, norm_pix=norm_pix, p=pw, backend=be)
                    loss.backward()
                    return [loss.detach(), pred.grad.clone(), imgs.grad.clone()]
                yield name, run, (1e-1 if dtype != torch.float32 else 1e-3)


def pgd_cases(device, backend, dtypes, gen):
    shapes = [(3, 3, 7, 5), (1, 1, 1, 1), (4, 3, 32, 32), (2, 3, 65, 33)]
    for dtype in dtypes:
        for shape in shapes:
            for norm in ("linf", "l2"):
                for step_kind in ("float", "tensor"):
                    for inplace in (False, True):
                        x = torch.rand(*shape, generator=gen).to(device, dtype)
                        g = torch.randn(*shape, generator=gen).to(device, dtype)
                        x0 = torch.rand(*shape, generator=gen).to(device, dtype)
                        b = shape[0]
                        if step_kind == "tensor":
                            step = torch.full((b,), 0.05, device=device)
                            eps = torch.linspace(0.01, 0.1, b).to(device)
                        else:
                            step, eps = 0.05, 0.03
                        name = f"pgd_step {str(dtype)[6:]} {shape} {norm} {step_kind}-step {'in place' if inplace else ''}"

                        def run(be, x=x, g=g, x0=x0, step=step, eps=eps, norm=norm, inplace=inplace):
                            if inplace:
                                y = x.clone()
                                pgd_step_(y, g, x0, step, eps, norm=norm, direction=-1, backend=be)
                                return [y]
                            return [pgd_step(x, g, x0, step, eps, norm=norm, backend=be)]
                        yield name, run, (1e-1 if dtype != torch.float32 else 1e-4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma-separated (default: cuda on a GPU, cpp on the CPU)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ops", default="masked_patch_attention,patch_recon_loss,pgd_step")
    ap.add_argument("--quick", action="store_true", help="one dtype, fewer shapes (a CPU smoke run)")
    ap.add_argument("--no-compare", action="store_true",
                    help="run the backend only (finite outputs checked), not the reference: under the sanitizer "
                         "every kernel is instrumented, and the GPU tests compare against the reference anyway")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    backends = (args.backends or ("cuda" if device.type == "cuda" else "cpp")).split(",")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.quick:
        dtypes = dtypes[:1]
    gen = torch.Generator().manual_seed(0)
    makers = {"masked_patch_attention": attention_cases, "patch_recon_loss": loss_cases, "pgd_step": pgd_cases}
    failures, calls, worst = [], 0, 0.0
    t0 = time.time()
    for op in args.ops.split(","):
        for be in backends:
            why = unavailable_reason(op, be, device)
            if why:
                failures.append(f"{op} {be}: unavailable: {why}")
                print(f"UNAVAILABLE {op} backend={be}: {why}", flush=True)
                continue
            for i, (name, run, tol) in enumerate(makers[op](device, be, dtypes, gen)):
                if args.quick and i % 3:
                    continue
                try:
                    got = run(be)
                    ref = None if args.no_compare else run("torch")
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    errs = [] if ref is None else [_rel(a, b) for a, b in zip(got, ref)]
                    finite = all(bool(torch.isfinite(a).all()) for a in got)
                except Exception as exc:  # noqa: BLE001  report every failing case, go on
                    failures.append(f"{name} [{be}]: {type(exc).__name__}: {exc}")
                    print(f"FAIL  {name} [{be}]: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                calls += 1
                err = max(errs) if errs else 0.0
                worst = max(worst, err)
                ok = finite and err <= tol
                if not ok:
                    failures.append(f"{name} [{be}]: rel err {err:.2e} (tol {tol:g}), finite={finite}")
                print(f"{'ok   ' if ok else 'FAIL '} {name} [{be}] rel err {err:.2e}", flush=True)
    print(f"{calls} cases, worst rel err {worst:.2e}, {len(failures)} failures, {time.time() - t0:.1f} s")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
