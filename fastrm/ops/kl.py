"""Per-token KL penalties between the policy and the reference: ``kl_penalty`` and its module form
``KLPenalty``."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastrm._checks import check_choice
from fastrm._dispatch import resolve_backend
from fastrm.kernels import ppo as ppo_kernels
from fastrm.ops.ppo_common import _acc_dtype, _check_tensors, _check_values

KL_KINDS = tuple(ppo_kernels.KL_KINDS) + tuple(ppo_kernels.KL_STRAIGHT_THROUGH)


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
