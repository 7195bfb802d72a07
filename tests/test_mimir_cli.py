"""``maep-fast mimir``: writes a loadable ViT classifier, resumes to the same weights, rejects bad flags."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_rc
from maep_fast.checkpoint import load_model
from maep_fast.cli import main
from maep_fast.models.vit_classifier import ViTClassifier


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--subset", "64", "--batch-size", "32", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
        "--pretrain-epochs", "2", "--epochs", "2", "--steps", "1", "--no-progress", "--seed", "3"]


def _weights(path):
    return load_file(str(path / "vit" / "model.safetensors"))


def test_mimir_cli_writes_a_loadable_vit_classifier(tmp_path, capsys):
    assert main(["mimir", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "saved the ViT classifier" in capsys.readouterr().out
    vit = load_model(tmp_path / "run" / "vit", expect_kind="classifier")
    assert isinstance(vit, ViTClassifier)
    assert vit.config["patch_size"] == 4 and vit.config["embed_dim"] == 16 and vit.config["img_size"] == 16
    assert vit(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    meta = vit.checkpoint_meta
    assert meta["recipe"]["pretrain"] == "mimir" and len(meta["finetune_history"]) == 2
    assert load_model(tmp_path / "run" / "mae", expect_kind="mae").config["norm_pix_loss"] is True


class _Stop(Exception):
    pass


def test_mimir_cli_resume_ends_with_identical_weights(tmp_path, monkeypatch):
    ramp = ["--ramp-frac", "1"]  # the eps grows over all 4 finetuning steps: the resume lands inside the ramp
    assert main(["mimir", "--out", str(tmp_path / "a"), *TINY, *ramp]) == 0
    full = _weights(tmp_path / "a")

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def stopping_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # 2 pretraining epochs of 2 steps, finetuning epoch 1, then 1 step of epoch 2
            raise _Stop
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", stopping_step)
    args = ["mimir", "--out", str(tmp_path / "b"), *TINY, *ramp, "--snapshot-every", "1"]
    with pytest.raises(_Stop):
        main(args)
    assert not (tmp_path / "b" / "vit").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    snap = json.loads((tmp_path / "b" / "state_finetune" / "state.json").read_text())
    assert (snap["epoch"], snap["batch"], snap["step"]) == (1, 1, 3)  # resumes mid-epoch
    at_stop = load_file(str(tmp_path / "b" / "state_finetune" / snap["files"]["model"]))
    assert any(not torch.equal(at_stop[k], full[k]) for k in full)  # the comparison below can fail
    assert main(args + ["--resume"]) == 0
    resumed = _weights(tmp_path / "b")
    assert set(resumed) == set(full)
    assert all(torch.equal(resumed[k], full[k]) for k in full)


@pytest.mark.parametrize("flags,named", [
    (["--patch-size", "3"], "--patch-size 3 must divide the image size 16"),
    (["--eps", "8/255", "--eps-start", "16/255"], "--eps-start"),
    (["--embed-dim", "10", "--num-heads", "4"], "--embed-dim 10 must be a multiple of --num-heads 4"),
    (["--trades-beta", "-1"], "argument --trades-beta: must be >= 0"),
    (["--ramp-frac", "1.5"], "argument --ramp-frac"),
    (["--pretrain", "simclr"], "argument --pretrain"),
    (["--steps", "-1"], "argument --steps"),
])
def test_mimir_cli_bad_flags_are_named(tmp_path, capsys, flags, named):
    assert cli_rc(["mimir", "--out", str(tmp_path / "x"), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "error" in err
    assert not (tmp_path / "x" / "vit").exists()


def test_mimir_cli_pretrain_none_and_mae(tmp_path):
    for kind in ("none", "mae"):
        out = tmp_path / kind
        assert main(["mimir", "--out", str(out), *TINY, "--pretrain", kind, "--pretrain-epochs", "1",
                     "--epochs", "1"]) == 0
        vit = load_model(out / "vit", expect_kind="classifier")
        assert vit.checkpoint_meta["recipe"]["pretrain"] == kind
        assert (out / "mae").exists() == (kind == "mae")


def test_demo_mimir_stage_rows_and_default_demo_leaves_it_out():
    from maep_fast.data import load_digits_dataset
    from maep_fast.demo import FULL, MIMIR_COMMAND, QUICK, DemoConfig, _mimir_rows
    from maep_fast.models.classifiers import SmallCNN

    assert DemoConfig().mimir.enabled is False and FULL["mimir"] is True and "maep-fast mimir" in MIMIR_COMMAND
    cfg = DemoConfig.from_flat(QUICK, mimir_n=8, mimir_train_n=64, eval_eps=(8 / 255, 16 / 255), progress=False)
    train, test = load_digits_dataset(16, "train"), load_digits_dataset(16, "test")
    section, text, vit = _mimir_rows(cfg, SmallCNN(in_chans=1, num_classes=10).eval(), train, test)
    rows = section["rows"]
    assert [r["threat_model"] for r in rows] == ["none"] + ["oblivious", "adaptive-full-gradient"] * 2
    assert all(r["n"] == 8 and r["defense"] == "MIMIR ViT" for r in rows)
    assert {r["eps"] for r in rows[1:]} == {8 / 255, 16 / 255}
    assert isinstance(vit, ViTClassifier) and "MIMIR pretrain 1 ep" in section["description"]
