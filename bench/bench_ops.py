"""Benchmark the three ops per backend against the eager reference, torch.compile(reference)
and (attention) F.scaled_dot_product_attention; forward and forward+backward.

    python3 bench/bench_ops.py                      # this machine's device (cuda if present)
    python3 bench/bench_ops.py --device cpu --quick # small CPU run
    python3 bench/bench_ops.py --dtypes bfloat16 --compile-warmup-s 30 --compile-budget-s 120 --time-limit-s 240

Timing (bench/common.time_fn): on CUDA ``kernel_ms`` is the median of CUDA-event times over
many back-to-back calls with the L2 flushed before each (host cost hidden behind a GPU
busy-wait), ``latency_ms`` the wall clock of one synchronized call (host cost included);
``median_ms`` = ``kernel_ms`` there. On the CPU both are the wall clock of a call.
GB/s (memory-bound ops: minimal bytes / kernel time) and TFLOP/s (attention: useful FLOPs
over visible patches / kernel time) come from the kernel time, beside the fraction of the
device's ceilings measured in the same run and the speedup over eager.

Rows are appended to bench/results/ops_<device>.json/.csv the moment each is measured, so a
run stopped at any point keeps every finished row. Every non-compiled variant of every shape
is measured first; torch.compile(reference) variants follow in a second pass, each warm-up
bounded by --compile-warmup-s (and all of them by --compile-budget-s): one that runs over is
recorded as skipped with the reason, dynamo's caches are reset and the run goes on.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CompileTimeout, append_row, measure_ceilings, reset_compile_state, run_meta,  # noqa: E402
                    start_results, time_fn, timed_warmup)

from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step  # noqa: E402
from maep_fast.ops._dispatch import unavailable_reason  # noqa: E402
from maep_fast.ops.masked_patch_attention import masked_patch_attention_reference  # noqa: E402
from maep_fast.ops.patch_recon_loss import patch_recon_loss_reference  # noqa: E402
from maep_fast.ops.pgd_step import pgd_step_reference  # noqa: E402

FAST = ("triton", "cpp", "cuda")
COMPILE = "compile(reference)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _compile(fn):
    # dynamic=False: each shape gets its own specialized graph, as a user compiling for one shape would
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------- configs
# A config builds its inputs when called and returns {pass: (variants, nbytes, flops)}, where
# variants maps a variant name to a zero-argument callable. ``with_compile`` adds only the
# compile(reference) variant (second pass), otherwise every other variant.
class Config:
    def __init__(self, op: str, shape: str, dtype: torch.dtype, build):
        self.op, self.shape, self.dtype, self.build = op, shape, dtype, build

    def key(self, pass_: str) -> tuple:
        return (self.op, self.shape, _dname(self.dtype), pass_)


def pgd_config(device, dtype, b, c, h, w, norm, step_kind) -> Config:
    def build(with_compile: bool):
        x = torch.rand(b, c, h, w, device=device, dtype=dtype)
        g = torch.randn_like(x)
        x0 = torch.rand_like(x)
        if step_kind == "tensor":  # per-sample [B] tensors, as a ragged-eps attack passes them
            step = torch.full((b,), 2 / 255, device=device)
            eps = torch.full((b,), 8 / 255, device=device)
        else:  # Python floats, as MAE-Pure and the attacks' loops pass them (nothing allocated per call)
            step, eps = 2 / 255, 8 / 255
        nbytes = 4 * x.numel() * x.element_size()  # read x, grad, x0; write the result
        if with_compile:
            comp = _compile(pgd_step_reference)
            variants = {COMPILE: lambda: comp(x, g, x0, step, eps, norm, 1, 0.0, 1.0)}
        else:
            variants = {"eager": lambda: pgd_step(x, g, x0, step, eps, norm=norm, backend="torch")}
            for be in backends_for("pgd_step", device):
                variants[be] = (lambda be=be: pgd_step(x, g, x0, step, eps, norm=norm, backend=be))
        return {"fwd": (variants, nbytes, None)}
    return Config("pgd_step", f"{norm} B{b} {c}x{h}x{w} {step_kind}-step", dtype, build)


def loss_config(device, dtype, n, c, s, p, ratio) -> Config:
    def build(with_compile: bool):
        length = (s // p) ** 2
        imgs = torch.rand(n, c, s, s, device=device, dtype=dtype, requires_grad=True)
        pred = torch.randn(n, length, p * p * c, device=device, dtype=dtype, requires_grad=True)
        mask = (torch.rand(n, length, device=device) < ratio).to(dtype)
        es = imgs.element_size()
        fwd_bytes = (imgs.numel() + pred.numel() + mask.numel()) * es
        bwd_bytes = 2 * fwd_bytes  # read both again, write both grads
        if with_compile:
            comp = _compile(patch_recon_loss_reference)
            variants = {COMPILE: lambda: comp(pred, imgs, mask, p, True, 2, "mean")}
        else:
            def call(be):
                return lambda: patch_recon_loss(pred, imgs, mask, patch_size=p, norm_pix=True, p=2, backend=be)
            variants = {"eager": call("torch")}
            for be in backends_for("patch_recon_loss", device):
                variants[be] = call(be)
        return {"fwd": (variants, fwd_bytes, None),
                "fwd+bwd": ({k: _grad_fn(f, [imgs, pred]) for k, f in variants.items()}, fwd_bytes + bwd_bytes, None)}
    return Config("patch_recon_loss", f"N{n} C{c} {s}x{s} p{p} mask{ratio}", dtype, build)


def attn_config(device, dtype, b, h, length, d, keep_frac) -> Config:
    def build(with_compile: bool):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(b, h, length, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
                   for _ in range(3))
        keep = None
        if keep_frac is not None:
            keep = (torch.rand(b, length, generator=gen) < keep_frac).to(device)
            keep[:, 0] = True  # cls token
        vis = (keep.sum(1).double().cpu() if keep is not None else torch.full((b,), float(length), dtype=torch.float64))
        fwd_flops = float((4 * h * d * vis * vis).sum())
        if with_compile:
            comp = _compile(masked_patch_attention_reference)
            variants = {COMPILE: lambda: comp(q, k, v, keep)}
        else:
            variants = {"eager": lambda: masked_patch_attention(q, k, v, keep, backend="torch")}
            amask = None if keep is None else keep[:, None, None, :]
            variants["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=amask)
            for be in backends_for("masked_patch_attention", device):
                variants[be] = (lambda be=be: masked_patch_attention(q, k, v, keep, backend=be))
        return {"fwd": (variants, None, fwd_flops),
                "fwd+bwd": ({k_: _grad_fn(f, [q, k, v]) for k_, f in variants.items()}, None, 3.5 * fwd_flops)}
    keep_s = f"keep{keep_frac}" if keep_frac is not None else "keepall"
    return Config("masked_patch_attention", f"B{b} H{h} L{length} D{d} {keep_s}", dtype, build)


def build_configs(device, ops, dtypes, attn_dtypes, quick) -> list[Config]:
    """The large shapes and the ViT-B attention shapes first, the earlier small shapes after."""
    gpu = device.type == "cuda"
    if gpu:
        pgd_shapes = [(64, 3, 224, 224), (4096, 3, 32, 32), (512, 3, 32, 32)]
        loss_shapes = [(64, 3, 224, 16, 0.75), (4096, 3, 32, 4, 0.75), (256, 3, 32, 4, 0.75), (256, 3, 32, 2, 0.75)]
        attn_shapes = [(256, 6, 65, 64, None), (256, 6, 257, 64, None), (256, 6, 65, 64, 0.25),
                       (256, 6, 257, 64, 0.25), (256, 6, 65, 64, 0.5), (256, 6, 257, 64, 0.5),
                       (256, 6, 65, 64, 0.75), (256, 6, 257, 64, 0.75)]
    else:
        pgd_shapes = [(256, 3, 32, 32)]
        loss_shapes = [(256, 3, 32, 4, 0.75)]
        attn_shapes = [(64, 3, 65, 64, None), (64, 3, 65, 64, 0.25), (64, 3, 65, 64, 0.5), (64, 3, 65, 64, 0.75)]
    if quick:
        if gpu:
            pgd_shapes, loss_shapes, attn_shapes = pgd_shapes[:1], loss_shapes[:1], attn_shapes[:3]
        else:  # a few seconds on two cores
            pgd_shapes, loss_shapes, attn_shapes = [(16, 3, 32, 32)], [(16, 3, 32, 4, 0.75)], [(8, 3, 17, 16, None),
                                                                                               (8, 3, 17, 16, 0.5)]
    out: list[Config] = []
    n_shapes = max(len(pgd_shapes), len(loss_shapes), len(attn_shapes))
    # interleave by shape rank so that a run cut short has the headline shapes of every op
    for i in range(n_shapes):
        for dtype in dtypes:
            if "pgd_step" in ops and i < len(pgd_shapes):
                for norm in ("linf", "l2"):
                    for step_kind in ("float", "tensor"):
                        out.append(pgd_config(device, dtype, *pgd_shapes[i], norm, step_kind))
            if "patch_recon_loss" in ops and i < len(loss_shapes):
                out.append(loss_config(device, dtype, *loss_shapes[i]))
        for dtype in attn_dtypes:
            if "masked_patch_attention" in ops and i < len(attn_shapes):
                out.append(attn_config(device, dtype, *attn_shapes[i]))
    return out


# ------------------------------------------------------------------ runner
class Runner:
    def __init__(self, args, device, ceil, writer):
        self.args, self.device, self.ceil, self.writer = args, device, ceil, writer
        self.t0 = time.time()
        self.eager: dict[tuple, dict] = {}  # config key -> eager timing (speedups of later rows)
        self.compile_spent = 0.0

    def elapsed(self) -> float:
        return time.time() - self.t0

    def over_time(self) -> bool:
        return bool(self.args.time_limit_s) and self.elapsed() > self.args.time_limit_s

    def _base(self, cfg, pass_, variant):
        return {"op": cfg.op, "shape": cfg.shape, "dtype": _dname(cfg.dtype), "pass": pass_, "variant": variant}

    def _skip(self, cfg, pass_, variant, why):
        row = {**self._base(cfg, pass_, variant), "skipped": why}
        append_row(self.writer, row)
        print(f"  {cfg.op:24s} {pass_:8s} {cfg.shape:40s} {variant:20s} skipped: {why}", flush=True)

    def _error(self, cfg, pass_, variant, exc):
        row = {**self._base(cfg, pass_, variant), "error": f"{type(exc).__name__}: {exc}"[:300]}
        append_row(self.writer, row)
        print(f"  {cfg.op:24s} {pass_:8s} {cfg.shape:40s} {variant:20s} ERROR {row['error']}", flush=True)

    def _time(self, fn) -> dict:
        a = self.args
        return time_fn(fn, self.device, warmup=1, repeat=a.repeat, target_ms=a.target_ms, max_repeat=a.max_repeat,
                       flush=not a.no_flush, latency_repeat=a.repeat)

    def _row(self, cfg, pass_, variant, t, nbytes, flops, warm_s, compiled):
        ms = t["median_ms"]
        base = self.eager.get(cfg.key(pass_))
        row = {**self._base(cfg, pass_, variant),
               "median_ms": round(ms, 5),
               "kernel_ms": None if t.get("kernel_ms") is None else round(t["kernel_ms"], 5),
               "latency_ms": None if t.get("latency_ms") is None else round(t["latency_ms"], 5),
               "iqr_ms": round(t["iqr_ms"], 5), "repeats": t["n"], "latency_repeats": t.get("latency_n", t["n"]),
               "speedup_vs_eager": round(base["median_ms"] / ms, 3) if base else None}
        if base and t.get("latency_ms") and base.get("latency_ms"):
            row["latency_speedup_vs_eager"] = round(base["latency_ms"] / t["latency_ms"], 3)
        if "host_bound" in t:
            row["host_bound"] = t["host_bound"]
        if nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(bytes=nbytes, GBps=round(gbps, 2), frac_of_mem_bw=round(gbps / self.ceil["mem_bw_GBps"], 3))
        if flops is not None:
            tf = flops / (ms * 1e-3) / 1e12
            key = f"matmul_{row['dtype']}_TFLOPs"
            row.update(TFLOPs=round(tf, 4),
                       frac_of_matmul=round(tf / self.ceil.get(key, self.ceil["matmul_float32_TFLOPs"]), 3))
        row["warmup_s"] = round(warm_s, 3)
        if compiled:
            row["compile_warmup_s"] = round(warm_s, 3)
        append_row(self.writer, row)
        lat = f"lat {t['latency_ms']:.4f} ms" if t.get("latency_ms") is not None else ""
        extra = row.get("GBps", row.get("TFLOPs"))
        print(f"  {cfg.op:24s} {pass_:8s} {cfg.shape:40s} {variant:20s} {ms:9.4f} ms  {lat:18s} "
              f"x{row['speedup_vs_eager']}  {extra}" + ("  [host-bound]" if t.get("host_bound") else ""), flush=True)
        return t

    def run_config(self, cfg: Config, with_compile: bool) -> None:
        if self.over_time():
            self._skip(cfg, "*", COMPILE if with_compile else "*", f"--time-limit-s {self.args.time_limit_s:g} reached")
            return
        if with_compile:
            # a fresh dynamo cache per config: no guard list growing across shapes (host cost in latency_ms),
            # and nothing left from an earlier interrupted compile
            reset_compile_state(self.device)
        try:
            passes = cfg.build(with_compile)
        except Exception as exc:  # noqa: BLE001  e.g. out of memory: report, go on
            self._error(cfg, "*", "*", exc)
            return
        for pass_, (variants, nbytes, flops) in passes.items():
            for name, fn in variants.items():
                if self.over_time():
                    self._skip(cfg, pass_, name, f"--time-limit-s {self.args.time_limit_s:g} reached")
                    continue
                limit, why = None, ""
                if name == COMPILE:
                    limit, why = self._compile_limit()
                    if limit is not None and limit <= 0:
                        self._skip(cfg, pass_, name, why)
                        continue
                try:
                    t_w = time.perf_counter()
                    try:
                        warm_s = timed_warmup(fn, self.device, limit)
                    finally:
                        if name == COMPILE:
                            self.compile_spent += time.perf_counter() - t_w
                    t = self._time(fn)
                except CompileTimeout as exc:
                    self._skip(cfg, pass_, name, f"{exc} ({why}); dynamo reset, run goes on")
                    continue
                except Exception as exc:  # noqa: BLE001  a backend that fails is reported, not hidden
                    self._error(cfg, pass_, name, exc)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if name == "eager":
                    self.eager[cfg.key(pass_)] = t
                self._row(cfg, pass_, name, t, nbytes, flops, warm_s, name == COMPILE)
        del passes
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _compile_limit(self) -> tuple[float | None, str]:
        """Seconds this compile warm-up may take (None: no limit), and which bound set it."""
        a = self.args
        cands = []
        if a.compile_warmup_s:
            cands.append((a.compile_warmup_s, f"--compile-warmup-s {a.compile_warmup_s:g}"))
        if a.compile_budget_s:
            cands.append((a.compile_budget_s - self.compile_spent,
                          f"--compile-budget-s {a.compile_budget_s:g} spent ({self.compile_spent:.0f} s)"))
        if a.time_limit_s:
            cands.append((a.time_limit_s - self.elapsed(), f"--time-limit-s {a.time_limit_s:g}"))
        if not cands:
            return None, ""
        return min(cands)


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by bench_purify's e2e suite for its op rows)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None,
                    help="pgd_step / patch_recon_loss dtypes, comma-separated (default bfloat16,float32 on cuda, "
                         "float32 on cpu)")
    ap.add_argument("--dtype", default=None, help="one dtype for every op (overrides --dtypes and --attn-dtypes)")
    ap.add_argument("--attn-dtypes", default=None,
                    help="attention dtypes (default bfloat16 on cuda: the ViT-B attention shapes; float32 on cpu)")
    ap.add_argument("--ops", default="pgd_step,patch_recon_loss,masked_patch_attention")
    ap.add_argument("--compile", dest="use_compile", action="store_true", default=None,
                    help="include torch.compile(reference) (default on for cuda, off for cpu: inductor C++ builds are slow)")
    ap.add_argument("--no-compile", dest="use_compile", action="store_false")
    ap.add_argument("--compile-warmup-s", type=float, default=None,
                    help="a compile(reference) warm-up (first call) longer than this is recorded as skipped "
                         "(default 120 on cuda, 300 on cpu; 0: no limit)")
    ap.add_argument("--compile-budget-s", type=float, default=0.0,
                    help="total seconds for all compile warm-ups; the compile variants left after it are skipped "
                         "(0: no limit)")
    ap.add_argument("--time-limit-s", type=float, default=0.0,
                    help="skip what is left after this many seconds, rows recorded as skipped (0: no limit)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=10, help="least timed calls (kernel loop) and latency calls")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="CUDA: raise the kernel loop's calls to fill this much device time (default 40)")
    ap.add_argument("--max-repeat", type=int, default=200)
    ap.add_argument("--no-flush", action="store_true", help="CUDA: do not flush the L2 before each timed call")
    ap.add_argument("--name", default=None, help="results file stem (default ops_<device>)")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    dtypes = [DTYPES[d] for d in (args.dtypes or ("bfloat16,float32" if gpu else "float32")).split(",") if d]
    attn_dtypes = [DTYPES[d] for d in (args.attn_dtypes or ("bfloat16" if gpu else "float32")).split(",") if d]
    if args.dtype:
        dtypes = attn_dtypes = [DTYPES[args.dtype]]
    use_compile = args.use_compile if args.use_compile is not None else gpu
    if args.compile_warmup_s is None:
        args.compile_warmup_s = 120.0 if gpu else 300.0
    if args.target_ms is None:
        args.target_ms = 40.0 if gpu else 0.0
    if use_compile:
        # one graph per shape and dtype: far more than dynamo's default recompile limit (8), past which it
        # would silently run eager; fail loudly instead if it is ever hit
        for k, v in (("recompile_limit", 4096), ("cache_size_limit", 4096), ("accumulated_recompile_limit", 1 << 16),
                     ("accumulated_cache_size_limit", 1 << 16), ("fail_on_recompile_limit_hit", True)):
            try:
                if hasattr(torch._dynamo.config, k):
                    setattr(torch._dynamo.config, k, v)
            except Exception:  # noqa: BLE001
                pass
    ops = args.ops.split(",")
    configs = build_configs(device, ops, dtypes, attn_dtypes, args.quick)
    ceil = measure_ceilings(device, quick=args.quick)
    meta = run_meta(device)
    meta.update(ceilings=ceil, dtypes=[_dname(d) for d in dtypes], attn_dtypes=[_dname(d) for d in attn_dtypes],
                compile=use_compile, compile_warmup_s=args.compile_warmup_s, compile_budget_s=args.compile_budget_s,
                time_limit_s=args.time_limit_s, repeat=args.repeat, target_ms=args.target_ms,
                flush_l2=not args.no_flush and gpu,
                timing=("kernel_ms = median of CUDA-event times over back-to-back calls, L2 (256 MB buffer) zeroed "
                        "before each, host enqueue hidden behind a GPU busy-wait (host_bound marks rows where it "
                        "was not); latency_ms = median wall clock of one call with a synchronize before and after; "
                        "median_ms = kernel_ms" if gpu else "median_ms = latency_ms = wall clock of one call"),
                note="GB/s = minimal bytes (read inputs once, write outputs once) / median_ms; "
                     "attention TFLOP/s counts 4*H*D*visible^2 per sample forward, 3.5x that for fwd+bwd; "
                     "compile(reference) rows come in a second pass, after every other variant")
    writer = start_results(args.name or f"ops_{device.type}", meta)
    print(f"device {meta['device']} | ceilings {ceil} | {len(configs)} configs | writing {writer.json_path}", flush=True)
    runner = Runner(args, device, ceil, writer)
    for cfg in configs:
        runner.run_config(cfg, with_compile=False)
    if use_compile:
        print("-- torch.compile(reference)", flush=True)
        for cfg in configs:
            runner.run_config(cfg, with_compile=True)
    writer.finish(wall_s=round(runner.elapsed(), 1), compile_warmup_total_s=round(runner.compile_spent, 1))
    print(f"wrote {writer.json_path} and {writer.csv_path} ({len(writer.rows)} rows, {runner.elapsed():.0f} s)")


if __name__ == "__main__":
    main()
