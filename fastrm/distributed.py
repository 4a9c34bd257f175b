"""Multi-process data-parallel training on PyTorch's own stack: torchrun, DDP and FSDP2 (``fully_shard``).

Launched with ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``), every trainer calls :func:`init_from_env`, which joins the process group (``nccl`` on
CUDA, ``gloo`` on CPU) and pins each process to the GPU ``LOCAL_RANK``. Without torchrun nothing
happens and every helper here is a no-op answering rank 0 of 1, so single-process code needs no branches.

The ``distributed`` setting:

* ``auto`` - DDP when torchrun starts more than one process, plain single-process training otherwise;
* ``ddp`` - ``DistributedDataParallel``: model and optimizer replicated on every rank, gradients averaged;
* ``fsdp`` - FSDP2: every transformer block (the model's ``_no_split_modules``) and then the rest of the model
  are ``fully_shard``-ed over all ranks, so parameters, gradients and optimizer states are sharded
  (1/world_size each) and gathered one block at a time for compute; with bf16 mixed precision the gathered
  parameters are bf16 while gradients are reduced in fp32.

``ddp`` and ``fsdp`` also run on one process under torchrun (the 1-rank path: the CUDA/NCCL branch on one GPU).

What is sharded in every mode: the data (:func:`shard`: examples ``rank::world_size`` of each global batch).
Checkpoints are one full (gathered) Hugging Face folder written by rank 0 in every mode, with the optimizer
state keyed by parameter name (:func:`full_optimizer_state`), so a run resumes on any number of ranks and
may switch between single-process, DDP and FSDP.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from fastrm.config import ConfigError, require_setting

log = logging.getLogger("fastrm")

SETTINGS = ("auto", "ddp", "fsdp")


def validate_setting(value: str, optimizer: str = "auto"):
    """Checks of the ``distributed`` setting and what it rules out."""
    require_setting(value in SETTINGS, "distributed", value, "must be auto, ddp or fsdp")
    if value == "fsdp":
        require_setting(optimizer != "adamw8bit", "optimizer", optimizer,
                "adamw8bit (bitsandbytes) cannot step FSDP2's sharded DTensor parameters; use adamw or auto "
                "(which picks adamw under fsdp) - sharding already divides the optimizer state by world_size")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(setting: str = "auto") -> str | None:
    """Join the process group torchrun describes. Returns the data-parallel mode of this run: ``"ddp"``,
    ``"fsdp"``, or ``None`` (one process, nothing to wrap)."""
    if setting != "auto" and not launched_by_torchrun():
        raise ConfigError(f"setting distributed={setting!r}: needs the process group torchrun sets up; launch "
                          f"with torchrun --nproc-per-node N -m fastrm ... (or use distributed=auto)")
    if setting == "auto" and env_world_size() <= 1:
        return None
    if not is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env_local_rank())
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    mode = "fsdp" if setting == "fsdp" else "ddp"
    log.info("distributed: rank %d of %d, backend %s, %s", rank(), world_size(), dist.get_backend(), mode)
    return mode


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier():
    if is_initialized():
        dist.barrier()


def run_on_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0 only, and its result - or the exception it raised - on every rank, so that
    all ranks go on or stop together (a rank that raised alone would leave the others waiting in a collective).
    For decisions and file writes that rank 0 owns: taking the output folder, writing a checkpoint."""
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 (re-raised below, on every rank)
            error = err
    if is_initialized() and world_size() > 1:
        # The error travels as its class and message (its traceback and causes stay on rank 0).
        box = [(result, None if error is None else (type(error), str(error)))]
        dist.broadcast_object_list(box, src=0)
        result, sent = box[0]
        if sent is not None and not is_main():
            try:
                error = sent[0](sent[1])
            except Exception:  # noqa: BLE001 (a class that needs other arguments)
                error = RuntimeError(f"rank 0: {sent[0].__name__}: {sent[1]}")
    if error is not None:
        raise error
    return result


def _collective_device() -> torch.device:
    """Where tensors must live for a collective: the current GPU under nccl, the CPU under gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place, also returned); identity with one process."""
    if is_initialized() and world_size() > 1:
        device = _collective_device()
        if tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            staged = tensor.to(device)
            dist.all_reduce(staged, op=dist.ReduceOp.SUM)
            tensor.copy_(staged)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (in place, also returned); identity with one process."""
    all_reduce_sum(tensor)
    if world_size() > 1:
        tensor /= world_size()
    return tensor


def global_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """``(count, mean, m2)`` of the (masked) entries of ``x`` over all ranks, float64 0-d tensors, where
    ``m2`` is the sum of squared deviations from the global mean. Two passes (sum, then squared deviations
    from the global mean) for the same accuracy as one process; 2 tiny collectives."""
    x = x.double()
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    xm = torch.where(keep, x, 0.0)
    sums = all_reduce_sum(torch.stack([keep.sum().double(), xm.sum()]))
    count, mean = sums[0], sums[1] / sums[0].clamp_min(1)
    m2 = all_reduce_sum(torch.where(keep, xm - mean, 0.0).pow(2).sum())
    return count, mean, m2


def token_weight(local_tokens: torch.Tensor) -> float:
    """``world_size * local_tokens / all ranks' tokens`` (1.0 with one process; a collective otherwise).

    DDP and FSDP average gradients over ranks; a loss that is a mean over this rank's tokens, multiplied by
    this weight, makes that average the mean over every token of every rank, as one process would take it."""
    if world_size() == 1:
        return 1.0
    local = local_tokens.detach().double().clone()
    total = all_reduce_sum(local.clone())
    return float(world_size() * local / total.clamp_min(1))


def shard(items: list) -> list:
    """This rank's disjoint part of a global batch: items ``rank::world_size`` (all of them with one process)."""
    return items[rank()::world_size()]


def shard_batches(items: list, batch_size: int):
    """This rank's share of ``items`` as ``(batch, weight)`` pairs: global batches of ``batch_size * world_size``
    split with :func:`shard`. Every rank yields the same number of batches (an FSDP forward is a collective
    every rank must join), and none is empty: a rank with nothing left in the last global batch gets a
    stand-in item with weight 0."""
    step = batch_size * world_size()
    for start in range(0, len(items), step):
        part = shard(items[start:start + step])
        yield (part, len(part)) if part else (items[start:start + 1], 0)


def decorrelate_rng(seed: int, step: int):
    """Give ranks > 0 their own sampling stream (seeded by seed, rank and step); rank 0 keeps its stream, so
    one process draws what it drew before. Models are built before this, from the same seed on every rank."""
    if rank() > 0:
        torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank())


def cleanup():
    """Leave the process group; the barrier first keeps one rank from tearing down while another still talks."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- wrapping models ------------------------------------------------------------------------------------------------

class ForwardAdapter(nn.Module):
    """The module DDP / FSDP wrap: its forward runs ``fn(model, *args)``. fastrm's forwards call a model's
    backbone and head separately (fused log-probs, packed reward scores) and generation calls the model many
    times; DDP only reduces gradients of what ran inside its own forward, and FSDP only gathers the
    parameters outside the transformer blocks (embeddings, final norm, heads) inside its root's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


class Parallel:
    """A model and how it is spread over ranks. ``parallel(fn, batch)`` runs ``fn(model, batch)``: through
    FSDP always (every forward gathers shards), through DDP while training with gradients, directly otherwise
    (one process; DDP eval and generation need no collective)."""

    def __init__(self, model: nn.Module, mode: str | None = None, wrapper: nn.Module | None = None):
        self.model, self.mode, self.wrapper = model, mode, wrapper

    @classmethod
    def wrap(cls, model: nn.Module, mode: str | None, device: torch.device, bf16: bool = False) -> Parallel:
        if mode is None:
            return cls(model)
        if mode == "ddp":
            if not any(p.requires_grad for p in model.parameters()):
                return cls(model)  # a frozen model (reference, reward model) is simply replicated
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            return cls(model, mode, DistributedDataParallel(ForwardAdapter(model), device_ids=device_ids))
        if mode == "fsdp":
            if getattr(model, "is_loaded_in_8bit", False):
                log.info("fsdp: %s is 8-bit (bitsandbytes), which FSDP cannot shard; it stays replicated",
                         type(model).__name__)
                return cls(model)
            return cls(model, mode, _fully_shard(ForwardAdapter(model), device, bf16))
        raise ValueError(f"unknown data-parallel mode {mode!r}")

    @property
    def is_fsdp(self) -> bool:
        return self.mode == "fsdp"

    def __call__(self, fn, *args, **kwargs):
        if self.is_fsdp:
            out = self.wrapper(fn, *args, **kwargs)
            if not torch.is_grad_enabled():
                # FSDP leaves the root's parameters gathered after a forward until backward reshards them; with
                # no backward coming (eval, rollouts) reshard now, or the model would keep whole copies (and the
                # optimizer's sharded parameters would no longer be the model's).
                self.wrapper.reshard()
            return out
        if self.wrapper is not None and torch.is_grad_enabled() and self.model.training:
            return self.wrapper(fn, *args, **kwargs)
        return fn(self.model, *args, **kwargs)

    def gradient_sync(self, enabled: bool):
        """Context in which backward does (``enabled``) or does not (accumulation micro-batches) reduce gradients."""
        if enabled or self.wrapper is None:
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return self.wrapper.no_sync()
        return _fsdp_no_sync(self.wrapper)


@contextlib.contextmanager
def _fsdp_no_sync(wrapper):
    wrapper.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        wrapper.set_requires_gradient_sync(True)


def _block_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks, as Hugging Face models declare them (``_no_split_modules``)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _fully_shard(adapter: ForwardAdapter, device: torch.device, bf16: bool) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise RuntimeError(f"distributed=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                           f"this is torch {torch.__version__}. Use distributed=ddp or upgrade torch") from None

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    blocks = _block_classes(adapter.model)
    units = [m for m in adapter.model.modules() if type(m).__name__ in blocks]
    if not units:
        log.warning("fsdp: %s declares no transformer blocks (_no_split_modules); sharding it as one unit",
                    type(adapter.model).__name__)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(adapter, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm, heads
    return adapter


# ---- checkpoints: full state on rank 0, whatever the mode ----------------------------------------------------------

def _full(value):
    """A CPU copy of a state tensor for rank 0, the rank that writes checkpoints (None on the others), gathered
    from its shards when it is an FSDP DTensor (a collective every rank joins)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    if not is_main():
        return None  # no host copy of the whole state on every rank
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def full_model_state(model: nn.Module, names=None) -> dict[str, torch.Tensor]:
    """The model's state dict (its entries ``names`` only, when given) with every tensor whole and on rank 0's CPU
    (all ranks must call it under FSDP; the values are None on the others)."""
    keep = None if names is None else set(names)
    return {name: _full(value) for name, value in model.state_dict().items() if keep is None or name in keep}


def _param_names(model: nn.Module, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("optimizer holds a parameter that is not one of the model's") from None


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` with parameters named (``model.named_parameters()``) instead of numbered
    and every state tensor whole on rank 0's CPU (None on the others), so it loads into any mode and number
    of ranks."""
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    return {"format": "named",
            "state": {names[i]: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _shard_like(full: torch.Tensor, param):
    """``full`` split over the ranks the way the DTensor ``param`` is; every rank holds the same ``full``."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(param.device)
    try:
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)  # no communication
    except TypeError:  # torch without src_data_rank: scattered from rank 0 instead (the same values)
        return distribute_tensor(full, param.device_mesh, param.placements)


def load_full_optimizer_state(model: nn.Module, optimizer, saved: dict):
    """Inverse of :func:`full_optimizer_state`; a tensor shaped like its parameter is re-sharded the way the
    parameter is (each rank keeps its own chunk, no communication)."""
    from torch.distributed.tensor import DTensor

    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = sorted(set(saved["state"]) - set(index))
    if missing:
        raise ValueError(f"optimizer state names parameters this model does not train: {missing[:5]}")
    state = {}
    for name, entries in saved["state"].items():
        param = params[index[name]]
        state[index[name]] = {k: _shard_like(v, param) if isinstance(param, DTensor) and
                              isinstance(v, torch.Tensor) and v.shape == param.shape else v
                              for k, v in entries.items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
