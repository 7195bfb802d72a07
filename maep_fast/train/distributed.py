"""Data-parallel helpers: process group, rank queries, gradient-synchronised steps.

Launch any training command under ``torchrun --nproc_per_node=N`` (or call
``fit`` after ``torch.distributed.init_process_group``): ``fit`` notices the
environment (``WORLD_SIZE > 1``) or the existing process group, initialises
the group if needed (gloo for CPU models, nccl for CUDA ones), wraps the
step in DistributedDataParallel, shards every global batch, and lets rank 0
alone print and save.

Importing this module under torchrun with CUDA selects ``cuda:LOCAL_RANK``
as the current device, so ``model.to("cuda")`` and ``torch.device("cuda")``
(what ``--device auto`` gives) put each rank on its own GPU.
"""
from __future__ import annotations

import atexit
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn


from maep_fast._ranks import (  # noqa: F401  re-exported: the rank queries live below checkpoint.py
    _env_int,
    is_distributed,
    is_initialized,
    is_main_process,
    launched_distributed,
    local_rank,
    rank,
    world_size,
)

if launched_distributed() and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
    torch.cuda.set_device(local_rank() % torch.cuda.device_count())


def init_distributed(device: torch.device | str | None = None) -> bool:
    """Initialise the default process group when launched with WORLD_SIZE > 1.

    Backend: nccl when ``device`` (default: CUDA if available) is a CUDA
    device, gloo otherwise. Rendezvous comes from the launcher's environment
    (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). Returns whether more than
    one process takes part; a group that already exists is used as it is.
    """
    if is_initialized():
        return dist.get_world_size() > 1
    if not launched_distributed():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; "
                           "launch with torchrun --nproc_per_node=N (it sets them)")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else local_rank() % torch.cuda.device_count()
        torch.cuda.set_device(index)
        dist.init_process_group("nccl", device_id=torch.device("cuda", index))
    else:
        dist.init_process_group("gloo")
    atexit.register(_destroy)
    return dist.get_world_size() > 1


def _destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_first():
    """Context: nothing special in one process; else rank 0 runs the body before the others."""
    if not is_distributed():
        return nullcontext()
    return _MainFirst()


class _MainFirst:
    def __enter__(self):
        if not is_main_process():
            dist.barrier()

    def __exit__(self, *exc):
        if is_main_process():
            dist.barrier()
        return False


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is left alone). Identity in one process."""
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_min(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def gather_to_all(t: torch.Tensor) -> list[torch.Tensor]:
    """all_gather of equal-shaped tensors (every rank gets every rank's tensor)."""
    if not is_distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def shard_batch(batch, rank_: int, world: int):
    """Rank ``rank_``'s contiguous 1/world slice of every tensor of a global batch."""
    n = batch[0].shape[0]
    if n % world:
        raise ValueError(f"a batch of {n} samples does not split evenly over {world} processes")
    per = n // world
    return [b[rank_ * per:(rank_ + 1) * per] for b in batch]


class StepModule(nn.Module):
    """An nn.Module whose forward is a training step ``step_fn(*batch) -> (loss, metrics)``.

    ``fit`` wraps it in DistributedDataParallel: the step function's closures
    call the bare model, whose parameters are this module's parameters, so
    DDP's gradient hooks fire during ``loss.backward()`` and average the
    gradients over ranks while the backward pass runs. ``extra`` holds
    trained parameters that are not part of ``model``.
    """

    def __init__(self, model: nn.Module, step_fn, extra: list[nn.Parameter] | None = None):
        super().__init__()
        self.model = model
        self.extra = nn.ParameterList(extra or [])
        self._step_fn = step_fn

    def forward(self, *batch):
        return self._step_fn(*batch)


def wrap_step(model: nn.Module, params: list[nn.Parameter], step_fn, device: torch.device):
    """DDP around ``StepModule(model, step_fn)``; returns the callable to run each step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    own = {id(p) for p in model.parameters()}
    extra = [p for p in params if id(p) not in own]
    module = StepModule(model, step_fn, extra)
    # find_unused_parameters: a trained parameter may get no gradient in some
    # steps (MAE's mask_token at mask ratio 0, frozen branches, ...).
    kwargs = dict(find_unused_parameters=True)
    if device.type == "cuda":
        expected = local_rank() % torch.cuda.device_count()
        if launched_distributed() and device.index != expected:
            raise ValueError(f"rank {rank()} (LOCAL_RANK {local_rank()}) holds its model on {device}; put each "
                             f"rank's model on cuda:{expected}: torch.device('cuda') does that once "
                             "maep_fast.train is imported, or use torch.device('cuda', LOCAL_RANK)")
        kwargs.update(device_ids=[device.index], output_device=device.index)
    return DDP(module, **kwargs)
