"""The settings of ``fastrm ppo`` (:class:`RLConfig`): reward, rollouts, advantages, objective, curriculum."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fastrm import advantages as fadv
from fastrm import rewards, tokenization
from fastrm.config import TINY, require_path, require_setting, setting
from fastrm.loss_types import resolve_loss_type
from fastrm.ops.ppo import AGG_MODES, KL_KINDS, POLICY_LOSSES
from fastrm.rollout_correction import CORRECTIONS
from fastrm.trainers import base

EMBEDDED = rewards.EMBEDDED
VALUE_MODELS = ("auto", "none", "policy", "reward")


@dataclass
class RLConfig(base.TrainerSettings):
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
    min_new_tokens: int = setting(0, "shortest completion: EOS is not sampled before this many tokens (the samples "
                                     "then differ from the policy's own distribution by the EOS held off)")
    generation: str = setting("fastrm", "sampler: fastrm (each prompt prefilled once, KV cache written in place, only "
                                        "temperature / top_p / min_new_tokens applied) | hf (the model's generate)")
    # Advantages
    advantage: str = setting("gae", "gae (critic) | reinforce | reinforce_baseline | rloo | grpo | reinforce_pp "
                                    "(REINFORCE++) | reinforce_pp_baseline (REINFORCE++-baseline)")
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
    loss_agg: str | None = setting(None, "token-mean | seq-mean-token-mean | seq-mean-token-sum | "
                                         "seq-mean-token-sum-norm (divided by max_new_tokens: Dr. GRPO); null: "
                                         "token-mean, or what loss_type sets")
    # ---- issue #23: TRL's loss_type names, CISPO, DAPO's dynamic sampling and overlong shaping, rollout correction
    loss_type: str | None = setting(None, "TRL GRPOConfig.loss_type: grpo | dr_grpo | dapo | bnpo | cispo | sapo, "
                                          "sets loss_agg and policy_loss (see fastrm.loss_types); null: off")
    policy_loss: str | None = setting(None, "ppo (clipped ratio) | cispo (MiniMax-M1: clipped stop-gradient weight "
                                            "min(ratio, 1 + clip_eps_high) on the log-prob) | sapo (sigmoid gate of "
                                            "the ratio); null: ppo, or what loss_type sets")
    sapo_temperature_pos: float | None = setting(None, "policy_loss=sapo: gate temperature where A > 0 (TRL's name); "
                                                       "null: 1.0")
    sapo_temperature_neg: float | None = setting(None, "policy_loss=sapo: gate temperature where A <= 0; null: 1.05")
    dynamic_sampling: bool = setting(False, "DAPO: drop prompts whose samples all got the same reward and draw more "
                                            "prompt batches until batch_size prompts are kept")
    max_extra_draws: int = setting(4, "dynamic_sampling: most extra prompt batches sampled per step (then the batch "
                                      "is filled with dropped prompts)")
    overlong_buffer: int = setting(0, "DAPO soft overlong punishment: the last overlong_buffer tokens before "
                                      "max_new_tokens cost up to overlong_penalty, linearly; 0: off")
    overlong_penalty: float = setting(1.0, "overlong_buffer: the penalty of a completion of max_new_tokens tokens")
    rollout_correction: str = setting("none", "sampler-trainer mismatch: none | tis (weight min(pi_old/pi_rollout, "
                                              "C)) | icepop (weight pi_old/pi_rollout inside [C_low, C], else 0)")
    rollout_is_threshold: float = setting(2.0, "rollout_correction: C, the upper bound (> 1)")
    rollout_is_threshold_lower: float | None = setting(None, "rollout_correction=icepop: C_low in [0, 1); null: 1/C")
    # ---- end of issue #23's settings
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
    # Optimisation (the rest: base.TrainerSettings, with this trainer's defaults)
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
        self.validate_policy_loss_options()
        for name in ("num_samples", "max_new_tokens", "ppo_epochs", "num_minibatches", "num_train_prompts",
                     "kl_horizon", "curriculum_stages"):
            require_setting(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        choices = {"reward": ("model", "rule", "both"), "advantage": fadv.ESTIMATORS,
                   "reward_norm": ("none", "batch", "running"), "baseline": ("moving", "batch"),
                   "loss_agg": AGG_MODES, "scale_rewards": fadv.SCALE_REWARDS,
                   "kl_estimator": KL_KINDS, "kl_in": ("reward", "loss"),
                   "curriculum_schedule": ("linear", "step"), "curriculum_difficulty": ("auto", "length"),
                   "generation": ("fastrm", "hf")}
        for name, allowed in choices.items():
            require_setting(getattr(self, name) in allowed, name, getattr(self, name), "must be one of " + ", ".join(allowed))
        require_setting(self.num_eval_prompts >= 0, "num_eval_prompts", self.num_eval_prompts, "must be >= 0")
        if self.grpo_scale is not None:  # the old name: fold it into scale_rewards (config.yaml records that)
            require_setting(self.scale_rewards == "group", "grpo_scale", self.grpo_scale,
                    f"conflicts with scale_rewards={self.scale_rewards}; set scale_rewards only")
            self.scale_rewards, self.grpo_scale = ("group" if self.grpo_scale else "none"), None
        if self.advantage in fadv.GROUP_ESTIMATORS:
            require_setting(self.num_samples >= 2, "num_samples", self.num_samples,
                    f"advantage={self.advantage} compares the samples of a prompt: needs num_samples >= 2")
        if self.reward in ("model", "both"):
            require_setting(self.reward_model_path is not None, "reward_model_path", self.reward_model_path,
                    f"reward={self.reward} needs the checkpoint of a reward model (fastrm train-rm)")
        value = self.resolved_value_model()
        if self.advantage == "gae":
            require_setting(value != "none", "value_model", self.value_model,
                    "advantage=gae needs a critic: value_model=policy | reward | <reward-model checkpoint>")
        if value == "reward":
            require_setting(self.reward_model_path is not None, "value_model", self.value_model,
                    "value_model=reward needs reward_model_path")
        require_setting(self.num_minibatches <= self.batch_size * self.num_samples, "num_minibatches", self.num_minibatches,
                f"must be <= batch_size * num_samples = {self.batch_size * self.num_samples}")
        require_setting(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        require_setting(0 < self.top_p <= 1, "top_p", self.top_p, "must lie in (0, 1]")
        require_setting(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", self.min_new_tokens,
                        f"must lie in [0, max_new_tokens={self.max_new_tokens}]")
        require_setting(0 <= self.gamma <= 1, "gamma", self.gamma, "must lie in [0, 1]")
        require_setting(0 <= self.lam <= 1, "lam", self.lam, "must lie in [0, 1]")
        require_setting(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "must lie in (0, 1) (the ratio is clipped to "
                "[1 - clip_eps, 1 + clip_eps])")
        require_setting(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", self.clip_eps_high, "must be > 0")
        require_setting(self.dual_clip is None or self.dual_clip > 1, "dual_clip", self.dual_clip, "must be > 1 (or null)")
        require_setting(self.value_clip is None or self.value_clip >= 0, "value_clip", self.value_clip, "must be >= 0")
        require_setting(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        require_setting(self.kl_target > 0, "kl_target", self.kl_target, "must be > 0")
        require_setting(self.vf_coef >= 0, "vf_coef", self.vf_coef, "must be >= 0")
        require_setting(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0")
        require_setting(self.reward_clip is None or self.reward_clip > 0, "reward_clip", self.reward_clip, "must be > 0")
        require_setting(0 <= self.baseline_decay < 1, "baseline_decay", self.baseline_decay, "must lie in [0, 1)")
        require_setting(0 < self.curriculum_start <= 1, "curriculum_start", self.curriculum_start, "must lie in (0, 1]")
        require_setting(self.curriculum_steps >= 0, "curriculum_steps", self.curriculum_steps, "must be >= 0")
        require_setting(self.value_lr is None or (self.value_lr > 0 and math.isfinite(self.value_lr)), "value_lr",
                self.value_lr, "must be > 0 and finite")
        specs = self.reward_fn_specs()
        require_setting(len(specs) > 0 and all(isinstance(s, str) and s for s in specs), "reward_fn", self.reward_fn,
                "must be 'embedded', 'package.module:function' or a non-empty list of them")
        if self.reward_weights is not None:
            if self.reward_fn != EMBEDDED:  # else the functions may be given in Python: checked at setup
                require_setting(len(self.reward_weights) == len(specs), "reward_weights", self.reward_weights,
                        f"needs one weight per reward_fn function ({len(specs)})")
            require_setting(all(math.isfinite(w) for w in self.reward_weights), "reward_weights", self.reward_weights,
                    "must be finite")
        if self.ref_8bit:
            require_setting(not self.lora.enabled, "ref_8bit", self.ref_8bit,
                    "with lora.r > 0 the reference is the policy with its adapters disabled, not a copy to load in "
                    "8 bits; lora.quantize=8bit quantizes the weights they share")
            require_setting(self.model.name_or_path != TINY, "ref_8bit", self.ref_8bit,
                    "needs model.name_or_path to be a checkpoint (the reference is reloaded from it in 8 bits)")
        for name in ("ref_8bit", "reward_model_8bit"):
            require_setting(not getattr(self, name) or torch.cuda.is_available(), name, getattr(self, name),
                    "8-bit loading needs a CUDA device")
        require_setting(0 <= self.task_max_level <= base.MAX_TASK_LEVEL, "task_max_level", self.task_max_level,
                f"must lie in [0, {base.MAX_TASK_LEVEL}]")
        base.check_tokenizer(self.tokenizer, "tokenizer", tokenization.AUTO_TOKENIZER, EMBEDDED)
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

    def validate_policy_loss_options(self):
        """Issue #23's settings; resolves loss_type into loss_agg and policy_loss (config.yaml records both)."""
        self.loss_agg, self.policy_loss = resolve_loss_type(self.loss_type, self.loss_agg, self.policy_loss)
        require_setting(self.policy_loss in POLICY_LOSSES, "policy_loss", self.policy_loss,
                        "must be one of " + ", ".join(POLICY_LOSSES))
        require_setting(self.policy_loss == "ppo" or self.dual_clip is None, "dual_clip", self.dual_clip,
                        f"applies to policy_loss=ppo only, got policy_loss={self.policy_loss}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            value = getattr(self, name)
            if value is not None:
                require_setting(self.policy_loss == "sapo", name, value,
                                f"applies to policy_loss=sapo only, got policy_loss={self.policy_loss}")
                require_setting(value > 0 and math.isfinite(value), name, value, "must be > 0 and finite")
        require_setting(self.max_extra_draws >= 0, "max_extra_draws", self.max_extra_draws, "must be >= 0")
        if self.dynamic_sampling:
            require_setting(self.num_samples >= 2, "num_samples", self.num_samples,
                            "dynamic_sampling compares the samples of a prompt: needs num_samples >= 2")
        require_setting(0 <= self.overlong_buffer <= self.max_new_tokens, "overlong_buffer", self.overlong_buffer,
                        f"must lie in [0, max_new_tokens={self.max_new_tokens}]")
        require_setting(self.overlong_penalty >= 0 and math.isfinite(self.overlong_penalty), "overlong_penalty",
                        self.overlong_penalty, "must be >= 0 and finite")
        require_setting(self.rollout_correction in CORRECTIONS, "rollout_correction", self.rollout_correction,
                        "must be one of " + ", ".join(CORRECTIONS))
        require_setting(self.rollout_is_threshold > 1 and math.isfinite(self.rollout_is_threshold),
                        "rollout_is_threshold", self.rollout_is_threshold, "must be > 1 and finite")
        if self.rollout_is_threshold_lower is not None:
            require_setting(self.rollout_correction == "icepop", "rollout_is_threshold_lower",
                            self.rollout_is_threshold_lower,
                            "applies to rollout_correction=icepop only, got "
                            f"rollout_correction={self.rollout_correction}")
            require_setting(0 <= self.rollout_is_threshold_lower < 1, "rollout_is_threshold_lower",
                            self.rollout_is_threshold_lower, "must lie in [0, 1)")

    def reward_fn_specs(self) -> list:
        return list(self.reward_fn) if isinstance(self.reward_fn, (list, tuple)) else [self.reward_fn]

    def resolved_value_model(self) -> str:
        if self.value_model == "auto":
            return "policy" if self.advantage == "gae" else "none"
        return self.value_model
