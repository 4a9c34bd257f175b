"""Direct preference optimisation losses: ``dpo_loss`` (DPO and its family) and its module form ``DPOLoss``.

The policy's own log-probs are the reward model (Rafailov et al., 2023): with the sequence log-probs of the
chosen and rejected completions under the policy and a frozen reference,

* ``chosen_rewards = beta * (chosen_logps - ref_chosen_logps)``, likewise ``rejected_rewards``;
* ``delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)``.

Loss per pair, by ``loss_type`` (``eps`` = ``label_smoothing``; ``-log sigmoid(x)`` written ``softplus(-x)``):

* ``"sigmoid"`` (DPO): ``(1 - eps) softplus(-beta delta) + eps softplus(beta delta)``; ``eps > 0`` is
  conservative DPO (cDPO, Mitchell 2023). TRL 1.16's ``loss_type="sigmoid"`` at ``eps = 0``.
* ``"robust"`` (rDPO, Chowdhury et al. 2024, unbiased under label noise of rate ``eps < 0.5``):
  ``((1 - eps) softplus(-beta delta) - eps softplus(beta delta)) / (1 - 2 eps)``. TRL's ``"robust"``.
* ``"hinge"`` (SLiC, Zhao et al. 2023): ``relu(1 - beta delta)``. TRL's ``"hinge"``.
* ``"ipo"`` (Azar et al. 2023, eq. 17): ``(delta_avg - 1 / (2 beta))^2`` with the log-ratios divided by the
  completion lengths, ``delta_avg = chosen_logratio / chosen_lengths - rejected_logratio / rejected_lengths``,
  as TRL does (its authors' normalisation). TRL's ``"ipo"``.
* ``"simpo"`` (Meng et al. 2024), reference-free (the ``ref_*`` arguments are None): the rewards are
  ``beta * logps / lengths`` (length-normalised), loss ``(1 - eps) softplus(-m) + eps softplus(m)`` with the margin
  ``m = chosen_reward - rejected_reward - gamma``. TRL's CPOTrainer ``loss_type="simpo"`` (``cpo_alpha=0``,
  ``simpo_gamma=gamma``).

The log-probs are always sums over each completion's tokens; ``chosen_lengths`` / ``rejected_lengths`` (the
token counts) are needed by the length-normalised losses (``ipo``, ``simpo``) and refused by the others.

The inputs are ``[B]`` (a handful of element-wise ops), so this is plain PyTorch: a fused kernel would save
nothing measurable next to the ``[N, T]`` log-prob computation that produces them (``fastrm.linear_logprobs``).
Arithmetic runs in float32 (float64 for float64 inputs); gradients come back in the inputs' dtype.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

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

__all__ = ["dpo_loss", "DPOLoss", "DPOLossOutput", "DPO_LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES",
           "LENGTH_NORMALISED_LOSS_TYPES"]

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")
REFERENCE_FREE_LOSS_TYPES = ("simpo",)
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "simpo")
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo")
REDUCTIONS = ("mean", "none")


class DPOLossOutput(NamedTuple):
    """``loss`` (differentiable w.r.t. the policy log-probs) and TRL's metrics, detached: ``chosen_rewards`` and
    ``rejected_rewards`` are per pair ``[B]``; ``margin`` and ``accuracy`` are batch means (``accuracy``: share of
    pairs whose chosen reward is strictly higher)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor

    def metrics(self, prefix: str = "rewards/") -> dict:
        """The batch means under TRL's names: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
        return {f"{prefix}chosen": self.chosen_rewards.mean(), f"{prefix}rejected": self.rejected_rewards.mean(),
                f"{prefix}margins": self.margin, f"{prefix}accuracies": self.accuracy}


def _real(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return value


def check_settings(op: str, beta, loss_type: str, label_smoothing, gamma) -> tuple[float, float, float]:
    """``(beta, label_smoothing, gamma)`` as floats, each checked against ``loss_type``."""
    check_choice(op, "loss_type", loss_type, DPO_LOSS_TYPES)
    beta, eps, gamma = _real(op, "beta", beta), _real(op, "label_smoothing", label_smoothing), _real(op, "gamma", gamma)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if loss_type in SMOOTHED_LOSS_TYPES:
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"{op}: label_smoothing must lie in [0, 0.5) for loss_type={loss_type!r}, got {eps}")
    elif eps != 0.0:
        raise ValueError(f"{op}: label_smoothing applies to loss_type sigmoid, robust or simpo, not "
                         f"{loss_type!r}; got {eps}")
    if gamma != 0.0 and loss_type != "simpo":
        raise ValueError(f"{op}: gamma (the SimPO margin) applies to loss_type='simpo' only, got gamma={gamma} with "
                         f"loss_type={loss_type!r}")
    return beta, eps, gamma


def _check_inputs(op: str, loss_type: str, tensors: dict, lengths: dict):
    ref_name, ref = next(iter(tensors.items()))
    free = loss_type in REFERENCE_FREE_LOSS_TYPES
    for name, x in tensors.items():
        if name.startswith("ref_"):
            if free and x is not None:
                raise ValueError(f"{op}: loss_type={loss_type!r} is reference-free: {name} must be None")
            if not free and x is None:
                raise ValueError(f"{op}: loss_type={loss_type!r} needs {name} (the reference model's log-probs)")
        if x is None:
            continue
        check_tensor(op, name, x, dtypes=FLOAT_DTYPES, ndim=1)
        check_same_shape(op, name, x, ref_name, ref)
        if x.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")
    normalised = loss_type in LENGTH_NORMALISED_LOSS_TYPES
    for name, x in lengths.items():
        if not normalised:
            if x is not None:
                raise ValueError(f"{op}: {name} only applies to the length-normalised loss types "
                                 f"{LENGTH_NORMALISED_LOSS_TYPES}, not loss_type={loss_type!r}")
            continue
        if x is None:
            raise ValueError(f"{op}: loss_type={loss_type!r} divides by the completion lengths: pass {name} "
                             "(the number of completion tokens summed into each log-prob)")
        check_tensor(op, name, x, dtypes=FLOAT_DTYPES + INT_DTYPES, ndim=1)
        check_same_shape(op, name, x, ref_name, ref)
    check_same_device(op, {**tensors, **lengths})
    if value_checks_enabled():
        for name, x in tensors.items():
            if x is not None:
                check_finite(op, name, x.detach())
        for name, x in lengths.items():
            if x is not None:
                require((x > 0).all(), f"{op}: {name} must be > 0 everywhere (a completion of no token has no "
                                       "average log-prob)", lambda x=x: f", found {x[x <= 0].flatten()[0].item()}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    reduction: str = "mean",
) -> DPOLossOutput:
    """DPO-family loss of ``B`` preference pairs from sequence log-probs (see the module docstring for each formula).

    Args:
        chosen_logps, rejected_logps: ``[B]`` float, the policy's log-prob of each completion (summed over its
            tokens). Differentiable.
        ref_chosen_logps, ref_rejected_logps: ``[B]``, the reference model's (no gradient flows into them); None
            for a reference-free ``loss_type`` (``simpo``), required otherwise.
        beta: > 0, the inverse temperature (the weight of the implicit KL to the reference; IPO's ``tau``).
        loss_type: ``"sigmoid"`` | ``"robust"`` | ``"hinge"`` | ``"ipo"`` | ``"simpo"``.
        label_smoothing: the assumed share of flipped labels, in [0, 0.5): cDPO for ``sigmoid`` and ``simpo``, rDPO's
            noise rate for ``robust``; must be 0 for ``hinge`` and ``ipo``.
        gamma: SimPO's target reward margin (in reward units, TRL's ``simpo_gamma``); ``simpo`` only (0 otherwise).
        chosen_lengths, rejected_lengths: ``[B]``, completion token counts (> 0), for ``ipo`` and ``simpo`` only.
        reduction: ``"mean"`` over pairs (TRL's) | ``"none"`` (the ``[B]`` per-pair losses).

    Returns:
        :class:`DPOLossOutput`; ``loss`` in float32 (float64 for float64 inputs).
    """
    op = "dpo_loss"
    beta, eps, gamma = check_settings(op, beta, loss_type, label_smoothing, gamma)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    _check_inputs(op, loss_type, {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
                                  "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps},
                  {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths})
    dtype = torch.float64 if chosen_logps.dtype == torch.float64 else torch.float32
    chosen, rejected = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if loss_type == "simpo":
        chosen = chosen / chosen_lengths.to(dtype)
        rejected = rejected / rejected_lengths.to(dtype)
    else:  # the reference is a constant of the loss, as in TRL (precomputed or under no_grad)
        chosen = chosen - ref_chosen_logps.detach().to(dtype)
        rejected = rejected - ref_rejected_logps.detach().to(dtype)
    if loss_type == "simpo":
        margin = beta * (chosen - rejected) - gamma
        losses = (1 - eps) * F.softplus(-margin) + eps * F.softplus(margin)
    elif loss_type == "sigmoid":
        z = beta * (chosen - rejected)
        losses = (1 - eps) * F.softplus(-z) + eps * F.softplus(z)
    elif loss_type == "robust":
        z = beta * (chosen - rejected)
        losses = ((1 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen - rejected))
    else:  # ipo
        delta = chosen / chosen_lengths.to(dtype) - rejected / rejected_lengths.to(dtype)
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards, rejected_rewards = (beta * chosen).detach(), (beta * rejected).detach()
    return DPOLossOutput(
        loss=losses.mean() if reduction == "mean" else losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margin=(chosen_rewards - rejected_rewards).mean(),
        accuracy=(chosen_rewards > rejected_rewards).to(dtype).mean(),
    )


class DPOLoss(nn.Module):
    """Module form of :func:`dpo_loss`; ``forward(chosen_logps, rejected_logps, ref_chosen_logps=None,
    ref_rejected_logps=None, chosen_lengths=None, rejected_lengths=None)``."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 gamma: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.beta, self.label_smoothing, self.gamma = check_settings("DPOLoss", beta, loss_type, label_smoothing,
                                                                     gamma)
        self.loss_type = loss_type
        self.reduction = check_choice("DPOLoss", "reduction", reduction, REDUCTIONS)

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                chosen_lengths=None, rejected_lengths=None) -> DPOLossOutput:
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing, gamma=self.gamma,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"gamma={self.gamma}, reduction={self.reduction!r}")
