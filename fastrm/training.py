"""Pieces every trainer loop shares: device and seed, optimizer and schedule, metrics, checkpoints.

Kept as plain functions and two small classes so each trainer file reads as one loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fastrm import _checks
from fastrm import checkpoint as ckpt
from fastrm import distributed, gguf_files, lora, packing
from fastrm.checkpoint import CHECKPOINT_PREFIX, LATEST_FILE, latest_checkpoint, load_trainer_state  # noqa: F401
from fastrm.config import ConfigError, require, setting
from fastrm.data import AUTO_TOKENIZER, EMBEDDED_TOKENIZER
from fastrm.lora import LoraSettings
from fastrm.models import TINY, ModelConfig, is_hub_name
from fastrm.tasks.arithmetic import MAX_LEVEL as MAX_TASK_LEVEL

log = logging.getLogger("fastrm")

FINAL_DIR = "final"  # output_dir/final: the trained model and tokenizer, when training ends
PRESETS = ("auto", "tiny", "none")
# transformers' schedules that need nothing beyond warmup and total steps (the others need a metric or extra kwargs)
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")
MIN_LENGTH = 3  # one special token + one token of text + EOS


def check_device(name: str, setting_name: str = "device"):
    """``auto``, or a torch device string naming a device this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        require(False, setting_name, name, "must be auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        require(torch.cuda.is_available(), setting_name, name, "CUDA is not available on this machine")
        require(device.index is None or device.index < torch.cuda.device_count(), setting_name, name,
                f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    else:
        require(device.type == "cpu", setting_name, name, "must be auto, cpu, cuda or cuda:N")


def check_tokenizer(spec: str, setting_name: str, *keywords: str):
    """One of ``keywords``, a local tokenizer folder, or a name in Hugging Face hub form (read from the local cache;
    fastrm never downloads a tokenizer)."""
    if gguf_files.is_gguf(spec):  # the tokenizer a .gguf file carries
        gguf_files.check(spec, setting_name)
    elif spec not in keywords and not Path(spec).expanduser().is_dir():
        require(is_hub_name(spec), setting_name, spec,
                f"must be {' or '.join(keywords)}, a .gguf file, or a tokenizer folder (no such folder)")


@dataclass
class TrainerSettings:
    """The settings every trainer has. Each trainer's config subclasses this (or :class:`SupervisedSettings`),
    re-declaring a setting where its default differs, and adds its own.

    The defaults suit a pretrained checkpoint. ``TINY_PRESET`` holds what the embedded task's small from-scratch
    model needs instead (larger learning rates, short sequences, ...): a layer over the defaults, under the YAML
    file and the ``key=value`` overrides, applied when ``preset`` says so (see :func:`fastrm.config.load_config`)."""

    TINY_PRESET: ClassVar[dict] = {}

    preset: str = setting("auto", "settings layer under the YAML file and overrides: auto (tiny when "
                                  "model.name_or_path=tiny, else none) | tiny (the embedded task's small-model "
                                  "settings) | none (the defaults, for pretrained checkpoints)")
    model: ModelConfig = setting(ModelConfig(), "the model trained (nested settings: model.*)")
    lora: LoraSettings = setting(LoraSettings(), "LoRA / QLoRA adapters (peft): lora.r > 0 trains adapters on the "
                                                 "frozen model instead of all its weights")
    output_dir: str = setting("runs/fastrm", "folder for checkpoints, metrics.jsonl, TensorBoard logs and config.yaml")
    batch_size: int = setting(16, "examples per step per device (global batch = batch_size x processes)")
    max_steps: int = setting(100, "optimizer steps to train for")
    lr: float = setting(1e-4, "peak learning rate")
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    lr_scheduler: str = setting("constant", "learning-rate schedule after the warmup: " + " | ".join(SCHEDULERS))
    warmup_steps: int = setting(0, "steps of linear learning-rate warmup; 0: warmup_ratio of the steps")
    warmup_ratio: float = setting(0.0, "share of the optimizer steps spent warming the learning rate up (when "
                                       "warmup_steps is 0)")
    max_grad_norm: float = setting(1.0, "clip the gradient's global L2 norm to this")
    optimizer: str = setting("auto", "auto (AdamW8bit on CUDA, AdamW on CPU and under fsdp) | adamw | adamw8bit")
    mixed_precision: str = setting("auto", "auto (bf16 autocast on CUDA) | bf16 | no")
    log_steps: int = setting(1, "write metrics every this many steps")
    eval_steps: int = setting(50, "evaluate every this many steps (and at the end)")
    save_steps: int = setting(100, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = setting(2, "checkpoints of this run kept in output_dir (0: keep all)")
    seed: int = setting(0, "seed of the data order, the initialisation and the sampling")
    device: str = setting("auto", "auto (CUDA if available, one GPU per torchrun process) | cpu | cuda | cuda:N")
    resume: bool = setting(False, "continue from the latest checkpoint in output_dir (also --resume)")
    tensorboard: bool = setting(True, "also write TensorBoard logs to output_dir/tensorboard")
    progress: bool = setting(True, "show a progress bar")
    backend: str = setting("auto", "fastrm ops: auto (Triton on CUDA, PyTorch elsewhere) | triton | torch")
    distributed: str = setting("auto", "under torchrun: auto (DDP with more than one process) | ddp | fsdp "
                                       "(FSDP2, sharded); see fastrm.distributed")
    train_split: str = setting("train", "the split of train_data to train on when it is a DatasetDict "
                                        "(a datasets save_to_disk folder)")
    eval_split: str = setting("test", "the split to evaluate on when eval_data (or, without it, train_data) is "
                                      "a DatasetDict")
    overwrite_output_dir: bool = setting(False, "start a new run in an output_dir that holds an earlier run's "
                                                "checkpoints: delete them, its latest, metrics and logs first")
    packed: str = setting("auto", packing.SETTING_HELP)

    # Settings a resumed run may not change: they fix the model, the data or its order, or what the saved state
    # holds ("model": every model.* but FREE_ON_RESUME). Every other setting may change and applies on resume.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("model", "lora", "seed", "batch_size")
    FREE_ON_RESUME: ClassVar[tuple[str, ...]] = ("model.gradient_checkpointing", "model.attn_implementation")

    @classmethod
    def preset_values(cls, merged) -> dict:
        """The preset layer for the settings ``merged`` (defaults + the user's layers): ``TINY_PRESET`` for
        ``preset=tiny``, or ``preset=auto`` with the ``tiny`` model; nothing otherwise."""
        name = merged.get("preset", "auto")
        if name == "auto":
            name = "tiny" if merged.model.name_or_path == TINY else "none"
        return cls.TINY_PRESET if name == "tiny" else {}

    def validate(self):
        """Checks of the shared settings; a trainer's config extends this with its own."""
        from fastrm.config import require, require_writable_dir, unyaml_no

        require(self.preset in PRESETS, "preset", self.preset, "must be one of " + ", ".join(PRESETS))
        self.model.validate()
        lora.validate_with(self.lora, self.model.name_or_path, self.distributed)
        require(not (self.model.load_in_8bit and self.lora.quantize != "none"), "model.load_in_8bit",
                self.model.load_in_8bit, "is for frozen models; a trained model's quantized weights are set by "
                "lora.quantize")
        self.mixed_precision = unyaml_no(self.mixed_precision)
        for name in ("batch_size", "max_steps", "log_steps", "eval_steps", "save_steps"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be > 0 and finite")
        require(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay", self.weight_decay,
                "must be >= 0 and finite")
        require(self.lr_scheduler in SCHEDULERS, "lr_scheduler", self.lr_scheduler,
                "must be one of " + ", ".join(SCHEDULERS))
        require(not (self.resume and self.overwrite_output_dir), "overwrite_output_dir", self.overwrite_output_dir,
                "cannot be combined with --resume (resume continues the run in output_dir, overwrite deletes it)")
        require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must lie in [0, 1)")
        require(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0")
        require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")
        require(self.optimizer in ("auto", "adamw", "adamw8bit"), "optimizer", self.optimizer,
                "must be auto, adamw or adamw8bit")
        require(self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision", self.mixed_precision,
                "must be auto, bf16 or no")
        require(self.backend in ("auto", "triton", "torch"), "backend", self.backend, "must be auto, triton or torch")
        check_device(self.device)
        require_writable_dir(self.output_dir, "output_dir")
        distributed.validate_setting(self.distributed, self.optimizer)
        self.packed = packing.normalize_setting(self.packed)
        require(self.packed in packing.SETTINGS, "packed", self.packed, "must be " + ", ".join(packing.SETTINGS))


@dataclass
class SupervisedSettings(TrainerSettings):
    """What the reward and SFT trainers add: a tokenized dataset, its length limit, packing, accumulation; and their
    defaults for a pretrained checkpoint (the tiny model's: each config's ``TINY_PRESET``)."""

    batch_size: int = setting(8, "examples (preference pairs) per step, per device under torchrun")
    max_steps: int = setting(1000, "optimizer steps")
    lr_scheduler: str = "cosine"  # (the meanings of re-declared settings are the base class's)
    warmup_ratio: float = setting(0.03, "share of the optimizer steps spent warming the learning rate up (when "
                                        "warmup_steps is 0)")
    log_steps: int = setting(10, "log the metrics every N steps")
    eval_steps: int = setting(200, "evaluate every N steps (and at the end)")
    save_steps: int = setting(500, "checkpoint every N steps (and at the end)")

    tokenizer: str = setting("auto", "auto: the checkpoint's own tokenizer (the embedded task's for the tiny model) "
                                     "| embedded | a tokenizer folder")
    train_data: str | None = setting(None, "training data: JSONL, Parquet, or a datasets save_to_disk folder; null: "
                                           "the embedded arithmetic task")
    eval_data: str | None = setting(None, "held-out data (same formats); null: eval_fraction of train_data")
    eval_fraction: float = setting(0.05, "held-out share of train_data when eval_data is not given")
    task_max_level: int = setting(0, "embedded task: hardest level, 0 (one-digit sums, learned in minutes on CPU) "
                                     "to 4")
    skip_malformed: bool = setting(False, "skip and count malformed data rows instead of stopping at the first")
    max_length: int = setting(1024, "tokens per sequence (special tokens included): longer examples are truncated "
                                    "(the prompt from the left) or dropped (truncation=drop), counted in the log")
    truncation: str = setting("truncate", "over max_length: truncate (the prompt from the left) | drop")
    grad_accum_steps: int = setting(1, "batches whose gradients are summed into one optimizer step")

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = TrainerSettings.FIXED_ON_RESUME + (
        "tokenizer", "train_data", "train_split", "eval_data", "eval_fraction", "task_max_level", "skip_malformed",
        "max_length", "truncation")

    def validate(self):
        from fastrm.config import require, require_path

        super().validate()
        require(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        require(self.max_length >= MIN_LENGTH, "max_length", self.max_length,
                f"must be >= {MIN_LENGTH} (a special token, at least one token of text, and EOS)")
        require(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "must lie in [0, 1)")
        require(self.truncation in ("truncate", "drop"), "truncation", self.truncation, "must be truncate or drop")
        require(0 <= self.task_max_level <= MAX_TASK_LEVEL, "task_max_level", self.task_max_level,
                f"must lie in [0, {MAX_TASK_LEVEL}]")
        check_tokenizer(self.tokenizer, "tokenizer", AUTO_TOKENIZER, EMBEDDED_TOKENIZER)
        require_path(self.train_data, "train_data")
        require_path(self.eval_data, "eval_data")


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
        self.checkpoint_verified = False  # a training step has run from last_checkpoint with finite loss and grads
        self.resume_from: Path | None = None  # the checkpoint this run continues (start_run decides)
        self.run_id: str | None = None  # this run's id, recorded in its checkpoints: pruning deletes only these
        self.lock: ckpt.OutputLock | None = None  # rank 0's lock on out_dir
        self.final_model: Path | None = None  # output_dir/final, written when training ends
        self.task = None  # the embedded task, when the data is its
        self.progress_desc: str | None = None  # the progress bar's label, when not the trainer's own

    def evaluate_and_save(self, has_eval: bool):
        """After a step: evaluate every ``eval_steps`` and checkpoint every ``save_steps``, both at the last step,
        once the guard has read that the update left finite parameters."""
        c, last = self.config, self.step == self.config.max_steps
        evaluating = has_eval and (self.step % c.eval_steps == 0 or last)
        saving = self.step % c.save_steps == 0 or last
        if evaluating or saving:
            self.guard.check_parameters()
        if evaluating:
            self.metrics.log(self.step, self.evaluate())
        if saving:
            self.save()

    def hold_output_dir(self):
        """Take the lock on out_dir again (rank 0) when a finished ``train()`` released it and training goes on."""
        if self.lock is None and self.run_id is not None and distributed.is_main():
            self.lock = ckpt.OutputLock(self.out_dir).acquire()

    def release_output_dir(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def parameter_counts(model) -> str:
    """``"1.23M parameters"``, or with frozen ones (LoRA) ``"1.23M parameters, 0.05M trained"``."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = f"{total / 1e6:.2f}M parameters"
    return text if trained == total else f"{text}, {trained / 1e6:.3f}M trained"


def log_tokenized(split: str, report, max_length: int):
    """One log line per tokenized split: examples kept, and how many were truncated or dropped at max_length."""
    log.info("%s: %d examples from %d rows; %d truncated, %d dropped at max_length=%d", split, report.n_examples,
             report.n_rows, report.truncated, report.dropped, max_length)


def use_bf16_autocast(mixed_precision: str, device: torch.device) -> bool:
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def choose_packing(trainer, model, kind: str, name: str) -> packing.Packing:
    """The ``packed`` setting decided for one of the trainer's models (:func:`fastrm.packing.choose_packing`), at
    load time: before data-parallel wrapping, and probed under the autocast that training will use."""
    bf16 = use_bf16_autocast(trainer.config.mixed_precision, trainer.device)
    return packing.choose_packing(model, trainer.config.packed, kind, name=name,
                                  special_ids=getattr(trainer.tokenizer, "all_special_ids", ()),
                                  autocast_dtype=torch.bfloat16 if bf16 else None)


def to_device(batch: dict, device: torch.device, decision: packing.Packing) -> dict:
    """A collated batch on ``device``, with its length buckets when ``decision`` says so."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return packing.bucket(batch) if decision.mode == "bucketed" else batch


def autocast(enabled: bool, device: torch.device):
    import contextlib

    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN/inf loss, gradient norm or parameter) and stopped before the optimizer step and
    before any checkpoint; ``latest`` names the last good checkpoint."""


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def start_run(trainer):
    """The first lines of every trainer's setup: logging, seeds, the output folder and its config.yaml.

    Joins the torchrun process group (see :mod:`fastrm.distributed`) and sets ``trainer.mode`` (``"ddp"``,
    ``"fsdp"`` or ``None``); only rank 0 then logs at INFO. Rank 0 takes the output folder - its lock, and the
    choice to resume, overwrite or refuse (:func:`fastrm.checkpoint.open_output_dir`) - and every rank learns the
    outcome; a resumed run's settings are compared with its checkpoint's; rank 0 writes config.yaml."""
    from fastrm.config import save_config

    config = trainer.config
    setup_logging()
    trainer.mode = distributed.init_from_env(config.distributed)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)
    set_seed(config.seed)
    resume_from, trainer.run_id = distributed.run_on_main(_open_output_dir, trainer)
    trainer.resume_from = Path(resume_from) if resume_from else None
    try:
        if trainer.resume_from is not None:
            check_resume_settings(config, trainer.resume_from)
        if distributed.is_main():
            save_config(config, trainer.out_dir / "config.yaml")
    except BaseException:
        trainer.release_output_dir()
        raise


def _open_output_dir(trainer) -> tuple[str | None, str]:
    c = trainer.config
    trainer.lock, checkpoint, run_id = ckpt.open_output_dir(trainer.out_dir, c.resume, c.overwrite_output_dir)
    weakref.finalize(trainer, trainer.lock.release)  # a trainer dropped without train() frees the folder
    return (str(checkpoint) if checkpoint else None), run_id


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume_settings(config, checkpoint: Path):
    """Refuse a resume that changes a setting of ``config.FIXED_ON_RESUME`` (a ConfigError naming each), and log
    the settings that changed since ``checkpoint`` was written, which apply from here. ``batch_size`` is compared
    as the global batch, ``batch_size * world_size``: a run may resume on another number of processes."""
    from fastrm.config import ConfigError, config_to_dict

    state = ckpt.saved_settings(checkpoint)
    saved, now = _flat(state["config"]), _flat(config_to_dict(config))
    changed = [(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != v
               and k not in ("resume", "overwrite_output_dir", "output_dir", "batch_size")]
    ranks, saved_ranks = distributed.world_size(), state.get("world_size") or distributed.world_size()
    if "batch_size" in saved and config.batch_size * ranks != saved["batch_size"] * saved_ranks:
        changed.append(("batch_size", f"{saved['batch_size']} x {saved_ranks} process(es)",
                        f"{config.batch_size} x {ranks} process(es)"))

    def fixed(key):
        return key not in config.FREE_ON_RESUME and any(key == f or key.startswith(f + ".")
                                                        for f in config.FIXED_ON_RESUME)

    refused = [f"{k} {old!r} -> {new!r}" for k, old, new in changed if fixed(k)]
    if refused:
        raise ConfigError(
            f"resume from {checkpoint}: these settings cannot change within a run (they fix the model, the data or "
            f"its order): {'; '.join(refused)}. Resume with the checkpoint's values, or start a new run (another "
            f"output_dir, or overwrite_output_dir=true; model.name_or_path={checkpoint} starts from its weights)")
    if changed:
        log.info("resume from %s: settings changed since it was written, applied from here: %s", checkpoint,
                 "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available() and distributed.env_world_size() > 1:
            return torch.device("cuda", distributed.env_local_rank())  # torchrun: one GPU per process
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


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


def warmup_steps(config: TrainerSettings, total_steps: int) -> int:
    """``config.warmup_steps``, or when 0, ``config.warmup_ratio`` of ``total_steps`` optimizer steps."""
    return config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """transformers' schedule ``name`` after ``warmup_steps`` of linear warmup. Its ``constant`` ignores the warmup;
    here it is honoured (``constant_with_warmup``), as every other schedule honours it."""
    from transformers import get_scheduler

    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def restore_schedule(optimizer, scheduler, saved: dict, weight_decay: float):
    """After the optimizer state is loaded: this run's lr, weight decay and schedule (kind, warmup, max_steps, as
    ``scheduler`` was built from the config) at the saved schedule's position. Unchanged settings give exactly the
    saved run's learning rates; a changed ``lr`` applies (the saved param groups alone would keep the old one)."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):
        scheduler.load_state_dict(saved)
        return
    scheduler.last_epoch, scheduler._step_count = saved["last_epoch"], saved["_step_count"]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, scheduler.base_lrs, lrs):
        group.update(initial_lr=base, lr=lr, weight_decay=weight_decay)
    scheduler._last_lr = lrs


def clip_gradients(model, max_grad_norm: float) -> torch.Tensor:
    """Clip the gradients; returns the pre-clip total norm, on the device (no sync)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    return grad_norm


def apply_update(optimizer, scheduler):
    """Step, schedule, zero: the end of every training step, once the guard has passed it."""
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def parameters_nonfinite(models) -> torch.Tensor:
    """1 if a trained parameter of ``models`` is NaN/inf, else 0, as a device tensor (no sync): one foreach
    max-norm over the (under FSDP: local) parameters, one read of each, no per-parameter kernel launch or sync."""
    tensors = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
               for m in models for p in m.parameters() if p.requires_grad]
    tensors = [t for t in tensors if t.numel()]  # an FSDP rank's shard of a small parameter may be empty
    if not tensors:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        largest = torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))
    else:
        largest = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))]).max()
    return (~torch.isfinite(largest)).float()


INVALID_INPUT = "invalid input to an op"


class DivergenceGuard:
    """Stops a diverging run - before the optimizer applies a non-finite update and before a checkpoint with
    non-finite parameters is written - on all ranks together, with a message naming a checkpoint that is really
    good, which ``latest`` then names.

    One fused check per optimizer step (:meth:`check_step`): the step's losses and gradient norms, and the
    parameters the previous update left (a device flag computed after it, :meth:`parameters_updated`), become a
    few flags on the device, summed over ranks in one collective and read in one host sync, which also reads the
    gradient norms for the metrics. Before an evaluation or a checkpoint :meth:`check_parameters` reads the
    parameter flag at once. The trainers run ops with their finiteness checks deferred to this guard
    (:func:`fastrm._checks.deferred_finite_checks`): a NaN model output reaches it instead of raising on one rank.

    A checkpoint is *verified* once a step has run from it with finite values (a ``verified`` file in it). When a
    step diverges from an unverified checkpoint's parameters, that checkpoint is set aside as
    ``diverged-checkpoint-N`` and ``latest`` moves back to the newest remaining one (pruning always keeps the newest
    verified checkpoint, so there is one if any was verified)."""

    def __init__(self, trainer, models: list):
        self.trainer, self.models = trainer, models
        self.pending: torch.Tensor | None = None  # parameter flag of the last update, not read yet
        self.parameters_checked_at: int | None = None

    def parameters_updated(self):
        self.pending = parameters_nonfinite(self.models)

    def check_step(self, losses: list[torch.Tensor], grad_norms: dict[str, torch.Tensor],
                   extra: dict[str, torch.Tensor] | None = None, hint=None) -> list[float]:
        """Before the optimizer step: stop if a loss, a gradient norm (named in ``grad_norms``), an ``extra`` flag
        (a named quantity -> nonzero if non-finite) or the parameters are non-finite. Returns the gradient norms.
        ``hint(names)``: a sentence for the stop message given the non-finite quantities' names, computed only
        then ("" for none)."""
        flags = {"loss": torch.stack([(~torch.isfinite(x.detach().float())).any() for x in losses]).any(),
                 **{name: ~torch.isfinite(norm) for name, norm in grad_norms.items()}, **(extra or {})}
        if self.pending is not None:
            flags["parameters"] = self.pending
            self.pending = None
        # Value checks the ops ran on the GPU without a sync (fastrm._checks) report here, in the same read.
        invalid_input = _checks.deferred_failure(self.trainer.device)
        flags[INVALID_INPUT] = invalid_input if invalid_input is not None else torch.zeros(())
        values = self._read(flags, list(grad_norms.values()))
        norms = values[len(flags):]
        bad = [name for name, v in zip(flags, values) if v]
        if INVALID_INPUT in bad:  # the cause of whatever else is non-finite: stop with the op's own message
            _checks.raise_deferred_errors()
            raise ValueError("an op found invalid input on another rank; its message is in that rank's output")
        if bad:
            shown = ", ".join(f"{name} {v:.4g}" for name, v in zip(grad_norms, norms))
            self.stop(f"non-finite {', '.join(bad)} at step {self.trainer.step + 1} ({shown})",
                      "before the optimizer step", hint(bad) if hint else "")
        self._verified()
        return norms

    def check_parameters(self):
        """Stop if the last update left a non-finite parameter (read before an evaluation, checkpoint or rollout)."""
        if self.pending is None and self.parameters_checked_at == self.trainer.step:
            return
        flag = self.pending if self.pending is not None else parameters_nonfinite(self.models)
        self.pending = None
        if self._read({"parameters": flag}, [])[0]:
            self.stop(f"non-finite parameters after the update of step {self.trainer.step}",
                      "before any evaluation, rollout or checkpoint")
        self.parameters_checked_at = self.trainer.step

    def _read(self, flags: dict, norms: list) -> list[float]:
        """The flags summed over ranks, then the norms (equal on every rank): one collective, one host sync."""
        vec = torch.stack([t.detach().to(device=self.trainer.device, dtype=torch.float64).reshape(())
                           for t in [*flags.values(), *norms]])
        world = distributed.world_size()
        if world > 1:
            distributed.all_reduce_sum(vec)
            vec[len(flags):] /= world
        return vec.tolist()

    def _verified(self):
        t = self.trainer
        if t.last_checkpoint is None or t.checkpoint_verified:
            return
        t.checkpoint_verified = True
        if distributed.is_main() and t.run_id is not None:
            try:
                ckpt.mark_verified(t.last_checkpoint, t.step)
                ckpt.prune(t.out_dir, t.run_id, t.config.keep_checkpoints)
            except OSError as err:
                log.warning("could not mark %s verified or prune older checkpoints: %s", t.last_checkpoint, err)

    def stop(self, what: str, when: str, hint: str = ""):
        """Raise NonFiniteLossError on every rank, once rank 0 has set aside an unverified checkpoint the diverged
        step started from and pointed ``latest`` at the good one."""
        t = self.trainer
        suspect = t.last_checkpoint if (t.last_checkpoint is not None and not t.checkpoint_verified) else None
        good = distributed.run_on_main(ckpt.set_aside_diverged, t.out_dir, t.run_id, suspect) if t.run_id else None
        where = (f"the last good checkpoint is {good} (`latest` names it)" if good
                 else "no good checkpoint was written")
        if suspect is not None:
            where += f"; {suspect.name}, which this step started from, is set aside as diverged-{suspect.name}"
        raise NonFiniteLossError(
            f"training diverged: {what}; stopped {when}, so no checkpoint holds them. "
            f"{where[:1].upper() + where[1:]}.{' ' + hint if hint else ''} Lower the learning rate or check "
            f"the data, then resume (--resume; a changed lr applies).")


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
    ``trainer.compute_loss`` and backward, clip, the divergence guard's one check (non-finite loss, gradient norm or
    parameters stop here, before the optimizer), then optimizer / schedule; log every ``log_steps``, evaluate every
    ``eval_steps``, checkpoint every ``save_steps`` (and at the end). ``postfix`` maps progress-bar labels to
    metric names. The output folder's lock is released when training ends, however it ends.

    Under torchrun (DDP / FSDP), every rank draws the same global batch of ``batch_size * world_size`` examples
    from the stream and trains on its shard ``rank::world_size``; gradients are averaged over ranks on the last
    micro-batch of a step only; metrics are averaged over ranks and rank 0 alone writes them."""
    from tqdm.auto import tqdm

    from fastrm._checks import deferred_finite_checks
    from fastrm.data import count_tokens

    c = trainer.config
    trainer.hold_output_dir()
    trainer.model.train()
    bar = tqdm(total=c.max_steps, initial=trainer.step, desc=trainer.progress_desc or desc,
               disable=not (c.progress and distributed.is_main()))
    window = MetricsWindow()
    try:
        with deferred_finite_checks():
            while trainer.step < c.max_steps:
                losses = []
                for micro in range(c.grad_accum_steps):
                    batch = trainer.collate(distributed.shard(next(trainer.stream)))
                    with trainer.parallel.gradient_sync(micro == c.grad_accum_steps - 1):
                        loss, metrics = trainer.compute_loss(batch)
                        (loss / c.grad_accum_steps).backward()
                    losses.append(loss.detach())
                    window.add(metrics, count_tokens(batch))
                grad_norm = clip_gradients(trainer.model, c.max_grad_norm)
                (grad_norm,) = trainer.guard.check_step(losses, {"gradient norm": grad_norm})
                apply_update(trainer.optimizer, trainer.scheduler)
                trainer.guard.parameters_updated()
                trainer.step += 1
                bar.update(1)
                if trainer.step % c.log_steps == 0 or trainer.step == c.max_steps:
                    row = window.summary()
                    row.update({"grad_norm": grad_norm, "lr": trainer.scheduler.get_last_lr()[0],
                                "epoch": trainer.stream.epoch})
                    trainer.metrics.log(trainer.step, row)
                    bar.set_postfix({label: f"{row[key]:.4f}" for label, key in postfix.items()})
                trainer.evaluate_and_save(bool(trainer.eval_examples))
        trainer.final_model = save_final(trainer.parallel, trainer.tokenizer, trainer.out_dir)
    finally:
        bar.close()
        trainer.metrics.close()
        trainer.release_output_dir()
    return trainer


def prepare_optimization(trainer):
    """Resume weights, data-parallel wrapping, optimizer, schedule, batch stream, resume state, divergence guard
    and metrics: the end of every supervised trainer's setup. The order matters: weights are loaded into the whole
    model, FSDP then shards it, and the optimizer is built on the (sharded) parameters FSDP leaves in the model."""
    c = trainer.config
    checkpoint = trainer.resume_from
    if checkpoint is not None:
        load_model_weights(trainer.model, checkpoint)
    trainer.autocast = use_bf16_autocast(c.mixed_precision, trainer.device)
    trainer.parallel = distributed.Parallel.wrap(trainer.model, trainer.mode, trainer.device, bf16=trainer.autocast)
    trainer.optimizer = make_optimizer(trainer.model.parameters(), c.optimizer, c.lr, c.weight_decay, trainer.device,
                                       sharded=trainer.parallel.is_fsdp)
    trainer.scheduler = make_scheduler(trainer.optimizer, c.lr_scheduler, warmup_steps(c, c.max_steps), c.max_steps)
    # The stream yields GLOBAL batches (batch_size per device x world_size); fit() shards them per rank.
    # Its position is global, so a checkpoint resumes on any number of ranks with the same global batch.
    trainer.stream = BatchStream(trainer.train_examples, c.batch_size * distributed.world_size(), c.seed)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        restore_schedule(trainer.optimizer, trainer.scheduler, state["scheduler"], c.weight_decay)
        trainer.stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"])
        resumed_at(trainer, checkpoint, state["step"])
    trainer.guard = DivergenceGuard(trainer, [trainer.model])
    trainer.metrics = MetricsLogger(trainer.out_dir, c.tensorboard) if distributed.is_main() else NullMetricsLogger()


def resumed_at(trainer, checkpoint: Path, step: int):
    trainer.step, trainer.last_checkpoint = step, checkpoint
    trainer.checkpoint_verified = (checkpoint / ckpt.VERIFIED_FILE).is_file()
    log.info("resumed from %s at step %d", checkpoint, step)


def save_trainer(trainer) -> Path:
    """Checkpoint the model and the training state of a supervised trainer (see :func:`save_distributed`)."""
    state = {"stream": trainer.stream.state_dict(),
             "optimizer": distributed.full_optimizer_state(trainer.model, trainer.optimizer),
             "scheduler": trainer.scheduler.state_dict(), "rng": rng_state()}
    return save_distributed(trainer, trainer.parallel, state)


# ---- checkpoints --------------------------------------------------------------------------------------------------

def save_distributed(trainer, parallel: distributed.Parallel, state: dict) -> Path:
    """Write ``checkpoint-<step>`` of ``parallel.model`` with ``state`` (plus the run id, step, world size and
    config), once: the guard first reads that the parameters are finite (a diverged model is never written), every
    rank takes part in gathering FSDP shards (``state`` is built on every rank for the same reason), rank 0 writes
    and prunes, and all ranks learn the outcome - an OS error on rank 0 (disk full) raises
    :class:`fastrm.checkpoint.CheckpointWriteError` on every rank."""
    from fastrm.config import config_to_dict

    trainer.guard.check_parameters()
    weights = distributed.full_model_state(parallel.model, lora.saved_names(parallel.model)) \
        if parallel.is_fsdp else None
    state = {"format": ckpt.STATE_FORMAT, "run_id": trainer.run_id, "step": trainer.step,
             "world_size": distributed.world_size(), "config": config_to_dict(trainer.config), **state}
    path = distributed.run_on_main(_write_checkpoint, trainer, parallel.model, state, weights)
    trainer.last_checkpoint, trainer.checkpoint_verified = Path(path), False
    return trainer.last_checkpoint


def _write_checkpoint(trainer, model, state: dict, weights) -> str:
    state["written_at"] = time.time()
    path = ckpt.write_checkpoint(trainer.out_dir, trainer.step, model, trainer.tokenizer, state, model_state=weights)
    try:
        ckpt.prune(trainer.out_dir, trainer.run_id, trainer.config.keep_checkpoints)
    except OSError as err:
        log.warning("could not prune older checkpoints in %s: %s", trainer.out_dir, err)
    return str(path)


def save_final(parallel: distributed.Parallel, tokenizer, out_dir: Path) -> Path:
    """Write the trained model and its tokenizer to ``out_dir/final``: an ordinary Hugging Face folder that
    ``from_pretrained`` loads (no trainer state), replacing the one of an earlier run. Written to a temporary
    folder first and renamed into place; every rank takes part (FSDP shards are gathered), rank 0 writes."""
    weights = distributed.full_model_state(parallel.model, lora.saved_names(parallel.model)) \
        if parallel.is_fsdp else None
    final = Path(out_dir) / FINAL_DIR
    if distributed.is_main():
        tmp = Path(out_dir) / f"{ckpt.TMP_PREFIX}{FINAL_DIR}-{os.getpid()}"
        if tmp.exists():
            ckpt.discard(tmp)
        parallel.model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                ckpt._fsync(child)
        if final.exists() or final.is_symlink():
            ckpt.discard(final)  # an earlier run's
        os.replace(tmp, final)
        log.info("final model and tokenizer saved in %s", final)
    distributed.barrier()
    return final


def load_model_weights(model, checkpoint: Path):
    """The weights of ``checkpoint`` into ``model``: its adapters (and fully trained heads) for a LoRA model."""
    if lora.is_peft(model):
        lora.load_adapter_weights(model, checkpoint)
        return
    if lora.adapter_config(checkpoint) is not None:
        raise ConfigError(f"resume from {checkpoint}: it holds a LoRA adapter but this run trains the whole model "
                          f"(lora.r=0); resume with the checkpoint's lora.* settings")
    model.load_state_dict(type(model).from_pretrained(checkpoint).state_dict())


def load_optimizer_state(model, optimizer, saved: dict):
    """Optimizer state saved by name (any mode, any number of ranks) or, from older checkpoints, by number."""
    if saved.get("format") == "named":
        distributed.load_full_optimizer_state(model, optimizer, saved)
    else:
        optimizer.load_state_dict(saved)
