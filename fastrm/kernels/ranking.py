"""Reward-model ranking losses: pairwise (Bradley-Terry) and K-wise (InstructGPT).

Pairwise, per element ``n`` of ``chosen`` / ``rejected`` (any shape, flattened here)::

    x_n    = chosen_n - rejected_n - margin_n
    term_n = -logsigmoid(x_n) + center_coef * (chosen_n + rejected_n) ** 2

and the loss is ``mean(term)``, ``sum(term)`` or ``term`` itself. ``mean(term)`` is exactly TRL's
``-logsigmoid(c - r - m).mean() + center_coef * mean((c + r) ** 2)``.

K-wise, per prompt ``b`` with K responses, every ordered pair ``(i, j)`` where response ``i`` is
ranked strictly better (lower rank, both ranks >= 0) contributes ``-logsigmoid(r_i - r_j)``; the
loss is the mean over all such pairs of the whole batch.

The forward kernels also write the gradient of each term w.r.t. its inputs (Liger style): the
terms are elementwise (pairwise) or row-local (K-wise), so the backward is only a scale by
``grad_output``, done by the autograd Functions in ``fastrm.ops.ranking``. Reductions go through
a per-program partial-sum buffer that torch sums afterwards: deterministic, no atomics.

All arithmetic is float32 whatever the input dtype (bf16 / fp16 / fp32 are loaded and upcast);
float64 inputs use the PyTorch path in ``fastrm.ops.ranking``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastrm.kernels import HAS_TRITON, kernel_op, new_output, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

# Pairwise: one program per PAIRWISE_BLOCK elements. The op is memory-trivial ([B] tensors), so a
# large block keeps the partial-sum buffer (and the interpreter's per-program overhead) small;
# 1024 elements over 4 warps is 8 per thread.
PAIRWISE_BLOCK = 1024
PAIRWISE_NUM_WARPS = 4

# K-wise: one program per prompt row, holding the row's K rewards in a BLOCK_K-wide vector.
# K is small in practice (2..16), so one warp is plenty; wider rows get more warps so each
# thread keeps at most ~RANKING_ELEMS_PER_THREAD lanes of each vector in registers (8 took 111-128
# registers at K = 300 on sm_80/sm_90; 4 keeps it near 64).
RANKING_ELEMS_PER_THREAD = 4
RANKING_MAX_WARPS = 8


def _ranking_num_warps(block_k: int) -> int:
    warps = max(1, block_k // (32 * RANKING_ELEMS_PER_THREAD))
    return min(RANKING_MAX_WARPS, next_power_of_2(warps))


if HAS_TRITON:

    @triton.jit
    def _neg_logsigmoid_and_sigmoid_neg(x):
        """Return ``(-logsigmoid(x), sigmoid(-x))``; ``d/dx -logsigmoid(x) = -sigmoid(-x)``.

        Both are written in ``e = exp(-|x|)``, which lies in (0, 1] for any x, so nothing
        overflows: |x| = 1e4 gives a loss of ~|x| or ~0 and a gradient of -1 or ~0, never inf/NaN.
        """
        e = tl.exp(-tl.abs(x))
        # -logsigmoid(x) = softplus(-x) = max(-x, 0) + log1p(exp(-|x|)). Triton has no portable
        # log1p, and log(1 + e) rounds to 0 once e < fp32 eps; below 1e-4 the series e - e^2/2 is
        # accurate to ~e^3/3, which keeps the relative precision of confident pairs' tiny losses.
        log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
        loss = tl.maximum(-x, 0.0) + log1p_e
        # sigmoid(-x) = 1 / (1 + exp(x)); for x >= 0 that is e / (1 + e), for x < 0 it is 1 / (1 + e).
        sig_neg = tl.where(x >= 0, e / (1.0 + e), 1.0 / (1.0 + e))
        return loss, sig_neg

    @triton.jit
    def _pairwise_fwd_kernel(
        chosen_ptr,
        rejected_ptr,
        margin_ptr,  # [N] per-element margin; a dummy unless HAS_MARGIN_TENSOR
        loss_ptr,  # fp32: [N] terms if PER_ELEMENT, else [n_programs] partial sums
        correct_ptr,  # fp32: [N] 0/1 if PER_ELEMENT, else [n_programs] counts of chosen > rejected
        grad_chosen_ptr,  # fp32 [N] d term_n / d chosen_n (unscaled by grad_output); dummy unless WRITE_GRADS
        grad_rejected_ptr,  # fp32 [N] d term_n / d rejected_n
        grad_margin_ptr,  # fp32 [N] d term_n / d margin_n; dummy unless WRITE_MARGIN_GRAD
        N,
        stride_chosen,
        stride_rejected,
        stride_margin,
        margin_value,  # scalar margin when there is no margin tensor (0.0 for none)
        center_coef,
        HAS_MARGIN_TENSOR: tl.constexpr,
        HAS_CENTER: tl.constexpr,
        PER_ELEMENT: tl.constexpr,
        WRITE_GRADS: tl.constexpr,
        WRITE_MARGIN_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 so offsets * stride cannot wrap for strided views of large tensors.
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N

        chosen = tl.load(chosen_ptr + offs * stride_chosen, mask=mask, other=0.0).to(tl.float32)
        rejected = tl.load(rejected_ptr + offs * stride_rejected, mask=mask, other=0.0).to(tl.float32)
        if HAS_MARGIN_TENSOR:
            margin = tl.load(margin_ptr + offs * stride_margin, mask=mask, other=0.0).to(tl.float32)
            x = chosen - rejected - margin
        else:
            x = chosen - rejected - margin_value

        term, sig_neg = _neg_logsigmoid_and_sigmoid_neg(x)
        center = chosen + rejected
        if HAS_CENTER:
            # Skipped entirely when center_coef == 0 so that huge rewards cannot make 0 * inf = NaN.
            term += center_coef * center * center
        # Strict: a tie is not a correct ranking (as TRL's accuracy).
        correct = (chosen > rejected).to(tl.int32)

        if PER_ELEMENT:
            tl.store(loss_ptr + offs, term, mask=mask)
            tl.store(correct_ptr + offs, correct.to(tl.float32), mask=mask)
        else:
            # One partial sum per program; torch sums the small buffer afterwards.
            tl.store(loss_ptr + pid, tl.sum(tl.where(mask, term, 0.0), axis=0))
            # Counts are stored as fp32 (exact: at most BLOCK per program) so that the buffer can be
            # NaN-poisoned like every other output.
            tl.store(correct_ptr + pid, tl.sum(tl.where(mask, correct, 0), axis=0).to(tl.float32))

        if WRITE_GRADS:
            # d term / d x = -sigmoid(-x); x = chosen - rejected - margin.
            grad_chosen = -sig_neg
            grad_rejected = sig_neg
            if HAS_CENTER:
                grad_chosen += 2.0 * center_coef * center
                grad_rejected += 2.0 * center_coef * center
            tl.store(grad_chosen_ptr + offs, grad_chosen, mask=mask)
            tl.store(grad_rejected_ptr + offs, grad_rejected, mask=mask)
            if WRITE_MARGIN_GRAD:
                tl.store(grad_margin_ptr + offs, sig_neg, mask=mask)

    @triton.jit
    def _ranking_fwd_kernel(
        rewards_ptr,  # [B, K]
        ranks_ptr,  # [B, K] integer; lower is better, < 0 means missing
        loss_ptr,  # fp32 [B]: sum over the row's valid pairs of -logsigmoid(r_i - r_j)
        pairs_ptr,  # fp32 [B]: number of valid pairs in the row (exact below 2**24, i.e. K < 5793)
        correct_ptr,  # fp32 [B]: valid pairs with r_i > r_j
        grad_ptr,  # fp32 [B, K] contiguous: d(row loss sum) / d rewards; dummy unless WRITE_GRADS
        K,
        stride_rewards_b,
        stride_rewards_k,
        stride_ranks_b,
        stride_ranks_k,
        WRITE_GRADS: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # One program per prompt row; the K x K pair matrix is never formed: the loop runs over the
        # anchor i and each step handles the pairs (i, j) for all j as one BLOCK_K-wide vector.
        row = tl.program_id(0).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rewards_row = rewards_ptr + row * stride_rewards_b
        ranks_row = ranks_ptr + row * stride_ranks_b

        reward_j = tl.load(rewards_row + offs_k * stride_rewards_k, mask=mask_k, other=0.0).to(tl.float32)
        rank_j = tl.load(ranks_row + offs_k * stride_ranks_k, mask=mask_k, other=0).to(tl.int64)

        loss_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        pairs_acc = tl.zeros([BLOCK_K], dtype=tl.int32)
        correct_acc = tl.zeros([BLOCK_K], dtype=tl.int32)
        grad = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in range(0, K):
            reward_i = tl.load(rewards_row + i * stride_rewards_k).to(tl.float32)
            rank_i = tl.load(ranks_row + i * stride_ranks_k).to(tl.int64)
            # i beats j: both present and rank_i < rank_j (which already implies rank_j >= 0).
            # Equal ranks are ties and form no pair; the pair (i, i) never qualifies. Padding lanes
            # are masked explicitly: no `other=` value would read as "missing" for unsigned ranks.
            valid = mask_k & (rank_i >= 0) & (rank_i < rank_j)
            x = reward_i - reward_j
            pair_loss, sig_neg = _neg_logsigmoid_and_sigmoid_neg(x)
            # where, not multiply: a missing response may carry a non-finite reward.
            loss_acc += tl.where(valid, pair_loss, 0.0)
            pairs_acc += valid.to(tl.int32)
            correct_acc += (valid & (reward_i > reward_j)).to(tl.int32)
            if WRITE_GRADS:
                # d/dr_j -logsigmoid(r_i - r_j) = sigmoid(-x); d/dr_i is its negation, summed over j.
                g = tl.where(valid, sig_neg, 0.0)
                grad += g
                grad -= tl.where(offs_k == i, tl.sum(g, axis=0), 0.0)

        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0))
        tl.store(pairs_ptr + row, tl.sum(pairs_acc, axis=0).to(tl.float32))
        tl.store(correct_ptr + row, tl.sum(correct_acc, axis=0).to(tl.float32))
        if WRITE_GRADS:
            tl.store(grad_ptr + row * K + offs_k, grad, mask=mask_k)


def _pairwise_ranking_fwd_fake(chosen, rejected, margin, margin_value, center_coef, *, per_element, write_grads,
                               write_margin_grad):
    n = chosen.numel()
    size = n if per_element else -(-n // PAIRWISE_BLOCK)
    grad = (lambda: chosen.new_empty(n, dtype=torch.float32)) if write_grads else (lambda: None)
    return (chosen.new_empty(size, dtype=torch.float32), chosen.new_empty(size, dtype=torch.float32), grad(), grad(),
            chosen.new_empty(n, dtype=torch.float32) if write_grads and write_margin_grad and margin is not None
            else None)


@kernel_op("pairwise_ranking_fwd", _pairwise_ranking_fwd_fake)
def pairwise_ranking_fwd(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None,
    margin_value: float,
    center_coef: float,
    *,
    per_element: bool,
    write_grads: bool,
    write_margin_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_pairwise_fwd_kernel`` on 1-D (possibly strided) ``chosen`` / ``rejected`` / ``margin``.

    Returns ``(loss, correct, grad_chosen, grad_rejected, grad_margin)``: ``loss`` is fp32 [N] terms
    (``per_element``) or fp32 [n_programs] partial sums; ``correct`` is fp32 [N] 0/1 or fp32
    [n_programs] counts; the grads are fp32 [N] or None when not requested.
    """
    n = chosen.numel()
    device = chosen.device
    n_programs = triton.cdiv(n, PAIRWISE_BLOCK)
    if per_element:
        loss = new_output((n,), dtype=torch.float32, device=device)
        correct = new_output((n,), dtype=torch.float32, device=device)
    else:
        loss = new_output((n_programs,), dtype=torch.float32, device=device)
        correct = new_output((n_programs,), dtype=torch.float32, device=device)
    grad_chosen = grad_rejected = grad_margin = None
    if write_grads:
        grad_chosen = new_output((n,), dtype=torch.float32, device=device)
        grad_rejected = new_output((n,), dtype=torch.float32, device=device)
        if write_margin_grad:
            grad_margin = new_output((n,), dtype=torch.float32, device=device)
    # Pointers the kernel never touches (their constexpr flag is off) get a dummy tensor.
    dummy = loss
    _pairwise_fwd_kernel[(n_programs,)](
        chosen,
        rejected,
        margin if margin is not None else dummy,
        loss,
        correct,
        grad_chosen if grad_chosen is not None else dummy,
        grad_rejected if grad_rejected is not None else dummy,
        grad_margin if grad_margin is not None else dummy,
        n,
        chosen.stride(0),
        rejected.stride(0),
        margin.stride(0) if margin is not None else 0,
        float(margin_value),  # float(): Triton would type a Python int as i32 (and specialise 1)
        float(center_coef),
        HAS_MARGIN_TENSOR=margin is not None,
        HAS_CENTER=center_coef != 0.0,
        PER_ELEMENT=per_element,
        WRITE_GRADS=write_grads,
        WRITE_MARGIN_GRAD=write_grads and write_margin_grad and margin is not None,
        BLOCK=PAIRWISE_BLOCK,
        num_warps=PAIRWISE_NUM_WARPS,
    )
    return loss, correct, grad_chosen, grad_rejected, grad_margin


def _ranking_fwd_fake(rewards, ranks, *, write_grads):
    batch = rewards.shape[0]
    return (rewards.new_empty(batch, dtype=torch.float32), rewards.new_empty(batch, dtype=torch.float32),
            rewards.new_empty(batch, dtype=torch.float32),
            rewards.new_empty(rewards.shape, dtype=torch.float32) if write_grads else None)


@kernel_op("ranking_fwd", _ranking_fwd_fake)
def ranking_fwd(rewards: torch.Tensor, ranks: torch.Tensor, *,
                write_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch ``_ranking_fwd_kernel`` on [B, K] (possibly strided) ``rewards`` / ``ranks``.

    Returns per-row ``(loss_sum, pairs, correct)`` (fp32 [B] each; the counts are whole numbers) and the fp32 [B, K]
    gradient of the summed pair losses (None unless ``write_grads``).
    """
    batch, k = rewards.shape
    device = rewards.device
    loss = new_output((batch,), dtype=torch.float32, device=device)
    pairs = new_output((batch,), dtype=torch.float32, device=device)
    correct = new_output((batch,), dtype=torch.float32, device=device)
    grad = new_output((batch, k), dtype=torch.float32, device=device) if write_grads else None
    block_k = next_power_of_2(k)
    _ranking_fwd_kernel[(batch,)](
        rewards,
        ranks,
        loss,
        pairs,
        correct,
        grad if grad is not None else loss,  # dummy when WRITE_GRADS is off
        k,
        rewards.stride(0),
        rewards.stride(1),
        ranks.stride(0),
        ranks.stride(1),
        WRITE_GRADS=write_grads,
        BLOCK_K=block_k,
        num_warps=_ranking_num_warps(block_k),
    )
    return loss, pairs, correct, grad


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch references: the formulas a user writes, for tests and benchmarks.
# ----------------------------------------------------------------------------------------------


def pairwise_ranking_loss_reference(chosen, rejected, margin=None, center_coef=0.0, reduction="mean"):
    """TRL RewardTrainer's loss: ``-logsigmoid(c - r - m).mean() + center_coef * mean((c + r) ** 2)``.

    ``reduction="sum"`` sums both terms, ``"none"`` returns the per-element terms (whose mean is
    the ``"mean"`` loss). Computed in the inputs' dtype; pass float64 tensors for a ground truth.
    """
    x = chosen - rejected if margin is None else chosen - rejected - margin
    nll = -F.logsigmoid(x)
    center = (chosen + rejected) ** 2
    if reduction == "mean":
        return nll.mean() + center_coef * torch.mean(center)
    if reduction == "sum":
        return nll.sum() + center_coef * torch.sum(center)
    if reduction == "none":
        return nll + center_coef * center
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def ranking_loss_reference(rewards, ranks):
    """Naive K-wise loss: builds the [B, K, K] pair matrix, then the mean over valid pairs of
    ``-logsigmoid(r_i - r_j)`` (i ranked strictly better than j, both ranks >= 0)."""
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
    rank_i = ranks[:, :, None]
    rank_j = ranks[:, None, :]
    valid = (rank_i >= 0) & (rank_j >= 0) & (rank_i < rank_j)
    return -F.logsigmoid(diff[valid]).mean()
