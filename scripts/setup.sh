#!/usr/bin/env bash
# Install maep_fast and what it needs into the current Python (a fresh machine or venv is fine).
# torch is pinned and installed first so no unpinned requirement pulls a multi-GB CUDA build;
# every other package is pinned by requirements/lock.txt (pip constraints), so a fresh machine,
# CI and the README's machine run the same versions. The native extension is then built
# against that torch (--no-build-isolation).
# MAEP_FAST_NO_LOCK=1 installs without the lock (newest versions in pyproject's ranges: how the
# lock is refreshed, see requirements/lock.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if [ "${MAEP_FAST_NO_LOCK:-0}" != "1" ]; then
  PIP+=(-c requirements/lock.txt)
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==${MAEP_FAST_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" "setuptools>=64" wheel ninja
# Triton kernels (run under TRITON_INTERPRET=1 on CPU machines; triton 3.6's interpreter needs numpy < 2.4).
"${PIP[@]}" "triton==3.6.0" "numpy<2.4"
# torchattacks pins an old requests it does not import: install without dependencies.
"${PIP[@]}" --no-deps "torchattacks==3.5.1"
# The diffusion-purifier baseline (DiffPure-style) is built on diffusers' UNet2DModel.
"${PIP[@]}" "diffusers==0.42.1"
"${PIP[@]}" --no-build-isolation -e ".[test]"
"$PY" -c "import maep_fast, torch; print('maep_fast', maep_fast.__version__, '| torch', torch.__version__, '| native extension:', maep_fast.native_available())"
