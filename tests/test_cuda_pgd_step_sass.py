"""What nvcc makes of kernels/pgd_step.cu, checked without a GPU (issue #12: bandwidth).

Compiles the torch-free PGD-step kernels for sm_80 and sm_90 and reads the SASS back:
  - every packed kernel (template pack width V > 1: 4 fp32, 8 fp16 / bf16, 2 fp64 elements)
    moves its tensors with 128-bit global loads and stores (LDG.E.128 / STG.E.128), none
    narrower;
  - the one-pass L2 kernel keeps its packs in registers: no local memory (0 spill bytes,
    no LDL / STL) in any kernel, registers <= 255.
Skips cleanly without nvcc or cuobjdump.
"""
import re
import subprocess
from pathlib import Path

import pytest

from test_cuda_sass import _cuobjdump, _nvcc

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "kernels" / "pgd_step.cu"
DATA_KERNELS = ("pgd_linf_kernel", "pgd_l2_resident_kernel", "pgd_l2_dsq_kernel", "pgd_l2_apply_kernel",
                "pgd_l2_gsq_kernel")


@pytest.fixture(scope="module", params=[80, 90])
def sass(request, tmp_path_factory):
    nvcc = _nvcc()
    if not nvcc:
        pytest.skip("nvcc not found")
    cuobjdump = _cuobjdump(nvcc)
    if not cuobjdump:
        pytest.skip("cuobjdump not found")
    arch = request.param
    cubin = tmp_path_factory.mktemp(f"pgd{arch}") / "pgd.cubin"
    res = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
                          f"-I{ROOT / 'kernels'}", f"-I{ROOT}", str(SRC), "-o", str(cubin)],
                         capture_output=True, text=True, check=True)
    text = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name, body = block.split("\n", 1)
        kernels[name.strip()] = body
    return arch, kernels, res.stderr


def _pack_width(mangled: str) -> int:
    m = re.search(r"Li(\d+)E", mangled)  # the first int template argument: V
    return int(m.group(1)) if m else 1


def test_packed_kernels_use_128_bit_accesses_only(sass):
    arch, kernels, _ = sass
    packed = {n: b for n, b in kernels.items() if any(k in n for k in DATA_KERNELS) and _pack_width(n) > 1}
    assert len(packed) >= 16, sorted(kernels)  # 5 kinds x 4 dtypes, minus nothing
    for name, body in packed.items():
        widths = set(re.findall(r"\b(?:LDG|STG)\.E(?:\.(\d+))?", body))
        data = {w for w in widths if w != ""} | ({"32"} if "" in widths else set())
        # per-sample step / eps and the partial sums are scalar loads of 4 / 8 bytes: allowed; the
        # tensors themselves must move in 16-byte accesses
        assert "128" in data, (arch, name, widths)
        stg = set(re.findall(r"\bSTG\.E(?:\.(\d+))?", body))
        if "gsq" not in name and "dsq" not in name:
            assert stg == {"128"}, (arch, name, stg)


def test_no_local_memory_and_registers_in_bounds(sass):
    arch, kernels, ptxas = sass
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    assert spills and all(a == "0" and b == "0" for a, b in spills), (arch, spills)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", ptxas)]
    assert regs and max(regs) <= 255, (arch, max(regs))
    for name, body in kernels.items():
        assert not re.search(r"\b(LDL|STL)\b", body), (arch, name)
