"""What the fused PPO-family losses share: input checks, the aggregation over rows (``agg``), and the autograd
Function whose backward scales a per-token gradient computed in the forward pass.

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

import torch
from torch.autograd.function import once_differentiable

from fastrm._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_binary_mask,
    check_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
    require,
    value_checks_enabled,
)

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INT_DTYPES


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

