"""Pieces every trainer loop shares: device and seed, optimizer and schedule, metrics, checkpoints.

Kept as plain functions and two small classes so each trainer file reads as one loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrm import distributed
from fastrm.config import setting
from fastrm.models import ModelConfig

log = logging.getLogger("fastrm")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"


@dataclass
class TrainerSettings:
    """The settings every trainer has. Each trainer's config subclasses this (or :class:`SupervisedSettings`),
    re-declaring a setting where its default differs, and adds its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    output_dir: str = "runs/fastrm"
    batch_size: int = 16  # per device under torchrun (global batch = batch_size * world_size)
    max_steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    optimizer: str = "auto"  # auto (AdamW8bit on CUDA, AdamW under fsdp) | adamw | adamw8bit
    mixed_precision: str = "auto"  # auto (bf16 on CUDA) | bf16 | no
    log_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True
    backend: str = "auto"  # fastrm ops backend
    # Multi-process (torchrun): auto (DDP with more than one process) | ddp | fsdp (FSDP2, sharded).
    # See fastrm.distributed.
    distributed: str = "auto"
    train_split: str = setting("train", "the split of train_data to train on when it is a DatasetDict "
                                        "(a datasets save_to_disk folder)")
    eval_split: str = setting("test", "the split to evaluate on when eval_data (or, without it, train_data) is "
                                      "a DatasetDict")

    def validate(self):
        """Checks of the shared settings; a trainer's config extends this with its own."""
        from fastrm.config import require, unyaml_no

        self.model.validate()
        self.mixed_precision = unyaml_no(self.mixed_precision)
        for name in ("batch_size", "max_steps", "log_steps", "eval_steps", "save_steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.lr > 0, "lr", self.lr, "must be > 0")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")
        require(self.optimizer in ("auto", "adamw", "adamw8bit"), "optimizer", self.optimizer,
                "must be auto, adamw or adamw8bit")
        require(self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision", self.mixed_precision,
                "must be auto, bf16 or no")
        require(self.backend in ("auto", "triton", "torch"), "backend", self.backend, "must be auto, triton or torch")
        distributed.validate_setting(self.distributed, self.optimizer)


@dataclass
class SupervisedSettings(TrainerSettings):
    """What the reward and SFT trainers add: a tokenized dataset, its length limit, packing, accumulation."""

    tokenizer: str = "embedded"  # "embedded": the built-in task's tokenizer; else a local tokenizer path
    train_data: str | None = None  # JSONL, Parquet, or a datasets save_to_disk folder; None: the embedded task
    eval_data: str | None = None
    eval_fraction: float = 0.05  # held-out share of train_data when eval_data is not given
    task_max_level: int = 0  # embedded task: one-digit sums, which a tiny model learns in minutes on CPU
    skip_malformed: bool = False
    max_length: int = 32
    truncation: str = "truncate"  # truncate | drop
    packed: bool = True  # padding-free batches
    grad_accum_steps: int = 1

    def validate(self):
        from fastrm.config import require

        super().validate()
        for name in ("grad_accum_steps", "max_length"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "must lie in [0, 1)")
        require(self.truncation in ("truncate", "drop"), "truncation", self.truncation, "must be truncate or drop")


class Trainer:
    """What every trainer starts with: its config, output folder, device, step counter and last checkpoint."""

    def __init__(self, config: TrainerSettings, *, train_data=None, eval_data=None):
        self.config = config
        # The data: config.train_data / eval_data (paths), or what was given in Python (a datasets.Dataset or
        # DatasetDict, a list of row dicts) in their place.
        self.train_data = getattr(config, "train_data", None) if train_data is None else train_data
        self.eval_data = getattr(config, "eval_data", None) if eval_data is None else eval_data
        self.out_dir = Path(config.output_dir)
        self.device = pick_device(config.device)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.task = None  # the embedded task, when the data is its

    def evaluate_and_save(self, has_eval: bool):
        """After a step: evaluate every ``eval_steps`` and checkpoint every ``save_steps``, both at the last step."""
        c, last = self.config, self.step == self.config.max_steps
        if has_eval and (self.step % c.eval_steps == 0 or last):
            self.metrics.log(self.step, self.evaluate())
        if self.step % c.save_steps == 0 or last:
            self.save()


def use_bf16_autocast(mixed_precision: str, device: torch.device) -> bool:
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast(enabled: bool, device: torch.device):
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """Training stopped on a NaN/inf loss; the last good checkpoint is left intact."""


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def start_run(config, out_dir: Path) -> str | None:
    """The first lines of every trainer's setup: logging, seeds, the output folder and its config.yaml.

    Also joins the torchrun process group (see :mod:`fastrm.distributed`) and returns the data-parallel mode
    (``"ddp"``, ``"fsdp"`` or ``None``); only rank 0 then logs at INFO and writes config.yaml."""
    from fastrm.config import save_config

    setup_logging()
    mode = distributed.init_from_env(config.distributed)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)
    set_seed(config.seed)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_config(config, Path(out_dir) / "config.yaml")
    return mode


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available() and distributed.env_world_size() > 1:
            return torch.device("cuda", distributed.env_local_rank())  # torchrun: one GPU per process
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"setting device={name!r}: CUDA is not available on this machine")
    return device


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device, sharded: bool = False):
    """``adamw`` (torch), ``adamw8bit`` (bitsandbytes, 8-bit states), or ``auto``: 8-bit on CUDA unless the
    parameters are FSDP-``sharded`` (bitsandbytes cannot step DTensors; sharding already divides the states)."""
    params = [p for p in params if p.requires_grad]
    if name == "auto":
        name = "adamw8bit" if device.type == "cuda" and not sharded else "adamw"
    if name == "adamw8bit":
        import bitsandbytes as bnb

        log.info("optimizer: bitsandbytes AdamW8bit")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    log.info("optimizer: torch AdamW")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=device.type == "cuda")


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def check_finite_loss(loss: torch.Tensor, step: int, checkpoint: Path | None):
    """Stop on a NaN/inf loss. Distributed, every rank stops together: a NaN on one makes the sum NaN on all."""
    if distributed.world_size() > 1:
        loss = distributed.all_reduce_sum(loss.detach().float().clone())
    if not torch.isfinite(loss.detach()).all():
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss ({loss.item()}) at step {step}; training stopped before the optimizer step, "
            f"{where}. Lower the learning rate or check the data, then resume."
        )


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, step, schedule, zero: the end of every training step. Returns the pre-clip gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


class NullMetricsLogger:
    """What ranks other than 0 get: they compute metrics (collectives need them) but write nothing."""

    def log(self, step: int, metrics: dict):
        pass

    def close(self):
        pass


class MetricsLogger:
    """Appends one JSON object per logging step to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict):
        row = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


# ---- data stream -----------------------------------------------------------------------------------------------------

class BatchStream:
    """Endless batches of examples; epoch e is a fixed shuffle of (seed, e), so a resumed run sees exactly
    the batches the uninterrupted run would have seen."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.batch_in_epoch = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> list:
        from fastrm.data import epoch_order

        order = epoch_order(len(self.examples), self.batch_size, self.seed, self.epoch)
        if self.batch_in_epoch >= len(order):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            order = epoch_order(len(self.examples), self.batch_size, self.seed, self.epoch)
        indices = order[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return [self.examples[i] for i in indices]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict):
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]


class MetricsWindow:
    """Averages per-batch metric dicts between two logging steps and counts tokens for throughput."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.tokens, self.start = [], 0, time.perf_counter()

    def add(self, metrics: dict, tokens: int):
        self.rows.append(metrics)
        self.tokens += tokens

    def summary(self) -> dict:
        """Window means; under DDP averaged over ranks too (tokens/s summed: the whole job's throughput)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        keys = list(self.rows[0])
        means = torch.stack([torch.stack([torch.as_tensor(r[k]).float().cpu() for r in self.rows]).mean()
                             for k in keys] + [torch.tensor(self.tokens / elapsed)])
        means = distributed.all_reduce_mean(means.double())
        out = {k: v.item() for k, v in zip(keys, means[:-1])}
        out["throughput/tokens_per_s"] = means[-1].item() * distributed.world_size()
        self.reset()
        return out


def mean_over_ranks(metrics: dict) -> dict:
    """Each metric (a number or a 0-d tensor) averaged over ranks; the metrics themselves with one process."""
    if distributed.world_size() == 1 or not metrics:
        return metrics
    keys = list(metrics)
    values = distributed.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, values.tolist()))


def reduce_sums(*values: float) -> list[float]:
    """Sums over ranks of a few Python numbers (eval totals and counts); the numbers themselves with one process."""
    if distributed.world_size() == 1:
        return list(values)
    return distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


# ---- the supervised loop --------------------------------------------------------------------------------------------

def fit(trainer, desc: str, postfix: dict):
    """Train ``trainer`` (reward or SFT) to ``config.max_steps``. One step: ``grad_accum_steps`` batches through
    ``trainer.compute_loss``, stop on a non-finite loss, backward, then clip / optimizer / schedule; log every
    ``log_steps``, evaluate every ``eval_steps``, checkpoint every ``save_steps`` (and at the end).
    ``postfix`` maps progress-bar labels to metric names.

    Under torchrun (DDP / FSDP), every rank draws the same global batch of ``batch_size * world_size`` examples
    from the stream and trains on its shard ``rank::world_size``; gradients are averaged over ranks on the last
    micro-batch of a step only; metrics are averaged over ranks and rank 0 alone writes them."""
    from tqdm.auto import tqdm

    from fastrm.data import count_tokens

    c = trainer.config
    trainer.model.train()
    bar = tqdm(total=c.max_steps, initial=trainer.step, desc=desc, disable=not (c.progress and distributed.is_main()))
    window = MetricsWindow()
    while trainer.step < c.max_steps:
        for micro in range(c.grad_accum_steps):
            batch = trainer.collate(distributed.shard(next(trainer.stream)))
            with trainer.parallel.gradient_sync(micro == c.grad_accum_steps - 1):
                loss, metrics = trainer.compute_loss(batch)
                check_finite_loss(loss, trainer.step, trainer.last_checkpoint)
                (loss / c.grad_accum_steps).backward()
            window.add(metrics, count_tokens(batch))
        grad_norm = optimizer_step(trainer.model, trainer.optimizer, trainer.scheduler, c.max_grad_norm)
        trainer.step += 1
        bar.update(1)
        if trainer.step % c.log_steps == 0 or trainer.step == c.max_steps:
            row = window.summary()
            row.update({"grad_norm": grad_norm, "lr": trainer.scheduler.get_last_lr()[0], "epoch": trainer.stream.epoch})
            trainer.metrics.log(trainer.step, row)
            bar.set_postfix({label: f"{row[key]:.4f}" for label, key in postfix.items()})
        trainer.evaluate_and_save(bool(trainer.eval_examples))
    bar.close()
    trainer.metrics.close()
    return trainer


def prepare_optimization(trainer):
    """Resume weights, data-parallel wrapping, optimizer, schedule, batch stream, resume state and metrics: the
    end of every supervised trainer's setup. The order matters: weights are loaded into the whole model, FSDP
    then shards it, and the optimizer is built on the (sharded) parameters FSDP leaves in the model."""
    c = trainer.config
    checkpoint = resume_checkpoint(trainer.out_dir, c.resume)
    if checkpoint is not None:
        load_model_weights(trainer.model, checkpoint)
    trainer.autocast = use_bf16_autocast(c.mixed_precision, trainer.device)
    trainer.parallel = distributed.Parallel.wrap(trainer.model, trainer.mode, trainer.device, bf16=trainer.autocast)
    trainer.optimizer = make_optimizer(trainer.model.parameters(), c.optimizer, c.lr, c.weight_decay, trainer.device,
                                       sharded=trainer.parallel.is_fsdp)
    trainer.scheduler = make_scheduler(trainer.optimizer, c.lr_scheduler, c.warmup_steps, c.max_steps)
    # The stream yields GLOBAL batches (batch_size per device x world_size); fit() shards them per rank.
    # Its position is global, so a checkpoint resumes on any number of ranks with the same global batch.
    trainer.stream = BatchStream(trainer.train_examples, c.batch_size * distributed.world_size(), c.seed)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        trainer.step, trainer.last_checkpoint = state["step"], checkpoint
        log.info("resumed from %s at step %d", checkpoint, trainer.step)
    trainer.metrics = MetricsLogger(trainer.out_dir, c.tensorboard) if distributed.is_main() else NullMetricsLogger()


def save_trainer(trainer) -> Path:
    """Checkpoint the model and the training state of a supervised trainer (see :func:`save_distributed`)."""
    state = {"step": trainer.step, "stream": trainer.stream.state_dict(),
             "optimizer": distributed.full_optimizer_state(trainer.model, trainer.optimizer),
             "scheduler": trainer.scheduler.state_dict(), "rng": rng_state(), "config": trainer.config}
    trainer.last_checkpoint = save_distributed(trainer.parallel, trainer.tokenizer, trainer.out_dir, trainer.step,
                                               state, trainer.config.keep_checkpoints)
    return trainer.last_checkpoint


# ---- checkpoints --------------------------------------------------------------------------------------------------

def save_distributed(parallel: distributed.Parallel, tokenizer, out_dir: Path, step: int, state: dict,
                     keep: int) -> Path:
    """Write ``checkpoint-<step>`` of ``parallel.model`` with ``state``, once: every rank takes part in gathering
    FSDP shards (``state`` is built on every rank for the same reason), rank 0 writes, all ranks wait for it."""
    weights = distributed.full_model_state(parallel.model) if parallel.is_fsdp else None
    final = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step}"
    if distributed.is_main():
        final = save_checkpoint(out_dir, step, parallel.model, tokenizer, state, keep=keep, model_state=weights)
    distributed.barrier()
    return final


def resume_checkpoint(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from: the latest of ``out_dir`` when ``resume`` (None, and a log line, if none)."""
    if not resume:
        return None
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        log.info("resume: no checkpoint in %s, starting fresh", out_dir)
    return checkpoint


def load_model_weights(model, checkpoint: Path):
    model.load_state_dict(type(model).from_pretrained(checkpoint).state_dict())


def load_optimizer_state(model, optimizer, saved: dict):
    """Optimizer state saved by name (any mode, any number of ranks) or, from older checkpoints, by number."""
    if saved.get("format") == "named":
        distributed.load_full_optimizer_state(model, optimizer, saved)
    else:
        optimizer.load_state_dict(saved)


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, trainer_state: dict, keep: int = 2,
                    model_state: dict | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically: everything goes to a temporary folder first, which is renamed
    into place only once complete, and ``latest`` is replaced atomically after that. A crash at any point
    leaves the previous checkpoint as ``latest``. ``model_state``: the weights to write instead of
    ``model.state_dict()`` (the gathered full state of an FSDP-sharded model)."""
    out_dir = Path(out_dir)
    final = out_dir / f"{CHECKPOINT_PREFIX}{step}"
    for stale in out_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):  # left by a crash mid-write: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp-{CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = out_dir / f".{LATEST_FILE}.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, out_dir / LATEST_FILE)
    _prune(out_dir, keep)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = Path(out_dir) / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def _prune(out_dir: Path, keep: int):
    checkpoints = sorted(
        (p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
    )
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path):
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())

