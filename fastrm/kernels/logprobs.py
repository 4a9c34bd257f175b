"""Per-token log-probabilities (and entropy) gathered from logits without a full log-softmax.

Rows are the flattened leading dims of ``logits [..., V]``. Each program owns one row and makes
one pass over the vocabulary with an online log-sum-exp, so neither the softmax nor the
log-softmax ever exists in memory. Backward recomputes the softmax block by block from the
saved per-row log-sum-exp and writes ``grad * (onehot - softmax) / temperature`` straight into the
gradient buffer, which may be the logits buffer itself.

Options (compile-time flags, so the plain path is unchanged): ``softcap`` (Gemma-2/3's
``final_logit_softcapping``) turns each logit x into ``softcap * tanh(x / softcap)`` before the
temperature, in forward and backward; ``K`` candidate labels per row (``labels [n_rows, K]``) gather
``K`` log-probs from the one pass over the row, and backward writes the sum of their one-hot terms.

Rows need not be contiguous with each other: a row lives at
``(row // n_inner) * stride_outer + (row % n_inner) * stride_inner``, which covers views such as
``logits[:, :-1, :]`` without the copy a ``reshape(-1, V)`` would make.
"""

import torch

from fastrm.kernels import HAS_TRITON, interpreter_settings, kernel_op, new_output, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

# One row's vocabulary is streamed in blocks of BLOCK_V. On a GPU 4096 fp32 values per block keep
# 16 values per thread with 8 warps: enough to hide load latency without spilling. The interpreter
# pays per block iteration, not per element, so it gets the biggest block that is still cheap.
BLOCK_V_GPU = 4096
BLOCK_V_INTERPRET = 32768
NUM_WARPS = 8


if HAS_TRITON:

    @triton.jit
    def _tanh(y):
        # tl has no tanh that the interpreter runs; from exp(-2|y|) it cannot overflow. Absolute error
        # ~1e-7 (float32 rounding of 1 - e near y = 0), i.e. ~softcap * 1e-7 on a capped logit.
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(y < 0.0, -t, t)

    @triton.jit
    def _row_labels(labels_ptr, row, n_labels, ignore_index, MULTI_LABEL: tl.constexpr, BLOCK_K: tl.constexpr):
        """The row's label (a scalar), or its K candidate labels (a [BLOCK_K] vector, padded with
        ignore_index), and whether the whole row is ignored."""
        if MULTI_LABEL:
            k = tl.arange(0, BLOCK_K)
            label = tl.load(labels_ptr + row * n_labels + k, mask=k < n_labels, other=ignore_index).to(tl.int64)
            ignored = tl.sum((label != ignore_index).to(tl.int32), axis=0) == 0
        else:
            label = tl.load(labels_ptr + row).to(tl.int64)
            ignored = label == ignore_index
        return label, ignored

    @triton.jit
    def _logprob_fwd_kernel(
        logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        n_inner, stride_outer, stride_inner,
        V, inv_temperature, ignore_index, softcap, n_labels,
        RETURN_ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        MULTI_LABEL: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 for big N x V
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        label, ignored = _row_labels(labels_ptr, row, n_labels, ignore_index, MULTI_LABEL, BLOCK_K)

        if ignored:
            if MULTI_LABEL:
                k = tl.arange(0, BLOCK_K)
                tl.store(logprobs_ptr + row * n_labels + k, tl.zeros([BLOCK_K], tl.float32), mask=k < n_labels)
            else:
                tl.store(logprobs_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
        else:
            # Online log-sum-exp over z = logits / T: running max m and running sum s = sum exp(z - m), rescaled
            # whenever m grows. For the entropy, t = sum exp(z - m) * (z - m), also relative to the running max:
            # H = log s - t / s is then a sum of two non-negative terms. (Accumulating sum exp(z - m) * z and
            # taking lse - t/s instead cancels catastrophically for near-one-hot rows with large logits: at
            # logits ~1e4 both terms are ~1e4 and their fp32 rounding, ~1e-3, swamps an entropy of ~1e-7.)
            m = float("-inf")
            s = 0.0
            t = 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                if HAS_SOFTCAP:  # softcap(-inf) is -softcap: lanes past V are put back to -inf
                    z = tl.where(offs < V, softcap * _tanh(z / softcap), float("-inf"))
                z = z * inv_temperature
                m_new = tl.maximum(m, tl.max(z, axis=0))
                # A block of only -inf (masked vocabulary) must not turn exp(-inf - -inf) into NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                shift = m - m_safe  # <= 0; -inf while nothing has been summed (s == 0)
                rescale = tl.exp(shift)
                e = tl.exp(z - m_safe)
                if RETURN_ENTROPY:
                    # Moving the reference from m to m_safe adds shift to every (z - m) summed so far.
                    t = rescale * (t + tl.where(s > 0.0, shift, 0.0) * s)
                    t += tl.sum(e * tl.where(e > 0.0, z - m_safe, 0.0), axis=0)
                s = s * rescale + tl.sum(e, axis=0)
                m = m_new
            log_s = tl.log(s)
            # A label outside [0, V) (possible only while a deferred value check is still to report it) reads
            # nothing: its log-prob is NaN, never memory past the row.
            if MULTI_LABEL:
                k = tl.arange(0, BLOCK_K)
                kept = label != ignore_index
                in_range = kept & (label >= 0) & (label < V)
                z_label = tl.load(row_ptr + tl.where(in_range, label, 0), mask=in_range,
                                  other=float("nan")).to(tl.float32)
            else:
                z_label = tl.load(row_ptr + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
            if HAS_SOFTCAP:
                z_label = softcap * _tanh(z_label / softcap)
            # (z - m) - log s rather than z - lse: z - m is exact, so large logits lose no precision here.
            logprob = (z_label * inv_temperature - m) - log_s
            if MULTI_LABEL:
                tl.store(logprobs_ptr + row * n_labels + k, tl.where(kept, logprob, 0.0), mask=k < n_labels)
            else:
                tl.store(logprobs_ptr + row, logprob)
            tl.store(lse_ptr + row, m + log_s)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, log_s - t / s)

    @triton.jit
    def _logprob_bwd_kernel(
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_logits_ptr,
        n_inner, stride_outer, stride_inner,
        g_n_inner, g_stride_outer, g_stride_inner,
        V, inv_temperature, ignore_index, softcap, n_labels,
        HAS_GRAD_ENTROPY: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        MULTI_LABEL: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        grad_row_ptr = grad_logits_ptr + (row // g_n_inner) * g_stride_outer + (row % g_n_inner) * g_stride_inner
        label, ignored = _row_labels(labels_ptr, row, n_labels, ignore_index, MULTI_LABEL, BLOCK_K)

        if ignored:
            # The gradient buffer may be uninitialised (or the logits themselves): write the zeros.
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], tl.float32).to(grad_logits_ptr.dtype.element_ty),
                         mask=offs < V)
        else:
            lse = tl.load(lse_ptr + row)
            if MULTI_LABEL:
                # The K one-hot terms land on their labels; the softmax term is scaled by their sum.
                k = tl.arange(0, BLOCK_K)
                kept = label != ignore_index
                g_label = tl.where(kept, tl.load(grad_logprobs_ptr + row * n_labels + k, mask=kept, other=0.0), 0.0)
                g_logprob = tl.sum(g_label, axis=0)
            else:
                g_logprob = tl.load(grad_logprobs_ptr + row)
            if HAS_GRAD_ENTROPY:
                g_entropy = tl.load(grad_entropy_ptr + row)
                entropy = tl.load(entropy_ptr + row)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(z / softcap)
                    z = tl.where(offs < V, softcap * t, float("-inf"))
                z = z * inv_temperature
                p = tl.exp(z - lse)
                # d logprob / dz = onehot - p
                if MULTI_LABEL:
                    # One candidate at a time, unrolled (scalar loads, cached): a [BLOCK_V, BLOCK_K] compare
                    # holds BLOCK_K times the chunk in registers and spills on triton 3.6; a runtime loop
                    # carries the chunk through shared memory.
                    onehot = tl.zeros([BLOCK_V], tl.float32)
                    for j in tl.static_range(BLOCK_K):
                        label_j = tl.load(labels_ptr + row * n_labels + j, mask=j < n_labels,
                                          other=ignore_index).to(tl.int32)  # < V: int32 compares are cheaper
                        g_j = tl.load(grad_logprobs_ptr + row * n_labels + j,
                                      mask=(j < n_labels) & (label_j != ignore_index), other=0.0)
                        onehot += tl.where(offs == label_j, g_j, 0.0)
                else:
                    onehot = tl.where(offs == label, g_logprob, 0.0)
                g = onehot - g_logprob * p
                if HAS_GRAD_ENTROPY:
                    # H = -sum p log p  =>  dH/dz_j = -p_j (log p_j + H); p_j = 0 contributes nothing.
                    g -= g_entropy * p * tl.where(p > 0.0, z - lse + entropy, 0.0)
                g = g * inv_temperature
                if HAS_SOFTCAP:  # d softcap * tanh(x / softcap) / dx = 1 - tanh^2
                    g = g * (1.0 - t * t)
                tl.store(grad_row_ptr + offs, g.to(grad_logits_ptr.dtype.element_ty), mask=offs < V)


def _block_v(V: int) -> int:
    return min(BLOCK_V_INTERPRET if interpreter_settings() else BLOCK_V_GPU, next_power_of_2(V))


def _label_args(labels):
    """``(n_labels, MULTI_LABEL, BLOCK_K)`` for ``[n_rows]`` labels or ``[n_rows, K]`` candidate labels."""
    if labels.dim() == 1:
        return 1, False, 1
    K = labels.shape[1]
    return K, True, next_power_of_2(K)


def _logprob_fwd_fake(logits, layout, labels, temperature, ignore_index, return_entropy, softcap=None):
    n_rows = layout[0]
    return (logits.new_empty(tuple(labels.shape), dtype=torch.float32),
            logits.new_empty(n_rows, dtype=torch.float32) if return_entropy else None,
            logits.new_empty(n_rows, dtype=torch.float32))


@kernel_op("logprob_fwd", _logprob_fwd_fake)
def logprob_fwd(logits: torch.Tensor, layout: list[int], labels: torch.Tensor, temperature: float, ignore_index: int,
                return_entropy: bool,
                softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel. ``layout = (n_rows, n_inner, stride_outer, stride_inner)`` of the
    leading dims; ``labels`` is a contiguous ``[n_rows]`` (or ``[n_rows, K]``) int tensor; ``softcap``
    None or > 0. Returns float32 ``(logprobs [n_rows] (or [n_rows, K]), entropy [n_rows] or None,
    lse [n_rows])``."""
    n_rows, n_inner, stride_outer, stride_inner = layout
    V = logits.shape[-1]
    n_labels, multi_label, block_k = _label_args(labels)
    logprobs = new_output(tuple(labels.shape), dtype=torch.float32, device=logits.device)
    lse = new_output((n_rows,), dtype=torch.float32, device=logits.device)
    entropy = new_output((n_rows,), dtype=torch.float32, device=logits.device) if return_entropy else lse
    _logprob_fwd_kernel[(n_rows,)](
        logits, labels, logprobs, entropy, lse,
        n_inner, stride_outer, stride_inner,
        V, 1.0 / temperature, ignore_index, float(softcap or 1.0), n_labels,
        RETURN_ENTROPY=return_entropy, HAS_SOFTCAP=softcap is not None, MULTI_LABEL=multi_label, BLOCK_K=block_k,
        BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )
    return logprobs, (entropy if return_entropy else None), lse


def _logprob_bwd_fake(logits, layout, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                      grad_logits, grad_layout, softcap=None):
    return None


@kernel_op("logprob_bwd", _logprob_bwd_fake, mutates_args=("grad_logits",))
def logprob_bwd(logits: torch.Tensor, layout: list[int], labels: torch.Tensor, lse: torch.Tensor,
                entropy: torch.Tensor | None, grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None,
                temperature: float, ignore_index: int, grad_logits: torch.Tensor, grad_layout: list[int],
                softcap: float | None = None) -> None:
    """Launch the backward kernel, writing d logits into ``grad_logits`` laid out as ``grad_layout``
    (which may be ``logits`` itself with its own layout, for the in-place option). ``grad_logprobs``
    is contiguous and shaped like ``labels``."""
    n_rows, n_inner, stride_outer, stride_inner = layout
    _, g_n_inner, g_stride_outer, g_stride_inner = grad_layout
    V = logits.shape[-1]
    n_labels, multi_label, block_k = _label_args(labels)
    has_grad_entropy = grad_entropy is not None
    _logprob_bwd_kernel[(n_rows,)](
        logits, labels, lse, entropy if has_grad_entropy else lse,
        grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs, grad_logits,
        n_inner, stride_outer, stride_inner,
        g_n_inner, g_stride_outer, g_stride_inner,
        V, 1.0 / temperature, ignore_index, float(softcap or 1.0), n_labels,
        HAS_GRAD_ENTROPY=has_grad_entropy, HAS_SOFTCAP=softcap is not None, MULTI_LABEL=multi_label,
        BLOCK_K=block_k, BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )


def gather_logprobs_reference(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False,
                              softcap=None):
    """The eager formula most RLHF code runs: a full ``log_softmax`` then ``gather``.

    Materialises ``[..., V]`` float32 log-probs (and probs for the entropy); it is the baseline the
    benchmarks compare against and the float64 ground truth of the tests (pass float64 logits).
    ``labels`` is ``[...]`` or ``[..., K]`` (K candidates per position, as TRL's ``selective_log_softmax``);
    ``softcap`` applies ``softcap * tanh(logits / softcap)`` first (Gemma's ``final_logit_softcapping``).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    logp = torch.log_softmax(x / temperature, dim=-1)
    multi_label = labels.dim() == logits.dim()
    index = labels if multi_label else labels.unsqueeze(-1)
    keep = index != ignore_index
    picked = logp.gather(-1, torch.where(keep, index, 0).long())
    out = torch.where(keep, picked, 0.0)
    out = out if multi_label else out.squeeze(-1)
    if not return_entropy:
        return out
    p = logp.exp()
    row_kept = keep.any(-1)
    entropy = torch.where(row_kept, -(p * torch.where(p > 0, logp, 0.0)).sum(-1), 0.0)
    return out, entropy
