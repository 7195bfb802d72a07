"""patch_recon_loss and its backward on CUDA, every backend: no host synchronization
(op_helpers.assert_sync_free)."""
from __future__ import annotations

import pytest
import torch
from op_helpers import CUDA as DEV
from op_helpers import EVERY_BACKEND, GPU_ONLY, assert_sync_free, need

from maep_fast.ops import patch_recon_loss

pytestmark = GPU_ONLY


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("reduction", ["mean", "per_sample"])
def test_patch_recon_loss_never_syncs(reduction, backend):
    need("patch_recon_loss", backend)
    imgs = torch.rand(4, 3, 16, 16, device=DEV, requires_grad=True)
    pred = torch.randn(4, 16, 48, device=DEV, requires_grad=True)
    mask = (torch.rand(4, 16, device=DEV) < 0.75).float()

    def run():
        loss = patch_recon_loss(pred, imgs, mask, patch_size=4, reduction=reduction, backend=backend)
        return (loss.detach(),) + torch.autograd.grad(loss.sum(), (pred, imgs))

    assert_sync_free(run)
