"""Per-call host cost of the public ops, beside one ``torch.add`` and SDPA on tiny tensors.

    python3 bench/bench_overhead.py                 # this machine's device (cuda if present)
    python3 bench/bench_overhead.py --device cpu    # -> bench/results/overhead_cpu.json

On tiny tensors a call's time is almost all host work: argument checks, backend resolution,
the dispatcher, allocation. Each case is timed as ``--calls`` back-to-back calls (on CUDA with
one synchronize after them, so the GPU never waits on the host), in ``--rounds`` rounds that
alternate with the same number of ``torch.add`` calls; the report gives the median per-call
microseconds of each and the median of the per-round ratios (one thread by default: the
ratio is what the host-cost contract bounds, at most 6x ``torch.add`` for the ops under ``auto``). The ratio
is also given by this thread's CPU time, which a loaded machine does not inflate.

The call patterns are the ones the model and the purifiers make: ``pgd_step_`` in place with
Python-float step / eps (attacks, MAE-Pure), out-of-place ``pgd_step``, ``patch_recon_loss``
forward with and without a gradient to record (purify / training), ``masked_patch_attention``
without and with a keep mask and recording a gradient; SDPA and ``torch.add`` itself, also
recording a gradient, for scale.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_row, run_meta, start_results  # noqa: E402

from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step, pgd_step_  # noqa: E402
from maep_fast.ops._dispatch import resolve_backend, unavailable_reason  # noqa: E402

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


def _per_call_us(fn, calls: int, device: torch.device) -> tuple[float, float]:
    """(wall-clock us, this thread's CPU us) per call over ``calls`` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls * 1e6, (time.thread_time() - c0) / calls * 1e6


def measure(fn, base, calls: int, rounds: int, device: torch.device) -> dict:
    """Median per-call us of ``fn`` and of ``base``, and the median of per-round ratios, by wall
    clock and by the thread's CPU time (the latter does not count time the thread waited for a
    core, so it stays meaningful on a loaded machine; on CUDA the wall clock is the figure)."""
    for _ in range(max(10, calls // 10)):
        fn()
        base()
    ts, bs, ratios, cratios = [], [], [], []
    for _ in range(rounds):
        b, bc = _per_call_us(base, calls, device)
        t, tc = _per_call_us(fn, calls, device)
        ts.append(t)
        bs.append(b)
        ratios.append(t / b)
        cratios.append(tc / bc if bc > 0 else float("nan"))
    return {"us_per_call": statistics.median(ts), "add_us_per_call": statistics.median(bs),
            "x_torch_add": statistics.median(ratios), "x_torch_add_cpu_time": statistics.median(cratios)}


def cases(device: torch.device) -> dict:
    """name -> (op name or None, factory(backend) -> zero-argument callable)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, requires_grad=False):
        return torch.rand(*shape, generator=g).to(device).requires_grad_(requires_grad)

    x, gr, x0 = rnd(2, 3, 8, 8), rnd(2, 3, 8, 8) - 0.5, rnd(2, 3, 8, 8)
    pred, imgs = rnd(2, 16, 12), rnd(2, 3, 8, 8)
    pred_g = rnd(2, 16, 12, requires_grad=True)
    mask = (rnd(2, 16) < 0.75).float()
    q, k, v = rnd(1, 2, 5, 8), rnd(1, 2, 5, 8), rnd(1, 2, 5, 8)
    qg = rnd(1, 2, 5, 8, requires_grad=True)
    xg = rnd(2, 3, 8, 8, requires_grad=True)
    keep = torch.tensor([[True, False, True, True, False]], device=device)
    return {
        "pgd_step_ linf (in place, float step/eps)": (
            "pgd_step", lambda be: (lambda: pgd_step_(x, gr, x0, 2 / 255, 8 / 255, direction=-1, backend=be))),
        "pgd_step linf (out of place)": (
            "pgd_step", lambda be: (lambda: pgd_step(x, gr, x0, 2 / 255, 8 / 255, backend=be))),
        "pgd_step_ l2 (in place)": (
            "pgd_step", lambda be: (lambda: pgd_step_(x, gr, x0, 0.1, 0.5, norm="l2", backend=be))),
        "patch_recon_loss fwd (mask, norm_pix)": (
            "patch_recon_loss", lambda be: (lambda: patch_recon_loss(pred, imgs, mask, patch_size=2, backend=be))),
        "patch_recon_loss fwd, recording grad": (
            "patch_recon_loss", lambda be: (lambda: patch_recon_loss(pred_g, imgs, mask, patch_size=2, backend=be))),
        "masked_patch_attention (no mask)": (
            "masked_patch_attention", lambda be: (lambda: masked_patch_attention(q, k, v, backend=be))),
        "masked_patch_attention (keep mask)": (
            "masked_patch_attention", lambda be: (lambda: masked_patch_attention(q, k, v, keep, backend=be))),
        "masked_patch_attention, recording grad": (
            "masked_patch_attention", lambda be: (lambda: masked_patch_attention(qg, k, v, backend=be))),
        "F.scaled_dot_product_attention": (None, lambda be: (lambda: F.scaled_dot_product_attention(q, k, v))),
        "F.scaled_dot_product_attention, recording grad": (
            None, lambda be: (lambda: F.scaled_dot_product_attention(qg, k, v))),
        "torch.add": (None, lambda be: (lambda: torch.add(x, x0))),
        "torch.add, recording grad": (None, lambda be: (lambda: torch.add(xg, x0))),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the issue's measurement)")
    ap.add_argument("--calls", type=int, default=2000, help="back-to-back calls per round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None, help="results name (default overhead_<device type>)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ta, tb = torch.rand(2, 3, 4, 4, device=device), torch.rand(2, 3, 4, 4, device=device)
    base = lambda: torch.add(ta, tb)  # noqa: E731  the yardstick: one tiny elementwise op
    meta = run_meta(device)
    meta.update({"calls_per_round": args.calls, "rounds": args.rounds,
                 "yardstick": "torch.add of two [2, 3, 4, 4] tensors, timed in alternating rounds"})
    name = args.out or f"overhead_{device.type}"
    writer = start_results(name, meta)
    print(f"{'case':45s} {'backend':14s} {'us/call':>9s} {'add us':>8s} {'x add':>7s} {'x add (cpu)':>11s}")
    for case, (op, factory) in cases(device).items():
        for be in (BACKENDS if op else ("-",)):
            if op and be != "auto" and unavailable_reason(op, be, device):
                continue
            label = be
            if op and be == "auto":
                label = f"auto->{resolve_backend(op, 'auto', device)}"
            if be == "triton" and device.type == "cpu":
                continue  # the interpreter is a test vehicle, not a backend to time
            r = measure(factory(be), base, args.calls, args.rounds, device)
            row = {"case": case, "op": op, "backend": label, **{k: round(val, 3) for k, val in r.items()}}
            append_row(writer, row)
            print(f"{case:45s} {label:14s} {r['us_per_call']:9.2f} {r['add_us_per_call']:8.2f} {r['x_torch_add']:7.2f} "
                  f"{r['x_torch_add_cpu_time']:11.2f}", flush=True)
    writer.finish()  # meta["complete"] = True: every case ran
    print(f"wrote {writer.json_path}")


if __name__ == "__main__":
    main()
