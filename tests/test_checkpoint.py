import json

import pytest
import torch

from conftest import tiny_mae
from maep_fast.checkpoint import CheckpointError, load_model, save_model
from maep_fast.models import SmallCNN, WideResNet, apply_decoder_lora


def test_mae_roundtrip(tmp_path):
    m = tiny_mae(in_chans=3).eval()
    save_model(m, tmp_path / "ck", meta={"note": "x"})
    assert (tmp_path / "ck" / "config.json").is_file() and (tmp_path / "ck" / "model.safetensors").is_file()
    m2 = load_model(tmp_path / "ck", expect_kind="mae")
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(m2.reconstruct(x), m.reconstruct(x), rtol=0, atol=0)
    assert m2.checkpoint_meta == {"note": "x"}


@pytest.mark.parametrize("model", [SmallCNN(3, 7, width=8), WideResNet(depth=10, widen=1, num_classes=5)])
def test_classifier_roundtrip(tmp_path, model):
    model.eval()
    save_model(model, tmp_path / "c")
    m2 = load_model(tmp_path / "c", expect_kind="classifier")
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(m2(x), model(x), rtol=0, atol=0)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing")
    m = tiny_mae()
    save_model(m, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="expected 'classifier'"):
        load_model(tmp_path / "ck", expect_kind="classifier")
    # corrupt weights
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path / "bad")
    # truncated weights
    data = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "bad" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(tmp_path / "bad")
    # broken JSON
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "bad")
    # config that does not match the weights: every mismatch is listed
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["config"]["embed_dim"] = 64
    cfg["config"]["decoder_depth"] = 2
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bad" / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="missing .*decoder_blocks.1.*shape mismatch.*cls_token"):
        load_model(tmp_path / "bad")
    cfg["config"] = {"img_size": 8, "patch_size": 3}
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not build"):
        load_model(tmp_path / "bad")
    cfg["arch"] = "Evil"
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown kind/arch"):
        load_model(tmp_path / "bad")


def test_refuses_lora_and_unknown_models(tmp_path):
    m = tiny_mae()
    apply_decoder_lora(m)
    with pytest.raises(ValueError, match="remove_lora"):
        save_model(m, tmp_path / "x")
    with pytest.raises(TypeError, match="no checkpoint format"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "y")
