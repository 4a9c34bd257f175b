"""Direct preference optimisation: the policy trained straight from preference pairs, its log-probs against a frozen
reference's being the implicit reward (``fastrm.dpo_loss``: DPO, cDPO, robust, hinge, IPO, SimPO).

One step, top to bottom: take ``grad_accum_steps`` batches of pairs; the sequence log-prob of every chosen and
rejected completion under the policy (``packed=auto``: all 2B sequences in one padding-free row where that is exact
for the model, else length-bucketed padded micro-batches), per-token log-probs fused from the hidden states and the
LM head (``fastrm.linear_logprobs``: no ``[N, T, V]`` logits) summed over each completion; the same under the
reference (a frozen copy of the initial policy; with LoRA, the policy with its adapters disabled; or log-probs
computed once before training, ``precompute_ref_logprobs=true``); ``fastrm.dpo_loss``; stop on a non-finite loss;
backward; clip; optimizer and schedule step; log TRL's metrics; evaluate; checkpoint.

The embedded task (no train_data): preference pairs from the simulated noisy annotator ``fastrm train-rm`` learns
from; evaluation adds the ground-truth accuracy of greedy answers to held-out prompts.
"""

from __future__ import annotations

import contextlib
import copy
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
from fastrm.generation import generate_completions
from fastrm.layout import Batch, PreferenceBatch, collate_preference
from fastrm.metrics import reduce_sums
from fastrm.models import check_positions, load_causal_lm, token_logprobs
from fastrm.ops.dpo import DPO_LOSS_TYPES, LENGTH_NORMALISED_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, check_settings
from fastrm.tasks.arithmetic import ArithmeticTask, make_preference_data
from fastrm.trainers import base, loop

log = logging.getLogger("fastrm")

LABELS = ("chosen_labels", "rejected_labels")  # the examples' label lists (tokenization.tokenize_policy_preference)


@dataclass
class DPOConfig(base.SupervisedSettings):
    # The loss (fastrm.dpo_loss)
    loss_type: str = setting("sigmoid", "sigmoid (DPO; cDPO with label_smoothing) | robust (rDPO) | hinge (SLiC) | "
                                        "ipo | simpo (reference-free, length-normalised)")
    beta: float = setting(0.1, "inverse temperature: weight of the implicit KL to the reference (IPO's tau, "
                               "SimPO's reward scale)")
    label_smoothing: float = setting(0.0, "assumed share of flipped labels in [0, 0.5): cDPO for sigmoid and simpo, "
                                          "the noise rate for robust; 0 for hinge and ipo")
    simpo_gamma: float = setting(0.5, "simpo: target reward margin gamma (TRL's simpo_gamma); unused otherwise")
    precompute_ref_logprobs: bool = setting(False, "compute the reference's log-probs of every pair once before "
                                                   "training (no reference model in memory while training)")
    # Preference data (train_data; None: the embedded arithmetic task's pairs, noisy annotator)
    num_train_pairs: int = setting(6000, "embedded task: training preference pairs generated")
    num_eval_pairs: int = setting(500, "embedded task: held-out pairs generated (labelled by the truth)")
    annotator_noise: float = setting(0.1, "embedded task: share of training pairs the simulated annotator flips")
    eval_generate: int = setting(100, "embedded task: held-out prompts answered greedily and checked at each "
                                      "evaluation (0: off)")
    max_new_tokens: int = setting(6, "longest greedy answer generated for eval_generate")
    # The shared settings with this trainer's defaults (meanings: base.TrainerSettings)
    output_dir: str = "runs/dpo"
    lr: float = setting(1e-6, "peak learning rate (AdamW); pretrained full fine-tuning (TINY_PRESET: the tiny model's)")

    # The embedded task's small model (preset=tiny, or auto with model.name_or_path=tiny).
    TINY_PRESET: ClassVar[dict] = {"batch_size": 64, "max_steps": 200, "lr": 1e-3, "warmup_steps": 10,
                                   "max_length": 32, "log_steps": 20, "eval_steps": 100, "save_steps": 100}

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = base.SupervisedSettings.FIXED_ON_RESUME + (
        "num_train_pairs", "annotator_noise", "precompute_ref_logprobs")

    def validate(self):
        super().validate()
        require_setting(self.loss_type in DPO_LOSS_TYPES, "loss_type", self.loss_type,
                "must be one of " + ", ".join(DPO_LOSS_TYPES))
        try:
            check_settings("dpo", self.beta, self.loss_type, self.label_smoothing,
                           self.simpo_gamma if self.loss_type == "simpo" else 0.0)
        except (TypeError, ValueError) as err:  # "dpo: beta must be > 0, got 0.0": name the setting
            name = next(n for n in ("label_smoothing", "beta", "gamma") if f": {n}" in str(err))
            name = "simpo_gamma" if name == "gamma" else name
            require_setting(False, name, getattr(self, name), str(err).split(": ", 1)[1])
        require_setting(not (self.precompute_ref_logprobs and self.loss_type in REFERENCE_FREE_LOSS_TYPES),
                "precompute_ref_logprobs", self.precompute_ref_logprobs,
                f"loss_type={self.loss_type} is reference-free: there is nothing to precompute")
        for name in ("num_train_pairs", "num_eval_pairs", "max_new_tokens"):
            require_setting(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require_setting(self.eval_generate >= 0, "eval_generate", self.eval_generate, "must be >= 0")
        require_setting(0 <= self.annotator_noise <= 0.5, "annotator_noise", self.annotator_noise,
                        "must lie in [0, 0.5]")


# ---- a batch of pairs: the layout is fastrm.layout's (collate_preference), read through the padded layout ----------

@dataclass
class PairBatch:
    """``B`` pairs as ``2B`` policy sequences with labels (``pairs``: chosen rows, then rejected), each sequence's
    completion tokens (``[2B]``, for the length-normalised losses) and, when precomputed, its reference log-prob
    (``[2B]`` float32, else None)."""

    pairs: PreferenceBatch
    completion_tokens: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def sequences(self) -> Batch:
        return self.pairs.sequences

    @property
    def num_tokens(self) -> int:
        return self.pairs.num_tokens

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs.split(values)


def collate_pairs(examples, pad_id: int, mode: str, device: torch.device, *, with_reference: bool) -> PairBatch:
    """Tokenized pairs as a :class:`PairBatch` in layout ``mode``; ``with_reference``: the examples carry their
    precomputed reference log-probs (``ref_chosen_logps``, ``ref_rejected_logps``)."""
    pairs = collate_preference(examples, pad_id, mode, device, labels=LABELS)
    completion = torch.tensor([len(e["chosen_ids"]) - e["prompt_len"] for e in examples]
                              + [len(e["rejected_ids"]) - e["prompt_len"] for e in examples], device=device)
    ref = None
    if with_reference:
        ref = torch.tensor([e["ref_chosen_logps"] for e in examples] + [e["ref_rejected_logps"] for e in examples],
                           dtype=torch.float32, device=device)
    return PairBatch(pairs, completion, ref)


def sequence_logps(model, batch: PairBatch | PreferenceBatch, *, backend: str | None = None) -> torch.Tensor:
    """float32 ``[2B]``: each sequence's summed log-prob of its labelled (completion) tokens. The per-token
    log-probs come back in the padded layout whatever layout the batch runs in (0 off the labels), through
    :func:`fastrm.models.token_logprobs` (fused LM head)."""
    return token_logprobs(model, batch.sequences, backend=backend).sum(1)


# ---- data ---------------------------------------------------------------------------------------------------------

def ranking_to_pairs(rows: list[dict]) -> list[dict]:
    """K-way ranking rows (``prompt``, ``responses``, ``ranks``: 0 = best) as preference rows: the best response
    against each response ranked strictly below it (K - 1 pairs at most). Other rows pass unchanged."""
    out = []
    for i, row in enumerate(rows, start=1):
        if fdata.detect_format(row) != "ranking":
            out.append(row)
            continue
        try:
            fdata.validate_row(row, "ranking")
        except ValueError as err:
            raise DataError(f"row {i}: {err}") from None
        best = min(range(len(row["ranks"])), key=lambda k: row["ranks"][k])
        as_response = (lambda r: r if isinstance(r, list) else [{"role": "assistant", "content": r}]) \
            if isinstance(row["prompt"], list) else (lambda r: r)
        out += [{"prompt": row["prompt"], "chosen": as_response(row["responses"][best]),
                 "rejected": as_response(response)}
                for response, rank in zip(row["responses"], row["ranks"]) if rank > row["ranks"][best]]
    return out


# ---- the trainer ----------------------------------------------------------------------------------------------------

class DPOTrainer(base.Trainer):
    """``DPOTrainer(config).setup().train()``; ``DPOTrainer(config, train_data=ds, eval_data=None)`` trains on rows
    given in Python (a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts) instead of ``config.train_data``."""

    def setup(self):
        c = self.config
        base.start_run(self)
        self.tokenizer = tokenization.load_tokenizer(c.tokenizer, c.model.name_or_path)
        tokenization.sequence_template(self.tokenizer)  # a policy needs an EOS token to end its answers
        train_rows, eval_rows = self._load_rows()
        self.train_examples = self._tokenize(train_rows, "train")
        self.eval_examples = self._tokenize(eval_rows, "eval")
        if not self.train_examples:
            raise DataError("no training examples left after tokenization: every row was dropped (truncation=drop "
                            "with too small a max_length?)")
        self.eval_prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows)) if self.task is not None else []
        self.model = load_causal_lm(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.packing = base.packing_for(self, self.model, "causal_lm", "policy")
        check_positions(self.model, c.max_length, "max_length", c.max_length, "the longest sequence (max_length)")
        if c.lora.enabled:  # adapters on the frozen model; the reference is the model with them disabled
            self.model = lora.add_adapters(self.model, c.lora, "causal")
        # The reference is the initial policy: taken before a resumed run loads its trained weights.
        self.ref = None
        self.ref_precomputed = False  # the examples carry their reference log-probs (precompute_ref_logprobs)
        self.autocast = runtime.use_bf16_autocast(c.mixed_precision, self.device)
        if c.precompute_ref_logprobs:
            for examples in (self.train_examples, self.eval_examples):
                self._precompute_ref(examples)
            self.ref_precomputed = True
        elif c.loss_type not in REFERENCE_FREE_LOSS_TYPES and not c.lora.enabled:
            self.ref = copy.deepcopy(self.model).requires_grad_(False).eval()
        loop.prepare_optimization(self)
        self.ref_p = None if self.ref is None else distributed.Parallel.wrap(self.ref, self.mode, self.device,
                                                                              bf16=self.autocast)
        reference = ("none (reference-free)" if c.loss_type in REFERENCE_FREE_LOSS_TYPES else
                     "precomputed log-probs" if c.precompute_ref_logprobs else
                     "the policy with its adapters disabled" if c.lora.enabled else "a frozen copy of the policy")
        log.info("policy: %s, %s, %d train / %d eval pairs, %s batches, reference: %s, loss %s (beta=%g), device=%s",
                 type(lora.unwrap(self.model)).__name__, base.parameter_counts(self.model),
                 len(self.train_examples), len(self.eval_examples), self.packing.mode, reference, c.loss_type, c.beta,
                 self.device)
        return self

    def _load_rows(self):
        c = self.config
        if self.train_data is None:
            log.info("no train_data given: generating the embedded arithmetic task's preference pairs (noisy "
                     "annotator, noise=%.2f)", c.annotator_noise)
            self.task = ArithmeticTask(max_level=c.task_max_level)
            train = make_preference_data(c.num_train_pairs, seed=c.seed, noise=c.annotator_noise, task=self.task)
            # The held-out pairs are labelled by the truth (noise 0): their accuracy measures what was learned.
            evaluation = make_preference_data(c.num_eval_pairs, seed=c.seed + 10_000, noise=0.0, task=self.task)
            return train, evaluation
        return fdata.load_train_eval(self.train_data, self.eval_data, c.eval_fraction, c.seed, c.skip_malformed,
                                     train_split=c.train_split, eval_split=c.eval_split)

    def _tokenize(self, rows, split):
        if not rows:
            return []
        c = self.config
        examples, report = tokenization.tokenize_policy_preference(ranking_to_pairs(list(rows)), self.tokenizer,
                                                                   c.max_length, truncation=c.truncation)
        base.log_tokenized(split, report, c.max_length)
        return examples

    @torch.no_grad()
    def _precompute_ref(self, examples):
        """Each example's reference log-probs (``ref_chosen_logps``, ``ref_rejected_logps``), from the initial
        policy (with LoRA: its adapters disabled), in batches of ``batch_size``, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(examples), self.config.batch_size):
                chunk = examples[start:start + self.config.batch_size]
                batch = self.collate(chunk)
                with self.model.disable_adapter() if self.config.lora.enabled else contextlib.nullcontext():
                    with runtime.autocast(self.autocast, self.device):
                        logps = sequence_logps(self.model, batch, backend=self.config.backend)
                chosen, rejected = batch.split(logps)
                for e, c_lp, r_lp in zip(chunk, chosen.tolist(), rejected.tolist()):
                    e["ref_chosen_logps"], e["ref_rejected_logps"] = c_lp, r_lp
        finally:
            self.model.train(was_training)
        log.info("reference log-probs precomputed for %d pairs", len(examples))

    # ---- one step -------------------------------------------------------------------------------------------------

    def collate(self, examples) -> PairBatch:
        return collate_pairs(examples, self.tokenizer.pad_token_id, self.packing.mode, self.device,
                             with_reference=self.ref_precomputed)

    def _reference_logps(self, batch: PairBatch) -> torch.Tensor | None:
        c = self.config
        if c.loss_type in REFERENCE_FREE_LOSS_TYPES:
            return None
        if batch.ref_logps is not None:
            return batch.ref_logps
        with torch.no_grad(), runtime.autocast(self.autocast, self.device):
            if self.ref_p is not None:
                return self.ref_p(sequence_logps, batch, backend=c.backend)
            with self.model.disable_adapter():  # LoRA: the reference is the policy without its adapters
                return self.parallel(sequence_logps, batch, backend=c.backend)

    def compute_loss(self, batch: PairBatch):
        """Loss and detached metrics (TRL's names) of one batch of pairs."""
        c = self.config
        with runtime.autocast(self.autocast, self.device):
            logps = self.parallel(sequence_logps, batch, backend=c.backend)
        ref = self._reference_logps(batch)
        chosen, rejected = batch.split(logps)
        lengths = batch.split(batch.completion_tokens.float()) if c.loss_type in LENGTH_NORMALISED_LOSS_TYPES \
            else (None, None)
        out = fastrm.dpo_loss(chosen, rejected, *(batch.split(ref) if ref is not None else (None, None)), beta=c.beta,
                              loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                              gamma=c.simpo_gamma if c.loss_type == "simpo" else 0.0, chosen_lengths=lengths[0],
                              rejected_lengths=lengths[1])
        metrics = {"loss": out.loss.detach(), **out.metrics(), "logps/chosen": chosen.detach().mean(),
                   "logps/rejected": rejected.detach().mean()}
        return out.loss, metrics

    def train(self):
        return loop.fit(self, "dpo", {"loss": "loss", "acc": "rewards/accuracies"})

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        loss_sum, correct, margin, n = 0.0, 0.0, 0.0, 0
        # each rank takes its share; as many batches on every rank (FSDP forwards are collectives); sums reduced
        for chunk, weight in distributed.shard_batches(self.eval_examples, self.config.batch_size):
            loss, metrics = self.compute_loss(self.collate(chunk))
            loss_sum += loss.item() * weight
            correct += metrics["rewards/accuracies"].item() * weight
            margin += metrics["rewards/margins"].item() * weight
            n += weight
        loss_sum, correct, margin, n = reduce_sums(loss_sum, correct, margin, n)
        out = {"eval/loss": loss_sum / max(n, 1), "eval/rewards/accuracies": correct / max(n, 1),
               "eval/rewards/margins": margin / max(n, 1)}
        if self.task is not None and self.config.eval_generate:
            out["eval/task_accuracy"] = self.task_accuracy(self.eval_prompts[: self.config.eval_generate])
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def task_accuracy(self, prompts: list[str]) -> float:
        """Share of ``prompts`` whose greedy answer the task's checker marks correct (the truth, not a model)."""
        was_training = self.model.training
        self.model.eval()
        correct, count = 0.0, 0
        for rows, weight in distributed.shard_batches(prompts, self.config.batch_size):
            completions = self.parallel(generate_completions, self.tokenizer, rows,
                                        max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                        synced_gpus=self.parallel.is_fsdp)
            if weight:
                correct += sum(self.task.is_correct(p, c) for p, c in zip(rows, completions))
                count += len(rows)
        self.model.train(was_training)
        correct, count = reduce_sums(correct, count)
        return correct / max(count, 1)

    def save(self) -> Path:
        return loop.save_trainer(self)


def main(argv=None) -> int:
    config = parse_cli(DPOConfig, argv, "fastrm dpo", "Direct preference optimisation of a policy on preference "
                       "pairs (DPO, cDPO, robust, hinge, IPO, SimPO). With no arguments: the embedded arithmetic "
                       "task's pairs, on CPU (give model.name_or_path an SFT checkpoint: fastrm demo --dpo does).")
    trainer = DPOTrainer(config).setup()
    before = trainer.evaluate() if trainer.eval_examples else None
    trainer.train()
    if before is not None:
        after = trainer.evaluate()
        if distributed.is_main():
            print("held-out: " + ", ".join(f"{k.removeprefix('eval/')} {before[k]:.3f} -> {after[k]:.3f}"
                                           for k in after) + f" after {trainer.step} steps; model saved in "
                  f"{trainer.final_model}")
    distributed.cleanup()
    return 0
