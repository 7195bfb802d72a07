"""Masked-patch attention: reference, Triton, C++ CPU and CUDA paths.

q, k, v: [B, H, L, D]; keep: optional bool [B, L], True = visible patch.
Softmax runs over visible keys only; rows of hidden queries are zeros and get
zero gradient. keep=None is plain attention. ``return_attn`` (reference only)
also returns the attention matrix [B, H, L, L] (the AMV diagnostic reads it).

Backends (``backend=``, see ``maep_fast.ops._dispatch``):

- ``torch``: ``masked_patch_attention_reference``.
- ``triton``: ``maep_fast.ops.triton_kernels.masked_patch_attention`` (fp32 / fp16 /
  bf16, head dim <= 256), through ``MaskedPatchAttentionTriton`` (autograd.Function:
  forward saves q, k, v, out, logsumexp; backward gives dq, dk, dv). Both kernels are
  registered as ``torch.ops.maep_fast.masked_patch_attention_triton`` (-> out, lse;
  differentiable in q, k, v) and ``..._triton_backward`` with fake implementations, so
  ``torch.compile(fullgraph=True)`` traces them and ``torch.library.opcheck`` passes.
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

OP = "masked_patch_attention"
register_backends(OP, "triton", "cpp", "cuda")

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256  # = triton_kernels.masked_patch_attention.MAX_HEAD_DIM (not imported: triton is optional)


_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _validate(q, k, v, keep, scale):
    """The common call is recognised by one expression; anything else takes the full checks,
    which raise naming the argument."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dtype in _FLOATS and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == 4
            and k.shape == q.shape and v.shape == q.shape and q.numel() > 0
            and (scale is None or (type(scale) is float and 0.0 < scale < math.inf))):
        dev = q.device
        if k.device == dev and v.device == dev and (
                keep is None or (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.dim() == 2
                                 and keep.shape[0] == q.shape[0] and keep.shape[1] == q.shape[2]
                                 and keep.device == dev)):
            return
    _validate_full(q, k, v, keep, scale)


def _validate_full(q, k, v, keep, scale):
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
    from maep_fast.ops.triton_kernels.masked_patch_attention import attn_fwd

    return attn_fwd(q, k, v, keep, scale)


@_triton_fwd_op.register_fake
def _(q, k, v, keep, scale):
    b, h, length, _d = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, length), dtype=torch.float32)


@torch.library.custom_op("maep_fast::masked_patch_attention_triton_backward", mutates_args=())
def _triton_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from maep_fast.ops.triton_kernels.masked_patch_attention import attn_bwd

    return attn_bwd(dout, q, k, v, keep, out, lse, scale)


@_triton_bwd_op.register_fake
def _(dout, q, k, v, keep, out, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _op_setup_context(ctx, inputs, output):
    q, k, v, keep, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, keep, out, lse)
    ctx.scale = scale


def _op_backward(ctx, dout, _dlse):
    q, k, v, keep, out, lse = ctx.saved_tensors
    dq, dk, dv = _triton_bwd_op(dout, q, k, v, keep, out, lse, ctx.scale)
    return dq, dk, dv, None, None


_triton_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class MaskedPatchAttentionTriton(torch.autograd.Function):
    """Triton forward (saves q, k, v, out, logsumexp) and FlashAttention-2 style backward."""

    @staticmethod
    def forward(ctx, q, k, v, keep, scale):
        out, lse = _triton_fwd_op(q, k, v, keep, scale)
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, keep, out, lse = ctx.saved_tensors
        dq, dk, dv = _triton_bwd_op(dout, q, k, v, keep, out, lse, ctx.scale)
        return dq, dk, dv, None, None


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


_NATIVE: list = []


def _native_attention():
    """``torch.ops.maep_fast.masked_patch_attention.default``, looked up once."""
    if not _NATIVE:
        _NATIVE.append(torch.ops.maep_fast.masked_patch_attention.default)
    return _NATIVE[0]


_NATIVE_ENTRY: list = []


def _native_entry():
    """The overload's C++ entry ``_op``, looked up once: OpOverload.__call__ only forwards to it."""
    if not _NATIVE_ENTRY:
        _NATIVE_ENTRY.append(_native_attention()._op)
    return _NATIVE_ENTRY[0]


def _goes_native(q, scale, backend) -> bool:
    """Whether an eager call can go straight to the C++ CPU op: a tensor q, a plain scale, backend
    cpp. The op checks shapes, dtypes and devices itself (the kernel: check_mpa_args in
    csrc/masked_patch_attention.h; the fakes, for meta or fake tensors: _validate), so the Python
    checks, about 1 us of a 6 us call on a tiny tensor, run only for a call it refuses, to raise
    naming the argument. The CUDA path checks first: its kernel is never given inputs it cannot run."""
    if torch.compiler.is_compiling():
        return False  # traced once: the full path below
    if not (isinstance(q, torch.Tensor) and (scale is None or (type(scale) is float and 0.0 < scale < math.inf))):
        return False
    try:
        return resolve_backend(OP, backend, q.device) == "cpp"
    except (RuntimeError, ValueError):
        return False  # an unknown or unavailable backend is reported after the argument checks


def _argument_error(refused: Exception, q, k, v, keep, scale) -> Exception:
    """For a call the native op refused: the Python checks' error, which names the argument, or
    the op's own error where the arguments pass them."""
    try:
        _validate_full(q, k, v, keep, scale)
    except (TypeError, ValueError) as bad:
        return bad
    return refused


def masked_patch_attention(q, k, v, keep=None, *, scale=None, backend="auto"):
    """Attention over visible patches; see module docstring for shapes and backends."""
    if _goes_native(q, scale, backend):
        try:
            return _native_entry()(q, k, v, keep, q.shape[-1] ** -0.5 if scale is None else scale)
        except Exception as refused:  # re-raised as it is unless the Python checks name an argument
            raise _argument_error(refused, q, k, v, keep, scale) from None
    _validate(q, k, v, keep, scale)
    chosen = resolve_backend(OP, backend, q.device)
    scale_f = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if chosen == "cpp":
        op = _native_attention()
        if not torch.compiler.is_compiling():
            op = op._op  # the overload's C++ entry itself: OpOverload.__call__ only forwards to it
        return op(q, k, v, keep, scale_f)
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
