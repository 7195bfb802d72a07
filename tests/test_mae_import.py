"""Importing facebookresearch/mae, timm and plain-state-dict weights (no hub: checkpoints are
written here, in each published layout, from randomly initialised models)."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import tiny_mae
from maep_fast.checkpoint import CheckpointError
from maep_fast.models.mae_import import interpolate_pos_embed, load_pretrained_mae, mae_from_checkpoint
from maep_fast.models.pos_embed import get_2d_sincos_pos_embed

HEADS = dict(num_heads=4, decoder_num_heads=2)  # tiny_mae's; heads cannot be read off weights


# --------------------------------------------------------------------------- independent writers
def save_like_mae_misc(path, model, epoch=3, namespace_args=True):
    """What facebookresearch/mae util/misc.py::save_model writes (no loss scaler on CPU):
    {'model', 'optimizer', 'epoch', 'scaler', 'args'}, 'args' being the argparse.Namespace."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.rand(2, model.in_chans, model.img_size, model.img_size))[0].backward()
    opt.step()
    args = dict(batch_size=64, epochs=400, model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "args": argparse.Namespace(**args) if namespace_args else args}, path)


def timm_state(model, head=True, global_pool=False):
    """timm VisionTransformer layout of the encoder (vit_*.mae): no decoder; optional head; with
    global_pool the final ``norm`` is replaced by ``fc_norm`` (MAE fine-tune / timm avg-pool)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()
          if not k.startswith(("decoder_", "mask_token"))}
    e = model.config["embed_dim"]
    if global_pool:
        sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    if head:
        sd["head.weight"], sd["head.bias"] = torch.randn(10, e), torch.zeros(10)
    return sd


def same_outputs(a, b, decoder=True):
    x = torch.rand(3, a.in_chans, a.img_size, a.img_size)
    noise = torch.rand(3, a.patch_embed.num_patches)
    a.eval(), b.eval()
    la, _, _ = a.forward_encoder(x, 0.5, noise)
    lb, _, _ = b.forward_encoder(x, 0.5, noise)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    if decoder:
        torch.testing.assert_close(a(x, 0.5, noise)[1], b(x, 0.5, noise)[1], rtol=0, atol=0)


def fresh(**kw):
    torch.manual_seed(99)
    return tiny_mae(**kw)


# --------------------------------------------------------------------------- facebookresearch/mae
def test_mae_training_checkpoint_with_plain_args_round_trips(tmp_path):
    src = tiny_mae()
    save_like_mae_misc(tmp_path / "checkpoint-3.pth", src, namespace_args=False)
    dst = fresh()
    report = load_pretrained_mae(dst, tmp_path / "checkpoint-3.pth")
    same_outputs(src, dst)
    assert report.decoder_loaded and not report.ignored and not report.kept
    assert "'model'" in report.container and len(report.loaded) == len(src.state_dict())
    assert "fixed 2-D sin-cos" in report.pos_embed["pos_embed"]


def test_mae_training_checkpoint_with_namespace_is_refused_clearly(tmp_path):
    save_like_mae_misc(tmp_path / "checkpoint-399.pth", tiny_mae(), namespace_args=True)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace") as err:
        load_pretrained_mae(fresh(), tmp_path / "checkpoint-399.pth")
    msg = str(err.value)
    assert "weights_only=True" in msg and "re-save" in msg and "torch.save({'model': ck['model']}" in msg


def test_other_pickled_objects_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    torch.save({"model": tiny_mae().state_dict(), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        load_pretrained_mae(fresh(), tmp_path / "evil.pth")


def test_encoder_only_pretrain_loads_encoder_and_warns(tmp_path):
    src = tiny_mae()
    enc = {"module." + k: v for k, v in src.state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain_vit_tiny.pth")  # the published pretrain layout
    dst = fresh()
    dec_before = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(("decoder_", "mask_token"))}
    with pytest.warns(UserWarning, match="decoder .* untrained"):
        report = load_pretrained_mae(dst, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert not report.decoder_loaded and "NOT loaded" in str(report)
    same_outputs(src, dst, decoder=False)
    for k, v in dec_before.items():
        assert torch.equal(dst.state_dict()[k], v), k
        assert "untrained" in report.kept[k]


def test_finetune_checkpoint_ignores_head_and_keeps_norm(tmp_path):
    src = tiny_mae()
    torch.save({"model": timm_state(src, head=True, global_pool=True)}, tmp_path / "mae_finetuned.pth")
    dst = fresh()
    with pytest.warns(UserWarning, match="encoder weights only"):
        report = load_pretrained_mae(dst, tmp_path / "mae_finetuned.pth")
    assert set(report.ignored) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert "identity" in report.kept["norm.weight"]
    assert torch.equal(dst.norm.weight, torch.ones_like(dst.norm.weight))
    assert torch.equal(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)


# --------------------------------------------------------------------------- timm
@pytest.mark.parametrize("fmt", ["safetensors", "torch", "hub_dir"])
def test_timm_mae_vit_weights(tmp_path, fmt):
    src = tiny_mae()
    sd = timm_state(src, head=True)
    if fmt == "safetensors":
        path = tmp_path / "vit_tiny.mae.safetensors"
        save_file(sd, str(path))
    elif fmt == "torch":
        path = tmp_path / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        path = tmp_path / "hub"
        path.mkdir()
        save_file(sd, str(path / "model.safetensors"))
    dst = fresh()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        report = load_pretrained_mae(dst, path)
    assert any("untrained" in str(x.message) for x in w)
    assert set(report.ignored) == {"head.weight", "head.bias"} and "classification head" in str(report)
    same_outputs(src, dst, decoder=False)


def test_plain_state_dict_with_prefixes():
    src = tiny_mae()
    dst = fresh()
    report = load_pretrained_mae(dst, {"model." + k: v for k, v in src.state_dict().items()})
    assert report.decoder_loaded
    same_outputs(src, dst)
    dst2 = fresh()
    load_pretrained_mae(dst2, {"state_dict": {"module._orig_mod." + k: v for k, v in src.state_dict().items()}})
    same_outputs(src, dst2)


# --------------------------------------------------------------------------- position embeddings
def test_learned_pos_embed_is_interpolated_bicubically():
    src = tiny_mae(img_size=16)  # grid 8
    sd = timm_state(src, head=False)
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])  # learned (timm models may train it)
    dst = fresh(img_size=8)  # grid 4
    with pytest.warns(UserWarning):
        report = load_pretrained_mae(dst, sd)
    assert "interpolated bicubically from 8x8 to 4x4" in report.pos_embed["pos_embed"]
    pe = sd["pos_embed"]
    grid = pe[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    torch.testing.assert_close(dst.pos_embed[:, 1:], ref)
    assert torch.equal(dst.pos_embed[:, :1], pe[:, :1])  # cls position kept
    torch.testing.assert_close(interpolate_pos_embed(pe, 8), pe)  # same size: identity
    assert not dst.pos_embed.requires_grad


def test_sincos_pos_embed_on_another_grid_keeps_the_models_own():
    src = tiny_mae(img_size=16)
    dst = fresh(img_size=8)
    report = load_pretrained_mae(dst, src.state_dict(), strict_decoder=True)
    own = torch.from_numpy(get_2d_sincos_pos_embed(32, 4, cls_token=True)).float()
    torch.testing.assert_close(dst.pos_embed[0], own)
    for name in ("pos_embed", "decoder_pos_embed"):
        assert "keeps its own sin-cos" in report.pos_embed[name]
    assert report.decoder_loaded
    assert torch.equal(dst.decoder_pred.weight, src.decoder_pred.weight)


def test_pos_embed_without_cls_row():
    src = tiny_mae()
    sd = timm_state(src, head=False)
    sd["pos_embed"] = sd["pos_embed"][:, 1:].clone()  # timm no_embed_class layout
    dst = fresh()
    with pytest.warns(UserWarning):
        report = load_pretrained_mae(dst, sd)
    assert "no cls position" in report.pos_embed["pos_embed"]
    same_outputs(src, dst, decoder=False)


# --------------------------------------------------------------------------- mismatches
def test_mismatches_are_listed_together():
    sd = tiny_mae(embed_dim=64).state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(64)  # timm layer scale: not in this architecture
    del sd["blocks.1.norm2.bias"]
    dst = fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained_mae(dst, sd)
    msg = str(err.value)
    assert "missing ['blocks.1.norm2.bias']" in msg and "unexpected ['blocks.0.ls1.gamma']" in msg
    assert "patch_embed.proj.weight: checkpoint [64, 1, 2, 2] vs model [32, 1, 2, 2]" in msg
    assert "pos_embed" in msg and "embedding width differs" in msg
    for k, v in dst.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_partial_decoder_strict_and_lenient():
    src = tiny_mae(decoder_embed_dim=24, decoder_num_heads=2)
    sd = src.state_dict()
    with pytest.raises(CheckpointError, match="decoder_embed.weight: checkpoint"):
        load_pretrained_mae(fresh(), sd)
    dst = fresh()
    with pytest.warns(UserWarning, match="strict_decoder=False"):
        report = load_pretrained_mae(dst, sd, strict_decoder=False)
    assert not report.decoder_loaded and "decoder_pred.weight" in report.kept
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    deeper = tiny_mae(decoder_depth=2).state_dict()  # an extra decoder block the model lacks
    with pytest.raises(CheckpointError, match=r"unexpected \['decoder_blocks\.1\."):
        load_pretrained_mae(fresh(), deeper)
    dst = fresh()
    with pytest.warns(UserWarning, match="not in the model"):
        report = load_pretrained_mae(dst, deeper, strict_decoder=False)
    assert "decoder_blocks.1.mlp.fc1.weight" in report.ignored
    assert torch.equal(dst.decoder_blocks[0].mlp.fc1.weight, deeper["decoder_blocks.0.mlp.fc1.weight"])


def test_hf_layout_and_garbage_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="Hugging Face transformers ViTMAE"):
        load_pretrained_mae(fresh(), {"vit.embeddings.cls_token": torch.zeros(1, 1, 32)})
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_pretrained_mae(fresh(), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_mae(fresh(), tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "noweights.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_pretrained_mae(fresh(), tmp_path / "noweights.pth")


# --------------------------------------------------------------------------- from_pretrained
def test_mae_from_checkpoint_infers_the_architecture(tmp_path):
    src = tiny_mae(in_chans=3, mlp_ratio=2.0)
    save_like_mae_misc(tmp_path / "ck.pth", src, namespace_args=False)
    model = mae_from_checkpoint(tmp_path / "ck.pth", **HEADS)
    cfg = model.config
    assert (cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"], cfg["depth"]) == (8, 2, 3, 32, 2)
    assert (cfg["decoder_embed_dim"], cfg["decoder_depth"], cfg["mlp_ratio"]) == (16, 1, 2.0)
    same_outputs(src, model)
    assert model.import_report.decoder_loaded and "model config" in str(model.import_report)
    assumed = model.import_report.assumptions
    assert any(a.startswith("norm_pix_loss=False") for a in assumed) and not any("num_heads" in a for a in assumed)
    with pytest.raises(CheckpointError, match="cannot guess num_heads"):
        mae_from_checkpoint(tmp_path / "ck.pth")  # width 32: no ViT convention, heads must be given


def test_mae_from_checkpoint_encoder_only_and_new_image_size(tmp_path):
    src = tiny_mae(embed_dim=64, num_heads=1)  # 64 wide -> 1 head by the 64-per-head convention
    save_file(timm_state(src, head=True), str(tmp_path / "enc.safetensors"))
    with pytest.warns(UserWarning, match="untrained"):
        model = mae_from_checkpoint(tmp_path / "enc.safetensors", img_size=16)
    assert model.config["num_heads"] == 1 and model.config["decoder_embed_dim"] == 512  # MAE's decoder
    assert any(a.startswith("num_heads=1") for a in model.import_report.assumptions)
    assert any(a.startswith("decoder sizes") for a in model.import_report.assumptions)
    assert model.config["img_size"] == 16 and "keeps its own sin-cos" in model.import_report.pos_embed["pos_embed"]
    assert torch.equal(model.blocks[1].attn.proj.weight, src.blocks[1].attn.proj.weight)
