"""End-to-end purifier throughput: MAEP vs MAE-Pure vs DiffPure, same run, same device.

    python3 bench/bench_purify.py                         # GPU: ViT-B/4 dec512, batch 1..512, fp32 + bf16
    python3 bench/bench_purify.py --device cpu --quick    # < 2 min on a CPU
    python3 bench/bench_purify.py --batch-sizes 1,32 --mae-pure-steps 150,20 --dtypes float32,bfloat16
    python3 bench/bench_purify.py --suite e2e             # GPU: the rows in the order users run them (run_e2e)
    python3 bench/bench_purify.py --dry-run               # that suite on the CPU at tiny sizes (< ~60 s)

``--suite e2e`` (what bench/gpu_check.sh runs, bf16, ViT-B/4): MAEP eager and fused at B128 and
B512; DiffPure SDE-100 (timed steps, scaled), one-step, DDIM-5 at B128; MAE-Pure S150 fused,
fused+graph and reference at B32 (timed steps, scaled); the MAEP training step including its
PGD pair generation; then the torch.compile variants; then the op rows (bench_ops), all in one
results file (e2e_<device>.json/.csv), every row with ``stage``, ``mfu`` and ``peak_mem_MB``.

Purifiers and variants (random weights: speed does not depend on them):

- MAEP (one forward at mask 0): ``eager`` = ``Purifier(fused=False)`` (pure-PyTorch
  reference ops), ``compile`` = ``torch.compile`` of that reference forward,
  ``fused`` = ``Purifier(fused=True)`` (dispatching ops: SDPA / Triton / C++).
- MAE-Pure (S steps of forward + input gradient + sign step, mask 0.25):
  ``fused`` (backend auto) and ``reference`` (backend torch everywhere), for each S.
- DiffPure (DDPM CIFAR-10 UNet, 35.7 M params, 32x32x3): ``sde100`` (reverse
  VP-SDE, t* = 0.1, dt = 1e-3) and ``ddim5``. ``--diffpure-timed-steps N`` times N
  Euler steps and scales to 100 (each step is one UNet call; rows say so).
- MAEP training step (maep_loss at mask 0.5 + backward + AdamW): fused vs reference.

Per row: median latency per batch, images/s, FLOPs per image (bench/flops.py),
achieved TFLOP/s and MFU = achieved / the device's measured matmul ceiling
(bench/common.measure_ceilings) for that dtype, peak memory (CUDA:
torch.cuda.max_memory_allocated during the timed calls; CPU: peak resident-set
growth over the pre-call RSS, sampled every 2 ms in a thread -- approximate, the
allocator may reuse memory it already holds). bf16 runs under torch.autocast.
Writes bench/results/purify_<device>.json/.csv and purify_<device>.png.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flops as flopmod  # noqa: E402
from common import (RESULTS, CompileTimeout, append_row, backend_env, measure_ceilings, run_meta,  # noqa: E402
                    start_results, sync, time_fn, timed_warmup)

from maep_fast.models.presets import PRESETS, create_mae  # noqa: E402
from maep_fast.purify.mae_pure import MAEPure  # noqa: E402
from maep_fast.purify.maep import Purifier  # noqa: E402
from maep_fast.train.maep import maep_loss  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------ helpers
def amp(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class RSSPeak:
    """Peak resident-set growth (MB) over the value at start, sampled every 2 ms in a thread."""

    PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.PAGE

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.delta_mb = (self.peak - self.base) / 2**20


class MemProbe:
    """CUDA: peak allocated during the block; CPU: sampled peak RSS growth (see RSSPeak)."""

    def __init__(self, device: torch.device):
        self.device, self.result = device, {}

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = RSSPeak().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"peak_mem_MB": round(peak / 2**20, 1),
                           "peak_mem_over_resident_MB": round((peak - self.base) / 2**20, 1)}
        else:
            self.rss.__exit__(*exc)
            self.result = {"cpu_rss_growth_MB": round(self.rss.delta_mb, 1)}


def measure(fn, device, budget_s: float, max_repeat: int, warm=None, warm_limit_s: float | None = None) -> dict:
    """Warm up (``warm`` if given, a cheaper stand-in, else one call of ``fn``: compiles, allocates;
    bounded by ``warm_limit_s``: common.CompileTimeout past it), time one synchronized call to size
    the repeats, then as many calls as fit ``budget_s`` (1..max_repeat) through common.time_fn: on
    CUDA ``median_ms`` is the median of CUDA-event times over back-to-back calls (no L2 flush: the
    model's weights staying in L2 is part of a purifier's throughput) and ``latency_ms`` the wall
    clock of one synchronized call. A config that fits only one call keeps the sizing call (a
    latency) as its measurement."""
    warm_s = timed_warmup(warm or fn, device, warm_limit_s)
    with MemProbe(device) as mp:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t0
    # CUDA: the kernel loop and a few latency calls come on top of the budgeted calls
    per = 1.5 if device.type == "cuda" else 1.0
    repeat = max(1, min(max_repeat, int(budget_s / max(first * per, 1e-6))))
    if repeat == 1:
        t = {"median_ms": first * 1e3, "min_ms": first * 1e3, "iqr_ms": 0.0, "n": 1, "latency_ms": first * 1e3,
             "kernel_ms": None}
    else:
        with MemProbe(device) as mp:
            t = time_fn(fn, device, warmup=0, repeat=repeat, flush=False,
                        latency_repeat=max(1, min(3, repeat // 2)) if device.type == "cuda" else None)
    t.update(mp.result)
    t["warmup_s"] = warm_s
    return t


class RowWriter:
    """The results writer seen by the benches: every row gets ``stage`` (the suite's stage that
    measured it), ``mfu`` and ``peak_mem_MB`` keys before it is appended (and the files rewritten).
    ``mfu``: the bench's value, else an op row's ``frac_of_matmul``, else None (a memory-bound op:
    its ``frac_of_mem_bw`` says how close it is to its ceiling). ``peak_mem_MB``: CUDA: the bench's
    value, else torch.cuda.max_memory_allocated since the previous row (op rows); CPU: None (the
    CPU rows carry ``cpu_rss_growth_MB`` instead; meta.memory_method says so)."""

    def __init__(self, writer, device: torch.device):
        self.writer, self.device, self.stage = writer, device, None
        self.rows = writer.rows

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def append(self, row: dict) -> None:
        row = dict(row)
        if self.stage is not None:
            row.setdefault("stage", self.stage)
        if "mfu" not in row:
            row["mfu"] = row.get("frac_of_matmul")
        if "peak_mem_MB" not in row:
            row["peak_mem_MB"] = None
            if self.device.type == "cuda" and not row.get("skipped"):
                row["peak_mem_MB"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.writer.append(row)


class Bench:
    def __init__(self, args, device, ceil, writer):
        self.args, self.device, self.ceil, self.writer = args, device, ceil, writer
        self.rows: list[dict] = writer.rows  # every row is appended (and the files rewritten) when measured
        self.t0 = time.time()
        self.last: dict[str, tuple[int, float]] = {}  # series -> (batch, seconds per call) for projections
        self.compile_failed: dict[str, str] = {}  # series whose compile warm-up ran over -> reason

    def add(self, row: dict) -> None:
        append_row(self.writer, row)

    def _skip(self, row: dict, why: str) -> None:
        row["skipped"] = why
        self.add(row)
        print(f"  {self._label(row):44s} B{row.get('batch', 0):<4d} skipped: {why}", flush=True)

    def run(self, series: dict, batch: int, make_fn, flops_per_image: int | None, scale: float = 1.0,
            warm=None, extra: dict | None = None, compiled: bool = False):
        """Time make_fn() at ``batch``; ``scale`` multiplies the measured time (extrapolated step counts).
        ``compiled``: the warm-up compiles (torch.compile), bounded by --compile-warmup-s."""
        a = self.args
        row = {**series, "batch": batch, **(extra or {})}
        key = "|".join(str(series[k]) for k in sorted(series))
        if a.time_limit_s and time.time() - self.t0 > a.time_limit_s:
            return self._skip(row, f"--time-limit-s {a.time_limit_s:.0f} reached")
        if compiled and key in self.compile_failed:
            return self._skip(row, f"an earlier warm-up of this series ran over: {self.compile_failed[key]}")
        if key in self.last:
            b0, s0 = self.last[key]
            proj = s0 * batch / b0
            why = f"projected {proj:.0f} s per call > --max-call-s {a.max_call_s}"
        else:  # a lower bound before anything of this series ran: FLOPs at the measured matmul ceiling
            ceil = self._ceiling(series["dtype"])
            proj = flops_per_image * batch / scale / (ceil * 1e12) if (flops_per_image and ceil) else 0.0
            why = f"at least {proj:.0f} s per call (FLOPs / measured matmul ceiling) > --max-call-s {a.max_call_s}"
        if proj > a.max_call_s:
            return self._skip(row, why)
        limit = None
        if compiled and a.compile_warmup_s:
            limit = a.compile_warmup_s
            if a.time_limit_s:  # never let a warm-up run past the whole run's limit
                limit = max(1.0, min(limit, a.time_limit_s - (time.time() - self.t0)))
        try:
            fn = make_fn()
            t = measure(fn, self.device, a.budget_s, a.repeat, warm=warm, warm_limit_s=limit)
        except CompileTimeout as exc:
            why = f"compile {exc} (--compile-warmup-s {a.compile_warmup_s:g}); dynamo reset, run goes on"
            self.compile_failed[key] = why
            row["compile_warmup_s"] = round(limit or 0.0, 1)
            return self._skip(row, why)
        except Exception as exc:  # OOM or a broken path: report it, keep going
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            self.add(row)
            print(f"  {self._label(row):44s} B{batch:<4d} ERROR {row['error']}", flush=True)
            return
        ms = t["median_ms"] * scale
        self.last[key] = (batch, t["median_ms"] / 1e3)
        ips = batch / (ms * 1e-3)
        row.update(median_ms=round(ms, 3), iqr_ms=round(t["iqr_ms"] * scale, 3), repeats=t["n"],
                   images_per_s=round(ips, 3), ms_per_image=round(ms / batch, 4))
        if t.get("latency_ms") is not None:
            row.update(latency_ms=round(t["latency_ms"] * scale, 3),
                       images_per_s_latency=round(batch / (t["latency_ms"] * scale * 1e-3), 3))
        if t.get("kernel_ms") is not None:
            row["timing"] = "cuda events" + (", host-bound" if t.get("host_bound") else "")
        row["warmup_s"] = round(t["warmup_s"], 2)
        if compiled:
            row["compile_warmup_s"] = round(t["warmup_s"], 2)
        for k in ("peak_mem_MB", "peak_mem_over_resident_MB", "cpu_rss_growth_MB"):
            if k in t:
                row[k] = t[k]
        if flops_per_image:
            tf = ips * flops_per_image / 1e12
            row.update(gflop_per_image=round(flops_per_image / 1e9, 4), achieved_TFLOPs=round(tf, 4),
                       mfu=self.mfu(tf, series["dtype"]))
        self.add(row)
        mem = row.get("peak_mem_MB", row.get("cpu_rss_growth_MB"))
        lat = f"  latency {row['latency_ms']:.2f} ms" if "latency_ms" in row and "timing" in row else ""
        warm_note = f"  compile warm-up {row['compile_warmup_s']:.1f} s" if compiled else ""
        print(f"  {self._label(row):44s} B{batch:<4d} {ms:10.2f} ms  {ips:10.2f} img/s  "
              f"MFU {row.get('mfu') or float('nan'):.3f}  mem {mem} MB  (n={t['n']}){lat}{warm_note}", flush=True)

    def _ceiling(self, dtype: str) -> float | None:
        return self.ceil.get(f"matmul_{dtype}_TFLOPs", self.ceil.get("matmul_float32_TFLOPs"))

    def mfu(self, tflops: float, dtype: str) -> float | None:
        ceil = self._ceiling(dtype)
        return round(tflops / ceil, 4) if ceil else None

    def finalize_mfu(self, ceil: dict) -> None:
        """Recompute MFU against ``ceil`` (the best of the ceilings measured before and after the run)."""
        self.ceil = ceil
        for r in self.rows:
            if r.get("achieved_TFLOPs") is not None:
                r["mfu"] = self.mfu(r["achieved_TFLOPs"], r["dtype"])

    @staticmethod
    def _label(row) -> str:
        s = f"{row['purifier']} {row['variant']}"
        if row.get("steps"):
            s += f" S{row['steps']}"
        if row.get("extrapolated"):
            s += (f" (timed {row['timed_network_calls']} calls)" if "timed_network_calls" in row
                  else f" (timed {row.get('steps_timed')} steps)")
        return f"{s} [{row['dtype']}, {row['preset']}]"


def label_of(row) -> str:
    return Bench._label(row)


# ------------------------------------------------------------- the benches
def bench_maep(B: Bench, preset: str, base_model, dtype, batches, fl, use_compile, eager: bool = True,
               compile_backend: str = "inductor"):
    """MAEP rows per batch: eager and fused (``eager``), then compile and fused+compile (``use_compile``).
    ``compile_backend``: torch.compile's backend ("eager" in the CPU dry run: no inductor build)."""
    dev, dname = B.device, str(dtype).split(".")[-1]
    ref_model = copy.deepcopy(base_model)
    fused_model = copy.deepcopy(base_model)
    ref = Purifier(ref_model, fused=False, batch_size=max(batches))
    fused = Purifier(fused_model, fused=True, batch_size=max(batches))
    # dynamic=None: the second batch size recompiles with a dynamic batch dimension, later ones reuse it
    compiled = torch.compile(ref._single, backend=compile_backend) if use_compile else None
    fused_compiled = (Purifier(copy.deepcopy(base_model), fused=True, batch_size=max(batches), compile=True)
                      if use_compile else None)
    if fused_compiled is not None:
        fused_compiled.compile_backend = compile_backend
    extra = {"compile_backend": compile_backend} if compile_backend != "inductor" else None
    for b in batches:
        x = torch.rand(b, base_model.in_chans, base_model.img_size, base_model.img_size, device=dev)
        common = {"purifier": "MAEP", "preset": preset, "dtype": dname}

        def call(p):
            def f():
                with amp(dev, dtype):
                    return p.purify(x)
            return f

        if eager:
            B.run({**common, "variant": "eager"}, b, lambda: call(ref), fl["maep"])
        if compiled is not None:
            def comp():
                with torch.no_grad(), amp(dev, dtype):
                    ref._check(x)
                    return compiled(x)
            B.run({**common, "variant": "compile"}, b, lambda: comp, fl["maep"], compiled=True, extra=extra)
        if eager:
            B.run({**common, "variant": "fused"}, b, lambda: call(fused), fl["maep"])
        if fused_compiled is not None:  # Purifier(compile=True): our ops inside torch.compile (CUDA graphs for small chunks)
            B.run({**common, "variant": "fused+compile"}, b, lambda: call(fused_compiled), fl["maep"], compiled=True,
                  extra=extra)
    del ref_model, fused_model


def bench_mae_pure(B: Bench, preset: str, base_model, dtype, batches, fl, steps_list, timed_steps: int | None = None,
                   graph_stand_in: bool = False):
    """MAE-Pure rows: fused, fused+graph (CUDA: one captured step replayed S times; with
    ``graph_stand_in`` on the CPU: the same static-buffer loop uncaptured) and reference, per S and
    batch. ``timed_steps``: time that many steps and scale to S (rows say so)."""
    dname = str(dtype).split(".")[-1]
    common = {"purifier": "MAE-Pure", "preset": preset, "dtype": dname}
    dev = B.device
    ref_model = copy.deepcopy(base_model).set_backend("torch")
    fused_model = copy.deepcopy(base_model).set_backend("auto")
    for s in steps_list:
        fl_img = fl["mae_pure_step"] * s
        n_timed = min(s, timed_steps) if timed_steps else s
        scale = s / n_timed
        for b in batches:
            x = torch.rand(b, base_model.in_chans, base_model.img_size, base_model.img_size, device=dev)
            variants = [("fused", fused_model, "auto", None, False), ("reference", ref_model, "torch", "torch", False)]
            if dev.type == "cuda" or graph_stand_in:  # one step captured in a CUDA graph and replayed S times
                variants.insert(1, ("fused+graph", fused_model, "auto", None, True))
            for variant, model, backend, env, graph in variants:
                def purifier(steps, model=model, backend=backend, env=env, graph=graph):
                    cuda_graph = graph and dev.type == "cuda"
                    mp = MAEPure(model, steps=steps, mask_ratio=0.25, n_masks=1, backend=backend, batch_size=b, seed=0,
                                 cuda_graph=cuda_graph)

                    def f():
                        with backend_env(env), amp(dev, dtype):
                            if graph and not cuda_graph:  # CPU stand-in: the static-buffer step loop, uncaptured
                                return mp._purify_chunk_graph(x, mp._generator(dev), capture=False)[0]
                            return mp.purify(x)
                    return f
                extra = {"steps_timed": n_timed}
                if scale != 1.0:
                    extra["extrapolated"] = True
                if graph and dev.type != "cuda":
                    extra["capture"] = "none (CPU stand-in: the static-buffer loop runs uncaptured)"
                # warm-up with a 1-step purifier: the same kernels, 1/S of the time
                B.run({**common, "variant": variant, "steps": s}, b, lambda: purifier(n_timed), fl_img, scale=scale,
                      warm=lambda: purifier(1)(), extra=extra)
    del ref_model, fused_model


def bench_diffpure(B: Bench, unet, dtype, batches, fl_call, timed_steps: int | None, ddim_steps: int = 5,
                   order: tuple = ("sde", "ddim", "one_step")):
    from maep_fast.baselines.diffpure import DiffPure

    dev, dname = B.device, str(dtype).split(".")[-1]
    common = {"purifier": "DiffPure", "preset": "ddpm_cifar10_unet", "dtype": dname}
    full = DiffPure(unet, sampler="sde").sde_steps
    n_timed = full if not timed_steps else min(timed_steps, full)
    for b in batches:
        x = torch.rand(b, 3, 32, 32, device=dev)

        def warm():  # one network call: allocator / kernel warm-up without a full purification
            with torch.no_grad(), amp(dev, dtype):
                unet(x * 2 - 1, torch.full((b,), 99.9, device=dev))

        samplers = {
            "sde": (f"sde{full}", dict(sampler="sde", dt=0.1 / n_timed), full, full / n_timed),
            "ddim": (f"ddim{ddim_steps}", dict(sampler="ddim", ddim_steps=ddim_steps), ddim_steps, 1.0),
            # one reverse evaluation from t* (consistency-distilled purifiers such as OSCP, DBLP):
            # what a user who wants speed would pick instead of 100-step DiffPure
            "one_step": ("one_step", dict(sampler="one_step"), 1, 1.0)}
        for variant, kw, calls, scale in (samplers[k] for k in order):
            def make(kw=kw):
                dp = DiffPure(unet, t_star=0.1, seed=0, batch_size=b, **kw)

                def f():
                    with amp(dev, dtype):
                        return dp.purify(x)
                return f
            extra = {"network_calls": calls}
            if scale != 1.0:
                extra.update(timed_network_calls=n_timed, extrapolated=True)
            B.run({**common, "variant": variant}, b, make, fl_call * calls, scale=scale, warm=warm, extra=extra)


def _maep_train_step(model, opt, x_adv, x, dev, dtype) -> None:
    """One MAEP stage-1 optimizer step as the trainer runs it: maep_loss at mask 0.5 under autocast,
    backward, AdamW."""
    opt.zero_grad(set_to_none=True)
    with amp(dev, dtype):
        loss, _ = maep_loss(model, x_adv, x, 0.5, 1.0, 1.0)
    loss.backward()
    opt.step()


def bench_train(B: Bench, preset: str, base_model, dtype, batches, fl):
    dev, dname = B.device, str(dtype).split(".")[-1]
    common = {"purifier": "MAEP-train", "preset": preset, "dtype": dname}
    for variant, backend, env in (("reference", "torch", "torch"), ("fused", "auto", None)):
        model = copy.deepcopy(base_model).set_backend(backend).train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for b in batches:
            x = torch.rand(b, base_model.in_chans, base_model.img_size, base_model.img_size, device=dev)
            x_adv = (x + (8 / 255) * torch.sign(torch.randn_like(x))).clamp(0, 1)

            def make(model=model, opt=opt, env=env, x=x, x_adv=x_adv):
                def f():
                    with backend_env(env):
                        _maep_train_step(model, opt, x_adv, x, dev, dtype)
                return f
            B.run({**common, "variant": variant}, b, make, fl["maep_train_step"])
        del model, opt


def bench_train_pgd(B: Bench, preset: str, base_model, dtype, batches, fl, pgd_steps: int = 10):
    """One MAEP training step as the trainer runs it: PGD pair generation against a frozen classifier
    (AttackConfig: L-inf 8/255, step 2/255, ``pgd_steps`` steps; fp32, outside autocast), then
    maep_loss at mask 0.5 + backward + AdamW, fused ops. FLOPs: the MAE step plus the PGD's
    classifier forward+backward per step."""
    from maep_fast.models.classifiers import SmallCNN
    from maep_fast.train.maep import AttackConfig, make_adversarial

    dev, dname = B.device, str(dtype).split(".")[-1]
    common = {"purifier": "MAEP-train", "preset": preset, "dtype": dname}
    model = copy.deepcopy(base_model).set_backend("auto").train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    clf = SmallCNN(in_chans=base_model.in_chans, num_classes=10).to(dev).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    attack = AttackConfig(steps=pgd_steps)
    x1 = torch.zeros(1, base_model.in_chans, base_model.img_size, base_model.img_size, device=dev, requires_grad=True)
    clf_fb = flopmod.count(lambda: clf(x1).sum().backward())
    for b in batches:
        x = torch.rand(b, base_model.in_chans, base_model.img_size, base_model.img_size, device=dev)
        y = torch.randint(0, 10, (b,), device=dev)

        def make(x=x, y=y):
            def f():
                _maep_train_step(model, opt, make_adversarial(clf, x, y, attack), x, dev, dtype)
            return f
        B.run({**common, "variant": f"fused+pgd{pgd_steps}"}, b, make, fl["maep_train_step"] + pgd_steps * clf_fb,
              extra={"pgd_steps": pgd_steps, "pair_generation": "PGD vs a frozen SmallCNN classifier, fp32"})
    del model, opt


# ------------------------------------------------------------------ the e2e suite
E2E_STAGES = ("maep", "diffpure", "mae_pure", "train", "compile", "ops")


def run_e2e(args, B: Bench, models: dict, fl_by_preset: dict, dtypes, unet_factory, unet_call, diffpure_skip):
    """The rows in the order users run them, each written the moment it is measured:

    1. MAEP eager and fused at ``--batch-sizes`` (128, 512)
    2. DiffPure SDE-100 (``--diffpure-timed-steps`` timed, scaled), one-step, DDIM-5 at B128
    3. MAE-Pure S150 fused, fused+graph, reference at B32 (``--mae-pure-timed-steps`` timed, scaled)
    4. the MAEP training step with its PGD pair generation
    5. torch.compile variants of MAEP (compile(reference), fused+compile)
    6. op rows (bench_ops: every op per backend; ``--ops-args``)

    ``--stages`` picks a subset, in this order."""
    stages = [st for st in E2E_STAGES if st in set(args.stages.split(","))]
    dev = B.device
    for dtype in dtypes:
        dname = str(dtype).split(".")[-1]
        for stage in (st for st in stages if st != "ops"):
            B.writer.stage = stage
            print(f"-- [{stage}] {dname}", flush=True)
            for p in args.presets_list:
                m, fl = models[p], fl_by_preset[p]
                if stage == "maep":
                    bench_maep(B, p, m, dtype, args.batches, fl, use_compile=False)
                elif stage == "mae_pure":
                    bench_mae_pure(B, p, m, dtype, args.mp_batches, fl, args.steps_list,
                                   timed_steps=args.mae_pure_timed_steps, graph_stand_in=args.dry_run)
                elif stage == "train":
                    bench_train_pgd(B, p, m, dtype, args.train_batches, fl, pgd_steps=args.train_pgd_steps)
                elif stage == "compile":
                    bench_maep(B, p, m, dtype, args.batches, fl, use_compile=True, eager=False,
                               compile_backend=args.compile_backend)
            if stage == "diffpure":
                if diffpure_skip:
                    for v in ("sde100", "one_step", "ddim5"):
                        B.add({"purifier": "DiffPure", "variant": v, "preset": "ddpm_cifar10_unet", "dtype": dname,
                               "batch": args.dp_batches[0], "skipped": diffpure_skip})
                else:
                    bench_diffpure(B, unet_factory(), dtype, args.dp_batches, unet_call, args.timed_steps,
                                   order=("sde", "one_step", "ddim"))
    if "ops" in stages:
        B.writer.stage = "ops"
        print("-- [ops]", flush=True)
        import bench_ops

        oargs = bench_ops.build_parser().parse_args(["--device", dev.type] + args.ops_args.split())
        if oargs.compile_warmup_s is None:
            oargs.compile_warmup_s = 120.0
        if oargs.target_ms is None:
            oargs.target_ms = 40.0 if dev.type == "cuda" else 0.0
        if args.time_limit_s:
            left = args.time_limit_s - (time.time() - B.t0)
            oargs.time_limit_s = max(1.0, min(oargs.time_limit_s or left, left))
        odt = [bench_ops.DTYPES[d] for d in (oargs.dtypes or ("bfloat16" if dev.type == "cuda" else "float32")).split(",")]
        adt = [bench_ops.DTYPES[d] for d in (oargs.attn_dtypes or ("bfloat16" if dev.type == "cuda" else "float32")).split(",")]
        configs = bench_ops.build_configs(dev, oargs.ops.split(","), odt, adt, oargs.quick)
        runner = bench_ops.Runner(oargs, dev, B.ceil, B.writer)
        for cfg in configs:
            runner.run_config(cfg, with_compile=False)
        if oargs.use_compile:
            for cfg in configs:
                runner.run_config(cfg, with_compile=True)
    B.writer.stage = None


def tiny_unet():
    """A small UNet2DModel of the DDPM layout (the CPU dry run's DiffPure stand-in)."""
    from maep_fast.baselines.diffpure import ddpm_cifar10_unet

    return ddpm_cifar10_unet(block_out_channels=(32, 32, 32, 32), layers_per_block=1)


# ------------------------------------------------------------------ output
def plot(rows, path: Path, title: str) -> bool:
    """images/s vs batch size (log-log), one panel per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels: dict[str, dict[str, list]] = {}
    for r in rows:
        if r.get("images_per_s") and r.get("purifier") not in (None, "MAEP-train"):
            label = label_of(r).replace(f"[{r['dtype']}, ", "[")
            panels.setdefault(r["dtype"], {}).setdefault(label, []).append((r["batch"], r["images_per_s"]))
    if not panels:
        return False
    styles = {"MAEP": "-", "MAE-Pure": "--", "DiffPure": ":"}
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 6.5), squeeze=False)
    for ax, (dtype, series) in zip(axes[0], sorted(panels.items(), key=lambda kv: kv[0] != "float32")):
        colors = plt.cm.tab20.colors  # distinct colours for up to 20 series per panel
        for i, (lab, pts) in enumerate(sorted(series.items())):
            pts.sort()
            ls = next((v for k, v in styles.items() if lab.startswith(k + " ")), "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=lab, color=colors[i % 20])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(dtype)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def best(rows, **match):
    cands = [r for r in rows if r.get("images_per_s") and all(r.get(k) == v for k, v in match.items())]
    return max(cands, key=lambda r: r["images_per_s"]) if cands else None


def summarize(rows) -> list[str]:
    rows = [r for r in rows if "purifier" in r]  # op rows (e2e stage "ops") are summarized by bench_ops
    out = []
    dtypes = sorted({r["dtype"] for r in rows})
    presets = sorted({r["preset"] for r in rows if r["purifier"] == "MAEP"})
    for dt in dtypes:
        for pr in presets:
            m = best(rows, purifier="MAEP", variant="fused", dtype=dt, preset=pr)
            for v in sorted({r["variant"] for r in rows if r["purifier"] == "DiffPure"}):
                d = best(rows, purifier="DiffPure", variant=v, dtype=dt)
                if m and d:
                    ex = " (DiffPure extrapolated from fewer steps)" if d.get("extrapolated") else ""
                    out.append(f"[{dt}] MAEP fused ({pr}) {m['images_per_s']:.3g} img/s @B{m['batch']} vs DiffPure {v} "
                               f"{d['images_per_s']:.3g} img/s @B{d['batch']}: x{m['images_per_s'] / d['images_per_s']:.0f}{ex}")
            for s in sorted({r.get("steps") for r in rows if r["purifier"] == "MAE-Pure" and r.get("steps")}):
                mp = best(rows, purifier="MAE-Pure", variant="fused", dtype=dt, preset=pr, steps=s)
                if m and mp:
                    out.append(f"[{dt}] MAEP fused vs MAE-Pure fused S{s} ({pr}): {m['images_per_s']:.3g} vs "
                               f"{mp['images_per_s']:.3g} img/s (best batch each): x{m['images_per_s'] / mp['images_per_s']:.0f}")
            by_b = {}
            for r in rows:
                if r["purifier"] == "MAEP" and r["dtype"] == dt and r["preset"] == pr and r.get("images_per_s"):
                    by_b.setdefault(r["batch"], {})[r["variant"]] = r["images_per_s"]
            for b, v in sorted(by_b.items()):
                if "fused" in v:
                    parts = [f"vs {k} x{v['fused'] / v[k]:.2f}" for k in ("eager", "compile") if k in v]
                    out.append(f"[{dt}] MAEP fused B{b} ({pr}): {v['fused']:.3g} img/s " + ", ".join(parts))
            for purifier in ("MAE-Pure", "MAEP-train"):
                groups = {}
                for r in rows:
                    if r["purifier"] == purifier and r["dtype"] == dt and r["preset"] == pr and r.get("images_per_s"):
                        groups.setdefault((r.get("steps"), r["batch"]), {})[r["variant"]] = r["images_per_s"]
                for (s, b), v in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
                    if "fused" in v and "reference" in v:
                        tag = f" S{s}" if s else ""
                        out.append(f"[{dt}] {purifier}{tag} B{b} ({pr}): fused {v['fused']:.3g} vs reference "
                                   f"{v['reference']:.3g} img/s: x{v['fused'] / v['reference']:.2f}")
    seen = set()
    for r in sorted((r for r in rows if r.get("images_per_s")), key=lambda r: -r["images_per_s"]):
        key = (r["purifier"], r["variant"], r.get("steps"), r["dtype"], r["preset"])
        if key in seen:
            continue
        seen.add(key)
        out.append(f"best {label_of(r):56s} {r['images_per_s']:10.3f} img/s @B{r['batch']:<4d} "
                   f"{r.get('gflop_per_image', float('nan')):9.3f} GFLOP/img  MFU {r.get('mfu') or float('nan'):.3f}")
    for r in rows:
        if r.get("skipped") and r["purifier"] == "MAE-Pure":
            out.append(f"MAE-Pure skipped: {r['skipped']}")
            break
    return out


def _title(meta: dict) -> str:
    """Figure title; works on a partial results file (a run stopped before its end) too."""
    t = f"{meta.get('cpu_model', meta.get('device', '?'))} | torch {meta.get('torch', '?')} | git {meta.get('git_sha', '?')}"
    if meta.get("device_type") == "cpu":
        load0 = (meta.get("loadavg_start") or [float("nan")])[0]
        load1 = (meta.get("loadavg_end") or [float("nan")])[0]
        t += f" | {meta.get('torch_threads', '?')} threads | load {load0:.1f}->{load1:.1f}"
    if not meta.get("complete", True):
        t += f" | PARTIAL: {meta.get('rows_written', '?')} rows"
    return t


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", "--preset", default=None,
                    help="MAE presets, comma-separated (default: mae_vit_base_patch4_dec512 on cuda, mae_vit_tiny_patch4 on cpu)")
    ap.add_argument("--batch-sizes", default=None, help="default 1,8,32,128,512 (cuda), 1,8,32 (cpu), 1,8 (--quick)")
    ap.add_argument("--mae-pure-batch-sizes", default=None, help="default: --batch-sizes (cpu --quick: 1)")
    ap.add_argument("--diffpure-batch-sizes", default=None, help="default: --batch-sizes (cpu --quick: 1)")
    ap.add_argument("--train-batch-sizes", default=None, help="default 128,512 (cuda), 32 (cpu), 8 (--quick)")
    ap.add_argument("--dtypes", default=None, help="float32,bfloat16 (default cuda) | float32 (default cpu)")
    ap.add_argument("--mae-pure-steps", default=None, help="default 150,20 (cuda), 20 (cpu)")
    ap.add_argument("--diffpure-timed-steps", type=int, default=None,
                    help="time this many SDE Euler steps and scale to 100 (default: all 100; cpu --quick: 10)")
    ap.add_argument("--only", default="maep,mae_pure,diffpure,train", help="which benches to run")
    ap.add_argument("--compile", dest="use_compile", action="store_true", default=None,
                    help="include torch.compile(reference) for MAEP (default on for cuda, off for cpu: inductor's "
                         "C++ build of one model takes ~2 min on 2 busy cores)")
    ap.add_argument("--no-compile", dest="use_compile", action="store_false")
    ap.add_argument("--tf32", action="store_true",
                    help="allow TF32 in fp32 matmuls and convolutions on CUDA (default off: fp32 rows are true fp32 "
                         "for ViTs and UNet alike; cuDNN would otherwise use TF32 for the UNet's convolutions only)")
    ap.add_argument("--quick", action="store_true", help="a < 2 min CPU run: small batches, few repeats")
    ap.add_argument("--repeat", type=int, default=None, help="max timed calls per config (default 10, quick 5)")
    ap.add_argument("--budget-s", type=float, default=None, help="timing budget per config (default 10 cuda, 3 cpu, 2 quick)")
    ap.add_argument("--max-call-s", type=float, default=None,
                    help="skip a config when its projected time per call exceeds this (default 120 cuda, 30 cpu)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="skip the configs left after this many seconds, still writing results (default 420 on cuda: "
                         "the device tool stops a command at 600 s; none on cpu)")
    ap.add_argument("--compile-warmup-s", type=float, default=None,
                    help="a torch.compile warm-up (first call of a config) longer than this is recorded as skipped, "
                         "and later batches of that series too (default 120 on cuda, 300 on cpu; 0: no limit)")
    ap.add_argument("--name", default=None, help="results file stem (default purify_<device>, e2e: e2e_<device>)")
    ap.add_argument("--suite", choices=("default", "e2e"), default="default",
                    help="e2e: the rows in the order users run them (run_e2e): MAEP eager/fused, DiffPure, MAE-Pure, "
                         "the training step with PGD pairs, compile variants, op rows")
    ap.add_argument("--stages", default=",".join(E2E_STAGES), help=f"e2e stages (a subset of {E2E_STAGES})")
    ap.add_argument("--dry-run", action="store_true",
                    help="the e2e suite on the CPU at tiny sizes (demo preset, B2/B4, few steps, a small UNet, "
                         "torch.compile backend 'eager', one op): proves the plumbing of every row in < ~60 s")
    ap.add_argument("--mae-pure-timed-steps", type=int, default=None,
                    help="time this many MAE-Pure steps and scale to S (default: all S; e2e on cuda: 20)")
    ap.add_argument("--train-pgd-steps", type=int, default=10, help="PGD steps of the e2e training step's pairs")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the e2e compile stage")
    ap.add_argument("--ops-args", default="--quick --no-compile",
                    help="bench_ops arguments of the e2e ops stage (its rows join this file)")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="only redraw the PNG next to a results JSON of an earlier run, then exit")
    args = ap.parse_args()
    if args.replot:
        jpath = Path(args.replot)
        data = json.loads(jpath.read_text())
        if not plot(data["rows"], jpath.with_suffix(".png"), _title(data["meta"])):
            raise SystemExit("nothing to plot (or matplotlib missing)")
        print(f"wrote {jpath.with_suffix('.png')}")
        return

    if args.dry_run:  # tiny sizes on the CPU; explicit options still win
        args.suite, args.device, args.quick = "e2e", "cpu", True
        for k, v in (("presets", "demo"), ("batch_sizes", "2,4"), ("mae_pure_batch_sizes", "2"),
                     ("diffpure_batch_sizes", "2"), ("train_batch_sizes", "2"), ("dtypes", "float32"),
                     ("mae_pure_steps", "4"), ("mae_pure_timed_steps", 2), ("diffpure_timed_steps", 1),
                     ("repeat", 2), ("budget_s", 0.05), ("compile_warmup_s", 60.0), ("name", "e2e_dryrun_cpu")):
            if getattr(args, k) is None:
                setattr(args, k, v)
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"  # dynamo tracing without inductor's C++ build (minutes on a CPU)
        if args.train_pgd_steps == 10:
            args.train_pgd_steps = 2
        if args.ops_args == "--quick --no-compile":
            args.ops_args = "--quick --no-compile --ops pgd_step --repeat 2 --max-repeat 2"
    e2e = args.suite == "e2e"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    q = args.quick
    presets = (args.presets or ("mae_vit_base_patch4_dec512" if gpu else "mae_vit_tiny_patch4")).split(",")
    for p in presets:
        if p not in PRESETS:
            raise SystemExit(f"unknown preset {p!r}; choose from {sorted(PRESETS)}")
    if e2e:
        args.batch_sizes = args.batch_sizes or "128,512"
        args.mae_pure_batch_sizes = args.mae_pure_batch_sizes or "32"
        args.diffpure_batch_sizes = args.diffpure_batch_sizes or "128"
        args.train_batch_sizes = args.train_batch_sizes or "128"
        args.mae_pure_steps = args.mae_pure_steps or "150"
        args.dtypes = args.dtypes or ("bfloat16" if gpu else "float32")
        if args.mae_pure_timed_steps is None and gpu:
            args.mae_pure_timed_steps = 20
        if args.diffpure_timed_steps is None and gpu:
            args.diffpure_timed_steps = 20
    batches = _ints(args.batch_sizes or ("1,8,32,128,512" if gpu else ("1,8" if q else "1,8,32")))
    dp_batches = _ints(args.diffpure_batch_sizes) if args.diffpure_batch_sizes else (
        [1] if (q and not gpu) else batches)
    mp_batches = _ints(args.mae_pure_batch_sizes) if args.mae_pure_batch_sizes else (
        [1] if (q and not gpu) else batches)
    train_batches = _ints(args.train_batch_sizes or ("128,512" if gpu else ("8" if q else "32")))
    dtypes = [DTYPES[d] for d in (args.dtypes or ("float32,bfloat16" if gpu else "float32")).split(",")]
    steps_list = _ints(args.mae_pure_steps or ("150,20" if gpu else "20"))
    timed_steps = args.diffpure_timed_steps if args.diffpure_timed_steps is not None else (10 if (q and not gpu) else None)
    use_compile = args.use_compile if args.use_compile is not None else gpu
    args.repeat = args.repeat or (5 if q else 10)
    args.budget_s = args.budget_s or (10.0 if gpu else (2.0 if q else 3.0))
    args.max_call_s = args.max_call_s or (120.0 if gpu else 30.0)
    if args.time_limit_s is None:
        args.time_limit_s = 420.0 if gpu else 0.0
    if args.compile_warmup_s is None:
        args.compile_warmup_s = 120.0 if gpu else 300.0
    only = set(args.only.split(","))
    if use_compile or e2e:
        for k in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, k):
                setattr(torch._dynamo.config, k, 64)

    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    t_start = time.time()
    load0 = os.getloadavg()
    ceil_m = 256 if args.dry_run else None
    ceil = measure_ceilings(device, quick=q, m=ceil_m)
    meta = run_meta(device)
    meta.update(
        loadavg_start=load0, presets=presets, batch_sizes=batches, diffpure_batch_sizes=dp_batches,
        mae_pure_batch_sizes=mp_batches,
        train_batch_sizes=train_batches, dtypes=[str(d).split(".")[-1] for d in dtypes], mae_pure_steps=steps_list,
        diffpure_timed_steps=timed_steps, tf32=bool(args.tf32 and gpu), compile=use_compile, quick=q, repeat=args.repeat, budget_s=args.budget_s,
        max_call_s=args.max_call_s, time_limit_s=args.time_limit_s, compile_warmup_s=args.compile_warmup_s,
        timing=("median_ms = median of CUDA-event times over back-to-back calls (no L2 flush), images_per_s from it; "
                "latency_ms = wall clock of one synchronized call" if gpu else "wall clock of one call"),
        env_MAEP_FAST_BACKEND=os.environ.get("MAEP_FAST_BACKEND"),
        suite=args.suite, dry_run=bool(args.dry_run), mae_pure_timed_steps=args.mae_pure_timed_steps,
        stages=[st for st in E2E_STAGES if st in args.stages.split(",")] if e2e else None,
        compile_backend=args.compile_backend if e2e else "inductor",
        mfu_method="MFU = achieved TFLOP/s / the matmul ceiling of the row's dtype measured in this run (start and "
                   "end, the larger); op rows: frac_of_matmul (attention), None for memory-bound ops",
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        memory_method=("torch.cuda.max_memory_allocated over the timed calls (peak_mem_MB, includes weights); "
                       "peak_mem_over_resident_MB subtracts what was allocated before" if gpu else
                       "peak_mem_MB is null on the CPU; cpu_rss_growth_MB: peak RSS minus pre-call RSS, sampled every "
                       "2 ms in a thread (approximate; memory the allocator already holds is not seen)"),
        note=("random weights; bf16 = Purifier/MAEPure under the caller's torch.autocast (precision 'auto': the cast "
              "bf16 copy of the model), training and DiffPure under torch.autocast; latency = median ms per call (one batch); MFU = images/s x "
              "FLOPs/image / measured matmul ceiling of the dtype; FLOPs count matmul-like ops only (bench/flops.py)"),
    )
    print(f"device {meta['device']} ({device.type}) | threads {torch.get_num_threads()} | load {load0} | ceilings {ceil}")

    diffpure_skip = None
    try:
        if args.dry_run:
            with torch.device("meta"):
                unet_call = flopmod.diffpure_unet_flops(tiny_unet())
        else:
            unet_call = flopmod.diffpure_unet_flops()
    except ImportError as exc:  # diffusers missing on this machine: DiffPure rows say so
        unet_call, diffpure_skip = None, f"DiffPure skipped: {exc}"
        print(diffpure_skip)
    fl_by_preset = {}
    for p in presets:
        fl_by_preset[p] = {"maep": flopmod.maep_flops(p), "mae_pure_step": flopmod.mae_pure_step_flops(p, 0.25),
                           "maep_train_step": flopmod.maep_train_flops(p)}
    meta["flops_per_image"] = {"diffpure_unet_call": unet_call, **{p: v for p, v in fl_by_preset.items()}}

    name = args.name or (f"e2e_{device.type}" if e2e else f"purify_{device.type}")
    writer = RowWriter(start_results(name, meta), device)
    print(f"writing {writer.json_path} row by row", flush=True)
    B = Bench(args, device, ceil, writer)
    torch.manual_seed(0)
    models = {p: create_mae(p).to(device).eval() for p in presets}
    # order: the cheap, headline comparisons first (MAEP, DiffPure, training), MAE-Pure (the slowest) last,
    # fewer steps before more; --time-limit-s skips what is left and still writes the results
    unet = None
    if e2e:
        def unet_factory():
            return (tiny_unet() if args.dry_run else __import__("maep_fast.baselines.diffpure", fromlist=["x"])
                    .ddpm_cifar10_unet()).to(device).eval()
        args.presets_list, args.batches, args.mp_batches, args.dp_batches = presets, batches, mp_batches, dp_batches
        args.train_batches, args.steps_list, args.timed_steps = train_batches, steps_list, timed_steps
        run_e2e(args, B, models, fl_by_preset, dtypes, unet_factory, unet_call, diffpure_skip)
        only = set()
    for dtype in dtypes:
        dname = str(dtype).split(".")[-1]
        for p in presets:
            if "maep" in only:
                print(f"-- MAEP {p} {dname}")
                bench_maep(B, p, models[p], dtype, batches, fl_by_preset[p], use_compile)
        if "diffpure" in only and diffpure_skip:
            B.add({"purifier": "DiffPure", "variant": "sde100", "preset": "ddpm_cifar10_unet", "dtype": dname,
                   "skipped": diffpure_skip})
        elif "diffpure" in only:
            print(f"-- DiffPure {dname}")
            if unet is None:
                from maep_fast.baselines.diffpure import ddpm_cifar10_unet

                unet = ddpm_cifar10_unet().to(device).eval()
            bench_diffpure(B, unet, dtype, dp_batches, unet_call, timed_steps)
        for p in presets:
            if "train" in only:
                print(f"-- MAEP training step {p} {dname}")
                bench_train(B, p, models[p], dtype, train_batches, fl_by_preset[p])
    del unet
    if "mae_pure" in only:
        for s in sorted(steps_list):
            for dtype in dtypes:
                for p in presets:
                    print(f"-- MAE-Pure S{s} {p} {str(dtype).split('.')[-1]}")
                    bench_mae_pure(B, p, models[p], dtype, mp_batches, fl_by_preset[p], [s])
    meta["loadavg_end"] = os.getloadavg()
    ceil_end = measure_ceilings(device, quick=q, m=ceil_m)
    best_ceil = {k: max(v, ceil_end.get(k, v)) for k, v in ceil.items()}
    meta.update(ceilings_start=ceil, ceilings_end=ceil_end, ceilings=best_ceil,
                mfu_ceiling="the larger of the matmul ceilings measured at the start and at the end of the run")
    B.finalize_mfu(best_ceil)
    meta["wall_s"] = round(time.time() - t_start, 1)
    lines = summarize(B.rows)
    meta["summary"] = lines
    if not B.rows:
        raise SystemExit(f"nothing was benchmarked (--only {args.only!r})")
    writer.finish(**meta)
    j, c = writer.json_path, writer.csv_path
    png = RESULTS / f"{name}.png"
    have_png = plot(B.rows, png, _title(writer.meta))
    print("\n== summary ==")
    for line in lines:
        print(line)
    print(f"load average start {load0} end {meta['loadavg_end']}; wall {meta['wall_s']} s")
    print(f"wrote {j}, {c}" + (f", {png}" if have_png else ""))


if __name__ == "__main__":
    main()
