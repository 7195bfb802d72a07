#!/usr/bin/env bash
# Compile-check every torch-free CUDA kernel (kernels/*.cu) with nvcc for
# sm_80 and sm_90. Needs nvcc only (no GPU, no CUDA torch). Fails loudly on
# the first error; prints which files passed.
#
#   scripts/check_cuda_compile.sh            # NVCC=/path/to/nvcc to override
#   CUDA_CHECK_ARCHS="80 90 100" scripts/check_cuda_compile.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "${NVCC}" ]]; then
  echo "check_cuda_compile: ERROR: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
ARCHS="${CUDA_CHECK_ARCHS:-80 90}"
OUT="$(mktemp -d /tmp/maep_fast_cuda_check.XXXXXX)"
trap 'rm -rf "${OUT}"' EXIT

shopt -s nullglob
files=("${ROOT}"/kernels/*.cu)
if (( ${#files[@]} == 0 )); then
  echo "check_cuda_compile: ERROR: no kernels/*.cu found under ${ROOT}" >&2
  exit 2
fi

echo "check_cuda_compile: $("${NVCC}" --version | tail -n 1) ; archs: ${ARCHS}"
passed=()
for f in "${files[@]}"; do
  rel="${f#"${ROOT}"/}"
  for arch in ${ARCHS}; do
    obj="${OUT}/$(basename "${f}" .cu).sm_${arch}.o"
    start="${EPOCHREALTIME:-0}"
    if ! "${NVCC}" -std=c++17 -O3 -arch="sm_${arch}" -Werror all-warnings -I"${ROOT}/kernels" -I"${ROOT}" \
        -c "${f}" -o "${obj}"; then
      echo "check_cuda_compile: FAILED: ${rel} (sm_${arch})" >&2
      exit 1
    fi
    secs=$(awk -v a="${start}" -v b="${EPOCHREALTIME:-0}" 'BEGIN { printf "%.1f", b - a }')
    echo "check_cuda_compile: ok   ${rel} (sm_${arch}, ${secs} s)"
  done
  passed+=("${rel}")
done
echo "check_cuda_compile: PASSED ${#passed[@]} file(s): ${passed[*]}"
