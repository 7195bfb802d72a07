#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the tests (CUDA kernels compile-checked when nvcc is present).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
bash scripts/setup.sh
# The CUDA kernels are compile-checked (sm_80, sm_90, -Werror all-warnings) and their SASS read
# back by tests/test_cuda_compile.py and the SASS tests, one nvcc build per file and arch
# (tests/cuda_build.py); they skip without nvcc. scripts/check_cuda_compile.sh does the compile
# check by hand.
export HF_HUB_OFFLINE=1
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
