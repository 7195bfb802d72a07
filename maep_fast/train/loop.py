"""One training loop for every stage: AdamW, warmup+cosine, tqdm, AMP on GPU,
resumable snapshots after each epoch (and every ``snapshot_every`` steps),
fixed seeds.

Reproducibility: ``fit`` seeds torch, numpy and Python's ``random`` with
``cfg.seed + rank`` before its first step, every epoch's data order comes
from a generator seeded with ``cfg.seed + epoch``, and a snapshot holds the
model, optimizer, schedule, every RNG state (torch, CUDA, numpy, Python), the
epoch, the batch position inside the epoch and the metrics so far. A run
killed at any moment (SIGKILL included; snapshots are written atomically)
and restarted with ``resume=True`` skips the batches it already trained and
ends bit-identical to an uninterrupted run on the same machine. Seed
*before* building the model (``common.set_seed``) so its initialisation is
reproducible too; the CLI does.

``dataset`` is anything with ``loader(batch_size, shuffle, seed, drop_last)``
yielding tuples of tensors; ``step_fn(*batch) -> (loss, {name: value})``
computes one batch's loss. The loop owns the optimizer, schedule, progress
and checkpoints.

Data parallel: under ``torchrun --nproc_per_node=N`` (WORLD_SIZE > 1), or
when a process group is already initialised, the same call trains on N
processes. ``cfg.batch_size`` stays the *global* batch: every rank draws the
same seeded global batch and keeps its contiguous 1/N slice (a
DistributedSampler over one global permutation), so the batches, the
schedule and - for a loss that is a per-sample mean - the gradients equal
a single-process run's. The step function runs as the forward of a
DistributedDataParallel module (``distributed.StepModule``), so its closures
may keep calling the bare model; DDP averages the gradients during the
backward pass. Only rank 0 shows progress and writes snapshots; every rank
resumes from them. Epoch metrics are averaged over ranks. RNG streams are
seeded ``seed + rank`` (different masks on every rank, as in MAE).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from maep_fast._checks import check_bool, check_int, check_real
from maep_fast.train import distributed as D
from maep_fast.train.common import (
    autocast_for,
    load_training_state,
    rng_state,
    save_training_state,
    set_seed,
    warmup_cosine,
)


@dataclass
class LoopConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only
    grad_clip: float | None = 1.0
    state_dir: str | None = None  # resumable snapshots go here
    resume: bool = False
    snapshot_every: int = 0  # also snapshot every N optimizer steps inside an epoch (0: at epoch ends only)
    progress: bool = True
    desc: str = "train"
    history: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ValueError naming the first bad field (also run by ``fit``, as fields may change later)."""
        check_int(self.epochs, "epochs", low=0)
        check_int(self.batch_size, "batch_size", low=1)
        check_real(self.lr, "lr", low=0, low_open=True)
        check_real(self.weight_decay, "weight_decay", low=0)
        check_real(self.warmup_epochs, "warmup_epochs", low=0)
        check_int(self.seed, "seed", low=0)
        check_bool(self.amp, "amp")
        if self.grad_clip is not None:
            check_real(self.grad_clip, "grad_clip", low=0)
        if self.state_dir is not None and (not isinstance(self.state_dir, (str, os.PathLike)) or str(self.state_dir) == ""):
            raise ValueError(f"state_dir must be None or a directory path, got {self.state_dir!r}")
        check_bool(self.resume, "resume")
        check_int(self.snapshot_every, "snapshot_every", low=0)
        check_bool(self.progress, "progress")
        if not isinstance(self.desc, str):
            raise ValueError(f"desc must be a str, got {self.desc!r}")
        if not isinstance(self.history, list):
            raise ValueError(f"history must be a list, got {type(self.history).__name__}")


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    dataset,
    step_fn: Callable[..., tuple[torch.Tensor, dict]],
    cfg: LoopConfig,
    run_config: dict | None = None,
) -> list[dict]:
    """Train ``params`` of ``model`` on ``dataset``; returns per-epoch mean metrics.

    Single process or data parallel (see the module docstring); the call is
    the same.
    """
    if not isinstance(cfg, LoopConfig):
        raise TypeError(f"cfg must be a LoopConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not params:
        raise ValueError("no trainable parameters")
    device = next(model.parameters()).device
    distributed = D.init_distributed(device)
    rank, world = (D.rank(), D.world_size()) if distributed else (0, 1)
    if distributed:
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                             f"{world} processes; each process takes batch_size / {world}")
        if len(dataset) < cfg.batch_size and len(dataset) % world:
            raise ValueError(f"the data set holds {len(dataset)} samples, fewer than batch_size {cfg.batch_size}, "
                             f"and they do not split evenly over {world} processes")
    main = rank == 0
    set_seed(cfg.seed + rank)
    drop_last = len(dataset) > cfg.batch_size

    def epoch_loader(epoch: int):  # a fresh, seeded shuffle per epoch, so a resumed run sees the same order
        return dataset.loader(batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, drop_last=drop_last)

    steps_per_epoch = max(1, len(epoch_loader(0)))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = warmup_cosine(opt, int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    start_epoch, start_batch, step = 0, 0, 0
    history: list[dict] = []
    resume_sums: dict[str, float] = {}
    resume_count = 0
    run_config = dict(run_config or {})
    resume = bool(cfg.resume and cfg.state_dir and (Path(cfg.state_dir) / "state.json").is_file())
    if distributed:  # every rank must take the same branch, or the collectives below would not pair up
        flag = torch.tensor([float(resume)], device=_comm_device(device))
        if float(D.all_reduce_min(flag)) != float(-D.all_reduce_min(-flag)):
            raise RuntimeError(f"{cfg.state_dir!r} holds a snapshot on some ranks only; "
                               "resuming a multi-process run needs a state_dir on a file system all ranks share")
    if resume:
        st = load_training_state(cfg.state_dir, model, opt, sched, run_config, full=True,
                                 **({"rank": rank} if distributed else {}))
        start_epoch, start_batch, step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        history = [dict(h) for h in st["history"]]
        resume_sums, resume_count = dict(st["epoch_sums"]), int(st["epoch_count"])
    # the step runs as DDP's forward; in one process it is called directly
    run_step = D.wrap_step(model, params, step_fn, device) if distributed else step_fn

    def snapshot(epoch_done: int, batch: int, sums: dict, count: int) -> None:
        _save_snapshot(cfg, model, opt, sched, epoch_done, step, run_config, distributed, device,
                       batch=batch, history=history, epoch_sums=sums, epoch_count=count)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        skip = start_batch if epoch == start_epoch else 0
        sums: dict[str, float] = dict(resume_sums) if skip else {}
        count = resume_count if skip else 0
        loader = epoch_loader(epoch)
        n_batches = len(loader)
        # DataLoader.__iter__ draws a base seed from the global torch RNG (when the loader has no
        # generator of its own); keep that out of the training stream, or a run resumed mid-epoch
        # (whose restored RNG state already follows that draw) would differ from an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            batches = iter(loader)
        bar = tqdm(batches, total=n_batches, desc=f"{cfg.desc} {epoch + 1}/{cfg.epochs}", leave=False, initial=0,
                   disable=not (cfg.progress and main))
        for i, batch in enumerate(bar):
            if i < skip:  # trained before the snapshot this run resumed from (same seeded order)
                continue
            if distributed:
                batch = D.shard_batch(batch, rank, world)
            batch = [b.to(device, non_blocking=True) for b in batch]
            with autocast_for(device, cfg.amp):
                loss, metrics = run_step(*batch)
            finite = torch.isfinite(loss.detach()).float()
            if distributed:
                finite = D.all_reduce_min(finite)
            if not bool(finite):
                raise FloatingPointError(f"{cfg.desc}: loss became {float(loss)} at epoch {epoch + 1}, step {step}"
                                         + (f" (rank {rank}: non-finite on at least one rank)" if distributed else ""))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            count += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if main:
                bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
            if cfg.state_dir and cfg.snapshot_every and step % cfg.snapshot_every == 0 and i + 1 < n_batches:
                snapshot(epoch, i + 1, sums, count)
        means = {k: v / max(count, 1) for k, v in sums.items()}
        if distributed and means:  # average over ranks (equal batch sizes, so the global means)
            keys = sorted(means)
            avg = D.all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64, device=_comm_device(device)))
            means = {k: float(v) for k, v in zip(keys, avg.cpu())}
        means["epoch"] = epoch + 1
        history.append(means)
        if cfg.state_dir:
            snapshot(epoch + 1, 0, {}, 0)
    model.eval()
    cfg.history.extend(history)
    return history


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives' tensors live: the CUDA device for nccl, else the CPU."""
    return device if device.type == "cuda" else torch.device("cpu")


def _save_snapshot(cfg: LoopConfig, model, opt, sched, epoch: int, step: int, run_config: dict,
                   distributed: bool, device: torch.device, **extra) -> None:
    if not distributed:
        save_training_state(cfg.state_dir, model, opt, sched, epoch, step, run_config, **extra)
        return
    # every rank's RNG state goes into the snapshot, so a resumed run continues each stream
    local = rng_state()
    rng = {}
    for key in sorted(local):
        states = D.gather_to_all(local[key].to(_comm_device(device)))
        for r, st in enumerate(states):
            rng[key if r == 0 else f"{key}.rank{r}"] = st.cpu()
    if D.is_main_process():
        save_training_state(cfg.state_dir, model, opt, sched, epoch, step, run_config,
                            rng=rng, world_size=D.world_size(), **extra)
    D.barrier()  # nobody reads or resumes before rank 0 has written
