"""FLOPs per image of each purifier: counted (torch.utils.flop_counter) and by hand (ViT presets).

    python3 bench/flops.py                      # every MAE preset + DiffPure, as a table
    python3 bench/flops.py --presets demo,mae_vit_base_patch4_dec512 --json

Counted with ``FlopCounterMode`` on a batch of 1, on the ``meta`` device by
default (no weights are allocated and nothing runs, so ViT-B and the 35.7 M
UNet count in well under a second). FlopCounterMode counts matmul-like ops
(mm/addmm/bmm/convolution/attention kernels: 2 FLOPs per multiply-add), not
elementwise ops, norms or softmax; the hand count follows the same rule.

What one image costs:

- MAEP: one forward at mask ratio 0 (``reconstruct``).
- MAE-Pure: per step one forward at ``mask_ratio`` (0.25) with ``n_masks``
  masks plus the backward *to the input only* (no weight gradients); x S steps.
- DiffPure: one UNet forward at 32x32 per network call; x 100 (SDE, t* = 0.1,
  dt = 1e-3) or x 5 (DDIM).
- MAEP training step: ``maep_loss`` forward at mask 0.5 + backward with weight
  gradients (the AdamW update is elementwise: not counted).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import backend_env  # noqa: E402  ("torch": explicit-matmul attention, counted by every torch version)

from maep_fast.models.mae import MaskedAutoencoderViT  # noqa: E402
from maep_fast.models.presets import PRESETS, create_mae  # noqa: E402

aten = torch.ops.aten


def _cpu_sdpa_fwd(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


# the CPU flash kernel of F.scaled_dot_product_attention is not in torch's flop registry
CUSTOM = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_fwd),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_bwd)):
    if hasattr(aten, _name):
        CUSTOM[getattr(aten, _name)] = _fn


def count(fn) -> int:
    """FLOPs of everything ``fn()`` runs (forward and any backward inside it)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM) as fc:
        fn()
    return int(fc.get_total_flops())


def _model(preset_or_model, device: str) -> MaskedAutoencoderViT:
    if isinstance(preset_or_model, MaskedAutoencoderViT):
        return preset_or_model
    with torch.device(device):
        return create_mae(preset_or_model)


def _image(model: MaskedAutoencoderViT, device, n: int = 1, requires_grad: bool = False) -> torch.Tensor:
    x = torch.zeros(n, model.in_chans, model.img_size, model.img_size, device=device)
    return x.requires_grad_(requires_grad)


def maep_flops(preset_or_model, device: str = "meta") -> int:
    """MAEP purification: one forward at mask ratio 0, per image."""
    m = _model(preset_or_model, device)
    dev = next(m.parameters()).device
    x = _image(m, dev)
    with backend_env("torch"), torch.no_grad():
        return count(lambda: m.reconstruct(x, mask_ratio=0.0))


def mae_pure_step_flops(preset_or_model, mask_ratio: float = 0.25, n_masks: int = 1, device: str = "meta") -> int:
    """One MAE-Pure step per image: forward at ``mask_ratio`` on ``n_masks`` masks + backward to the input."""
    m = _model(preset_or_model, device)
    dev = next(m.parameters()).device
    xl = _image(m, dev, requires_grad=True)

    def step():
        x = xl.repeat(n_masks, 1, 1, 1)
        loss, _, _ = m(x, mask_ratio=mask_ratio)
        loss.backward(inputs=[xl])

    with backend_env("torch"):
        return count(step)


def maep_train_flops(preset_or_model, mask_ratio: float = 0.5, device: str = "meta") -> int:
    """One MAEP training step per image: maep_loss forward at ``mask_ratio`` + backward (weight gradients)."""
    from maep_fast.train.maep import maep_loss

    m = _model(preset_or_model, device)
    dev = next(m.parameters()).device
    x = _image(m, dev)

    def step():
        loss, _ = maep_loss(m, x, x, mask_ratio, 1.0, 1.0)
        loss.backward()

    with backend_env("torch"):
        n = count(step)
    for p in m.parameters():
        p.grad = None
    return n


def diffpure_unet_flops(unet=None, image_size: int = 32, device: str = "meta") -> int:
    """One UNet forward (one DiffPure network call) per image."""
    if unet is None:
        from maep_fast.baselines.diffpure import ddpm_cifar10_unet

        with torch.device(device):
            unet = ddpm_cifar10_unet()
    dev = next(unet.parameters()).device
    c = unet.config.in_channels
    x = torch.zeros(1, c, image_size, image_size, device=dev)
    t = torch.full((1,), 99.9, device=dev)
    with torch.no_grad():
        return count(lambda: unet(x, t))


# --------------------------------------------------------------- by hand
def hand_vit_flops(cfg: dict, mask_ratio: float = 0.0) -> dict:
    """Forward FLOPs per image of a MaskedAutoencoderViT config (2 FLOPs per multiply-add).

    L patches; the encoder sees 1 + int(L (1 - r)) tokens (cls + kept), the decoder
    1 + L. Per block on N tokens of width D (hidden H = mlp_ratio D):
    qkv 3 N D^2, attention 2 N^2 D (QK^T and AV), proj N D^2, mlp 2 N D H multiply-adds.
    """
    p, c, s = cfg["patch_size"], cfg["in_chans"], cfg["img_size"]
    d, dd = cfg["embed_dim"], cfg["decoder_embed_dim"]
    r = cfg.get("mlp_ratio", 4.0)
    n_patch = (s // p) ** 2
    ne = 1 + int(n_patch * (1 - mask_ratio))
    nd = 1 + n_patch

    def dense(n, w):  # qkv, proj, mlp
        h = int(w * r)
        return 3 * n * w * w + n * w * w + 2 * n * w * h

    macs = {
        "patch_embed": n_patch * p * p * c * d,  # embeds every patch, then masks
        "encoder_dense": cfg["depth"] * dense(ne, d),
        "encoder_attention": cfg["depth"] * 2 * ne * ne * d,
        "decoder_embed": ne * d * dd,
        "decoder_dense": cfg["decoder_depth"] * dense(nd, dd),
        "decoder_attention": cfg["decoder_depth"] * 2 * nd * nd * dd,
        "decoder_pred": nd * dd * p * p * c,
    }
    out = {k: 2 * v for k, v in macs.items()}
    out["total"] = sum(out.values())
    return out


def hand_maep_flops(preset: str | dict) -> int:
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    return hand_vit_flops(cfg, 0.0)["total"]


def hand_mae_pure_step_flops(preset: str | dict, mask_ratio: float = 0.25, n_masks: int = 1) -> int:
    """Forward + backward to the input only: each weight matmul's input gradient costs its forward;
    attention (both operands activations) costs twice its forward backwards."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    f = hand_vit_flops(cfg, mask_ratio)
    attn = f["encoder_attention"] + f["decoder_attention"]
    return n_masks * (2 * f["total"] + attn)


def hand_maep_train_flops(preset: str | dict, mask_ratio: float = 0.5) -> int:
    """Forward + backward with weight gradients = 3 x forward, less the patch embedding's input
    gradient (the adversarial input needs none)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    f = hand_vit_flops(cfg, mask_ratio)
    return 3 * f["total"] - f["patch_embed"]


def purifier_flops(preset: str, mae_pure_steps: int = 150, sde_calls: int = 100, ddim_calls: int = 5,
                   mask_ratio: float = 0.25, n_masks: int = 1, unet_flops: int | None = None) -> dict:
    """FLOPs per image of every purifier for ``preset`` (DiffPure: the DDPM CIFAR-10 UNet at 32x32)."""
    u = diffpure_unet_flops() if unet_flops is None else unet_flops
    step = mae_pure_step_flops(preset, mask_ratio, n_masks)
    return {
        "preset": preset,
        "maep": maep_flops(preset),
        "maep_hand": hand_maep_flops(preset),
        "mae_pure_step": step,
        "mae_pure_step_hand": hand_mae_pure_step_flops(preset, mask_ratio, n_masks),
        f"mae_pure_S{mae_pure_steps}": step * mae_pure_steps,
        "maep_train_step": maep_train_flops(preset),
        "maep_train_step_hand": hand_maep_train_flops(preset),
        "diffpure_unet_call": u,
        f"diffpure_sde_{sde_calls}": u * sde_calls,
        f"diffpure_ddim_{ddim_calls}": u * ddim_calls,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--mae-pure-steps", type=int, default=150)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    u = diffpure_unet_flops()
    rows = [purifier_flops(p, args.mae_pure_steps, unet_flops=u) for p in args.presets.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"DiffPure (DDPM CIFAR-10 UNet, 32x32): {u / 1e9:.2f} GFLOP per call, "
          f"{100 * u / 1e12:.3f} TFLOP per image (SDE, 100 calls), {5 * u / 1e9:.1f} GFLOP (DDIM, 5 calls)")
    print(f"{'preset':28s} {'MAEP GFLOP':>11s} {'hand':>9s} {'MAE-Pure/step':>14s} {'hand':>9s} "
          f"{'MAE-Pure S' + str(args.mae_pure_steps) + ' TFLOP':>17s} {'train GFLOP':>12s} {'hand':>9s}")
    for r in rows:
        print(f"{r['preset']:28s} {r['maep'] / 1e9:11.3f} {r['maep_hand'] / 1e9:9.3f} {r['mae_pure_step'] / 1e9:14.3f} "
              f"{r['mae_pure_step_hand'] / 1e9:9.3f} {r[f'mae_pure_S{args.mae_pure_steps}'] / 1e12:17.3f} "
              f"{r['maep_train_step'] / 1e9:12.3f} {r['maep_train_step_hand'] / 1e9:9.3f}")


if __name__ == "__main__":
    main()
