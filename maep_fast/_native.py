"""Loading of the optional native extension ``maep_fast._C``.

The extension registers the ``torch.ops.maep_fast.*`` C++ operators through
``TORCH_LIBRARY``; importing it is what runs that registration. Everything in
the package works without it (pure-PyTorch reference path); the absence is
reported once, at the first query, never on every call.
"""
from __future__ import annotations

import importlib
import os
import warnings

_STATE: dict[str, object] = {}


def native_available() -> bool:
    """True when ``maep_fast._C`` imported and its ops are registered."""
    if "ok" not in _STATE:
        if os.environ.get("MAEP_FAST_DISABLE_NATIVE", "0") == "1":
            _STATE["ok"] = False
            _STATE["why"] = "disabled by MAEP_FAST_DISABLE_NATIVE=1"
        else:
            try:
                importlib.import_module("maep_fast._C")  # the import runs the TORCH_LIBRARY registration

                _STATE["ok"] = True
                _STATE["why"] = ""
            except ImportError as exc:  # not built, or built against another torch
                _STATE["ok"] = False
                _STATE["why"] = str(exc)
                warnings.warn(
                    "maep_fast: native extension maep_fast._C is not available "
                    f"({exc}); using the pure-PyTorch reference path. Build it with "
                    "`pip install --no-build-isolation -e .`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return bool(_STATE["ok"])


def native_unavailable_reason() -> str:
    native_available()
    return str(_STATE.get("why", ""))
