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
from fastrm import distributed, lora, packing, training
from fastrm.config import parse_cli, require, setting
from fastrm.errors import DataError
from fastrm.models import load_causal_lm, token_logprobs
from fastrm.ops.dpo import DPO_LOSS_TYPES, LENGTH_NORMALISED_LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, check_settings

log = logging.getLogger("fastrm")


@dataclass
class DPOConfig(training.SupervisedSettings):
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
    # The shared settings with this trainer's defaults (meanings: training.TrainerSettings)
    output_dir: str = "runs/dpo"
    lr: float = setting(1e-6, "peak learning rate (AdamW); pretrained full fine-tuning (TINY_PRESET: the tiny model's)")

    # The embedded task's small model (preset=tiny, or auto with model.name_or_path=tiny).
    TINY_PRESET: ClassVar[dict] = {"batch_size": 64, "max_steps": 200, "lr": 1e-3, "warmup_steps": 10,
                                   "max_length": 32, "log_steps": 20, "eval_steps": 100, "save_steps": 100}

    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = training.SupervisedSettings.FIXED_ON_RESUME + (
        "num_train_pairs", "annotator_noise", "precompute_ref_logprobs")

    def validate(self):
        super().validate()
        require(self.loss_type in DPO_LOSS_TYPES, "loss_type", self.loss_type,
                "must be one of " + ", ".join(DPO_LOSS_TYPES))
        try:
            check_settings("dpo", self.beta, self.loss_type, self.label_smoothing,
                           self.simpo_gamma if self.loss_type == "simpo" else 0.0)
        except (TypeError, ValueError) as err:  # "dpo: beta must be > 0, got 0.0": name the setting
            name = next(n for n in ("label_smoothing", "beta", "gamma") if f": {n}" in str(err))
            name = "simpo_gamma" if name == "gamma" else name
            require(False, name, getattr(self, name), str(err).split(": ", 1)[1])
        require(not (self.precompute_ref_logprobs and self.loss_type in REFERENCE_FREE_LOSS_TYPES),
                "precompute_ref_logprobs", self.precompute_ref_logprobs,
                f"loss_type={self.loss_type} is reference-free: there is nothing to precompute")
        for name in ("num_train_pairs", "num_eval_pairs", "max_new_tokens"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.eval_generate >= 0, "eval_generate", self.eval_generate, "must be >= 0")
        require(0 <= self.annotator_noise <= 0.5, "annotator_noise", self.annotator_noise, "must lie in [0, 0.5]")


# ---- the layout: how pairs become model inputs and sequence log-probs (the only layout-dependent code here) ---------

def _collate_pairs(examples, pad_id: int, decision: packing.Packing, device: torch.device) -> dict:
    """``2B`` sequences, the ``B`` chosen then the ``B`` rejected, labels -100 on the prompt: one packed row
    (``decision.mode == "packed"``), or padded (bucketed) rows; plus ``completion_tokens`` ``[2B]`` and, when
    precomputed, ``ref_logps`` ``[2B]``."""
    sequences = [(e["chosen_ids"], e["prompt_len"]) for e in examples] + \
                [(e["rejected_ids"], e["prompt_len"]) for e in examples]
    rows = [{"input_ids": ids, "labels": [fdata.IGNORE_INDEX] * n + ids[n:]} for ids, n in sequences]
    batch = fdata.collate_sft_packed(rows) if decision.mode == "packed" else fdata.collate_sft_padded(rows, pad_id)
    batch["completion_tokens"] = torch.tensor([len(ids) - n for ids, n in sequences], dtype=torch.long)
    if "ref_chosen_logps" in examples[0]:
        batch["ref_logps"] = torch.tensor([e["ref_chosen_logps"] for e in examples]
                                          + [e["ref_rejected_logps"] for e in examples], dtype=torch.float32)
    return training.to_device(batch, device, decision)


def sequence_logps(model, batch: dict, *, backend: str | None = None) -> torch.Tensor:
    """float32 ``[N]``: each sequence's summed log-prob of its labelled (completion) tokens, from a packed row
    (``cu_seq_lens``) or padded / bucketed rows, through :func:`fastrm.models.token_logprobs` (fused LM head)."""
    logprobs = token_logprobs(model, batch, backend=backend)
    if "cu_seq_lens" not in batch:
        return logprobs.sum(1)
    cu = batch["cu_seq_lens"].long()
    # position t holds the log-prob of token t + 1: it belongs to that token's sequence
    owner = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1])[1:]
    return logprobs.new_zeros(len(cu) - 1).index_add_(0, owner, logprobs[0])


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


def tokenize_pairs(rows, tokenizer, max_length: int, truncation: str):
    """``{"chosen_ids", "rejected_ids", "prompt_len"}`` examples laid out as a policy's sequences (the SFT template:
    EOS after each completion, none after one cut at max_length; the prompt cut from the left first) and the
    :class:`fastrm.data.TokenizeReport`."""
    rows, encoded, _ = fdata._prepare(ranking_to_pairs(list(rows)), tokenizer, max_length, truncation, "preference")
    template = fdata.sequence_template(tokenizer)
    report = fdata.TokenizeReport(n_rows=len(rows))
    examples = []
    for prompt, responses in encoded:
        fitted = fdata._fit(prompt, responses, template, max_length, truncation, tail_on_cut=False)
        if fitted is None:
            report.dropped += 1
            continue
        report.truncated += fitted.truncated
        chosen, rejected = fitted.sequences()
        examples.append({"chosen_ids": chosen, "rejected_ids": rejected, "prompt_len": fitted.prompt_len})
    report.n_examples = len(examples)
    return examples, report


# ---- the trainer ----------------------------------------------------------------------------------------------------

class DPOTrainer(training.Trainer):
    """``DPOTrainer(config).setup().train()``; ``DPOTrainer(config, train_data=ds, eval_data=None)`` trains on rows
    given in Python (a ``datasets.Dataset`` / ``DatasetDict``, a list of dicts) instead of ``config.train_data``."""

    def setup(self):
        c = self.config
        training.start_run(self)
        self.tokenizer = fdata.load_tokenizer(c.tokenizer, c.model.name_or_path)
        fdata.sequence_template(self.tokenizer)  # a policy needs an EOS token to end its answers
        train_rows, eval_rows = self._load_rows()
        self.train_examples = self._tokenize(train_rows, "train")
        self.eval_examples = self._tokenize(eval_rows, "eval")
        if not self.train_examples:
            raise DataError("no training examples left after tokenization: every row was dropped (truncation=drop "
                            "with too small a max_length?)")
        self.eval_prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows)) if self.task is not None else []
        self.model = load_causal_lm(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.packing = training.choose_packing(self, self.model, "causal_lm", "policy")
        if c.lora.enabled:  # adapters on the frozen model; the reference is the model with them disabled
            self.model = lora.add_adapters(self.model, c.lora, "causal")
        # The reference is the initial policy: taken before a resumed run loads its trained weights.
        self.ref = None
        self.autocast = training.use_bf16_autocast(c.mixed_precision, self.device)
        if c.precompute_ref_logprobs:
            for examples in (self.train_examples, self.eval_examples):
                self._precompute_ref(examples)
        elif c.loss_type not in REFERENCE_FREE_LOSS_TYPES and not c.lora.enabled:
            self.ref = copy.deepcopy(self.model).requires_grad_(False).eval()
        training.prepare_optimization(self)
        self.ref_p = None if self.ref is None else distributed.Parallel.wrap(self.ref, self.mode, self.device,
                                                                              bf16=self.autocast)
        reference = ("none (reference-free)" if c.loss_type in REFERENCE_FREE_LOSS_TYPES else
                     "precomputed log-probs" if c.precompute_ref_logprobs else
                     "the policy with its adapters disabled" if c.lora.enabled else "a frozen copy of the policy")
        log.info("policy: %s, %s, %d train / %d eval pairs, %s batches, reference: %s, loss %s (beta=%g), device=%s",
                 type(lora.unwrap(self.model)).__name__, training.parameter_counts(self.model),
                 len(self.train_examples), len(self.eval_examples), self.packing.mode, reference, c.loss_type, c.beta,
                 self.device)
        return self

    def _load_rows(self):
        c = self.config
        if self.train_data is None:
            from fastrm.tasks.arithmetic import ArithmeticTask, make_preference_data

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
        examples, report = tokenize_pairs(rows, self.tokenizer, self.config.max_length, self.config.truncation)
        training.log_tokenized(split, report, self.config.max_length)
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
                    with training.autocast(self.autocast, self.device):
                        logps = sequence_logps(self.model, batch, backend=self.config.backend).tolist()
                for e, c_lp, r_lp in zip(chunk, logps[:len(chunk)], logps[len(chunk):]):
                    e["ref_chosen_logps"], e["ref_rejected_logps"] = c_lp, r_lp
        finally:
            self.model.train(was_training)
        log.info("reference log-probs precomputed for %d pairs", len(examples))

    # ---- one step -------------------------------------------------------------------------------------------------

    def collate(self, examples):
        return _collate_pairs(examples, self.tokenizer.pad_token_id, self.packing, self.device)

    def _reference_logps(self, batch) -> torch.Tensor | None:
        c = self.config
        if c.loss_type in REFERENCE_FREE_LOSS_TYPES:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad(), training.autocast(self.autocast, self.device):
            if self.ref_p is not None:
                return self.ref_p(sequence_logps, batch, backend=c.backend)
            with self.model.disable_adapter():  # LoRA: the reference is the policy without its adapters
                return self.parallel(sequence_logps, batch, backend=c.backend)

    def compute_loss(self, batch):
        """Loss and detached metrics (TRL's names) of one batch of pairs."""
        c = self.config
        with training.autocast(self.autocast, self.device):
            logps = self.parallel(sequence_logps, batch, backend=c.backend)
        ref = self._reference_logps(batch)
        n = batch["completion_tokens"].float()
        chosen, rejected = logps.chunk(2)
        lengths = n.chunk(2) if c.loss_type in LENGTH_NORMALISED_LOSS_TYPES else (None, None)
        out = fastrm.dpo_loss(chosen, rejected, *(ref.chunk(2) if ref is not None else (None, None)), beta=c.beta,
                              loss_type=c.loss_type, label_smoothing=c.label_smoothing,
                              gamma=c.simpo_gamma if c.loss_type == "simpo" else 0.0, chosen_lengths=lengths[0],
                              rejected_lengths=lengths[1])
        metrics = {"loss": out.loss.detach(), **out.metrics(), "logps/chosen": chosen.detach().mean(),
                   "logps/rejected": rejected.detach().mean()}
        return out.loss, metrics

    def train(self):
        return training.fit(self, "dpo", {"loss": "loss", "acc": "rewards/accuracies"})

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
        loss_sum, correct, margin, n = training.reduce_sums(loss_sum, correct, margin, n)
        out = {"eval/loss": loss_sum / max(n, 1), "eval/rewards/accuracies": correct / max(n, 1),
               "eval/rewards/margins": margin / max(n, 1)}
        if self.task is not None and self.config.eval_generate:
            out["eval/task_accuracy"] = self.task_accuracy(self.eval_prompts[: self.config.eval_generate])
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def task_accuracy(self, prompts: list[str]) -> float:
        """Share of ``prompts`` whose greedy answer the task's checker marks correct (the truth, not a model)."""
        from fastrm.generation import generate_completions

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
        correct, count = training.reduce_sums(correct, count)
        return correct / max(count, 1)

    def save(self) -> Path:
        return training.save_trainer(self)


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
