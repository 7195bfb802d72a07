"""Shared training machinery: seeds, warmup+cosine schedule, resumable state.

A training state directory holds ``model.safetensors`` (current weights),
``optimizer.safetensors`` (optimizer tensors), ``rng.safetensors`` (RNG
states) and ``state.json`` (epoch, step, optimizer scalars, run config).
Nothing is pickled.
"""
from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maep_fast.checkpoint import CheckpointError, load_state_checked


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """LambdaLR: linear warmup to the base lr, then cosine decay to ``min_factor`` * lr."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: {"torch": cpu state, "cuda": current device's state (if CUDA)}."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def save_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, epoch: int, step: int, run_config: dict,
                        rng: dict[str, torch.Tensor] | None = None, world_size: int = 1) -> None:
    """Write a resumable snapshot (after ``epoch`` finished epochs).

    ``rng``: RNG states to store (default: this process's, ``rng_state()``);
    a data-parallel run passes every rank's, rank r > 0 under
    ``"torch.rank{r}"`` / ``"cuda.rank{r}"`` (rank 0 keeps the plain names).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    opt_t, opt_meta = _flatten_optimizer(optimizer)
    save_file(opt_t, str(path / "optimizer.safetensors"))
    rng = rng_state() if rng is None else rng
    save_file({k: v.detach().contiguous().cpu() for k, v in rng.items()}, str(path / "rng.safetensors"))
    state = {"epoch": epoch, "step": step, "optimizer": opt_meta, "world_size": world_size,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, "run_config": run_config}
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state, default=str))
    tmp.replace(path / "state.json")  # state.json appears last: a snapshot without it is incomplete


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, run_config: dict | None = None, rank: int = 0) -> tuple[int, int]:
    """Restore a snapshot; returns (epoch, step). Raises CheckpointError when incomplete or mismatched.

    Every rank of a data-parallel run loads the same weights and optimizer
    state and its own RNG state (``rank``). When the snapshot was written by
    fewer processes, a rank without a stored state derives a fresh stream
    from rank 0's (with a warning: the run is no longer bit-for-bit the
    uninterrupted one).
    """
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"no complete training state in {str(path)!r} (state.json missing)")
    try:
        state = json.loads(state_file.read_text())
        weights = load_file(str(path / "model.safetensors"))
        opt_t = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"training state in {str(path)!r} is corrupt: {exc}") from None
    if run_config is not None:
        saved = state.get("run_config", {})
        diff = sorted(k for k in set(saved) | set(run_config)
                      if k not in ("epochs", "resume", "out_dir") and json.dumps(saved.get(k), default=str) != json.dumps(run_config.get(k), default=str))
        if diff:
            raise CheckpointError(f"training state in {str(path)!r} was made with different settings: {diff}")
    load_state_checked(model, weights, str(path / "model.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(opt_t, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    suffix = "" if rank == 0 else f".rank{rank}"
    if "torch" + suffix in rng:
        torch.set_rng_state(rng["torch" + suffix])
        if "cuda" + suffix in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda" + suffix])
    else:
        warnings.warn(f"training state in {str(path)!r} was written by {state.get('world_size', 1)} process(es) and "
                      f"holds no RNG state for rank {rank}; that rank continues with a new random stream", stacklevel=2)
        torch.set_rng_state(rng["torch"])
        seed = int(torch.randint(0, 2**62, (1,)).item()) + rank
        torch.manual_seed(seed)
    return int(state["epoch"]), int(state["step"])


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
