"""Generalized Advantage Estimation (GAE) as one Triton launch for the whole batch.

Per row, with valid positions (mask 1) p_1 < p_2 < ... and gamma, lam:

    W_t     = values at the next valid position after t (bootstrap_value, or 0, after the last one)
    delta_t = rewards_t - values_t + gamma * W_t
    A_t     = delta_t + gamma * lam * A_(next valid position)       (0 after the last one)
    adv_t   = A_t,  ret_t = A_t + values_t   on valid positions;  0 on masked positions

Both W and A are first-order linear recurrences x_t = b_t + a_t * x_(t+1) run backwards in time, so each
is one `tl.associative_scan` over (a, b) pairs. A masked position is the identity element (a=1, b=0): the
state passes over it unchanged, which is what lets right/left padding and masked observation tokens in
multi-turn rollouts share one code path.

One program handles one row and walks it in chunks of BLOCK_T, carrying the scan state between chunks.
The forward walks from the end of the row; the chunk is loaded with *descending* offsets so that a plain
forward scan runs backwards in time. We do not use `associative_scan(..., reverse=True)`: with a
non-commutative combine (ours) the compiled reverse scan has been reported to disagree with the
interpreter (triton-lang/triton#4362), and reversed offsets cost nothing.

Nothing here checks user input or touches autograd (see fastrm/ops/gae.py).
"""

import torch

from fastrm.kernels import HAS_TRITON, kernel_op, mask_as_bytes, new_output, row_block_t, row_num_warps

if HAS_TRITON:  # without triton (e.g. macOS) the reference below and the PyTorch path still work
    import triton
    import triton.language as tl

# Chunk sizes and warps: the shared row-scan settings of fastrm.kernels (row_block_t, row_num_warps).

if HAS_TRITON:

    @triton.jit
    def _affine_combine(a1, b1, a2, b2):
        # Each (a, b) is the map x -> b + a * x. (a1, b1) is everything accumulated so far in scan order,
        # (a2, b2) the next element; the result applies (a1, b1) first, then (a2, b2). The scanned b at
        # lane i is then x_i = b_i + a_i * x_(i-1) with x_(-1) = 0.
        return a1 * a2, b2 + a2 * b1


    # T and the row strides (= T for contiguous inputs) are not specialised on divisibility: the chunk's
    # offsets descend, so nothing is vectorised either way, and a second variant would only cost a compile
    # whenever the padded length changes (tests/test_kernel_compile.py checks there is one).
    @triton.jit(do_not_specialize=["T", "stride_rb", "stride_vb", "stride_mb"])
    def _gae_fwd_kernel(
        r_ptr, v_ptr, m_ptr, boot_ptr, adv_ptr, ret_ptr,
        T,
        stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt, stride_boot,
        gamma, gamma_lam,
        HAS_BOOT: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        r_row = r_ptr + row * stride_rb
        v_row = v_ptr + row * stride_vb
        m_row = m_ptr + row * stride_mb
        adv_row = adv_ptr + row * T  # outputs are contiguous [B, T]
        ret_row = ret_ptr + row * T
        if HAS_BOOT:
            boot = tl.load(boot_ptr + row * stride_boot).to(tl.float32)
        else:
            boot = 0.0  # the episode ended: nothing follows the last valid position

        lane = tl.arange(0, BLOCK_T)
        # Scan state carried into the next (earlier) chunk: W and A at the first position of the chunk just
        # done, i.e. the position right after the chunk being processed.
        w_carry = 0.0
        a_carry = 0.0
        for start in range(0, T, BLOCK_T):
            # Lane 0 is the latest position of the chunk; lanes past the start of the row (t < 0) become
            # identity elements at the end of the scan order, where they cannot affect real positions.
            t = (T - start - 1 - lane).to(tl.int64)
            in_row = t >= 0

            # 1) W_t from position t+1: W_t = v_(t+1) if t+1 is valid, else W_(t+1). Position T is a
            #    virtual valid position holding the bootstrap value (0 when the episode ended).
            t_next = t + 1
            load_next = in_row & (t_next < T)
            m_next = tl.load(m_row + t_next * stride_mt, mask=load_next, other=1) != 0
            v_next = tl.load(v_row + t_next * stride_vt, mask=load_next, other=0).to(tl.float32)
            v_next = tl.where(t_next == T, boot, v_next)
            take_next = in_row & m_next
            a_w = tl.where(take_next, 0.0, 1.0)
            b_w = tl.where(take_next, v_next, 0.0)
            b_w = tl.where(lane == 0, b_w + a_w * w_carry, b_w)  # continue from the later chunk
            _, w = tl.associative_scan((a_w, b_w), 0, _affine_combine)
            w_carry = tl.sum(tl.where(lane == BLOCK_T - 1, w, 0.0), 0)

            # 2) A_t = delta_t + gamma*lam * A_(t+1) on valid t; a masked t is the identity (A_t = A_(t+1)).
            m = tl.load(m_row + t * stride_mt, mask=in_row, other=0) != 0
            r = tl.load(r_row + t * stride_rt, mask=in_row, other=0).to(tl.float32)
            v = tl.load(v_row + t * stride_vt, mask=in_row, other=0).to(tl.float32)
            delta = r - v + gamma * w
            a_g = tl.where(m, gamma_lam, 1.0)
            b_g = tl.where(m, delta, 0.0)
            b_g = tl.where(lane == 0, b_g + a_g * a_carry, b_g)
            _, A = tl.associative_scan((a_g, b_g), 0, _affine_combine)
            a_carry = tl.sum(tl.where(lane == BLOCK_T - 1, A, 0.0), 0)

            tl.store(adv_row + t, tl.where(m, A, 0.0), mask=in_row)
            tl.store(ret_row + t, tl.where(m, A + v, 0.0), mask=in_row)


    @triton.jit
    def _gae_bwd_kernel(
        gadv_ptr, gret_ptr, m_ptr, dr_ptr, dv_ptr, dboot_ptr,
        T,
        stride_gab, stride_gat, stride_grb, stride_grt, stride_mb, stride_mt, stride_dboot,
        gamma, gamma_lam,
        HAS_BOOT: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        # With G_t = m_t * (dL/dadv_t + dL/dret_t) and mu_t = dL/ddelta_t, the adjoint of the A recurrence is
        # mu_t = G_t + gamma*lam * Z_t where Z_t = mu at the last valid position before t (0 if none).
        # Z runs *forwards* in time: Z_(t+1) = mu_t if t is valid, else Z_t; i.e. Z_(t+1) = a_t*Z_t + b_t with
        # (a_t, b_t) = (gamma*lam, G_t) on valid t and the identity (1, 0) on masked t. Then
        #   d rewards_t = m_t * mu_t
        #   d values_t  = m_t * (dL/dret_t - mu_t + gamma * Z_t)   (v_t is W of the previous valid position)
        #   d bootstrap = gamma * Z_T                              (W of the last valid position)
        row = tl.program_id(0).to(tl.int64)
        ga_row = gadv_ptr + row * stride_gab
        gr_row = gret_ptr + row * stride_grb
        m_row = m_ptr + row * stride_mb
        dr_row = dr_ptr + row * T  # gradients are contiguous [B, T]
        dv_row = dv_ptr + row * T

        lane = tl.arange(0, BLOCK_T)
        z_carry = 0.0  # Z at the first position of the chunk (Z_0 = 0: nothing before the row)
        for lo in range(0, T, BLOCK_T):
            t = (lo + lane).to(tl.int64)
            in_row = t < T
            m = tl.load(m_row + t * stride_mt, mask=in_row, other=0) != 0
            g_ret = tl.load(gr_row + t * stride_grt, mask=in_row, other=0).to(tl.float32)
            g_adv = tl.load(ga_row + t * stride_gat, mask=in_row, other=0).to(tl.float32)
            g = tl.where(m, g_adv + g_ret, 0.0)

            # Z_t is an exclusive scan: lane i scans the element of position t-1. Lane 0's element is
            # replaced by the carried Z (the scan's x_(-1) is 0, so b = carry makes x_0 = carry).
            t_prev = t - 1
            load_prev = in_row & (t_prev >= 0)
            m_prev = tl.load(m_row + t_prev * stride_mt, mask=load_prev, other=0) != 0
            gp_ret = tl.load(gr_row + t_prev * stride_grt, mask=load_prev, other=0).to(tl.float32)
            gp_adv = tl.load(ga_row + t_prev * stride_gat, mask=load_prev, other=0).to(tl.float32)
            a_z = tl.where(m_prev, gamma_lam, 1.0)
            b_z = tl.where(m_prev, gp_adv + gp_ret, 0.0)
            b_z = tl.where(lane == 0, z_carry, b_z)
            _, z = tl.associative_scan((a_z, b_z), 0, _affine_combine)

            mu = g + gamma_lam * z
            tl.store(dr_row + t, tl.where(m, mu, 0.0).to(dr_ptr.dtype.element_ty), mask=in_row)
            dv = tl.where(m, g_ret - mu + gamma * z, 0.0)
            tl.store(dv_row + t, dv.to(dv_ptr.dtype.element_ty), mask=in_row)

            # Z after the last position of this chunk = Z at the first position of the next one.
            z_after = tl.where(m, mu, z)
            z_carry = tl.sum(tl.where(t == tl.minimum(lo + BLOCK_T, T) - 1, z_after, 0.0), 0)

        if HAS_BOOT:
            tl.store(dboot_ptr + row * stride_dboot, (gamma * z_carry).to(dboot_ptr.dtype.element_ty))





def _gae_fwd_fake(rewards, values, mask, bootstrap_value, gamma, lam, block_t=None):
    return rewards.new_empty(rewards.shape, dtype=torch.float32), rewards.new_empty(rewards.shape, dtype=torch.float32)


@kernel_op("gae_fwd", _gae_fwd_fake)
def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bootstrap_value: torch.Tensor | None,
            gamma: float, lam: float, block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs [B, T] with any strides; returns float32 (advantages, returns)."""
    B, T = rewards.shape
    adv = new_output((B, T), dtype=torch.float32, device=rewards.device)
    ret = new_output((B, T), dtype=torch.float32, device=rewards.device)
    has_boot = bootstrap_value is not None
    boot = bootstrap_value if has_boot else adv  # any valid pointer; never read without HAS_BOOT
    block = row_block_t(T, block_t)
    _gae_fwd_kernel[(B,)](
        rewards, values, mask_as_bytes(mask), boot, adv, ret,
        T,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
        mask.stride(0), mask.stride(1), boot.stride(0) if has_boot else 0,
        float(gamma), float(gamma) * float(lam),  # gamma*lam in double, rounded once
        HAS_BOOT=has_boot, BLOCK_T=block, num_warps=row_num_warps(block),
    )
    return adv, ret


def _gae_bwd_fake(grad_adv, grad_ret, mask, gamma, lam, *, rewards_dtype, values_dtype, bootstrap_dtype=None,
                  block_t=None):
    B, T = mask.shape
    return (mask.new_empty((B, T), dtype=rewards_dtype), mask.new_empty((B, T), dtype=values_dtype),
            mask.new_empty((B,), dtype=bootstrap_dtype) if bootstrap_dtype is not None else None)


@kernel_op("gae_bwd", _gae_bwd_fake)
def gae_bwd(grad_adv: torch.Tensor, grad_ret: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, *,
            rewards_dtype: torch.dtype, values_dtype: torch.dtype, bootstrap_dtype: torch.dtype | None = None,
            block_t: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel; returns (d rewards, d values, d bootstrap or None) in the input dtypes."""
    B, T = mask.shape
    device = mask.device
    d_rewards = new_output((B, T), dtype=rewards_dtype, device=device)
    d_values = new_output((B, T), dtype=values_dtype, device=device)
    has_boot = bootstrap_dtype is not None
    d_boot = new_output((B,), dtype=bootstrap_dtype, device=device) if has_boot else None
    block = row_block_t(T, block_t)
    _gae_bwd_kernel[(B,)](
        grad_adv, grad_ret, mask_as_bytes(mask), d_rewards, d_values, d_boot if has_boot else d_rewards,
        T,
        grad_adv.stride(0), grad_adv.stride(1), grad_ret.stride(0), grad_ret.stride(1),
        mask.stride(0), mask.stride(1), d_boot.stride(0) if has_boot else 0,
        float(gamma), float(gamma) * float(lam),
        HAS_BOOT=has_boot, BLOCK_T=block, num_warps=row_num_warps(block),
    )
    return d_rewards, d_values, d_boot


def compute_gae_reference(rewards, values, mask, gamma, lam, bootstrap_value=None):
    """The plain reversed-time Python loop (verl's mask-aware GAE, without whitening).

    Computes in the input dtype (float64 in, float64 out) and is differentiable by autograd, so it is the
    ground truth for values and gradients. Masked positions get advantage 0 and return 0.
    """
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    nextvalues = bootstrap_value.to(rewards.dtype) if bootstrap_value is not None else rewards.new_zeros(B)
    lastgaelam = rewards.new_zeros(B)
    advs = [None] * T
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        # A masked position leaves both the next value and the running advantage untouched.
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        advs[t] = lastgaelam
    adv = torch.stack(advs, dim=1)
    return adv * m, (adv + values) * m
