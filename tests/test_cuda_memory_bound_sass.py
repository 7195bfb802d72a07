"""What nvcc makes of the memory-bound kernels (kernels/pgd_step.cu, kernels/patch_recon_loss.cu),
checked without a GPU (bandwidth).

Compiles the torch-free kernels for sm_80 and sm_90 and reads the SASS back:
  - every packed kernel (template pack width V > 1: 4 fp32, 8 fp16 / bf16, 2 fp64 elements)
    moves its tensors with 128-bit global loads and stores (LDG.E.128 / STG.E.128): pgd_step's
    L-inf, one-pass L2 and grouped L2 kernels, and patch_recon_loss's patch-row kernels;
  - no local memory in those kernels (0 spill bytes in ptxas' report, no LDL / STL),
    registers <= 255.
Skips cleanly without nvcc or cuobjdump.
"""
import re
from pathlib import Path

import pytest

import cuda_build

ROOT = Path(__file__).resolve().parents[1]
DATA_KERNELS = ("pgd_linf_kernel", "pgd_l2_resident_kernel", "pgd_l2_dsq_kernel", "pgd_l2_apply_kernel",
                "pgd_l2_gsq_kernel", "prl_row_fwd_kernel", "prl_row_bwd_kernel")
REDUCTION_ONLY = ("gsq", "dsq", "prl_row_fwd")  # their stores are per-sample / per-patch scalars


@pytest.fixture(scope="module", params=[(80, "pgd_step"), (90, "pgd_step"), (80, "patch_recon_loss"),
                                        (90, "patch_recon_loss")], ids=str)
def sass(request):
    cuobjdump = cuda_build.cuobjdump_or_skip()
    arch, stem = request.param
    cubin, ptxas_report = cuda_build.cubin(stem, arch)
    return arch, cuda_build.sass_by_function(cubin, cuobjdump), _ptxas_by_kernel(ptxas_report)


def _ptxas_by_kernel(report: str) -> dict:
    """mangled name -> the lines ptxas printed for it (-Xptxas -v)."""
    out, cur = {}, None
    for line in report.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, "")
        elif cur:
            out[cur] += line + "\n"
    return out


def _pack_width(mangled: str) -> int:
    m = re.search(r"Li(\d+)E", mangled)  # the first int template argument: V
    return int(m.group(1)) if m else 1


def test_packed_kernels_use_128_bit_accesses_only(sass):
    arch, kernels, _ = sass
    packed = {n: b for n, b in kernels.items() if any(k in n for k in DATA_KERNELS) and _pack_width(n) > 1}
    assert len(packed) >= 8, sorted(kernels)  # every kind x 4 dtypes
    for name, body in packed.items():
        widths = set(re.findall(r"\b(?:LDG|STG)\.E(?:\.(\d+))?", body))
        data = {w for w in widths if w != ""} | ({"32"} if "" in widths else set())
        # per-sample step / eps and the partial sums are scalar loads of 4 / 8 bytes: allowed; the
        # tensors themselves must move in 16-byte accesses
        assert "128" in data, (arch, name, widths)
        stg = set(re.findall(r"\bSTG\.E(?:\.(\d+))?", body))
        if not any(k in name for k in REDUCTION_ONLY):
            assert stg == {"128"}, (arch, name, stg)


def test_no_local_memory_and_registers_in_bounds(sass):
    """In the bandwidth kernels; the patch-loss warp-per-patch fallback's 64-bit index divisions are
    library calls whose ABI spills a few bytes (it is the path for rows too wide to stage)."""
    arch, kernels, ptxas = sass
    checked = 0
    for name, body in kernels.items():
        if not any(k in name for k in DATA_KERNELS):
            continue
        report = ptxas.get(name, "")
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spill and spill.groups() == ("0", "0"), (arch, name, report)
        regs = re.search(r"Used (\d+) registers", report)
        assert regs and int(regs.group(1)) <= 255, (arch, name)
        assert not re.search(r"\b(LDL|STL)\b", body), (arch, name)
        checked += 1
    assert checked >= 8
