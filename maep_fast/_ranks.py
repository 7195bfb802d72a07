"""Process-rank queries that need no training code: which rank this process is.

Kept below ``checkpoint`` and ``models`` so a model module never imports
``maep_fast.train``; ``maep_fast.train.distributed`` re-exports these and
adds the process-group and DDP machinery on top.
"""
from __future__ import annotations

import os

import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_distributed() -> bool:
    """True when a launcher (torchrun) asked for more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def is_main_process() -> bool:
    """Rank 0 (also before the process group exists, from the launcher's RANK)."""
    return rank() == 0
