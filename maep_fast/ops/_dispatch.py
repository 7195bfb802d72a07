"""Backend selection shared by the ops.

``backend`` is one of ``auto | torch | cpp`` (``triton`` and ``cuda`` join
them as the kernels land). ``MAEP_FAST_BACKEND`` overrides ``auto``.
An explicitly requested backend that is not available raises; it never
falls back silently.
"""
from __future__ import annotations

import os

import torch

from maep_fast._native import native_available, native_unavailable_reason

KNOWN_BACKENDS = ("auto", "torch", "cpp")


def resolve_backend(backend: str, device: torch.device, *, has_cpp: bool = True) -> str:
    """Return the concrete backend ("torch" or "cpp") for tensors on ``device``.

    ``has_cpp`` says whether this op has a C++ implementation for ``device``.
    """
    if not isinstance(backend, str) or backend not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be one of {KNOWN_BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("MAEP_FAST_BACKEND", "auto")
        if env not in KNOWN_BACKENDS:
            raise ValueError(f"MAEP_FAST_BACKEND must be one of {KNOWN_BACKENDS}, got {env!r}")
        if env != "auto":
            backend = env
    if backend == "auto":
        if device.type == "cpu" and has_cpp and native_available():
            return "cpp"
        return "torch"
    if backend == "cpp":
        if not native_available():
            raise RuntimeError(
                "backend='cpp' was requested but the native extension is not available: "
                + native_unavailable_reason()
            )
        if not has_cpp or device.type != "cpu":
            raise RuntimeError(f"backend='cpp' has no kernel for tensors on {device}")
    return backend
