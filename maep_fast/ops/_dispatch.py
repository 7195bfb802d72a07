"""Backend selection shared by the ops.

``backend`` is one of ``auto | torch | triton | cpp | cuda``:

- ``torch``: the pure-PyTorch reference (any device).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors only under the Triton
  interpreter, ``TRITON_INTERPRET=1``, which is for tests, not speed).
- ``cpp``: C++ CPU kernels of ``maep_fast._C`` (``torch.ops.maep_fast.*``).
- ``cuda``: CUDA kernels of ``maep_fast._C``.

``auto`` picks, per device, the first available entry of ``AUTO_ORDER`` (or of
``AUTO_ORDER_BY_OP`` where one op's order differs);
``MAEP_FAST_BACKEND`` overrides ``auto`` everywhere (``MAEP_FAST_BACKEND=torch``
is the global reference-path switch). An explicitly requested backend that is
not available raises; it never falls back silently.
"""
from __future__ import annotations

import os

import torch

from maep_fast._native import native_available, native_unavailable_reason

KNOWN_BACKENDS = ("auto", "torch", "triton", "cpp", "cuda")

# Which backends each op implements; op modules add to this when they define kernels.
IMPLEMENTED: dict[str, set[str]] = {}

# auto's preference per device type, fastest first (figures, commands and machines: docs/benchmarks.md).
# cpu: the C++ kernels beat the eager reference on every op and shape benchmarked; torch.compile of the
#   reference ties them in one case only, and auto cannot assume the caller compiles.
# cuda: Triton first: its patch_recon_loss and attention kernels are faster than the CUDA ones.
#   pgd_step is the exception (AUTO_ORDER_BY_OP): its CUDA kernel ties Triton's in kernel time and costs
#   a fraction of Triton's host time per call, and PGD / MAE-Pure loops make one call per iteration.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# (device type, op) -> order, where one op's measurements disagree with its device's AUTO_ORDER.
AUTO_ORDER_BY_OP: dict[tuple[str, str], tuple[str, ...]] = {("cuda", "pgd_step"): ("cuda", "triton", "torch")}


def register_backends(op: str, *backends: str) -> None:
    for b in backends:
        if b not in KNOWN_BACKENDS or b == "auto":
            raise ValueError(f"unknown backend {b!r}")
    IMPLEMENTED.setdefault(op, {"torch"}).update(backends)
    _RESOLVED.clear()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_ERROR: list[str] = []
_RESOLVED: dict[tuple, tuple] = {}  # see resolve_backend


@torch.compiler.assume_constant_result
def _triton_import_error() -> str:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_ERROR.append("")
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_ERROR.append(f"triton is not importable ({exc})")
    return _TRITON_ERROR[0]


@torch.compiler.assume_constant_result  # a registry query: constant while torch.compile traces
def _native_has_kernel(op: str, key: str) -> bool:
    if not native_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"maep_fast::{op}", key)
    except RuntimeError:
        return False


def unavailable_reason(op: str, backend: str, device: torch.device) -> str:
    """'' when ``backend`` can run ``op`` on ``device``, else why not."""
    if backend == "torch":
        return ""
    if backend not in IMPLEMENTED.get(op, {"torch"}):
        return f"{op} has no {backend!r} implementation"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return ""
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}"
    if not native_available():
        return "the native extension maep_fast._C is not available: " + native_unavailable_reason()
    if backend == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs CPU tensors only; got {device}"
        return "" if _native_has_kernel(op, "CPU") else f"maep_fast._C has no CPU kernel for {op}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors only; got {device}"
        return "" if _native_has_kernel(op, "CUDA") else f"maep_fast._C was built without a CUDA kernel for {op}"
    return f"unknown backend {backend!r}"


@torch.compiler.assume_constant_result
def requested_backend(backend: str) -> str:
    """``backend`` after validation, with ``MAEP_FAST_BACKEND`` applied to ``auto``."""
    if not isinstance(backend, str) or backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be one of {KNOWN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MAEP_FAST_BACKEND", "auto")
        if env not in KNOWN_BACKENDS:
            raise ValueError(f"MAEP_FAST_BACKEND must be one of {KNOWN_BACKENDS}, got {env!r}")
        backend = env
    return backend


# (op, backend, device) -> (backend, and what it was resolved under: the device type's AUTO_ORDER
# and AUTO_ORDER_BY_OP entries, MAEP_FAST_BACKEND, TRITON_INTERPRET). Resolution reads the registry
# and the native library, which do not change while a process runs; a hit is checked against the
# current orders and environment by identity (a changed entry or variable is a new object), so tests
# that change them still see the change. device.type builds a new str on every read (~0.25 us):
# the key holds the device itself, the entry the type and the AUTO_ORDER_BY_OP key.

# os.environ.get encodes the name on every call (~0.7 us, half a torch.add on a tiny tensor); the
# mapping it wraps is a plain dict of encoded names, read directly where the platform has it.
_ENV_DATA = getattr(os.environ, "_data", None)
if isinstance(_ENV_DATA, dict) and os.name == "posix":
    _ENV_BACKEND, _ENV_INTERPRET = os.fsencode("MAEP_FAST_BACKEND"), os.fsencode("TRITON_INTERPRET")
    _getenv = _ENV_DATA.get
else:  # pragma: no cover - non-POSIX
    _ENV_BACKEND, _ENV_INTERPRET = "MAEP_FAST_BACKEND", "TRITON_INTERPRET"
    _getenv = os.environ.get


@torch.compiler.assume_constant_result  # registry + environment: constant while torch.compile traces
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend that will run ``op`` for tensors on ``device``.

    Cached per (op, backend, device), checked against the orders and environment: an op call pays
    one dict lookup and four identity tests here. An explicitly requested backend that is not
    available raises every time (never cached).
    """
    hit = _RESOLVED.get((op, backend, device))
    if (hit is not None and hit[1] is AUTO_ORDER.get(hit[5]) and hit[2] is AUTO_ORDER_BY_OP.get(hit[6])
            and hit[3] is _getenv(_ENV_BACKEND) and hit[4] is _getenv(_ENV_INTERPRET)):
        return hit[0]
    dev = device.type
    by_op_key = (dev, op)
    resolved = _resolve_uncached(op, backend, device)
    _RESOLVED[(op, backend, device)] = (resolved, AUTO_ORDER.get(dev), AUTO_ORDER_BY_OP.get(by_op_key),
                                        _getenv(_ENV_BACKEND), _getenv(_ENV_INTERPRET), dev, by_op_key)
    return resolved


def _resolve_uncached(op: str, backend: str, device: torch.device) -> str:
    backend = requested_backend(backend)
    if backend == "auto":
        order = AUTO_ORDER_BY_OP.get((device.type, op)) or AUTO_ORDER.get(device.type, ("torch",))
        for cand in order:
            if not unavailable_reason(op, cand, device):
                return cand
        return "torch"
    why = unavailable_reason(op, backend, device)
    if why:
        raise RuntimeError(f"backend={backend!r} was requested for {op} but is not available: {why}")
    return backend


def explicit_backend(backend: str) -> bool:
    """True when the caller (or MAEP_FAST_BACKEND) named a backend: no silent fallback is allowed."""
    return backend != "auto" or os.environ.get("MAEP_FAST_BACKEND", "auto") != "auto"
