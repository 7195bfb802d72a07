"""Calling the native ops of ``maep_fast._C`` from the Python entry points at little host cost.

An eager CPU call whose argument types its op module has recognised goes straight to the C++
entry of ``torch.ops.maep_fast.<op>.default`` (``NativeOp.goes_native`` / ``NativeOp.entry``).
The op checks shapes, dtypes and devices itself (the native side's guard of the contract stated
in the op module), so the Python checks, about 1 us of a 6 us call on a tiny tensor, run only
for a call it refuses, to raise the error that names the argument (``NativeOp.argument_error``).
On a GPU the checks are ~1 % of a call and the Python errors stay first.
"""
from __future__ import annotations

from typing import Callable

import torch


def eager(op):
    """``op``'s C++ entry ``_op`` in eager mode (``OpOverload.__call__`` only forwards to it);
    ``op`` itself while torch.compile traces."""
    return op if torch.compiler.is_compiling() else op._op


class NativeOp:
    """``torch.ops.maep_fast.<name>.default`` of one op, looked up once, and its eager fast path.

    ``check(*args)``: the op module's argument checks (its contract); raises ``TypeError`` /
    ``ValueError`` naming the argument, returns ``None`` for a valid call.
    """

    __slots__ = ("name", "_check", "_overload", "_entry")

    def __init__(self, name: str, check: Callable[..., None]):
        self.name, self._check = name, check
        self._overload = self._entry = None

    def overload(self):
        """``torch.ops.maep_fast.<name>.default``."""
        if self._overload is None:
            self._overload = getattr(torch.ops.maep_fast, self.name).default
        return self._overload

    def entry(self):
        """The overload's C++ entry ``_op``, for eager calls."""
        if self._entry is None:
            self._entry = self.overload()._op
        return self._entry

    def goes_native(self, backend: str, device: torch.device, resolve: Callable[..., str]) -> bool:
        """Whether an eager call on ``device`` resolves to the ``cpp`` backend, with ``resolve`` the
        op module's ``resolve_backend`` (so the fast path agrees with the module's other paths).
        An unknown or unavailable backend answers False: the full path reports it after the
        argument checks."""
        if torch.compiler.is_compiling():
            return False  # traced once: the full path
        try:
            return resolve(self.name, backend, device) == "cpp"
        except (RuntimeError, ValueError):
            return False

    def argument_error(self, refused: Exception, *args) -> Exception:
        """For a call the native op refused: the Python checks' error for ``args``, which names
        the argument, or the op's own error ``refused`` where the arguments pass them."""
        try:
            self._check(*args)
        except (TypeError, ValueError) as bad:
            return bad
        return refused
