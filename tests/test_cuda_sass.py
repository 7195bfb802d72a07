"""What nvcc makes of kernels/masked_patch_attention.cu, checked without a GPU.

Compiles the torch-free attention kernels to a cubin for sm_80 and sm_90 (nvcc -cubin
-Xptxas -v) and reads the result back with cuobjdump (-sass, -res-usage):
  - every fp16 / bf16 kernel (forward, dq, dk/dv; one per padded head dim 16..128) runs
    its matrix products on tensor cores: HMMA.16816 in its SASS;
  - the fp32 kernels stay exact: no HMMA (no TF32);
  - no local memory: ptxas reports 0 bytes spill stores / loads, cuobjdump LOCAL:0 and
    STACK:0, and no STL / LDL instruction in any kernel;
  - registers <= 255, and static + dynamic shared memory per block within the opt-in
    limit (163 KB on sm_80, 227 KB on sm_90).
Skips cleanly without nvcc or cuobjdump. Figures are recorded in docs/benchmarks.md.
"""

import re
import subprocess
from pathlib import Path

import pytest

import cuda_build

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "kernels" / "masked_patch_attention.cu"
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block
HEAD_DIMS = list(range(16, 129, 16))
TC_KINDS = ("mpa_fwd_tc_kernel", "mpa_dq_tc_kernel", "mpa_dkdv_tc_kernel")


def dkdv_dynamic_smem(dp: int) -> int:
    """tc::dkdv_smem_bytes<DP>() in kernels/masked_patch_attention.cu (keep in sync):
    K, V tiles of 64 rows + Q, dO tiles of 32 rows, row stride DP + 8 halves; lse, delta: 32 floats."""
    return (2 * 64 + 2 * 32) * (dp + 8) * 2 + 2 * 32 * 4


def kernel_info(name: str):
    """(kind, dtype, DP) of a tensor-core kernel's mangled name, else (kind-or-None, dtype, None)."""
    kind = next((k for k in TC_KINDS if k in name), None)
    m = re.search(r"kernelI(6__half|13__nv_bfloat16|f)(?:Li(\d+)E)?E", name)
    dtype = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}.get(m.group(1)) if m else None
    dp = int(m.group(2)) if m and m.group(2) else None
    return kind, dtype, dp


_CACHE = {}


def compile_arch(arch: int):
    if arch in _CACHE:
        return _CACHE[arch]
    cuobjdump = cuda_build.cuobjdump_or_skip()
    cubin, ptxas_report = cuda_build.cubin("masked_patch_attention", arch)
    funcs = cuda_build.sass_by_function(cubin, cuobjdump)
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0, usage.stderr

    res_usage = {}  # name -> {REG, STACK, SHARED, LOCAL}
    lines = usage.stdout.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            res_usage[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[i + 1])}

    spills = {}  # name -> (spill stores, spill loads), from ptxas -v
    cur = None
    for line in ptxas_report.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            spills[cur] = (int(m.group(1)), int(m.group(2)))
    _CACHE[arch] = dict(funcs=funcs, usage=res_usage, spills=spills)
    return _CACHE[arch]


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_kernels_use_tensor_cores(arch):
    c = compile_arch(arch)
    tc = {}
    for name, text in c["funcs"].items():
        kind, dtype, dp = kernel_info(name)
        if kind is not None:
            tc[(kind, dtype, dp)] = name
            assert "HMMA.16816" in text, f"sm_{arch}: {name} has no HMMA.16816 (tensor-core mma)"
        elif "mpa_" in name:  # fp32 / delta kernels: exact fp32 math, no tensor cores
            assert "HMMA" not in text, f"sm_{arch}: {name} uses tensor cores"
    expected = {(k, d, dp) for k in TC_KINDS for d in ("fp16", "bf16") for dp in HEAD_DIMS}
    assert set(tc) == expected, f"sm_{arch}: missing {sorted(expected - set(tc))}"


@pytest.mark.parametrize("arch", [80, 90])
def test_attention_kernels_no_local_memory_and_fit(arch):
    c = compile_arch(arch)
    assert c["funcs"] and set(c["usage"]) >= set(c["funcs"])
    for name, text in c["funcs"].items():
        assert not re.search(r"\b(STL|LDL)(\.\S+)?\s", text), f"sm_{arch}: {name} touches local memory (STL/LDL)"
        assert c["spills"].get(name, (0, 0)) == (0, 0), f"sm_{arch}: {name} spills {c['spills'][name]}"
        u = c["usage"][name]
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, f"sm_{arch}: {name} uses local memory {u}"
        assert u["REG"] <= 255, f"sm_{arch}: {name} needs {u['REG']} registers"
        kind, _, dp = kernel_info(name)
        dyn = dkdv_dynamic_smem(dp) if kind == "mpa_dkdv_tc_kernel" else 0
        assert u["SHARED"] + dyn <= SMEM_LIMIT[arch], f"sm_{arch}: {name} needs {u['SHARED']} + {dyn} B shared"
    # the spill report covered every kernel
    assert set(c["spills"]) >= set(c["funcs"])
