"""Masked-patch attention: reference, Triton, C++ CPU and CUDA paths.

This docstring is the op's contract; ``_validate`` checks it (shapes, dtypes and
devices, never values), ``_empty_outputs`` gives the outputs' shapes for the
fake kernels, and the native kernels' guard (``check_mpa_args``,
csrc/masked_patch_attention.h) and the Triton kernels refer here.

q, k, v: [B, H, L, D], non-empty, one float dtype (fp16 / bf16 / fp32 / fp64),
one device. keep: optional bool [B, L] on that device, True = visible patch.
scale: None (D**-0.5) or a positive finite number.
Returns out [B, H, L, D] in q's dtype. Softmax runs over visible keys only; rows
of hidden queries are zeros and get zero gradient. keep=None is plain attention.
``return_attn`` (reference only) also returns the attention matrix [B, H, L, L]
(the AMV diagnostic reads it). A wrong argument raises before any kernel runs,
naming it: ``TypeError`` for a non-tensor or a wrong dtype, ``ValueError`` for a
wrong rank, shape, device or scale.

Backends (``backend=``, see ``maep_fast.ops._dispatch``):

- ``torch``: ``masked_patch_attention_reference``.
- ``triton``: ``maep_fast.ops.triton_kernels.masked_patch_attention`` (fp32 / fp16 /
  bf16, head dim <= 256). Both kernels are registered as
  ``torch.ops.maep_fast.masked_patch_attention_triton`` (-> out, lse; differentiable in
  q, k, v: forward saves q, k, v, out, logsumexp, backward gives dq, dk, dv) and
  ``..._triton_backward`` with fake implementations, so ``torch.compile(fullgraph=True)``
  traces them and ``torch.library.opcheck`` passes; ``MaskedPatchAttentionTriton``
  (autograd.Function) returns ``out`` with that same backward.
- ``cpp`` / ``cuda``: ``torch.ops.maep_fast.masked_patch_attention`` of ``maep_fast._C``
  (autograd registered in ``maep_fast.ops._native_ops``).

``auto`` on inputs the Triton kernels do not take (fp64, head dim > 256) uses the
next available backend; an explicit ``backend="triton"`` raises instead.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from maep_fast._checks import check_same_device, check_tensor
from maep_fast.ops._dispatch import explicit_backend, register_backends, resolve_backend, unavailable_reason
from maep_fast.ops._fastcall import NativeOp, eager

OP = "masked_patch_attention"
register_backends(OP, "triton", "cpp", "cuda")

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256  # = triton_kernels.masked_patch_attention.MAX_HEAD_DIM (not imported: triton is optional)


_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _validate(q, k, v, keep, scale, *, full: bool = False) -> None:
    """The contract's checks (module docstring): raise naming the argument, else return None.

    Shapes, dtypes and devices only, never tensor values (no host sync). The common call is
    recognised first by one expression, at half the cost of the named checks, which run for
    anything else (and for every call with ``full=True``)."""
    if (not full and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dtype in _FLOATS and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4
            and k.shape == q.shape and v.shape == q.shape and q.numel() > 0 and _scale_ok(scale)):
        dev = q.device
        if k.device == dev and v.device == dev and (
                keep is None or (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.dim() == 2
                                 and keep.shape[0] == q.shape[0] and keep.shape[1] == q.shape[2]
                                 and keep.device == dev)):
            return
    check_tensor(q, "q", ndim=4)
    check_tensor(k, "k", ndim=4, dtypes=(q.dtype,))
    check_tensor(v, "v", ndim=4, dtypes=(q.dtype,))
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, L, D]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    check_same_device("q", q, "k", k)
    check_same_device("q", q, "v", v)
    if keep is not None:
        check_tensor(keep, "keep", ndim=2, dtypes=(torch.bool,))
        if tuple(keep.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"keep must have shape [B, L] = [{q.shape[0]}, {q.shape[2]}], got {list(keep.shape)}")
        check_same_device("q", q, "keep", keep)
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                  and 0 < scale < math.inf):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def _scale_ok(scale) -> bool:
    """The common scale: None or a positive finite float (other numbers take the named checks)."""
    return scale is None or (type(scale) is float and 0.0 < scale < math.inf)


def _empty_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (out [B, H, L, D] in q's dtype, contiguous; lse [B, H, L] in fp32, fp64 for
    fp64 q): the outputs' shapes and dtypes, for the fake kernels."""
    b, h, length, _ = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, h, length), dtype=stat)


def masked_patch_attention_reference(q, k, v, keep=None, scale=None, return_attn=False):
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 statistics for low precision
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale  # [B, H, L, L]
    if keep is not None:
        kmask = keep[:, None, None, :]
        scores = scores.masked_fill(~kmask, float("-inf"))
        # a query row whose sample has no visible key would be all -inf: make it finite
        scores = torch.where(keep.any(dim=1)[:, None, None, None], scores, torch.zeros_like(scores))
    attn = scores.softmax(dim=-1)
    if keep is not None:
        attn = attn * keep[:, None, :, None].to(attn.dtype)  # hidden query rows -> 0
    out = torch.matmul(attn, v.to(acc)).to(q.dtype)
    return (out, attn) if return_attn else out


# ------------------------------------------------------------------------------------
# Triton path: custom ops (opaque to torch.compile, with fake impls) + autograd
# ------------------------------------------------------------------------------------

@torch.library.custom_op("maep_fast::masked_patch_attention_triton", mutates_args=())
def _triton_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, L, D] in q's dtype, lse [B, H, L] fp32): the Triton forward kernel."""
    from maep_fast.ops.triton_kernels.masked_patch_attention import attn_fwd

    return attn_fwd(q, k, v, keep, scale)


@_triton_fwd_op.register_fake
def _(q, k, v, keep, scale):
    return _empty_outputs(q)


@torch.library.custom_op("maep_fast::masked_patch_attention_triton_backward", mutates_args=())
def _triton_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each [B, H, L, D] in q's dtype: the Triton backward kernel."""
    from maep_fast.ops.triton_kernels.masked_patch_attention import attn_bwd

    return attn_bwd(dout, q, k, v, keep, out, lse, scale)


@_triton_bwd_op.register_fake
def _(dout, q, k, v, keep, out, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _triton_save(ctx, q, k, v, keep, scale, out, lse) -> None:
    """Saves what the backward reads: q, k, v, keep, out, the logsumexp lse and scale."""
    ctx.save_for_backward(q, k, v, keep, out, lse)
    ctx.scale = scale


def _triton_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # lse gets no gradient
    _triton_save(ctx, *inputs, *output)


def _triton_backward(ctx, dout, _dlse=None):
    """(dq, dk, dv) from the FlashAttention-2 style backward kernel; none for keep and scale."""
    q, k, v, keep, out, lse = ctx.saved_tensors
    dq, dk, dv = _triton_bwd_op(dout, q, k, v, keep, out, lse, ctx.scale)
    return dq, dk, dv, None, None


_triton_fwd_op.register_autograd(_triton_backward, setup_context=_triton_setup_context)


class MaskedPatchAttentionTriton(torch.autograd.Function):
    """``out`` of ``torch.ops.maep_fast.masked_patch_attention_triton``, differentiated by that op's
    own backward (``_triton_save`` / ``_triton_backward``): the backend's entry, named in ``grad_fn``."""

    @staticmethod
    def forward(ctx, q, k, v, keep, scale):
        out, lse = _triton_fwd_op(q, k, v, keep, scale)
        _triton_save(ctx, q, k, v, keep, scale, out, lse)
        return out

    backward = staticmethod(_triton_backward)


def _triton_unsupported(q: torch.Tensor) -> tuple[str, type]:
    if q.dtype not in TRITON_DTYPES:
        return f"q must have dtype in {[str(d) for d in TRITON_DTYPES]} for backend 'triton', got {q.dtype}", TypeError
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"q head dim D={q.shape[-1]} exceeds {TRITON_MAX_HEAD_DIM}, the maximum of backend 'triton'", ValueError
    return "", ValueError


CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 128  # the limits csrc/masked_patch_attention_cuda.cpp checks too
CUDA_MAX_LEN = 65535 * 4


def _cuda_unsupported(q: torch.Tensor) -> tuple[str, type]:
    """Why the CUDA kernel cannot run ``q`` ('' when it can), and the exception type to raise.

    Checked here, in Python, before the op is called: an explicit ``backend="cuda"`` call
    the kernel cannot run must end in a Python exception, never reach the launch."""
    if q.dtype not in CUDA_DTYPES:
        return (f"q must have dtype in {[str(d) for d in CUDA_DTYPES]} for backend 'cuda', got {q.dtype} "
                "(use backend 'cpp' or 'torch' for float64)"), TypeError
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        return f"q head dim D={q.shape[-1]} exceeds {CUDA_MAX_HEAD_DIM}, the maximum of backend 'cuda'", ValueError
    if q.shape[2] > CUDA_MAX_LEN:
        return f"q sequence length L={q.shape[2]} exceeds {CUDA_MAX_LEN}, the maximum of backend 'cuda'", ValueError
    return "", ValueError


_NATIVE = NativeOp(OP, _validate)
_native_attention = _NATIVE.overload  # a module attribute: tests replace it to watch the CUDA path


def _goes_native(q, scale, backend) -> bool:
    """Whether an eager call can go straight to the C++ CPU op (``maep_fast.ops._fastcall``): a
    tensor q, a plain scale, backend cpp. The CUDA path checks first: its kernel is never given
    inputs it cannot run."""
    return isinstance(q, torch.Tensor) and _scale_ok(scale) and _NATIVE.goes_native(backend, q.device, resolve_backend)


def masked_patch_attention(q, k, v, keep=None, *, scale=None, backend="auto"):
    """Attention over visible patches; see module docstring for shapes and backends."""
    if _goes_native(q, scale, backend):
        try:
            return _NATIVE.entry()(q, k, v, keep, q.shape[-1] ** -0.5 if scale is None else scale)
        except Exception as refused:  # re-raised as it is unless the Python checks name an argument
            raise _NATIVE.argument_error(refused, q, k, v, keep, scale) from None
    _validate(q, k, v, keep, scale)
    chosen = resolve_backend(OP, backend, q.device)
    scale_f = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "cpp":
        return eager(_native_attention())(q, k, v, keep, scale_f)
    if chosen == "triton":
        why, exc = _triton_unsupported(q)
        if not why:
            return MaskedPatchAttentionTriton.apply(q, k, v, keep, scale_f)
        if explicit_backend(backend):
            raise exc(why)
        cuda_ok = not unavailable_reason(OP, "cuda", q.device) and not _cuda_unsupported(q)[0]
        chosen = "cuda" if cuda_ok else "torch"
    if chosen == "cuda":
        why, exc = _cuda_unsupported(q)
        if why:
            if explicit_backend(backend):
                raise exc(why)
            chosen = "torch"  # auto: inputs the CUDA kernel does not take (fp64, D > 128) run the reference
        else:  # autograd registered in C++ (fakes in ops/_native_ops.py, imported by ops/)
            return _native_attention()(q, k, v, keep, scale_f)
    return masked_patch_attention_reference(q, k, v, keep, scale)
