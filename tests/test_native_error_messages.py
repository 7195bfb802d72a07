"""The native library formats its argument errors whole, and keeps libstdc++ to itself.

The first GPU machine's build crashed (SIGSEGV in ``std::ostream::_M_insert<long>``) in every
native error message that formats an integer: its toolchain linked pieces of libstdc++ into
``_C`` and exported them, so a stream built by the process's shared libstdc++ was formatted by
the module's copy. Linking ``-static-libstdc++`` here reproduces the mix as messages cut off at
the first number. CMakeLists.txt now links with ``-Wl,--exclude-libs,ALL``; these tests hold the
result on whatever toolchain built the library.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from maep_fast import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="needs the native extension")


def _native_error(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value)


def test_integer_and_shape_formatting_survive():
    x = torch.rand(2, 3)
    per = torch.full((2,), 0.1)
    msg = _native_error(lambda: torch.ops.maep_fast.pgd_step(x, torch.rand(2, 4), x, per, per, "linf", 1, 0.0, 1.0))
    assert "grad must have the shape of x [2, 3], got [2, 4]" in msg, msg


def test_float_formatting_survives():
    q = torch.rand(1, 1, 4, 8)
    msg = _native_error(lambda: torch.ops.maep_fast.masked_patch_attention(q, q, q, None, -0.5))
    assert "scale must be a positive finite number, got -0.5" in msg, msg


def test_per_sample_shape_formatting_survives():
    x = torch.rand(3, 2, 2)
    bad = torch.full((2,), 0.1)
    msg = _native_error(lambda: torch.ops.maep_fast.pgd_step(x, x, x, bad, torch.full((3,), 0.1), "linf", 1, 0.0, 1.0))
    assert "step_size must have shape [3] (one value per sample), got [2]" in msg, msg


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_no_libstdcxx_definitions_are_exported():
    """Strong (T) definitions in namespace std exported by _C can only come from a static
    libstdc++ (template instantiations are weak, W); exported, they interpose on the shared one."""
    from maep_fast import _C

    out = subprocess.run(["nm", "-D", "--defined-only", "-C", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    strong_std = [ln for ln in out.splitlines() if " T std::" in ln]
    assert not strong_std, f"{len(strong_std)} libstdc++ symbols exported by {_C.__file__}, e.g. {strong_std[:3]}"
