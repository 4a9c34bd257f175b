"""RL fine-tuning of a policy against a reward: PPO, REINFORCE, REINFORCE with baseline, RLOO and GRPO.

One step, top to bottom (seed §3.2: sample, score, estimate the gradient, update, repeat):

1. **prompts**: a batch from the prompt pool (shuffled epochs, or the curriculum's easy -> hard pool);
2. **generate** ``num_samples`` completions per prompt with :func:`fastrm.generation.generate`
   (temperature, top-p, stop at EOS);
3. **logprobs**: per-token log-probs of the sampled tokens under the policy and the frozen reference
   (and the critic's values) via :func:`fastrm.models.token_logprobs` — fused, no ``[B, T, V]`` tensor;
4. **score**: learned reward model and/or rule reward functions (``reward_fn``, called as TRL calls them, with
   the prompt row's other fields as keyword arguments: :mod:`fastrm.rewards`), weighted; minus the missing-EOS
   penalty; normalised and clipped;
5. **advantages** (``advantage=``): gae (fused ``compute_gae`` with the critic), reinforce, reinforce_baseline,
   rloo, grpo (see :mod:`fastrm.rl`); KL to the reference as a per-token reward penalty or a loss term;
   optional whitening;
6. **update**: ``ppo_epochs`` passes over shuffled minibatches of the clipped surrogate
   (:func:`fastrm.ops.ppo.ppo_policy_loss`, + dual clip), clipped value loss, entropy bonus; stop on a
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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from fastrm import data as fdata
from fastrm import distributed as fdist
from fastrm import lora, packing, rewards, rl, training
from fastrm._checks import deferred_finite_checks
from fastrm.config import ConfigError, parse_cli, require, require_path, setting
from fastrm.generation import decode_completions, generate
from fastrm.models import (
    TINY,
    ModelConfig,
    backbone_hidden,
    load_causal_lm,
    load_reward_model,
    reward_scores,
    token_logprobs,
)
from fastrm.ops.ppo import AGG_MODES, KL_KINDS, kl_penalty, ppo_policy_loss, value_loss

log = logging.getLogger("fastrm")

EMBEDDED = rewards.EMBEDDED
VALUE_MODELS = ("auto", "none", "policy", "reward")


@dataclass
class RLConfig(training.TrainerSettings):
    # The policy (model): an SFT checkpoint from `fastrm sft` (model.name_or_path=<checkpoint dir>), or "tiny".
    tokenizer: str = setting("auto", "auto: the policy checkpoint's own tokenizer (the embedded task's for the tiny "
                                     "model) | embedded | a tokenizer folder")
    # Prompts (JSONL / Parquet / save_to_disk rows with "prompt", optional numeric "difficulty", any other fields
    # for the reward functions). None: the embedded arithmetic task.
    train_data: str | None = setting(None, "prompts: JSONL, Parquet or a datasets save_to_disk folder, rows with "
                                           "prompt (text or chat messages), optional difficulty, and any fields the "
                                           "reward functions take; null: the embedded arithmetic task")
    eval_data: str | None = setting(None, "held-out prompts (same formats; null with train_data: no greedy "
                                          "evaluation)")
    num_train_prompts: int = setting(2000, "embedded task: training prompts generated")
    num_eval_prompts: int = setting(200, "held-out prompts answered greedily at each evaluation (0: off)")
    task_max_level: int = setting(0, "embedded task: hardest level, 0 (one-digit sums) to 4")
    # Reward
    reward: str = setting("model", "model (a reward model of fastrm train-rm) | rule (reward_fn) | both (weighted "
                                   "sum)")
    reward_model_path: str | None = setting(None, "checkpoint folder of the reward model (reward=model or both)")
    reward_model_8bit: bool = setting(False, "load the reward model in 8 bits (CUDA only)")
    reward_fn: Any = setting(EMBEDDED, "rule reward functions: 'embedded' (the arithmetic task's checker), "
                             "'package.module:function', or a list of them [mod:f1, mod:f2]; with reward=model, "
                             "used for evaluation only (eval/score) when not 'embedded'")
    reward_weights: list[float] | None = setting(None, "weight of each reward_fn function in the rule score "
                                                       "(default 1.0 each)")
    reward_model_weight: float = setting(1.0, "weight of the reward model's score in the reward")
    rule_weight: float = setting(1.0, "weight of the rule's score in the reward")
    missing_eos_penalty: float | None = setting(None, "subtracted from the score of a completion that never emits EOS")
    reward_norm: str = setting("none", "score normalisation: none | batch | running (mean and std so far)")
    reward_clip: float | None = setting(None, "clip the (normalised) score to [-reward_clip, reward_clip]")
    value_model: str = setting("auto", "critic for advantage=gae: auto (a copy of the policy when gae, else none) | "
                                       "none | policy | reward (the reward model) | a reward-model checkpoint folder")
    ref_8bit: bool = setting(False, "load the frozen reference in 8 bits (CUDA; model.name_or_path a checkpoint)")
    # Rollouts
    batch_size: int = setting(8, "prompts per step (per device under torchrun)")
    num_samples: int = setting(4, "completions sampled per prompt")
    max_new_tokens: int = setting(256, "longest completion, in tokens")
    temperature: float = setting(1.0, "sampling temperature (log-probs are taken at the same temperature)")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    # Advantages
    advantage: str = setting("gae", "gae (critic) | reinforce | reinforce_baseline | rloo | grpo")
    gamma: float = setting(1.0, "discount per token")
    lam: float = setting(0.95, "GAE lambda")
    whiten_advantages: bool = setting(True, "normalise advantages to mean 0, std 1 over the batch's tokens")
    baseline: str = setting("moving", "reinforce_baseline: moving (EMA of past batches) | batch (this batch's mean)")
    baseline_decay: float = setting(0.9, "reinforce_baseline=moving: EMA decay")
    scale_rewards: str = setting("group", "grpo: divide the centred scores by the std of the group | batch | "
                                          "none (Dr. GRPO, centring only), as TRL's scale_rewards")
    grpo_scale: bool | None = setting(None, "deprecated alias: true = scale_rewards=group, false = none")
    # Objective
    ppo_epochs: int = setting(2, "passes over each rollout")
    num_minibatches: int = setting(1, "minibatches per pass (one optimizer step each)")
    clip_eps: float = setting(0.2, "PPO ratio clip: [1 - clip_eps, 1 + clip_eps]")
    clip_eps_high: float | None = setting(None, "upper clip 1 + clip_eps_high instead (asymmetric, DAPO); null: "
                                                "clip_eps")
    dual_clip: float | None = setting(None, "dual-clip constant c > 1 bounding the loss of negative advantages; "
                                            "null: off")
    loss_agg: str = setting("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                                          "seq-mean-token-sum-norm (divided by max_new_tokens: Dr. GRPO)")
    vf_coef: float = setting(0.5, "weight of the value loss")
    value_clip: float | None = setting(0.2, "clip the value prediction to old value +- value_clip; null: off")
    entropy_coef: float = setting(0.0, "weight of the entropy bonus")
    kl_coef: float = setting(0.05, "weight of the KL to the reference (initial value when adaptive_kl)")
    kl_estimator: str = setting("k1", "per-token KL estimator: k1 | k2 | k3 | abs | k1+ | abs+ | k3+ (straight-"
                                      "through: the value of k1/abs/k3, the gradient of k2; kl_in=loss)")
    kl_in: str = setting("reward", "reward (a per-token penalty in the rewards) | loss (a term of the loss)")
    adaptive_kl: bool = setting(False, "adapt kl_coef towards kl_target (Ziegler et al. controller)")
    kl_target: float = setting(0.1, "adaptive_kl: target of objective/kl (summed over a completion)")
    kl_horizon: int = setting(10000, "adaptive_kl: horizon of the controller, in samples")
    # Curriculum (seed §3.2): prompts easy -> hard, the pool widening over curriculum_steps. Off by default.
    curriculum: bool = setting(False, "order prompts easy -> hard, the pool widening over curriculum_steps")
    curriculum_difficulty: str = setting("auto", "auto (the data's difficulty field, else length) | length")
    curriculum_start: float = setting(0.25, "share of the easiest prompts in the pool at step 0")
    curriculum_steps: int = setting(100, "steps until the pool holds every prompt")
    curriculum_schedule: str = setting("linear", "pool growth: linear | step")
    curriculum_stages: int = setting(4, "curriculum_schedule=step: number of stages")
    # Optimisation (the rest: training.TrainerSettings, with this trainer's defaults)
    lr: float = setting(1e-6, "learning rate of the policy (AdamW)")
    value_lr: float | None = setting(None, "learning rate of the critic; null: lr")
    output_dir: str = "runs/ppo"
    max_steps: int = 200

    # The global batch may change on resume (another number of GPUs): rollouts are sampled, and the prompt
    # order goes on from the same epoch position.
    FIXED_ON_RESUME: ClassVar[tuple[str, ...]] = ("model", "lora", "seed", "tokenizer", "train_data", "train_split",
                                                  "num_train_prompts", "task_max_level", "curriculum")
    # The embedded task's small model (preset=tiny, or auto with model.name_or_path=tiny; fastrm demo sets it).
    TINY_PRESET: ClassVar[dict] = {"batch_size": 16, "max_new_tokens": 6, "lr": 1e-4}

    def validate(self):
        super().validate()
        for name in ("num_samples", "max_new_tokens", "ppo_epochs", "num_minibatches", "num_train_prompts",
                     "kl_horizon", "curriculum_stages"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        choices = {"reward": ("model", "rule", "both"), "advantage": rl.ESTIMATORS,
                   "reward_norm": ("none", "batch", "running"), "baseline": ("moving", "batch"),
                   "loss_agg": AGG_MODES, "scale_rewards": rl.SCALE_REWARDS,
                   "kl_estimator": KL_KINDS, "kl_in": ("reward", "loss"),
                   "curriculum_schedule": ("linear", "step"), "curriculum_difficulty": ("auto", "length")}
        for name, allowed in choices.items():
            require(getattr(self, name) in allowed, name, getattr(self, name), "must be one of " + ", ".join(allowed))
        require(self.num_eval_prompts >= 0, "num_eval_prompts", self.num_eval_prompts, "must be >= 0")
        if self.grpo_scale is not None:  # the old name: fold it into scale_rewards (config.yaml records that)
            require(self.scale_rewards == "group", "grpo_scale", self.grpo_scale,
                    f"conflicts with scale_rewards={self.scale_rewards}; set scale_rewards only")
            self.scale_rewards, self.grpo_scale = ("group" if self.grpo_scale else "none"), None
        if self.advantage in rl.GROUP_ESTIMATORS:
            require(self.num_samples >= 2, "num_samples", self.num_samples,
                    f"advantage={self.advantage} compares the samples of a prompt: needs num_samples >= 2")
        if self.reward in ("model", "both"):
            require(self.reward_model_path is not None, "reward_model_path", self.reward_model_path,
                    f"reward={self.reward} needs the checkpoint of a reward model (fastrm train-rm)")
        value = self.resolved_value_model()
        if self.advantage == "gae":
            require(value != "none", "value_model", self.value_model,
                    "advantage=gae needs a critic: value_model=policy | reward | <reward-model checkpoint>")
        if value == "reward":
            require(self.reward_model_path is not None, "value_model", self.value_model,
                    "value_model=reward needs reward_model_path")
        require(self.num_minibatches <= self.batch_size * self.num_samples, "num_minibatches", self.num_minibatches,
                f"must be <= batch_size * num_samples = {self.batch_size * self.num_samples}")
        require(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must lie in (0, 1]")
        require(0 <= self.gamma <= 1, "gamma", self.gamma, "must lie in [0, 1]")
        require(0 <= self.lam <= 1, "lam", self.lam, "must lie in [0, 1]")
        require(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "must lie in (0, 1) (the ratio is clipped to "
                "[1 - clip_eps, 1 + clip_eps])")
        require(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", self.clip_eps_high, "must be > 0")
        require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", self.dual_clip, "must be > 1 (or null)")
        require(self.value_clip is None or self.value_clip >= 0, "value_clip", self.value_clip, "must be >= 0")
        require(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        require(self.kl_target > 0, "kl_target", self.kl_target, "must be > 0")
        require(self.vf_coef >= 0, "vf_coef", self.vf_coef, "must be >= 0")
        require(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0")
        require(self.reward_clip is None or self.reward_clip > 0, "reward_clip", self.reward_clip, "must be > 0")
        require(0 <= self.baseline_decay < 1, "baseline_decay", self.baseline_decay, "must lie in [0, 1)")
        require(0 < self.curriculum_start <= 1, "curriculum_start", self.curriculum_start, "must lie in (0, 1]")
        require(self.curriculum_steps >= 0, "curriculum_steps", self.curriculum_steps, "must be >= 0")
        require(self.value_lr is None or (self.value_lr > 0 and math.isfinite(self.value_lr)), "value_lr",
                self.value_lr, "must be > 0 and finite")
        specs = self.reward_fn_specs()
        require(len(specs) > 0 and all(isinstance(s, str) and s for s in specs), "reward_fn", self.reward_fn,
                "must be 'embedded', 'package.module:function' or a non-empty list of them")
        if self.reward_weights is not None:
            if self.reward_fn != EMBEDDED:  # else the functions may be given in Python: checked at setup
                require(len(self.reward_weights) == len(specs), "reward_weights", self.reward_weights,
                        f"needs one weight per reward_fn function ({len(specs)})")
            require(all(math.isfinite(w) for w in self.reward_weights), "reward_weights", self.reward_weights,
                    "must be finite")
        if self.ref_8bit:
            require(not self.lora.enabled, "ref_8bit", self.ref_8bit,
                    "with lora.r > 0 the reference is the policy with its adapters disabled, not a copy to load in "
                    "8 bits; lora.quantize=8bit quantizes the weights they share")
            require(self.model.name_or_path != TINY, "ref_8bit", self.ref_8bit,
                    "needs model.name_or_path to be a checkpoint (the reference is reloaded from it in 8 bits)")
        for name in ("ref_8bit", "reward_model_8bit"):
            require(not getattr(self, name) or torch.cuda.is_available(), name, getattr(self, name),
                    "8-bit loading needs a CUDA device")
        require(0 <= self.task_max_level <= training.MAX_TASK_LEVEL, "task_max_level", self.task_max_level,
                f"must lie in [0, {training.MAX_TASK_LEVEL}]")
        training.check_tokenizer(self.tokenizer, "tokenizer", fdata.AUTO_TOKENIZER, EMBEDDED)
        require_path(self.train_data, "train_data")
        require_path(self.eval_data, "eval_data")
        if self.reward in ("model", "both"):
            require_path(self.reward_model_path, "reward_model_path", "folder")
        if value not in VALUE_MODELS:
            require_path(value, "value_model", "folder (or auto, none, policy, reward)")
        for spec in specs:  # importable now, not after the models are built (a .py file: run once, at setup)
            if spec.rpartition(":")[0].endswith(".py"):
                require_path(spec.rpartition(":")[0], "reward_fn", "file")
            else:
                rewards.load(spec)

    def reward_fn_specs(self) -> list:
        return list(self.reward_fn) if isinstance(self.reward_fn, (list, tuple)) else [self.reward_fn]

    def resolved_value_model(self) -> str:
        if self.value_model == "auto":
            return "policy" if self.advantage == "gae" else "none"
        return self.value_model


class TokenValueModel(nn.Module):
    """Critic: a transformer backbone and ``Linear(H, 1)`` applied at every position -> ``[B, T]`` values."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: dict) -> torch.Tensor:
        """``[B, T]`` values of a padded or bucketed batch, ``[1, S]`` of a packed row."""
        if "buckets" in batch:
            return packing.per_bucket(self.forward, batch, per_token=True)
        return self.head(backbone_hidden(self.backbone, batch)).squeeze(-1).float()


def _call(model, *args):
    return model(*args)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = (mask != 0).to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


class RLTrainer(training.Trainer):
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
        training.start_run(self)
        self.tokenizer = fdata.load_tokenizer(c.tokenizer, c.model.name_or_path)
        fdata.sequence_template(self.tokenizer)  # a policy needs an EOS token to end its answers
        self.train_rows, self.eval_rows = self._load_prompts()
        # Policy, and the frozen reference: a copy of the initial policy (or the same checkpoint in 8 bits); with
        # LoRA, the policy with its adapters disabled (peft's disable_adapter), no second copy of the weights.
        self.policy = load_causal_lm(c.model, self.tokenizer, self.device, quantize=c.lora.quantize)
        self.policy_packing = training.choose_packing(self, self.policy, "causal_lm", "policy")
        if c.lora.enabled:
            self.policy = lora.add_adapters(self.policy, c.lora, "causal")
            self.ref = None
        elif not self.uses_reference():
            self.ref = None  # no KL term reads it: no copy, no reference forward
        elif c.ref_8bit:
            self.ref = load_causal_lm(replace(c.model, load_in_8bit=True), self.tokenizer, self.device)
            if self.policy_packing.mode == "packed":  # the policy's architecture, proven by its probe
                packing.enable_varlen(self.ref)
        else:
            self.ref = copy.deepcopy(self.policy)  # with the policy's attention
        if self.ref is not None:
            self.ref.requires_grad_(False).eval()
        self.reward_model = self.reward_tokenizer = None
        if c.reward in ("model", "both"):
            rm_config = ModelConfig(name_or_path=c.reward_model_path, load_in_8bit=c.reward_model_8bit)
            self.reward_tokenizer = fdata.load_tokenizer("auto", c.reward_model_path)
            self.reward_model = load_reward_model(rm_config, self.reward_tokenizer, self.device)
            self.reward_model.requires_grad_(False).eval()
            # The reward model reads its own template; the policy's token ids are reused when the vocabularies
            # match, else prompt and completion are re-tokenized from text by the reward model's tokenizer.
            self.reward_template = fdata.sequence_template(self.reward_tokenizer, reward=True)
            self.reward_same_tokens = self.reward_tokenizer.get_vocab() == self.tokenizer.get_vocab()
            self.reward_packing = training.choose_packing(self, self.reward_model, "reward", "reward model")
        self.rules = self._load_rules()
        self.value = self._build_value_model()
        # Resumed weights go into the whole models, before FSDP shards them (see training.prepare_optimization).
        checkpoint = self.resume_from
        state = training.load_trainer_state(checkpoint) if checkpoint is not None else None
        if checkpoint is not None:
            training.load_model_weights(self.policy, checkpoint)
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
        self.autocast = training.use_bf16_autocast(c.mixed_precision, self.device)
        wrap = lambda model: fdist.Parallel.wrap(model, self.mode, self.device, bf16=self.autocast)  # noqa: E731
        self.policy_p = wrap(self.policy)
        self.ref_p = wrap(self.ref) if self.ref is not None else None
        self.reward_p = wrap(self.reward_model) if self.reward_model is not None else None
        self.value_p = wrap(self.value) if self.value is not None else None
        # Optimizers: one per trained model; one optimizer step per minibatch.
        total = c.max_steps * c.ppo_epochs * c.num_minibatches
        sharded = self.mode == "fsdp"
        self.optimizer = training.make_optimizer(self.policy.parameters(), c.optimizer, c.lr, c.weight_decay,
                                                 self.device, sharded=sharded)
        warmup = training.warmup_steps(c, total)
        self.scheduler = training.make_scheduler(self.optimizer, c.lr_scheduler, warmup, total)
        self.value_optimizer = self.value_scheduler = None
        if self.value is not None:
            self.value_optimizer = training.make_optimizer(self.value.parameters(), c.optimizer, c.value_lr or c.lr,
                                                           c.weight_decay, self.device, sharded=sharded)
            self.value_scheduler = training.make_scheduler(self.value_optimizer, c.lr_scheduler, warmup, total)
        # Prompt order: shuffled epochs, or the curriculum. Both yield GLOBAL batches (batch_size prompts per
        # rank); each rank takes its share ``rank::world_size`` in train_step.
        global_batch = c.batch_size * fdist.world_size()
        if c.curriculum:
            difficulty = self._difficulty()
            self.sampler = rl.CurriculumSampler(self.train_rows, difficulty, global_batch,
                                                start_fraction=c.curriculum_start, warmup_steps=c.curriculum_steps,
                                                schedule=c.curriculum_schedule, num_stages=c.curriculum_stages,
                                                seed=c.seed)
        else:
            self.sampler = training.BatchStream(self.train_rows, global_batch, c.seed)
        self.kl_ctl = (rl.AdaptiveKLController(c.kl_coef, c.kl_target, c.kl_horizon) if c.adaptive_kl
                       else rl.FixedKLController(c.kl_coef))
        self.baseline = rl.MovingAverageBaseline(c.baseline, c.baseline_decay)
        self.normalizer = rl.RewardNormalizer(c.reward_norm, c.reward_clip)
        if checkpoint is not None:
            self._restore(checkpoint, state)
        self.guard = training.DivergenceGuard(self, [m for m in (self.policy, self.value) if m is not None])
        fdist.decorrelate_rng(c.seed, self.step)  # ranks sample different completions
        self.metrics = training.MetricsLogger(self.out_dir, c.tensorboard) if fdist.is_main() \
            else training.NullMetricsLogger()
        log.info("policy %s; reward=%s; advantage=%s; critic=%s; %d train / %d eval prompts; curriculum=%s; "
                 "device=%s", training.parameter_counts(self.policy), c.reward, c.advantage, c.resolved_value_model(),
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
        penalty in the rewards reads them."""
        c = self.config
        return c.ppo_epochs == 1 and c.num_minibatches == 1 and not (c.kl_in == "reward" and self.uses_reference())

    def _load_prompts(self):
        """Prompt rows (:func:`fastrm.data.prepare_prompts`) for training and evaluation, and the names of their
        other fields (``self.columns``, offered to the reward functions)."""
        c = self.config
        if self.train_data is None:
            from fastrm.tasks.arithmetic import ArithmeticTask

            self.task = ArithmeticTask(max_level=c.task_max_level)
            train = [{"prompt": p.prompt, "difficulty": p.difficulty}
                     for p in self.task.sample(c.num_train_prompts, seed=c.seed)]
            evaluation = [{"prompt": p.prompt, "difficulty": p.difficulty}
                          for p in self.task.sample(max(c.num_eval_prompts, 1), seed=c.seed + 10_000)]
        else:
            # No held-out fraction: evaluation prompts come from eval_data (or a DatasetDict's eval_split) only.
            train, evaluation = fdata.load_train_eval(self.train_data, self.eval_data, 0.0, c.seed, task="prompt",
                                                      train_split=c.train_split, eval_split=c.eval_split)
        train = fdata.prepare_prompts(train, self.tokenizer, fdata.source_name(self.train_data))
        evaluation = fdata.prepare_prompts(evaluation[: c.num_eval_prompts], self.tokenizer,
                                           fdata.source_name(self.eval_data or self.train_data))
        self.columns = list(dict.fromkeys(k for r in train + evaluation for k in r["columns"]))
        return train, evaluation

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
        kind = c.resolved_value_model()
        if kind == "none":
            return None
        if kind == "policy":
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
            path = c.reward_model_path if kind == "reward" else kind
            rm_tokenizer = fdata.load_tokenizer("auto", path)
            if rm_tokenizer.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"setting value_model={c.value_model!r}: the critic reads the policy's tokens, but "
                                  f"{path} has another tokenizer; use value_model=policy")
            rm = load_reward_model(ModelConfig(name_or_path=path), rm_tokenizer, self.device)
            if not isinstance(getattr(rm, "score", None), nn.Linear):
                raise ConfigError(f"setting value_model={c.value_model!r}: {type(rm).__name__} has no per-token "
                                  "'score' head to read values at every position; use value_model=policy")
            self.value_packing = training.choose_packing(self, rm, "backbone", "critic")
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

    def _autocast(self):
        return training.autocast(self.autocast, self.device)

    def _sequences(self, gen: dict) -> dict:
        """Prompt (left-padded) + completion as one batch for the forward passes, with position ids that
        skip the left padding (as generate used) and labels on the completion tokens only."""
        input_ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], dim=1)
        attention_mask = torch.cat([gen["prompt_mask"], gen["completion_mask"]], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        labels = input_ids.masked_fill(attention_mask == 0, fdata.IGNORE_INDEX)
        labels[:, : gen["prompt_ids"].shape[1]] = fdata.IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels}

    def _forward(self, model: fdist.Parallel, fn, batch: dict, decision: packing.Packing, **kwargs):
        """``fn(model, batch)``, per-token outputs, on the rollout ``batch`` laid out as ``decision`` says (one
        packed row, or length buckets: completions of different lengths pay for no padding); the outputs come
        back in the padded layout of ``batch``."""
        if decision.mode == "packed":
            packed = packing.pack(batch)
            out = model(fn, packed, **kwargs)
            return tuple(packing.unpack(o, packed) for o in out) if isinstance(out, tuple) \
                else packing.unpack(out, packed)
        if decision.mode == "bucketed":
            batch = packing.bucket(batch)
        return model(fn, batch, **kwargs)

    def _logprobs(self, model: fdist.Parallel, batch, prompt_len, return_entropy=False):
        """``[B, C]`` log-probs of the completion tokens (and entropies)."""
        with self._autocast():
            out = self._forward(model, token_logprobs, batch, self.policy_packing, temperature=self.config.temperature,
                                return_entropy=return_entropy, backend=self.config.backend)
        if return_entropy:
            return out[0][:, prompt_len - 1:], out[1][:, prompt_len - 1:]
        return out[:, prompt_len - 1:]

    def _ref_logprobs(self, batch, prompt_len):
        if self.ref is not None:
            return self._logprobs(self.ref_p, batch, prompt_len)
        with self.policy.disable_adapter():  # LoRA: the reference is the policy without its adapters
            return self._logprobs(self.policy_p, batch, prompt_len)

    def _values(self, batch, prompt_len):
        with self._autocast():
            return self._forward(self.value_p, _call, batch, self.value_packing)[:, prompt_len - 1:-1].float()

    @torch.no_grad()
    def model_scores(self, rows: list[dict], gen: dict, completions: list[str]) -> torch.Tensor:
        """``[B]`` float32: the learned reward model's score of each prompt + completion (one packed row, length
        buckets or one padded batch, as decided for the reward model); ``rows[i]`` is the prompt row completion i
        answers."""
        seqs = self._reward_inputs([r["prompt"] for r in rows], gen, completions)
        batch = fdata.collate_packed(seqs) if self.reward_packing.mode == "packed" else \
            fdata.collate_padded(seqs, self.reward_tokenizer.pad_token_id)
        batch = training.to_device(batch, self.device, self.reward_packing)
        with self._autocast():
            return self.reward_p(reward_scores, batch).float()

    def rule_scores(self, rows: list[dict], gen: dict, completions: list[str]) -> torch.Tensor:
        """``[B, F]`` float32: each reward function's score of each completion (NaN where it returned None);
        ``rows[i]`` is the prompt row completion i answers."""
        ids = [[t for t, m in zip(c_ids, c_mask) if m]
               for c_ids, c_mask in zip(gen["completion_ids"].tolist(), gen["completion_mask"].tolist())]
        return rewards.score_all(self.rules, rows, completions, ids, self.columns)

    def rule_means(self, scores: torch.Tensor, prefix: str) -> dict:
        """``{prefix + name: mean of the function's scores over the completions it scored, on all ranks}``."""
        scored = ~scores.isnan()
        sums = training.reduce_sums(*scores.nan_to_num(0.0).sum(0).tolist(), *scored.sum(0).tolist())
        f = len(self.rules)
        return {prefix + fn.name: sums[j] / sums[f + j] for j, fn in enumerate(self.rules) if sums[f + j]}

    @torch.no_grad()
    def score(self, rows: list[dict], gen: dict, completions: list[str]) -> tuple[torch.Tensor, dict]:
        """Weighted reward of each completion, ``[B]`` float32, and the parts to log (``reward/model``,
        ``reward/rule``: the weighted sum of the reward functions, ``reward/<function name>``)."""
        c = self.config
        parts, total = {}, torch.zeros(len(completions), device=self.device)
        if self.reward_model is not None:
            model_scores = self.model_scores(rows, gen, completions)
            parts["reward/model"] = model_scores.mean()
            total = total + c.reward_model_weight * model_scores
        if c.reward in ("rule", "both"):
            per_function = self.rule_scores(rows, gen, completions)
            rule = rewards.weighted_sum(self.rules, per_function)
            unscored = rule.isnan().nonzero().flatten().tolist()
            if unscored and c.reward == "rule":
                i = unscored[0]
                raise ValueError(f"no reward function scored completion {i} (all returned None) of the prompt "
                                 f"{rows[i]['prompt']!r:.200}; {len(unscored)} such completions in this batch")
            rule = rule.nan_to_num(0.0).to(self.device)  # reward=both: the model's score alone there
            parts["reward/rule"] = rule.mean()
            parts.update(self.rule_means(per_function, "reward/"))
            total = total + c.rule_weight * rule
        return total, parts

    def _reward_inputs(self, prompts: list[str], gen: dict, completions: list[str]) -> list[list[int]]:
        """Prompt + completion of each rollout as the reward model reads it: its own template (head, tail) around
        the policy's tokens, or around its own tokenization of the texts when the tokenizers differ. A completion
        cut at max_new_tokens (no EOS) gets no EOS tail: the reward model sees an unfinished answer."""
        t, eos = self.reward_template, self.tokenizer.eos_token_id
        seqs = []
        for i, (p_ids, p_mask, c_ids, c_mask) in enumerate(zip(
                gen["prompt_ids"].tolist(), gen["prompt_mask"].tolist(), gen["completion_ids"].tolist(),
                gen["completion_mask"].tolist())):
            c_ids = [tok for tok, m in zip(c_ids, c_mask) if m]
            ended = bool(c_ids) and c_ids[-1] == eos
            if self.reward_same_tokens:
                prompt, completion = [tok for tok, m in zip(p_ids, p_mask) if m], c_ids
            else:
                encode = self.reward_tokenizer
                prompt = encode(prompts[i], add_special_tokens=False)["input_ids"]
                completion = encode(completions[i], add_special_tokens=False)["input_ids"]
            prompt, completion = t.strip(prompt, completion)
            tail = list(t.tail) if ended or not t.tail_is_eos else []
            seqs.append(list(t.head) + prompt + completion + tail)
        return seqs

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> dict:
        """Sample, score and compute advantages for one batch of prompt rows."""
        c = self.config
        n = c.num_samples
        self.policy.eval()
        if self.value is not None:
            self.value.eval()
        timing = {}
        start = time.perf_counter()
        prompts = [r["prompt"] for r in rows]
        gen = self.policy_p(generate, self.tokenizer, prompts, max_new_tokens=c.max_new_tokens, do_sample=True,
                            temperature=c.temperature, top_p=c.top_p, num_return_sequences=n,
                            synced_gpus=self.policy_p.is_fsdp)
        completions = decode_completions(self.tokenizer, gen["completion_ids"], gen["completion_mask"])
        rows_n = [r for r in rows for _ in range(n)]
        prompts_n = [r["prompt"] for r in rows_n]
        timing["timing/generate"] = time.perf_counter() - start

        start = time.perf_counter()
        batch = self._sequences(gen)
        prompt_len = gen["prompt_ids"].shape[1]
        mask = gen["completion_mask"]
        old_logprobs = None if self.on_policy() else self._logprobs(self.policy_p, batch, prompt_len)
        ref_logprobs = self._ref_logprobs(batch, prompt_len) if self.uses_reference() else None
        values = self._values(batch, prompt_len) if self.value is not None else None
        timing["timing/logprobs"] = time.perf_counter() - start

        start = time.perf_counter()
        raw_scores, parts = self.score(rows_n, gen, completions)
        timing["timing/score"] = time.perf_counter() - start

        start = time.perf_counter()
        has_eos = (gen["completion_ids"] == self.tokenizer.eos_token_id).any(dim=1)
        scores = raw_scores
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~has_eos).float()
        scores = self.normalizer(scores)
        kl_measured = old_logprobs is not None and ref_logprobs is not None
        if kl_measured:
            kl = torch.where(mask != 0, kl_penalty(old_logprobs, ref_logprobs, c.kl_estimator, backend=c.backend), 0.0)
        else:  # no KL term, or on-policy: the update measures it on its own log-probs (compute_loss)
            kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kl_coef = self.kl_ctl.value
        advantages, returns = rl.compute_advantages(
            c.advantage, scores, mask, n=n, kl=kl if c.kl_in == "reward" else None, kl_coef=kl_coef, values=values,
            gamma=c.gamma, lam=c.lam, baseline=self.baseline, scale_rewards=c.scale_rewards)
        if c.whiten_advantages:
            advantages = rl.whiten_advantages(advantages, mask)  # statistics over all ranks' rollouts
        timing["timing/advantages"] = time.perf_counter() - start

        seq_kl = kl.sum(1)
        non_score = -kl_coef * seq_kl if c.kl_in == "reward" else torch.zeros_like(seq_kl)
        stats = {
            "objective/scores": raw_scores.mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (raw_scores + non_score).mean(),
            "objective/kl_coef": kl_coef,
            "rollout/length": mask.sum(1).float().mean(),
            "rollout/eos_fraction": has_eos.float().mean(),
            **parts, **timing,
        }
        if kl_measured:
            stats["objective/kl"] = seq_kl.mean()
        if self.task is not None:
            start = time.perf_counter()
            truth = [self.task.score(p, x) for p, x in zip(prompts_n, completions)]
            stats["objective/true_score"] = sum(truth) / len(truth)
            stats["objective/true_accuracy"] = sum(self.task.is_correct(p, x)
                                                   for p, x in zip(prompts_n, completions)) / len(truth)
            stats["timing/score"] += time.perf_counter() - start  # the task's own scores, for the log
        return {"batch": batch, "prompt_len": prompt_len, "mask": mask, "old_logprobs": old_logprobs,
                "ref_logprobs": ref_logprobs, "values": values, "advantages": advantages, "returns": returns,
                "scores": scores, "seq_kl": seq_kl, "stats": stats, "completions": completions, "prompts": prompts_n}

    # ---- the update --------------------------------------------------------------------------------------------

    def compute_loss(self, ro: dict, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of one minibatch (rows ``idx`` of a rollout) and its detached metrics."""
        c = self.config
        batch = {k: v[idx] for k, v in ro["batch"].items()}
        mask, adv = ro["mask"][idx], ro["advantages"][idx]
        logprobs, entropy = self._logprobs(self.policy_p, batch, ro["prompt_len"], return_entropy=True)
        # on-policy (old_logprobs None): the ratio is 1 and its gradient the policy gradient, as TRL computes it
        old = logprobs.detach() if ro["old_logprobs"] is None else ro["old_logprobs"][idx]
        pol = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=c.clip_eps,
                              clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip, agg=c.loss_agg,
                              loss_scale_factor=self._loss_scale_factor(), backend=c.backend)
        mean_entropy = masked_mean(entropy, mask)
        # Data parallel: token means weighted to the mean over all ranks' tokens, as one process takes it.
        # (Sequence means need nothing: ranks hold equal rows.)
        token_weight = fdist.token_weight((mask != 0).sum())
        seq_weight = token_weight if c.loss_agg == "token-mean" else 1.0
        loss = seq_weight * pol.loss
        metrics = {"loss/policy": pol.loss.detach(), "policy/approxkl": pol.approx_kl, "policy/clipfrac": pol.clipfrac,
                   "policy/ratio": pol.ratio_mean, "policy/dual_clipfrac": pol.clipfrac_lower,
                   "objective/entropy": mean_entropy.detach()}
        if c.entropy_coef:
            loss = loss - c.entropy_coef * token_weight * mean_entropy
        if ro["old_logprobs"] is None and ro["ref_logprobs"] is not None:
            # on-policy: the rollout's KL is the one of these log-probs (the controller reads ro["seq_kl"])
            kl = torch.where(mask != 0, kl_penalty(old, ro["ref_logprobs"][idx], c.kl_estimator, backend=c.backend),
                             0.0)
            ro["seq_kl"][idx] = kl.sum(1)
            metrics["objective/kl"] = kl.sum(1).mean()
        if c.kl_in == "loss" and self.kl_ctl.value:
            kl_loss = masked_mean(kl_penalty(logprobs, ro["ref_logprobs"][idx], c.kl_estimator, backend=c.backend), mask)
            loss = loss + self.kl_ctl.value * token_weight * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if self.value is not None:
            values = self._values(batch, ro["prompt_len"])
            vl = value_loss(values, ro["values"][idx], ro["returns"][idx], mask, clip=c.value_clip, agg=c.loss_agg,
                            loss_scale_factor=self._loss_scale_factor(), backend=c.backend)
            loss = loss + c.vf_coef * seq_weight * vl.loss
            metrics.update({"loss/value": vl.loss.detach(), "val/clipfrac": vl.clipfrac,
                            "val/vpred": masked_mean(values.detach(), mask),
                            "val/error": masked_mean((values.detach() - ro["returns"][idx]) ** 2, mask)})
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def _loss_scale_factor(self) -> float | None:
        """seq-mean-token-sum-norm divides by the longest possible completion, a constant (Dr. GRPO), not by the
        padded length of each minibatch."""
        return float(self.config.max_new_tokens) if self.config.loss_agg == "seq-mean-token-sum-norm" else None

    def update(self, ro: dict) -> dict:
        c = self.config
        self.policy.train()
        if self.value is not None:
            self.value.train()
        rows = ro["mask"].shape[0]
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step)
        window = training.MetricsWindow()
        # What the rollout computed, non-finite anywhere on a completion token (a reward function returning 1e38
        # overflows the statistics): named in the guard's message if the step stops.
        rollout_flags = {"advantages": ~torch.isfinite(torch.where(ro["mask"] != 0, ro["advantages"], 0.0)).all()}
        if "scores" in ro:
            rollout_flags["rewards"] = ~torch.isfinite(ro["scores"]).all()

        def hint(names):
            if "scores" not in ro or ("rewards" not in names and "advantages" not in names):
                return ""
            return (f"The largest |reward| of this step's rollouts is {ro['scores'].abs().max().item():.3g}: "
                    f"normalise or clip rewards (reward_norm, reward_clip).")

        optimizer_time = 0.0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(self.device)
            for idx in order.tensor_split(c.num_minibatches):
                loss, metrics = self.compute_loss(ro, idx)
                loss.backward()
                start = time.perf_counter()
                norms = {"policy gradient norm": training.clip_gradients(self.policy, c.max_grad_norm)}
                if self.value is not None:
                    norms["value gradient norm"] = training.clip_gradients(self.value, c.max_grad_norm)
                norms = self.guard.check_step([loss], norms, rollout_flags, hint)
                training.apply_update(self.optimizer, self.scheduler)
                metrics["policy/grad_norm"] = norms[0]
                if self.value is not None:
                    training.apply_update(self.value_optimizer, self.value_scheduler)
                    metrics["val/grad_norm"] = norms[1]
                self.guard.parameters_updated()
                optimizer_time += time.perf_counter() - start
                window.add(metrics, int(ro["mask"][idx].sum()))
        return {**window.summary(), "timing/optimizer": optimizer_time}

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
        row.update(training.mean_over_ranks(ro["stats"]))
        # The controller sees the KL of the whole global batch.
        count, mean_kl, _ = fdist.global_moments(ro["seq_kl"])
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
            self.final_model = training.save_final(self.policy_p, self.tokenizer, self.out_dir)
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
                                do_sample=False, synced_gpus=self.policy_p.is_fsdp)
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
        totals = training.reduce_sums(*(sums[k] for k in keys), *(counts[k] for k in keys))
        return {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys) if totals[len(keys) + i]}

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything but the policy's weights, whole (FSDP shards gathered: every rank must call it)."""
        state = {"sampler": self.sampler.state_dict(),
                 "optimizer": fdist.full_optimizer_state(self.policy, self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "kl_ctl": self.kl_ctl.state_dict(),
                 "baseline": self.baseline.state_dict(), "normalizer": self.normalizer.state_dict(),
                 "rng": training.rng_state()}
        if self.value is not None:
            # LoRA: the critic's adapters and head only (its frozen weights are the model's own)
            names = lora.trained_names(self.value) if self.config.lora.enabled else None
            state.update({"value_model": fdist.full_model_state(self.value, names),
                          "value_optimizer": fdist.full_optimizer_state(self.value, self.value_optimizer),
                          "value_scheduler": self.value_scheduler.state_dict()})
        return state

    def save(self) -> Path:
        return training.save_distributed(self, self.policy_p, self.state_dict())

    def _restore(self, checkpoint: Path, state: dict):
        """The rest of a checkpoint once models are wrapped and optimizers built (weights are loaded in setup).
        This run's settings apply: learning rates and schedules, a fixed KL coefficient, the adaptive controller's
        target and horizon (its coefficient continues), the baseline's kind and decay (its mean continues)."""
        c = self.config
        training.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        training.restore_schedule(self.optimizer, self.scheduler, state["scheduler"], c.weight_decay)
        if self.value is not None:
            training.load_optimizer_state(self.value, self.value_optimizer, state["value_optimizer"])
            training.restore_schedule(self.value_optimizer, self.value_scheduler, state["value_scheduler"],
                                      c.weight_decay)
        self.sampler.load_state_dict(state["sampler"])
        if c.adaptive_kl:
            self.kl_ctl.value = state["kl_ctl"]["value"]
        self.baseline.value = state["baseline"]["value"]
        self.normalizer.load_state_dict(state["normalizer"])
        training.set_rng_state(state["rng"])
        training.resumed_at(self, checkpoint, state["step"])


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
