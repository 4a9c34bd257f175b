"""Reward-model training: pairwise (Bradley-Terry) or K-way (InstructGPT) ranking on preference data.

One step, top to bottom: take ``grad_accum_steps`` batches; score chosen and rejected (``packed=auto``: one
padding-free row where that is exact for the model, else length-bucketed padded micro-batches); ``pairwise_ranking_loss`` (or ``ranking_loss`` for K-way data);
stop on a non-finite loss; backward; clip; optimizer and schedule step; log; evaluate; checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

import fastrm
from fastrm import data as fdata
from fastrm import distributed, lora, runtime, tokenization
from fastrm.config import parse_cli, require_setting, setting
from fastrm.errors import DataError
from fastrm.layout import collate_preference, collate_ranking
from fastrm.metrics import reduce_sums
from fastrm.models import check_positions, load_reward_model, reward_scores
from fastrm.tasks.arithmetic import ArithmeticTask, make_preference_data
from fastrm.trainers import base, loop

log = logging.getLogger("fastrm")

EMBEDDED = "embedded"


@dataclass
class RewardConfig(base.SupervisedSettings):
    # Preference data (train_data; None: the embedded arithmetic task's pairs, noisy annotator)
    num_train_pairs: int = setting(6000, "embedded task: training preference pairs generated")
    num_eval_pairs: int = setting(500, "embedded task: held-out pairs generated (labelled by the truth)")
    annotator_noise: float = setting(0.1, "embedded task: share of training pairs the simulated annotator flips")
    center_coef: float = setting(0.0, "weight of the penalty (r_chosen + r_rejected)^2 (keeps rewards centred on 0)")
    use_margin: bool = setting(False, "subtract each pair's margin field inside the loss")
    # The shared settings with this trainer's defaults (meanings: base.TrainerSettings)
    eval_fraction: float = 0.1
    output_dir: str = "runs/reward"
    lr: float = setting(1e-5, "peak learning rate (AdamW); pretrained full fine-tuning (TINY_PRESET: the tiny model's)")

    # The embedded task's small model from scratch (preset=tiny, or auto with model.name_or_path=tiny).
    TINY_PRESET: ClassVar[dict] = {"batch_size": 64, "max_steps": 400, "lr": 2e-3, "warmup_steps": 30,
                                   "max_length": 32, "log_steps": 20, "eval_steps": 200, "save_steps": 200}

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = base.SupervisedSettings.FIXED_ON_RESUME + (
        "num_train_pairs", "annotator_noise")

    def validate(self):
        super().validate()
        for name in ("num_train_pairs", "num_eval_pairs"):
            require_setting(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require_setting(0 <= self.annotator_noise <= 0.5, "annotator_noise", self.annotator_noise, "must lie in [0, 0.5]")
        require_setting(self.center_coef >= 0, "center_coef", self.center_coef, "must be >= 0")


class RewardTrainer(base.Trainer):
    """``RewardTrainer(config).setup().train()``; ``RewardTrainer(config, train_data=ds, eval_data=None)`` trains on
    rows given in Python (a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts) instead of
    ``config.train_data``."""

    # ---- setup ------------------------------------------------------------------------------------------------

    def setup(self):
        c = self.config
        base.start_run(self)
        self.tokenizer = tokenization.load_tokenizer(c.tokenizer, c.model.name_or_path)
        train_rows, eval_rows = self._load_rows()
        self.train_examples, self.data_format = self._tokenize(train_rows, "train")
        self.eval_examples, _ = self._tokenize(eval_rows, "eval")
        if not self.train_examples:
            raise DataError("no training examples left after tokenization: every row was dropped (truncation=drop "
                            "with too small a max_length?)")
        self.model = load_reward_model(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.packing = base.packing_for(self, self.model, "reward", "reward model")
        check_positions(self.model, c.max_length, "max_length", c.max_length, "the longest sequence (max_length)")
        if c.lora.enabled:  # adapters on the frozen model, the head trained fully
            self.model = lora.add_adapters(self.model, c.lora, "reward")
        loop.prepare_optimization(self)
        log.info("reward model: %s, %s, %d train / %d eval %s examples, %s batches, device=%s",
                 type(lora.unwrap(self.model)).__name__, base.parameter_counts(self.model),
                 len(self.train_examples), len(self.eval_examples), self.data_format, self.packing.mode, self.device)
        return self

    def _load_rows(self):
        c = self.config
        if self.train_data is None:
            log.info("no train_data given: generating the embedded arithmetic task (noisy annotator, noise=%.2f)",
                     c.annotator_noise)
            task = ArithmeticTask(max_level=c.task_max_level)
            train = make_preference_data(c.num_train_pairs, seed=c.seed, noise=c.annotator_noise, task=task)
            # The held-out set is labelled by the truth (noise 0): accuracy then measures what was learned.
            evaluation = make_preference_data(c.num_eval_pairs, seed=c.seed + 10_000, noise=0.0, task=task)
            return train, evaluation
        return fdata.load_train_eval(self.train_data, self.eval_data, c.eval_fraction, c.seed, c.skip_malformed,
                                     train_split=c.train_split, eval_split=c.eval_split)

    def _tokenize(self, rows, split):
        c = self.config
        if not rows:
            return [], "pairwise"
        data_format = "ranking" if fdata.detect_format(rows[0]) == "ranking" else "pairwise"
        tokenize = tokenization.tokenize_ranking if data_format == "ranking" else tokenization.tokenize_preference
        examples, stats = tokenize(rows, self.tokenizer, c.max_length, truncation=c.truncation)
        base.log_tokenized(split, stats, c.max_length)
        return examples, data_format

    # ---- one step ---------------------------------------------------------------------------------------------

    def collate(self, examples):
        collate = collate_ranking if self.data_format == "ranking" else collate_preference
        return collate(examples, self.tokenizer.pad_token_id, self.packing.mode, self.device)

    def compute_loss(self, batch):
        """Loss and detached metrics of one batch."""
        c = self.config
        with runtime.autocast(self.autocast, self.device):
            scores = self.parallel(reward_scores, batch.sequences)
        if self.data_format == "ranking":
            ranks = batch.ranks
            loss, accuracy = fastrm.ranking_loss(scores.view(ranks.shape), ranks, return_accuracy=True,
                                                 backend=c.backend)
            return loss, {"loss": loss.detach(), "rewards/accuracies": accuracy}
        chosen, rejected = batch.split(scores)
        margin = batch.margin if c.use_margin else None
        loss, accuracy = fastrm.pairwise_ranking_loss(chosen, rejected, margin=margin, center_coef=c.center_coef,
                                                      return_accuracy=True, backend=c.backend)
        return loss, {
            "loss": loss.detach(),
            "rewards/chosen": chosen.detach().mean(),
            "rewards/rejected": rejected.detach().mean(),
            "rewards/accuracies": accuracy,
            "rewards/margins": (chosen - rejected).detach().mean(),
        }

    def train(self):
        return loop.fit(self, "train-rm", {"loss": "loss", "acc": "rewards/accuracies"})

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, n = 0.0, 0.0, 0
        # each rank scores its share; as many batches on every rank (FSDP forwards are collectives); sums reduced
        for chunk, weight in distributed.shard_batches(self.eval_examples, self.config.batch_size):
            loss, metrics = self.compute_loss(self.collate(chunk))
            loss_sum += loss.item() * weight
            correct += metrics["rewards/accuracies"].item() * weight
            n += weight
        self.model.train(was_training)
        loss_sum, correct, n = reduce_sums(loss_sum, correct, n)
        return {"eval/loss": loss_sum / n, "eval/accuracy": correct / n}

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> Path:
        return loop.save_trainer(self)


def main(argv=None) -> int:
    config = parse_cli(RewardConfig, argv, "fastrm train-rm", "Train a reward model on preference data. "
                       "With no arguments: the embedded arithmetic task, from scratch, on CPU.")
    trainer = RewardTrainer(config).setup()
    before = trainer.evaluate() if trainer.eval_examples else None
    trainer.train()
    if before is not None:
        after = trainer.evaluate()
        if distributed.is_main():
            print(f"held-out accuracy: {before['eval/accuracy']:.3f} before training -> {after['eval/accuracy']:.3f} "
                  f"after {trainer.step} steps (chance = 0.5); model saved in {trainer.final_model}")
    distributed.cleanup()
    return 0
