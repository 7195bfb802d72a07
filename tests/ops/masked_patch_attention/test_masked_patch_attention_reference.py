"""The masked_patch_attention reference against a loop formula written independently here."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maep_fast.ops import masked_patch_attention


def naive_attention(q, k, v, keep):
    b, h, length, d = q.shape
    out = torch.zeros_like(q, dtype=torch.float64)
    for i in range(b):
        vis = [j for j in range(length) if keep is None or keep[i, j]]
        for hh in range(h):
            for r in range(length):
                if keep is not None and not keep[i, r]:
                    continue
                s = torch.stack([(q[i, hh, r].double() @ k[i, hh, j].double()) / d**0.5 for j in vis])
                a = torch.softmax(s, 0)
                out[i, hh, r] = sum(a[t] * v[i, hh, j].double() for t, j in enumerate(vis))
    return out


@settings(deadline=None, max_examples=10)
@given(b=st.integers(1, 3), h=st.integers(1, 2), length=st.sampled_from([1, 2, 5, 7]), d=st.sampled_from([3, 8]),
       pattern=st.sampled_from(["none", "all", "one", "ragged"]))
def test_masked_attention_reference(b, h, length, d, pattern):
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64) for _ in range(3))
    keep = None
    if pattern == "all":
        keep = torch.ones(b, length, dtype=torch.bool)
    elif pattern == "one":
        keep = torch.zeros(b, length, dtype=torch.bool)
        keep[:, 0] = True
    elif pattern == "ragged":
        keep = torch.rand(b, length) < 0.6
        keep[:, -1] = True
    out = masked_patch_attention(q, k, v, keep)
    torch.testing.assert_close(out, naive_attention(q, k, v, keep), rtol=1e-6, atol=1e-8)
    if keep is not None:
        qg = q.clone().requires_grad_(True)
        masked_patch_attention(qg, k, v, keep).sum().backward()
        hidden = ~keep
        assert torch.all(qg.grad.permute(0, 2, 1, 3)[hidden] == 0)
