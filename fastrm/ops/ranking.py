"""Reward-model ranking losses: ``pairwise_ranking_loss`` (Bradley-Terry, TRL's RewardTrainer) and
``ranking_loss`` (K responses per prompt, InstructGPT), with fused forward + backward.

Both compute the gradient in the forward pass (the terms are elementwise / row-local), so the
backward only scales it by ``grad_output``. The Triton kernels live in ``fastrm.kernels.ranking``;
the ``backend="torch"`` path is plain PyTorch and runs anywhere (and for float64).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastrm.kernels import ranking as ranking_kernels
from fastrm._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_choice,
    check_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
    require,
    value_checks_enabled,
)
from fastrm._dispatch import resolve_backend

REDUCTIONS = ("mean", "sum", "none")

__all__ = ["pairwise_ranking_loss", "ranking_loss", "PairwiseRankingLoss", "RankingLoss"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss / accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_center_coef(op: str, center_coef) -> float:
    if isinstance(center_coef, bool) or not isinstance(center_coef, numbers.Real):
        raise TypeError(f"{op}: center_coef must be a real number >= 0, got {type(center_coef).__name__}")
    value = float(center_coef)
    if not value >= 0.0 or value == float("inf"):  # `not >=` also rejects NaN
        raise ValueError(f"{op}: center_coef must be a finite number >= 0, got {value}")
    return value


def _check_margin(op: str, margin, chosen: torch.Tensor):
    """Return ``(margin_tensor_or_None, margin_value)``."""
    if margin is None:
        return None, 0.0
    if isinstance(margin, torch.Tensor):
        check_tensor(op, "margin", margin, dtypes=FLOAT_DTYPES)
        check_same_shape(op, "margin", margin, "chosen_rewards", chosen)
        return margin, 0.0
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(
            f"{op}: margin must be None, a real number or a tensor shaped like chosen_rewards, "
            f"got {type(margin).__name__}"
        )
    value = float(margin)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: margin must be finite, got {value}")
    return None, value


# ----------------------------------------------------------------------------------------------
# pairwise_ranking_loss
# ----------------------------------------------------------------------------------------------


class _PairwiseRankingTriton(torch.autograd.Function):
    """Fused pairwise loss: the kernel writes the loss terms and d term / d input in one pass."""

    @staticmethod
    def forward(ctx, chosen, rejected, margin, margin_value, center_coef, reduction, write_grads):
        shape, n = chosen.shape, chosen.numel()
        # reshape(-1) stays a (strided) view for 1-D inputs such as pairs[:, 0]; the kernel takes strides.
        loss, correct, grad_c, grad_r, grad_m = ranking_kernels.pairwise_ranking_fwd(
            chosen.reshape(-1),
            rejected.reshape(-1),
            margin.reshape(-1) if margin is not None else None,
            margin_value,
            center_coef,
            per_element=reduction == "none",
            write_grads=write_grads,
            write_margin_grad=margin is not None and margin.requires_grad,
        )
        if reduction == "none":
            loss, accuracy = loss.view(shape), correct.view(shape)
        else:
            loss = loss.sum()  # sum of the per-program partial sums: deterministic
            if reduction == "mean":
                loss = loss / n
            accuracy = (correct.sum(dtype=torch.float64) / n).to(torch.float32)
        ctx.mark_non_differentiable(accuracy)
        ctx.save_for_backward(grad_c, grad_r, grad_m)
        ctx.reduction, ctx.shape, ctx.n = reduction, shape, n
        ctx.dtypes = (chosen.dtype, rejected.dtype, margin.dtype if margin is not None else None)
        return loss, accuracy

    @staticmethod
    @once_differentiable  # the backward is a scale of a saved tensor: no second derivative
    def backward(ctx, grad_loss, grad_accuracy):
        saved = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_loss.reshape(-1).to(torch.float32)
        elif ctx.reduction == "mean":
            scale = grad_loss.to(torch.float32) / ctx.n
        else:
            scale = grad_loss.to(torch.float32)
        grads = []
        for k in range(3):
            if ctx.needs_input_grad[k] and saved[k] is not None:
                # Out of place: the saved buffer stays intact for a second backward (retain_graph).
                grads.append((saved[k] * scale).view(ctx.shape).to(ctx.dtypes[k]))
            else:
                grads.append(None)
        return grads[0], grads[1], grads[2], None, None, None, None


def _pairwise_ranking_torch(chosen, rejected, margin, margin_value, center_coef, reduction, want_accuracy):
    """Plain PyTorch: the same formula in float32 (float64 for float64 inputs), autograd for grads.

    The accuracy (None unless ``want_accuracy``) is extra kernels here, unlike in the fused Triton pass.
    """
    acc = _acc_dtype(chosen.dtype)
    c, r = chosen.to(acc), rejected.to(acc)
    x = c - r - (margin.to(acc) if margin is not None else margin_value)
    term = -F.logsigmoid(x)  # stable for any |x|
    if center_coef != 0.0:
        term = term + center_coef * (c + r) ** 2
    correct = (chosen > rejected).to(torch.float32) if want_accuracy else None
    if reduction == "none":
        return term, correct
    loss = term.mean() if reduction == "mean" else term.sum()
    return loss, correct.mean() if want_accuracy else None


def pairwise_ranking_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin=None,
    center_coef: float = 0.0,
    reduction: str = "mean",
    return_accuracy: bool = False,
    backend: str | None = None,
):
    """Bradley-Terry reward-model loss, fused forward and backward.

    Per element: ``-logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2``;
    with ``reduction="mean"`` this is exactly TRL RewardTrainer's
    ``-logsigmoid(c - r - m).mean() + center_coef * torch.mean((c + r) ** 2)``.

    Args:
        chosen_rewards, rejected_rewards: same shape (any, >= 1-D, typically [B]), same float dtype
            (float32 / bfloat16 / float16; float64 on the PyTorch path). No broadcasting.
        margin: None, a real number, or a float tensor shaped like ``chosen_rewards`` (it gets a
            gradient if it requires grad).
        center_coef: >= 0; weight of the reward-centering term (TRL's ``center_rewards_coefficient``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per-element terms; their mean is ``"mean"``).
        return_accuracy: also return the fraction of elements with ``chosen > rejected`` (strict:
            ties count as wrong), a detached float32 scalar (per-element 0/1 for ``"none"``).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (default: ``$FASTRM_BACKEND`` or auto).

    Returns:
        The loss (float32; float64 for float64 inputs), or ``(loss, accuracy)``. Gradients come back
        in the inputs' dtypes. Numerically stable for any reward gap (|x| = 1e4 is fine).
    """
    op = "pairwise_ranking_loss"
    check_tensor(op, "chosen_rewards", chosen_rewards, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(op, "rejected_rewards", rejected_rewards, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_same_shape(op, "rejected_rewards", rejected_rewards, "chosen_rewards", chosen_rewards)
    if rejected_rewards.dtype != chosen_rewards.dtype:
        raise TypeError(
            f"{op}: rejected_rewards must have the same dtype as chosen_rewards ({chosen_rewards.dtype}), "
            f"got {rejected_rewards.dtype}"
        )
    margin_t, margin_value = _check_margin(op, margin, chosen_rewards)
    check_same_device(op, {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards, "margin": margin_t})
    center_coef = _check_center_coef(op, center_coef)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    check_finite(op, "chosen_rewards", chosen_rewards)
    check_finite(op, "rejected_rewards", rejected_rewards)
    if margin_t is not None:
        check_finite(op, "margin", margin_t)

    impl = resolve_backend(backend, chosen_rewards.device, op, chosen_rewards.dtype, "chosen_rewards")
    if impl == "triton":
        inputs = (chosen_rewards, rejected_rewards, margin_t)
        write_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        loss, accuracy = _PairwiseRankingTriton.apply(
            chosen_rewards, rejected_rewards, margin_t, margin_value, center_coef, reduction, write_grads
        )
    else:
        loss, accuracy = _pairwise_ranking_torch(
            chosen_rewards, rejected_rewards, margin_t, margin_value, center_coef, reduction, return_accuracy
        )
    return (loss, accuracy) if return_accuracy else loss


# ----------------------------------------------------------------------------------------------
# ranking_loss
# ----------------------------------------------------------------------------------------------


def _ranking_sums_torch(rewards: torch.Tensor, ranks: torch.Tensor, write_grads: bool):
    """Plain PyTorch twin of ``_ranking_fwd_kernel``: loop over the anchor response i, each step
    vectorised over [B, K] (pairs (i, j) for every j), so nothing of size [B, K, K] is built.

    Returns the batch totals ``(loss_sum, pairs, correct)`` (the counts as float64) and
    d loss_sum / d rewards (or None).
    """
    acc = _acc_dtype(rewards.dtype)
    r = rewards.to(acc)
    loss_sum = torch.zeros((), dtype=acc, device=r.device)
    pairs = torch.zeros((), dtype=torch.float64, device=r.device)
    correct = torch.zeros((), dtype=torch.float64, device=r.device)
    grad = torch.zeros_like(r) if write_grads else None
    for i in range(r.shape[1]):
        rank_i = ranks[:, i : i + 1]  # [B, 1]
        # i beats j: both present, rank_i < rank_j (implies rank_j >= 0); ties and (i, i) excluded.
        valid = (rank_i >= 0) & (rank_i < ranks)  # [B, K]
        x = r[:, i : i + 1] - r  # r_i - r_j, [B, K]
        # where, not multiply: a missing response may carry a non-finite reward.
        loss_sum += torch.where(valid, -F.logsigmoid(x), 0.0).sum()
        pairs += valid.sum()
        correct += (valid & (x > 0)).sum()
        if write_grads:
            # d/dr_j -logsigmoid(r_i - r_j) = sigmoid(r_j - r_i); d/dr_i is minus its sum over j.
            g = torch.where(valid, torch.sigmoid(-x), 0.0)
            grad += g
            grad[:, i] -= g.sum(dim=1)
    return loss_sum, pairs, correct, grad


def _ranking_sums_triton(rewards: torch.Tensor, ranks: torch.Tensor, write_grads: bool):
    loss, pairs, correct, grad = ranking_kernels.ranking_fwd(rewards, ranks, write_grads=write_grads)
    # float64 sums of whole-number fp32 counts are exact (and stay NaN if a row was never written).
    return loss.sum(), pairs.sum(dtype=torch.float64), correct.sum(dtype=torch.float64), grad


class _RankingLoss(torch.autograd.Function):
    """K-wise ranking loss with the gradient computed in the forward pass (either backend), so
    autograd saves one [B, K] tensor instead of K intermediates."""

    @staticmethod
    def forward(ctx, rewards, ranks, impl, write_grads):
        sums = _ranking_sums_triton if impl == "triton" else _ranking_sums_torch
        loss_sum, pairs, correct, grad = sums(rewards, ranks, write_grads)
        if value_checks_enabled():
            require(pairs > 0, "ranking_loss: ranks has no valid pair (no prompt has two present responses, "
                               "rank >= 0, with different ranks); the loss would be a mean over nothing")
        # With value checks off an empty batch gives loss 0 and zero grads rather than NaN.
        n_pairs = pairs.clamp_min(1)
        loss = loss_sum / n_pairs.to(loss_sum.dtype)
        accuracy = (correct / n_pairs).to(torch.float32)
        ctx.mark_non_differentiable(accuracy)
        ctx.save_for_backward(grad, n_pairs)
        ctx.dtype = rewards.dtype
        return loss, accuracy

    @staticmethod
    @once_differentiable  # the backward is a scale of a saved tensor: no second derivative
    def backward(ctx, grad_loss, grad_accuracy):
        grad, n_pairs = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or grad is None:
            return None, None, None, None
        scale = grad_loss.to(grad.dtype) / n_pairs.to(grad.dtype)
        return (grad * scale).to(ctx.dtype), None, None, None


def ranking_loss(
    rewards: torch.Tensor,
    ranks: torch.Tensor,
    *,
    return_accuracy: bool = False,
    backend: str | None = None,
):
    """K-wise (InstructGPT) reward-model ranking loss, without materialising the [B, K, K] pairs.

    For each prompt ``b`` and each ordered pair of its responses ``(i, j)`` with
    ``0 <= ranks[b, i] < ranks[b, j]`` (lower rank = better, 0 = best), the pair loss is
    ``-logsigmoid(rewards[b, i] - rewards[b, j])``. Equal ranks are ties (no pair); a rank < 0 marks
    a missing response (none of its pairs count, its reward is ignored and gets a zero gradient).

    The loss is the **global mean over every valid pair in the batch** (not a mean of per-prompt
    means): a prompt with more ranked responses weighs more, as in InstructGPT's formulation.

    Args:
        rewards: float [B, K] (float32 / bfloat16 / float16; float64 on the PyTorch path).
        ranks: integer tensor of the same shape.
        return_accuracy: also return the fraction of valid pairs with ``r_i > r_j`` (strict),
            a detached float32 scalar.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        The scalar loss (float32; float64 for float64 rewards), or ``(loss, accuracy)``; the gradient
        comes back in rewards' dtype.

    Raises:
        ValueError naming ``ranks`` if the batch has no valid pair (checked unless
        ``FASTRM_CHECK_VALUES=0``, in which case the loss is 0 with zero gradients).
    """
    op = "ranking_loss"
    check_tensor(op, "rewards", rewards, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(op, "ranks", ranks, dtypes=INT_DTYPES)
    check_same_shape(op, "ranks", ranks, "rewards", rewards)
    check_same_device(op, {"rewards": rewards, "ranks": ranks})
    if value_checks_enabled():
        # Only present responses must be finite: a missing one's reward is never used.
        check_finite(op, "rewards", torch.where(ranks >= 0, rewards.detach(), 0),
                     hint=" at a response whose rank is >= 0")

    impl = resolve_backend(backend, rewards.device, op, rewards.dtype, "rewards")
    write_grads = torch.is_grad_enabled() and rewards.requires_grad
    loss, accuracy = _RankingLoss.apply(rewards, ranks, impl, write_grads)
    return (loss, accuracy) if return_accuracy else loss


# ----------------------------------------------------------------------------------------------
# nn.Module forms
# ----------------------------------------------------------------------------------------------


class PairwiseRankingLoss(nn.Module):
    """Module form of :func:`pairwise_ranking_loss`.

    ``margin`` here is a default (None or a real number); a ``margin`` passed to ``forward``
    (number or per-element tensor) replaces it for that call.
    """

    def __init__(self, margin=None, center_coef: float = 0.0, reduction: str = "mean", backend: str | None = None):
        super().__init__()
        op = "PairwiseRankingLoss"
        if margin is not None:
            if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
                raise TypeError(f"{op}: margin must be None or a real number, got {type(margin).__name__}")
            margin = float(margin)
        self.margin = margin
        self.center_coef = _check_center_coef(op, center_coef)
        self.reduction = check_choice(op, "reduction", reduction, REDUCTIONS)
        self.backend = backend

    def forward(self, chosen_rewards, rejected_rewards, margin=None, return_accuracy: bool = False):
        return pairwise_ranking_loss(
            chosen_rewards,
            rejected_rewards,
            margin=self.margin if margin is None else margin,
            center_coef=self.center_coef,
            reduction=self.reduction,
            return_accuracy=return_accuracy,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, center_coef={self.center_coef}, reduction={self.reduction!r}, backend={self.backend!r}"


class RankingLoss(nn.Module):
    """Module form of :func:`ranking_loss` (global mean over the batch's valid pairs)."""

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, rewards, ranks, return_accuracy: bool = False):
        return ranking_loss(rewards, ranks, return_accuracy=return_accuracy, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
