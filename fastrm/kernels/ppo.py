"""PPO losses: the clipped policy loss, the clipped value loss, and per-token KL penalties.

Policy loss, per token t of a [B, T] batch (valid where mask is 1)::

    log_ratio = clamp(logprobs - old_logprobs, -20, 20)         (verl's stability clamp)
    ratio     = exp(log_ratio)
    pg1       = -A * ratio
    pg2       = -A * clamp(ratio, 1 - eps, 1 + eps_high)
    loss_t    = max(pg1, pg2)                                   ("clipped" where pg2 > pg1)
    loss_t    = min(loss_t, -A * dual_clip)  where A < 0        (dual clip, when set; "dual-clipped"
                                                                 where A < 0 and loss_t > -A * dual_clip)

    d loss_t / d logprobs_t = -A * ratio  where neither clip is active and the log-ratio clamp is not
                                          active (|logprobs - old_logprobs| <= 20); 0 elsewhere.

(Where pg2 > pg1 the ratio lies outside the clip range, so clamp(ratio) is a constant there; inside the
range clamp(ratio) == ratio exactly and pg1 == pg2, which is not "clipped".)

Sequence-level ratio (GSPO, verl's ``loss_mode=gspo``, TRL's ``importance_sampling_level="sequence"``), with
SEQ_RATIO set: every token of row b uses the row's ratio ``s_b = exp(min(mean_valid(logprobs - old_logprobs), 10))``
with verl's stop-gradient construction ``log s_bt = sg(log s_b) + logprobs_t - sg(logprobs_t)``, so

    d loss_t / d logprobs_t = -A * s_b  where not clipped and the mean log-ratio is <= 10; 0 elsewhere.

The kernel then makes two passes over the row: the mean log-ratio first, the loss second.

CISPO (MiniMax-M1; CISPO set) and SAPO (SAPO set; s = sigmoid(tau (ratio - 1)), tau = tau_pos if A > 0 else tau_neg)
replace the clipped ratio, with the same ratio (token or sequence level)::

    CISPO: loss_t = -min(ratio, 1 + eps_high) * A * logprobs    d loss_t / d logprobs_t = -min(ratio, 1 + eps_high) * A
    SAPO:  loss_t = -A * s * 4 / tau                            d loss_t / d logprobs_t = -A * 4 s (1 - s) * ratio
    ("clipped": CISPO's ratio > 1 + eps_high; SAPO's never; SAPO's gradient is 0 past the log-ratio clamp.)

Value loss, per token::

    clipped_t = clamp(values, old_values - clip, old_values + clip)   (= old + clamp(values - old, ±clip))
    loss_t    = 0.5 * max((values - returns)^2, (clipped_t - returns)^2)     ("clipped" where the 2nd is larger)
    d loss_t / d values_t = values - returns  where not clipped; 0 where clipped

The clamp is written against the bounds, as TRL and verl write it, not as old + clamp(values - old): inside
the bounds it returns ``values`` bit for bit, so the two squared errors are equal and rounding can never
count an unclipped token as clipped.

Both forward kernels run one program per row and walk it in BLOCK_T chunks (64-bit row offsets, any
strides). They write the per-token gradient d loss_t / d input_t (Liger style: the gradient is computed in
the forward pass, 0 on masked positions) and per-row partial sums (loss, mask count, clipped counts, ...);
the aggregation over rows and the backward (a scale by grad_output and the row's aggregation weight) are
a few [B]-sized torch ops in ``fastrm.ops.ppo``. Masked positions are never loaded, and everything a
masked position could contribute goes through ``tl.where``, so NaN/inf there cannot leak.

KL penalty, per token, with d = logprobs - ref_logprobs (verl's ``kl_penalty``)::

    k1 = d        abs = |d|        k2 = 0.5 * d^2
    k3 = clamp(exp(x) - x - 1, -10, 10)  with x = clamp(ref_logprobs - logprobs, -20, 20)   (low_var_kl)

Every kind is a function of d, so d/d ref_logprobs = -d/d logprobs. The gradient is exactly that of the
formula as written (torch's conventions): abs has gradient 0 at d = 0, and a clamp passes the gradient
where its input lies inside the closed interval and blocks it outside. The forward and backward are
elementwise kernels on a 2-D grid (row, chunk of BLOCK_T columns), the backward recomputing from the inputs.

All arithmetic is float32 whatever the input dtype (bf16 / fp16 / fp32 are loaded and upcast); float64
inputs use the PyTorch path in ``fastrm.ops.ppo``. Nothing here checks user input or touches autograd.
"""

from __future__ import annotations

import torch

from fastrm.kernels import HAS_TRITON, kernel_op, mask_as_bytes, new_output, row_block_t, row_num_warps

if HAS_TRITON:
    import triton
    import triton.language as tl

# Chunk sizes and warps: the shared row-scan settings of fastrm.kernels (row_block_t, row_num_warps);
# tests pass a small block_t to cross chunk boundaries.

# Rows of the per-row statistics buffers written by the forward kernels (fp32 [N_STATS, B]).
POLICY_STATS = ("loss", "count", "clipped", "dual_clipped", "approx_kl", "ratio")
VALUE_STATS = ("loss", "count", "clipped")

# The verl stability clamp on the log-ratio, the upper clamp of GSPO's sequence log-ratio, and the clamps of
# the k3 ("low_var_kl") penalty.
LOG_RATIO_CLAMP = 20.0
SEQ_LOG_RATIO_MAX = 10.0
K3_LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0

KL_KINDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
# Straight-through estimators (verl's "k1+", "k3+", ...): the value of the base kind, the gradient of k2
# (d = logprobs - ref_logprobs), whose expected gradient is the KL's.
KL_STRAIGHT_THROUGH = {"k1+": "k1", "abs+": "abs", "k3+": "k3"}


if HAS_TRITON:

    @triton.jit
    def _ratio_inputs(start, lane, T, mask_row, stride_mt, logp_row, stride_lt, old_row, stride_ot):
        """Positions ``start + lane`` of a row: ``(t, in_row, valid, logprobs, old_logprobs)``, the two in fp32.
        Masked positions are never read: whatever they hold (NaN, inf) cannot reach a result."""
        t = (start + lane).to(tl.int64)
        in_row = t < T
        valid = in_row & (tl.load(mask_row + t * stride_mt, mask=in_row, other=0) != 0)
        logp = tl.load(logp_row + t * stride_lt, mask=valid, other=0.0).to(tl.float32)
        old = tl.load(old_row + t * stride_ot, mask=valid, other=0.0).to(tl.float32)
        return t, in_row, valid, logp, old

    # B only places one store per row: specialising it on divisibility would only add variants.
    @triton.jit(do_not_specialize=["B"])
    def _ppo_policy_fwd_kernel(
        logp_ptr, old_ptr, adv_ptr, mask_ptr,
        grad_ptr,  # fp32 [B, T] contiguous: d loss_t / d logprobs_t, 0 where masked; dummy unless WRITE_GRADS
        stats_ptr,  # fp32 [6, B]: per-row sums of loss, mask, clipped, dual-clipped, approx-KL k3, ratio
        B, T,
        stride_lb, stride_lt, stride_ob, stride_ot, stride_ab, stride_at, stride_mb, stride_mt,
        ratio_low, ratio_high, dual_clip,  # 1 - eps, 1 + eps_high, dual-clip ratio (unused unless HAS_DUAL_CLIP)
        log_ratio_clamp,  # token ratios: |log ratio| <= this; sequence ratios (SEQ_RATIO): log ratio <= this
        sapo_tau_pos, sapo_tau_neg,  # SAPO's temperatures (unused unless SAPO)
        HAS_DUAL_CLIP: tl.constexpr,
        WRITE_GRADS: tl.constexpr,
        SEQ_RATIO: tl.constexpr,
        CISPO: tl.constexpr,
        SAPO: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2**31
        logp_row = logp_ptr + row * stride_lb
        old_row = old_ptr + row * stride_ob
        adv_row = adv_ptr + row * stride_ab
        mask_row = mask_ptr + row * stride_mb
        grad_row = grad_ptr + row * T

        lane = tl.arange(0, BLOCK_T)
        if SEQ_RATIO:  # first pass: the row's mean log-ratio over its valid tokens
            acc_log_ratio = tl.zeros([BLOCK_T], dtype=tl.float32)
            acc_valid = tl.zeros([BLOCK_T], dtype=tl.int32)
            for start in range(0, T, BLOCK_T):
                _, _, valid, logp, old = _ratio_inputs(start, lane, T, mask_row, stride_mt, logp_row, stride_lt,
                                                       old_row, stride_ot)
                acc_log_ratio += tl.where(valid, logp - old, 0.0)
                acc_valid += valid.to(tl.int32)
            seq_raw = tl.sum(acc_log_ratio, axis=0) / tl.maximum(tl.sum(acc_valid, axis=0), 1).to(tl.float32)
        acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_ratio = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_count = tl.zeros([BLOCK_T], dtype=tl.int32)
        acc_clipped = tl.zeros([BLOCK_T], dtype=tl.int32)
        acc_dual = tl.zeros([BLOCK_T], dtype=tl.int32)
        for start in range(0, T, BLOCK_T):
            t, in_row, valid, logp, old = _ratio_inputs(start, lane, T, mask_row, stride_mt, logp_row, stride_lt,
                                                        old_row, stride_ot)
            adv = tl.load(adv_row + t * stride_at, mask=valid, other=0.0).to(tl.float32)

            if SEQ_RATIO:
                raw = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_raw
                log_ratio = tl.minimum(raw, log_ratio_clamp)
                outside_clamp = raw > log_ratio_clamp
            else:
                raw = logp - old
                log_ratio = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
                outside_clamp = (raw < -log_ratio_clamp) | (raw > log_ratio_clamp)
            ratio = tl.exp(log_ratio)
            if CISPO:  # the weight min(ratio, 1 + eps_high) is a constant: every token keeps -A * weight
                grad = -adv * tl.minimum(ratio, ratio_high)
                loss = grad * logp
                clipped = ratio > ratio_high
            elif SAPO:  # a sigmoid gate of the ratio, temperature by the advantage's sign; nothing is clipped
                tau = tl.where(adv > 0.0, sapo_tau_pos, sapo_tau_neg)
                gate = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
                loss = -adv * gate * (4.0 / tau)
                clipped = lane < 0
                grad = tl.where(outside_clamp, 0.0, -adv * 4.0 * gate * (1.0 - gate) * ratio)
            else:
                pg1 = -adv * ratio
                pg2 = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
                loss = tl.maximum(pg1, pg2)
                clipped = pg2 > pg1
                # d pg1 / d logp = -A * ratio, blocked by the log-ratio clamp (closed interval, as torch.clamp).
                grad = tl.where(clipped | outside_clamp, 0.0, pg1)
            if HAS_DUAL_CLIP:
                pg3 = -adv * dual_clip
                dual = (adv < 0.0) & (loss > pg3)
                loss = tl.where(dual, pg3, loss)
                grad = tl.where(dual, 0.0, grad)
                acc_dual += (valid & dual).to(tl.int32)

            acc_loss += tl.where(valid, loss, 0.0)
            acc_kl += tl.where(valid, (ratio - 1.0) - log_ratio, 0.0)
            acc_ratio += tl.where(valid, ratio, 0.0)
            acc_count += valid.to(tl.int32)
            acc_clipped += (valid & clipped).to(tl.int32)
            if WRITE_GRADS:
                tl.store(grad_row + t, tl.where(valid, grad, 0.0), mask=in_row)

        # Counts are stored as fp32 (exact below 2**24 per row) so the buffer can be NaN-poisoned whole.
        tl.store(stats_ptr + row, tl.sum(acc_loss, axis=0))
        tl.store(stats_ptr + B + row, tl.sum(acc_count, axis=0).to(tl.float32))
        tl.store(stats_ptr + 2 * B + row, tl.sum(acc_clipped, axis=0).to(tl.float32))
        tl.store(stats_ptr + 3 * B + row, tl.sum(acc_dual, axis=0).to(tl.float32))
        tl.store(stats_ptr + 4 * B + row, tl.sum(acc_kl, axis=0))
        tl.store(stats_ptr + 5 * B + row, tl.sum(acc_ratio, axis=0))

    @triton.jit(do_not_specialize=["B"])
    def _value_loss_fwd_kernel(
        v_ptr, old_ptr, ret_ptr, mask_ptr,
        grad_ptr,  # fp32 [B, T] contiguous: d loss_t / d values_t, 0 where masked; dummy unless WRITE_GRADS
        stats_ptr,  # fp32 [3, B]: per-row sums of loss, mask, clipped
        B, T,
        stride_vb, stride_vt, stride_ob, stride_ot, stride_rb, stride_rt, stride_mb, stride_mt,
        clip,
        HAS_CLIP: tl.constexpr,
        WRITE_GRADS: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        v_row = v_ptr + row * stride_vb
        old_row = old_ptr + row * stride_ob
        ret_row = ret_ptr + row * stride_rb
        mask_row = mask_ptr + row * stride_mb
        grad_row = grad_ptr + row * T

        lane = tl.arange(0, BLOCK_T)
        acc_loss = tl.zeros([BLOCK_T], dtype=tl.float32)
        acc_count = tl.zeros([BLOCK_T], dtype=tl.int32)
        acc_clipped = tl.zeros([BLOCK_T], dtype=tl.int32)
        for start in range(0, T, BLOCK_T):
            t = (start + lane).to(tl.int64)
            in_row = t < T
            valid = in_row & (tl.load(mask_row + t * stride_mt, mask=in_row, other=0) != 0)
            v = tl.load(v_row + t * stride_vt, mask=valid, other=0.0).to(tl.float32)
            ret = tl.load(ret_row + t * stride_rt, mask=valid, other=0.0).to(tl.float32)
            err = v - ret
            sq = err * err
            grad = err  # d 0.5 * (v - R)^2 / dv
            if HAS_CLIP:
                old = tl.load(old_row + t * stride_ot, mask=valid, other=0.0).to(tl.float32)
                v_clipped = tl.minimum(tl.maximum(v, old - clip), old + clip)
                err_c = v_clipped - ret
                sq_c = err_c * err_c
                clipped = sq_c > sq
                sq = tl.maximum(sq, sq_c)
                # Clipped implies values outside [old - clip, old + clip], where the clamp is constant.
                grad = tl.where(clipped, 0.0, grad)
                acc_clipped += (valid & clipped).to(tl.int32)
            acc_loss += tl.where(valid, 0.5 * sq, 0.0)
            acc_count += valid.to(tl.int32)
            if WRITE_GRADS:
                tl.store(grad_row + t, tl.where(valid, grad, 0.0), mask=in_row)

        tl.store(stats_ptr + row, tl.sum(acc_loss, axis=0))
        tl.store(stats_ptr + B + row, tl.sum(acc_count, axis=0).to(tl.float32))
        tl.store(stats_ptr + 2 * B + row, tl.sum(acc_clipped, axis=0).to(tl.float32))

    @triton.jit
    def _kl_terms(logp, ref, KIND: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr, log_ratio_clamp, k3_clamp):
        """Return ``(kl, d kl / d logp)`` in fp32; d kl / d ref is the negation of the second. With
        STRAIGHT_THROUGH the gradient is k2's, d = logp - ref, whatever the kind of the value."""
        d = logp - ref
        if KIND == 0:  # k1
            kl = d
            g = tl.full(d.shape, 1.0, tl.float32)
        elif KIND == 1:  # abs; sign(0) = 0 as torch's abs backward
            kl = tl.abs(d)
            g = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
        elif KIND == 2:  # k2
            kl = 0.5 * d * d
            g = d
        else:  # k3, written in x = ref - logp like verl (exact: a - b == -(b - a) in IEEE arithmetic)
            x_raw = ref - logp
            x = tl.minimum(tl.maximum(x_raw, -log_ratio_clamp), log_ratio_clamp)
            e = tl.exp(x)
            k = e - x - 1.0
            kl = tl.minimum(tl.maximum(k, -k3_clamp), k3_clamp)
            # d k / d x = e - 1 and d x / d logp = -1, each clamp passing the gradient on its closed interval.
            active = (x_raw >= -log_ratio_clamp) & (x_raw <= log_ratio_clamp) & (k >= -k3_clamp) & (k <= k3_clamp)
            g = tl.where(active, 1.0 - e, 0.0)
        if STRAIGHT_THROUGH:
            g = d
        return kl, g

    @triton.jit
    def _kl_fwd_kernel(
        logp_ptr, ref_ptr, out_ptr,  # out: fp32 [B, T] contiguous
        T,
        stride_lb, stride_lt, stride_rb, stride_rt,
        log_ratio_clamp, k3_clamp,
        KIND: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_row = t < T
        logp = tl.load(logp_ptr + row * stride_lb + t * stride_lt, mask=in_row, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + row * stride_rb + t * stride_rt, mask=in_row, other=0.0).to(tl.float32)
        kl, _ = _kl_terms(logp, ref, KIND, False, log_ratio_clamp, k3_clamp)
        tl.store(out_ptr + row * T + t, kl, mask=in_row)

    @triton.jit
    def _kl_bwd_kernel(
        logp_ptr, ref_ptr, gout_ptr,
        glogp_ptr, gref_ptr,  # [B, T] contiguous, in the inputs' dtype; each a dummy unless its flag is set
        T,
        stride_lb, stride_lt, stride_rb, stride_rt, stride_gb, stride_gt,
        log_ratio_clamp, k3_clamp,
        KIND: tl.constexpr,
        STRAIGHT_THROUGH: tl.constexpr,
        NEED_LOGP: tl.constexpr,
        NEED_REF: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_row = t < T
        logp = tl.load(logp_ptr + row * stride_lb + t * stride_lt, mask=in_row, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + row * stride_rb + t * stride_rt, mask=in_row, other=0.0).to(tl.float32)
        # grad_output may be a stride-0 expansion (e.g. from kl.sum()): strides, not a contiguous copy.
        gout = tl.load(gout_ptr + row * stride_gb + t * stride_gt, mask=in_row, other=0.0).to(tl.float32)
        _, g = _kl_terms(logp, ref, KIND, STRAIGHT_THROUGH, log_ratio_clamp, k3_clamp)
        g = g * gout
        if NEED_LOGP:
            tl.store(glogp_ptr + row * T + t, g.to(glogp_ptr.dtype.element_ty), mask=in_row)
        if NEED_REF:
            tl.store(gref_ptr + row * T + t, (-g).to(gref_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _stats_and_grad_fake(n_stats):
    def fake(x, *args, write_grads, **kwargs):
        B, T = x.shape
        return x.new_empty((n_stats, B), dtype=torch.float32), (
            x.new_empty((B, T), dtype=torch.float32) if write_grads else None)
    return fake


@kernel_op("ppo_policy_fwd", _stats_and_grad_fake(len(POLICY_STATS)))
def ppo_policy_fwd(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                   clip_eps: float, clip_eps_high: float, dual_clip: float | None, write_grads: bool,
                   seq_ratio: bool = False, cispo: bool = False, sapo: bool = False, sapo_tau_pos: float = 1.0,
                   sapo_tau_neg: float = 1.0, block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_ppo_policy_fwd_kernel`` on [B, T] inputs with any strides (``seq_ratio``: GSPO's sequence ratio;
    ``cispo``: CISPO's clipped stop-gradient weight instead of the clipped ratio; ``sapo``: SAPO's sigmoid gate).

    Returns ``(stats, grad)``: fp32 [6, B] per-row sums in the order of ``POLICY_STATS`` (the counts are
    whole numbers), and the fp32 [B, T] per-token d loss_t / d logprobs_t (0 where masked), or None
    unless ``write_grads``.
    """
    B, T = logprobs.shape
    device = logprobs.device
    stats = new_output((len(POLICY_STATS), B), dtype=torch.float32, device=device)
    grad = new_output((B, T), dtype=torch.float32, device=device) if write_grads else None
    block = row_block_t(T, block_t)
    _ppo_policy_fwd_kernel[(B,)](
        logprobs, old_logprobs, advantages, mask_as_bytes(mask),
        grad if grad is not None else stats,  # dummy when WRITE_GRADS is off
        stats,
        B, T,
        logprobs.stride(0), logprobs.stride(1), old_logprobs.stride(0), old_logprobs.stride(1),
        advantages.stride(0), advantages.stride(1), mask.stride(0), mask.stride(1),
        1.0 - float(clip_eps), 1.0 + float(clip_eps_high),
        float(dual_clip) if dual_clip is not None else 0.0,
        SEQ_LOG_RATIO_MAX if seq_ratio else LOG_RATIO_CLAMP,
        float(sapo_tau_pos), float(sapo_tau_neg),
        HAS_DUAL_CLIP=dual_clip is not None,
        WRITE_GRADS=write_grads,
        SEQ_RATIO=seq_ratio,
        CISPO=cispo,
        SAPO=sapo,
        BLOCK_T=block,
        num_warps=row_num_warps(block),
    )
    return stats, grad


@kernel_op("value_loss_fwd", _stats_and_grad_fake(len(VALUE_STATS)))
def value_loss_fwd(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                   clip: float | None, write_grads: bool,
                   block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch ``_value_loss_fwd_kernel`` on [B, T] inputs with any strides.

    Returns ``(stats, grad)``: fp32 [3, B] per-row sums in the order of ``VALUE_STATS`` and the fp32
    [B, T] per-token d loss_t / d values_t (0 where masked), or None unless ``write_grads``.
    """
    B, T = values.shape
    device = values.device
    stats = new_output((len(VALUE_STATS), B), dtype=torch.float32, device=device)
    grad = new_output((B, T), dtype=torch.float32, device=device) if write_grads else None
    block = row_block_t(T, block_t)
    _value_loss_fwd_kernel[(B,)](
        values, old_values, returns, mask_as_bytes(mask),
        grad if grad is not None else stats,
        stats,
        B, T,
        values.stride(0), values.stride(1), old_values.stride(0), old_values.stride(1),
        returns.stride(0), returns.stride(1), mask.stride(0), mask.stride(1),
        float(clip) if clip is not None else 0.0,
        HAS_CLIP=clip is not None,
        WRITE_GRADS=write_grads,
        BLOCK_T=block,
        num_warps=row_num_warps(block),
    )
    return stats, grad


def _kl_grid(B: int, T: int, block: int):
    # Rows on grid axis 0 (up to 2**31 - 1), column chunks on axis 1 (up to 65535 chunks on CUDA).
    return (B, triton.cdiv(T, block))


@kernel_op("kl_penalty_fwd", lambda logprobs, ref_logprobs, kind, block_t=None: logprobs.new_empty(
    logprobs.shape, dtype=torch.float32))
def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str,
                   block_t: int | None = None) -> torch.Tensor:
    """Launch ``_kl_fwd_kernel``; returns the fp32 [B, T] per-token penalty (a "+" kind: its base kind's)."""
    kind = KL_STRAIGHT_THROUGH.get(kind, kind)
    B, T = logprobs.shape
    out = new_output((B, T), dtype=torch.float32, device=logprobs.device)
    block = row_block_t(T, block_t)
    _kl_fwd_kernel[_kl_grid(B, T, block)](
        logprobs, ref_logprobs, out,
        T,
        logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
        K3_LOG_RATIO_CLAMP, K3_CLAMP,
        KIND=KL_KINDS[kind],
        BLOCK_T=block,
        num_warps=row_num_warps(block),
    )
    return out


def _kl_penalty_bwd_fake(grad_out, logprobs, ref_logprobs, kind, *, need_logprobs, need_ref, block_t=None):
    return (torch.empty_like(logprobs, memory_format=torch.contiguous_format) if need_logprobs else None,
            torch.empty_like(ref_logprobs, memory_format=torch.contiguous_format) if need_ref else None)


@kernel_op("kl_penalty_bwd", _kl_penalty_bwd_fake)
def kl_penalty_bwd(grad_out: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str, *,
                   need_logprobs: bool, need_ref: bool,
                   block_t: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launch ``_kl_bwd_kernel``; returns (d logprobs, d ref_logprobs), each in its input's dtype or None."""
    straight_through = kind in KL_STRAIGHT_THROUGH
    kind = KL_STRAIGHT_THROUGH.get(kind, kind)
    B, T = logprobs.shape
    device = logprobs.device
    g_logp = new_output((B, T), dtype=logprobs.dtype, device=device) if need_logprobs else None
    g_ref = new_output((B, T), dtype=ref_logprobs.dtype, device=device) if need_ref else None
    dummy = g_logp if g_logp is not None else g_ref
    block = row_block_t(T, block_t)
    _kl_bwd_kernel[_kl_grid(B, T, block)](
        logprobs, ref_logprobs, grad_out,
        g_logp if g_logp is not None else dummy,
        g_ref if g_ref is not None else dummy,
        T,
        logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
        grad_out.stride(0), grad_out.stride(1),
        K3_LOG_RATIO_CLAMP, K3_CLAMP,
        KIND=KL_KINDS[kind],
        STRAIGHT_THROUGH=straight_through,
        NEED_LOGP=need_logprobs,
        NEED_REF=need_ref,
        BLOCK_T=block,
        num_warps=row_num_warps(block),
    )
    return g_logp, g_ref


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch references, written the way verl writes them (verl/trainer/ppo/core_algos.py), for tests
# and benchmarks. Computed in the inputs' dtype; pass float64 tensors for a ground truth. They multiply by
# the mask as verl does, so they need finite values on masked positions too (fastrm's ops do not).
# ----------------------------------------------------------------------------------------------


def _masked_mean_reference(values, mask):
    return (values * mask).sum() / mask.sum()


def _agg_loss_reference(loss_mat, mask, agg, loss_scale_factor=None):
    """verl's ``agg_loss`` (one process), rows with no valid token left out of the seq-mean modes as verl
    0.9 does. ``seq-mean-token-sum-norm`` divides seq-mean-token-sum by ``loss_scale_factor`` (default: T)."""
    if agg == "token-mean":
        return _masked_mean_reference(loss_mat, mask)
    row_sum = (loss_mat * mask).sum(dim=-1)
    row_count = mask.sum(dim=-1)
    keep = row_count > 0
    if agg == "seq-mean-token-sum":
        return row_sum[keep].mean()
    if agg == "seq-mean-token-sum-norm":
        return row_sum[keep].mean() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    if agg == "seq-mean-token-mean":
        return (row_sum[keep] / row_count[keep]).mean()
    raise ValueError("agg must be 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum' or "
                     f"'seq-mean-token-sum-norm', got {agg!r}")


def ppo_policy_loss_reference(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, clip_eps_high=None,
                              dual_clip=None, agg="token-mean", ratio_level="token", loss_scale_factor=None,
                              policy_loss="ppo", sapo_taus=(1.0, 1.05)):
    """verl's vanilla ``compute_policy_loss`` + ``agg_loss`` (``ratio_level="sequence"``: verl's
    ``compute_policy_loss_gspo`` ratio, with the dual clip still applied when ``dual_clip`` is set).

    ``clip_eps`` / ``clip_eps_high`` are verl's ``cliprange_low`` / ``cliprange_high``, ``dual_clip`` its
    ``clip_ratio_c`` (None: no dual clip; verl always applies one, 3.0 by default). Returns
    ``(loss, clipfrac, approx_kl, ratio_mean, clipfrac_lower)``; approx_kl is the token mean of
    k3 = (ratio - 1) - log ratio (verl reports the k1 mean -log ratio instead). ``policy_loss``: "cispo" / "sapo"
    as in the module docstring (``sapo_taus``: tau where A > 0, tau elsewhere; dual_clip unused).
    """
    m = mask.to(logprobs.dtype)
    if ratio_level == "sequence":
        seq_log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp(min=1)
        negative_approx_kl = logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)
        negative_approx_kl = torch.clamp(negative_approx_kl, max=SEQ_LOG_RATIO_MAX)
    else:
        negative_approx_kl = torch.clamp(logprobs - old_logprobs, min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio = torch.exp(negative_approx_kl)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if policy_loss in ("cispo", "sapo"):  # MiniMax-M1 / SAPO, as TRL and verl write them; no dual clip
        zero = torch.zeros((), dtype=m.dtype, device=m.device)
        if policy_loss == "cispo":
            pg_losses = -torch.clamp(ratio, max=1 + high).detach() * advantages * logprobs
            clipfrac = _masked_mean_reference((ratio > 1 + high).to(m.dtype), m)
        else:
            tau = torch.where(advantages > 0, sapo_taus[0], sapo_taus[1]).to(ratio.dtype)
            pg_losses, clipfrac = -advantages * torch.sigmoid(tau * (ratio - 1)) * (4 / tau), zero
        metrics = [_masked_mean_reference(x, m).detach() for x in ((ratio - 1) - negative_approx_kl, ratio)]
        return _agg_loss_reference(pg_losses, m, agg, loss_scale_factor), clipfrac, *metrics, zero
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clipfrac = _masked_mean_reference(torch.gt(pg_losses2, pg_losses1).to(m.dtype), m)
    if dual_clip is not None:
        pg_losses3 = -advantages * dual_clip
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        clipfrac_lower = _masked_mean_reference((torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)).to(m.dtype), m)
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    else:
        clipfrac_lower = torch.zeros((), dtype=m.dtype, device=m.device)
        pg_losses = clip_pg_losses1
    approx_kl = _masked_mean_reference((ratio - 1) - negative_approx_kl, m)
    ratio_mean = _masked_mean_reference(ratio, m)
    loss = _agg_loss_reference(pg_losses, m, agg, loss_scale_factor)
    return loss, clipfrac, approx_kl, ratio_mean, clipfrac_lower


def value_loss_reference(values, old_values, returns, mask, clip=0.2, agg="token-mean", loss_scale_factor=None):
    """verl's ``compute_value_loss`` (= TRL's PPO value loss for token-mean). ``clip=None``: no clipping.

    Returns ``(loss, clipfrac)``.
    """
    m = mask.to(values.dtype)
    vf_losses1 = (values - returns) ** 2
    if clip is None:
        clipped_vf_losses = vf_losses1
        clipfrac = torch.zeros((), dtype=m.dtype, device=m.device)
    else:
        vpredclipped = torch.clamp(values, old_values - clip, old_values + clip)
        vf_losses2 = (vpredclipped - returns) ** 2
        clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
        clipfrac = _masked_mean_reference(torch.gt(vf_losses2, vf_losses1).to(m.dtype), m)
    return 0.5 * _agg_loss_reference(clipped_vf_losses, m, agg, loss_scale_factor), clipfrac


def kl_penalty_reference(logprobs, ref_logprobs, kind="k1"):
    """verl's ``kl_penalty``: ``k1`` ("kl"), ``abs``, ``k2`` ("mse"), ``k3`` ("low_var_kl"), and the
    straight-through ``k1+``, ``abs+``, ``k3+``: the base kind's value with k2's gradient."""
    if kind in KL_STRAIGHT_THROUGH:
        value = kl_penalty_reference(logprobs, ref_logprobs, KL_STRAIGHT_THROUGH[kind])
        k2 = 0.5 * (logprobs - ref_logprobs).square()
        return k2 - k2.detach() + value.detach()
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "k3":
        kl = ref_logprobs - logprobs
        kl = torch.clamp(kl, min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP)
        ratio = torch.exp(kl)
        kld = ratio - kl - 1
        return torch.clamp(kld, min=-K3_CLAMP, max=K3_CLAMP)
    raise ValueError(f"kind must be one of {tuple(KL_KINDS) + tuple(KL_STRAIGHT_THROUGH)}, got {kind!r}")


__all__ = [
    "POLICY_STATS",
    "VALUE_STATS",
    "KL_KINDS",
    "KL_STRAIGHT_THROUGH",
    "ppo_policy_fwd",
    "value_loss_fwd",
    "kl_penalty_fwd",
    "kl_penalty_bwd",
    "ppo_policy_loss_reference",
    "value_loss_reference",
    "kl_penalty_reference",
]
