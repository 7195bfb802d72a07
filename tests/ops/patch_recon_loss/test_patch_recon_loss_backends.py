"""patch_recon_loss on every CPU-side backend auto may pick (cpp, triton under the interpreter)."""
import pytest
import torch

from maep_fast.ops import patch_recon_loss
from maep_fast.ops._dispatch import unavailable_reason  # no public name says why a backend is unavailable


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mixed_dtypes_under_autocast(backend):
    """bf16 predictions (autocast) against fp32 images must work on every backend auto may pick."""
    why = unavailable_reason("patch_recon_loss", backend, torch.device("cpu"))
    if why:
        pytest.skip(why)
    pred = torch.randn(2, 16, 4, dtype=torch.bfloat16, requires_grad=True)
    imgs = torch.rand(2, 1, 8, 8, requires_grad=True)
    ref = patch_recon_loss(pred, imgs, None, patch_size=2, backend="torch")
    out = patch_recon_loss(pred, imgs, None, patch_size=2, backend=backend)
    out.backward()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-3)
    assert imgs.grad is not None and pred.grad.dtype == torch.bfloat16
