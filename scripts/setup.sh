#!/usr/bin/env bash
# Install maep_fast and what it needs into the current Python (a fresh machine is fine).
# torch is pinned and installed first so no unpinned requirement pulls a multi-GB CUDA build;
# the native extension is then built against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==${MAEP_FAST_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" -c "import maep_fast, torch; print('maep_fast', maep_fast.__version__, '| torch', torch.__version__, '| native extension:', maep_fast.native_available())"
