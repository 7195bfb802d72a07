"""Thin driver of the native build; the build itself is defined in CMakeLists.txt.

Metadata lives in pyproject.toml. Install (editable, against the torch already
installed)::

    pip install --no-build-isolation -e .

Environment:
    MAEP_FAST_NATIVE=0      skip the native build (pure-Python install)
    MAEP_FAST_CUDA=0|1      CUDA kernels; default: on iff torch has CUDA and nvcc is found
    MAEP_FAST_CUDA_ARCHS    CMAKE_CUDA_ARCHITECTURES (default "80;90")
    MAX_JOBS                parallel compile jobs (default: all cores)
    MAEP_FAST_BUILD_DIR     CMake build directory (default build/cmake-<tag>, kept for
                            incremental rebuilds)
    CMAKE_ARGS              extra arguments for the CMake configure step
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    v = v.strip().lower()
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def _find_nvcc() -> str | None:
    cands = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            cands.append(os.path.join(home, "bin", "nvcc"))
    cands.append(shutil.which("nvcc"))
    cands.append("/usr/local/cuda/bin/nvcc")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as _cmake_mod  # pip package "cmake"

            cand = os.path.join(_cmake_mod.CMAKE_BIN_DIR, "cmake")
            cmake = cand if os.path.isfile(cand) else None
        except ImportError:
            cmake = None
    if cmake is None:
        raise RuntimeError(
            "maep_fast: cmake (>= 3.18) is needed for the native build; install it (e.g. `pip install cmake`) "
            "or install without the extension: MAEP_FAST_NATIVE=0 pip install --no-build-isolation -e ."
        )
    return cmake


def _generator() -> tuple[list[str], str]:
    ninja = shutil.which("ninja")
    if ninja is None:
        try:
            import ninja as _ninja_mod  # pip package "ninja"

            cand = os.path.join(_ninja_mod.BIN_DIR, "ninja")
            ninja = cand if os.path.isfile(cand) else None
        except ImportError:
            ninja = None
    if ninja:
        return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"], "ninja"
    return ["-G", "Unix Makefiles"], "make"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def _want_cuda(self, torch) -> tuple[bool, str | None]:
        nvcc = _find_nvcc()
        want = _flag("MAEP_FAST_CUDA")
        if want is True:
            if nvcc is None:
                raise RuntimeError(
                    "MAEP_FAST_CUDA=1 but nvcc was not found (looked at $CUDACXX, $CUDA_HOME/bin, PATH, "
                    "/usr/local/cuda/bin). Install the CUDA toolkit or build CPU-only with MAEP_FAST_CUDA=0."
                )
            if not torch.version.cuda:
                raise RuntimeError(
                    f"MAEP_FAST_CUDA=1 but the installed torch {torch.__version__} has no CUDA support; the CUDA "
                    "glue links against libtorch_cuda. Install a CUDA torch or build with MAEP_FAST_CUDA=0."
                )
            return True, nvcc
        if want is False:
            return False, None
        if torch.version.cuda and nvcc is None:
            warnings.warn(
                f"maep_fast: torch {torch.__version__} has CUDA {torch.version.cuda} but nvcc was not found; "
                "building the CPU kernels only (set CUDA_HOME or MAEP_FAST_CUDA=1 to insist).",
                stacklevel=1,
            )
            return False, None
        return (True, nvcc) if torch.version.cuda else (False, None)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch  # the installed torch: build with --no-build-isolation

        cuda, nvcc = self._want_cuda(torch)
        cmake = _find_cmake()
        gen_args, gen_name = _generator()
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_path)
        os.makedirs(out_dir, exist_ok=True)
        ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' if cuda else 'cpu'}-{gen_name}"
        build_dir = os.path.abspath(os.environ.get("MAEP_FAST_BUILD_DIR") or os.path.join(ROOT, "build", f"cmake-{tag}"))
        os.makedirs(build_dir, exist_ok=True)

        cfg = "Debug" if self.debug else "Release"
        args = [
            cmake,
            "-S", ROOT,
            "-B", build_dir,
            *gen_args,
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMAEP_FAST_EXT_SUFFIX={ext_suffix}",
            f"-DMAEP_FAST_OUTPUT_DIR={out_dir}",
            f"-DMAEP_FAST_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('MAEP_FAST_CUDA_ARCHS', '80;90')}",
            ]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        if not jobs.isdigit() or int(jobs) < 1:
            raise ValueError(f"MAX_JOBS must be a positive integer, got {jobs!r}")

        print(f"maep_fast: native build ({'CPU+CUDA' if cuda else 'CPU'}, {gen_name}, -j{jobs}) in {build_dir}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(args, check=True)
        t1 = time.perf_counter()
        subprocess.run([cmake, "--build", build_dir, "--config", cfg, "--parallel", jobs], check=True)
        t2 = time.perf_counter()
        if not os.path.isfile(out_path):
            raise RuntimeError(f"maep_fast: the CMake build did not produce {out_path}")
        print(f"maep_fast: configure {t1 - t0:.1f} s, build {t2 - t1:.1f} s -> {out_path}", flush=True)


native = _flag("MAEP_FAST_NATIVE")
if native is False:
    # Pure-Python install. Drop a stale in-tree module from an earlier editable
    # native build, which would otherwise still be imported.
    for stale in glob.glob(os.path.join(ROOT, "maep_fast", "_C.*.so")) + glob.glob(
        os.path.join(ROOT, "maep_fast", "_C.*.pyd")
    ):
        print(f"maep_fast: MAEP_FAST_NATIVE=0, removing stale {stale}")
        os.remove(stale)
    ext_modules: list[Extension] = []
else:
    ext_modules = [CMakeExtension("maep_fast._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
