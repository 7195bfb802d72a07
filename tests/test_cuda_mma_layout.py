"""Host emulation of the tensor-core fragment layouts used by the CUDA attention kernel.

kernels/mma_layout.cuh holds the index math of mma.sync.m16n8k16 (.f16/.bf16 A row-major,
B column-major, C/D fp32) as __host__ __device__ code; tests/mma_layout_emulation.cpp
compiles it with plain g++ and emulates one warp (every lane's registers, the
instruction itself from the PTX ISA's layout tables written down separately) to check
that the loaders cover every element exactly once, that S = Q K^T and O = P V come out
right through padded shared-memory tiles for every padded head dim 16..128, and that the
accumulator -> A-operand reuse (P, dS) is exact. No GPU, no nvcc needed.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tests" / "mma_layout_emulation.cpp"


def _cxx():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_mma_fragment_layout_emulation(tmp_path):
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "mma_layout_emulation"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT}", str(SRC), "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK "), run.stdout
    assert int(run.stdout.split()[1]) > 100_000  # all lanes x elements x tiles x head dims were checked
