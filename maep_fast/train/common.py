"""Shared training machinery: seeds, warmup+cosine schedule, resumable state.

A training state directory holds ``state.json`` (epoch, batch position in
the epoch, step, optimizer scalars, scheduler, history, run config, and the
names of this snapshot's tensor files) and the tensor files it names:
``model-<tag>.safetensors`` (weights), ``optimizer-<tag>.safetensors``
(optimizer tensors) and ``rng-<tag>.safetensors`` (RNG states of torch, CUDA,
numpy and Python's ``random``, every rank's). Nothing is pickled.

Writes are atomic: every file is written to a temporary name, flushed and
``os.replace``d into place, and ``state.json`` - the commit point - is
replaced last, after the tensor files it names exist; the previous
snapshot's files are deleted only then. A process killed at any moment
(SIGKILL included) leaves either the old or the new snapshot complete.
Snapshots written before this layout (plain ``model.safetensors`` ...) still load.
"""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maep_fast.checkpoint import CheckpointError, load_state_checked

_LEGACY_FILES = {"model": "model.safetensors", "optimizer": "optimizer.safetensors", "rng": "rng.safetensors"}


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


def _encode_host_rng() -> dict[str, torch.Tensor]:
    """numpy's and Python's global RNG states as fixed-shape tensors (equal on every rank,
    so a data-parallel run can all_gather them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind != "MT19937":  # pragma: no cover - numpy's legacy global RNG is always MT19937
        raise RuntimeError(f"unexpected numpy RNG {kind!r}")
    version, internal, gauss_next = random.getstate()
    return {
        "numpy": torch.tensor([int(pos), int(has_gauss), *[int(k) for k in keys]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([float(cached)], dtype=torch.float64),
        "python": torch.tensor([int(version), *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss_next is None else 1.0,
                                      0.0 if gauss_next is None else float(gauss_next)], dtype=torch.float64),
    }


def _restore_host_rng(rng: dict[str, torch.Tensor], suffix: str) -> None:
    if "numpy" + suffix in rng:
        a = rng["numpy" + suffix].tolist()
        cached = float(rng["numpy_gauss" + suffix][0])
        np.random.set_state(("MT19937", np.array(a[2:], dtype=np.uint32), int(a[0]), int(a[1]), cached))
    if "python" + suffix in rng:
        a = rng["python" + suffix].tolist()
        g = rng["python_gauss" + suffix].tolist()
        random.setstate((int(a[0]), tuple(int(v) for v in a[1:]), g[1] if g[0] else None))


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: "torch" (CPU), "cuda" (current device, if CUDA), and
    "numpy"/"numpy_gauss"/"python"/"python_gauss" (the global numpy and ``random`` generators)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng.update(_encode_host_rng())
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Restore what ``rng_state`` returned (rank r > 0 reads its ``.rank{r}`` entries)."""
    suffix = "" if rank == 0 else f".rank{rank}"
    torch.set_rng_state(rng["torch" + suffix])
    if "cuda" + suffix in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda" + suffix])
    _restore_host_rng(rng, suffix)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, os.replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors ``save_file`` made atomic: a temporary file, fsync, then os.replace."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def snapshot_files(path: str | Path) -> dict[str, Path]:
    """The tensor files of the committed snapshot in ``path``: {"model", "optimizer", "rng"} -> file."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"no complete training state in {str(path)!r} (state.json missing)")
    try:
        files = json.loads(state_file.read_text()).get("files", _LEGACY_FILES)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"training state in {str(path)!r} is corrupt: {exc}") from None
    return {k: path / v for k, v in files.items()}


def save_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, epoch: int, step: int, run_config: dict,
                        rng: dict[str, torch.Tensor] | None = None, world_size: int = 1,
                        batch: int = 0, history: list | None = None, epoch_sums: dict | None = None,
                        epoch_count: int = 0) -> None:
    """Write a resumable snapshot, atomically (see the module docstring).

    ``epoch``: finished epochs; ``batch``: batches of epoch ``epoch`` already
    trained (0 at an epoch boundary), with that epoch's running metric sums
    ``epoch_sums`` over ``epoch_count`` batches; ``history``: the finished
    epochs' metrics. ``rng``: RNG states to store (default: this process's,
    ``rng_state()``); a data-parallel run passes every rank's, rank r > 0
    under ``"<name>.rank{r}"`` (rank 0 keeps the plain names).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tag = f"e{epoch:06d}-b{batch:07d}-s{step:010d}"
    files = {k: f"{k}-{tag}.safetensors" for k in ("model", "optimizer", "rng")}
    atomic_save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path / files["model"])
    opt_t, opt_meta = _flatten_optimizer(optimizer)
    atomic_save_file(opt_t, path / files["optimizer"])
    rng = rng_state() if rng is None else rng
    atomic_save_file({k: v.detach().contiguous().cpu() for k, v in rng.items()}, path / files["rng"])
    state = {"epoch": epoch, "batch": batch, "step": step, "optimizer": opt_meta, "world_size": world_size,
             "scheduler": scheduler.state_dict() if scheduler is not None else None, "run_config": run_config,
             "history": history or [], "epoch_sums": epoch_sums or {}, "epoch_count": epoch_count, "files": files}
    _fsync_dir(path)
    atomic_write_bytes(path / "state.json", json.dumps(state, default=str).encode())  # the commit point
    _fsync_dir(path)
    keep = set(files.values())
    for old in path.iterdir():  # the previous snapshot's files and any half-written temporaries
        name = old.name
        stale = (name.endswith(".safetensors") and name.split("-", 1)[0] in files and "-" in name and name not in keep) \
            or (".safetensors.tmp" in name) or name.startswith("state.json.tmp")
        if stale or name in _LEGACY_FILES.values():
            try:
                old.unlink()
            except OSError:  # pragma: no cover - another process cleaned it up
                pass


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, run_config: dict | None = None, rank: int = 0,
                        full: bool = False):
    """Restore a snapshot; returns (epoch, step), or with ``full`` the whole state dict
    (``epoch``, ``batch``, ``step``, ``history``, ``epoch_sums``, ``epoch_count``, ...).
    Raises CheckpointError when incomplete or mismatched.

    Every rank of a data-parallel run loads the same weights and optimizer
    state and its own RNG states (``rank``). When the snapshot was written by
    fewer processes, a rank without a stored state derives a fresh stream
    from rank 0's (with a warning: the run is no longer bit-for-bit the
    uninterrupted one).
    """
    path = Path(path)
    files = snapshot_files(path)
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(files["model"]))
        opt_t = load_file(str(files["optimizer"]))
        rng = load_file(str(files["rng"]))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"training state in {str(path)!r} is corrupt: {exc}") from None
    if run_config is not None:
        saved = state.get("run_config", {})
        diff = sorted(k for k in set(saved) | set(run_config)
                      if k not in ("epochs", "resume", "out_dir") and json.dumps(saved.get(k), default=str) != json.dumps(run_config.get(k), default=str))
        if diff:
            raise CheckpointError(f"training state in {str(path)!r} was made with different settings: {diff}")
    load_state_checked(model, weights, str(files["model"]))
    optimizer.load_state_dict(_unflatten_optimizer(opt_t, state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    suffix = "" if rank == 0 else f".rank{rank}"
    if "torch" + suffix in rng:
        set_rng_state(rng, rank)
    else:
        warnings.warn(f"training state in {str(path)!r} was written by {state.get('world_size', 1)} process(es) and "
                      f"holds no RNG state for rank {rank}; that rank continues with a new random stream", stacklevel=2)
        torch.set_rng_state(rng["torch"])
        seed = int(torch.randint(0, 2**62, (1,)).item()) + rank
        set_seed(seed)
    if full:
        state.setdefault("batch", 0)
        state.setdefault("history", [])
        state.setdefault("epoch_sums", {})
        state.setdefault("epoch_count", 0)
        return state
    return int(state["epoch"]), int(state["step"])


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
