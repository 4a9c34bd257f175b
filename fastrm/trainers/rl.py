"""RL fine-tuning of a policy against a reward: PPO, REINFORCE, REINFORCE with baseline, RLOO and GRPO.

One step, top to bottom (seed §3.2: sample, score, estimate the gradient, update, repeat):

1. **prompts**: a batch from the prompt pool (shuffled epochs, or the curriculum's easy -> hard pool);
2. **generate** ``num_samples`` completions per prompt with :func:`fastrm.generation.generate`
   (temperature, top-p, stop at EOS); DAPO's dynamic sampling and overlong shaping (:mod:`fastrm.dapo`);
3. **logprobs**: per-token log-probs of the sampled tokens under the policy and the frozen reference
   (and the critic's values) via :func:`fastrm.models.token_logprobs` — fused, no ``[B, T, V]`` tensor;
4. **score**: learned reward model and/or rule reward functions (``reward_fn``, called as TRL calls them, with
   the prompt row's other fields as keyword arguments: :mod:`fastrm.rewards`), weighted; minus the missing-EOS
   penalty; normalised and clipped;
5. **advantages** (``advantage=``): gae (fused ``compute_gae`` with the critic), reinforce, reinforce_baseline,
   rloo, grpo, reinforce_pp(_baseline) (see :mod:`fastrm.advantages`); KL to the reference as a per-token reward
   penalty or a loss term; optional whitening; TIS / ICEPOP weights (:mod:`fastrm.rollout_correction`);
6. **update**: ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate
   (:func:`fastrm.ops.ppo.ppo_policy_loss`, + dual clip; or CISPO, SAPO), clipped value loss, entropy bonus; stop on a
   non-finite loss; one optimizer step per minibatch;
7. KL controller update, log, evaluate (greedy answers scored by the reward functions, ``eval/score``, and by
   the embedded task's checker), checkpoint.

Under torchrun (``distributed=auto|ddp|fsdp``) each rank takes its share of every global prompt batch and
samples its own completions; the batch statistics of steps 4-5 and 7 are taken over all ranks, token-mean
losses are weighted by the global token count, and rank 0 writes (see :mod:`fastrm.distributed`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastrm import checkpoint as ckpt
from fastrm import data as fdata
from fastrm import distributed as fdist
from fastrm import advantages as fadv
from fastrm import guard, lora, optim, rewards, runtime, tokenization
from fastrm._checks import deferred_finite_checks
from fastrm.config import ConfigError, parse_cli
from fastrm.generation import decode_completions, generate, prompt_token_ids
from fastrm.metrics import MetricsLogger, NullMetricsLogger, mean_over_ranks, reduce_sums
from fastrm.models import ModelConfig, check_positions, load_causal_lm, load_reward_model
from fastrm.tasks.arithmetic import ArithmeticTask
from fastrm.trainers import base, loop
from fastrm.trainers.ppo_update import PPOUpdate
from fastrm.trainers.rl_config import EMBEDDED, VALUE_MODELS, RLConfig
from fastrm.trainers.rollout import Rollout, RolloutSteps, TokenValueModel

log = logging.getLogger("fastrm")

__all__ = ["EMBEDDED", "VALUE_MODELS", "RLConfig", "RLTrainer", "Rollout", "TokenValueModel", "main"]


class RLTrainer(RolloutSteps, PPOUpdate, base.Trainer):
    """``RLTrainer(config, reward_fn=None, train_data=None, eval_data=None).setup().train()``.

    ``reward_fn``: a Python reward function or a list of them (see :mod:`fastrm.rewards`; weighted by
    ``config.reward_weights``), instead of ``config.reward_fn``. ``train_data`` / ``eval_data``: prompt rows
    as a ``datasets.Dataset`` / ``DatasetDict`` or a list of dicts, instead of ``config.train_data`` / ``eval_data``.
    """

    def __init__(self, config: RLConfig, reward_fn: Callable | Sequence[Callable] | None = None, *,
                 train_data=None, eval_data=None):
        super().__init__(config, train_data=train_data, eval_data=eval_data)
        self._reward_fn = reward_fn

    # ---- setup ------------------------------------------------------------------------------------------------

    def setup(self):
        c = self.config
        base.start_run(self)
        self.tokenizer = tokenization.load_tokenizer(c.tokenizer, c.model.name_or_path)
        tokenization.sequence_template(self.tokenizer)  # a policy needs an EOS token to end its answers
        self.train_rows, self.eval_rows = self._load_prompts()
        # Policy, and the frozen reference: a copy of the initial policy (or the same checkpoint in 8 bits); with
        # LoRA, the policy with its adapters disabled (peft's disable_adapter), no second copy of the weights.
        self.policy = load_causal_lm(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.policy_packing = base.packing_for(self, self.policy, "causal_lm", "policy")
        if c.lora.enabled:
            self.policy = lora.add_adapters(self.policy, c.lora, "causal")
            self.ref = None
        elif not self.uses_reference():
            self.ref = None  # no KL term reads it: no copy, no reference forward
        elif c.ref_8bit:
            self.ref = load_causal_lm(replace(c.model, load_in_8bit=True), self.tokenizer, self.device)
            self.policy_packing.adopt(self.ref)  # the policy's architecture, proven by its probe
        else:
            self.ref = copy.deepcopy(self.policy)  # with the policy's attention
        if self.ref is not None:
            self.ref.requires_grad_(False).eval()
        self.reward_model = self.reward_tokenizer = None
        if c.reward in ("model", "both"):
            rm_config = ModelConfig(name_or_path=c.reward_model_path, load_in_8bit=c.reward_model_8bit)
            self.reward_tokenizer = tokenization.load_tokenizer("auto", c.reward_model_path)
            self.reward_model = load_reward_model(rm_config, self.reward_tokenizer, self.device)
            self.reward_model.requires_grad_(False).eval()
            # The reward model reads its own template; the policy's token ids are reused when the vocabularies
            # match, else prompt and completion are re-tokenized from text by the reward model's tokenizer.
            self.reward_template = tokenization.sequence_template(self.reward_tokenizer, reward=True)
            self.reward_same_tokens = self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            self.reward_packing = base.packing_for(self, self.reward_model, "reward", "reward model")
        self._check_positions()
        self.rules = self._load_rules()
        self.value = self._build_value_model()
        # Resumed weights go into the whole models, before FSDP shards them (see loop.prepare_optimization).
        checkpoint = self.resume_from
        state = ckpt.load_trainer_state(checkpoint, ckpt.dataclass_types(c)) if checkpoint is not None else None
        if checkpoint is not None:
            loop.load_model_weights(self.policy, checkpoint)
            if self.value is not None:
                if "value_model" not in state:
                    raise ConfigError(f"resume from {checkpoint}: it has no critic, but this run needs one "
                                      f"(value_model={c.value_model}, advantage={c.advantage}); resume with the "
                                      f"checkpoint's advantage/value_model settings")
                if c.lora.enabled:  # its adapters and head; the frozen weights are the checkpoint's base
                    lora.load_trained_state(self.value, state["value_model"], f"resume from {checkpoint}: critic")
                else:
                    self.value.load_state_dict(state["value_model"])
        # Data parallel: trained models DDP-wrapped (or FSDP-sharded), frozen ones replicated (or sharded).
        self.autocast = runtime.use_bf16_autocast(c.mixed_precision, self.device)
        wrap = lambda model: fdist.Parallel.wrap(model, self.mode, self.device, bf16=self.autocast)  # noqa: E731
        self.policy_p = wrap(self.policy)
        self.ref_p = wrap(self.ref) if self.ref is not None else None
        self.reward_p = wrap(self.reward_model) if self.reward_model is not None else None
        self.value_p = wrap(self.value) if self.value is not None else None
        # Optimizers: one per trained model; one optimizer step per minibatch.
        total = c.max_steps * c.ppo_epochs * c.num_minibatches
        sharded = self.mode == "fsdp"
        self.optimizer = optim.make_optimizer(self.policy.parameters(), c.optimizer, c.lr, c.weight_decay,
                                                 self.device, sharded=sharded)
        warmup = optim.warmup_steps(c, total)
        self.scheduler = optim.make_scheduler(self.optimizer, c.lr_scheduler, warmup, total)
        self.value_optimizer = self.value_scheduler = None
        if self.value is not None:
            self.value_optimizer = optim.make_optimizer(self.value.parameters(), c.optimizer, c.value_lr or c.lr,
                                                           c.weight_decay, self.device, sharded=sharded)
            self.value_scheduler = optim.make_scheduler(self.value_optimizer, c.lr_scheduler, warmup, total)
        # Prompt order: shuffled epochs, or the curriculum. Both yield GLOBAL batches (batch_size prompts per
        # rank); each rank takes its share ``rank::world_size`` in train_step.
        global_batch = c.batch_size * fdist.world_size()
        if c.curriculum:
            difficulty = self._difficulty()
            self.sampler = fadv.CurriculumSampler(self.train_rows, difficulty, global_batch,
                                                 start_fraction=c.curriculum_start, warmup_steps=c.curriculum_steps,
                                                 schedule=c.curriculum_schedule, num_stages=c.curriculum_stages,
                                                 seed=c.seed)
        else:
            self.sampler = loop.BatchStream(self.train_rows, global_batch, c.seed)
        self.kl_ctl = (fadv.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                       else fadv.FixedKLController(c.kl_coef))
        self.baseline = fadv.MovingAverageBaseline(c.baseline, c.baseline_decay)
        self.normalizer = fadv.RewardNormalizer(c.reward_norm, c.reward_clip)
        if checkpoint is not None:
            self._restore(checkpoint, state)
        self.guard = guard.DivergenceGuard(self, [m for m in (self.policy, self.value) if m is not None])
        fdist.decorrelate_rng(c.seed, self.step)  # ranks sample different completions
        self.metrics = MetricsLogger(self.out_dir, c.tensorboard) if fdist.is_main() \
            else NullMetricsLogger()
        log.info("policy %s; reward=%s; advantage=%s; critic=%s; %d train / %d eval prompts; curriculum=%s; "
                 "device=%s", base.parameter_counts(self.policy), c.reward, c.advantage, c.resolved_value_model(),
                 len(self.train_rows), len(self.eval_rows), c.curriculum, self.device)
        log.info("models in memory: %.1f MiB of parameters and buffers (policy, reference%s, critic, reward model; "
                 "shared tensors counted once)", self.model_bytes() / 2**20,
                 ": the policy with its adapters disabled" if c.lora.enabled else
                 "" if self.ref is not None else ": none, no KL term")
        return self

    def uses_reference(self) -> bool:
        """Whether a KL term reads the reference's log-probs (none does with a fixed kl_coef of 0)."""
        c = self.config
        return c.kl_coef > 0 or c.adaptive_kl

    def on_policy(self) -> bool:
        """One optimizer step per rollout: the update starts from the policy that sampled, so the old log-probs
        are the update's own, detached (as TRL takes them), and no forward computes them before, unless a KL
        penalty in the rewards or a rollout correction (it weighs the advantages by them) reads them first."""
        c = self.config
        return (c.ppo_epochs == 1 and c.num_minibatches == 1 and c.rollout_correction == "none"
                and not (c.kl_in == "reward" and self.uses_reference()))

    def _load_prompts(self):
        """Prompt rows (:func:`fastrm.data.prepare_prompts`) for training and evaluation, and the names of their
        other fields (``self.columns``, offered to the reward functions)."""
        c = self.config
        if self.train_data is None:
            self.task = ArithmeticTask(max_level=c.task_max_level)
            train = [{"prompt": p.prompt, "difficulty": p.difficulty}
                     for p in self.task.sample(c.num_train_prompts, seed=c.seed)]
            evaluation = [{"prompt": p.prompt, "difficulty": p.difficulty}
                          for p in self.task.sample(max(c.num_eval_prompts, 1), seed=c.seed + 10_000)]
        else:
            # No held-out fraction: evaluation prompts come from eval_data (or a DatasetDict's eval_split) only.
            train, evaluation = fdata.load_train_eval(self.train_data, self.eval_data, 0.0, c.seed, task="prompt",
                                                      train_split=c.train_split, eval_split=c.eval_split)
        train = tokenization.prepare_prompts(train, self.tokenizer, fdata.source_name(self.train_data))
        evaluation = tokenization.prepare_prompts(evaluation[: c.num_eval_prompts], self.tokenizer,
                                           fdata.source_name(self.eval_data or self.train_data))
        self.columns = list(dict.fromkeys(k for r in train + evaluation for k in r["columns"]))
        return train, evaluation

    def _check_positions(self):
        """Models with a learned position table (GPT-2, OPT, BERT, ...) index it up to prompt + completion: a
        prompt set and max_new_tokens they cannot take stop here, not mid-run. The reward model's sequences add
        its own template's special tokens (an upper bound when it re-tokenizes the texts)."""
        c = self.config
        prompts = [r["prompt"] for r in self.train_rows + self.eval_rows]
        longest = max(map(len, prompt_token_ids(self.tokenizer, prompts)))
        what = f"the longest prompt ({longest} tokens) + max_new_tokens"
        check_positions(self.policy, longest + c.max_new_tokens, "max_new_tokens", c.max_new_tokens, what)
        if self.reward_model is not None:
            template = self.reward_template
            if not self.reward_same_tokens:
                longest = max(len(self.reward_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
            longest += len(template.head) + len(template.tail)
            check_positions(self.reward_model, longest + c.max_new_tokens, "max_new_tokens", c.max_new_tokens,
                            f"for the reward model, {what} + its special tokens")

    def _load_rules(self) -> list[rewards.RewardFunction]:
        """The rule reward functions: for the reward (reward=rule|both) and for eval/score. With reward=model, a
        ``reward_fn`` given in Python or set to other than the embedded checker scores the evaluation only."""
        c = self.config
        if self._reward_fn is not None:
            fns = list(self._reward_fn) if isinstance(self._reward_fn, (list, tuple)) else [self._reward_fn]
        elif c.reward in ("rule", "both") or c.reward_fn != EMBEDDED:
            fns = [rewards.load(spec) for spec in c.reward_fn_specs()]
        else:
            return []
        functions = rewards.reward_functions(fns, c.reward_weights)
        for function in functions:
            rewards.bind(function, self.columns)
        log.info("reward functions: %s (prompt columns offered: %s)",
                 ", ".join(f"{f.name} x {f.weight:g}" for f in functions), ", ".join(self.columns) or "none")
        return functions

    def _difficulty(self):
        c = self.config
        if c.curriculum_difficulty == "auto" and all("difficulty" in r for r in self.train_rows):
            log.info("curriculum: ordering prompts by their difficulty field")
            return [r["difficulty"] for r in self.train_rows]
        log.info("curriculum: ordering prompts by length (tokens)")
        return [len(self.tokenizer(r["prompt"])["input_ids"]) for r in self.train_rows]

    def model_bytes(self) -> int:
        """Bytes of the parameters and buffers of every model this trainer holds, each tensor counted once."""
        return lora.memory_bytes(self.policy, self.ref, self.value, self.reward_model)

    def _build_value_model(self):
        """The critic. With LoRA it trains adapters of its own and its head: from the policy, over the policy's own
        frozen weights (no copy of them); from a reward model, over that model's weights, loaded afresh."""
        c = self.config
        source = c.resolved_value_model()
        if source == "none":
            return None
        if source == "policy":
            policy = lora.unwrap(self.policy)
            backbone = getattr(policy, policy.base_model_prefix)  # a copy keeps the policy's attention
            # LoRA: the policy's layers again, sharing its frozen tensors; the adapters are copies, trained apart.
            # (FSDP shards each model on its own: there the critic gets a copy, sharded like the policy.)
            shared = c.lora.enabled and self.mode != "fsdp"
            backbone = lora.shared_copy(backbone) if shared else copy.deepcopy(backbone)
            head = nn.Linear(policy.get_output_embeddings().in_features, 1, device=self.device)
            nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
            self.value_packing = self.policy_packing
        else:  # the reward model's backbone and head, loaded afresh in full precision (TRL's default critic)
            path = c.reward_model_path if source == "reward" else source
            rm_tokenizer = tokenization.load_tokenizer("auto", path)
            if rm_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"setting value_model={c.value_model!r}: the critic reads the policy's tokens, but "
                                  f"{path} has another tokenizer; use value_model=policy")
            rm = load_reward_model(ModelConfig(name_or_path=path), rm_tokenizer, self.device)
            if not isinstance(getattr(rm, "score", None), nn.Linear):
                raise ConfigError(f"setting value_model={c.value_model!r}: {type(rm).__name__} has no per-token "
                                  "'score' head to read values at every position; use value_model=policy")
            self.value_packing = base.packing_for(self, rm, "backbone", "critic")
            backbone, head = getattr(rm, rm.base_model_prefix), rm.score
            if c.lora.enabled:
                backbone = lora.add_adapters_in_place(backbone, c.lora)
        value = TokenValueModel(backbone, head).to(self.device)
        if c.lora.enabled:
            head.requires_grad_(True)  # the adapters are trainable, the frozen weights stay frozen
        else:
            value.requires_grad_(True)
        return value

    # ---- one rollout -------------------------------------------------------------------------------------------

    def train_step(self) -> dict:
        c = self.config
        rows = fdist.shard(next(self.sampler))  # this rank's prompts of the global batch
        row = {}
        if c.curriculum:
            row.update(self.sampler.stats())
        ro = self.rollout(rows)
        start = time.perf_counter()
        row.update(self.update(ro))
        row["timing/update"] = time.perf_counter() - start - row["timing/optimizer"]  # forward, loss, backward
        row.update(mean_over_ranks(ro.stats))
        # The controller sees the KL of the whole global batch.
        count, mean_kl, _ = fdist.global_moments(ro.seq_kl)
        self.kl_ctl.update(float(mean_kl), int(count))
        row["lr"] = self.scheduler.get_last_lr()[0]
        self.step += 1
        start = time.perf_counter()
        self.guard.check_parameters()  # before the next rollout samples from them (or an evaluation, a checkpoint)
        row["timing/checks"] = time.perf_counter() - start
        return row

    def train(self):
        """Train to ``max_steps``, with ops' finiteness checks deferred to the divergence guard; the output
        folder's lock is released when training ends, however it ends."""
        c = self.config
        self.hold_output_dir()
        bar = tqdm(total=c.max_steps, initial=self.step, desc=self.progress_desc or f"rl:{c.advantage}",
                   disable=not (c.progress and fdist.is_main()))
        try:
            with deferred_finite_checks():
                logging_time = 0.0
                while self.step < c.max_steps:
                    start = time.perf_counter()
                    row = self.train_step()
                    # a step's wall time: its train_step and the logging, evaluation and checkpoint after the
                    # previous one (timed only once they are done, so they go in this row)
                    row["timing/logging"] = logging_time
                    row["timing/step"] = time.perf_counter() - start + logging_time
                    start = time.perf_counter()
                    bar.update(1)
                    if self.step % c.log_steps == 0 or self.step == c.max_steps:
                        self.metrics.log(self.step, row)
                        postfix = {"score": f"{float(row['objective/scores']):.3f}"}
                        if "objective/kl" in row:
                            postfix["kl"] = f"{float(row['objective/kl']):.3f}"
                        if "objective/true_score" in row:
                            postfix["true"] = f"{row['objective/true_score']:.3f}"
                        bar.set_postfix(**postfix)
                    self.evaluate_and_save(bool(self.eval_rows))
                    logging_time = time.perf_counter() - start
            self.final_model = loop.save_final(self.policy_p, self.tokenizer, self.out_dir)
        finally:
            bar.close()
            self.metrics.close()
            self.release_output_dir()
        return self

    @torch.no_grad()
    def evaluate(self, rows: list[dict] | None = None, batch_size: int = 256) -> dict:
        """Greedy answers to the held-out prompts, scored by the reward functions (``eval/score``: their weighted
        sum; ``eval/score/<name>``: each), the learned reward model (``eval/model_score``) and, on the embedded
        task, the ground truth (``eval/true_score``, ``eval/accuracy``). Each is a mean over the prompts it
        scored (a function returning None skips a prompt)."""
        rows = self.eval_rows if rows is None else rows
        if not rows:
            return {}
        was_training = self.policy.training
        self.policy.eval()
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}

        def add(key, total, count):  # a stand-in batch (real=False) adds its keys and nothing else
            sums[key] = sums.get(key, 0.0) + float(total) * real
            counts[key] = counts.get(key, 0.0) + float(count) * real

        # Each rank answers its share; as many batches on every rank (FSDP forwards are collectives): a stand-in
        # batch (weight 0) runs every forward too, so every rank has the same keys.
        for chunk, weight in fdist.shard_batches(rows, batch_size):
            real = weight > 0
            prompts = [r["prompt"] for r in chunk]
            gen = self.policy_p(generate, self.tokenizer, prompts, max_new_tokens=self.config.max_new_tokens,
                                do_sample=False, synced_gpus=self.policy_p.is_fsdp, engine=self.config.generation)
            completions = decode_completions(self.tokenizer, gen["completion_ids"], gen["completion_mask"])
            n = len(prompts)
            if self.task is not None:
                add("eval/true_score", sum(self.task.score(p, x) for p, x in zip(prompts, completions)), n)
                add("eval/accuracy", sum(self.task.is_correct(p, x) for p, x in zip(prompts, completions)), n)
            if self.reward_model is not None:
                add("eval/model_score", self.model_scores(chunk, gen, completions).sum(), n)
            if self.rules:
                per_function = self.rule_scores(chunk, gen, completions)
                total = rewards.weighted_sum(self.rules, per_function)
                add("eval/score", total.nansum(), (~total.isnan()).sum())
                for j, fn in enumerate(self.rules):
                    add(f"eval/score/{fn.name}", per_function[:, j].nansum(), (~per_function[:, j].isnan()).sum())
            add("eval/eos_fraction", (gen["completion_ids"] == self.tokenizer.eos_token_id).any(1).sum(), n)
        self.policy.train(was_training)
        keys = sorted(sums)
        totals = reduce_sums(*(sums[k] for k in keys), *(counts[k] for k in keys))
        return {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys) if totals[len(keys) + i]}

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything but the policy's weights, whole (FSDP shards gathered: every rank must call it)."""
        state = {"sampler": self.sampler.state_dict(),
                 "optimizer": fdist.full_optimizer_state(self.policy, self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "baseline": self.baseline.state_dict(), "normalizer": self.normalizer.state_dict(),
                 "rng": runtime.rng_state()}
        if self.value is not None:
            # LoRA: the critic's adapters and head only (its frozen weights are the model's own)
            names = lora.trained_names(self.value) if self.config.lora.enabled else None
            state.update({"value_model": fdist.full_model_state(self.value, names),
                          "value_optimizer": fdist.full_optimizer_state(self.value, self.value_optimizer),
                          "value_scheduler": self.value_scheduler.state_dict()})
        return state

    def save(self) -> Path:
        return loop.save_distributed(self, self.policy_p, self.state_dict())

    def _restore(self, checkpoint: Path, state: dict):
        """The rest of a checkpoint once models are wrapped and optimizers built (weights are loaded in setup).
        This run's settings apply: learning rates and schedules, a fixed KL coefficient, the adaptive controller's
        target and horizon (its coefficient continues), the baseline's kind and decay (its mean continues)."""
        c = self.config
        optim.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        optim.restore_schedule(self.optimizer, self.scheduler, state["scheduler"], c.weight_decay)
        if self.value is not None:
            optim.load_optimizer_state(self.value, self.value_optimizer, state["value_optimizer"])
            optim.restore_schedule(self.value_optimizer, self.value_scheduler, state["value_scheduler"],
                                      c.weight_decay)
        self.sampler.load_state_dict(state["sampler"])
        if c.adaptive_kl:
            self.kl_ctl.value = state["kl_ctl"]["value"]
        self.baseline.value = state["baseline"]["value"]
        self.normalizer.load_state_dict(state["normalizer"])
        runtime.set_rng_state(state["rng"])
        loop.resumed_at(self, checkpoint, state["step"])


def main(argv=None) -> int:
    config = parse_cli(RLConfig, argv, "fastrm ppo", "RL fine-tuning (PPO / REINFORCE / RLOO / GRPO) of an SFT "
                       "policy against a learned reward model and/or a rule. Typical: fastrm ppo "
                       "model.name_or_path=runs/sft/final reward_model_path=runs/reward/final")
    trainer = RLTrainer(config).setup()
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    keys = [k for k in ("eval/accuracy", "eval/true_score", "eval/model_score", "eval/score") if k in after]
    keys += sorted(k for k in after if k.startswith("eval/score/"))
    summary = ", ".join(f"{k} {before.get(k, float('nan')):.3f} -> {after[k]:.3f}" for k in keys)
    if fdist.is_main():
        print(f"held-out (greedy): {summary or 'no eval prompts'}; policy saved in {trainer.final_model}")
    fdist.cleanup()
    return 0
