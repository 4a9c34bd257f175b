"""RL building blocks the policy trainer (``fastrm.trainers.rl``) is made of, each usable on its own.

* Advantage estimators over a rollout batch of ``B = n_prompts * n`` sequences, the ``n`` samples of a
  prompt adjacent (rows ``i*n .. i*n+n-1``), as :func:`fastrm.generation.generate` returns them:

  ========================  ===============================================================================
  ``gae``                   GAE with a critic, the fused :func:`fastrm.compute_gae` (PPO)
  ``reinforce``             discounted return-to-go of the token rewards, no baseline (REINFORCE)
  ``reinforce_baseline``    the score minus a baseline (moving average of past batches, or this batch's mean)
  ``rloo``                  the score minus the mean score of the *other* n-1 samples of the same prompt
  ``grpo``                  (score - group mean) / (std + eps) over the n samples of a prompt; the std is the
                            group's, the whole batch's, or none (``scale_rewards`` group | batch | none)
  ``reinforce_pp``          REINFORCE++ (OpenRLHF ``reinforce``, verl ``reinforce_plus_plus``): the discounted
                            return-to-go of the token rewards, whitened over the batch's valid tokens
  ``reinforce_pp_baseline`` REINFORCE++-baseline (OpenRLHF ``reinforce_baseline``): the score minus its group's
                            mean first, then as ``reinforce_pp``
  ========================  ===============================================================================

  Token rewards are the per-token KL penalty ``-kl_coef * kl_t`` (zero when the KL is a loss term) plus
  the sequence score on the last valid token. The sequence-level estimators first replace the score by
  its baselined / normalised version, then take the discounted return-to-go like ``reinforce`` (the
  OpenRLHF convention), so the KL penalty still acts per token. verl's ``reinforce_plus_plus_baseline`` instead
  gives every token the sequence's total reward minus the group mean (no return-to-go) before whitening: the same
  advantages when no KL penalty is in the rewards (``kl_coef=0`` or the KL a loss term) and gamma = 1.
* Score shaping: :class:`RewardNormalizer` (batch or running standardisation) and clipping.
* KL controllers: :class:`FixedKLController`, :class:`AdaptiveKLController` (Ziegler et al. 2019, as TRL).
* :class:`CurriculumSampler`: prompts easy -> hard by a difficulty score, a pool that widens over training.

Everything with state has ``state_dict()`` / ``load_state_dict()`` so a resumed run continues exactly.

Under torchrun every batch statistic here (baseline mean, score normalisation, advantage whitening) is taken
over all ranks' rollouts, so it does not depend on how many processes share the batch; the group baselines
(rloo, grpo) need nothing: the n samples of a prompt are generated on the same rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

import fastrm
from fastrm import distributed

ESTIMATORS = ("gae", "reinforce", "reinforce_baseline", "rloo", "grpo", "reinforce_pp", "reinforce_pp_baseline")
# What GRPO divides the centred scores by (TRL's scale_rewards): the group's std, the batch's, or nothing.
SCALE_REWARDS = ("group", "batch", "none")
# Estimators whose baseline needs several samples of the same prompt.
GROUP_ESTIMATORS = ("rloo", "grpo", "reinforce_pp_baseline")
# Estimators whose definition ends in whitening over the batch's tokens (a trainer need not whiten them again).
WHITENED_ESTIMATORS = ("reinforce_pp", "reinforce_pp_baseline")


# ---------------------------------------------------------------------------------------------------------------
# token rewards and returns
# ---------------------------------------------------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row of a ``[B, T]`` mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, -1).max(dim=1).values.clamp_min(0)


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  kl_coef: float = 0.0) -> torch.Tensor:
    """``[B, T]`` rewards: ``-kl_coef * kl`` on valid tokens, plus ``scores[b]`` on row b's last valid token."""
    valid = mask != 0
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and kl_coef != 0:
        rewards = torch.where(valid, -kl_coef * kl.float(), rewards)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.float() * valid.any(dim=1)
    return rewards


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = sum_{k >= t, valid} gamma^(#valid steps between) r_k`` on valid tokens, 0 elsewhere.

    This is GAE with zero values and lambda = 1, so it runs on the fused :func:`fastrm.compute_gae`."""
    zeros = torch.zeros_like(rewards, dtype=torch.float32)
    advantages, _ = fastrm.compute_gae(rewards.float(), zeros, mask, gamma=gamma, lam=1.0)
    return advantages


# ---------------------------------------------------------------------------------------------------------------
# baselines on sequence scores
# ---------------------------------------------------------------------------------------------------------------


def _groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % n:
        raise ValueError(f"scores must be 1-D with a multiple of n={n} entries (n samples per prompt, adjacent), "
                         f"got shape {tuple(scores.shape)}")
    return scores.float().view(-1, n)


def rloo_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Leave-one-out: ``s_i - mean(s_j, j != i)`` within each group of n samples of a prompt (n >= 2)."""
    if n < 2:
        raise ValueError(f"rloo needs n >= 2 samples per prompt, got n={n}")
    g = _groups(scores, n)
    others = (g.sum(dim=1, keepdim=True) - g) / (n - 1)
    return (g - others).reshape(-1)


def grpo_scores(scores: torch.Tensor, n: int, eps: float = 1e-6, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO: ``(s_i - mean(group)) / (std + eps)``, TRL's ``scale_rewards``: ``"group"`` the std of the n samples
    of the prompt (DeepSeekMath), ``"batch"`` the std of every score of the batch (over all ranks; more robust
    when a group's scores are nearly equal), ``"none"`` no division (Dr. GRPO, centring only). Stds are
    unbiased, as TRL's and verl's."""
    if n < 2:
        raise ValueError(f"grpo needs n >= 2 samples per prompt, got n={n}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    g = _groups(scores, n)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        count, _, m2 = distributed.global_moments(g)
        centred = centred / ((m2 / (count - 1).clamp_min(1)).sqrt().float() + eps)
    return centred.reshape(-1)


def group_mean_scores(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``s_i - mean(group)``: the score minus the mean of the n samples of its prompt, itself included
    (REINFORCE++-baseline's baseline; n >= 2)."""
    if n < 2:
        raise ValueError(f"a group-mean baseline needs n >= 2 samples per prompt, got n={n}")
    g = _groups(scores, n)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


class MovingAverageBaseline:
    """REINFORCE baseline ``b``: ``"moving"`` — an exponential moving average of past batch-mean scores
    (``b <- decay * b + (1 - decay) * mean``; the batch is baselined by ``b`` from *before* it, so a sample
    never baselines itself; the first batch uses its own mean), or ``"batch"`` — this batch's mean."""

    def __init__(self, kind: str = "moving", decay: float = 0.9):
        if kind not in ("moving", "batch"):
            raise ValueError(f"baseline kind must be 'moving' or 'batch', got {kind!r}")
        if not 0 <= decay < 1:
            raise ValueError(f"baseline decay must lie in [0, 1), got {decay}")
        self.kind, self.decay, self.value = kind, decay, None

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Baselined scores; updates the moving average. The batch mean is over all ranks' scores."""
        mean = distributed.global_moments(scores)[1].item()
        if self.kind == "batch":
            return scores.float() - mean
        baseline = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return scores.float() - baseline

    def state_dict(self) -> dict:
        return {"kind": self.kind, "decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict):
        self.kind, self.decay, self.value = state["kind"], state["decay"], state["value"]


# ---------------------------------------------------------------------------------------------------------------
# the estimators
# ---------------------------------------------------------------------------------------------------------------


def compute_advantages(estimator: str, scores: torch.Tensor, mask: torch.Tensor, *, n: int = 1,
                       kl: torch.Tensor | None = None, kl_coef: float = 0.0, values: torch.Tensor | None = None,
                       gamma: float = 1.0, lam: float = 0.95, baseline: MovingAverageBaseline | None = None,
                       grpo_eps: float = 1e-6, scale_rewards: str = "group"):
    """``(advantages [B, T], returns [B, T] or None)`` for one rollout batch (see the module docstring).

    Args:
        scores: ``[B]`` sequence scores (after normalisation / clipping / penalties).
        mask: ``[B, T]`` completion mask (1 on generated tokens through EOS).
        n: samples per prompt (rows of a prompt adjacent); rloo, grpo and reinforce_pp_baseline need n >= 2.
        kl, kl_coef: per-token KL estimate and its coefficient when the KL is a reward penalty.
        values: ``[B, T]`` critic values (gae only; returns = advantages + values, the critic's target).
        baseline: state of ``reinforce_baseline`` (default: a fresh moving average, i.e. the batch mean).
        grpo_eps, scale_rewards: grpo's eps and what it divides by (see :func:`grpo_scores`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage estimator 'gae' needs values from a critic")
        rewards = token_rewards(scores, mask, kl, kl_coef)
        return fastrm.compute_gae(rewards, values.float(), mask, gamma=gamma, lam=lam)
    if estimator == "reinforce_baseline":
        scores = (baseline or MovingAverageBaseline())(scores)
    elif estimator == "rloo":
        scores = rloo_scores(scores, n)
    elif estimator == "grpo":
        scores = grpo_scores(scores, n, grpo_eps, scale_rewards)
    elif estimator == "reinforce_pp_baseline":
        scores = group_mean_scores(scores, n)
    rewards = token_rewards(scores, mask, kl, kl_coef)
    returns = discounted_returns(rewards, mask, gamma)
    if estimator in WHITENED_ESTIMATORS:
        return whiten_advantages(returns, mask), None
    return returns, None


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """:func:`fastrm.whiten` with the mean and (unbiased) variance over every rank's valid tokens; advantages
    come back unchanged when fewer than 2 tokens are valid in all (no variance to divide by)."""
    if distributed.world_size() == 1:
        return fastrm.whiten(advantages, mask, eps=eps) if int((mask != 0).sum()) >= 2 else advantages
    count, mean, m2 = distributed.global_moments(advantages, mask)
    if count < 2:
        return advantages
    scale = torch.rsqrt(m2 / (count - 1) + eps)
    return torch.where(mask != 0, (advantages.double() - mean) * scale, 0.0).to(advantages.dtype)


# ---------------------------------------------------------------------------------------------------------------
# score normalisation
# ---------------------------------------------------------------------------------------------------------------


class RewardNormalizer:
    """Standardise sequence scores: ``"none"``, ``"batch"`` (this batch's mean/std) or ``"running"``
    (mean/std of all scores seen so far, Welford / Chan merge, as TRL's RunningMoments), then clip to
    ``[-clip, clip]`` when ``clip`` is given."""

    def __init__(self, kind: str = "none", clip: float | None = None, eps: float = 1e-8):
        if kind not in ("none", "batch", "running"):
            raise ValueError(f"reward normalisation must be none, batch or running, got {kind!r}")
        if clip is not None and clip <= 0:
            raise ValueError(f"reward clip must be > 0 or None, got {clip}")
        self.kind, self.clip, self.eps = kind, clip, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """Normalised (and clipped) scores; batch statistics are over all ranks' scores."""
        x = scores.float()
        if self.kind == "batch":
            count, mean, m2 = distributed.global_moments(x)
            std = (m2 / (count - 1)).sqrt().item() if count > 1 else 1.0
            x = (x - mean.item()) / (std + self.eps)
        elif self.kind == "running":
            self.update(x)
            var = self.m2 / max(self.count - 1, 1)
            x = (x - self.mean) / (math.sqrt(var) + self.eps)
        if self.clip is not None:
            x = x.clamp(-self.clip, self.clip)
        return x

    def update(self, x: torch.Tensor):
        n, mean, m2 = (v.item() for v in distributed.global_moments(x))
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict):
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


# ---------------------------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int):
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict):
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient, as TRL's ``AdaptiveKLController``::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        coef *= 1 + error * n_steps / horizon

    so the coefficient grows while the measured KL is above ``target`` and shrinks while below.
    ``n_steps`` is the number of samples the KL was measured on (the rollout batch size)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int):
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict):
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


# ---------------------------------------------------------------------------------------------------------------
# curriculum
# ---------------------------------------------------------------------------------------------------------------


class CurriculumSampler:
    """Prompt batches from a pool that starts with the easiest prompts and widens to all of them.

    Prompts are ordered by ``difficulty`` (a list of numbers, or a function of the prompt, e.g. ``len``;
    ties keep the data order). At step ``s`` the pool is the easiest ``fraction(s)`` of them, where
    ``fraction`` goes from ``start_fraction`` to 1 over ``warmup_steps`` steps: ``"linear"`` growth, or
    ``"step"`` in ``num_stages`` equal stages. Each batch is drawn without replacement from the pool with a
    generator seeded by ``(seed, step)``, so the sampler's whole state is the step counter.
    """

    def __init__(self, prompts: Sequence, difficulty: Sequence[float] | Callable, batch_size: int, *,
                 start_fraction: float = 0.25, warmup_steps: int = 100, schedule: str = "linear",
                 num_stages: int = 4, seed: int = 0):
        if not prompts:
            raise ValueError("curriculum: no prompts")
        scores = [float(difficulty(p)) for p in prompts] if callable(difficulty) else [float(d) for d in difficulty]
        if len(scores) != len(prompts):
            raise ValueError(f"curriculum: {len(scores)} difficulty scores for {len(prompts)} prompts")
        if not 0 < start_fraction <= 1:
            raise ValueError(f"curriculum start_fraction must lie in (0, 1], got {start_fraction}")
        if schedule not in ("linear", "step"):
            raise ValueError(f"curriculum schedule must be linear or step, got {schedule!r}")
        if warmup_steps < 0 or num_stages < 1 or batch_size < 1:
            raise ValueError("curriculum: warmup_steps must be >= 0, num_stages and batch_size >= 1")
        self.order = sorted(range(len(prompts)), key=lambda i: (scores[i], i))  # easy -> hard, stable
        self.prompts, self.scores = list(prompts), scores
        self.batch_size, self.start_fraction, self.warmup_steps = batch_size, start_fraction, warmup_steps
        self.schedule, self.num_stages, self.seed = schedule, num_stages, seed
        self.step = 0

    def fraction(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return 1.0
        progress = step / self.warmup_steps
        if self.schedule == "step":
            progress = math.floor(progress * self.num_stages) / self.num_stages
        return self.start_fraction + (1.0 - self.start_fraction) * progress

    def pool_size(self, step: int | None = None) -> int:
        return max(1, min(len(self.order), math.ceil(self.fraction(step) * len(self.order))))

    def pool(self, step: int | None = None) -> list[int]:
        """Indices (into the prompts) of the current pool, easiest first."""
        return self.order[: self.pool_size(step)]

    def __iter__(self):
        return self

    def __next__(self) -> list:
        pool = self.pool()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        if len(pool) >= self.batch_size:
            picks = torch.randperm(len(pool), generator=generator)[: self.batch_size]
        else:  # a pool smaller than a batch: draw with replacement
            picks = torch.randint(len(pool), (self.batch_size,), generator=generator)
        self.last_indices = [pool[i] for i in picks.tolist()]
        self.last_pool = (self.fraction(), len(pool))
        self.step += 1
        return [self.prompts[i] for i in self.last_indices]

    def stats(self) -> dict:
        """What to log about the last batch: the pool's share and size it was drawn from, its mean difficulty."""
        last = getattr(self, "last_indices", [])
        mean = sum(self.scores[i] for i in last) / len(last) if last else float("nan")
        fraction, size = getattr(self, "last_pool", (self.fraction(), self.pool_size()))
        return {"curriculum/pool_fraction": fraction, "curriculum/pool_size": size,
                "curriculum/batch_difficulty": mean}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict):
        self.step = state["step"]
