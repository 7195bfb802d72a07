#!/usr/bin/env bash
# One command for one H100/H200, from a fresh clone, in at most 9.5 minutes:
#
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Needs a Python with torch (CUDA), triton, pytest and hypothesis (pytest-xdist and pytest-timeout
# are used when present). Steps, in this order, each under `timeout` with its own cap; the
# measurements come first (right after the build), so a run cut short still has them:
#
#   env            device, driver, versions, git sha                        -> OUT_DIR/env.txt
#   wheels         pip install --no-index --no-deps WHEEL_DIR/*.whl (diffusers, torchattacks, ...)
#   build          MAEP_FAST_CUDA=1 MAEP_FAST_CUDA_ARCHS=<this GPU> pip install -e . (alone on the machine)
#   bench_e2e      python3 bench/bench_purify.py --suite e2e (ViT-B/4 bf16), rows in the order users run
#                  them: MAEP eager / fused at B128 and B512; DiffPure SDE-100 (20 timed steps, scaled),
#                  one-step, DDIM-5 at B128; MAE-Pure S150 fused, fused+graph, reference at B32 (20 timed
#                  steps, scaled); the MAEP training step with PGD-10 pair generation
#   triton_tests   tests/ops/*/test_*_triton.py                      } the three test steps run side by
#   cuda_tests     tests/ops/*/test_*_gpu.py tests/test_gpu_backends.py tests/test_mae_pure_cuda_graph.py
#                  tests/test_fused_vs_reference.py
#   gpu_marked_tests  `-m gpu` of every other test file that marks GPU tests  } side, after bench_e2e
#   memcheck       compute-sanitizer --tool memcheck python3 bench/memcheck_ops.py (the CUDA kernels)
#   bench_overhead python3 bench/bench_overhead.py --device cuda
#   bench_compile  bench_purify.py --suite e2e --stages compile: MAEP compile(reference) and fused+compile
#   bench_ops      python3 bench/bench_ops.py (every GPU shape, bf16 + fp32, attention bf16, compile)
#   precision_demo python3 bench/precision_demo.py: the demo's evaluation rows under fp32 and bf16
#                  (needs the demo's checkpoints: MAEP_FAST_DEMO_RUN, default runs/demo; skipped without)
#
# Every bench row is written to its results file the moment it is measured (e2e_cuda.json/.csv,
# e2e_compile_cuda.*, ops_cuda.*, precision_demo_cuda.*), with MFU against the matmul ceiling
# measured in the same run and torch.cuda.max_memory_allocated as peak_mem_MB.
#
# Caps (seconds; the run's deadline is MAEP_FAST_GPU_CHECK_TOTAL_S, default 570: the device tool
# stops a command at 600). A step gets min(its cap, the time left before its end-by point), where
# each end-by point keeps the reserves (guaranteed minimum seconds) of the steps after it;
# `timeout -k 5` adds at most 5 s of grace per step. So the run always ends in time, and a step
# that finishes early gives its time to the later ones.
#
#   step             cap  reserve  must end by (s after start, TOTAL = 570)
#   env               20      -    -
#   wheels            40      -    -
#   build            150      -    115
#   bench_e2e        150    100    220  (its own --time-limit-s: cap - 20)
#   triton_tests     210     90    315  } side by side
#   cuda_tests       150     90    315  }
#   gpu_marked_tests 150     90    315  }
#   memcheck          50     20    340
#   bench_overhead    45     25    370
#   bench_compile    120     60    435  (its own --time-limit-s: cap - 20)
#   bench_ops        150     50    490  (its own --time-limit-s: cap - 20)
#   precision_demo   120     60    555
#   summary, tarball   -     10    570  (+ a replot of a cut e2e run, if time is left)
#
# Measured on one H200 (2026-11-29, bench/gpu_runs/2026-11-29-s4), before this order: build 80-99 s
# beside the Triton tests, Triton tests 168 s (-n 6), CUDA files 65-83 s (-n 6), GPU-marked tests
# of the other files 62 s (-n 3), memcheck 16 s, bench_overhead 26 s (300 calls x 5 rounds). The
# test steps now get what the benches leave (at least 90 s): a cut test step is reported as such.
#
# Override a cap with MAEP_FAST_GPU_CHECK_CAP_<step>=N. Every log goes to OUT_DIR/logs, every results
# file to OUT_DIR/results (and, on a GPU, to bench/results/*_cuda.*), the per-step table to
# OUT_DIR/summary.txt, everything to OUT_DIR/gpu_check.tar.gz. A failing or timed-out step never stops
# the run; the exit code is nonzero only when the GPU tests failed (or did not finish).
#
# CPU dry run (proves the plumbing without a GPU; every step runs a tiny CPU stand-in, nothing is
# installed or built, and bench/results is left alone):
#   MAEP_FAST_GPU_CHECK_DRYRUN=1 bash bench/gpu_check.sh /tmp/gc      # or: bash bench/gpu_check.sh --dry-run /tmp/gc
set -u
set -o pipefail

DRY="${MAEP_FAST_GPU_CHECK_DRYRUN:-0}"
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run|--cpu-smoke) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u$/p' "$0" | sed '$d'; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
if (( ${#ARGS[@]} < 1 )); then
  echo "usage: bash bench/gpu_check.sh [--dry-run] OUT_DIR [WHEEL_DIR]" >&2
  exit 2
fi
OUT_ARG="${ARGS[0]}"
WHEELS="${ARGS[1]:-}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
mkdir -p "$OUT_ARG/logs" "$OUT_ARG/results" || exit 2
OUT="$(cd "$OUT_ARG" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY" == "1" ]]; then
  TOTAL="${MAEP_FAST_GPU_CHECK_TOTAL_S:-150}"
  export MAEP_FAST_BENCH_RESULTS_DIR="$OUT/results"   # never touch the committed bench/results files
  export CUDA_VISIBLE_DEVICES=""                       # a CPU run even where a GPU exists
else
  TOTAL="${MAEP_FAST_GPU_CHECK_TOTAL_S:-480}"
fi
# Reserves (seconds kept for a later step while earlier steps run: its guaranteed minimum), the grace
# `timeout -k` gives a step after its cap, and the time kept for the summary and the tarball.
if [[ "$DRY" == "1" ]]; then  # scaled to the (short) dry-run total
  R_MEMCHECK=$(( TOTAL * 4 / 100 )); R_OVERHEAD=$(( TOTAL * 4 / 100 )); R_COMPILE=$(( TOTAL * 8 / 100 ))
  R_OPS=$(( TOTAL * 8 / 100 )); R_PRECISION=$(( TOTAL * 10 / 100 )); R_TESTS=$(( TOTAL * 10 / 100 ))
  R_E2E=$(( TOTAL * 25 / 100 )); GRACE=2; FINAL_RESERVE=5
else
  R_MEMCHECK=20; R_OVERHEAD=25; R_COMPILE=60; R_OPS=50; R_PRECISION=60; R_TESTS=90; R_E2E=100
  GRACE=5; FINAL_RESERVE=10
fi
DEADLINE=$(( TOTAL - FINAL_RESERVE - GRACE ))   # every step (its kill grace included) ends by then
TESTS_END_BY=$(( DEADLINE - R_MEMCHECK - R_OVERHEAD - R_COMPILE - R_OPS - R_PRECISION - 5 * GRACE ))
E2E_END_BY=$(( TESTS_END_BY - R_TESTS - GRACE ))
BUILD_END_BY=$(( E2E_END_BY - R_E2E - GRACE ))
T0=$(date +%s)
SUMMARY_TSV="$OUT/steps.tsv"
: > "$SUMMARY_TSV"
NOTES="$OUT/notes.txt"
: > "$NOTES"

now() { echo $(( $(date +%s) - T0 )); }
note() { echo "[$(now)s] $*" | tee -a "$NOTES"; }

cap_of() {  # cap_of STEP DEFAULT -> the override or the default
  local v="MAEP_FAST_GPU_CHECK_CAP_$1"
  echo "${!v:-$2}"
}

# run_step NAME CAP END_BY -- CMD...   (END_BY: seconds since start by which the step must end)
# Runs CMD under `timeout` with min(CAP, END_BY - now) seconds, logs to OUT/logs/NAME.log, appends
# "NAME<TAB>status<TAB>rc<TAB>seconds<TAB>cap" to steps.tsv; returns CMD's exit code.
run_step() {
  local name="$1" cap="$2" end_by="$3"; shift 4
  local t now_s left rc status log="$OUT/logs/$name.log"
  if [[ ",${MAEP_FAST_GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    record "$name" "skipped" "MAEP_FAST_GPU_CHECK_SKIP"
    echo "skipped: MAEP_FAST_GPU_CHECK_SKIP" > "$log"
    return 0
  fi
  now_s=$(now)
  left=$(( end_by - now_s ))
  (( left < cap )) && cap=$left
  if (( cap < 3 )); then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "no-time" "-" "0" "$cap" >> "$SUMMARY_TSV"
    note "skip $name: no time left (deadline)"
    echo "skipped: no time left before the deadline" > "$log"
    return 125
  fi
  if [[ "$DRY" == "1" && ",${MAEP_FAST_GPU_CHECK_HANG:-}," == *",$name,"* ]]; then
    set -- sleep 600   # test hook (dry run only): a step that hangs, to prove the cap and the run going on
  fi
  local desc="$*"
  if [[ "$1" == bash && "${2:-}" == -c ]]; then
    desc="bash -c <$(sed -n 's/^\([a-z_]*\) ().*/\1/p' <<< "$3" | head -1)> ${*:4}"
  fi
  desc="${desc//$'\n'/ }"
  note "start $name (cap ${cap}s): ${desc:0:300}"
  t=$(date +%s)
  { echo "# $name: $*"; echo "# cap ${cap}s, started at +${now_s}s"; } > "$log"
  timeout -k "$GRACE" "$cap" "$@" >> "$log" 2>&1
  rc=$?
  t=$(( $(date +%s) - t ))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$t" "$cap" >> "$SUMMARY_TSV"
  note "end $name: $status (rc $rc, ${t}s of ${cap}s)"
  return $rc
}

record() {  # record NAME STATUS [NOTE]: a step that ran no command
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "-" "0" "-" >> "$SUMMARY_TSV"
  note "$1: $2${3:+ ($3)}"
}

copy_results() {  # results of the bench steps -> OUT/results (on a GPU they are written to bench/results)
  [[ "$DRY" == "1" ]] && return 0
  cp -f "$ROOT"/bench/results/*_cuda*.json "$ROOT"/bench/results/*_cuda*.csv "$ROOT"/bench/results/*_cuda*.png \
    "$OUT/results/" 2>/dev/null || true
}


# ------------------------------------------------------------------ env
env_info() {
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $([[ "$DRY" == "1" ]] && echo 'CPU dry run' || echo GPU)"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc 2>/dev/null)"
  echo "git_sha: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "git_dirty_files: $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)"
  if command -v nvidia-smi >/dev/null 2>&1 && [[ "$DRY" != "1" ]]; then
    echo "nvidia_smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
    nvidia-smi 2>&1
  else
    echo "nvidia_smi: none"
  fi
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
  "$PY" - <<'PYEOF' 2>&1
import platform
import torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", torch.cuda.get_device_name(0), "capability:", torch.cuda.get_device_capability(0),
          "SMs:", p.multi_processor_count, "memory_GB:", round(p.total_memory / 1e9, 1))
from importlib import metadata, util
for m, dist in (("triton", "triton"), ("pytest", "pytest"), ("hypothesis", "hypothesis"), ("xdist", "pytest-xdist"),
                ("pytest_timeout", "pytest-timeout"), ("diffusers", "diffusers"), ("torchattacks", "torchattacks"),
                ("timm", "timm"), ("numpy", "numpy")):
    if util.find_spec(m) is None:
        print(f"{m}: MISSING")
        continue
    try:
        print(f"{m}:", metadata.version(dist))
    except metadata.PackageNotFoundError:
        print(f"{m}: present")
PYEOF
}
run_step env "$(cap_of env 20)" "$DEADLINE" -- bash -c "$(declare -f env_info); DRY='$DRY' PY='$PY' ROOT='$ROOT' env_info"
cp -f "$OUT/logs/env.log" "$OUT/env.txt" 2>/dev/null

# ------------------------------------------------------------------ wheels
if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  whl=("$WHEELS"/*.whl)
  shopt -u nullglob
  if (( ${#whl[@]} == 0 )); then
    record wheels "skipped" "no *.whl in $WHEELS"
  elif [[ "$DRY" == "1" ]]; then
    run_step wheels "$(cap_of wheels 40)" "$DEADLINE" -- "$PY" -m pip install --dry-run --no-index --no-deps "${whl[@]}"
  else
    install_wheels() {
      "$PY" -m pip install --no-index --no-deps "$@" && return 0
      echo "# plain install failed; retrying with --break-system-packages (an externally managed Python)"
      "$PY" -m pip install --no-index --no-deps --break-system-packages "$@"
    }
    run_step wheels "$(cap_of wheels 40)" "$DEADLINE" -- bash -c "$(declare -f install_wheels); PY='$PY' install_wheels \"\$@\"" _ "${whl[@]}"
  fi
else
  record wheels "skipped" "no WHEEL_DIR given"
fi
# which optional modules this Python has (find_spec: nothing is imported)
HAVE="$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('diffusers', 'torchattacks', 'xdist', 'pytest_timeout') if u.find_spec(m)))" 2>/dev/null)"
for pkg in diffusers torchattacks; do
  [[ " $HAVE " == *" $pkg "* ]] || note "$pkg is not installed: the steps that need it say so and go on (DiffPure rows are recorded as skipped)"
done

# ------------------------------------------------------------------ build || triton tests, then cuda tests
XDIST=()
[[ " $HAVE " == *" xdist "* ]] && XDIST=(-n "${MAEP_FAST_GPU_CHECK_WORKERS:-6}")
PTO=()
[[ " $HAVE " == *" pytest_timeout "* ]] && PTO=(--timeout 240)
[[ "$DRY" == "1" ]] && XDIST=()   # two shared cores: one process
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra "${XDIST[@]}" "${PTO[@]}")

shopt -s nullglob
TRITON_FILES=(tests/ops/*/test_*_triton.py)
shopt -u nullglob
CUDA_FILES=()
for f in tests/ops/*/test_*_gpu.py tests/test_gpu_backends.py tests/test_mae_pure_cuda_graph.py tests/test_fused_vs_reference.py; do
  [[ -f "$f" ]] && CUDA_FILES+=("$f")
done
EXTRA_FILES=()
for f in $(grep -lE "pytest\.mark\.gpu|mark\.gpu\b|^gpu = pytest\.mark\.gpu|GPU_ONLY|GPU_MODULE_MARKS" tests/test_*.py tests/ops/*/test_*.py 2>/dev/null); do
  case " ${TRITON_FILES[*]} ${CUDA_FILES[*]} " in *" $f "*) ;; *) EXTRA_FILES+=("$f") ;; esac
done
note "test files: triton ${TRITON_FILES[*]}; cuda ${CUDA_FILES[*]}; other files with GPU marks (-m gpu): ${EXTRA_FILES[*]:-none}"

if [[ "$DRY" == "1" ]]; then
  ARCH="none"
  BUILD_CMD=("$PY" -c "import maep_fast, maep_fast.ops; from maep_fast import native_available; print('dry run: not rebuilding; native extension present:', native_available())")
  TEST_SEL=(-m gpu)   # on the CPU every GPU test skips: the selection, collection and reporting are what is proven
else
  ARCH="${MAEP_FAST_CUDA_ARCHS:-}"
  if [[ -z "$ARCH" ]]; then
    ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  fi
  if [[ -z "$ARCH" ]]; then
    ARCH="$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")' 2>/dev/null)"
  fi
  [[ -z "$ARCH" ]] && ARCH="80;90"
  build_ext() {
    MAEP_FAST_CUDA=1 MAEP_FAST_CUDA_ARCHS="$ARCH" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
      > "$OUT/logs/build.pip.log" 2>&1
    local rc=$?
    cat "$OUT/logs/build.pip.log"
    if (( rc != 0 )) && grep -q "externally-managed" "$OUT/logs/build.pip.log"; then
      echo "# retrying with --break-system-packages"
      MAEP_FAST_CUDA=1 MAEP_FAST_CUDA_ARCHS="$ARCH" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
        --break-system-packages -e .
      rc=$?
    fi
    (( rc == 0 )) || return $rc
    "$PY" -c "import torch, maep_fast; from maep_fast.ops._dispatch import unavailable_reason as u; \
d = torch.device('cuda'); print({op: (u(op, 'cuda', d) or 'ok') for op in ('pgd_step', 'patch_recon_loss', 'masked_patch_attention')})"
  }
  BUILD_CMD=(bash -c "$(declare -f build_ext); OUT='$OUT' PY='$PY' ARCH='$ARCH' build_ext")
  TEST_SEL=()
fi
note "CUDA arch for the build: $ARCH"

marked_tests() {  # -m gpu of the other files that mark GPU tests; 5 (nothing selected) is no failure
  local rc=0
  (( ${#EXTRA_FILES[@]} == 0 )) && { echo "no other file marks GPU tests"; return 0; }
  "$@" -m gpu "${EXTRA_FILES[@]}" --junitxml="$OUT/logs/gpu_marked_tests.xml" || rc=$?
  (( rc == 5 )) && rc=0
  return $rc
}

run_step build "$(cap_of build 150)" "$BUILD_END_BY" -- "${BUILD_CMD[@]}"
RC_BUILD=$?

# ------------------------------------------------------------------ bench_e2e (right after the build)
CAP_E2E=$(cap_of bench_e2e 150)
left=$(( E2E_END_BY - $(now) )); (( left < CAP_E2E )) && CAP_E2E=$left
E2E_LIMIT=$(( CAP_E2E > 40 ? CAP_E2E - 20 : CAP_E2E / 2 ))   # the script's own limit: it ends (complete) before the cap
if [[ "$DRY" == "1" ]]; then
  run_step bench_e2e "$CAP_E2E" "$E2E_END_BY" -- "$PY" bench/bench_purify.py --dry-run \
    --stages maep,diffpure,mae_pure,train --name e2e_cpu --time-limit-s "$E2E_LIMIT"
else
  [[ " $HAVE " == *" diffusers "* ]] || note "diffusers missing: bench_e2e records the DiffPure rows as skipped"
  run_step bench_e2e "$CAP_E2E" "$E2E_END_BY" -- "$PY" bench/bench_purify.py --suite e2e --device cuda \
    --presets mae_vit_base_patch4_dec512 --dtypes bfloat16 --stages maep,diffpure,mae_pure,train \
    --budget-s 3 --repeat 5 --max-call-s 20 --time-limit-s "$E2E_LIMIT" --name e2e_cuda
fi
copy_results

# ------------------------------------------------------------------ the test steps, side by side
run_step triton_tests "$(cap_of triton_tests 210)" "$TESTS_END_BY" -- \
  "${PYTEST[@]}" -v "${TEST_SEL[@]}" "${TRITON_FILES[@]}" --junitxml="$OUT/logs/triton_tests.xml" &
PID_TRITON=$!
# -v: each verdict is in the log as it happens, so a step cut by its cap still names its failures
run_step cuda_tests "$(cap_of cuda_tests 150)" "$TESTS_END_BY" -- \
  "${PYTEST[@]}" -v "${TEST_SEL[@]}" "${CUDA_FILES[@]}" --junitxml="$OUT/logs/cuda_tests.xml" &
PID_CUDA=$!
MARKED_PYTEST=("${PYTEST[@]}")
[[ ${#XDIST[@]} -gt 0 ]] && MARKED_PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -n 3 "${PTO[@]}")
run_step gpu_marked_tests "$(cap_of gpu_marked_tests 150)" "$TESTS_END_BY" -- \
  bash -c "$(declare -f marked_tests); EXTRA_FILES=(${EXTRA_FILES[*]:-}); OUT='$OUT'; marked_tests \"\$@\"" \
  _ "${MARKED_PYTEST[@]}" -v &
PID_MARKED=$!
wait "$PID_TRITON"; RC_TRITON=$?
wait "$PID_CUDA"; RC_CUDA=$?
wait "$PID_MARKED"; RC_MARKED=$?
(( RC_BUILD != 0 )) && note "build failed (rc $RC_BUILD): the cuda backend is missing, so the CUDA tests and rows fail or skip"

# ------------------------------------------------------------------ memcheck
SANITIZER="$(command -v compute-sanitizer || true)"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
END_MEMCHECK=$(( DEADLINE - R_OVERHEAD - R_COMPILE - R_OPS - R_PRECISION - 4 * GRACE ))
if [[ "$DRY" == "1" ]]; then
  run_step memcheck "$(cap_of memcheck 50)" "$END_MEMCHECK" -- "$PY" bench/memcheck_ops.py --device cpu --backends cpp --quick
elif [[ -n "$SANITIZER" ]]; then
  run_step memcheck "$(cap_of memcheck 50)" "$END_MEMCHECK" -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 40 \
    "$PY" bench/memcheck_ops.py --device cuda --backends cuda --no-compare
else
  record memcheck "skipped" "compute-sanitizer not found"
fi

# ------------------------------------------------------------------ bench_overhead
END_OVERHEAD=$(( DEADLINE - R_COMPILE - R_OPS - R_PRECISION - 3 * GRACE ))
if [[ "$DRY" == "1" ]]; then
  run_step bench_overhead "$(cap_of bench_overhead 30)" "$END_OVERHEAD" -- \
    "$PY" bench/bench_overhead.py --device cpu --calls 20 --rounds 2
else
  run_step bench_overhead "$(cap_of bench_overhead 45)" "$END_OVERHEAD" -- \
    "$PY" bench/bench_overhead.py --device cuda --calls 300 --rounds 5
fi
copy_results

# ------------------------------------------------------------------ bench_compile
END_COMPILE=$(( DEADLINE - R_OPS - R_PRECISION - 2 * GRACE ))
CAP_COMPILE=$(cap_of bench_compile 120)
left=$(( END_COMPILE - $(now) )); (( left < CAP_COMPILE )) && CAP_COMPILE=$left
COMPILE_LIMIT=$(( CAP_COMPILE > 40 ? CAP_COMPILE - 20 : CAP_COMPILE / 2 ))
if [[ "$DRY" == "1" ]]; then
  run_step bench_compile "$CAP_COMPILE" "$END_COMPILE" -- "$PY" bench/bench_purify.py --dry-run --stages compile \
    --name e2e_compile_cpu --time-limit-s "$COMPILE_LIMIT"
else
  run_step bench_compile "$CAP_COMPILE" "$END_COMPILE" -- "$PY" bench/bench_purify.py --suite e2e --device cuda \
    --presets mae_vit_base_patch4_dec512 --dtypes bfloat16 --stages compile --compile-warmup-s 60 \
    --budget-s 3 --repeat 5 --max-call-s 20 --time-limit-s "$COMPILE_LIMIT" --name e2e_compile_cuda
fi
copy_results

# ------------------------------------------------------------------ bench_ops
END_OPS=$(( DEADLINE - R_PRECISION - GRACE ))
CAP_OPS=$(cap_of bench_ops 150)
left=$(( END_OPS - $(now) )); (( left < CAP_OPS )) && CAP_OPS=$left
OPS_LIMIT=$(( CAP_OPS > 40 ? CAP_OPS - 20 : CAP_OPS / 2 ))   # the script's own limit: it ends (complete) before the cap
if [[ "$DRY" == "1" ]]; then
  run_step bench_ops "$CAP_OPS" "$END_OPS" -- "$PY" bench/bench_ops.py --device cpu --quick --repeat 2 \
    --ops "${MAEP_FAST_GPU_CHECK_DRYRUN_OPS:-pgd_step,masked_patch_attention}" --compile --compile-warmup-s 1 \
    --compile-budget-s 2 --time-limit-s "$OPS_LIMIT"
else
  run_step bench_ops "$CAP_OPS" "$END_OPS" -- "$PY" bench/bench_ops.py --device cuda --dtypes bfloat16,float32 \
    --attn-dtypes bfloat16 --compile --compile-warmup-s 40 --time-limit-s "$OPS_LIMIT"
fi
copy_results

# ------------------------------------------------------------------ precision_demo
CAP_PREC=$(cap_of precision_demo 120)
left=$(( DEADLINE - $(now) )); (( left < CAP_PREC )) && CAP_PREC=$left
DEMO_RUN="${MAEP_FAST_DEMO_RUN:-$ROOT/runs/demo}"
if [[ "$DRY" == "1" ]]; then
  run_step precision_demo "$CAP_PREC" "$DEADLINE" -- "$PY" bench/precision_demo.py --dry-run
elif [[ -f "$DEMO_RUN/maep/config.json" && -f "$DEMO_RUN/mae/config.json" && -f "$DEMO_RUN/classifier/config.json" ]]; then
  run_step precision_demo "$CAP_PREC" "$DEADLINE" -- "$PY" bench/precision_demo.py --device cuda --run "$DEMO_RUN"
else
  record precision_demo "skipped" "no demo checkpoints in $DEMO_RUN (set MAEP_FAST_DEMO_RUN to a 'python3 -m maep_fast demo' output directory)"
fi
# a bench run cut at its cap leaves its rows (written one by one) but no figure: draw it from the partial file
for E2E_JSON in "${MAEP_FAST_BENCH_RESULTS_DIR:-$ROOT/bench/results}"/e2e_*.json; do
  [[ -f "$E2E_JSON" ]] || continue
  if ! grep -q '"complete": true' "$E2E_JSON"; then
    left=$(( TOTAL - 5 - $(now) ))   # keep 5 s for the summary and the tarball
    (( left > 15 )) && left=15
    (( left >= 3 )) && timeout -k 2 "$left" "$PY" bench/bench_purify.py --replot "$E2E_JSON" >> "$OUT/logs/bench_e2e.log" 2>&1 \
      && note "$(basename "$E2E_JSON"): figure drawn from the partial results file"
  fi
done
copy_results

# ------------------------------------------------------------------ summary + tarball
TESTS_OK=1
(( RC_TRITON != 0 || RC_CUDA != 0 || RC_MARKED != 0 )) && TESTS_OK=0
{
  echo "maep_fast gpu_check: $([[ "$DRY" == "1" ]] && echo 'CPU DRY RUN (no GPU was used)' || echo 'GPU run')"
  grep -E "^(date_utc|git_sha|git_dirty_files|nvidia_smi|python|torch|device|triton|diffusers|torchattacks):" "$OUT/env.txt" 2>/dev/null
  echo "cuda_arch_built: $ARCH"
  echo "total_s: $(now) (deadline ${TOTAL})"
  echo "gpu_tests: $([[ $TESTS_OK == 1 ]] && echo PASSED || echo FAILED) ($(awk -F'\t' '$1 ~ /_tests$/ {printf "%s %s rc %s; ", $1, $2, $3}' "$SUMMARY_TSV")$([[ "$DRY" == "1" ]] && echo 'dry run: every GPU test skips on the CPU'))"
  echo
  printf '%-16s %-8s %-4s %7s %5s\n' step status rc seconds cap
  while IFS=$'\t' read -r n s r t c; do printf '%-16s %-8s %-4s %7s %5s\n' "$n" "$s" "$r" "$t" "$c"; done < "$SUMMARY_TSV"
  echo
  for f in triton_tests cuda_tests gpu_marked_tests; do
    [[ -f "$OUT/logs/$f.log" ]] && echo "$f: $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran|^skipped' "$OUT/logs/$f.log" | tr '\n' ';')"
  done
  [[ -f "$OUT/logs/memcheck.log" ]] && echo "memcheck: $(grep -E 'ERROR SUMMARY|cases, worst' "$OUT/logs/memcheck.log" | tail -2 | tr '\n' ' ')"
  for j in "$OUT"/results/*.json; do
    [[ -f "$j" ]] || continue
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['meta']; r=d['rows']; \
print(f\"{sys.argv[1].split('/')[-1]}: {len(r)} rows ({sum(1 for x in r if x.get('skipped'))} skipped, \
{sum(1 for x in r if x.get('error'))} errors), complete={m.get('complete')}\")" "$j" 2>/dev/null
  done
  echo
  echo "notes:"
  cat "$NOTES"
} > "$OUT/summary.txt" 2>&1
TAR_TMP="$(mktemp "${TMPDIR:-/tmp}/gpu_check.XXXXXX.tar.gz")"
tar -czf "$TAR_TMP" -C "$(dirname "$OUT")" --exclude="$(basename "$OUT")/gpu_check.tar.gz" "$(basename "$OUT")" \
  && mv -f "$TAR_TMP" "$OUT/gpu_check.tar.gz"
cat "$OUT/summary.txt"
echo "tarball: $OUT/gpu_check.tar.gz"
[[ $TESTS_OK == 1 ]] && exit 0
exit 1
