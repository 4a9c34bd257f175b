"""What every trainer is: its settings (:class:`TrainerSettings`, :class:`SupervisedSettings`), the state it starts
with (:class:`Trainer`), how a run starts (:func:`start_run`: logging, seeds, the output folder, resume checks), and
the contract the supervised loop relies on (:class:`SupervisedTrainer`, run by :func:`fastrm.trainers.loop.fit`)."""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from fastrm import checkpoint as ckpt
from fastrm import distributed, gguf_files, lora, packing
from fastrm.config import (
    ConfigError,
    config_to_dict,
    require_path,
    require_setting,
    require_writable_dir,
    save_config,
    setting,
    unyaml_no,
)
from fastrm.lora import LoraSettings
from fastrm.models import TINY, ModelConfig, is_hub_name
from fastrm.optim import SCHEDULERS
from fastrm.runtime import (HEAP_CHOICES, check_device, configure_heap, pick_device, set_seed, setup_logging,
                            use_bf16_autocast)
from fastrm.tasks.arithmetic import MAX_LEVEL as MAX_TASK_LEVEL
from fastrm.tokenization import AUTO_TOKENIZER, EMBEDDED_TOKENIZER

log = logging.getLogger("fastrm")

PRESETS = ("auto", "tiny", "none")


MIN_LENGTH = 3  # one special token + one token of text + EOS


def check_tokenizer(spec: str, setting_name: str, *keywords: str):
    """One of ``keywords``, a local tokenizer folder, or a name in Hugging Face hub form (read from the local cache;
    fastrm never downloads a tokenizer)."""
    if gguf_files.is_gguf(spec):  # the tokenizer a .gguf file carries
        gguf_files.check(spec, setting_name)
    elif spec not in keywords and not Path(spec).expanduser().is_dir():
        require_setting(is_hub_name(spec), setting_name, spec,
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
    cpu_heap: str = setting("keep", "CPU runs: keep (memory a step frees stays with the process for the next step; "
                                    "no page faults re-filling activations each step) | system (glibc's defaults)")

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
        require_setting(self.preset in PRESETS, "preset", self.preset, "must be one of " + ", ".join(PRESETS))
        self.model.validate()
        lora.validate_with(self.lora, self.model.name_or_path, self.distributed)
        require_setting(not (self.model.load_in_8bit and self.lora.quantize != "none"), "model.load_in_8bit",
                self.model.load_in_8bit, "is for frozen models; a trained model's quantized weights are set by "
                "lora.quantize")
        self.mixed_precision = unyaml_no(self.mixed_precision)
        for name in ("batch_size", "max_steps", "log_steps", "eval_steps", "save_steps"):
            require_setting(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require_setting(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be > 0 and finite")
        require_setting(self.weight_decay >= 0 and math.isfinite(self.weight_decay), "weight_decay", self.weight_decay,
                "must be >= 0 and finite")
        require_setting(self.lr_scheduler in SCHEDULERS, "lr_scheduler", self.lr_scheduler,
                "must be one of " + ", ".join(SCHEDULERS))
        require_setting(self.cpu_heap in HEAP_CHOICES, "cpu_heap", self.cpu_heap, "must be one of " + ", ".join(HEAP_CHOICES))
        require_setting(not (self.resume and self.overwrite_output_dir), "overwrite_output_dir", self.overwrite_output_dir,
                "cannot be combined with --resume (resume continues the run in output_dir, overwrite deletes it)")
        require_setting(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        require_setting(0 <= self.warmup_ratio < 1, "warmup_ratio", self.warmup_ratio, "must lie in [0, 1)")
        require_setting(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, "must be >= 0")
        require_setting(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "must be > 0")
        require_setting(self.optimizer in ("auto", "adamw", "adamw8bit"), "optimizer", self.optimizer,
                "must be auto, adamw or adamw8bit")
        require_setting(self.mixed_precision in ("auto", "bf16", "no"), "mixed_precision", self.mixed_precision,
                "must be auto, bf16 or no")
        require_setting(self.backend in ("auto", "triton", "torch"), "backend", self.backend, "must be auto, triton or torch")
        check_device(self.device)
        require_writable_dir(self.output_dir, "output_dir")
        distributed.validate_setting(self.distributed, self.optimizer)
        self.packed = packing.normalize_setting(self.packed)
        require_setting(self.packed in packing.SETTINGS, "packed", self.packed, "must be " + ", ".join(packing.SETTINGS))


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
        super().validate()
        require_setting(self.grad_accum_steps >= 1, "grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        require_setting(self.max_length >= MIN_LENGTH, "max_length", self.max_length,
                f"must be >= {MIN_LENGTH} (a special token, at least one token of text, and EOS)")
        require_setting(0 <= self.eval_fraction < 1, "eval_fraction", self.eval_fraction, "must lie in [0, 1)")
        require_setting(self.truncation in ("truncate", "drop"), "truncation", self.truncation, "must be truncate or drop")
        require_setting(0 <= self.task_max_level <= MAX_TASK_LEVEL, "task_max_level", self.task_max_level,
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


class SupervisedTrainer(Protocol):
    """The contract :func:`fastrm.trainers.loop.fit` and :func:`fastrm.trainers.loop.prepare_optimization` rely on,
    stated once: a :class:`Trainer` whose ``setup()`` loaded ``tokenizer``, ``model`` and ``train_examples`` /
    ``eval_examples`` and decided its ``packing``, and which answers the four methods below.
    ``prepare_optimization`` then adds ``parallel``, ``optimizer``, ``scheduler``, ``stream``, ``guard``, ``metrics``
    and ``autocast``. The reward-model and SFT trainers are built this way; a pair-based trainer (DPO) collates with
    :func:`fastrm.layout.collate_preference`, as the reward-model trainer does."""

    config: SupervisedSettings
    step: int
    out_dir: Path
    tokenizer: Any
    model: torch.nn.Module
    train_examples: list
    eval_examples: list
    packing: packing.Packing

    def collate(self, examples: list) -> Any:
        """A batch of ``examples`` in the layout of ``packing`` on the trainer's device (with ``num_tokens``)."""

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The loss of one batch and its detached metrics."""

    def evaluate(self) -> dict:
        """Held-out metrics (every rank calls it: FSDP forwards are collectives)."""

    def save(self) -> Path:
        """Checkpoint the model and the training state (:func:`fastrm.trainers.loop.save_trainer`)."""


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


def packing_for(trainer, model, head: str, name: str) -> packing.Packing:
    """The ``packed`` setting decided for one of the trainer's models (:func:`fastrm.packing.choose_packing`), at
    load time: before data-parallel wrapping, and probed under the autocast that training will use."""
    bf16 = use_bf16_autocast(trainer.config.mixed_precision, trainer.device)
    return packing.choose_packing(model, trainer.config.packed, head, name=name,
                                  special_ids=getattr(trainer.tokenizer, "all_special_ids", ()),
                                  autocast_dtype=torch.bfloat16 if bf16 else None)


def start_run(trainer):
    """The first lines of every trainer's setup: logging, seeds, the output folder and its config.yaml.

    Joins the torchrun process group (see :mod:`fastrm.distributed`) and sets ``trainer.mode`` (``"ddp"``,
    ``"fsdp"`` or ``None``); only rank 0 then logs at INFO. Rank 0 takes the output folder - its lock, and the
    choice to resume, overwrite or refuse (:func:`fastrm.checkpoint.open_output_dir`) - and every rank learns the
    outcome; a resumed run's settings are compared with its checkpoint's; rank 0 writes config.yaml."""
    config = trainer.config
    setup_logging()
    trainer.mode = distributed.init_from_env(config.distributed)
    if not distributed.is_main():
        log.setLevel(logging.WARNING)
    set_seed(config.seed)
    if configure_heap(config.cpu_heap, trainer.device):
        log.info("cpu_heap=keep: freed memory stays with the process for the next step (cpu_heap=system: glibc's "
                 "defaults)")
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
    state = ckpt.saved_settings(checkpoint, ckpt.dataclass_types(config))
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
