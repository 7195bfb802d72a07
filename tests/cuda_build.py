"""nvcc builds of the torch-free CUDA kernels for the compile-time tests, each made once.

``cubin(name, arch)`` compiles ``kernels/<name>.cu`` for ``sm_<arch>`` with the project's check
flags (``-O3 -Werror all-warnings``, ptxas verbose) into a cubin, cached under the system temp
directory by a hash of every kernels/ source and the flags: the compile check, the SASS tests of
the attention and of the memory-bound kernels share one build per (file, arch), in one pytest run
and across runs. Returns (cubin path, ptxas report). Skips (pytest.skip) without nvcc.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
FLAGS = ("-std=c++17", "-O3", "-Werror", "all-warnings", "-cubin", "-Xptxas", "-v")


def nvcc_path() -> str | None:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def cuobjdump_path(nvcc: str) -> str | None:
    cands = [os.environ.get("CUOBJDUMP"), str(Path(nvcc).resolve().parent / "cuobjdump"), shutil.which("cuobjdump"),
             "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton  # ships a cuobjdump with its NVIDIA backend

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:  # noqa: BLE001 - triton is optional here
        pass
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _key(name: str, arch: int, nvcc: str) -> str:
    h = hashlib.sha256()
    for p in sorted(KERNELS.glob("*.cu*")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(f"{name}|{arch}|{' '.join(FLAGS)}|{nvcc}".encode())
    return h.hexdigest()[:24]


def cubin(name: str, arch: int) -> tuple[Path, str]:
    nvcc = nvcc_path()
    if not nvcc:
        pytest.skip("nvcc not found")
    out_dir = Path(tempfile.gettempdir()) / "maep_fast_cubins" / _key(name, arch, nvcc)
    path, log = out_dir / f"{name}.sm_{arch}.cubin", out_dir / f"{name}.sm_{arch}.ptxas.txt"
    if path.is_file() and log.is_file():
        return path, log.read_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{os.getpid()}.{path.name}"
    res = subprocess.run([nvcc, *FLAGS, f"-arch=sm_{arch}", f"-I{KERNELS}", f"-I{ROOT}", str(KERNELS / f"{name}.cu"),
                          "-o", str(tmp)], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"nvcc failed for {name}.cu sm_{arch}:\n{res.stderr[-4000:]}"
    log.write_text(res.stderr)
    os.replace(tmp, path)
    return path, res.stderr


def cuobjdump_or_skip() -> str:
    """The cuobjdump to read cubins with; skips the test without nvcc or cuobjdump."""
    nvcc = nvcc_path()
    if not nvcc:
        pytest.skip("nvcc not found")
    tool = cuobjdump_path(nvcc)
    if not tool:
        pytest.skip("cuobjdump not found (nvcc's bin, PATH, CUOBJDUMP or triton's bundled copy)")
    return tool


def sass_by_function(cubin_path: Path, cuobjdump: str) -> dict[str, str]:
    """mangled kernel name -> its SASS text (cuobjdump -sass)."""
    text = subprocess.run([cuobjdump, "-sass", str(cubin_path)], capture_output=True, text=True, check=True,
                          timeout=300).stdout
    funcs: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
        elif cur is not None:
            funcs[cur].append(line)
    return {k: "\n".join(v) for k, v in funcs.items()}
