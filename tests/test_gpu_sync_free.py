"""On CUDA no op call and no purification step synchronizes with the host (issue #11): each op,
one MAEP purify and one MAE-Pure step run under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any synchronizing call (``.item()``, ``bool(tensor)``, a blocking copy).
The pixel checks at the API edge synchronize once by design; they run before the guarded region
(``validate=False`` inside it). Skips without a CUDA device."""
from __future__ import annotations

import pytest
import torch

from conftest import no_sync
from maep_fast.ops import masked_patch_attention, patch_recon_loss, pgd_step, pgd_step_
from maep_fast.ops._dispatch import unavailable_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


def _backends(op):
    out = ["auto"] + [b for b in ("cuda", "triton", "torch") if not unavailable_reason(op, b, DEV)]
    return out


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_never_syncs(norm, per_sample):
    x, g, x0 = (torch.rand(8, 3, 16, 16, device=DEV) for _ in range(3))
    step = torch.full((8,), 2 / 255, device=DEV) if per_sample else 2 / 255
    eps = torch.full((8,), 8 / 255, device=DEV) if per_sample else 8 / 255
    for be in _backends("pgd_step"):
        pgd_step(x, g, x0, step, eps, norm=norm, backend=be)  # warm-up (Triton JIT, lazy init)
        with no_sync():
            pgd_step(x, g, x0, step, eps, norm=norm, backend=be)
            pgd_step_(x, g, x0, step, eps, norm=norm, direction=-1, backend=be)


def test_patch_recon_loss_never_syncs():
    imgs = torch.rand(4, 3, 16, 16, device=DEV, requires_grad=True)
    pred = torch.randn(4, 16, 48, device=DEV, requires_grad=True)
    mask = (torch.rand(4, 16, device=DEV) < 0.75).float()
    for be in _backends("patch_recon_loss"):
        for red in ("mean", "per_sample"):
            patch_recon_loss(pred, imgs, mask, patch_size=4, reduction=red, backend=be).sum().backward()
            with no_sync():
                loss = patch_recon_loss(pred, imgs, mask, patch_size=4, reduction=red, backend=be)
                torch.autograd.grad(loss.sum(), (pred, imgs))


@pytest.mark.parametrize("masked", [False, True])
def test_attention_never_syncs(masked):
    q, k, v = (torch.randn(2, 3, 17, 32, device=DEV, requires_grad=True) for _ in range(3))
    keep = (torch.rand(2, 17, device=DEV) < 0.5) if masked else None
    for be in _backends("masked_patch_attention"):
        masked_patch_attention(q, k, v, keep, backend=be).sum().backward()
        with no_sync():
            out = masked_patch_attention(q, k, v, keep, backend=be)
            torch.autograd.grad(out.sum(), (q, k, v))


def _mae(norm_pix: bool):
    from maep_fast import create_mae

    torch.manual_seed(0)
    m = create_mae("mae_vit_tiny_patch4")
    m.norm_pix_loss = norm_pix
    return m.to(DEV).eval()


def test_maep_purify_never_syncs():
    from maep_fast import Purifier

    pur = Purifier(_mae(False))
    x = torch.rand(8, 3, 32, 32, device=DEV)
    pur.purify(x)
    with no_sync():
        pur.purify(x, validate=False)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_mae_pure_step_never_syncs(cuda_graph):
    from maep_fast import MAEPure

    pur = MAEPure(_mae(True), steps=1, seed=0, cuda_graph=cuda_graph)
    x = torch.rand(4, 3, 32, 32, device=DEV)
    pur.purify(x)  # warm-up (and graph capture)
    with no_sync():
        pur.purify(x, validate=False)
