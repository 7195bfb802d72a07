"""Hot-path ops, each with a pure-PyTorch reference and dispatch by ``backend``."""
from maep_fast.ops import _native_ops  # noqa: F401  (autograd + fake kernels of the C++ ops; no-op without them)
from maep_fast.ops.masked_patch_attention import masked_patch_attention, masked_patch_attention_reference
from maep_fast.ops.patch_recon_loss import normalize_patches, patch_recon_loss, patch_recon_loss_reference
from maep_fast.ops.patchify import patchify, unpatchify
from maep_fast.ops.pgd_step import pgd_step, pgd_step_, pgd_step_reference

__all__ = [
    "masked_patch_attention",
    "masked_patch_attention_reference",
    "normalize_patches",
    "patch_recon_loss",
    "patch_recon_loss_reference",
    "patchify",
    "pgd_step",
    "pgd_step_",
    "pgd_step_reference",
    "unpatchify",
]
