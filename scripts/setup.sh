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
# Triton kernels (run under TRITON_INTERPRET=1 on CPU machines; triton 3.6's interpreter needs numpy < 2.4).
"$PY" -m pip install --quiet "triton==3.6.0" "numpy<2.4"
# torchattacks pins an old requests it does not import: install without dependencies.
"$PY" -m pip install --quiet --no-deps "torchattacks==3.5.1"
# The diffusion-purifier baseline (DiffPure-style) is built on diffusers' UNet2DModel.
"$PY" -m pip install --quiet "diffusers==0.42.1"
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
"$PY" -c "import maep_fast, torch; print('maep_fast', maep_fast.__version__, '| torch', torch.__version__, '| native extension:', maep_fast.native_available())"
