import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI runs a fixed set of hypothesis examples (reproducible); local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

if not torch.cuda.is_available():
    # Triton kernels run under the interpreter on CPU machines; must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the cores: one thread each, no oversubscription.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // max(1, _workers))))


@pytest.fixture(autouse=True)
def _fresh_backend_resolution():
    """Tests monkeypatch what backend resolution reads (native availability, the registry); the
    per-process cache of resolved backends (ops/_dispatch.py) must not carry one test's answer
    into the next."""
    from maep_fast.ops import _dispatch

    _dispatch._RESOLVED.clear()
    yield
    _dispatch._RESOLVED.clear()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_mae(**kw):
    from maep_fast.models.mae import MaskedAutoencoderViT

    cfg = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=4,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    cfg.update(kw)
    return MaskedAutoencoderViT(**cfg)


def frozen_cnn(seed=0, num_classes=3):
    """A SmallCNN [N, 1, H, W] -> [N, num_classes] with random weights, in eval mode, gradients off."""
    from maep_fast.models import SmallCNN

    torch.manual_seed(seed)
    clf = SmallCNN(in_chans=1, num_classes=num_classes).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


@contextlib.contextmanager
def no_sync():
    """Raise on any call that synchronizes the host with the current CUDA device."""
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not oversubscribe a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def linear_model(c=1, size=8, k=3, seed=0):
    """A fixed random linear classifier [N, c, size, size] -> [N, k] logits (attack tests)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(c * size * size, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    return torch.nn.Sequential(torch.nn.Flatten(), lin).eval()


def cli_rc(argv):
    """maep_fast.cli.main's return code, or the exit code when argparse exits itself (SystemExit)."""
    from maep_fast.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
