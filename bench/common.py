"""Shared benchmark helpers: timing (median of repeats), device ceilings, run metadata."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 10,
            min_time: float = 0.0) -> dict:
    """Median / min / IQR wall time (ms) of ``fn`` over ``repeat`` synchronized calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iqr_ms": q[2] - q[0], "n": len(times)}


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured memory bandwidth (GB/s, large copy) and matmul throughput (TFLOP/s) of ``device``."""
    n = (1 << 24) if device.type == "cpu" else (1 << 28)
    if quick:
        n >>= 2
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, warmup=2, repeat=10)
    bw = 2 * a.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    out = {"mem_bw_GBps": bw}
    # bf16 on the CPU too: without AVX512-BF16/AMX it is emulated, and its MFU must use its own ceiling
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    m = 1024 if device.type == "cpu" else 8192
    for dt in dtypes:
        x = torch.randn(m, m, device=device, dtype=dt)
        y = torch.randn(m, m, device=device, dtype=dt)
        # both layouts, keep the faster: CPU bf16 x @ y without native bf16 runs ~20x slower than x @ y.T
        # (the nn.Linear layout), which would understate the ceiling
        ms = min(time_fn(f, device, warmup=2, repeat=5)["median_ms"] for f in (lambda: x @ y, lambda: x @ y.T))
        out[f"matmul_{str(dt).split('.')[-1]}_TFLOPs"] = 2 * m**3 / (ms * 1e-3) / 1e12
    return out


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_meta(device: torch.device) -> dict:
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cpu":
        meta["loadavg_1m"] = os.getloadavg()[0]
        try:
            meta["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    from maep_fast import native_available

    meta["native_extension"] = native_available()
    return meta


def write_results(name: str, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (meta + rows) and ``results/<name>.csv``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath, cpath = RESULTS / f"{name}.json", RESULTS / f"{name}.csv"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (list(rows[0]).index(k) if k in rows[0] else 99, k))
    with open(cpath, "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + "\n")
    return jpath, cpath


@contextlib.contextmanager
def backend_env(value: str | None):
    """Set MAEP_FAST_BACKEND for the duration (None: leave as is)."""
    if value is None:
        yield
        return
    old = os.environ.get("MAEP_FAST_BACKEND")
    os.environ["MAEP_FAST_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MAEP_FAST_BACKEND", None)
        else:
            os.environ["MAEP_FAST_BACKEND"] = old
