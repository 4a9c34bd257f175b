"""Per-token log-probabilities (and entropy) gathered from logits without a full log-softmax.

Rows are the flattened leading dims of ``logits [..., V]``. Each program owns one row and makes
one pass over the vocabulary with an online log-sum-exp, so neither the softmax nor the
log-softmax ever exists in memory. Backward recomputes the softmax block by block from the
saved per-row log-sum-exp and writes ``grad * (onehot - softmax) / temperature`` straight into the
gradient buffer, which may be the logits buffer itself.

Rows need not be contiguous with each other: a row lives at
``(row // n_inner) * stride_outer + (row % n_inner) * stride_inner``, which covers views such as
``logits[:, :-1, :]`` without the copy a ``reshape(-1, V)`` would make.
"""

import torch

from fastrm.kernels import HAS_TRITON, INTERPRET, new_output, next_power_of_2

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
    def _logprob_fwd_kernel(
        logits_ptr, labels_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        n_inner, stride_outer, stride_inner,
        V, inv_temperature, ignore_index,
        RETURN_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2**31 for big N x V
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        label = tl.load(labels_ptr + row).to(tl.int64)

        if label == ignore_index:
            tl.store(logprobs_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
        else:
            # Online log-sum-exp over z = logits / T: running max m, running sum s = sum exp(z - m),
            # and for the entropy t = sum exp(z - m) * z, all rescaled whenever m grows.
            m = float("-inf")
            s = 0.0
            t = 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temperature
                m_new = tl.maximum(m, tl.max(z, axis=0))
                # A block of only -inf (masked vocabulary) must not turn exp(-inf - -inf) into NaN.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                rescale = tl.exp(m - m_safe)
                e = tl.exp(z - m_safe)
                s = s * rescale + tl.sum(e, axis=0)
                if RETURN_ENTROPY:
                    t = t * rescale + tl.sum(e * tl.where(e > 0.0, z, 0.0), axis=0)
                m = m_new
            lse = m + tl.log(s)
            z_label = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
            tl.store(logprobs_ptr + row, z_label - lse)
            tl.store(lse_ptr + row, lse)
            if RETURN_ENTROPY:
                tl.store(entropy_ptr + row, lse - t / s)

    @triton.jit
    def _logprob_bwd_kernel(
        logits_ptr, labels_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_logits_ptr,
        n_inner, stride_outer, stride_inner,
        g_n_inner, g_stride_outer, g_stride_inner,
        V, inv_temperature, ignore_index,
        HAS_GRAD_ENTROPY: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        grad_row_ptr = grad_logits_ptr + (row // g_n_inner) * g_stride_outer + (row % g_n_inner) * g_stride_inner
        label = tl.load(labels_ptr + row).to(tl.int64)

        if label == ignore_index:
            # The gradient buffer may be uninitialised (or the logits themselves): write the zeros.
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(grad_row_ptr + offs, tl.zeros([BLOCK_V], tl.float32).to(grad_logits_ptr.dtype.element_ty),
                         mask=offs < V)
        else:
            lse = tl.load(lse_ptr + row)
            g_logprob = tl.load(grad_logprobs_ptr + row)
            if HAS_GRAD_ENTROPY:
                g_entropy = tl.load(grad_entropy_ptr + row)
                entropy = tl.load(entropy_ptr + row)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temperature
                p = tl.exp(z - lse)
                # d logprob / dz = onehot - p
                g = tl.where(offs == label, g_logprob, 0.0) - g_logprob * p
                if HAS_GRAD_ENTROPY:
                    # H = -sum p log p  =>  dH/dz_j = -p_j (log p_j + H); p_j = 0 contributes nothing.
                    g -= g_entropy * p * tl.where(p > 0.0, z - lse + entropy, 0.0)
                tl.store(grad_row_ptr + offs, (g * inv_temperature).to(grad_logits_ptr.dtype.element_ty), mask=offs < V)


def _block_v(V: int) -> int:
    return min(BLOCK_V_INTERPRET if INTERPRET else BLOCK_V_GPU, next_power_of_2(V))


def logprob_fwd(logits, layout, labels, temperature, ignore_index, return_entropy):
    """Launch the forward kernel. ``layout = (n_rows, n_inner, stride_outer, stride_inner)`` of the
    leading dims; ``labels`` is a contiguous ``[n_rows]`` int tensor.
    Returns float32 ``(logprobs [n_rows], entropy [n_rows] or None, lse [n_rows])``."""
    n_rows, n_inner, stride_outer, stride_inner = layout
    V = logits.shape[-1]
    logprobs = new_output((n_rows,), dtype=torch.float32, device=logits.device)
    lse = new_output((n_rows,), dtype=torch.float32, device=logits.device)
    entropy = new_output((n_rows,), dtype=torch.float32, device=logits.device) if return_entropy else lse
    _logprob_fwd_kernel[(n_rows,)](
        logits, labels, logprobs, entropy, lse,
        n_inner, stride_outer, stride_inner,
        V, 1.0 / temperature, ignore_index,
        RETURN_ENTROPY=return_entropy, BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )
    return logprobs, (entropy if return_entropy else None), lse


def logprob_bwd(logits, layout, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index,
                grad_logits, grad_layout):
    """Launch the backward kernel, writing d logits into ``grad_logits`` laid out as ``grad_layout``
    (which may be ``logits`` itself with its own layout, for the in-place option)."""
    n_rows, n_inner, stride_outer, stride_inner = layout
    _, g_n_inner, g_stride_outer, g_stride_inner = grad_layout
    V = logits.shape[-1]
    has_grad_entropy = grad_entropy is not None
    _logprob_bwd_kernel[(n_rows,)](
        logits, labels, lse, entropy if has_grad_entropy else lse,
        grad_logprobs, grad_entropy if has_grad_entropy else grad_logprobs, grad_logits,
        n_inner, stride_outer, stride_inner,
        g_n_inner, g_stride_outer, g_stride_inner,
        V, 1.0 / temperature, ignore_index,
        HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )
    return grad_logits


def gather_logprobs_reference(logits, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
    """The eager formula most RLHF code runs: a full ``log_softmax`` then ``gather``.

    Materialises ``[..., V]`` float32 log-probs (and probs for the entropy); it is the baseline the
    benchmarks compare against and the float64 ground truth of the tests (pass float64 logits).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    out = torch.where(keep, logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1), 0.0)
    if not return_entropy:
        return out
    p = logp.exp()
    entropy = torch.where(keep, -(p * torch.where(p > 0, logp, 0.0)).sum(-1), 0.0)
    return out, entropy
