"""On CUDA no purification step synchronizes with the host: one MAEP purify and one
MAE-Pure step run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
synchronizing call (``.item()``, ``bool(tensor)``, a blocking copy). Each op alone:
tests/ops/<op>/test_<op>_sync_free.py.
The pixel checks at the API edge synchronize once by design; they run before the guarded region
(``validate=False`` inside it). Skips without a CUDA device."""
from __future__ import annotations

import pytest
import torch

from conftest import no_sync

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEV = torch.device("cuda")


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
    want = pur.purify(x)
    with no_sync():
        got = pur.purify(x, validate=False)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_mae_pure_step_never_syncs(cuda_graph):
    from maep_fast import MAEPure

    pur = MAEPure(_mae(True), steps=1, seed=0, cuda_graph=cuda_graph)
    x = torch.rand(4, 3, 32, 32, device=DEV)
    pur.purify(x)  # warm-up (and graph capture)
    with no_sync():
        got = pur.purify(x, validate=False)
    assert got.shape == x.shape and torch.isfinite(got).all()
    assert got.min() >= 0 and got.max() <= 1
