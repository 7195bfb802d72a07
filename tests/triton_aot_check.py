"""Compile every Triton kernel of maep_fast for sm_80 and sm_90 on a machine without a GPU.

The CPU tests run the Triton kernels under the interpreter, which never lowers a kernel:
tl.dot's shape and dtype rules, layouts, shared-memory use and ptxas limits are only
checked by compiling. This script drives the real launchers
(``maep_fast.ops.triton_kernels``) on CPU tensors with a stand-in driver. Its JIT hook
records each launch's specialization (argument types, alignment, constexprs, num_warps,
num_stages; every autotune config the launcher's pruning keeps) instead of compiling and
launching. Each recorded specialization is then compiled to a cubin with
``triton.compile`` for every requested architecture, and its shared memory is checked
against that architecture's per-block limit. The report adds which tensor-core
instruction the dots lowered to and the vector widths of its global loads (from the
PTX) and, from ``cuobjdump -res-usage``,
registers and spill (local) memory.

    python3 tests/triton_aot_check.py [--arch 80,90] [--jobs N] [--json out.json]

Exit status 1 when a kernel fails to compile or needs more shared memory than its
architecture has. ``tests/test_triton_compile.py`` runs it in CI.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions, not interpreted

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

# Per-block shared memory a kernel may use (bytes, the opt-in maximum):
# A100 (sm_80) 163 KB, H100 / H200 (sm_90) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

SPECS: list[dict] = []
_SEEN: set[str] = set()


class RecordingDriver:
    """Just enough of Triton's CUDA driver for ``JITFunction.run`` to reach ``jit_cache_hook``."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):  # the autotuner visits each config once
            kernel_call()
            return [1.0, 1.0, 1.0]
        return bench


def _record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    """jit_cache_hook: keep the specialization, return True so nothing compiles or launches."""
    tag = f"{fn.module}.{fn.name}|{key}"
    if tag not in _SEEN:
        _SEEN.add(tag)
        SPECS.append({
            "kernel": fn.name, "fn": fn.jit_function,
            "signature": compile["signature"], "constants": compile["constants"], "attrs": compile["configs"][0],
            "options": {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")},
        })
    return True


# ------------------------------------------------------------------ the launches to record
def _drive_attention(full: bool):
    from maep_fast.ops.triton_kernels.masked_patch_attention import attn_bwd, attn_fwd

    def run(dtype, d, keep, length):
        q = torch.randn(2, 3, length, d).to(dtype)  # H=3: H=1 would specialize as a constant
        k = (torch.rand(2, length) < 0.5) if keep else None
        out, lse = attn_fwd(q, q, q, k)
        attn_bwd(q, q, q, q, k, out, lse)

    # L=65 (ViT-CIFAR + cls) keeps every forward autotune tile, L=17 only the BLOCK_M=64 ones
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if full:
            for d in (16, 40, 48, 64, 96, 128, 256):
                for keep in (False, True):
                    run(dtype, d, keep, 65)
            continue
        run(dtype, 64, False, 65)   # the MAE encoder / MAEP path: visible tokens gathered, no mask
        run(dtype, 256, True, 65)   # the widest rows: the shared-memory limit
        for d in (16, 48, 96):      # BLOCK_D 16 / 64 / 128 with a ragged keep mask
            run(dtype, d, True, 17)
    run(torch.float16, 40, True, 17)  # a head dim that is not a multiple of 16
    old = torch.backends.cuda.matmul.allow_tf32  # fp32 with TF32 dots (PRECISION="tf32")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        run(torch.float32, 64, False, 17)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _drive_patch_recon_loss(full: bool):
    from maep_fast.ops.triton_kernels.patch_recon_loss import patch_recon_loss_bwd, patch_recon_loss_fwd

    def run(dtype, geometry, norm_pix, power, masked, expanded_grad):
        n, c, s, p = geometry
        length = (s // p) ** 2
        imgs = torch.rand(n, c, s, s).to(dtype)
        pred = torch.rand(n, length, p * p * c).to(dtype)
        mask = (torch.rand(n, length) < 0.75).float() if masked else None
        err = patch_recon_loss_fwd(pred, imgs, mask, p, norm_pix, power)
        grad = torch.ones((), dtype=err.dtype).expand(n, length) if expanded_grad else torch.ones_like(err)
        patch_recon_loss_bwd(grad, pred, imgs, mask, p, norm_pix, power)

    # (N, C, H=W, patch): CIFAR p4 (D 48), ImageNet p16 (D 768), 1 channel p2 (D 4)
    cifar, geometries = (8, 3, 32, 4), ((8, 3, 32, 4), (2, 3, 224, 16), (5, 1, 14, 2))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for geometry in geometries if (full or dtype == torch.float32) else (cifar,):
            for norm_pix in (False, True):
                for power in (1, 2):
                    for masked in (False, True):
                        if full or dtype == torch.float32 or (norm_pix, power, masked) in ((True, 2, True),
                                                                                           (False, 1, False)):
                            run(dtype, geometry, norm_pix, power, masked, False)
        run(dtype, cifar, False, 2, True, True)  # a mean's gradient: an expanded scalar, stride 0


def _drive_pgd_step(full: bool):
    from maep_fast.ops.triton_kernels.pgd_step import pgd_step_triton

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        # 4x3x32x32: the one-pass L2 kernel; 2x4100 and 3x3x224x224: the three-launch L2 path
        for shape in ((4, 3, 32, 32), (2, 4100), (3, 3, 224, 224)) if full or dtype == torch.float32 \
                else ((4, 3, 32, 32), (2, 4100)):
            x = torch.rand(shape).to(dtype)
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            step = torch.full((shape[0],), 0.01, dtype=cd)
            eps = torch.full((shape[0],), 0.03, dtype=cd)
            for norm in ("linf", "l2"):
                for lo, hi in ((0.0, 1.0), (-float("inf"), float("inf"))):
                    for direction in (1, -1):
                        pgd_step_triton(x, x, x, step, eps, norm, direction, lo, hi)
                    pgd_step_triton(x, x, x, step, eps, norm, 1, lo, hi, out=x.clone())
                    pgd_step_triton(x, x, x, 0.01, 0.03, norm, -1, lo, hi, out=x)  # Python-float step / eps


DRIVERS = {"masked_patch_attention": _drive_attention, "patch_recon_loss": _drive_patch_recon_loss,
           "pgd_step": _drive_pgd_step}


def record(full: bool, record_arch: int = 90) -> list[dict]:
    """Run every launcher under the recording driver; return the unique specializations."""
    driver.set_active(RecordingDriver(GPUTarget("cuda", record_arch, 32)))
    old_hook = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = _record
    try:
        for drive in DRIVERS.values():
            drive(full)
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(None)  # back to "no driver chosen" (a CPU machine has none to reset to)
    return SPECS


def launched_kernels() -> set[str]:
    """Names of the module-level kernels (``*_kernel``) the three Triton modules define."""
    import importlib

    names = set()
    for mod in DRIVERS:
        m = importlib.import_module(f"maep_fast.ops.triton_kernels.{mod}")
        for name, obj in vars(m).items():
            if name.endswith("_kernel") and isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                names.add(name)
    return names


# ------------------------------------------------------------------ compiling
_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    if not _CUOBJDUMP.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(3))} if m else {}


def _tensor_core(ptx: str) -> str | None:
    """Which tensor-core instruction the kernel's dots lowered to (None: FMA only)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"  # Hopper warpgroup MMA
    if "mma.sync" in ptx:
        return "mma"
    return None


def _describe(spec: dict) -> str:
    consts = spec["constants"]
    args = ", ".join(f"{name}={consts[(i,)]}" if (i,) in consts else f"{name}:{ty}"
                     for i, (name, ty) in enumerate(zip(spec["fn"].arg_names, spec["signature"].values())))
    o = spec["options"]
    return f"{spec['kernel']}[num_warps={o['num_warps']}, num_stages={o['num_stages']}]({args})"


def _compile_one(job: tuple[int, int]) -> dict:
    i, arch = job
    spec = SPECS[i]
    row = {"kernel": spec["kernel"], "arch": arch, "spec": _describe(spec)}
    t0 = time.perf_counter()
    try:
        src = ASTSource(spec["fn"], spec["signature"], spec["constants"], spec["attrs"])
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec["options"]))
        row.update(ok=True, shared=int(k.metadata.shared), tensor_core=_tensor_core(k.asm["ptx"]),
                   vector_loads=sorted(set(re.findall(r"ld\.global(?:\.\w+)*?\.(v[248])\.", k.asm["ptx"]))),
                   **_resource_usage(k.asm["cubin"]))
        if row["shared"] > SMEM_LIMIT[arch]:
            row.update(ok=False, error=f"shared memory {row['shared']} B > sm_{arch} limit {SMEM_LIMIT[arch]} B")
    except Exception as exc:  # report every failure, not just the first
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (80, 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--full", action="store_true", help="more head dims, geometries and dtypes")
    ap.add_argument("--json", default=None, help="write the per-kernel report here")
    args = ap.parse_args(argv)
    arches = [int(a) for a in args.arch.split(",")]
    for a in arches:
        if a not in SMEM_LIMIT:
            raise SystemExit(f"--arch {a}: known architectures are {sorted(SMEM_LIMIT)}")
    t0 = time.perf_counter()
    specs = record(args.full)
    jobs = [(i, a) for a in arches for i in range(len(specs))]
    print(f"{len(specs)} specializations recorded; compiling {len(jobs)} cubins on {args.jobs} processes")
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            rows = pool.map(_compile_one, jobs, chunksize=1)
    else:
        rows = [_compile_one(j) for j in jobs]
    bad = [r for r in rows if not r["ok"]]
    for a in arches:
        mine = [r for r in rows if r["arch"] == a and r["ok"]]
        for name in sorted({r["kernel"] for r in mine}):
            rs = [r for r in mine if r["kernel"] == name]
            print(f"sm_{a} {name:34s} {len(rs):3d} variants  shared <= {max(r['shared'] for r in rs):6d} B  "
                  f"regs <= {max(r.get('regs', 0) for r in rs):3d}  spills (local) <= {max(r.get('local', 0) for r in rs)} B")
    for r in bad:
        print(f"FAILED sm_{r['arch']} {r['spec']}\n  {r['error']}")
    wall = round(time.perf_counter() - t0, 1)
    print(f"{len(rows) - len(bad)}/{len(rows)} compiled in {wall} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "triton": triton.__version__, "torch": torch.__version__, "arches": arches, "wall_s": wall,
            "expected_kernels": sorted(launched_kernels()), "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
