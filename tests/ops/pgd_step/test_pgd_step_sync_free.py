"""pgd_step and pgd_step_ on CUDA, every backend: no host synchronization (op_helpers.assert_sync_free)."""
from __future__ import annotations

import pytest
import torch
from op_helpers import CUDA as DEV
from op_helpers import EVERY_BACKEND, GPU_ONLY, assert_sync_free, need

from maep_fast.ops import pgd_step, pgd_step_

pytestmark = GPU_ONLY


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_never_syncs(norm, per_sample, backend):
    need("pgd_step", backend)
    x, g, x0 = (torch.rand(8, 3, 16, 16, device=DEV) for _ in range(3))
    step = torch.full((8,), 2 / 255, device=DEV) if per_sample else 2 / 255
    eps = torch.full((8,), 8 / 255, device=DEV) if per_sample else 8 / 255

    def run():
        xi = x.clone()
        pgd_step_(xi, g, x0, step, eps, norm=norm, direction=-1, backend=backend)
        return pgd_step(x, g, x0, step, eps, norm=norm, direction=-1, backend=backend), xi

    assert_sync_free(run, rtol=0, atol=0)
