"""Shared benchmark helpers: timing (CUDA events + latency; CPU wall clock), warm-up deadlines,
device ceilings, run metadata, and results files written row by row."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import torch

# MAEP_FAST_BENCH_RESULTS_DIR redirects every results file (bench/gpu_check.sh's CPU dry run uses it so
# the committed bench/results/*_cpu.* files are left alone)
RESULTS = Path(os.environ.get("MAEP_FAST_BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iqr_ms": q[2] - q[0], "n": len(times)}


class _CudaTiming:
    """What the CUDA branch of ``time_fn`` needs from the device (a class so a test can fake it).

    ``flush()`` zeroes a 256 MB buffer (more than any L2: H100/H200 have 50 MB), ``sleep(ms)``
    enqueues a GPU busy-wait (``torch.cuda._sleep``, calibrated once per device) that holds the
    stream while the host enqueues the timed calls.
    """

    FLUSH_BYTES = 256 << 20
    _state: dict = {}

    def __init__(self, device: torch.device):
        self.device = device
        key = (device.type, device.index)
        if key not in self._state:
            self._state[key] = {"buf": None, "cycles_per_ms": self._calibrate()}
        self.st = self._state[key]

    def _calibrate(self) -> float:
        torch.cuda.synchronize(self.device)
        cycles = 10_000_000
        torch.cuda._sleep(cycles // 10)  # first call loads the kernel
        a, b = self.event(), self.event()
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        return cycles / max(a.elapsed_time(b), 1e-3)

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        if self.st["buf"] is None:  # allocated on first use: runs that never flush (bench_purify) never hold it
            self.st["buf"] = torch.empty(self.FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self.st["buf"].zero_()

    def sleep(self, ms: float) -> None:
        if ms > 0:
            torch.cuda._sleep(int(ms * self.st["cycles_per_ms"]))


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 10,
            min_time: float = 0.0, *, flush: bool = True, target_ms: float | None = None,
            max_repeat: int = 1000, latency_repeat: int | None = None, max_sleep_ms: float = 250.0,
            _cuda: "_CudaTiming | None" = None) -> dict:
    """Time ``fn``; every duration is in ms.

    CPU: wall clock of ``repeat`` calls (at least ``min_time`` s in all); ``median_ms`` =
    ``latency_ms``, ``kernel_ms`` is None.

    CUDA (kernel time beside latency):

    - ``kernel_ms`` (= ``median_ms``, ``min_ms``, ``iqr_ms``, ``n``): CUDA events around each of
      ``n`` back-to-back calls, none synchronized, with the L2 flushed (a 256 MB ``zero_``) before
      each, as ``triton.testing.do_bench`` does. Before the first call a GPU busy-wait sized to
      the host's enqueue time of all ``n`` calls is put on the stream, so the host has enqueued
      them before the GPU reaches them and the events see device time only, not host gaps.
      ``n`` = ``repeat``, raised to fill ``target_ms`` (and ``min_time``) of device time, at most
      ``max_repeat``. ``host_bound`` is True when the GPU had already finished the busy-wait when
      the host finished enqueuing (``fn`` synchronizes, or its host cost outran the wait): then
      the event times may include host gaps.
    - ``latency_ms`` (``latency_min_ms``, ``latency_n``): wall clock per call with a synchronize
      before and after each call: what one call costs a caller who waits for it, host cost
      included. ``latency_repeat`` calls (default ``repeat``; 0 skips it).
    """
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        times = []
        start = time.perf_counter()
        while len(times) < repeat or (time.perf_counter() - start) < min_time:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out = _summary(times)
        out.update(kernel_ms=None, latency_ms=out["median_ms"], method="cpu wall clock per call")
        return out

    cu = _cuda or _CudaTiming(device)
    for _ in range(warmup):
        fn()
    # one call, enqueued without waiting: its host time and its device time size the loop
    cu.synchronize()
    e0, e1 = cu.event(), cu.event()
    h0 = time.perf_counter()
    e0.record()
    fn()
    e1.record()
    host_ms = (time.perf_counter() - h0) * 1e3
    cu.synchronize()
    est_ms = max(e0.elapsed_time(e1), 1e-3)
    want_ms = max(target_ms or 0.0, min_time * 1e3)
    n = max(1, repeat)
    if want_ms > 0:
        n = max(n, min(max_repeat, int(math.ceil(want_ms / est_ms))))
    starts = [cu.event() for _ in range(n)]
    ends = [cu.event() for _ in range(n)]
    sleep_done = cu.event()
    cu.synchronize()
    cu.sleep(min(max_sleep_ms, 1.5 * n * host_ms + 0.2))
    sleep_done.record()
    for i in range(n):
        if flush:
            cu.flush()
        starts[i].record()
        fn()
        ends[i].record()
    host_bound = bool(sleep_done.query())  # GPU already past the wait: it may have waited on the host
    cu.synchronize()
    out = _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])
    out.update(kernel_ms=out["median_ms"], host_bound=host_bound, flush_l2=flush,
               method="cuda events, back-to-back calls" + (", L2 flushed before each" if flush else ""))
    m = repeat if latency_repeat is None else latency_repeat
    lat = []
    for _ in range(m):
        cu.synchronize()
        t0 = time.perf_counter()
        fn()
        cu.synchronize()
        lat.append((time.perf_counter() - t0) * 1e3)
    if lat:
        out.update(latency_ms=statistics.median(lat), latency_min_ms=min(lat), latency_n=len(lat))
    else:
        out.update(latency_ms=None, latency_n=0)
    return out


class CompileTimeout(BaseException):
    """Raised in the main thread when a warm-up outlives its deadline. A BaseException, like
    KeyboardInterrupt, so that torch.compile's own ``except Exception`` handlers do not swallow it
    (and fall back to eager)."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise :class:`CompileTimeout` in the main thread after ``seconds`` (None or <= 0: no limit;
    outside the main thread, where signals cannot be delivered, no limit either)."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise CompileTimeout(f"warm-up exceeded {seconds:.3g} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed_warmup(fn: Callable[[], object], device: torch.device, limit_s: float | None = None) -> float:
    """Run ``fn`` once (compile, allocate, autotune) under :func:`deadline`; seconds it took.
    Raises :class:`CompileTimeout` past ``limit_s``; after a timeout dynamo's caches are reset, so a
    half-finished compile does not poison later configs."""
    t0 = time.perf_counter()
    try:
        with deadline(limit_s):
            fn()
            sync(device)
    except CompileTimeout:
        reset_compile_state(device)
        raise
    return time.perf_counter() - t0


def reset_compile_state(device: torch.device | None = None) -> None:
    """Forget every compiled graph (after an interrupted compile) and wait for the device."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001  best effort
        pass
    if device is not None and device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001
            pass


def measure_ceilings(device: torch.device, quick: bool = False, m: int | None = None) -> dict:
    """Measured memory bandwidth (GB/s, large copy) and matmul throughput (TFLOP/s) of ``device``
    (``m``: the square matmul's size; default 1024 on the CPU, 8192 on CUDA)."""
    n = (1 << 24) if device.type == "cpu" else (1 << 28)
    if quick:
        n >>= 2
    a = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, warmup=2, repeat=10, latency_repeat=0)
    bw = 2 * a.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9
    out = {"mem_bw_GBps": bw}
    # bf16 on the CPU too: without AVX512-BF16/AMX it is emulated, and its MFU must use its own ceiling
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.float32, torch.bfloat16, torch.float16]
    if m is None:
        m = 1024 if device.type == "cpu" else 8192
    for dt in dtypes:
        x = torch.randn(m, m, device=device, dtype=dt)
        y = torch.randn(m, m, device=device, dtype=dt)
        # both layouts, keep the faster: CPU bf16 x @ y without native bf16 runs ~20x slower than x @ y.T
        # (the nn.Linear layout), which would understate the ceiling
        ms = min(time_fn(f, device, warmup=2, repeat=5, latency_repeat=0)["median_ms"] for f in (lambda: x @ y, lambda: x @ y.T))
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


def _csv_text(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))  # the first row's columns first, then new ones as they appear

    def cell(v) -> str:
        if v is None:
            return ""
        v = str(v)
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n') else v

    return "".join(",".join(cell(r.get(k)) for k in keys) + "\n" for r in [dict(zip(keys, keys))] + rows)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and os.replace: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResultsWriter:
    """``results/<name>.json`` ({"meta", "rows"}) and ``.csv``, rewritten atomically after every row.

    ``meta["complete"]`` is False until :meth:`finish`; a run stopped at any point leaves every
    row appended so far, in both files.
    """

    def __init__(self, name: str, meta: dict, directory: Path | str | None = None):
        self.dir = Path(directory) if directory is not None else RESULTS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.json_path = self.dir / f"{name}.json"
        self.csv_path = self.dir / f"{name}.csv"
        self.meta = dict(meta)
        self.meta.setdefault("complete", False)
        self.meta.setdefault("started_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.rows: list[dict] = []
        self._t0 = time.time()
        self.flush()

    def flush(self) -> None:
        self.meta["rows_written"] = len(self.rows)
        self.meta["elapsed_s"] = round(time.time() - self._t0, 1)
        _atomic_write(self.json_path, json.dumps({"meta": self.meta, "rows": self.rows}, indent=2, default=str))
        _atomic_write(self.csv_path, _csv_text(self.rows))

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        self.flush()

    def update_meta(self, **kw) -> None:
        self.meta.update(kw)
        self.flush()

    def finish(self, **kw) -> None:
        self.meta.update(kw)
        self.meta["complete"] = True
        self.flush()


def start_results(name: str, meta: dict, directory: Path | str | None = None) -> ResultsWriter:
    """Create (truncate) ``results/<name>.json`` / ``.csv`` with ``meta`` and no rows yet."""
    return ResultsWriter(name, meta, directory)


def append_row(writer: ResultsWriter, row: dict) -> None:
    """Append one row and rewrite both files atomically."""
    writer.append(row)


def write_results(name: str, meta: dict, rows: list[dict]) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` (meta + rows) and ``results/<name>.csv`` in one go."""
    w = ResultsWriter(name, meta)
    w.rows = list(rows)
    w.finish()
    return w.json_path, w.csv_path


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


def digits_setup(classifier: str, threads: int, split_seed: int = 0):
    """For the recipe sweeps: ``threads`` torch threads, the classifier checkpoint loaded frozen
    (eval mode, no gradients), the 16x16 digits train and test splits of partition ``split_seed``
    (0: the demo's), torch seed 0. Returns (classifier, train, test)."""
    from maep_fast import load_model
    from maep_fast.data import load_digits_dataset
    from maep_fast.train.common import set_seed

    torch.set_num_threads(threads)
    clf = load_model(classifier, expect_kind="classifier").eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    train, test = load_digits_dataset(16, "train", seed=split_seed), load_digits_dataset(16, "test", seed=split_seed)
    set_seed(0)
    return clf, train, test


def append_record(record: dict, path: str | Path, threads: int | None = None) -> None:
    """For the recipe sweeps: names the machine (CPU, torch version, ``threads``) unless the record
    already does, prints the record as one JSON line and appends it to ``path``."""
    if threads is not None:
        record.setdefault("machine", f"CPU, torch {torch.__version__}, {threads} thread(s)")
    line = json.dumps(record)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def train_timed(model: torch.nn.Module, train: Callable[[], object], save: str | None = None,
                recipe: dict | None = None) -> tuple[object, int]:
    """For the recipe sweeps: runs ``train()`` (which trains ``model`` in place), puts the model in eval
    mode and, with ``save``, writes it as a checkpoint whose meta holds ``recipe``; returns (train()'s
    result, wall seconds of the training)."""
    from maep_fast.checkpoint import save_model

    t0 = time.time()
    out = train()
    seconds = round(time.time() - t0)
    model.eval()
    if save:
        save_model(model, save, meta={"recipe": recipe or {}})
    return out, seconds
