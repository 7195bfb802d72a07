"""The package works from a plain script with and without the native extension."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch, maep_fast, warnings
from maep_fast import create_mae, Purifier, PurifiedClassifier, SmallCNN, pgd_attack
torch.manual_seed(0)
purifier = Purifier(create_mae("demo"))
clf = SmallCNN(1, 10, width=8).eval()
x = torch.rand(5, 1, 16, 16)
y = torch.randint(0, 10, (5,))
x_adv = pgd_attack(PurifiedClassifier(purifier, clf), x, y, eps=8/255, step_size=2/255, steps=2)
out = purifier.purify(x_adv)
assert out.shape == x.shape and (x_adv - x).abs().max() <= 8/255 + 1e-6
print("native", maep_fast.native_available())
"""


@pytest.mark.parametrize("disable", ["0", "1"])
def test_plain_script(disable):
    env = dict(os.environ, MAEP_FAST_DISABLE_NATIVE=disable)
    r = subprocess.run([sys.executable, "-W", "always", "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    if disable == "1":
        assert "native False" in r.stdout
        assert r.stderr.count("native extension") <= 1  # said once, not on every call
    else:
        from maep_fast import native_available
        assert f"native {native_available()}" in r.stdout
