"""Load published MAE / timm ViT weights into a MaskedAutoencoderViT.

Accepted inputs (``path_or_state``):

* facebookresearch/mae files: a torch file holding ``{"model": state_dict}``
  (``mae_visualize_vit_*.pth``: encoder + decoder; ``mae_pretrain_vit_*.pth``:
  encoder only; ``mae_finetuned_vit_*.pth``: encoder + ``fc_norm``/``head``),
  and files written by their ``misc.save_model`` (``model``, ``optimizer``,
  ``epoch``, ``scaler``, ``args``);
* timm's MAE ViT weights (``vit_base_patch16_224.mae``: ``cls_token``,
  ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``, maybe
  ``fc_norm``/``head``) as a ``.safetensors`` file, a torch file, or a
  Hugging Face snapshot directory holding ``model.safetensors``;
* a plain state dict (or a dict wrapping one under ``model`` /
  ``state_dict``).

Torch files are read only with ``weights_only=True`` (``torch.load``):
nothing else is ever unpickled. facebookresearch
training checkpoints also hold ``args`` (an ``argparse.Namespace``), which
that loader refuses; the error says how to re-save the weights once.

Names: ``module.`` / ``model.`` / ``_orig_mod.`` prefixes are stripped;
timm's block names equal ours (both come from timm). Classification parts
(``head.*``, ``fc_norm.*``, ``pre_logits.*``, ``head_dist.*``) are ignored with a
note. Anything else that does not match - a missing tensor, an extra one, a
shape - raises one :class:`~maep_fast.checkpoint.CheckpointError` listing all
of it.

Position embeddings: when the checkpoint's patch grid differs from the
model's, a *learned* table is resized like MAE's ``interpolate_pos_embed``
(bicubic on the 2-D grid, cls token kept); a table that is MAE's fixed 2-D
sin-cos one is not interpolated: the model keeps its own sin-cos table for
its grid, which is exactly what MAE would have used at that size
(interpolating a fixed table would only approximate it).
"""
from __future__ import annotations

import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from maep_fast.errors import CheckpointError
from maep_fast.models.mae import MaskedAutoencoderViT
from maep_fast.models.pos_embed import get_2d_sincos_pos_embed

__all__ = ["ImportReport", "load_pretrained_mae", "mae_from_checkpoint", "read_mae_state_dict"]

DECODER_PREFIXES = ("decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
IGNORED_PREFIXES = {
    "head.": "classification head (not part of a masked autoencoder)",
    "head_dist.": "distillation head (not part of a masked autoencoder)",
    "fc_norm.": "norm after global pooling of a fine-tuned / timm classifier (not part of a masked autoencoder)",
    "pre_logits.": "pre-logits layer of a classifier (not part of a masked autoencoder)",
}
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module")
# MAE / ViT conventions: heads cannot be read off the weights
_ENCODER_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _is_decoder(key: str) -> bool:
    return key.startswith(DECODER_PREFIXES)


@dataclass
class ImportReport:
    """What ``load_pretrained_mae`` did; ``str(report)`` is a readable summary."""

    source: str
    container: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not used
    kept: dict[str, str] = field(default_factory=dict)  # model key -> why it keeps the model's own value
    pos_embed: dict[str, str] = field(default_factory=dict)  # "pos_embed" / "decoder_pos_embed" -> what happened
    decoder_loaded: bool = False
    warnings: list[str] = field(default_factory=list)
    inferred_config: dict | None = None  # set by mae_from_checkpoint
    assumptions: list[str] = field(default_factory=list)  # what mae_from_checkpoint could not read off the weights

    def __str__(self) -> str:
        lines = [f"MAE import from {self.source} ({self.container}): {len(self.loaded)} tensors loaded; "
                 f"decoder {'loaded' if self.decoder_loaded else 'NOT loaded (untrained)'}"]
        for k, v in self.pos_embed.items():
            lines.append(f"  {k}: {v}")
        if self.ignored:
            groups: dict[str, list[str]] = {}
            for k, why in self.ignored.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                lines.append(f"  ignored {keys}: {why}")
        if self.kept:
            groups = {}
            for k, why in self.kept.items():
                groups.setdefault(why, []).append(k)
            for why, keys in groups.items():
                shown = keys if len(keys) <= 6 else keys[:6] + [f"... {len(keys) - 6} more"]
                lines.append(f"  kept the model's own {shown}: {why}")
        if self.inferred_config is not None:
            lines.append(f"  model config: {self.inferred_config}")
        for a in self.assumptions:
            lines.append(f"  assumed: {a}")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading
def _starts_like_pickle(path: Path) -> bool:
    """Whether the file opens with a pickle's PROTO opcode (protocol 2 and later)."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" not in text and "allowed global" not in text:
            m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            if m and _starts_like_pickle(path):
                raise CheckpointError(
                    f"{str(path)!r} is not a weights-only checkpoint: it is a pickle that "
                    f"torch.load(weights_only=True) refuses ({m.group(1).strip()}), and maep_fast never unpickles "
                    f"anything else. Give a file written by torch.save(state_dict) or a .safetensors file.") from None
            why = m.group(1).strip() if m else (text.splitlines()[0] if text else repr(exc))
            raise CheckpointError(f"{str(path)!r} is not a readable torch file ({why})") from None
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = m.group(1) if m else "a Python object"
        hint = ""
        if what == "argparse.Namespace":
            hint = (" This is a facebookresearch/mae training checkpoint (misc.save_model stores the training "
                    "'args' as an argparse.Namespace).")
        raise CheckpointError(
            f"{str(path)!r} holds {what}, which maep_fast will not unpickle (it reads torch files with "
            f"weights_only=True only).{hint} If you trust the file's source, re-save just the weights once, "
            f"where the file was made (loading it there runs its pickled objects): keep only its 'model' entry, "
            f"torch.save({{'model': ck['model']}}, '{path.with_suffix('')}_weights.pth'), and load the new file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable torch file: {exc}") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from None


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[:2] == b"PK" or head[:1] == b"\x80":
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def _read_file(path: Path) -> tuple[object, str]:
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                return _read_file(path / name)
        raise CheckpointError(f"{str(path)!r} is a directory without model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _load_safetensors(path), "safetensors file"
    return _torch_load(path), "torch file (weights_only=True)"


def _unwrap(obj: object, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Find the state dict in a loaded object: the dict itself or obj['model'] / ['state_dict'] / ..."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "state dict"
    for key in _CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner), f"{{{key!r}: state dict}}" + (f" + {sorted(k for k in obj if k != key)}" if len(obj) > 1 else "")
    raise CheckpointError(f"{source}: no state dict found; top-level keys {sorted(map(str, obj))[:20]} "
                          f"(expected tensors, or one of {list(_CONTAINER_KEYS)} holding them)")


def _normalise_names(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        name = k
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        if name in out:
            raise CheckpointError(f"{source}: keys {k!r} and another both map to {name!r}")
        out[name] = v
    if any(k.startswith(("vit.embeddings.", "vit.encoder.", "decoder.decoder_layers.")) for k in out):
        raise CheckpointError(f"{source} uses the Hugging Face transformers ViTMAE layout, which is not supported; "
                              "use the facebookresearch/mae .pth or timm weights of the same model")
    return out


def read_mae_state_dict(path_or_state) -> tuple[dict[str, torch.Tensor], str, str]:
    """-> (state dict with normalised names, container description, source name)."""
    if isinstance(path_or_state, (str, Path)):
        path = Path(path_or_state)
        source = str(path)
        obj, kind = _read_file(path)
    else:
        source, obj, kind = "<state dict>", path_or_state, "in-memory"
    state, container = _unwrap(obj, source)
    return _normalise_names(state, source), f"{kind}, {container}", source


# ----------------------------------------------------------------------------- position embeddings
def _grid_of(n_tokens: int) -> tuple[int, int] | None:
    """(grid side, prefix tokens) for a table of n tokens: n = 1 + g*g (cls) or g*g."""
    g = math.isqrt(max(n_tokens - 1, 0))
    if n_tokens > 1 and g * g == n_tokens - 1:
        return g, 1
    g = math.isqrt(n_tokens)
    if g * g == n_tokens:
        return g, 0
    return None


def _is_sincos(table: torch.Tensor, grid: int, prefix: int) -> bool:
    dim = table.shape[-1]
    if dim % 4:
        return False
    ref = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=False)).to(torch.float32)
    body = table.reshape(-1, dim)[prefix:].to(torch.float32)
    if not torch.allclose(body, ref, atol=1e-3, rtol=0):
        return False
    return prefix == 0 or bool(table.reshape(-1, dim)[0].abs().max() <= 1e-3)


def interpolate_pos_embed(table: torch.Tensor, new_grid: int, prefix: int = 1) -> torch.Tensor:
    """[1, prefix + g*g, D] -> [1, prefix + new_grid^2, D]: bicubic on the grid, prefix tokens kept
    (MAE's util/pos_embed.interpolate_pos_embed)."""
    dim = table.shape[-1]
    flat = table.reshape(-1, dim)
    extra, body = flat[:prefix], flat[prefix:]
    g = math.isqrt(body.shape[0])
    grid = body.reshape(1, g, g, dim).permute(0, 3, 1, 2).to(torch.float32)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    body = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(table.dtype)
    return torch.cat([extra, body], dim=0).unsqueeze(0)


def _adapt_pos_embed(name: str, table: torch.Tensor, own: torch.Tensor, report: ImportReport, errors: list[str]):
    """-> tensor to load, or None to keep the model's own table."""
    dim = own.shape[-1]
    if table.shape[-1] != dim:
        errors.append(f"{name}: checkpoint {list(table.shape)} vs model {list(own.shape)} (embedding width differs)")
        return None
    found = _grid_of(table.reshape(-1, dim).shape[0])
    if found is None:
        errors.append(f"{name}: checkpoint {list(table.shape)} is not a square patch grid (+ cls token)")
        return None
    grid, prefix = found
    own_grid = math.isqrt(own.shape[1] - 1)
    sincos = _is_sincos(table, grid, prefix)
    kind = "fixed 2-D sin-cos" if sincos else "learned"
    if grid == own_grid:
        out = table.reshape(-1, dim)
        if prefix == 0:  # no cls row in the checkpoint: MAE's cls position is zeros
            out = torch.cat([torch.zeros(1, dim, dtype=out.dtype), out])
            report.pos_embed[name] = f"loaded ({kind}, {grid}x{grid} grid); checkpoint had no cls position, set to zeros"
        else:
            report.pos_embed[name] = f"loaded ({kind}, {grid}x{grid} grid)"
        if not sincos:
            report.pos_embed[name] += "; it stays frozen here, as MAE's fixed table"
        return out.unsqueeze(0)
    if sincos:
        report.pos_embed[name] = (f"checkpoint grid {grid}x{grid}, model grid {own_grid}x{own_grid}: the checkpoint "
                                  "holds MAE's fixed sin-cos table, so the model keeps its own sin-cos table for its "
                                  "grid (exact; interpolating a fixed table would only approximate it)")
        report.kept[name] = "fixed sin-cos table for the model's grid"
        return None
    out = interpolate_pos_embed(table.reshape(1, -1, dim), own_grid, prefix)
    if prefix == 0:
        out = torch.cat([torch.zeros(1, 1, dim, dtype=out.dtype), out], dim=1)
    report.pos_embed[name] = (f"learned table interpolated bicubically from {grid}x{grid} to {own_grid}x{own_grid} "
                              f"(cls position {'kept' if prefix else 'absent in the checkpoint, set to zeros'})")
    return out


# ----------------------------------------------------------------------------- loading
def load_pretrained_mae(model: MaskedAutoencoderViT, path_or_state, strict_decoder: bool = True) -> ImportReport:
    """Load facebookresearch/mae, timm (MAE ViT) or plain-state-dict weights into ``model``.

    * Encoder tensors must all be present and fit (else CheckpointError),
      except ``norm`` in global-pool fine-tune checkpoints that replaced it
      by ``fc_norm``: the model keeps its own (identity) norm, with a note.
    * Encoder-only weights load the encoder; the decoder keeps its
      initialisation, with a UserWarning and ``report.decoder_loaded = False``.
    * A checkpoint *with* a decoder must fit it completely when
      ``strict_decoder`` (default); with ``strict_decoder=False`` decoder
      tensors that are missing or mis-shaped are skipped (warning) and keep
      their initialisation.
    * Position embeddings: see the module docstring.

    Returns an :class:`ImportReport`. Nothing is loaded when an error is raised.
    """
    if not isinstance(model, MaskedAutoencoderViT):
        raise TypeError(f"model must be a MaskedAutoencoderViT, got {type(model).__name__}")
    if any("lora_" in k for k in model.state_dict()):
        raise ValueError("load pretrained weights before adding LoRA adapters (the model holds lora_ tensors)")
    state, container, source = read_mae_state_dict(path_or_state)
    return _load_state(model, state, ImportReport(source=source, container=container), strict_decoder)


def _load_state(model: MaskedAutoencoderViT, state: dict[str, torch.Tensor], report: ImportReport,
                strict_decoder: bool) -> ImportReport:
    own = model.state_dict()
    state = dict(state)
    source = report.source
    errors: list[str] = []

    for k in list(state):
        for prefix, why in IGNORED_PREFIXES.items():
            if k.startswith(prefix):
                report.ignored[k] = why
                del state[k]
                break
    has_decoder = any(_is_decoder(k) for k in state)
    global_pool_ft = any(k.startswith("fc_norm.") for k in report.ignored) and not any(k.startswith("norm.") for k in state)

    to_load: dict[str, torch.Tensor] = {}
    unexpected = sorted(k for k in state if k not in own)
    missing, shapes, decoder_skipped = [], [], []
    if not strict_decoder:  # e.g. a deeper decoder than the model's: its extra blocks are skipped
        for k in [k for k in unexpected if _is_decoder(k)]:
            unexpected.remove(k)
            report.ignored[k] = "decoder tensor this model does not have (strict_decoder=False)"
            decoder_skipped.append(f"{k} (not in the model)")
    for k, target in own.items():
        dec = _is_decoder(k)
        if k not in state:
            if dec and not has_decoder:
                report.kept[k] = "decoder not in the checkpoint (untrained)"
            elif k.startswith("norm.") and global_pool_ft:
                report.kept[k] = ("the checkpoint is a global-pool fine-tune (fc_norm instead of norm): "
                                  "the encoder's final norm keeps its initialisation (identity)")
            elif dec and not strict_decoder:
                decoder_skipped.append(f"{k} (missing)")
                report.kept[k] = "decoder tensor missing from the checkpoint (strict_decoder=False)"
            else:
                missing.append(k)
            continue
        value = state[k]
        if k in ("pos_embed", "decoder_pos_embed"):
            n_err = len(errors)
            value = _adapt_pos_embed(k, value, target, report, errors)
            if len(errors) > n_err and dec and not strict_decoder:
                decoder_skipped.append(errors.pop())
                report.kept[k] = "decoder position table does not fit (strict_decoder=False)"
            if value is None:
                continue
        if tuple(value.shape) != tuple(target.shape):
            if dec and not strict_decoder:
                decoder_skipped.append(f"{k}: checkpoint {list(value.shape)} vs model {list(target.shape)}")
                report.kept[k] = "decoder tensor shape differs (strict_decoder=False)"
            else:
                shapes.append(f"{k}: checkpoint {list(value.shape)} vs model {list(target.shape)}")
            continue
        to_load[k] = value.to(dtype=target.dtype)

    if missing or unexpected or shapes or errors:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if shapes or errors:
            parts.append("shape mismatch " + "; ".join(shapes + errors))
        hint = ""
        if any(s.startswith("patch_embed.proj.weight") for s in shapes):
            hint = " (patch size or channel count differ: build the model with the checkpoint's patch_size/in_chans)"
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts) + hint)

    result = model.load_state_dict(to_load, strict=False)  # copies in place; every other tensor is accounted for above
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = sorted(to_load)
    report.decoder_loaded = has_decoder and not decoder_skipped
    if not has_decoder:
        msg = (f"{source} holds encoder weights only: the decoder (decoder_embed, mask_token, decoder_blocks, "
               "decoder_norm, decoder_pred) stays at its random initialisation, untrained - train it (MAE "
               "pretraining or MAEP stage 1) before reconstructing or purifying with this model")
        report.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    elif decoder_skipped:
        msg = (f"{source}: {len(decoder_skipped)} decoder tensor(s) did not fit and keep their initialisation "
               f"(strict_decoder=False): {decoder_skipped}")
        report.warnings.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return report


# ----------------------------------------------------------------------------- building
def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = [int(m.group(1)) for k in state for m in [re.match(rf"{re.escape(prefix)}\.(\d+)\.", k)] if m]
    return max(idx) + 1 if idx else 0


def infer_mae_config(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> tuple[dict, list[str]]:
    """Constructor arguments read off the tensor shapes -> (config, notes on what was assumed)."""
    notes: list[str] = []
    w = state.get("patch_embed.proj.weight")
    if w is None or w.dim() != 4:
        raise CheckpointError(f"{source}: no patch_embed.proj.weight [embed_dim, in_chans, p, p]; not a ViT/MAE checkpoint")
    embed_dim, in_chans, patch, _ = w.shape
    depth = _count_blocks(state, "blocks")
    if depth == 0:
        raise CheckpointError(f"{source}: no blocks.N.* tensors")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None else 4.0
    pe = state.get("pos_embed")
    if pe is not None and _grid_of(pe.reshape(-1, pe.shape[-1]).shape[0]):
        grid, _ = _grid_of(pe.reshape(-1, pe.shape[-1]).shape[0])
    else:
        grid = 14
        notes.append("img_size=14 patches wide (no usable pos_embed)")
    if embed_dim in _ENCODER_HEADS:
        num_heads = _ENCODER_HEADS[embed_dim]
    elif embed_dim % 64 == 0:
        num_heads = embed_dim // 64
    else:
        num_heads = None
    notes.append(f"num_heads={num_heads} (ViT convention; heads cannot be read off the weights)")
    notes.append("norm_pix_loss=False (it changes only the training target; MAEP needs False)")
    cfg = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
               num_heads=num_heads, mlp_ratio=mlp_ratio)
    dw = state.get("decoder_embed.weight")
    if dw is not None:
        dd = dw.shape[0]
        cfg.update(decoder_embed_dim=dd, decoder_depth=_count_blocks(state, "decoder_blocks"),
                   decoder_num_heads=16 if dd % 16 == 0 else (dd // 64 if dd % 64 == 0 else None))
        notes.append(f"decoder_num_heads={cfg['decoder_num_heads']} (MAE uses 16)")
        dfc1 = state.get("decoder_blocks.0.mlp.fc1.weight")
        if dfc1 is not None and abs(dfc1.shape[0] / dd - mlp_ratio) > 1e-6:
            raise CheckpointError(f"{source}: encoder mlp ratio {mlp_ratio} and decoder mlp ratio {dfc1.shape[0] / dd} "
                                  "differ; MaskedAutoencoderViT uses one mlp_ratio for both")
    else:
        cfg.update(_MAE_DECODER)
        notes.append(f"decoder sizes {_MAE_DECODER} (MAE's default; the checkpoint has no decoder, it is untrained)")
    return cfg, notes


def mae_from_checkpoint(path, strict_decoder: bool = True, **model_overrides) -> MaskedAutoencoderViT:
    """Build a MaskedAutoencoderViT shaped like the checkpoint and load it (``from_pretrained``).

    Sizes are read off the tensors; what cannot be (``num_heads``,
    ``decoder_num_heads``, ``norm_pix_loss``; the decoder of encoder-only
    weights) follows MAE's conventions unless given in ``model_overrides``,
    which replace any inferred value (e.g. ``img_size=32``: position tables
    are then adapted as in :func:`load_pretrained_mae`). The report is
    attached as ``model.import_report``.
    """
    state, container, source = read_mae_state_dict(path)
    cfg, notes = infer_mae_config(state, source)
    for k in model_overrides:
        notes = [n for n in notes if not n.startswith(f"{k}=")
                 and not (k.startswith("decoder_") and n.startswith("decoder sizes"))]
    cfg.update(model_overrides)
    for key in ("num_heads", "decoder_num_heads"):
        if cfg.get(key) is None:
            raise CheckpointError(f"{source}: cannot guess {key} for width "
                                  f"{cfg['embed_dim'] if key == 'num_heads' else cfg['decoder_embed_dim']}; pass {key}=...")
    try:
        model = MaskedAutoencoderViT(**cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot build a MaskedAutoencoderViT with {cfg}: {exc}") from None
    report = _load_state(model, state, ImportReport(source=source, container=container), strict_decoder)
    report.inferred_config = dict(model.config)
    report.assumptions = notes
    model.import_report = report
    return model.eval()
