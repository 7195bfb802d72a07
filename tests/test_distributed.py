"""Data-parallel training: 2 CPU processes (gloo) under torchrun vs one process.

One torchrun launch (``python -m torch.distributed.run --standalone
--nproc_per_node=2 tests/test_distributed.py OUT``) runs every multi-process
scenario; each rank writes its weights and metrics to OUT, and the tests
compare them with each other and with single-process runs made here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GLOBAL_BATCH = 16
EPOCHS = 2


def _pairs():
    from maep_fast.train import AdversarialPairs

    g = torch.Generator().manual_seed(1)
    clean = torch.rand(48, 1, 8, 8, generator=g)
    adv = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return AdversarialPairs(clean, adv, torch.arange(48) % 3)


def _model(seed: int):
    from conftest import tiny_mae

    torch.manual_seed(seed)
    return tiny_mae()


def _cfg(mask_ratio: float, epochs: int = EPOCHS, batch_size: int = GLOBAL_BATCH, **kw):
    from maep_fast.train import LoopConfig, MAEPConfig

    return MAEPConfig(mask_ratio=mask_ratio, stage1=LoopConfig(epochs=epochs, batch_size=batch_size, lr=3e-3,
                                                               warmup_epochs=0.5, progress=False, **kw))


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- worker (one per rank, under torchrun)
def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    from maep_fast.checkpoint import save_model
    from maep_fast.train import distributed as D
    from maep_fast.train import loop as loop_mod
    from maep_fast.train import train_stage1

    rank = int(os.environ["RANK"])
    info: dict = {}
    pairs = _pairs()

    # mask ratio 0: deterministic, so comparable with one process; every rank starts from a
    # *different* init (DDP must broadcast rank 0's). mask_token gets no gradient at r = 0.
    m = _model(100 + rank)
    info["r0_history"] = train_stage1(m, pairs, _cfg(0.0))
    info["world_size"], info["is_main"] = D.world_size(), D.is_main_process()
    save_file(_state(m), str(out / f"r0_rank{rank}.safetensors"))

    # mask ratio 0.5: rank-specific random masks; replicas must still agree
    m = _model(100 + rank)
    info["r5_history"] = train_stage1(m, pairs, _cfg(0.5))
    save_file(_state(m), str(out / f"r5_rank{rank}.safetensors"))
    if rank == 0:  # after fit the model is a plain module again: a local backward must not reach DDP
        m(torch.rand(2, 1, 8, 8))[0].backward()
        info["local_backward_after_fit"] = True
    D.barrier()

    # interrupted after epoch 1 (every rank), then resumed from rank 0's snapshot
    class Stop(Exception):
        pass

    real = loop_mod._save_snapshot

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise Stop

    loop_mod._save_snapshot = save_then_stop
    try:
        train_stage1(_model(100 + rank), pairs, _cfg(0.5, state_dir=str(out / "state")))
    except Stop:
        info["stopped"] = True
    loop_mod._save_snapshot = real
    m = _model(7 + rank)  # a different init again: everything must come from the snapshot
    torch.manual_seed(1234)
    train_stage1(m, pairs, _cfg(0.5, state_dir=str(out / "state"), resume=True))
    save_file(_state(m), str(out / f"resumed_rank{rank}.safetensors"))

    try:
        train_stage1(_model(0), pairs, _cfg(0.5, batch_size=15))
    except ValueError as exc:
        info["indivisible_error"] = str(exc)

    save_model(m, out / f"saved_by_rank{rank}")
    D.barrier()

    # the command line, as `torchrun --nproc_per_node=2 -m maep_fast train ...` runs it (no new flags)
    from maep_fast.cli import main

    info["cli_rc"] = main(["train", "--pairs", str(out / "pairs.safetensors"), "--preset", "demo", "--epochs", "1",
                           "--stage2-epochs", "1", "--batch-size", "8", "--image-size", "8", "--out", str(out / "cli"), "--no-progress"])
    D.barrier()
    (out / f"info_rank{rank}.json").write_text(json.dumps(info))


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(2)
    clean = torch.rand(16, 1, 8, 8, generator=g)  # digits at --image-size 8
    save_file({"clean": clean, "adversarial": (clean + 0.05).clamp(0, 1), "labels": torch.arange(16) % 10},
              str(out / "pairs.safetensors"))
    # reference ops (MAEP_FAST_BACKEND=torch): this file tests the loop, not the kernels
    env = dict(os.environ, OMP_NUM_THREADS="1", MAEP_FAST_BACKEND="torch",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return out, proc


def _load(out: Path, name: str, rank: int) -> dict:
    return load_file(str(out / f"{name}_rank{rank}.safetensors"))


def _info(out: Path, rank: int) -> dict:
    return json.loads((out / f"info_rank{rank}.json").read_text())


@pytest.mark.parametrize("name", ["r0", "r5", "resumed"])
def test_replicas_stay_identical(two_ranks, name):
    out, _ = two_ranks
    a, b = _load(out, name, 0), _load(out, name, 1)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs between ranks"


def test_two_processes_match_one_process_with_the_same_global_batch(two_ranks, monkeypatch):
    from maep_fast.train import train_stage1

    monkeypatch.setenv("MAEP_FAST_BACKEND", "torch")

    out, _ = two_ranks
    ref = _model(100)  # rank 0's init: DDP broadcast it to rank 1
    history = train_stage1(ref, _pairs(), _cfg(0.0))
    ddp = _load(out, "r0", 0)
    init = _state(_model(100))
    for k, v in ref.state_dict().items():
        a, b = ddp[k].clone(), v.clone()
        if k.endswith("attn.qkv.bias"):
            # the key bias has an exactly-zero true gradient (softmax ignores a per-query constant);
            # AdamW normalises its rounding noise into lr-sized steps, so compare it only loosely
            d = a.shape[0] // 3
            torch.testing.assert_close(a[d:2 * d], b[d:2 * d], rtol=0, atol=3e-3 * 2 * EPOCHS * 3)
            a[d:2 * d] = b[d:2 * d] = 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=lambda m: f"{k}: {m}")
    moved = [k for k in init if not torch.equal(init[k], ref.state_dict()[k])]
    assert "blocks.0.attn.qkv.weight" in moved and "mask_token" not in moved  # trained; r = 0 leaves mask_token
    info = _info(out, 0)
    assert len(info["r0_history"]) == EPOCHS
    for h_ddp, h_ref in zip(info["r0_history"], history):  # epoch means are global means
        for k in ("loss", "l1_pur", "mae"):
            assert h_ddp[k] == pytest.approx(h_ref[k], rel=1e-5, abs=1e-7), k


def test_resume_matches_uninterrupted_run(two_ranks):
    out, _ = two_ranks
    assert _info(out, 0).get("stopped") and _info(out, 1).get("stopped")
    state = json.loads((out / "state" / "state.json").read_text())
    assert state["epoch"] == EPOCHS and state["world_size"] == 2  # the resumed run finished and saved
    from maep_fast.train.common import snapshot_files  # the snapshot's files are named in state.json

    rng = load_file(str(snapshot_files(out / "state")["rng"]))
    assert {"torch", "torch.rank1", "numpy.rank1", "python.rank1"} <= set(rng)
    assert not torch.equal(rng["torch"], rng["torch.rank1"])
    full, resumed = _load(out, "r5", 0), _load(out, "resumed", 0)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_rank0_alone_writes_and_bad_batch_is_refused(two_ranks):
    out, _ = two_ranks
    i0, i1 = _info(out, 0), _info(out, 1)
    assert i0["world_size"] == i1["world_size"] == 2
    assert i0["is_main"] and not i1["is_main"] and i0["local_backward_after_fit"]
    assert (out / "saved_by_rank0" / "model.safetensors").is_file()
    assert not (out / "saved_by_rank1").exists()
    for i in (i0, i1):
        assert "must be divisible" in i["indivisible_error"]


def test_cli_train_under_torchrun(two_ranks):
    from maep_fast.checkpoint import load_model

    out, proc = two_ranks
    assert _info(out, 0)["cli_rc"] == 0 and _info(out, 1)["cli_rc"] == 0
    model = load_model(out / "cli" / "maep", expect_kind="mae")
    assert model.checkpoint_meta["preset"] == "demo" and len(model.checkpoint_meta["history"]["stage2"]) == 1
    assert json.loads((out / "cli" / "state_stage1" / "state.json").read_text())["world_size"] == 2


def test_single_process_helpers_without_launcher(monkeypatch):
    from maep_fast.train import distributed as D

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not D.init_distributed() and D.world_size() == 1 and D.is_main_process()
    D.barrier()  # no-op
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_mean(t), t)
    assert [x.tolist() for x in D.shard_batch([torch.arange(8)], 1, 2)] == [[4, 5, 6, 7]]
    with pytest.raises(ValueError, match="split evenly"):
        D.shard_batch([torch.arange(7)], 0, 2)


if __name__ == "__main__":  # a torchrun worker
    _worker(Path(sys.argv[1]))
