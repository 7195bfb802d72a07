"""Reproducible training: same --seed -> bit-identical checkpoints;
a run killed (SIGKILL, or dying mid-write) and resumed -> the uninterrupted run's checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_mae
from maep_fast.cli import main
from maep_fast.data import ImageDataset
from maep_fast.train import LoopConfig, fit
from maep_fast.train import common as common_mod
from maep_fast.train.common import load_training_state, rng_state, set_rng_state, set_seed, snapshot_files

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# tiny CLI runs: the digits at 8x8 (16 patches of 2x2), small batches so an epoch has several steps
# (--subset 192: 6 steps per epoch at batch 32)
PRETRAIN = ["pretrain", "--image-size", "8", "--subset", "192", "--epochs", "3", "--batch-size", "32", "--lr", "2e-3",
            "--seed", "3", "--no-progress"]
CLASSIFIER = ["train-classifier", "--image-size", "8", "--subset", "192", "--epochs", "2", "--batch-size", "32",
              "--seed", "3", "--no-progress"]


def _maep_args(clf: Path) -> list[str]:
    return ["train", "--classifier", str(clf), "--image-size", "8", "--subset", "192", "--epochs", "2",
            "--stage2-epochs", "1", "--steps", "1", "--eps", "16/255", "--batch-size", "32", "--seed", "3",
            "--no-progress"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs (max |diff| {(a[k].double() - b[k].double()).abs().max():.3g})"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maep_fast", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)


# the killed run pauses 0.2 s after each snapshot, so the poller below reliably catches it mid-run
# (the kill still lands wherever the process is: sleeping, training, or writing the next snapshot)
SLOW_SNAPSHOTS = """
import sys, time
from maep_fast.train import loop
_real = loop.save_training_state
def _slow(*a, **k):
    _real(*a, **k)
    time.sleep(0.2)
loop.save_training_state = _slow
from maep_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_after_snapshot(args: list[str], state_dir: Path, min_step: int) -> None:
    """Start the command, SIGKILL it as soon as a committed snapshot with step >= min_step exists."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SNAPSHOTS, *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads((state_dir / "state.json").read_text())["step"] >= min_step:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
        assert proc.poll() is None, f"the run finished before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------- same seed, same checkpoint
@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clf")
    assert main([*CLASSIFIER, "--epochs", "1", "--out", str(d / "clf")]) == 0
    return d / "clf"


@pytest.mark.parametrize("command", ["pretrain", "train-classifier", "train"])
def test_same_seed_gives_bit_identical_checkpoints(tmp_path, clf_dir, command):
    args = {"pretrain": PRETRAIN, "train-classifier": CLASSIFIER, "train": _maep_args(clf_dir)}[command]
    sub = {"pretrain": "mae", "train-classifier": "", "train": "maep"}[command]
    outs = []
    for run in ("a", "b"):
        # scramble every global RNG between the runs: only --seed may decide the result
        torch.manual_seed(100 + ord(run))
        np.random.seed(ord(run))
        random.seed(ord(run))
        assert main([*args, "--out", str(tmp_path / run)]) == 0
        outs.append(_tensors(tmp_path / run / sub))
    _assert_bitwise_equal(*outs)
    assert main([*args[:-1], "--seed", "4", "--no-progress", "--out", str(tmp_path / "c")]) == 0
    other = _tensors(tmp_path / "c" / sub)
    assert any(not torch.equal(other[k], outs[0][k]) for k in other)  # the seed matters


# ----------------------------------------------------------------- SIGKILL then --resume
@pytest.mark.parametrize("command,state_dir,min_step", [("pretrain", "state", 1), ("pretrain", "state", 8),
                                                        ("train", "state_stage1", 8), ("train", "state_stage2", 2)])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, clf_dir, command, state_dir, min_step):
    """6 steps per epoch. pretrain: killed after its first snapshot, or in epoch 2; train (MAEP):
    killed in stage 1's second epoch, or in stage 2 (decoder LoRA)."""
    args = (PRETRAIN if command == "pretrain" else _maep_args(clf_dir)) + ["--snapshot-every", "1"]
    sub = "mae" if command == "pretrain" else "maep"
    state = tmp_path / "killed" / state_dir
    ref = _run([*args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    _kill_after_snapshot([*args, "--out", str(tmp_path / "killed")], state, min_step)
    assert not (tmp_path / "killed" / sub / "model.safetensors").exists()
    done = _run([*args, "--resume", "--out", str(tmp_path / "killed")])
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_bitwise_equal(_tensors(tmp_path / "ref" / sub), _tensors(tmp_path / "killed" / sub))
    # the history (per-epoch metric means) is the uninterrupted run's too
    meta = [json.loads((tmp_path / d / sub / "config.json").read_text())["meta"]["history"] for d in ("ref", "killed")]
    assert meta[0] == meta[1]


# ----------------------------------------------------------------- in-process: mid-epoch + host RNGs
def _toy(n=40, size=8):
    g = torch.Generator().manual_seed(1)
    return ImageDataset(torch.rand(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g), name="toy")


def _noisy_step(model):
    """A step whose loss draws from torch, numpy and Python RNGs: resuming must restore all three."""
    def step(x, y):
        loss, _, _ = model(x, mask_ratio=0.5)
        jitter = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        loss = loss * jitter
        return loss, {"loss": loss.detach()}
    return step


def _cfg(tmp, **kw):
    return LoopConfig(epochs=3, batch_size=8, lr=3e-3, warmup_epochs=0.5, seed=5, progress=False,
                      state_dir=str(tmp) if tmp else None, **kw)


class _Die(Exception):
    pass


def _fit_until_it_dies(monkeypatch, module, name, dying, init, out, snapshot_every):
    """Train a model from ``init`` with ``module.name`` replaced by ``dying`` until it raises _Die,
    then put the real function back."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, dying)
    m = tiny_mae()
    m.load_state_dict(init)
    with pytest.raises(_Die):
        fit(m, list(m.parameters()), _toy(), _noisy_step(m), _cfg(out, snapshot_every=snapshot_every))
    monkeypatch.setattr(module, name, real)


@pytest.mark.parametrize("die_at", [1, 4, 5, 9])  # 5 steps per epoch: mid-epoch and epoch-boundary snapshots
def test_resume_mid_epoch_restores_every_rng(tmp_path, monkeypatch, die_at):
    set_seed(0)
    init = tiny_mae().state_dict()
    ref = tiny_mae()
    ref.load_state_dict(init)
    ref_hist = fit(ref, list(ref.parameters()), _toy(), _noisy_step(ref), _cfg(None))

    calls = []
    real = common_mod.save_training_state

    def save_then_die(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == die_at:
            raise _Die

    from maep_fast.train import loop as loop_mod

    _fit_until_it_dies(monkeypatch, loop_mod, "save_training_state", save_then_die, init, tmp_path, 1)

    resumed = tiny_mae()  # other init, other RNG states: all must come from the snapshot
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    hist = fit(resumed, list(resumed.parameters()), _toy(), _noisy_step(resumed), _cfg(tmp_path, resume=True))
    _assert_bitwise_equal(ref.state_dict(), resumed.state_dict())
    assert hist == ref_hist


def test_a_write_that_dies_midway_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    """Die while writing the 3rd snapshot's optimizer file: the 2nd snapshot stays complete and
    resuming from it still reproduces the uninterrupted run."""
    set_seed(0)
    init = tiny_mae().state_dict()
    ref = tiny_mae()
    ref.load_state_dict(init)
    fit(ref, list(ref.parameters()), _toy(), _noisy_step(ref), _cfg(None))

    real_save_file = common_mod.save_file
    count = []

    def dying_save_file(tensors, path, metadata=None):
        count.append(path)
        if len(count) == 8:  # snapshot 3: model written, optimizer half-written
            Path(path).write_bytes(b"\x00" * 17)
            raise _Die
        real_save_file(tensors, path, metadata=metadata)

    _fit_until_it_dies(monkeypatch, common_mod, "save_file", dying_save_file, init, tmp_path, 2)
    st = json.loads((tmp_path / "state.json").read_text())
    assert st["step"] == 4 and all(p.is_file() for p in snapshot_files(tmp_path).values())
    resumed = tiny_mae()
    fit(resumed, list(resumed.parameters()), _toy(), _noisy_step(resumed), _cfg(tmp_path, resume=True))
    _assert_bitwise_equal(ref.state_dict(), resumed.state_dict())
    # the half-written temporaries and the older snapshots' files are cleaned up by the next commit
    names = sorted(p.name for p in tmp_path.iterdir())
    assert not [n for n in names if ".tmp" in n] and len([n for n in names if n.endswith(".safetensors")]) == 3


def test_rng_state_round_trip_covers_numpy_and_python():
    set_seed(7)
    st = rng_state()
    a = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(), random.gauss(0, 1))
    set_seed(8)
    set_rng_state(st)
    b = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_legacy_snapshot_layout_still_loads(tmp_path):
    """Snapshots written before the atomic layout (plain model/optimizer/rng.safetensors) resume."""
    from safetensors.torch import save_file

    m = tiny_mae()
    opt = torch.optim.AdamW(m.parameters())
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    save_file({}, str(tmp_path / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp_path / "rng.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps({"epoch": 2, "step": 7, "optimizer": {
        "param_groups": opt.state_dict()["param_groups"], "scalars": {}}, "scheduler": None, "run_config": {}}))
    other = tiny_mae(embed_dim=32)
    torch.nn.init.zeros_(other.decoder_pred.weight)
    assert load_training_state(tmp_path, other, torch.optim.AdamW(other.parameters()), None) == (2, 7)
    assert torch.equal(other.decoder_pred.weight, m.decoder_pred.weight)


def test_snapshot_every_is_checked():
    m = tiny_mae()
    with pytest.raises(ValueError, match="snapshot_every"):
        fit(m, list(m.parameters()), _toy(), _noisy_step(m), _cfg(None, snapshot_every=-1))
