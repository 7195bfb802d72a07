"""Fake (meta) kernels and autograd of the native ops of ``maep_fast._C``.

Registers, for the C++ ops defined in ``csrc/registration.cpp``:

- ``maep_fast::patch_recon_loss`` / ``patch_recon_loss_backward``: fakes only; the
  autograd of ``patch_recon_loss`` (gradients to ``pred`` and ``imgs``; the mask gets
  none) is a C++ autograd node (csrc/patch_recon_loss_autograd.cpp), so a call runs no
  Python below the op. The fake runs the public op's argument checks: the eager op
  leaves them to the kernels, and a meta or fake input reaches none.
- ``maep_fast::masked_patch_attention`` (public, -> out): fake only; its
  autograd is a C++ autograd node (csrc/masked_patch_attention_cpu.cpp)
  that saves the logsumexp of ``masked_patch_attention_fwd`` and calls
  ``masked_patch_attention_bwd``, so it is differentiable as soon as
  ``maep_fast._C`` is loaded (torch.compile needs the fakes registered here).
  Its fake and that of ``_fwd`` run the public op's argument checks, as the
  loss's fake does.
- ``maep_fast::masked_patch_attention_fwd`` -> (out, lse) /
  ``masked_patch_attention_bwd`` -> (dq, dk, dv): fakes, and autograd on
  ``masked_patch_attention_fwd`` (the lse output gets no gradient).

Importing this module is harmless without the native extension (nothing is
registered). It is idempotent: a second import registers nothing again.
"""
from __future__ import annotations

import torch

from maep_fast._native import native_available

_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    lib = "maep_fast::"

    # ------------------------------------------------------------------ patch_recon_loss
    @torch.library.register_fake(lib + "patch_recon_loss")
    def _prl_fake(pred, imgs, mask, patch_size, norm_pix, p, reduction):
        from maep_fast.ops.patch_recon_loss import _out_shape, _validate

        _validate(pred, imgs, mask, patch_size, p, reduction)
        return pred.new_empty(_out_shape(pred.shape[0], pred.shape[1], reduction))

    @torch.library.register_fake(lib + "patch_recon_loss_backward")
    def _prl_bwd_fake(grad_out, pred, imgs, mask, patch_size, norm_pix, p, reduction):
        return torch.empty_like(pred), torch.empty_like(imgs)

    # autograd of patch_recon_loss: a C++ autograd node (csrc/patch_recon_loss_autograd.cpp)

    # ------------------------------------------------------------------ masked_patch_attention
    @torch.library.register_fake(lib + "masked_patch_attention")
    def _mpa_fake(q, k, v, keep, scale):
        from maep_fast.ops.masked_patch_attention import _empty_outputs, _validate

        _validate(q, k, v, keep, scale)
        return _empty_outputs(q)[0]

    @torch.library.register_fake(lib + "masked_patch_attention_fwd")
    def _mpa_fwd_fake(q, k, v, keep, scale):
        from maep_fast.ops.masked_patch_attention import _empty_outputs, _validate

        _validate(q, k, v, keep, scale)  # the public op's forward, below its autograd node
        return _empty_outputs(q)

    @torch.library.register_fake(lib + "masked_patch_attention_bwd")
    def _mpa_bwd_fake(grad_out, q, k, v, out, lse, keep, scale):
        return (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
        )

    def _mpa_setup_context(ctx, inputs, output):
        q, k, v, keep, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, keep, out, lse)
        ctx.scale = scale

    def _mpa_backward(ctx, grad_out, grad_lse):
        q, k, v, keep, out, lse = ctx.saved_tensors
        if grad_out is None or not any(ctx.needs_input_grad[:3]):
            return None, None, None, None, None
        # lse is an auxiliary output for the backward: its gradient is not propagated.
        dq, dk, dv = torch.ops.maep_fast.masked_patch_attention_bwd(
            grad_out.contiguous(), q, k, v, out, lse, keep, ctx.scale
        )
        return (
            dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None,
            None,
            None,
        )

    torch.library.register_autograd(
        lib + "masked_patch_attention_fwd", _mpa_backward, setup_context=_mpa_setup_context
    )


def native_ops_registered() -> bool:
    """True when the native ops are available and their fakes/autograd registered."""
    return _REGISTERED


if native_available() and hasattr(torch.ops.maep_fast, "patch_recon_loss"):
    _register()
