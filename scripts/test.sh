#!/usr/bin/env bash
# Set up (scripts/setup.sh), compile-check the CUDA kernels when nvcc is present, run the tests.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
bash scripts/setup.sh
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  bash scripts/check_cuda_compile.sh
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
export HF_HUB_OFFLINE=1
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
