"""The supervised training loop (:func:`fit`) and what it needs around it: the batch stream, optimization set up and
resumed (:func:`prepare_optimization`), checkpoints and the final model."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from fastrm import checkpoint as ckpt
from fastrm import distributed, lora, optim
from fastrm._checks import deferred_finite_checks
from fastrm.config import ConfigError, config_to_dict
from fastrm.data import epoch_order
from fastrm.guard import DivergenceGuard
from fastrm.metrics import MetricsLogger, MetricsWindow, NullMetricsLogger
from fastrm.runtime import rng_state, set_rng_state, use_bf16_autocast
from fastrm.trainers.base import SupervisedTrainer

log = logging.getLogger("fastrm")

FINAL_DIR = "final"  # output_dir/final: the trained model and tokenizer, when training ends


class BatchStream:
    """Endless batches of examples; epoch e is a fixed shuffle of (seed, e), so a resumed run sees exactly
    the batches the uninterrupted run would have seen."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.batch_in_epoch = 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> list:
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


def fit(trainer: SupervisedTrainer, desc: str, postfix: dict):
    """Train ``trainer`` (reward or SFT) to ``config.max_steps``. One step: ``grad_accum_steps`` batches through
    ``trainer.compute_loss`` and backward, clip, the divergence guard's one check (non-finite loss, gradient norm or
    parameters stop here, before the optimizer), then optimizer / schedule; log every ``log_steps``, evaluate every
    ``eval_steps``, checkpoint every ``save_steps`` (and at the end). ``postfix`` maps progress-bar labels to
    metric names. The output folder's lock is released when training ends, however it ends.

    Under torchrun (DDP / FSDP), every rank draws the same global batch of ``batch_size * world_size`` examples
    from the stream and trains on its shard ``rank::world_size``; gradients are averaged over ranks on the last
    micro-batch of a step only; metrics are averaged over ranks and rank 0 alone writes them."""
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
                    window.add(metrics, batch.num_tokens)
                grad_norm = optim.clip_gradients(trainer.model, c.max_grad_norm)
                (grad_norm,) = trainer.guard.check_step(losses, {"gradient norm": grad_norm})
                optim.apply_update(trainer.optimizer, trainer.scheduler)
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


def prepare_optimization(trainer: SupervisedTrainer):
    """Resume weights, data-parallel wrapping, optimizer, schedule, batch stream, resume state, divergence guard
    and metrics: the end of every supervised trainer's setup. The order matters: weights are loaded into the whole
    model, FSDP then shards it, and the optimizer is built on the (sharded) parameters FSDP leaves in the model."""
    c = trainer.config
    checkpoint = trainer.resume_from
    if checkpoint is not None:
        load_model_weights(trainer.model, checkpoint)
    trainer.autocast = use_bf16_autocast(c.mixed_precision, trainer.device)
    trainer.parallel = distributed.Parallel.wrap(trainer.model, trainer.mode, trainer.device, bf16=trainer.autocast)
    trainer.optimizer = optim.make_optimizer(trainer.model.parameters(), c.optimizer, c.lr, c.weight_decay,
                                             trainer.device, sharded=trainer.parallel.is_fsdp)
    warmup = optim.warmup_steps(c, c.max_steps)
    trainer.scheduler = optim.make_scheduler(trainer.optimizer, c.lr_scheduler, warmup, c.max_steps)
    # The stream yields GLOBAL batches (batch_size per device x world_size); fit() shards them per rank.
    # Its position is global, so a checkpoint resumes on any number of ranks with the same global batch.
    trainer.stream = BatchStream(trainer.train_examples, c.batch_size * distributed.world_size(), c.seed)
    if checkpoint is not None:
        state = ckpt.load_trainer_state(checkpoint, ckpt.dataclass_types(c))
        optim.load_optimizer_state(trainer.model, trainer.optimizer, state["optimizer"])
        optim.restore_schedule(trainer.optimizer, trainer.scheduler, state["scheduler"], c.weight_decay)
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


def save_distributed(trainer, parallel: distributed.Parallel, state: dict) -> Path:
    """Write ``checkpoint-<step>`` of ``parallel.model`` with ``state`` (plus the run id, step, world size and
    config), once: the guard first reads that the parameters are finite (a diverged model is never written), every
    rank takes part in gathering FSDP shards (``state`` is built on every rank for the same reason), rank 0 writes
    and prunes, and all ranks learn the outcome - an OS error on rank 0 (disk full) raises
    :class:`fastrm.checkpoint.CheckpointWriteError` on every rank."""
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
                ckpt.fsync(child)
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
