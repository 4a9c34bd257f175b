"""PPO losses with fused forward + backward: ``ppo_policy_loss``, ``value_loss`` and ``kl_penalty``,
and their module forms ``PPOPolicyLoss``, ``ValueLoss``, ``KLPenalty``.

The two clipped losses compute the per-token gradient in the forward pass (either backend: the Triton
kernels in ``fastrm.kernels.ppo``, or the same arithmetic in plain PyTorch), together with per-row
partial sums; aggregating over the batch is then a handful of [B]-sized ops, and the backward is a scale
of the saved [B, T] gradient by grad_output and its row's aggregation weight. Autograd keeps that one
float32 [B, T] tensor (float64 for float64 inputs) instead of the dozen intermediates of the eager formula.
Exact ties between branches (measure zero) count as unclipped; torch's max/min would split the gradient.

Aggregation modes (``agg``), over valid tokens (mask 1):

* ``"token-mean"``: sum of all valid tokens' losses / number of valid tokens (row weight 1 / sum(mask)).
* ``"seq-mean-token-mean"``: mean over rows of each row's token mean (weight 1 / (n_rows * count_b)).
* ``"seq-mean-token-sum"``: mean over rows of each row's token sum (weight 1 / n_rows).
* ``"seq-mean-token-sum-norm"``: seq-mean-token-sum divided by ``loss_scale_factor`` (default: T, the padded
  length), verl's mode; with a constant factor (e.g. the maximum completion length) it is Dr. GRPO's
  normaliser (weight 1 / (n_rows * factor)).

In the seq-mean modes ``n_rows`` counts only rows with at least one valid token: a row with none is left
out (verl would give NaN for seq-mean-token-mean and count the empty row in seq-mean-token-sum). A batch
with no valid token at all is a ValueError naming ``mask``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastrm._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_binary_mask,
    check_choice,
    check_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
    require,
    value_checks_enabled,
)
from fastrm._dispatch import resolve_backend
from fastrm.kernels import ppo as ppo_kernels

__all__ = [
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "PPOPolicyLoss",
    "ValueLoss",
    "KLPenalty",
    "PolicyLossOutput",
    "ValueLossOutput",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = tuple(ppo_kernels.KL_KINDS) + tuple(ppo_kernels.KL_STRAIGHT_THROUGH)
RATIO_LEVELS = ("token", "sequence")
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INT_DTYPES


class PolicyLossOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. logprobs) and detached float32 metrics, token means over valid tokens."""

    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction where the clipped branch is active (pg2 > pg1, as verl)
    approx_kl: torch.Tensor  # mean of k3 = (ratio - 1) - log ratio
    ratio_mean: torch.Tensor  # mean of ratio
    clipfrac_lower: torch.Tensor  # fraction where the dual clip is active (0 without dual_clip)


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction where the clipped squared error is the (strictly) larger one


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss / accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _real(op: str, name: str, value, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "None or a real number" if allow_none else "a real number"
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


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


def _check_dual_clip(op: str, dual_clip):
    dual_clip = _real(op, "dual_clip", dual_clip, allow_none=True)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"{op}: dual_clip must be > 1 (a ratio bound; None disables it), got {dual_clip}")
    return dual_clip


def _check_loss_scale_factor(op: str, agg: str, loss_scale_factor):
    """None, or (with agg='seq-mean-token-sum-norm' only) a finite number > 0."""
    loss_scale_factor = _real(op, "loss_scale_factor", loss_scale_factor, allow_none=True)
    if loss_scale_factor is None:
        return None
    if agg != "seq-mean-token-sum-norm":
        raise ValueError(f"{op}: loss_scale_factor only applies to agg='seq-mean-token-sum-norm', got agg={agg!r}")
    if not loss_scale_factor > 0:
        raise ValueError(f"{op}: loss_scale_factor must be > 0, got {loss_scale_factor}")
    return loss_scale_factor


def _check_value_clip(op: str, clip):
    clip = _real(op, "clip", clip, allow_none=True)
    if clip is not None and clip < 0.0:
        raise ValueError(f"{op}: clip must be >= 0 (None disables clipping), got {clip}")
    return clip


def _check_tensors(op: str, tensors: dict, mask):
    """Metadata checks: [B, T] float tensors of one shape and dtype (the first names the reference), and
    a [B, T] mask of bool or numbers, all on one device. No broadcasting."""
    items = list(tensors.items())
    ref_name, ref = items[0]
    for name, x in items:
        check_tensor(op, name, x, dtypes=FLOAT_DTYPES, ndim=2)
    for name, x in items[1:]:
        check_same_shape(op, name, x, ref_name, ref)
        if x.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")
    if mask is not None:
        check_tensor(op, "mask", mask, dtypes=MASK_DTYPES, ndim=2)
        check_same_shape(op, "mask", mask, ref_name, ref)
    check_same_device(op, {**tensors, "mask": mask})


def _check_values(op: str, tensors: dict, mask):
    """Value checks (no sync on a GPU, see fastrm._checks; skipped with FASTRM_CHECK_VALUES=0). With a mask:
    it is 0/1 and selects at least one position, and every tensor is finite where mask is 1 (masked
    positions may hold anything). Without one: every tensor is finite."""
    if not value_checks_enabled():
        return
    if mask is None:
        for name, x in tensors.items():
            check_finite(op, name, x.detach())
        return
    check_binary_mask(op, "mask", mask)
    valid = mask if mask.dtype == torch.bool else mask != 0
    require(valid.any(), f"{op}: mask has no valid position (all zeros); the loss would be a mean over nothing")
    for name, x in tensors.items():
        check_finite(op, name, torch.where(valid, x.detach(), 0), hint=" at a position where mask is 1")


# ----------------------------------------------------------------------------------------------
# Aggregation and the shared autograd Function
# ----------------------------------------------------------------------------------------------


def row_weights(count: torch.Tensor, agg: str, loss_scale_factor: float = 1.0) -> torch.Tensor:
    """Weight w_b of each row in ``loss = sum_b w_b * (row b's sum of token losses)``; 0 for empty rows.
    ``count [B]`` holds the rows' valid-token counts; ``loss_scale_factor`` divides seq-mean-token-sum-norm.

    Denominators are clamped to 1, so with value checks off an all-masked batch gives loss 0 and zero
    gradients rather than NaN.
    """
    nonempty = count > 0
    if agg == "token-mean":
        return (1.0 / count.sum().clamp_min(1)).expand(count.shape)
    n_rows = nonempty.sum().to(count.dtype).clamp_min(1)
    if agg == "seq-mean-token-mean":
        return torch.where(nonempty, 1.0 / (count.clamp_min(1) * n_rows), 0.0)
    if agg == "seq-mean-token-sum-norm":
        return torch.where(nonempty, 1.0 / (n_rows * loss_scale_factor), 0.0)
    return torch.where(nonempty, 1.0 / n_rows, 0.0)  # seq-mean-token-sum


class _FusedLoss(torch.autograd.Function):
    """A masked, row-aggregated loss whose per-token gradient was computed in the forward pass.

    ``stats`` are per-row sums [N, B] (row 0 the loss, row 1 the mask count, then counted/summed metrics);
    ``grad`` the [B, T] d loss_t / d x_t (or None when no gradient is needed). Returns the loss and the
    token means of ``stats[2:]`` (float32, detached). The input ``x`` is only here so that autograd
    connects the output to it.
    """

    @staticmethod
    def forward(ctx, x, stats, grad, agg, loss_scale_factor):
        loss_rows, count = stats[0], stats[1]
        weights = row_weights(count, agg, loss_scale_factor)
        loss = (loss_rows * weights).sum()
        total = count.sum(dtype=torch.float64).clamp_min(1)
        metrics = tuple((s.sum(dtype=torch.float64) / total).to(torch.float32) for s in stats[2:])
        ctx.mark_non_differentiable(*metrics)
        ctx.save_for_backward(grad, weights)
        ctx.dtype = x.dtype
        return (loss,) + metrics

    @staticmethod
    @once_differentiable  # the backward is a scale of a saved tensor: no second derivative
    def backward(ctx, grad_loss, *grad_metrics):
        grad, weights = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        scale = grad_loss.to(grad.dtype) * weights  # [B]
        # Out of place: the saved buffer stays intact for a second backward (retain_graph).
        return (grad * scale[:, None]).to(ctx.dtype), None, None, None, None


def _scale_factor(agg: str, loss_scale_factor, T: int) -> float:
    """The divisor of seq-mean-token-sum-norm (T unless given); 1 for the other modes."""
    if agg != "seq-mean-token-sum-norm":
        return 1.0
    return float(T) if loss_scale_factor is None else loss_scale_factor


# ----------------------------------------------------------------------------------------------
# ppo_policy_loss
# ----------------------------------------------------------------------------------------------


def _policy_terms_torch(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, dual_clip, write_grads,
                        seq_ratio=False):
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
    loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
    impl = resolve_backend(backend, logprobs.device, op, logprobs.dtype, "logprobs")
    _check_values(op, tensors, mask)

    write_grads = torch.is_grad_enabled() and logprobs.requires_grad
    seq_ratio = ratio_level == "sequence"
    if impl == "triton":
        stats, grad = ppo_kernels.ppo_policy_fwd(
            logprobs.detach(), old_logprobs.detach(), advantages.detach(), mask,
            clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip, write_grads=write_grads,
            seq_ratio=seq_ratio,
        )
    else:
        stats, grad = _policy_terms_torch(
            logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, dual_clip, write_grads, seq_ratio
        )
    # stats rows: loss, count, clipped, dual_clipped, approx_kl, ratio -> metrics in that order.
    factor = _scale_factor(agg, loss_scale_factor, logprobs.shape[1])
    loss, clipfrac, dual_frac, approx_kl, ratio_mean = _FusedLoss.apply(logprobs, stats, grad, agg, factor)
    return PolicyLossOutput(loss, clipfrac, approx_kl, ratio_mean, dual_frac)


# ----------------------------------------------------------------------------------------------
# value_loss
# ----------------------------------------------------------------------------------------------


def _value_terms_torch(values, old_values, returns, mask, clip, write_grads):
    """Plain PyTorch twin of ``_value_loss_fwd_kernel``: per-row sums [3, B] and d loss_t / d values_t."""
    acc = _acc_dtype(values.dtype)
    valid = mask if mask.dtype == torch.bool else mask != 0
    v = torch.where(valid, values.detach().to(acc), 0)
    ret = torch.where(valid, returns.detach().to(acc), 0)
    err = v - ret
    sq = err * err
    grad = err if write_grads else None
    if clip is not None:
        old = torch.where(valid, old_values.detach().to(acc), 0)
        err_c = torch.minimum(torch.maximum(v, old - clip), old + clip) - ret
        sq_c = err_c * err_c
        clipped = (sq_c > sq) & valid
        sq = torch.maximum(sq, sq_c)
        if write_grads:
            grad = torch.where(clipped, 0.0, grad)
        clipped_count = clipped.sum(dim=1).to(acc)
    else:
        clipped_count = torch.zeros(valid.shape[0], dtype=acc, device=valid.device)
    stats = torch.stack([torch.where(valid, 0.5 * sq, 0).sum(dim=1), valid.sum(dim=1).to(acc), clipped_count])
    if write_grads:
        grad = torch.where(valid, grad, 0)
    return stats, grad


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
    backend: str | None = None,
) -> ValueLossOutput:
    """PPO clipped value loss, fused forward and backward.

    Per valid token::

        clipped_t = clamp(values, old_values - clip, old_values + clip)   (= old + clamp(values - old, ±clip))
        loss_t    = 0.5 * max((values - returns)^2, (clipped_t - returns)^2)

    aggregated by ``agg`` (see the module docstring). For token-mean this is exactly TRL's PPO value loss
    (``0.5 * masked_mean(max(vf_losses1, vf_losses2))``) and verl's ``compute_value_loss``.

    Args:
        values: [B, T] float (float32 / bfloat16 / float16; float64 on the PyTorch path): the value head's
            predictions. The only input that gets a gradient.
        old_values, returns: [B, T], values' dtype; data, treated as constants. ``old_values`` is not read
            when ``clip`` is None (it is still checked).
        mask: [B, T] bool or 0/1 numbers; masked positions may hold anything.
        clip: >= 0, or None for the unclipped loss 0.5 * (values - returns)^2.
        agg, loss_scale_factor, backend: as in :func:`ppo_policy_loss`.

    Returns:
        ``ValueLossOutput(loss, clipfrac)``: the loss is float32 (float64 for float64 inputs), its gradient
        in values' dtype; clipfrac is the detached float32 fraction of valid tokens where the clipped
        squared error is strictly larger (verl's ``gt(vf_losses2, vf_losses1)``; 0 when clip is None).
    """
    op = "value_loss"
    tensors = {"values": values, "old_values": old_values, "returns": returns}
    _check_tensors(op, tensors, mask)
    clip = _check_value_clip(op, clip)
    check_choice(op, "agg", agg, AGG_MODES)
    loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
    impl = resolve_backend(backend, values.device, op, values.dtype, "values")
    _check_values(op, tensors, mask)

    write_grads = torch.is_grad_enabled() and values.requires_grad
    if impl == "triton":
        stats, grad = ppo_kernels.value_loss_fwd(
            values.detach(), old_values.detach(), returns.detach(), mask, clip=clip, write_grads=write_grads
        )
    else:
        stats, grad = _value_terms_torch(values, old_values, returns, mask, clip, write_grads)
    loss, clipfrac = _FusedLoss.apply(values, stats, grad, agg, _scale_factor(agg, loss_scale_factor, values.shape[1]))
    return ValueLossOutput(loss, clipfrac)


# ----------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------


class _KLPenaltyTriton(torch.autograd.Function):
    """Arguments as the ``fastrm::kl_penalty_fwd`` custom op's, whose autograd is this Function's (registered
    below), so ``torch.ops.fastrm.kl_penalty_fwd`` is differentiable on its own too."""

    @staticmethod
    def forward(logprobs, ref_logprobs, kind, block_t=None):
        return ppo_kernels.kl_penalty_fwd(logprobs, ref_logprobs, kind, block_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logprobs, ref_logprobs, kind = inputs[:3]
        ctx.save_for_backward(logprobs, ref_logprobs)
        ctx.kind = kind

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logprobs, ref_logprobs = ctx.saved_tensors
        need_logp, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nones = (None,) * (len(ctx.needs_input_grad) - 2)
        if not (need_logp or need_ref):
            return (None, None) + nones
        g_logp, g_ref = ppo_kernels.kl_penalty_bwd(
            grad_out, logprobs, ref_logprobs, ctx.kind, need_logprobs=need_logp, need_ref=need_ref
        )
        return (g_logp, g_ref) + nones


torch.library.register_autograd("fastrm::kl_penalty_fwd", _KLPenaltyTriton.backward,
                                setup_context=_KLPenaltyTriton.setup_context)


def _kl_penalty_torch(logprobs, ref_logprobs, kind):
    """The formula in float32 (float64 for float64); autograd gives exactly its derivative (for a
    straight-through "+" kind: the base kind's value, k2's gradient)."""
    acc = _acc_dtype(logprobs.dtype)
    logp, ref = logprobs.to(acc), ref_logprobs.to(acc)
    if kind in ppo_kernels.KL_STRAIGHT_THROUGH:
        with torch.no_grad():
            value = _kl_penalty_torch(logp, ref, ppo_kernels.KL_STRAIGHT_THROUGH[kind])
        d = logp - ref
        k2 = 0.5 * d.square()
        return (k2 - k2.detach()) + value  # exactly the value forward (k2 - k2 == 0), k2's gradient
    if kind == "k1":
        return logp - ref
    if kind == "abs":
        return (logp - ref).abs()
    if kind == "k2":
        return 0.5 * (logp - ref).square()
    x = (ref - logp).clamp(-ppo_kernels.K3_LOG_RATIO_CLAMP, ppo_kernels.K3_LOG_RATIO_CLAMP)
    return (x.exp() - x - 1).clamp(-ppo_kernels.K3_CLAMP, ppo_kernels.K3_CLAMP)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k1",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, verl's ``kl_penalty``.

    With ``d = logprobs - ref_logprobs``: ``"k1"`` d (verl "kl"), ``"abs"`` |d|, ``"k2"`` 0.5 d^2 (verl "mse"),
    ``"k3"`` verl's "low_var_kl": ``x = clamp(-d, -20, 20)``, ``clamp(exp(x) - x - 1, -10, 10)``.
    ``"k1+"``, ``"abs+"``, ``"k3+"`` are verl's straight-through estimators: the value of k1 / abs / k3 and the
    gradient of k2 (``d`` w.r.t. logprobs, ``-d`` w.r.t. ref_logprobs), whose expectation is the KL's gradient.

    Use it as a reward penalty (under ``torch.no_grad()``) or as a loss term: it is differentiable w.r.t.
    both logprobs and ref_logprobs, with exactly the derivative of the formula as written (0 where a clamp
    is active, 0 for abs at d = 0).

    Args:
        logprobs, ref_logprobs: [B, T], same float dtype (float32 / bfloat16 / float16; float64 on the
            PyTorch path). No mask: every position is computed, and every position must be finite.
        kind: ``"k1"`` | ``"abs"`` | ``"k2"`` | ``"k3"`` | ``"k1+"`` | ``"abs+"`` | ``"k3+"``.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        [B, T] float32 (float64 for float64 inputs); gradients come back in the inputs' dtype.
    """
    op = "kl_penalty"
    tensors = {"logprobs": logprobs, "ref_logprobs": ref_logprobs}
    _check_tensors(op, tensors, None)
    check_choice(op, "kind", kind, KL_KINDS)
    impl = resolve_backend(backend, logprobs.device, op, logprobs.dtype, "logprobs")
    _check_values(op, tensors, None)
    if impl == "triton":
        return _KLPenaltyTriton.apply(logprobs, ref_logprobs, kind)
    return _kl_penalty_torch(logprobs, ref_logprobs, kind)


# ----------------------------------------------------------------------------------------------
# nn.Module forms
# ----------------------------------------------------------------------------------------------


class PPOPolicyLoss(nn.Module):
    """Module form of :func:`ppo_policy_loss`; ``forward(logprobs, old_logprobs, advantages, mask)``."""

    def __init__(self, clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float | None = None,
                 agg: str = "token-mean", ratio_level: str = "token", loss_scale_factor: float | None = None,
                 backend: str | None = None):
        super().__init__()
        op = "PPOPolicyLoss"
        self.clip_eps, high = _check_clip_eps(op, clip_eps, clip_eps_high)
        self.clip_eps_high = None if clip_eps_high is None else high
        self.dual_clip = _check_dual_clip(op, dual_clip)
        self.agg = check_choice(op, "agg", agg, AGG_MODES)
        self.ratio_level = check_choice(op, "ratio_level", ratio_level, RATIO_LEVELS)
        self.loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
        self.backend = backend

    def forward(self, logprobs, old_logprobs, advantages, mask) -> PolicyLossOutput:
        return ppo_policy_loss(
            logprobs, old_logprobs, advantages, mask, clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip, agg=self.agg, ratio_level=self.ratio_level,
            loss_scale_factor=self.loss_scale_factor, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"clip_eps={self.clip_eps}, clip_eps_high={self.clip_eps_high}, dual_clip={self.dual_clip}, "
                f"agg={self.agg!r}, ratio_level={self.ratio_level!r}, backend={self.backend!r}")


class ValueLoss(nn.Module):
    """Module form of :func:`value_loss`; ``forward(values, old_values, returns, mask)``."""

    def __init__(self, clip: float | None = 0.2, agg: str = "token-mean", loss_scale_factor: float | None = None,
                 backend: str | None = None):
        super().__init__()
        op = "ValueLoss"
        self.clip = _check_value_clip(op, clip)
        self.agg = check_choice(op, "agg", agg, AGG_MODES)
        self.loss_scale_factor = _check_loss_scale_factor(op, agg, loss_scale_factor)
        self.backend = backend

    def forward(self, values, old_values, returns, mask) -> ValueLossOutput:
        return value_loss(values, old_values, returns, mask, clip=self.clip, agg=self.agg,
                          loss_scale_factor=self.loss_scale_factor, backend=self.backend)

    def extra_repr(self) -> str:
        return f"clip={self.clip}, agg={self.agg!r}, backend={self.backend!r}"


class KLPenalty(nn.Module):
    """Module form of :func:`kl_penalty`; ``forward(logprobs, ref_logprobs)`` -> [B, T]."""

    def __init__(self, kind: str = "k1", backend: str | None = None):
        super().__init__()
        self.kind = check_choice("KLPenalty", "kind", kind, KL_KINDS)
        self.backend = backend

    def forward(self, logprobs, ref_logprobs) -> torch.Tensor:
        return kl_penalty(logprobs, ref_logprobs, self.kind, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, backend={self.backend!r}"
