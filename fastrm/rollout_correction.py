"""Rollout-trainer mismatch correction: the sampler's log-probs (``pi_rollout``, what ``generate`` sampled from)
differ from the trainer's own log-probs of the same tokens under the same weights (``pi_old``: another kernel,
another precision, or a sampler-side transform such as top-p), so the rollouts are slightly off-policy. Per
valid token, with ``ratio = pi_old / pi_rollout = exp(clamp(old_logprobs - sampler_logprobs, -20, 20))``:

* ``"tis"``, truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"; verl's ``rollout_is=token`` with ``rollout_is_threshold``, TRL's
  ``vllm_importance_sampling_mode="token_truncate"``): weight ``min(ratio, C)``;
* ``"icepop"`` (Ling team, IcePop; TRL's ``"token_mask"``): weight ``ratio`` where ``C_low <= ratio <= C``,
  0 elsewhere: a token sampled where the two engines disagree that much gets no gradient at all.

The weight is a constant (stop-gradient) that multiplies the token's policy loss. Since it is >= 0 it can be
folded into the advantage, ``w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r))`` (and likewise for the
dual clip and CISPO), which is how the trainer applies it: the fused losses stay as they are. Aggregation
denominators still count every valid token (TRL's convention); a zero-weighted token counts as unclipped.
"""

from __future__ import annotations

import torch

CORRECTIONS = ("none", "tis", "icepop")
LOG_RATIO_CLAMP = 20.0


def correction_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, mode: str,
                       threshold: float, threshold_lower: float | None = None) -> tuple[torch.Tensor, dict]:
    """``(weights [B, T] float32, 0 where masked; metrics)`` for ``mode`` ``"tis"`` or ``"icepop"``.

    ``threshold`` is C (> 1); ``threshold_lower`` icepop's lower bound (default 1 / C). Metrics (token means over
    the valid tokens): ``rollout_correction/abs_logp_diff`` (mean |old_logprobs - sampler_logprobs|),
    ``/ratio`` (mean pi_old / pi_rollout), ``/truncated_fraction`` (tis: ratio > C) or ``/masked_fraction``
    (icepop: ratio outside [C_low, C]), ``/weight`` (mean weight)."""
    if mode not in ("tis", "icepop"):
        raise ValueError(f"rollout correction mode must be 'tis' or 'icepop', got {mode!r}")
    if not threshold > 1:
        raise ValueError(f"rollout correction threshold must be > 1, got {threshold}")
    low = 1.0 / threshold if threshold_lower is None else threshold_lower
    if not 0 <= low < 1:
        raise ValueError(f"rollout correction threshold_lower must lie in [0, 1), got {threshold_lower}")
    if old_logprobs.shape != sampler_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)}, sampler_logprobs "
                         f"{tuple(sampler_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape")
    valid = mask != 0
    diff = torch.where(valid, old_logprobs.float() - sampler_logprobs.float(), 0.0)
    ratio = diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    count = valid.sum().clamp_min(1)
    if mode == "tis":
        outside = ratio > threshold
        weights = ratio.clamp(max=threshold)
        name = "rollout_correction/truncated_fraction"
    else:
        outside = (ratio < low) | (ratio > threshold)
        weights = torch.where(outside, 0.0, ratio)
        name = "rollout_correction/masked_fraction"
    weights = torch.where(valid, weights, 0.0)
    metrics = {"rollout_correction/abs_logp_diff": diff.abs().sum() / count,
               "rollout_correction/ratio": torch.where(valid, ratio, 0.0).sum() / count,
               name: (outside & valid).sum() / count,
               "rollout_correction/weight": weights.sum() / count}
    return weights, metrics
