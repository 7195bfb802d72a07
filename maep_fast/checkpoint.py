"""Checkpoints: a directory with ``config.json`` and ``model.safetensors``.

config.json = {"format": "maep_fast", "format_version": 1,
               "kind": "mae" | "classifier", "arch": <class name>,
               "config": <constructor kwargs>, "meta": {...}}

Nothing is ever unpickled. Loading checks the JSON, the architecture, and
every tensor name and shape, and reports all mismatches at once.
"""
from __future__ import annotations

import inspect
import json
import math
import types
import typing
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maep_fast._ranks import is_main_process
from maep_fast.errors import CheckpointError  # re-exported: maep_fast.checkpoint.CheckpointError
from maep_fast.models.classifiers import CLASSIFIERS
from maep_fast.models.mae import MaskedAutoencoderViT

FORMAT = "maep_fast"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _kind_and_arch(model: nn.Module) -> tuple[str, str]:
    if isinstance(model, MaskedAutoencoderViT):
        return "mae", "MaskedAutoencoderViT"
    for name, cls in CLASSIFIERS.items():
        if isinstance(model, cls):
            return "classifier", name
    raise TypeError(f"model of type {type(model).__name__} has no checkpoint format; expected a MaskedAutoencoderViT or one of {sorted(CLASSIFIERS)}")


def save_model(model: nn.Module, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``path/config.json`` and ``path/model.safetensors``; returns ``path``.

    LoRA adapters must be merged and removed first (``models.remove_lora``), so
    the saved model is a plain MaskedAutoencoderViT.

    In a multi-process (torchrun) run only rank 0 writes; the other ranks
    check the model and return ``path`` without touching the disk (no
    barrier here, so calling it on rank 0 alone is fine too).
    """
    kind, arch = _kind_and_arch(model)
    if any("lora_" in k for k in model.state_dict()):
        raise ValueError("model still holds LoRA adapters; call maep_fast.models.remove_lora(model) before saving")
    path = Path(path)
    if not is_main_process():
        return path
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "arch": arch,
           "config": model.config, "meta": meta or {}}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": FORMAT, "arch": arch})
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{str(path)!r} is a file, not a checkpoint directory (a maep_fast checkpoint is a "
                              f"directory holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{str(cfg_path)!r} is missing; a maep_fast checkpoint holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(cfg_path)!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"{str(cfg_path)!r} is not a maep_fast checkpoint config (missing format={FORMAT!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(cfg_path)!r} has format_version {cfg.get('format_version')!r}; this maep_fast reads {FORMAT_VERSION}")
    for key in ("kind", "arch", "config"):
        if key not in cfg:
            raise CheckpointError(f"{str(cfg_path)!r} lacks the field {key!r}")
    if not isinstance(cfg["config"], dict):
        raise CheckpointError(f"{str(cfg_path)!r}: 'config' must be an object")
    return cfg


def _type_name(hint: object) -> str:
    """'an int', 'a number', 'a list of numbers', 'a bool or null', ... for a constructor annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) in (tuple, list):
        return "a list of " + {int: "ints", float: "numbers", bool: "bools", str: "strings"}.get(args[0], "values")
    return {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a string"}.get(hint, "a value")


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value fits a constructor annotation (int, float, bool, str, X | None, tuple[X, ...])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if origin in (tuple, list):
        item = typing.get_args(hint)[0]
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def check_config_fields(cls: type, config: dict, source: str = CONFIG_NAME) -> None:
    """Every field of a checkpoint's 'config' must be an argument of ``cls`` of the annotated type
    (ints >= 0); CheckpointError naming the field otherwise."""
    params = inspect.signature(cls.__init__).parameters
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        if key not in params or key == "self":
            raise CheckpointError(f"{source}: config.json field {key!r} is not an argument of {cls.__name__} "
                                  f"(its arguments: {[p for p in params if p != 'self']})")
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise CheckpointError(f"{source}: config.json field {key!r} must be {_type_name(hint)}, got {value!r}")
        if hint is int and value < 0:
            raise CheckpointError(f"{source}: config.json field {key!r} must be an int >= 0, got {value!r}")


def _build(cfg: dict, source: str) -> nn.Module:
    arch, kind = cfg["arch"], cfg["kind"]
    if kind == "mae" and arch == "MaskedAutoencoderViT":
        cls = MaskedAutoencoderViT
    elif kind == "classifier" and arch in CLASSIFIERS:
        cls = CLASSIFIERS[arch]
    else:
        raise CheckpointError(f"{source}: unknown kind/arch {kind!r}/{arch!r}")
    check_config_fields(cls, cfg["config"], source)
    try:
        return cls(**cfg["config"])
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: config does not build a {arch}: {exc}") from None


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one error listing every missing/unexpected/mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes))
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path, expect_kind: str | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a model saved by ``save_model``; raises CheckpointError on any problem."""
    path = Path(path)
    cfg = read_config(path)
    if expect_kind is not None and cfg["kind"] != expect_kind:
        raise CheckpointError(f"{str(path)!r} holds a {cfg['kind']!r} checkpoint, expected {expect_kind!r}")
    model = _build(cfg, str(path))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{str(weights)!r} is missing")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(weights)!r} is not a readable safetensors file: {exc}") from None
    load_state_checked(model, state, str(weights))
    model.checkpoint_meta = cfg.get("meta", {})
    return model.to(map_location).eval()
