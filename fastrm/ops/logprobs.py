"""``gather_logprobs``: log-probabilities (and entropy) of chosen tokens without a full log-softmax.

Drop-in for TRL's ``selective_log_softmax(logits, index)`` (also with ``K`` candidate indices per position,
``index [..., K]``) and verl's ``logprobs_from_logits(logits, labels)`` (+ ``entropy_from_logits`` with
``return_entropy=True``); ``softcap`` covers Gemma-2/3's ``final_logit_softcapping``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrm._checks import FLOAT_DTYPES, INT_DTYPES, check_finite, check_labels, check_positive, check_same_device
from fastrm._checks import check_tensor, host_reads_allowed
from fastrm._dispatch import resolve_backend
from fastrm.kernels import new_output
from fastrm.kernels.logprobs import logprob_bwd, logprob_fwd

OP = "gather_logprobs"
# The torch path works on blocks of rows holding about this many logits, so its float32 temporaries
# stay near 16 MB whatever N x V is (the eager formula materialises all of N x V, several times).
TORCH_CHUNK_ELEMENTS = 1 << 22


def row_layout(x: torch.Tensor):
    """Describe the leading dims of ``x [..., V]`` as ``(n_rows, n_inner, stride_outer, stride_inner)``.

    Leading dims that step over each other exactly are merged, so any contiguous-rows tensor and
    any two-level view such as ``logits[:, :-1, :]`` is addressed in place. Returns None when the
    rows need more than two strides (the caller then copies).
    """
    merged: list[list[int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        return 1, 1, 0, 0
    if len(merged) == 1:
        (n, s), = merged
        return n, n, 0, s
    if len(merged) == 2:
        (n_outer, s_outer), (n_inner, s_inner) = merged
        return n_outer * n_inner, n_inner, s_outer, s_inner
    return None


def _contiguous_layout(shape) -> tuple:
    V = shape[-1]
    n_rows = 1
    for size in shape[:-1]:
        n_rows *= size
    return n_rows, n_rows, 0, V


def check_softcap(op: str, softcap):
    """None (no capping) or a finite number > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{op}: softcap must be None or a number > 0, got {type(softcap).__name__}")
    return check_positive(op, "softcap", softcap)


def is_multi_label(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """True for ``labels [..., K]`` (K candidates per position), False for ``labels [...]``; else ValueError."""
    if labels.shape == logits.shape[:-1]:
        return False
    if labels.dim() == logits.dim() and labels.shape[:-1] == logits.shape[:-1]:
        return True
    raise ValueError(
        f"{OP}: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} (one label per position) "
        f"or logits.shape[:-1] + (K,) (K candidate labels per position), got {tuple(labels.shape)}"
    )


def _check_inputs(logits, labels, temperature, ignore_index, softcap):
    check_tensor(OP, "logits", logits, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(OP, "labels", labels, dtypes=INT_DTYPES)
    is_multi_label(logits, labels)
    check_same_device(OP, {"logits": logits, "labels": labels})
    check_positive(OP, "temperature", temperature)
    check_softcap(OP, softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    check_labels(OP, labels, logits.shape[-1], ignore_index)


class _GatherLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, layout, temperature, ignore_index, return_entropy, inplace_backward, softcap):
        logprobs, entropy, lse = logprob_fwd(logits, layout, labels, temperature, ignore_index, return_entropy,
                                             softcap)
        check_finite(OP, "logits", lse, " in a row whose label is not ignore_index")
        ctx.save_for_backward(logits, labels, lse, entropy if return_entropy else lse)
        ctx.layout, ctx.temperature, ctx.ignore_index, ctx.softcap = layout, temperature, ignore_index, softcap
        ctx.return_entropy, ctx.inplace_backward = return_entropy, inplace_backward
        return (logprobs, entropy) if return_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, labels, lse, entropy = ctx.saved_tensors
        grad_logprobs = _flat_grad(grad_logprobs, labels.shape, logits.device)
        grad_entropy = (_flat_grad(grad_entropy, lse.shape, logits.device)
                        if ctx.return_entropy and grad_entropy is not None else None)
        if ctx.inplace_backward:
            grad_logits, grad_layout = logits, ctx.layout
        else:
            grad_logits = new_output(logits.shape, dtype=logits.dtype, device=logits.device)
            grad_layout = _contiguous_layout(logits.shape)
        logprob_bwd(logits, ctx.layout, labels, lse, entropy, grad_logprobs, grad_entropy, ctx.temperature,
                    ctx.ignore_index, grad_logits, grad_layout, ctx.softcap)
        return grad_logits, None, None, None, None, None, None, None


def _logprob_fwd_setup_context(ctx, inputs, output):
    """Autograd of the ``fastrm::logprob_fwd`` custom op on its own: the backward above, never in place."""
    logits, layout, labels, temperature, ignore_index, return_entropy = inputs[:6]
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy if return_entropy else lse)
    ctx.layout, ctx.temperature, ctx.ignore_index = layout, temperature, ignore_index
    ctx.softcap = inputs[6] if len(inputs) > 6 else None
    ctx.return_entropy, ctx.inplace_backward = return_entropy, False
    ctx.mark_non_differentiable(lse)


def _logprob_fwd_backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    grad_logits = _GatherLogprobsTriton.backward(ctx, grad_logprobs, grad_entropy)[0]
    return (grad_logits,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("fastrm::logprob_fwd", _logprob_fwd_backward, setup_context=_logprob_fwd_setup_context)


def _flat_grad(grad, shape, device):
    """An upstream gradient as a contiguous float32 tensor of ``shape`` (zeros when autograd gave None)."""
    if grad is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return grad.reshape(shape).to(torch.float32).contiguous()


def _row_blocks(layout, V):
    """Yield ``(outer, inner_start, inner_end, row_start)`` blocks of about TORCH_CHUNK_ELEMENTS logits."""
    n_rows, n_inner, _, _ = layout
    rows_per_block = max(1, TORCH_CHUNK_ELEMENTS // V)
    for outer in range(n_rows // n_inner):
        for start in range(0, n_inner, rows_per_block):
            end = min(n_inner, start + rows_per_block)
            yield outer, start, end, outer * n_inner + start


def _scaled_block(block, compute_dtype, temperature, softcap=None):
    """``softcap * tanh(block / softcap) / temperature`` in the compute dtype (no cap when softcap is None);
    a view (no copy) when there is nothing to do."""
    block = block.to(compute_dtype)
    if softcap is not None:
        block = torch.tanh(block / softcap).mul_(softcap)
    return block if temperature == 1.0 else block / temperature


def _label_keep(labels, ignore_index):
    """``(keep, row_keep)``: labels that count (shaped like labels) and rows with at least one of them."""
    keep = labels != ignore_index
    return keep, (keep.any(-1) if labels.dim() == 2 else keep)


def _rows3(x, layout):
    n_rows, n_inner, stride_outer, stride_inner = layout
    return x.as_strided((n_rows // n_inner, n_inner, x.shape[-1]), (stride_outer, stride_inner, 1))  # same offset


def torch_block_fwd(block, labels, temperature, ignore_index, return_entropy, softcap=None):
    """Forward of the PyTorch path on one block of rows: ``block [R, V]`` (any float dtype, a view is
    fine), ``labels [R]`` or ``[R, K]``. Returns ``(logprobs, lse, entropy or None)``: logprobs shaped like
    labels, lse and entropy ``[R]``, in the compute dtype (float64 for float64 blocks, else float32);
    ignored labels get log-prob 0, rows with no kept label 0 everywhere.
    Shared with ``linear_logprobs``, which feeds it one chunk of ``hidden @ weight.T`` at a time."""
    compute_dtype = torch.float64 if block.dtype == torch.float64 else torch.float32
    z = _scaled_block(block, compute_dtype, temperature, softcap)
    keep, row_keep = _label_keep(labels, ignore_index)
    multi_label = labels.dim() == 2
    # A label outside [0, V) (only possible when a deferred check has yet to report it) reads nothing and
    # gives NaN: a GPU must not index out of bounds.
    in_range = keep & (labels >= 0) & (labels < z.shape[-1])
    index = torch.where(in_range, labels, 0).long()
    picked = z.gather(-1, index) if multi_label else z.gather(-1, index.unsqueeze(-1)).squeeze(-1)

    def per_label(row_values):  # a [R] quantity against labels [R] or [R, K]
        return row_values.unsqueeze(-1) if multi_label else row_values

    entropy = None
    if return_entropy:
        # Relative to the row max d = z - max: H = log s - sum(e d) / s with e = exp(d), s = sum(e), from
        # one exp pass. Not via z - lse, which would lose ulp(lse) (1e-3 at logits ~1e4) and swamp a
        # near-one-hot row's entropy.
        z_max = z.amax(dim=-1)
        z_ref = torch.where(torch.isfinite(z_max), z_max, 0.0)  # an all -inf row stays -inf, not NaN
        d = z - z_ref.unsqueeze(-1)
        e = torch.exp(d)
        s = e.sum(-1)
        log_s = s.log()
        block_lse = z_ref + log_s
        block_logprobs = (picked - per_label(z_ref)) - per_label(log_s)
        # a masked token (d = -inf, e = 0) adds 0, not 0 * -inf; NaN stays NaN
        ed = torch.linalg.vecdot(e, d.clamp_(min=torch.finfo(d.dtype).min))
        entropy = torch.where(row_keep, log_s - ed / s, 0.0)
    else:
        block_lse = torch.logsumexp(z, dim=-1)
        block_logprobs = picked - per_label(block_lse)
    logprobs = torch.where(keep, torch.where(in_range, block_logprobs, float("nan")), 0.0)
    lse = torch.where(row_keep, block_lse, 0.0)
    return logprobs, lse, entropy


def torch_block_bwd(block, labels, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index, out,
                    softcap=None):
    """Backward of the PyTorch path on one block of rows: writes d ``block`` into ``out [R, V]``, which
    may be ``block`` itself (in place). ``lse``, ``entropy`` are ``[R]`` and ``grad_logprobs`` is shaped
    like ``labels`` (``[R]`` or ``[R, K]``), in the compute dtype; ``grad_entropy`` is ``[R]`` or None (no
    entropy term). Rows with no kept label get zeros."""
    compute_dtype = lse.dtype
    use_entropy = grad_entropy is not None
    cap_slope = None
    if softcap is not None:
        # d softcap * tanh(x / softcap) / dx = 1 - tanh^2, taken before the block may be overwritten.
        cap_slope = 1 - torch.tanh(block.to(compute_dtype) / softcap).square()
    z = _scaled_block(block, compute_dtype, temperature, softcap)
    keep, row_keep = _label_keep(labels, ignore_index)
    # Work directly in the gradient buffer when its dtype allows: one [rows, V] pass fewer.
    direct = out.dtype == compute_dtype
    logp = torch.sub(z, lse.unsqueeze(-1), out=out if direct and not use_entropy else None)
    if use_entropy:
        # dH/dz_j = -p_j (log p_j + H); p_j = 0 (masked vocabulary) contributes nothing.
        g_ent = (grad_entropy / temperature).unsqueeze(-1)
        p = logp.exp()
        entropy_term = g_ent * p * torch.where(p > 0, logp + entropy.unsqueeze(-1), 0.0)
        g = torch.mul(p, 1.0, out=out if direct else None)
    else:
        g = logp.exp_()
    g_lp = torch.where(keep, grad_logprobs, 0.0) / temperature
    if labels.dim() == 1:
        g_lp = g_lp.unsqueeze(-1)
    g.mul_(-g_lp.sum(-1, keepdim=True))
    in_range = keep & (labels >= 0) & (labels < g.shape[-1])  # (see torch_block_fwd)
    if labels.dim() == 1:
        in_range = in_range.unsqueeze(-1)
    index = torch.where(in_range, labels.view(in_range.shape), 0).long()
    g.scatter_add_(-1, index, torch.where(in_range, g_lp, 0.0))  # the onehot terms
    if use_entropy:
        g.sub_(entropy_term)
    if cap_slope is not None:
        g.mul_(cap_slope)
    # Rows with no kept label get zeros by a fill, not a multiply: garbage there may be NaN.
    if host_reads_allowed(g.device):
        ignored = (~row_keep).nonzero().squeeze(-1)  # free on CPU, and then only those rows are touched
        if ignored.numel():
            g.index_fill_(0, ignored, 0.0)
    else:
        g.masked_fill_((~row_keep).unsqueeze(-1), 0.0)  # no data-dependent shape: no sync, traceable
    if not direct:
        out.copy_(g)
    return out


class _GatherLogprobsTorch(torch.autograd.Function):
    """The plain-PyTorch path: the same math in row blocks, recomputing the softmax in backward."""

    @staticmethod
    def forward(ctx, logits, labels, layout, temperature, ignore_index, return_entropy, inplace_backward, softcap):
        V = logits.shape[-1]
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n_rows = layout[0]
        rows = _rows3(logits, layout)
        logprobs = torch.empty(labels.shape, dtype=compute_dtype, device=logits.device)
        lse = torch.empty(n_rows, dtype=compute_dtype, device=logits.device)
        entropy = torch.empty_like(lse) if return_entropy else None
        for outer, start, end, row0 in _row_blocks(layout, V):
            sl = slice(row0, row0 + end - start)
            block_lp, block_lse, block_ent = torch_block_fwd(rows[outer, start:end], labels[sl], temperature,
                                                             ignore_index, return_entropy, softcap)
            logprobs[sl], lse[sl] = block_lp, block_lse
            if return_entropy:
                entropy[sl] = block_ent
        check_finite(OP, "logits", lse, " in a row whose label is not ignore_index")
        ctx.save_for_backward(logits, labels, lse, entropy if return_entropy else lse)
        ctx.layout, ctx.temperature, ctx.ignore_index, ctx.softcap = layout, temperature, ignore_index, softcap
        ctx.return_entropy, ctx.inplace_backward = return_entropy, inplace_backward
        return (logprobs, entropy) if return_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        logits, labels, lse, entropy = ctx.saved_tensors
        layout, temperature = ctx.layout, ctx.temperature
        V = logits.shape[-1]
        compute_dtype = lse.dtype
        n_rows = layout[0]
        grad_logprobs = (torch.zeros(labels.shape, dtype=compute_dtype, device=lse.device) if grad_logprobs is None
                         else grad_logprobs.reshape(labels.shape).to(compute_dtype))
        use_entropy = ctx.return_entropy and grad_entropy is not None
        if use_entropy:
            grad_entropy = grad_entropy.reshape(-1).to(compute_dtype)
        rows = _rows3(logits, layout)
        if ctx.inplace_backward:
            grad_logits, grad_rows = logits, rows
        else:
            grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            grad_rows = grad_logits.view(n_rows // layout[1], layout[1], V)
        for outer, start, end, row0 in _row_blocks(layout, V):
            sl = slice(row0, row0 + end - start)
            torch_block_bwd(rows[outer, start:end], labels[sl], lse[sl], entropy[sl], grad_logprobs[sl],
                            grad_entropy[sl] if use_entropy else None, temperature, ctx.ignore_index,
                            grad_rows[outer, start:end], ctx.softcap)
        return grad_logits, None, None, None, None, None, None, None


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    softcap: float | None = None,
    backend: str | None = None,
):
    """``log_softmax(logits / temperature)[..., labels]`` without materialising the log-softmax.

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 on the torch backend). Rows may be
            strided (e.g. ``logits[:, :-1]``); the last dim must be contiguous or it is copied.
        labels: ``[...]`` integer token ids in ``[0, V)``, or ``ignore_index``; or ``[..., K]``: K candidate
            labels per position (TRL's ``selective_log_softmax`` with ``index [..., K]``), all gathered from
            one pass over the row. Duplicates are fine (their gradients add up).
        temperature: sampling temperature the log-probs are taken at (> 0).
        ignore_index: label value whose log-prob is 0 with zero gradient; a position whose labels are all
            ignore_index also gets entropy 0 and no gradient at all.
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per position.
        inplace_backward: write d logits into the logits buffer during backward (saves one
            ``[..., V]`` allocation). Only safe when nothing else reads ``logits`` afterwards. Ignored
            inside ``torch.compile``, where the gradient gets its own buffer.
        softcap: None, or a cap > 0: each logit x becomes ``softcap * tanh(x / softcap)`` before the
            temperature (Gemma-2/3's ``final_logit_softcapping``), forward and backward.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``;
            default from ``FASTRM_BACKEND``.

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 logits), and the entropy ``[...]``
        (``logits.shape[:-1]``) if asked.
    """
    _check_inputs(logits, labels, temperature, ignore_index, softcap)
    chosen = resolve_backend(backend, logits.device, OP, logits.dtype, "logits")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    layout = row_layout(logits)
    if layout is None:
        logits = logits.contiguous()
        layout = row_layout(logits)
    multi_label = is_multi_label(logits, labels)
    flat_labels = (labels.reshape(layout[0], labels.shape[-1]) if multi_label else labels.reshape(-1)).contiguous()
    softcap = None if softcap is None else float(softcap)
    # Under torch.compile the backward's kernel is a custom op that may not write into a tensor it also reads.
    inplace_backward = inplace_backward and not torch.compiler.is_compiling()
    fn = _GatherLogprobsTriton if chosen == "triton" else _GatherLogprobsTorch
    out = fn.apply(logits, flat_labels, layout, float(temperature), ignore_index, return_entropy, inplace_backward,
                   softcap)
    if return_entropy:
        logprobs, entropy = out
        return logprobs.view(labels.shape), entropy.view(logits.shape[:-1])
    return out.view(labels.shape)


class GatherLogprobs(nn.Module):
    """Module form of :func:`gather_logprobs`: ``forward(logits, labels)``."""

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 inplace_backward: bool = False, softcap: float | None = None, backend: str | None = None):
        super().__init__()
        check_positive(OP, "temperature", temperature)
        self.temperature, self.ignore_index, self.return_entropy = float(temperature), ignore_index, return_entropy
        self.inplace_backward, self.softcap, self.backend = inplace_backward, check_softcap(OP, softcap), backend

    def forward(self, logits, labels):
        return gather_logprobs(logits, labels, temperature=self.temperature, ignore_index=self.ignore_index,
                               return_entropy=self.return_entropy, inplace_backward=self.inplace_backward,
                               softcap=self.softcap, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, softcap={self.softcap}")
