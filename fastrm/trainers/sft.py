"""Supervised fine-tuning (the seed's pre-training step before RL): next-token loss on completions only.

One step, top to bottom: take ``grad_accum_steps`` batches (padding-free rows where exact for the model, else
length-bucketed padded micro-batches: ``packed=auto``); per-token
log-probs straight from the hidden states with ``fastrm.linear_logprobs`` (no ``[B, T, V]`` logits);
loss = mean negative log-prob over completion tokens; stop on a non-finite loss; backward; clip;
optimizer and schedule step; log; evaluate (loss, and the task's ground-truth accuracy of greedy
answers when the data is the embedded task); checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from fastrm import data as fdata
from fastrm import distributed, lora, runtime, tokenization
from fastrm.config import parse_cli, require_setting, setting
from fastrm.errors import DataError
from fastrm.generation import generate_completions
from fastrm.layout import collate_sft
from fastrm.metrics import reduce_sums
from fastrm.models import check_positions, load_causal_lm, token_logprobs
from fastrm.tasks.arithmetic import ArithmeticTask
from fastrm.trainers import base, loop

log = logging.getLogger("fastrm")


@dataclass
class SFTConfig(base.SupervisedSettings):
    # SFT data (train_data, JSONL of {"prompt","completion"} or {"messages"}; None: the embedded arithmetic task)
    num_train_examples: int = setting(4000, "embedded task: training examples generated")
    num_eval_examples: int = setting(200, "embedded task: held-out examples generated")
    eval_generate: int = setting(100, "embedded task: held-out prompts answered greedily and checked at each "
                                      "evaluation (0: off)")
    max_new_tokens: int = setting(6, "longest greedy answer generated for eval_generate")
    # The shared settings with this trainer's defaults (meanings: base.TrainerSettings)
    output_dir: str = "runs/sft"
    lr: float = setting(2e-5, "peak learning rate (AdamW); pretrained full fine-tuning (TINY_PRESET: the tiny model's)")

    # The embedded task's small model from scratch (preset=tiny, or auto with model.name_or_path=tiny).
    TINY_PRESET: ClassVar[dict] = {"batch_size": 64, "max_steps": 300, "lr": 3e-3, "warmup_steps": 20,
                                   "max_length": 32, "log_steps": 20, "eval_steps": 100, "save_steps": 100}

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = base.SupervisedSettings.FIXED_ON_RESUME + ("num_train_examples",)

    def validate(self):
        super().validate()
        for name in ("num_train_examples", "num_eval_examples", "max_new_tokens"):
            require_setting(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require_setting(self.eval_generate >= 0, "eval_generate", self.eval_generate, "must be >= 0")


class SFTTrainer(base.Trainer):
    """``SFTTrainer(config).setup().train()``; ``SFTTrainer(config, train_data=ds, eval_data=None)`` trains on
    rows given in Python (a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts) instead of
    ``config.train_data``."""

    def setup(self):
        c = self.config
        base.start_run(self)
        self.tokenizer = tokenization.load_tokenizer(c.tokenizer, c.model.name_or_path)
        train_rows, eval_rows = self._load_rows()
        self.train_examples = self._tokenize(train_rows, "train")
        self.eval_examples = self._tokenize(eval_rows, "eval")
        self.eval_rows = eval_rows
        if not self.train_examples:
            raise DataError("no training examples left after tokenization: every row was dropped (truncation=drop "
                            "with too small a max_length?)")
        self.model = load_causal_lm(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.packing = base.packing_for(self, self.model, "causal_lm", "policy")
        check_positions(self.model, c.max_length, "max_length", c.max_length, "the longest sequence (max_length)")
        if c.lora.enabled:  # adapters on the frozen model
            self.model = lora.add_adapters(self.model, c.lora, "causal")
        loop.prepare_optimization(self)
        log.info("policy: %s, %s, %d train / %d eval examples, %s batches, device=%s",
                 type(lora.unwrap(self.model)).__name__, base.parameter_counts(self.model),
                 len(self.train_examples), len(self.eval_examples), self.packing.mode, self.device)
        return self

    def _load_rows(self):
        c = self.config
        if self.train_data is None:
            log.info("no train_data given: generating the embedded arithmetic task's SFT data")
            self.task = ArithmeticTask(max_level=c.task_max_level)
            return (self.task.make_sft_data(c.num_train_examples, seed=c.seed),
                    self.task.make_sft_data(c.num_eval_examples, seed=c.seed + 10_000))
        return fdata.load_train_eval(self.train_data, self.eval_data, c.eval_fraction, c.seed, c.skip_malformed,
                                     task="sft", train_split=c.train_split, eval_split=c.eval_split)

    def _tokenize(self, rows, split):
        if not rows:
            return []
        c = self.config
        examples, stats = tokenization.tokenize_sft(rows, self.tokenizer, c.max_length, truncation=c.truncation)
        base.log_tokenized(split, stats, c.max_length)
        return examples

    def collate(self, examples):
        return collate_sft(examples, self.tokenizer.pad_token_id, self.packing.mode, self.device)

    def compute_loss(self, batch):
        with runtime.autocast(self.autocast, self.device):
            logprobs = self.parallel(token_logprobs, batch, backend=self.config.backend)
        n_tokens = batch.predicted_tokens.clamp_min(1)
        loss = -logprobs.sum() / n_tokens
        if self.model.training:  # data parallel: the mean over all ranks' tokens, as one process takes it
            loss = loss * distributed.token_weight(n_tokens)
        return loss, {"loss": loss.detach(), "num_tokens": n_tokens.float()}

    def train(self):
        return loop.fit(self, "sft", {"loss": "loss"})

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        total, n = 0.0, 0.0
        # each rank takes its share; as many batches on every rank (FSDP forwards are collectives); sums reduced
        for chunk, weight in distributed.shard_batches(self.eval_examples, self.config.batch_size):
            loss, metrics = self.compute_loss(self.collate(chunk))
            if weight:
                total += loss.item() * metrics["num_tokens"].item()
                n += metrics["num_tokens"].item()
        total, n = reduce_sums(total, n)
        out = {"eval/loss": total / max(n, 1)}
        if self.task is not None and self.config.eval_generate:
            correct, count = 0.0, 0
            for rows, weight in distributed.shard_batches(self.eval_rows[: self.config.eval_generate],
                                                          self.config.batch_size):
                correct += self.task_accuracy(rows) * weight
                count += weight
            correct, count = reduce_sums(correct, count)
            out["eval/task_accuracy"] = correct / max(count, 1)
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def task_accuracy(self, rows) -> float:
        """Share of prompts whose greedy answer the task's checker marks correct (the truth, not a model)."""
        prompts = [r["prompt"] for r in rows]
        completions = self.parallel(generate_completions, self.tokenizer, prompts,
                                    max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                    synced_gpus=self.parallel.is_fsdp)
        return sum(self.task.is_correct(p, c) for p, c in zip(prompts, completions)) / max(len(prompts), 1)

    def save(self) -> Path:
        return loop.save_trainer(self)


def main(argv=None) -> int:
    config = parse_cli(SFTConfig, argv, "fastrm sft", "Supervised fine-tuning on completions. "
                       "With no arguments: the embedded arithmetic task, from scratch, on CPU.")
    trainer = SFTTrainer(config).setup()
    trainer.train()
    result = trainer.evaluate() if trainer.eval_examples else {}
    if distributed.is_main():
        print(f"held-out: {', '.join(f'{k}={v:.4f}' for k, v in result.items())}; "
              f"model saved in {trainer.final_model}")
    distributed.cleanup()
    return 0
