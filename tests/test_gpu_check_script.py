"""bench/gpu_check.sh and the benchmark plumbing it relies on (bench/common.py), proven on the CPU.

- the script parses (``bash -n``) and its CPU dry run goes through every step under the caps: a
  hanging step is cut at its cap and the run goes on, the summary and the tarball appear, the
  committed bench/results files are not touched, and the exit code follows the GPU tests only;
- results files are rewritten atomically after every row (a stopped run keeps its rows);
- a warm-up deadline interrupts the main thread and leaves no timer behind;
- the CUDA branch of ``time_fn`` (events, L2 flush, busy-wait, latency) against a fake device;
- bench_purify --replot draws a partial results file;
- bench_purify --dry-run (the e2e suite at tiny sizes on the CPU) writes every row, in the order users
  run them, each with MFU and peak-memory fields; gpu_check.sh wires the e2e, compile and precision
  steps (bench/precision_demo.py --dry-run) and keeps their results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402


def _env(**kw) -> dict:
    env = dict(os.environ)
    env.pop("MAEP_FAST_BENCH_RESULTS_DIR", None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _steps(out: Path) -> dict[str, dict]:
    rows = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, secs, cap = line.split("\t")
        rows[name] = {"status": status, "rc": rc, "seconds": int(secs), "cap": cap}
    return rows


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_steps_caps_summary_tarball(tmp_path):
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*")}
    out = tmp_path / "gc"
    t0 = time.time()
    # generous: on an idle machine the steps finish early; on a loaded one (CI shares two cores with
    # the other test worker) a step's own time limit can be overrun by the interpreter start
    total = 300
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=total + 60,
        env=_env(MAEP_FAST_GPU_CHECK_TOTAL_S=total,
                 # keep it short on two cores: the other steps' plumbing is the same
                 MAEP_FAST_GPU_CHECK_SKIP="cuda_tests,gpu_marked_tests,bench_e2e,bench_compile,precision_demo",
                 MAEP_FAST_GPU_CHECK_HANG="bench_overhead", MAEP_FAST_GPU_CHECK_CAP_bench_overhead=4,
                 MAEP_FAST_GPU_CHECK_DRYRUN_OPS="pgd_step"))
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert wall < total + 15, wall  # the deadline holds (+ interpreter start and the tarball)
    steps = _steps(out)
    # steps.tsv is in finishing order; the three test steps run side by side, after the e2e measurements
    pos = {n: i for i, n in enumerate(steps)}
    tests = [pos[n] for n in ("triton_tests", "cuda_tests", "gpu_marked_tests")]
    assert pos["env"] < pos["build"] < pos["bench_e2e"] < min(tests), list(steps)
    assert max(tests) < pos["memcheck"] < pos["bench_overhead"] < pos["bench_compile"] < pos["bench_ops"] \
        < pos["precision_demo"], list(steps)
    assert steps["bench_overhead"]["status"] == "timeout" and steps["bench_overhead"]["seconds"] <= 4 + 3
    for name in ("env", "build", "triton_tests", "memcheck", "bench_ops"):
        assert steps[name]["status"] == "ok", (name, steps[name], (out / "logs" / f"{name}.log").read_text()[-2000:])
    assert {steps[n]["status"] for n in ("cuda_tests", "gpu_marked_tests", "bench_e2e", "bench_compile", "precision_demo")} \
        == {"skipped"}
    summary = (out / "summary.txt").read_text()
    assert "CPU DRY RUN" in summary and "gpu_tests: PASSED" in summary and "git_sha:" in summary
    assert "torch:" in summary and "triton:" in summary
    ops = json.loads((out / "results" / "ops_cpu.json").read_text())
    assert ops["meta"]["complete"] is True and ops["rows"]
    # compile warm-ups were bounded (1 s each, 2 s in all): skipped with the reason, later rows still measured
    assert any("compile" in r.get("skipped", "") or "warm-up" in r.get("skipped", "") for r in ops["rows"])
    assert any(r.get("variant") == "cpp" and r.get("median_ms") for r in ops["rows"])
    with tarfile.open(out / "gpu_check.tar.gz") as tf:
        names = tf.getnames()
    assert "gc/summary.txt" in names and "gc/logs/bench_ops.log" in names and "gc/results/ops_cpu.json" in names
    # the dry run's own results (same names) went to OUT/results; bench/results keeps its files as they were
    # (only those names: other runs on this machine may write other results files meanwhile)
    ours = {p.name for p in (out / "results").glob("*")}
    assert ours
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "bench" / "results").glob("*") if p.name in ours} \
        == {p: t for p, t in committed.items() if p.name in ours}


def test_dry_run_exit_code_follows_gpu_tests(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=_env(MAEP_FAST_GPU_CHECK_DRYRUN=1, MAEP_FAST_GPU_CHECK_TOTAL_S=60,
                 MAEP_FAST_GPU_CHECK_SKIP="env,build,bench_e2e,cuda_tests,gpu_marked_tests,memcheck,bench_overhead,"
                                          "bench_compile,bench_ops,precision_demo",
                 MAEP_FAST_GPU_CHECK_HANG="triton_tests", MAEP_FAST_GPU_CHECK_CAP_triton_tests=3))
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert _steps(out)["triton_tests"]["status"] == "timeout"
    assert "gpu_tests: FAILED" in (out / "summary.txt").read_text()
    assert (out / "gpu_check.tar.gz").is_file()


def test_results_writer_rewrites_after_every_row(tmp_path):
    w = common.start_results("x_cpu", {"device": "cpu"}, directory=tmp_path)
    assert w.json_path == tmp_path / "x_cpu.json"
    assert json.loads(w.json_path.read_text()) == {"meta": w.meta, "rows": []}
    common.append_row(w, {"op": "a", "median_ms": 1.0})
    common.append_row(w, {"op": "b, with a comma", "skipped": 'said "no"'})
    data = json.loads(w.json_path.read_text())
    assert [r["op"] for r in data["rows"]] == ["a", "b, with a comma"] and data["meta"]["complete"] is False
    assert data["meta"]["rows_written"] == 2
    import csv

    rows = list(csv.DictReader(w.csv_path.open()))
    assert rows[1]["op"] == "b, with a comma" and rows[1]["skipped"] == 'said "no"' and rows[0]["median_ms"] == "1.0"
    w.finish(wall_s=3)
    assert json.loads(w.json_path.read_text())["meta"]["complete"] is True
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_write_results_still_works(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    j, c = common.write_results("old_cpu", {"a": 1}, [{"k": 1}, {"k": 2, "m": 3}])
    assert json.loads(j.read_text())["rows"][1] == {"k": 2, "m": 3}
    assert c.read_text().splitlines() == ["k,m", "1,", "2,3"]


def test_deadline_interrupts_and_clears():
    t0 = time.perf_counter()
    with pytest.raises(common.CompileTimeout):
        common.timed_warmup(lambda: time.sleep(5), torch.device("cpu"), 0.2)
    assert time.perf_counter() - t0 < 2
    import signal

    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert common.timed_warmup(lambda: None, torch.device("cpu"), 5) < 1
    assert not issubclass(common.CompileTimeout, Exception)  # torch.compile's `except Exception` cannot swallow it


def test_time_fn_cpu_keys():
    t = common.time_fn(lambda: torch.ones(8).sum(), torch.device("cpu"), warmup=1, repeat=5)
    assert t["n"] == 5 and t["median_ms"] == t["latency_ms"] and t["kernel_ms"] is None
    assert {"median_ms", "min_ms", "iqr_ms", "n"} <= set(t)


class _FakeEvent:
    def __init__(self, log):
        self.log, self.t = log, None

    def record(self):
        self.log.append("record")
        self.t = len([x for x in self.log if x in ("call", "flush", "sleep")])

    def elapsed_time(self, other):
        return float(other.t - self.t)  # "ms" = device work items between the two events

    def query(self):
        return False

    def synchronize(self):
        pass


class _FakeCuda:
    def __init__(self):
        self.log = []

    def event(self):
        return _FakeEvent(self.log)

    def synchronize(self):
        self.log.append("sync")

    def flush(self):
        self.log.append("flush")

    def sleep(self, ms):
        self.log.append("sleep")
        self.slept = ms


def test_time_fn_cuda_branch_with_a_fake_device():
    fake = _FakeCuda()
    t = common.time_fn(lambda: fake.log.append("call"), torch.device("cuda"), warmup=2, repeat=4, latency_repeat=3,
                       _cuda=fake)
    log = fake.log
    # the busy-wait comes before the first timed call; every timed call has a flush before its start event
    first_sleep = log.index("sleep")
    timed = log[first_sleep:]
    assert timed.count("flush") == 4
    assert t["n"] == 4 and t["kernel_ms"] == t["median_ms"] == 1.0  # the flush stays outside the events
    assert t["latency_n"] == 3 and t["latency_ms"] is not None and t["host_bound"] is False
    # each latency call is fenced by synchronizes; 2 warm-up + 1 sizing + 4 timed + 3 latency calls
    assert log.count("call") == 2 + 1 + 4 + 3
    assert log[-2:] == ["call", "sync"]
    t2 = common.time_fn(lambda: fake.log.append("call"), torch.device("cuda"), warmup=0, repeat=2, target_ms=10,
                        max_repeat=7, flush=False, latency_repeat=0, _cuda=fake)
    assert t2["n"] == 7 and t2["latency_ms"] is None  # raised to fill target_ms, capped by max_repeat


def test_replot_draws_a_partial_file(tmp_path):
    pytest.importorskip("matplotlib")
    w = common.start_results("purify_partial", {"device": "cpu", "device_type": "cpu", "torch": torch.__version__,
                                                "git_sha": "x", "torch_threads": 1, "loadavg_start": [1.0, 1, 1]},
                             directory=tmp_path)
    for b, ips in ((1, 10.0), (8, 40.0)):
        common.append_row(w, {"purifier": "MAEP", "preset": "demo", "dtype": "float32", "variant": "fused",
                              "batch": b, "images_per_s": ips})
    common.append_row(w, {"purifier": "MAEP", "preset": "demo", "dtype": "float32", "variant": "compile", "batch": 1,
                          "skipped": "compile warm-up exceeded 1 s"})
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_purify.py"), "--replot", str(w.json_path)],
                   check=True, cwd=ROOT, capture_output=True, timeout=120)
    assert (tmp_path / "purify_partial.png").stat().st_size > 1000


# ------------------------------------------------------------------ the e2e suite's dry run
E2E_ORDER = [  # (stage, purifier, variant, batch) in the order of the suite
    ("maep", "MAEP", "eager", 2), ("maep", "MAEP", "fused", 2), ("maep", "MAEP", "eager", 4), ("maep", "MAEP", "fused", 4),
    ("diffpure", "DiffPure", "sde100", 2), ("diffpure", "DiffPure", "one_step", 2), ("diffpure", "DiffPure", "ddim5", 2),
    ("mae_pure", "MAE-Pure", "fused", 2), ("mae_pure", "MAE-Pure", "fused+graph", 2),
    ("mae_pure", "MAE-Pure", "reference", 2),
    ("train", "MAEP-train", "fused+pgd2", 2),
    ("compile", "MAEP", "compile", 2), ("compile", "MAEP", "fused+compile", 2),
    ("compile", "MAEP", "compile", 4), ("compile", "MAEP", "fused+compile", 4),
]


def test_bench_purify_dry_run_writes_every_row_in_order(tmp_path):
    pytest.importorskip("diffusers")
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_purify.py"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=_env(MAEP_FAST_BENCH_RESULTS_DIR=tmp_path, OMP_NUM_THREADS=1))
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "e2e_dryrun_cpu.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert meta["complete"] is True and meta["dry_run"] is True and meta["suite"] == "e2e"
    assert meta["ceilings"]["matmul_float32_TFLOPs"] > 0 and "peak_mem_MB is null on the CPU" in meta["memory_method"]
    assert meta["compile_backend"] == "eager"
    got = [(r["stage"], r["purifier"], r["variant"], r["batch"]) for r in rows if "purifier" in r]
    assert got == E2E_ORDER
    for r in rows:
        assert "mfu" in r and "peak_mem_MB" in r and "stage" in r, r
        assert not r.get("skipped") and not r.get("error"), r
    for r in rows:
        if "purifier" not in r:
            continue
        assert r["median_ms"] > 0 and r["images_per_s"] > 0 and r["gflop_per_image"] > 0, r
        assert 0 < r["mfu"] < 5 and r["peak_mem_MB"] is None and r["cpu_rss_growth_MB"] is not None, r
    mp = [r for r in rows if r.get("purifier") == "MAE-Pure"]
    assert all(r["steps"] == 4 and r["steps_timed"] == 2 and r["extrapolated"] for r in mp)
    assert "CPU stand-in" in mp[1]["capture"]
    sde = rows[4]
    assert sde["extrapolated"] and sde["network_calls"] == 100 and sde["timed_network_calls"] == 1
    assert rows[10]["pgd_steps"] == 2
    ops = rows[len(E2E_ORDER):]
    assert ops and all(r["stage"] == "ops" and r["op"] == "pgd_step" and r["median_ms"] > 0 for r in ops)
    assert {r["variant"] for r in ops} >= {"eager"}
    csv_head = (tmp_path / "e2e_dryrun_cpu.csv").read_text().splitlines()[0].split(",")
    assert {"stage", "mfu", "peak_mem_MB", "images_per_s"} <= set(csv_head)
    print(f"dry run wall {wall:.1f} s, measured {meta['wall_s']} s")
    assert meta["wall_s"] < 120  # ~30 s on two shared cores


def test_gpu_check_dry_run_runs_the_bench_steps(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "gc"
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400,
        env=_env(MAEP_FAST_GPU_CHECK_TOTAL_S=300, OMP_NUM_THREADS=1,
                 MAEP_FAST_GPU_CHECK_SKIP="env,build,triton_tests,cuda_tests,gpu_marked_tests,memcheck,bench_overhead,"
                                          "bench_ops"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = _steps(out)
    for name in ("bench_e2e", "bench_compile", "precision_demo"):
        assert steps[name]["status"] == "ok", (name, steps[name], (out / "logs" / f"{name}.log").read_text()[-2000:])
    e2e = json.loads((out / "results" / "e2e_cpu.json").read_text())
    assert e2e["meta"]["complete"] and [r["stage"] for r in e2e["rows"]][:1] == ["maep"]
    assert {r["stage"] for r in e2e["rows"]} == {"maep", "diffpure", "mae_pure", "train"}
    comp = json.loads((out / "results" / "e2e_compile_cpu.json").read_text())
    assert {r["variant"] for r in comp["rows"]} == {"compile", "fused+compile"}
    prec = json.loads((out / "results" / "precision_demo_cpu.json").read_text())
    assert {r["precision"] for r in prec["rows"]} == {"fp32", "bf16"} and prec["meta"]["complete"]
    assert all("diff_points" in r for r in prec["rows"] if r["precision"] == "bf16")


def test_append_record_names_the_machine_and_appends_one_line(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    common.append_record({"name": "a", "clean": 1.0}, out, threads=1)
    common.append_record({"name": "b", "machine": "given"}, out, threads=2)
    common.append_record({"name": "c"}, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["name"] for r in lines] == ["a", "b", "c"]
    assert lines[0]["machine"] == f"CPU, torch {torch.__version__}, 1 thread(s)"
    assert lines[1]["machine"] == "given" and "machine" not in lines[2]
    assert capsys.readouterr().out.splitlines()[0] == json.dumps(lines[0])


def test_train_timed_trains_evals_and_saves_with_the_recipe(tmp_path):
    from maep_fast import load_model
    from maep_fast.models.classifiers import SmallCNN

    model = SmallCNN(in_chans=1, num_classes=10).train()
    calls = []
    out, seconds = common.train_timed(model, lambda: calls.append(1) or "history", str(tmp_path / "m"),
                                      {"lr": 0.5})
    assert out == "history" and calls == [1] and isinstance(seconds, int) and seconds >= 0
    assert not model.training
    assert json.loads((tmp_path / "m" / "config.json").read_text())["meta"]["recipe"] == {"lr": 0.5}
    loaded = load_model(tmp_path / "m", expect_kind="classifier")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    model.train()
    common.train_timed(model, lambda: None)  # no save: nothing written
    assert not model.training and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
