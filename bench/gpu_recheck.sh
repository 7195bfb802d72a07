#!/usr/bin/env bash
# A short follow-up GPU run (about 5 minutes) after bench/gpu_check.sh found failures:
#
#   bash bench/gpu_recheck.sh OUT_DIR
#
#   build          MAEP_FAST_CUDA=1 pip install -e . for the GPU present (background)
#   triton_tests   tests/ops/*/test_*_triton.py -v (each test's verdict is in the log as it happens, so a
#                  run cut by its cap still names its failures), beside the build
#   crash          the native attention op called with head dim 160 (the call that killed a test
#                  worker), alone, with a native backtrace on a fatal signal (bench/tools/segv_backtrace.c;
#                  the machine has no gdb), frames resolved with addr2line
#   cuda_tests     the CUDA test files whole, and -m gpu of the other files that mark GPU tests, -v
#   bench_overhead python3 bench/bench_overhead.py --device cuda (alone, last)
#
# Each step runs under `timeout` with its cap; every log goes to OUT_DIR, the step table to
# OUT_DIR/steps.txt, and the failing test names to OUT_DIR/failures.txt.
set -u
OUT="${1:?usage: bash bench/gpu_recheck.sh OUT_DIR}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
T0=$(date +%s)
: > "$OUT/steps.txt"

step() {  # step NAME CAP CMD...: run CMD under timeout, log to OUT/NAME.log, record the outcome
  local name="$1" cap="$2" t rc
  shift 2
  t=$(date +%s)
  timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%-15s rc %-4s %4ss (cap %ss, ended at +%ss)\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$cap" \
    "$(( $(date +%s) - T0 ))" | tee -a "$OUT/steps.txt"
  return $rc
}

ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
build() {
  MAX_JOBS=10 MAEP_FAST_CUDA=1 MAEP_FAST_CUDA_ARCHS="${ARCH:-90}" "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -e . || return $?
  "$PY" -c "import maep_fast; print('native:', maep_fast.native_available())"
}
PYTEST=("$PY" -m pytest -v -p no:cacheprovider -o addopts=-ra --timeout 120)

step build 150 bash -c "$(declare -f build); PY='$PY' ARCH='$ARCH' build" &
PID_BUILD=$!
step triton_tests 210 "${PYTEST[@]}" -n 6 tests/ops/masked_patch_attention/test_masked_patch_attention_triton.py \
  tests/ops/patch_recon_loss/test_patch_recon_loss_triton.py tests/ops/pgd_step/test_pgd_step_triton.py &
PID_TRITON=$!
wait "$PID_BUILD"

crash() {
  gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so bench/tools/segv_backtrace.c -ldl || return 3
  LD_PRELOAD=/tmp/segv_backtrace.so "$PY" -c "
import torch, maep_fast.ops
q = torch.randn(1, 1, 4, 160, device='cuda')
for args in ((q.double(), q.double(), q.double()), (q, q, q)):
    try:
        torch.ops.maep_fast.masked_patch_attention(*args, None, 0.1)
        print('no error for', args[0].dtype, tuple(args[0].shape))
    except RuntimeError as e:
        print('RuntimeError:', str(e).splitlines()[0][:300])
print('survived')
" 2>&1 | tee /tmp/crash.txt
  # resolve the frames inside our extension (library + offset) to functions and lines
  grep -E '_C\.(cpython|abi3)|libtorch|libc10' /tmp/crash.txt | sed -E 's/^#[0-9]+ +([^ ]+) \+(0x[0-9a-f]+).*/\1 \2/' |
    while read -r lib off; do echo "$lib $off: $(addr2line -f -C -i -e "$lib" "$off" 2>/dev/null | tr '\n' ' ')"; done
}
step crash 40 bash -c "$(declare -f crash); PY='$PY' crash"

CUDA_FILES=(tests/ops/*/test_*_gpu.py tests/test_gpu_backends.py tests/test_mae_pure_cuda_graph.py tests/test_fused_vs_reference.py)
EXTRA=()
for f in $(grep -lE "pytest\.mark\.gpu|GPU_ONLY|GPU_MODULE_MARKS" tests/test_*.py tests/ops/*/test_*.py); do
  case " ${CUDA_FILES[*]} " in *" $f "*) ;; *) [[ "$f" == *_triton.py ]] || EXTRA+=("$f") ;; esac
done
step cuda_tests 120 "${PYTEST[@]}" -n 6 "${CUDA_FILES[@]}" &
PID_CUDA=$!
step cuda_tests_extra 120 "${PYTEST[@]}" -n 3 -m gpu "${EXTRA[@]}" &
PID_EXTRA=$!
wait "$PID_CUDA" "$PID_EXTRA" "$PID_TRITON"

step bench_overhead 45 "$PY" bench/bench_overhead.py --device cuda --calls 300 --rounds 5
cp -f bench/results/overhead_cuda.* "$OUT/" 2>/dev/null

grep -hE "(FAILED|ERROR)( |$)|Fatal Python error|Segmentation" "$OUT"/*tests*.log | sort -u > "$OUT/failures.txt"
for f in "$OUT"/*tests*.log; do echo "$(basename "$f"): $(grep -E '^=+ .*(passed|failed).* in ' "$f" | tail -1)"; done \
  | tee -a "$OUT/steps.txt"
echo "failures: $(wc -l < "$OUT/failures.txt")"; head -40 "$OUT/failures.txt"
echo "total: $(( $(date +%s) - T0 ))s"
