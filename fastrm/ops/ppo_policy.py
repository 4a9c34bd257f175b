"""The PPO-family policy losses, fused forward and backward: ``ppo_policy_loss`` and its module form
``PPOPolicyLoss`` (aggregation modes: :mod:`fastrm.ops.ppo_common`).

Three surrogates (``policy_loss``): ``"ppo"``, the clipped ratio (PPO, GRPO, DAPO's clip-higher, GSPO with
``ratio_level="sequence"``); ``"cispo"``, the clipped, stop-gradient importance weight on the log-prob
(MiniMax-M1's CISPO): every token keeps a gradient, the weight is only bounded from above; ``"sapo"``, a smooth
sigmoid gate of the ratio instead of the hard clip (Qwen's SAPO).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fastrm._checks import check_choice
from fastrm._dispatch import resolve_backend
from fastrm.kernels import ppo as ppo_kernels
from fastrm.ops.ppo_common import (
    AGG_MODES,
    _acc_dtype,
    _check_loss_scale_factor,
    _check_tensors,
    _check_values,
    _FusedLoss,
    _real,
    _scale_factor,
)

RATIO_LEVELS = ("token", "sequence")
POLICY_LOSSES = ("ppo", "cispo", "sapo")
SAPO_TAUS = (1.0, 1.05)  # the SAPO paper's (and TRL's, verl's) default temperatures for A > 0 and A <= 0


class PolicyLossOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. logprobs) and detached float32 metrics, token means over valid tokens."""

    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction where the clipped branch is active (pg2 > pg1, as verl); cispo: ratio > bound;
    # sapo: 0 (no hard clip)
    approx_kl: torch.Tensor  # mean of k3 = (ratio - 1) - log ratio
    ratio_mean: torch.Tensor  # mean of ratio
    clipfrac_lower: torch.Tensor  # fraction where the dual clip is active (0 without dual_clip)


def _check_clip_eps(op: str, clip_eps, clip_eps_high):
    clip_eps = _real(op, "clip_eps", clip_eps)
    if not 0.0 <= clip_eps < 1.0:
        raise ValueError(f"{op}: clip_eps must lie in [0, 1), got {clip_eps}")
    clip_eps_high = _real(op, "clip_eps_high", clip_eps_high, allow_none=True)
    if clip_eps_high is None:
        clip_eps_high = clip_eps
    elif clip_eps_high < 0.0:
        raise ValueError(f"{op}: clip_eps_high must be >= 0, got {clip_eps_high}")
    return clip_eps, clip_eps_high


def _check_policy_loss_options(op: str, policy_loss: str, dual_clip, sapo_tau_pos, sapo_tau_neg):
    """dual_clip only with ppo; the SAPO temperatures (None: the defaults) only with sapo, each > 0."""
    if policy_loss != "ppo" and dual_clip is not None:
        raise ValueError(f"{op}: dual_clip applies to policy_loss='ppo' only; got dual_clip={dual_clip} with "
                         f"policy_loss={policy_loss!r}")
    taus = []
    for name, tau, default in (("sapo_tau_pos", sapo_tau_pos, SAPO_TAUS[0]), ("sapo_tau_neg", sapo_tau_neg, SAPO_TAUS[1])):
        tau = _real(op, name, tau, allow_none=True)
        if tau is not None and policy_loss != "sapo":
            raise ValueError(f"{op}: {name} applies to policy_loss='sapo' only, got {name}={tau} with "
                             f"policy_loss={policy_loss!r}")
        if tau is not None and not tau > 0:
            raise ValueError(f"{op}: {name} must be > 0, got {tau}")
        taus.append(default if tau is None else tau)
    return tuple(taus)


def _check_dual_clip(op: str, dual_clip):
    dual_clip = _real(op, "dual_clip", dual_clip, allow_none=True)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"{op}: dual_clip must be > 1 (a ratio bound; None disables it), got {dual_clip}")
    return dual_clip


# ----------------------------------------------------------------------------------------------
# ppo_policy_loss
# ----------------------------------------------------------------------------------------------


def _policy_terms_torch(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, dual_clip, write_grads,
                        seq_ratio=False, cispo=False, sapo_taus=None):
    """Plain PyTorch twin of ``_ppo_policy_fwd_kernel``: per-row sums [6, B] and d loss_t / d logprobs_t."""
    acc = _acc_dtype(logprobs.dtype)
    valid = mask if mask.dtype == torch.bool else mask != 0
    # Replace masked positions before any arithmetic, so NaN/inf there reach neither sums nor gradients.
    logp = torch.where(valid, logprobs.detach().to(acc), 0)
    old = torch.where(valid, old_logprobs.detach().to(acc), 0)
    adv = torch.where(valid, advantages.detach().to(acc), 0)
    raw = logp - old
    if seq_ratio:  # GSPO: the row's mean log-ratio for every token, clamped from above only (as verl)
        c = ppo_kernels.SEQ_LOG_RATIO_MAX
        raw = (raw.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp_min(1)).expand_as(raw)
        log_ratio = raw.clamp(max=c)
        outside_clamp = raw > c
    else:
        c = ppo_kernels.LOG_RATIO_CLAMP
        log_ratio = raw.clamp(-c, c)
        outside_clamp = (raw < -c) | (raw > c)
    ratio = log_ratio.exp()
    if cispo:
        return _cispo_terms(logp, adv, valid, ratio, log_ratio, 1.0 + clip_eps_high, acc, write_grads)
    if sapo_taus is not None:
        return _sapo_terms(adv, valid, ratio, log_ratio, outside_clamp, sapo_taus, acc, write_grads)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    loss = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    grad = torch.where(clipped | outside_clamp, 0.0, pg1) if write_grads else None
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual = (adv < 0) & (loss > pg3)
        loss = torch.where(dual, pg3, loss)
        if write_grads:
            grad = torch.where(dual, 0.0, grad)
        dual_count = (dual & valid).sum(dim=1)
    else:
        dual_count = torch.zeros(valid.shape[0], dtype=acc, device=valid.device)
    stats = torch.stack([
        torch.where(valid, loss, 0).sum(dim=1),
        valid.sum(dim=1).to(acc),
        (clipped & valid).sum(dim=1).to(acc),
        dual_count.to(acc),
        torch.where(valid, (ratio - 1) - log_ratio, 0).sum(dim=1),
        torch.where(valid, ratio, 0).sum(dim=1),
    ])
    if write_grads:
        grad = torch.where(valid, grad, 0)
    return stats, grad


def _cispo_terms(logp, adv, valid, ratio, log_ratio, bound, acc, write_grads):
    """CISPO's per-row sums and d loss_t / d logprobs_t: the weight ``min(ratio, bound)`` is a constant."""
    weight = ratio.clamp(max=bound)
    grad = -adv * weight
    truncated = (ratio > bound) & valid
    stats = torch.stack([
        torch.where(valid, grad * logp, 0).sum(dim=1),
        valid.sum(dim=1).to(acc),
        truncated.sum(dim=1).to(acc),
        torch.zeros(valid.shape[0], dtype=acc, device=valid.device),
        torch.where(valid, (ratio - 1) - log_ratio, 0).sum(dim=1),
        torch.where(valid, ratio, 0).sum(dim=1),
    ])
    return stats, (torch.where(valid, grad, 0) if write_grads else None)


def _sapo_terms(adv, valid, ratio, log_ratio, outside_clamp, taus, acc, write_grads):
    """SAPO's per-row sums and d loss_t / d logprobs_t = -A * 4 * sigma * (1 - sigma) * ratio (d ratio / d logp =
    ratio; 0 where the log-ratio clamp is active)."""
    tau = torch.where(adv > 0, taus[0], taus[1]).to(acc)
    gate = torch.sigmoid(tau * (ratio - 1))
    loss = -adv * gate * (4 / tau)
    zeros = torch.zeros(valid.shape[0], dtype=acc, device=valid.device)
    stats = torch.stack([
        torch.where(valid, loss, 0).sum(dim=1),
        valid.sum(dim=1).to(acc),
        zeros,
        zeros,
        torch.where(valid, (ratio - 1) - log_ratio, 0).sum(dim=1),
        torch.where(valid, ratio, 0).sum(dim=1),
    ])
    if not write_grads:
        return stats, None
    grad = torch.where(outside_clamp, 0.0, -adv * 4 * gate * (1 - gate) * ratio)
    return stats, torch.where(valid, grad, 0)


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    ratio_level: str = "token",
    loss_scale_factor: float | None = None,
    policy_loss: str = "ppo",
    sapo_tau_pos: float | None = None,
    sapo_tau_neg: float | None = None,
    backend: str | None = None,
) -> PolicyLossOutput:
    """PPO clipped policy loss (with optional asymmetric clip and dual clip), fused forward and backward.

    Per valid token, with ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))``::

        loss_t = max(-A * ratio, -A * clamp(ratio, 1 - clip_eps, 1 + clip_eps_high))
        loss_t = min(loss_t, -A * dual_clip)      where A < 0, if dual_clip is set

    then aggregated by ``agg`` (see the module docstring). On valid tokens this is exactly verl's vanilla
    ``compute_policy_loss`` (``cliprange_low/high`` = ``clip_eps``/``clip_eps_high``, ``clip_ratio_c`` =
    ``dual_clip``) and, for token-mean without dual clip, TRL's PPO policy loss.

    ``ratio_level="sequence"`` is GSPO (verl's ``compute_policy_loss_gspo``; TRL's
    ``importance_sampling_level="sequence"``): every token of a row takes the row's ratio
    ``exp(min(mean over its valid tokens of (logprobs - old_logprobs), 10))``, and token t's gradient is
    ``-A_t * ratio`` (verl's stop-gradient form), so per-token advantages still weight each token.

    ``policy_loss="cispo"`` is CISPO (MiniMax-M1, arXiv:2506.13585; TRL's ``loss_type="cispo"``)::

        loss_t = -sg(min(ratio, 1 + clip_eps_high)) * A * logprobs      d loss_t / d logprobs_t = -min(...) * A

    with ``ratio`` as above (token or sequence level; the log-ratio clamp only bounds the weight). No token
    loses its gradient; ``clip_eps`` (a lower bound) and ``dual_clip`` do not apply (dual_clip must be None).
    TRL's ``epsilon_high`` there is the bound itself (``clamp(ratio, max=epsilon_high)``, 5.0 recommended):
    ``clip_eps_high = epsilon_high - 1``. verl's ``loss_mode="cispo"`` also clips from below at
    ``1 - clip_ratio_low``; this does not. ``clipfrac`` is the fraction of valid tokens whose weight was
    truncated (ratio > bound); ``clipfrac_lower`` is 0.

    ``policy_loss="sapo"`` is SAPO (Soft Adaptive Policy Optimization, arXiv:2511.20347; TRL's ``loss_type="sapo"``,
    verl's ``loss_mode="sapo"``): a sigmoid gate instead of the hard clip, with ``tau = sapo_tau_pos`` where
    ``A > 0`` and ``sapo_tau_neg`` elsewhere (defaults 1.0 and 1.05, the paper's)::

        loss_t = -A * sigmoid(tau * (ratio - 1)) * 4 / tau     d loss_t / d logprobs_t = -A * 4 s (1 - s) * ratio

    (``s`` the sigmoid; 0 where the log-ratio clamp is active). ``clipfrac`` and ``clipfrac_lower`` are 0.

    Args:
        logprobs: [B, T] float (float32 / bfloat16 / float16; float64 on the PyTorch path): log-probs of
            the taken tokens under the current policy. The only input that gets a gradient.
        old_logprobs, advantages: [B, T], logprobs' dtype. Data: treated as constants (no gradient flows
            to them even if they require grad).
        mask: [B, T] bool or 0/1 numbers; 1 marks valid tokens. Masked positions may hold anything (even
            NaN): they are never read into a result.
        clip_eps: in [0, 1). clip_eps_high: upper clip (>= 0), defaults to clip_eps.
        dual_clip: None, or a ratio bound > 1 (verl's clip_ratio_c, 3.0 there).
        agg: ``"token-mean"`` | ``"seq-mean-token-mean"`` | ``"seq-mean-token-sum"`` |
            ``"seq-mean-token-sum-norm"``. In the seq-mean modes rows with no valid token are left out of the
            mean over rows.
        ratio_level: ``"token"`` (PPO) | ``"sequence"`` (GSPO).
        loss_scale_factor: the divisor of ``"seq-mean-token-sum-norm"`` (> 0; default: T). Only with that mode.
        policy_loss: ``"ppo"`` (the clipped ratio) | ``"cispo"`` (the clipped stop-gradient weight) | ``"sapo"``
            (the sigmoid gate).
        sapo_tau_pos, sapo_tau_neg: SAPO's temperatures (> 0; None: 1.0 and 1.05). Only with ``policy_loss="sapo"``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (default: ``$FASTRM_BACKEND`` or auto).

    Returns:
        ``PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean, clipfrac_lower)``: the loss is float32
        (float64 for float64 inputs), its gradient comes back in logprobs' dtype; the metrics are detached
        float32 token means over valid tokens (approx_kl of k3 = (ratio - 1) - log ratio).

    Raises:
        ValueError naming ``mask`` when no token is valid, or naming an input holding NaN/inf on a valid
        position (value checks, skipped with ``FASTRM_CHECK_VALUES=0``: then an all-masked batch gives
        loss 0 and zero gradients).
    """
    op = "ppo_policy_loss"
    tensors = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
    _check_tensors(op, tensors, mask)
    clip_eps, clip_eps_high = _check_clip_eps(op, clip_eps, clip_eps_high)
    dual_clip = _check_dual_clip(op, dual_clip)
    check_choice(op, "agg", agg, AGG_MODES)
    check_choice(op, "ratio_level", ratio_level, RATIO_LEVELS)
    check_choice(op, "policy_loss", policy_loss, POLICY_LOSSES)
    sapo_taus = _check_policy_loss_options(op, policy_loss, dual_clip, sapo_tau_pos, sapo_tau_neg)
    loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
    impl = resolve_backend(backend, logprobs.device, op, logprobs.dtype, "logprobs")
    _check_values(op, tensors, mask)

    write_grads = torch.is_grad_enabled() and logprobs.requires_grad
    seq_ratio, cispo = ratio_level == "sequence", policy_loss == "cispo"
    sapo_taus = sapo_taus if policy_loss == "sapo" else None
    if impl == "triton":
        stats, grad = ppo_kernels.ppo_policy_fwd(
            logprobs.detach(), old_logprobs.detach(), advantages.detach(), mask,
            clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, write_grads=write_grads,
            seq_ratio=seq_ratio, cispo=cispo, sapo=sapo_taus is not None,
            sapo_tau_pos=sapo_taus[0] if sapo_taus else 1.0, sapo_tau_neg=sapo_taus[1] if sapo_taus else 1.0,
        )
    else:
        stats, grad = _policy_terms_torch(
            logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, dual_clip, write_grads, seq_ratio,
            cispo, sapo_taus,
        )
    # stats rows: loss, count, clipped, dual_clipped, approx_kl, ratio -> metrics in that order.
    factor = _scale_factor(agg, loss_scale_factor, logprobs.shape[1])
    loss, clipfrac, dual_frac, approx_kl, ratio_mean = _FusedLoss.apply(logprobs, stats, grad, agg, factor)
    return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean, dual_frac)



class PPOPolicyLoss(nn.Module):
    """Module form of :func:`ppo_policy_loss`; ``forward(logprobs, old_logprobs, advantages, mask)``."""

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                 agg: str = "token-mean", ratio_level: str = "token", loss_scale_factor: float | None = None,
                 policy_loss: str = "ppo", sapo_tau_pos: float | None = None, sapo_tau_neg: float | None = None,
                 backend: str | None = None):
        super().__init__()
        op = "PPOPolicyLoss"
        self.clip_eps, high = _check_clip_eps(op, clip_eps, clip_eps_high)
        self.clip_eps_high = None if clip_eps_high is None else high
        self.dual_clip = _check_dual_clip(op, dual_clip)
        self.agg = check_choice(op, "agg", agg, AGG_MODES)
        self.ratio_level = check_choice(op, "ratio_level", ratio_level, RATIO_LEVELS)
        self.policy_loss = check_choice(op, "policy_loss", policy_loss, POLICY_LOSSES)
        _check_policy_loss_options(op, policy_loss, self.dual_clip, sapo_tau_pos, sapo_tau_neg)
        self.sapo_tau_pos, self.sapo_tau_neg = sapo_tau_pos, sapo_tau_neg
        self.loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
        self.backend = backend

    def forward(self, logprobs, old_logprobs, advantages, mask) -> PolicyLossOutput:
        return ppo_policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip, agg=self.agg, ratio_level=self.ratio_level,
            loss_scale_factor=self.loss_scale_factor, policy_loss=self.policy_loss, sapo_tau_pos=self.sapo_tau_pos,
            sapo_tau_neg=self.sapo_tau_neg, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, "
                f"agg={self.agg!r}, ratio_level={self.ratio_level!r}, policy_loss={self.policy_loss!r}, "
                f"backend={self.backend!r}")

