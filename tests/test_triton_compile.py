"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 and fits its shared memory.

The interpreter-run tests check what the kernels compute; this checks what only a real
compile checks (tl.dot rules, layouts, shared memory, ptxas), without a GPU. The work is
done by ``tests/triton_aot_check.py`` in a subprocess: the kernels must be imported with
TRITON_INTERPRET unset, which conftest sets for this process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

HELPER = Path(__file__).with_name("triton_aot_check.py")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"this triton build has no bundled ptxas at {ptxas}")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if "TRITON_CACHE_DIR" not in env and not _writable(Path.home() / ".triton" / "cache"):
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # compiling writes a cache
    proc = subprocess.run([sys.executable, str(HELPER), "--arch", "80,90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"Triton AOT compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", [80, 90])
def test_every_launched_kernel_compiles(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == arch]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]][:3]
    expected = set(report["expected_kernels"])
    assert len(expected) >= 9  # 3 attention, 2 loss, 4 pgd_step kernels
    assert {r["kernel"] for r in rows} == expected


@pytest.mark.parametrize("arch", [80, 90])
def test_shared_memory_fits(report, arch):
    rows = [r for r in report["rows"] if r["arch"] == arch]
    worst = max(rows, key=lambda r: r["shared"])
    assert worst["shared"] <= SMEM_LIMIT[arch], worst["spec"]


def test_widest_fp32_rows_compiled(report):
    """fp32 at head dim 256 (1 KB rows) is the case the default tiles overflowed on sm_80."""
    wide = [r for r in report["rows"] if r["kernel"] == "_attn_fwd_kernel"
            and "BLOCK_D=256" in r["spec"] and "Q:*fp32" in r["spec"]]
    assert {r["arch"] for r in wide} == {80, 90}
    assert all(r["shared"] <= SMEM_LIMIT[r["arch"]] for r in wide)


def _attention_rows(report, dtype: str, precision: str = "ieee"):
    return [r for r in report["rows"] if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_kernel")
            and f"Q:*{dtype}" in r["spec"] and f"PRECISION={precision}" in r["spec"]]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_attention_uses_tensor_cores(report, dtype):
    rows = _attention_rows(report, dtype)
    assert rows and all(r["tensor_core"] in ("mma", "wgmma") for r in rows), \
        [r["spec"] for r in rows if not r["tensor_core"]][:3]
    hopper_fwd = [r for r in rows if r["arch"] == 90 and r["kernel"] == "_attn_fwd_kernel"]
    assert hopper_fwd and all(r["tensor_core"] == "wgmma" for r in hopper_fwd)


def test_fp32_attention_is_ieee_unless_tf32_is_allowed(report):
    """fp32 dots stay IEEE (FMA) by default, like torch's matmul; allow_tf32 switches to tensor cores."""
    ieee, tf32 = _attention_rows(report, "fp32"), _attention_rows(report, "fp32", "tf32")
    assert ieee and all(r["tensor_core"] is None for r in ieee)
    assert tf32 and all(r["tensor_core"] in ("mma", "wgmma") for r in tf32)
