"""Bad input gets a clear error naming the argument, before any heavy work.

Python API: the error type and the argument's name. CLI: exit status 2 and one stderr line
``maep-fast <cmd>: error: ...`` naming the flag, without a traceback.
"""
import json
import os
import pickle

import pytest
import torch

from conftest import linear_model, tiny_mae
from maep_fast import cli
from maep_fast.attacks import pgd as pgd_module
from maep_fast.attacks.pgd import pgd_attack
from maep_fast.checkpoint import CheckpointError, load_model, save_model
from maep_fast.models.classifiers import WideResNet
from maep_fast.models.mae_import import load_pretrained_mae, mae_from_checkpoint
from maep_fast.train.classifier import train_classifier
from maep_fast.train.loop import LoopConfig, fit
from maep_fast.train.mae_pretrain import MAEPretrainConfig


def _one_line_error(err: str, cmd: str, *names: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"maep-fast {cmd}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a checkpoint or a data set."""
    import maep_fast.checkpoint
    import maep_fast.data

    def boom(*a, **k):
        raise AssertionError("a checkpoint or data set was loaded before the bad input was reported")

    monkeypatch.setattr(maep_fast.checkpoint, "load_model", boom)
    monkeypatch.setattr(maep_fast.data, "load_dataset", boom)
    monkeypatch.setattr(maep_fast.data, "load_images", boom)


# ------------------------------------------------------------------------------ pgd labels
@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_pgd_labels_outside_the_classes(labels):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 2\] \(the model outputs 3 classes\)"):
        pgd_attack(linear_model(k=3), x, torch.tensor(labels), eps=0.1, step_size=0.05, steps=2)


def test_pgd_checks_labels_once(monkeypatch):
    calls = []
    real = pgd_module.check_labels
    monkeypatch.setattr(pgd_module, "check_labels", lambda y, logits: calls.append(1) or real(y, logits))
    x = torch.rand(2, 1, 8, 8)
    pgd_attack(linear_model(k=3), x, torch.tensor([0, 2]), eps=0.1, step_size=0.05, steps=3, eot=2)
    assert calls == [1]


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture
def mae_ckpt(tmp_path):
    return save_model(tiny_mae(), tmp_path / "mae")


def _set_config(path, **fields):
    cfg = json.loads((path / "config.json").read_text())
    cfg["config"].update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,want", [
    ("img_size", "sixteen", "config.json field 'img_size' must be an int, got 'sixteen'"),
    ("embed_dim", 32.0, "config.json field 'embed_dim' must be an int, got 32.0"),
    ("depth", True, "config.json field 'depth' must be an int, got True"),
    ("patch_size", -2, "config.json field 'patch_size' must be an int >= 0, got -2"),
    ("mlp_ratio", "4", "config.json field 'mlp_ratio' must be a number, got '4'"),
    ("norm_pix_loss", 1, "config.json field 'norm_pix_loss' must be a bool (true or false), got 1"),
    ("colour", 3, "config.json field 'colour' is not an argument of MaskedAutoencoderViT"),
])
def test_config_field_types_are_named(mae_ckpt, field, value, want):
    _set_config(mae_ckpt, **{field: value})
    with pytest.raises(CheckpointError) as err:
        load_model(mae_ckpt)
    assert want in str(err.value)


def test_classifier_config_list_field(tmp_path):
    path = save_model(WideResNet(depth=10, widen=1, in_chans=1, num_classes=3, mean=(0.5,), std=(0.25,)), tmp_path / "c")
    _set_config(path, mean="grey")
    with pytest.raises(CheckpointError, match="config.json field 'mean' must be a list of numbers, got 'grey'"):
        load_model(path)


def test_load_model_on_a_file(mae_ckpt):
    with pytest.raises(CheckpointError, match="model.safetensors' is a file, not a checkpoint directory"):
        load_model(mae_ckpt / "model.safetensors")


def test_plain_pickle_is_refused_without_unpickling(tmp_path):
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}))  # protocol 4: torch.load refuses "operand 149"
    for load in (mae_from_checkpoint, lambda p: load_pretrained_mae(tiny_mae(), p)):
        with pytest.raises(CheckpointError, match=r"plain.pth' is not a weights-only checkpoint: it is a pickle that "
                                                  r"torch.load\(weights_only=True\) refuses"):
            load(plain)
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return os.makedirs, (str(marker),)

    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        evil = tmp_path / f"evil{protocol}.pth"
        evil.write_bytes(pickle.dumps({"model": Evil()}, protocol=protocol))
        with pytest.raises(CheckpointError, match="evil"):
            mae_from_checkpoint(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("field,value", [
    ("epochs", -1), ("epochs", 1.5), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1e-3),
    ("warmup_epochs", -0.5), ("seed", -1), ("seed", "0"), ("amp", "yes"), ("grad_clip", -1.0), ("state_dir", 3),
    ("resume", 1), ("snapshot_every", -1), ("progress", None), ("desc", 3), ("history", ()),
])
def test_loop_config_fields(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        LoopConfig(**{field: value})


def test_loop_config_checked_again_by_fit():
    cfg = LoopConfig(progress=False)
    cfg.batch_size = 0
    m = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="^batch_size must be an int >= 1"):
        fit(m, list(m.parameters()), None, None, cfg)
    with pytest.raises(TypeError, match="cfg must be a LoopConfig"):
        train_classifier(m, None, {"epochs": 1})


@pytest.mark.parametrize("kw,err,name", [
    ({"mask_ratio": 1.0}, ValueError, "mask_ratio"), ({"mask_ratio": "0.5"}, ValueError, "mask_ratio"),
    ({"train": "encoder"}, ValueError, "train"), ({"norm_pix_loss": "yes"}, TypeError, "norm_pix_loss"),
    ({"loop": {"epochs": 1}}, TypeError, "loop"),
])
def test_mae_pretrain_config_fields(kw, err, name):
    with pytest.raises(err, match=rf"^{name} must"):
        MAEPretrainConfig(**kw)


# ------------------------------------------------------------------------------ CLI flags
_REQUIRED = {
    "train": ["--out", "OUT"], "pretrain": ["--out", "OUT"], "train-classifier": ["--out", "OUT"],
    "purify": ["--purifier", "P", "in.png", "--out-dir", "OUT"], "eval": ["--classifier", "C"], "demo": [],
}
_BAD_FLAGS = [
    ("train", "--epochs", "-1"), ("train", "--epochs", "two"), ("train", "--batch-size", "0"), ("train", "--lr", "0"),
    ("train", "--lr", "-0.001"), ("train", "--seed", "-1"), ("train", "--snapshot-every", "-1"),
    ("train", "--image-size", "0"), ("train", "--subset", "-1"), ("train", "--eps", "-1"), ("train", "--eps", "inf"),
    ("train", "--eps", "1/0"), ("train", "--step-size", "-0.5"), ("train", "--steps", "-1"), ("train", "--steps", "2.5"),
    ("train", "--eps-min", "-0.1"), ("train", "--mask-ratio", "1"), ("train", "--clean-frac", "1.5"),
    ("train", "--w-pur", "-1"), ("train", "--w-mae", "-1"), ("train", "--w-cls", "-1"), ("train", "--lora-rank", "0"),
    ("train", "--lora-alpha", "-2"), ("train", "--stage2-epochs", "-1"), ("train", "--device", "gpu9"),
    ("pretrain", "--mask-ratio", "0"), ("pretrain", "--mask-ratio", "1"), ("pretrain", "--warmup-epochs", "-1"),
    ("train-classifier", "--depth", "3"), ("train-classifier", "--widen", "0"),
    ("purify", "--batch-size", "0"), ("purify", "--image-size", "-4"), ("purify", "--mp-steps", "-1"),
    ("purify", "--mp-step-size", "-1"), ("purify", "--mp-masks", "0"), ("purify", "--mp-eta", "-1"),
    ("purify", "--mp-mask-ratio", "1"), ("purify", "--mp-early-stop", "-1"), ("purify", "--mp-seed", "-3"),
    ("eval", "--n", "-1"), ("eval", "--eps", "-1"), ("eval", "--step-size", "-1"), ("eval", "--steps", "-1"),
    ("eval", "--eot", "0"), ("eval", "--eot-adaptive", "0"), ("eval", "--seed", "-1"), ("eval", "--image-size", "0"),
    ("demo", "--seed", "-1"),
]


@pytest.mark.parametrize("cmd,flag,value", _BAD_FLAGS)
def test_cli_flag_ranges(cmd, flag, value, capsys, nothing_loads):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, *_REQUIRED[cmd], flag, value])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, cmd, f"argument {flag}: ", value)


def test_cli_eps_message_and_fractions(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--classifier", "C", "--eps", "-1"])
    assert "argument --eps: must be >= 0, got -1" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["eval", "--classifier", "C", "--eps", "8/255", "--step-size", "0"])
    assert args.eps == pytest.approx(8 / 255) and args.step_size == 0.0


def test_cli_purify_out_dir_is_a_file(tmp_path, capsys, nothing_loads):
    img = tmp_path / "in.png"
    img.write_bytes(b"png")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "sub"):
        assert cli.main(["purify", "--purifier", str(tmp_path), str(img), "--out-dir", str(out)]) == 2
        _one_line_error(capsys.readouterr().err, "purify", "--out-dir", "not a directory")
    assert cli.main(["purify", "--purifier", str(tmp_path), str(tmp_path / "gone.png"), "--out-dir", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "purify", "gone.png", "does not exist")


@pytest.mark.parametrize("flag,value,names", [
    ("--eps-sweep", "2/255,-1", ["--eps-sweep", "must be >= 0, got -1"]),
    ("--eps-sweep", "2/255,x", ["--eps-sweep", "not a number"]),
    ("--threat-models", "oblivious,psychic", ["--threat-models", "psychic"]),
    ("--out", ".", ["--out", "is a directory"]),
    ("--plot", "taken/plot.png", ["--plot", "is a file, not a directory"]),
])
def test_cli_eval_checks_before_loading(tmp_path, monkeypatch, capsys, nothing_loads, flag, value, names):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["eval", "--classifier", "C", flag, value]) == 2
    _one_line_error(capsys.readouterr().err, "eval", *names)


@pytest.mark.parametrize("exc", [FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError])
def test_cli_main_reports_os_errors(exc, monkeypatch, capsys):
    def fail(name):
        raise exc(17, "cannot do that", "/some/where")

    monkeypatch.setattr(cli, "_device", fail)
    assert cli.main(["eval", "--classifier", "C"]) == 2
    _one_line_error(capsys.readouterr().err, "eval", "cannot do that: '/some/where'")


def test_cli_checkpoint_path_is_a_file(mae_ckpt, capsys):
    assert cli.main(["eval", "--classifier", str(mae_ckpt / "config.json"), "--no-progress"]) == 2
    _one_line_error(capsys.readouterr().err, "eval", "is a file, not a checkpoint directory")
