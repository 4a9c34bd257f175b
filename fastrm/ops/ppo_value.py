"""The PPO clipped value loss, fused forward and backward: ``value_loss`` and its module form ``ValueLoss``
(aggregation modes: :mod:`fastrm.ops.ppo_common`)."""

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


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor  # fraction where the clipped squared error is the (strictly) larger one



def _check_value_clip(op: str, clip):
    clip = _real(op, "clip", clip, allow_none=True)
    if clip is not None and clip < 0.0:
        raise ValueError(f"{op}: clip must be >= 0 (None disables clipping), got {clip}")
    return clip



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

