"""Multi-process data-parallel training on PyTorch's own stack (``torch.distributed`` + DDP).

Launched with ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), the reward and SFT trainers call :func:`init_from_env`: with ``WORLD_SIZE > 1`` it
joins the process group (``nccl`` on CUDA, ``gloo`` on CPU) and pins each process to the GPU
``LOCAL_RANK``. Without torchrun (or with one process) nothing happens and every helper here is a
no-op answering rank 0 of 1, so single-process code needs no branches.

What is sharded: the data. Every rank builds the same global batch order (same seed) and takes
examples ``rank::world_size`` of each global batch (:func:`shard`). What is replicated: the model and
the optimizer; DDP all-reduces (averages) the gradients during backward, so every rank takes the
same optimizer step.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger("fastrm")

SETTINGS = ("auto", "ddp")  # "fsdp" is reserved and refused for now


def validate_setting(value: str):
    """Check of the ``distributed`` setting (``auto``: DDP whenever launched with more than one process)."""
    from fastrm.config import ConfigError, require

    if value == "fsdp":
        raise ConfigError("setting distributed='fsdp': FSDP is not yet supported; use auto or ddp "
                          "(data-parallel DDP under torchrun)")
    require(value in SETTINGS, "distributed", value, "must be auto or ddp")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(setting: str = "auto") -> bool:
    """Join the process group torchrun describes; returns whether this run is distributed (world > 1)."""
    from fastrm.config import ConfigError

    if is_initialized():
        return world_size() > 1
    if env_world_size() <= 1:
        if setting == "ddp":
            raise ConfigError("setting distributed='ddp': needs more than one process; launch with "
                              "torchrun --nproc-per-node N (or use distributed=auto)")
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    log.info("distributed: rank %d of %d, backend %s", rank(), world_size(), backend)
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place, also returned); identity with one process."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (in place, also returned); identity with one process."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def shard(items: list) -> list:
    """This rank's disjoint part of a global batch: items ``rank::world_size`` (all of them with one process)."""
    return items[rank()::world_size()]


def cleanup():
    """Leave the process group; the barrier first keeps one rank from tearing down while another still talks."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ForwardAdapter(torch.nn.Module):
    """Lets DDP wrap a loss-side forward such as ``reward_scores(model, batch)``: DDP only all-reduces the
    gradients of parameters it sees used through its own ``forward``, and fastrm's forwards call the
    backbone and head of the model separately, so DDP wraps this adapter whose forward calls them."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, batch, **kwargs):
        return fn(self.model, batch, **kwargs)


def wrap_ddp(model: torch.nn.Module, device: torch.device):
    """A DDP wrapper around ``ForwardAdapter(model)``; parameters stay shared with ``model``."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(ForwardAdapter(model), device_ids=device_ids)
