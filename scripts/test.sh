#!/usr/bin/env bash
# Set up (scripts/setup.sh, pinned by requirements/lock.txt), then run the tests; CUDA kernels
# are compile-checked when nvcc is present.
# MAEP_FAST_TEST_WORKERS: pytest-xdist workers (default 2; 0 runs in one process).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
bash scripts/setup.sh
if [ "${MAEP_FAST_NO_LOCK:-0}" != "1" ]; then
  export MAEP_FAST_LOCKED=1  # tests/test_lock.py checks the installed versions against the lock
fi
# The CUDA kernels are compile-checked (sm_80, sm_90, -Werror all-warnings) and their SASS read
# back by tests/test_cuda_compile.py and the SASS tests, one nvcc build per file and arch
# (tests/cuda_build.py); they skip without nvcc. scripts/check_cuda_compile.sh does the compile
# check by hand.
export HF_HUB_OFFLINE=1
workers="${MAEP_FAST_TEST_WORKERS:-2}"
xdist=()
if [ "$workers" != "0" ]; then
  xdist=(-n "$workers")
fi
"$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" tests "$@"
