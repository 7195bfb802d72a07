"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong
shape, device, value) naming the offending argument, and runs before any
kernel launch.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    x: object,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    nonempty: bool = True,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have rank {want}, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if nonempty and x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); an empty batch cannot be processed")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_images(
    x: object,
    name: str = "x",
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Validate an image batch [N, C, H, W] with pixels in ``value_range`` (metadata, then
    ``check_pixels``: one host sync)."""
    x = check_tensor(x, name, ndim=4)
    n, c, h, w = x.shape
    if channels is not None and c != channels:
        raise ValueError(f"{name} must have {channels} channel(s) (shape [N, {channels}, H, W]), got shape {tuple(x.shape)}")
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"{name} must be {size[0]}x{size[1]} pixels, got {h}x{w}")
    if device is not None and x.device.type != torch.device(device).type:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    check_pixels(x, name, value_range)
    return x


def check_pixels(x: torch.Tensor, name: str = "x", value_range: tuple[float, float] | None = (0.0, 1.0)) -> None:
    """The data-dependent image checks (finite values, pixels in ``value_range``), with one host
    synchronization: run once at an API edge (``Purifier.purify``, ``MAEPure.purify``, the attack
    entry points), never inside an op or an iteration."""
    xd = x.detach()
    if value_range is None:
        if not bool(torch.isfinite(xd).all()):
            raise ValueError(f"{name} contains NaN or Inf values")
        return
    lo, hi = value_range
    mn, mx = torch.aminmax(xd)
    finite, xmin, xmax = torch.stack([torch.isfinite(xd).all().to(mn.dtype), mn, mx]).tolist()  # one sync
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf values")
    if xmin < lo - 1e-6 or xmax > hi + 1e-6:
        raise ValueError(f"{name} must hold pixel values in [{lo}, {hi}], got values in [{xmin:.4g}, {xmax:.4g}]")


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move them to one device")


def check_nonneg_number(v: object, name: str, *, positive: bool = False) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar here, got shape {tuple(v.shape)}")
        v = float(v)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if v != v or abs(v) == math.inf:  # (not math.isfinite: torch.compile cannot trace it on constants)
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {v}")
    return v


def check_ratio(v: object, name: str) -> float:
    v = check_nonneg_number(v, name)
    if not v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {v}")
    return v


def check_int(v: object, name: str, *, low: int | None = None) -> int:
    """An int (numpy ints too, never a bool) that is ``>= low``; ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def check_real(v: object, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (never a bool) in the interval given by ``low`` / ``high`` (closed
    unless ``low_open`` / ``high_open``); ValueError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if v != v or abs(v) == math.inf:
        raise ValueError(f"{name} must be finite, got {v}")
    too_low = low is not None and (v <= low if low_open else v < low)
    too_high = high is not None and (v >= high if high_open else v > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {interval_text(low, high, low_open, high_open)}, got {v:g}")
    return v


def check_bool(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {v!r}")
    return v


def interval_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """'>= 0', '> 0', 'in [0, 1)', ... for error messages."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "a number"
