"""Benchmark the three ops per backend against the eager reference, torch.compile(reference)
and (attention) F.scaled_dot_product_attention; forward / backward / forward+backward.

    python3 bench/bench_ops.py                      # this machine's device (cuda if present)
    python3 bench/bench_ops.py --device cpu --quick # small CPU run

Reports median time, achieved GB/s (memory-bound ops: minimal bytes / time) or TFLOP/s
(attention: useful FLOPs over visible patches / time), the fraction of the device's
measured ceiling, and the speedup over eager. Writes bench/results/ops_<device>.json/.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure_ceilings, run_meta, time_fn, write_results  # noqa: E402

from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step  # noqa: E402
from maep_fast.ops._dispatch import unavailable_reason  # noqa: E402
from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference  # noqa: E402
from maep_fast.ops.patch_recon_loss import patch_recon_loss_reference  # noqa: E402
from maep_fast.ops.pgd_step import pgd_step_reference  # noqa: E402

FAST = ("triton", "cpp", "cuda")


def backends_for(op: str, device: torch.device) -> list[str]:
    out = []
    for b in FAST:
        if b == "triton" and device.type == "cpu":
            continue  # the CPU interpreter is a test vehicle, not a backend to time
        if not unavailable_reason(op, b, device):
            out.append(b)
    return out


def _grad_fn(f, inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = f()
        (out.float().sum() if out.dim() else out).backward()
    return run


def bench_pgd_step(device, dtype, shapes, use_compile, rows, ceil):
    for (b, c, h, w) in shapes:
        x = torch.rand(b, c, h, w, device=device, dtype=dtype)
        g = torch.randn_like(x)
        x0 = torch.rand_like(x)
        step = torch.full((b,), 2 / 255, device=device)
        eps = torch.full((b,), 8 / 255, device=device)
        for norm in ("linf", "l2"):
            nbytes = 4 * x.numel() * x.element_size()
            variants = {"eager": lambda: pgd_step(x, g, x0, step, eps, norm=norm, backend="torch")}
            if use_compile:
                comp = torch.compile(pgd_step_reference)
                variants["compile(reference)"] = lambda: comp(x, g, x0, step, eps, norm, 1, 0.0, 1.0)
            for be in backends_for("pgd_step", device):
                variants[be] = (lambda be=be: pgd_step(x, g, x0, step, eps, norm=norm, backend=be))
            _record(rows, "pgd_step", f"{norm} B{b} {c}x{h}x{w}", dtype, "fwd", variants, device, ceil, nbytes=nbytes)


def bench_recon_loss(device, dtype, shapes, use_compile, rows, ceil):
    for (n, c, s, p, ratio) in shapes:
        length = (s // p) ** 2
        imgs = torch.rand(n, c, s, s, device=device, dtype=dtype, requires_grad=True)
        pred = torch.randn(n, length, p * p * c, device=device, dtype=dtype, requires_grad=True)
        mask = (torch.rand(n, length, device=device) < ratio).to(dtype)
        es = imgs.element_size()
        fwd_bytes = (imgs.numel() + pred.numel()) * es + mask.numel() * es
        bwd_bytes = 2 * fwd_bytes  # read both again, write both grads
        shape = f"N{n} C{c} {s}x{s} p{p} mask{ratio}"

        def call(be):
            return lambda: patch_recon_loss(pred, imgs, mask, patch_size=p, norm_pix=True, p=2, backend=be)

        variants = {"eager": call("torch")}
        if use_compile:
            comp = torch.compile(patch_recon_loss_reference)
            variants["compile(reference)"] = lambda: comp(pred, imgs, mask, p, True, 2, "mean")
        for be in backends_for("patch_recon_loss", device):
            variants[be] = call(be)
        _record(rows, "patch_recon_loss", shape, dtype, "fwd", variants, device, ceil, nbytes=fwd_bytes)
        _record(rows, "patch_recon_loss", shape, dtype, "fwd+bwd",
                {k: _grad_fn(f, [imgs, pred]) for k, f in variants.items()}, device, ceil, nbytes=fwd_bytes + bwd_bytes)


def bench_attention(device, dtype, shapes, use_compile, rows, ceil):
    for (b, h, length, d, keep_frac) in shapes:
        q, k, v = (torch.randn(b, h, length, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        keep = None
        if keep_frac is not None:
            keep = torch.rand(b, length, device=device) < keep_frac
            keep[:, 0] = True  # cls token
        vis = (keep.sum(1).double() if keep is not None else torch.full((b,), float(length), dtype=torch.float64))
        fwd_flops = float((4 * h * d * vis * vis).sum())
        shape = f"B{b} H{h} L{length} D{d} keep{keep_frac if keep_frac is not None else 'all'}"
        variants = {"eager": lambda: masked_patch_attention(q, k, v, keep, backend="torch")}
        if use_compile:
            comp = torch.compile(masked_patch_attention_reference)
            variants["compile(reference)"] = lambda: comp(q, k, v, keep)
        amask = None if keep is None else keep[:, None, None, :]
        variants["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=amask)
        for be in backends_for("masked_patch_attention", device):
            variants[be] = (lambda be=be: masked_patch_attention(q, k, v, keep, backend=be))
        _record(rows, "masked_patch_attention", shape, dtype, "fwd", variants, device, ceil, flops=fwd_flops)
        _record(rows, "masked_patch_attention", shape, dtype, "fwd+bwd",
                {k_: _grad_fn(f, [q, k, v]) for k_, f in variants.items()}, device, ceil, flops=3.5 * fwd_flops)


def _record(rows, op, shape, dtype, pass_, variants, device, ceil, nbytes=None, flops=None):
    results = {}
    for name, fn in variants.items():
        try:
            results[name] = time_fn(fn, device, warmup=2, repeat=ARGS.repeat)
        except Exception as exc:  # a backend that fails is reported, not hidden
            rows.append({"op": op, "shape": shape, "dtype": str(dtype).split(".")[-1], "pass": pass_, "variant": name,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"  {op:24s} {pass_:8s} {name:20s} ERROR {exc}")
    base = results.get("eager", {}).get("median_ms")
    for name, t in results.items():
        ms = t["median_ms"]
        row = {"op": op, "shape": shape, "dtype": str(dtype).split(".")[-1], "pass": pass_, "variant": name,
               "median_ms": round(ms, 4), "iqr_ms": round(t["iqr_ms"], 4), "repeats": t["n"],
               "speedup_vs_eager": round(base / ms, 3) if base else None}
        if nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(GBps=round(gbps, 2), frac_of_mem_bw=round(gbps / ceil["mem_bw_GBps"], 3))
        if flops is not None:
            tf = flops / (ms * 1e-3) / 1e12
            key = f"matmul_{row['dtype']}_TFLOPs"
            row.update(TFLOPs=round(tf, 4), frac_of_matmul=round(tf / ceil.get(key, ceil["matmul_float32_TFLOPs"]), 3))
        rows.append(row)
        extra = f"{row.get('GBps', row.get('TFLOPs'))}"
        print(f"  {op:24s} {pass_:8s} {shape:34s} {name:20s} {ms:9.3f} ms  x{row['speedup_vs_eager']}  {extra}")


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--ops", default="pgd_step,patch_recon_loss,masked_patch_attention")
    ap.add_argument("--compile", dest="use_compile", action="store_true", default=None,
                    help="include torch.compile(reference) (default on for cuda, off for cpu: inductor C++ builds are slow)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--name", default=None, help="results file stem (default ops_<device>)")
    ARGS = ap.parse_args()
    device = torch.device(ARGS.device)
    dtype = getattr(torch, ARGS.dtype) if ARGS.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    use_compile = ARGS.use_compile if ARGS.use_compile is not None else device.type == "cuda"
    gpu = device.type == "cuda"
    if gpu:
        pgd_shapes = [(512, 3, 32, 32), (64, 3, 224, 224)]
        loss_shapes = [(256, 3, 32, 4, 0.75), (256, 3, 32, 2, 0.75), (64, 3, 224, 16, 0.75)]
        attn_shapes = [(256, 6, 65, 64, None), (256, 6, 257, 64, None), (256, 6, 65, 64, 0.25), (256, 6, 65, 64, 0.5),
                       (256, 6, 65, 64, 0.75), (256, 6, 257, 64, 0.25), (256, 6, 257, 64, 0.75)]
    else:
        pgd_shapes = [(256, 3, 32, 32)]
        loss_shapes = [(256, 3, 32, 4, 0.75)]
        attn_shapes = [(64, 3, 65, 64, None), (64, 3, 65, 64, 0.25), (64, 3, 65, 64, 0.5), (64, 3, 65, 64, 0.75)]
    if ARGS.quick:
        pgd_shapes, loss_shapes, attn_shapes = pgd_shapes[:1], loss_shapes[:1], attn_shapes[:2]
    ceil = measure_ceilings(device, quick=ARGS.quick)
    meta = run_meta(device)
    meta.update(ceilings=ceil, dtype=str(dtype), compile=use_compile,
                note="GB/s = minimal bytes (read inputs once, write outputs once) / median time; "
                     "attention TFLOP/s counts 4*H*D*visible^2 per sample forward, 3.5x that for fwd+bwd")
    print(f"device {meta['device']} | ceilings {ceil}")
    rows: list[dict] = []
    ops = ARGS.ops.split(",")
    if "pgd_step" in ops:
        bench_pgd_step(device, dtype, pgd_shapes, use_compile, rows, ceil)
    if "patch_recon_loss" in ops:
        bench_recon_loss(device, dtype, loss_shapes, use_compile, rows, ceil)
    if "masked_patch_attention" in ops:
        bench_attention(device, dtype, attn_shapes, use_compile, rows, ceil)
    j, c = write_results(ARGS.name or f"ops_{device.type}", meta, rows)
    print(f"wrote {j} and {c}")


ARGS = None

if __name__ == "__main__":
    main()
