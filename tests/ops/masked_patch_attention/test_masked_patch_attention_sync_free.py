"""masked_patch_attention forward and backward on CUDA, every backend, with and without a keep mask:
no host synchronization (op_helpers.assert_sync_free)."""
from __future__ import annotations

import pytest
import torch
from op_helpers import CUDA as DEV
from op_helpers import EVERY_BACKEND, GPU_ONLY, assert_sync_free, need

from maep_fast.ops import masked_patch_attention

pytestmark = GPU_ONLY


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_never_syncs(masked, backend):
    need("masked_patch_attention", backend)
    q, k, v = (torch.randn(2, 3, 17, 32, device=DEV, requires_grad=True) for _ in range(3))
    keep = (torch.rand(2, 17, device=DEV) < 0.5) if masked else None

    def run():
        out = masked_patch_attention(q, k, v, keep, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out.sum(), (q, k, v))

    assert_sync_free(run)
