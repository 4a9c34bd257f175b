"""Generalized Advantage Estimation: ``compute_gae``, its module form ``GAE``, and ``whiten``.

``compute_gae(rewards, values, mask, gamma=, lam=, bootstrap_value=None)`` returns ``(advantages, returns)``,
all ``[B, T]``. Positions with mask 0 are skipped: they get advantage 0 and return 0, and the recurrence
passes over them to the next valid position, so right padding, left padding and masked observation tokens
in multi-turn rollouts all work. The value after the last valid position is 0 (the episode ended) unless
``bootstrap_value[B]`` is given (a truncated episode). On valid positions this equals verl's mask-aware
``compute_gae_advantage_return`` loop; ``returns = advantages + values`` there.

Two backends, same numbers: the Triton kernels (one launch for the batch, see fastrm/kernels/gae.py)
and a vectorized PyTorch path without a Python loop over T, which autograd differentiates directly.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fastrm._checks import (
    FLOAT_DTYPES,
    INT_DTYPES,
    check_binary_mask,
    check_finite,
    check_same_device,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    require,
    value_checks_enabled,
)
from fastrm._dispatch import resolve_backend
from fastrm.kernels.gae import gae_bwd, gae_fwd

__all__ = ["compute_gae", "GAE", "whiten"]

_OP = "compute_gae"
MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + INT_DTYPES
# Chunk length of the blockwise discounted cumsum: a [L, L] power matrix, one batched matmul per level.
_CUMSUM_CHUNK = 64


# ----------------------------------------------------------------------------------------------------
# PyTorch path
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _chunk_powers(f: float, L: int, dtype: torch.dtype, device: torch.device):
    """P[j, k] = f^(k-j) for k >= j else 0, and tail[j] = f^(L-j); computed in float64, cached per f."""
    k = torch.arange(L, dtype=torch.float64)
    gap = k[None, :] - k[:, None]  # [j, k] = k - j
    f64 = torch.tensor(f, dtype=torch.float64)
    powers = torch.where(gap >= 0, f64 ** gap.clamp(min=0), 0.0)  # 0**0 = 1: f=0 works
    tail = f64 ** (L - k)
    return powers.T.to(dtype=dtype, device=device).contiguous(), tail.to(dtype=dtype, device=device)


def _discounted_reverse_cumsum(x: torch.Tensor, f: float) -> torch.Tensor:
    """y_t = x_t + f * y_(t+1) along dim 1 of a [N, T] tensor (y past the end = 0), for constant f in [0, 1].

    Chunks of L positions are done at once as x @ P^T with P[j, k] = f^(k-j) for k >= j (exponents stay
    <= L, so nothing under- or overflows); the chunk-start values then see everything after their chunk
    through the same recurrence over chunks with factor f^L, solved by recursion (depth log_L T).
    """
    N, T = x.shape
    L = min(_CUMSUM_CHUNK, T)
    n = math.ceil(T / L)
    if n * L != T:
        x = nn.functional.pad(x, (0, n * L - T))  # zeros at the end add nothing
    # (torch.compile traces the function itself: a cache of tensors is not something it can keep)
    chunk_powers = _chunk_powers.__wrapped__ if torch.compiler.is_compiling() else _chunk_powers
    powers_t, tail = chunk_powers(float(f), L, x.dtype, x.device)
    y = x.reshape(N, n, L) @ powers_t  # within-chunk sums
    if n > 1:
        starts = _discounted_reverse_cumsum(y[:, :, 0], f**L)  # full y at each chunk's first position
        after = nn.functional.pad(starts[:, 1:], (0, 1))  # full y at the next chunk's start (0 at the end)
        y = torch.addcmul(y, after[:, :, None], tail)  # reaches lane j with weight f^(L-j)
    return y.reshape(N, n * L)[:, :T]


def _compute_gae_torch(rewards, values, mask, gamma, lam, bootstrap_value=None):
    """Vectorized GAE in float32 (float64 for float64 inputs); differentiable by autograd.

    Masked positions only ever pass the recurrence through, so each row is first *packed*: its valid
    positions moved, in order, to the front. There GAE is the textbook recurrence with no mask at all
    (next value = the next packed slot, or the bootstrap value after the last one), i.e. one reverse
    discounted cumsum, and the results are gathered back to the original positions.

    Data moves only by scatter/gather, never torch.where on the [B, T] mask (on CPU it branches per
    element and is several times slower on irregular masks), and no masked position's value reaches a
    result, so even NaN there cannot leak.
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype)
    v = values.to(dtype)
    m = mask if mask.dtype == torch.bool else mask != 0
    B, T = r.shape

    # Packed slot of each position: the k-th valid position goes to slot k, every masked position to a dump
    # column T + 1 (index arithmetic in place: these [B, T] int64 temporaries are not free).
    m_int = m.to(torch.int64)  # converted once; bool operands would be converted again by every op
    slot = m_int.cumsum(1)  # valid positions up to and including t
    n_valid = slot[:, -1:].clone()
    slot.sub_(T + 2).mul_(m_int).add_(T + 1)  # valid: (valid positions up to t) - 1

    # Packed rows have T + 2 columns: the valid slots, zeros up to column T, and the dump column, which is
    # never read. The value after the last valid slot is the bootstrap value (0 when the episode ended);
    # it goes to slot n_valid <= T.
    packed_rv = torch.zeros(B, T + 2, dtype=dtype, device=r.device).scatter_(1, slot, r - v)
    packed_v = torch.zeros(B, T + 2, dtype=dtype, device=r.device).scatter_(1, slot, v)
    if bootstrap_value is not None:
        packed_v.scatter_(1, n_valid, bootstrap_value.to(dtype)[:, None])
    # delta_k = (r - v)_k + gamma * v_(k+1): 0 past the valid slots, where both terms are zeros.
    packed_delta = packed_rv[:, :T].add(packed_v[:, 1 : T + 1], alpha=gamma)

    # A = reverse discounted cumsum with factor gamma*lam (0 past the valid slots, all deltas there are 0).
    packed_adv = _discounted_reverse_cumsum(packed_delta, gamma * lam)
    packed_ret = packed_adv + packed_v[:, :T]
    # Read back; masked positions read the dump column's place, here a zero pad.
    adv = nn.functional.pad(packed_adv, (0, 2)).gather(1, slot)
    ret = nn.functional.pad(packed_ret, (0, 2)).gather(1, slot)
    return adv, ret


# ----------------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------------


class _GAEFunction(torch.autograd.Function):
    """Arguments as the ``fastrm::gae_fwd`` custom op's, whose autograd is this Function's (registered below),
    so ``torch.ops.fastrm.gae_fwd`` is differentiable on its own too."""

    @staticmethod
    def forward(rewards, values, mask, bootstrap_value, gamma, lam, block_t=None):
        return gae_fwd(rewards, values, mask, bootstrap_value, gamma, lam, block_t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        rewards, values, mask, bootstrap_value, gamma, lam = inputs[:6]
        ctx.save_for_backward(mask)
        ctx.gamma, ctx.lam = gamma, lam
        ctx.dtypes = (rewards.dtype, values.dtype, None if bootstrap_value is None else bootstrap_value.dtype)

    @staticmethod
    def backward(ctx, grad_adv, grad_ret):
        (mask,) = ctx.saved_tensors
        r_dtype, v_dtype, b_dtype = ctx.dtypes
        needs_boot = ctx.needs_input_grad[3]
        d_r, d_v, d_boot = gae_bwd(
            grad_adv, grad_ret, mask, ctx.gamma, ctx.lam,
            rewards_dtype=r_dtype, values_dtype=v_dtype, bootstrap_dtype=b_dtype if needs_boot else None,
        )
        grads = (d_r if ctx.needs_input_grad[0] else None, d_v if ctx.needs_input_grad[1] else None, None, d_boot)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd("fastrm::gae_fwd", _GAEFunction.backward, setup_context=_GAEFunction.setup_context)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _check_inputs(rewards, values, mask, bootstrap_value, gamma, lam):
    check_tensor(_OP, "rewards", rewards, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor(_OP, "values", values, dtypes=FLOAT_DTYPES, ndim=2)
    check_same_shape(_OP, "values", values, "rewards", rewards)
    if values.dtype != rewards.dtype:
        raise TypeError(f"{_OP}: values must have the same dtype as rewards ({rewards.dtype}), got {values.dtype}")
    check_tensor(_OP, "mask", mask, dtypes=MASK_DTYPES, ndim=2)
    check_same_shape(_OP, "mask", mask, "rewards", rewards)
    if bootstrap_value is not None:
        check_tensor(_OP, "bootstrap_value", bootstrap_value, dtypes=FLOAT_DTYPES, ndim=1)
        if bootstrap_value.shape[0] != rewards.shape[0]:
            raise ValueError(
                f"{_OP}: bootstrap_value must have shape [B] = ({rewards.shape[0]},) (one value per row of "
                f"rewards), got {tuple(bootstrap_value.shape)}"
            )
    check_same_device(_OP, {"rewards": rewards, "values": values, "mask": mask, "bootstrap_value": bootstrap_value})
    gamma = check_unit_interval(_OP, "gamma", gamma)
    lam = check_unit_interval(_OP, "lam", lam)
    check_binary_mask(_OP, "mask", mask)
    # A float64 sum is non-finite exactly when an element is (float32/16 values cannot overflow it), and costs
    # far less than isfinite().all(), which would build a [B, T] bool temporary.
    for name, x in (("rewards", rewards), ("values", values), ("bootstrap_value", bootstrap_value)):
        if x is not None:
            check_finite(_OP, name, x.detach().sum(dtype=torch.float64))
    return gamma, lam


def compute_gae(rewards, values, mask, *, gamma, lam, bootstrap_value=None, backend=None):
    """Mask-aware GAE over a batch of rollouts.

    Args:
        rewards, values: ``[B, T]`` float tensors of the same dtype (float32/bfloat16/float16, or float64).
        mask: ``[B, T]``, bool or 0/1 numbers; 0 marks positions to skip (padding, observation tokens).
        gamma, lam: discount and GAE lambda, each in [0, 1].
        bootstrap_value: optional ``[B]`` value after the last valid position of each row (truncated
            episodes); without it that value is 0.
        backend: ``"auto"`` (default), ``"triton"`` or ``"torch"``.

    Returns:
        ``(advantages, returns)``, ``[B, T]`` float32 (float64 for float64 inputs), 0 on masked positions.
        Differentiable with respect to rewards, values and bootstrap_value.
    """
    gamma, lam = _check_inputs(rewards, values, mask, bootstrap_value, gamma, lam)
    chosen = resolve_backend(backend, rewards.device, _OP, rewards.dtype, "rewards/values")
    if chosen == "triton":
        return _GAEFunction.apply(rewards, values, mask, bootstrap_value, gamma, lam)
    return _compute_gae_torch(rewards, values, mask, gamma, lam, bootstrap_value)


class GAE(nn.Module):
    """Module form of :func:`compute_gae` with fixed ``gamma`` and ``lam``."""

    def __init__(self, gamma: float, lam: float, backend: str | None = None):
        super().__init__()
        self.gamma = check_unit_interval("GAE", "gamma", gamma)
        self.lam = check_unit_interval("GAE", "lam", lam)
        self.backend = backend

    def forward(self, rewards, values, mask, bootstrap_value=None):
        return compute_gae(
            rewards, values, mask, gamma=self.gamma, lam=self.lam, bootstrap_value=bootstrap_value,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, lam={self.lam}, backend={self.backend!r}"


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening as TRL/verl ``masked_whiten``: (x - mean) / sqrt(var + eps) over valid positions.

    Mean and (unbiased, like theirs) variance are taken over all positions where ``mask`` is 1, across the
    whole batch. With ``shift_mean=False`` the mean is added back. Unlike theirs, masked positions come back
    as 0 (what one does next with their output anyway), so garbage there never leaks out. Fewer than 2 valid
    positions are a ValueError (on a GPU reported without a sync, see ``fastrm._checks``).
    """
    op = "whiten"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(op, "mask", mask, dtypes=MASK_DTYPES)
    check_same_shape(op, "mask", mask, "x", x)
    check_same_device(op, {"x": x, "mask": mask})
    check_binary_mask(op, "mask", mask)
    m = mask != 0
    n = m.sum()
    if value_checks_enabled():
        require(n >= 2, f"{op}: mask must select at least 2 positions for an unbiased variance",
                lambda: f", got {int(n)}")
    # Masked entries may hold anything, even NaN: replace them before any arithmetic (also keeps NaN out
    # of the gradient, which a where() after the arithmetic would not).
    xm = torch.where(m, x, 0)
    mean = xm.sum() / n
    centered = torch.where(m, xm - mean, 0)
    var = (centered**2).sum() / (n - 1)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, 0)
