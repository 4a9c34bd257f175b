"""``linear_logprobs``: per-token log-probs (and entropy) of an LM head's logits, never holding ``[N, V]``.

``log_softmax((hidden @ weight.T + bias) / temperature)[labels]`` for the policy's last hidden states
``hidden [..., H]`` and its LM head ``weight [V, H]``. The tokens are processed in chunks of
``chunk_size`` rows: each chunk's logits ``[C, V]`` are computed with one matmul (cuBLAS / ATen, in
the inputs' dtype) and handed to the ``gather_logprobs`` forward (the Triton kernel, or the PyTorch
block code); only the per-token log-prob, log-sum-exp and entropy are kept.

The upstream gradient is per token and unknown in forward, so nothing is precomputed there (unlike a
fused cross-entropy, whose upstream gradient is a scalar): backward recomputes each chunk's logits,
runs the ``gather_logprobs`` backward *in place* into that buffer, and turns it into
``d hidden = g @ weight``, ``d weight += g.T @ hidden``, ``d bias += g.sum(0)`` (as Apple's
cut-cross-entropy does). One ``[C, V]`` buffer is reused by every chunk, so the extra memory is about
``C x V`` elements plus what the gradients themselves need, whatever the number of tokens.

On a CPU, where host memory is plentiful and a matmul of a few dozen rows runs well below the peak of a
larger one, a call whose logits fit in ``KEEP_LOGITS_BYTES_CPU`` instead computes them all with one
matmul into one ``[n, V]`` buffer (still log-softmaxed chunk by chunk, so temporaries stay chunk-sized),
holds it for backward (no recompute), and takes ``d hidden`` and ``d weight`` with one matmul each
(``keep_logits``); a larger call, and every CUDA call by default, runs chunk by chunk as above.

Rows whose label is ``ignore_index`` are dropped before any matmul (their log-prob, entropy and
gradient are zero), so prompt and padding tokens cost nothing.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastrm._checks import FLOAT_DTYPES, INT_DTYPES, check_finite, check_labels, check_positive, check_same_device
from fastrm._checks import check_tensor, host_reads_allowed
from fastrm._dispatch import resolve_backend
from fastrm.kernels import new_output
from fastrm.kernels.logprobs import logprob_bwd, logprob_fwd
from fastrm.ops.logprobs import check_softcap, torch_block_bwd, torch_block_fwd

OP = "linear_logprobs"
# The default chunk holds about this many logits. CPU: 16 MB of float32, like gather_logprobs' torch
# path. CUDA: 256 MB of bf16 (C ~ 1000 rows at V = 128k), big enough that every matmul runs at full
# speed and that the per-chunk accumulation of the float32 d weight stays a small share of the time.
CHUNK_ELEMENTS_CPU = 1 << 22
CHUNK_ELEMENTS_CUDA = 1 << 27
# CPU calls whose logits fit in this many bytes compute them in one matmul and hold them for backward:
# SmolLM2's 768 GRPO completion tokens x 49152 vocab are 151 MB (``fastrm bench vs-trl``'s update).
KEEP_LOGITS_BYTES_CPU = 256 << 20
_HALF = (torch.bfloat16, torch.float16)


def default_chunk_size(V: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk of logits ``[C, V]`` holds about the device's element budget."""
    budget = CHUNK_ELEMENTS_CUDA if torch.device(device).type == "cuda" else CHUNK_ELEMENTS_CPU
    return max(1, budget // V)


def _check_inputs(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, softcap):
    check_tensor(OP, "hidden", hidden, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor(OP, "weight", weight, dtypes=FLOAT_DTYPES, ndim=2)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight must have the same dtype as hidden ({hidden.dtype}), got {weight.dtype}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(
            f"{OP}: weight must have shape [V, H] with H = hidden.shape[-1] = {H}, got {tuple(weight.shape)}"
        )
    V = weight.shape[0]
    if bias is not None:
        check_tensor(OP, "bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: bias must have the same dtype as hidden ({hidden.dtype}), got {bias.dtype}")
        if bias.shape[0] != V:
            raise ValueError(f"{OP}: bias must have shape [V] = [{V}] (weight.shape[0]), got {tuple(bias.shape)}")
    check_tensor(OP, "labels", labels, dtypes=INT_DTYPES)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{OP}: labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check_same_device(OP, {"hidden": hidden, "weight": weight, "bias": bias, "labels": labels})
    check_positive(OP, "temperature", temperature)
    check_softcap(OP, softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{OP}: chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{OP}: chunk_size must be an int >= 1 or None, got {chunk_size}")
    check_labels(OP, labels, V, ignore_index)


_AUTOCAST_DEVICES = ("cuda", "cpu")


def _autocast_inputs(hidden, weight, bias):
    """Under ``torch.autocast`` run the head in the autocast dtype, as ``lm_head(hidden)`` would: cast the
    float32/half inputs (differentiably, so float32 master weights get float32 gradients). Autocast
    itself is off inside the op, whose matmuls write into buffers of the inputs' dtype."""
    if not isinstance(hidden, torch.Tensor) or hidden.device.type not in _AUTOCAST_DEVICES:
        return hidden, weight, bias
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    target = torch.get_autocast_dtype(device_type)

    def cast(x):
        eligible = isinstance(x, torch.Tensor) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return x.to(target) if eligible else x

    return cast(hidden), cast(weight), cast(bias)


def _no_autocast(device):
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _rows(x, kept, start, end):
    """Rows ``start:end`` of the kept tokens: a view when every token is kept, else a gather."""
    return x[start:end] if kept is None else x.index_select(0, kept[start:end])


def _put(out, kept, start, end, values):
    if kept is None:
        out[start:end] = values
    else:
        out.index_copy_(0, kept[start:end], values)


def _chunk_logits(buf, hidden_c, weight, bias):
    """``hidden_c @ weight.T (+ bias)`` written into the reused logits buffer."""
    if bias is None:
        return torch.mm(hidden_c, weight.t(), out=buf)
    return torch.addmm(bias, hidden_c, weight.t(), out=buf)


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, backend, temperature, ignore_index, return_entropy, chunk_size,
                softcap, skip_ignored, keep_logits, hold):
        with _no_autocast(hidden.device):
            return _LinearLogprobs._forward(ctx, hidden, weight, bias, labels, backend, temperature, ignore_index,
                                            return_entropy, chunk_size, softcap, skip_ignored, keep_logits, hold)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy=None):
        with _no_autocast(ctx.device):
            return _LinearLogprobs._backward(ctx, grad_logprobs, grad_entropy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, labels, backend, temperature, ignore_index, return_entropy, chunk_size,
                 softcap, skip_ignored, keep_logits, hold):
        # hidden [N, H], labels [N] contiguous. keep_logits: every row's logits in one buffer from one matmul (held
        # for backward when hold); else one chunk's buffer, reused.
        N, V = hidden.shape[0], weight.shape[0]
        device = hidden.device
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        keep = labels != ignore_index
        kept, n_kept = None, N  # without skipping, every row is computed (ignored ones come out as 0)
        if skip_ignored:
            kept = keep.nonzero().squeeze(1)  # on CUDA a host sync: the row count sizes the chunk loop
            n_kept = kept.numel()
            if n_kept == N:
                kept = None  # every token counts: chunks are plain row slices, no gathers
        logprobs = new_output((N,), dtype=compute_dtype, device=device)
        lse = new_output((N,), dtype=compute_dtype, device=device)
        entropy = new_output((N,), dtype=compute_dtype, device=device) if return_entropy else None
        if keep_logits is None:
            keep_logits = device.type == "cpu" and n_kept * V * hidden.element_size() <= KEEP_LOGITS_BYTES_CPU
        keep_logits = keep_logits and n_kept > 0
        if keep_logits:
            buf_all = _chunk_logits(torch.empty(n_kept, V, dtype=hidden.dtype, device=device),
                                    _rows(hidden, kept, 0, n_kept), weight, bias)
        elif n_kept:
            buf_all = torch.empty(min(chunk_size, n_kept), V, dtype=hidden.dtype, device=device)
        for start in range(0, n_kept, chunk_size):
            end = min(n_kept, start + chunk_size)
            labels_c = _rows(labels, kept, start, end)
            if keep_logits:
                logits_c = buf_all[start:end]
            else:
                logits_c = _chunk_logits(buf_all[: end - start], _rows(hidden, kept, start, end), weight, bias)
            if backend == "triton":
                n = end - start
                lp_c, ent_c, lse_c = logprob_fwd(logits_c, (n, n, 0, V), labels_c, temperature, ignore_index,
                                                 return_entropy, softcap)
            else:
                lp_c, lse_c, ent_c = torch_block_fwd(logits_c, labels_c, temperature, ignore_index, return_entropy,
                                                     softcap)
            _put(logprobs, kept, start, end, lp_c)
            _put(lse, kept, start, end, lse_c)
            if return_entropy:
                _put(entropy, kept, start, end, ent_c)
        if kept is not None or n_kept == 0:
            ignored = ~keep
            logprobs.masked_fill_(ignored, 0.0)
            lse.masked_fill_(ignored, 0.0)
            if return_entropy:
                entropy.masked_fill_(ignored, 0.0)
        check_finite(OP, "logits (hidden @ weight.T + bias)", lse, " in a row whose label is not ignore_index")
        ctx.save_for_backward(hidden, weight, bias, labels, kept, lse, entropy)
        ctx.backend, ctx.temperature, ctx.ignore_index, ctx.softcap = backend, temperature, ignore_index, softcap
        ctx.return_entropy, ctx.chunk_size, ctx.n_kept, ctx.device = return_entropy, chunk_size, n_kept, device
        # (backward overwrites them: a second backward through a retained graph recomputes)
        ctx.logits = buf_all if keep_logits and hold else None
        return (logprobs, entropy) if return_entropy else logprobs

    @staticmethod
    def _backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, kept, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        nones = (None,) * 10
        logits, ctx.logits = ctx.logits, None
        if not (need_hidden or need_weight or need_bias):
            return (None, None, None) + nones
        N, H = hidden.shape
        V = weight.shape[0]
        dtype, device = hidden.dtype, hidden.device
        compute_dtype = lse.dtype
        chunk_size, n_kept, ignore_index = ctx.chunk_size, ctx.n_kept, ctx.ignore_index
        n_chunks = -(-n_kept // chunk_size)

        grad_logprobs = (torch.zeros_like(lse) if grad_logprobs is None
                         else grad_logprobs.reshape(-1).to(compute_dtype).contiguous())
        grad_entropy = (grad_entropy.reshape(-1).to(compute_dtype).contiguous()
                        if ctx.return_entropy and grad_entropy is not None else None)  # None: no entropy term

        grad_hidden = grad_weight = grad_bias = None
        if need_hidden:
            grad_hidden = new_output((N, H), dtype=dtype, device=device)
            if kept is not None or n_kept == 0:
                grad_hidden.masked_fill_((labels == ignore_index).unsqueeze(-1), 0.0)
        if logits is not None:
            return _LinearLogprobs._backward_held(ctx, logits, grad_logprobs, grad_entropy, grad_hidden) + nones
        # Half inputs: d weight and d bias sum over all chunks in float32 and are rounded once at the end.
        accumulate_fp32 = dtype in _HALF and n_chunks > 1
        if need_weight and (accumulate_fp32 or n_chunks == 0):
            grad_weight = torch.zeros(V, H, dtype=torch.float32 if accumulate_fp32 else dtype, device=device)
        if need_bias:
            grad_bias = torch.zeros(V, dtype=torch.float32 if dtype in _HALF else dtype, device=device)
        # The half product of a chunk is added to the float32 d weight in slices of this many vocab rows,
        # so its temporary stays within one chunk's worth of elements.
        vocab_block = max(1, (chunk_size * V) // H)

        if n_kept:
            buf_all = torch.empty(min(chunk_size, n_kept), V, dtype=dtype, device=device)
        for start in range(0, n_kept, chunk_size):
            end = min(n_kept, start + chunk_size)
            n = end - start
            hidden_c = _rows(hidden, kept, start, end)
            # Recompute the chunk's logits, then overwrite them with d logits.
            g = _chunk_logits(buf_all[:n], hidden_c, weight, bias)
            _LinearLogprobs._chunk_grad(ctx, g, start, end, grad_logprobs, grad_entropy)
            if need_hidden:
                if kept is None:
                    torch.mm(g, weight, out=grad_hidden[start:end])
                else:
                    grad_hidden.index_copy_(0, kept[start:end], torch.mm(g, weight))
            if need_weight:
                if accumulate_fp32:
                    for v0 in range(0, V, vocab_block):
                        v1 = min(V, v0 + vocab_block)
                        grad_weight[v0:v1].add_(torch.mm(g[:, v0:v1].t(), hidden_c))
                elif grad_weight is None:
                    grad_weight = torch.mm(g.t(), hidden_c)
                else:
                    grad_weight.addmm_(g.t(), hidden_c)
            if need_bias:
                grad_bias.add_(g.sum(0, dtype=grad_bias.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.to(dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(dtype)
        return (grad_hidden, grad_weight, grad_bias) + nones

    @staticmethod
    def _chunk_grad(ctx, g, start, end, grad_logprobs, grad_entropy):
        """Overwrite the logits ``g`` of the kept rows ``start:end`` with d logits (``grad_entropy`` None: no
        entropy term)."""
        _, _, _, labels, kept, lse, entropy = ctx.saved_tensors
        labels_c, lse_c, grad_lp_c = (_rows(x, kept, start, end) for x in (labels, lse, grad_logprobs))
        ent_c = grad_ent_c = None
        if grad_entropy is not None:
            ent_c, grad_ent_c = _rows(entropy, kept, start, end), _rows(grad_entropy, kept, start, end)
        if ctx.backend == "triton":
            layout = (g.shape[0], g.shape[0], 0, g.shape[1])
            logprob_bwd(g, layout, labels_c, lse_c, ent_c, grad_lp_c, grad_ent_c, ctx.temperature, ctx.ignore_index,
                        g, layout, ctx.softcap)
        else:
            torch_block_bwd(g, labels_c, lse_c, ent_c, grad_lp_c, grad_ent_c, ctx.temperature, ctx.ignore_index,
                            out=g, softcap=ctx.softcap)

    @staticmethod
    def _backward_held(ctx, logits, grad_logprobs, grad_entropy, grad_hidden):
        """Backward from the logits forward held: d logits chunk by chunk in place, then one matmul each for
        d hidden and d weight and one sum for d bias (rounded once, as a single chunk's are)."""
        hidden, weight, _, _, kept, _, _ = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n_kept, chunk_size = ctx.n_kept, ctx.chunk_size
        for start in range(0, n_kept, chunk_size):
            end = min(n_kept, start + chunk_size)
            _LinearLogprobs._chunk_grad(ctx, logits[start:end], start, end, grad_logprobs, grad_entropy)
        grad_weight = grad_bias = None
        if need_hidden:
            if kept is None:
                torch.mm(logits, weight, out=grad_hidden)
            else:
                grad_hidden.index_copy_(0, kept, torch.mm(logits, weight))
        if need_weight:
            grad_weight = torch.mm(logits.t(), _rows(hidden, kept, 0, n_kept))
        if need_bias:
            grad_bias = logits.sum(0, dtype=torch.float32 if hidden.dtype in _HALF else hidden.dtype).to(hidden.dtype)
        return grad_hidden, grad_weight, grad_bias


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    softcap: float | None = None,
    backend: str | None = None,
    skip_ignored: bool | None = None,
    keep_logits: bool | None = None,
):
    """``log_softmax((hidden @ weight.T + bias) / temperature)[..., labels]`` without the ``[N, V]`` logits.

    Args:
        hidden: ``[..., H]`` last hidden states, float32 / bfloat16 / float16 (float64 on the torch
            backend). Any strides; a non-contiguous view is copied once (``N x H``, not ``N x V``).
        weight: ``[V, H]`` LM head weight (``lm_head.weight``), same dtype and device as ``hidden``.
        labels: ``[...]`` (= ``hidden.shape[:-1]``) integer token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM head bias, same dtype as ``hidden``.
        temperature: sampling temperature the log-probs are taken at (> 0).
        ignore_index: label value whose position gets log-prob 0, entropy 0 and no gradient (with
            ``skip_ignored``, such rows are dropped before the matmul and cost nothing).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` per position.
        chunk_size: tokens per chunk (int >= 1). Default: about 2**22 logits per chunk on CPU and 2**27
            on CUDA (:func:`default_chunk_size`). Peak extra memory is about ``chunk_size x V`` elements.
        softcap: None, or a cap > 0: each logit x becomes ``softcap * tanh(x / softcap)`` before the
            temperature (Gemma-2/3's ``final_logit_softcapping``), forward and backward.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``; the
            matmuls always run in PyTorch, the backend picks the log-softmax/gather code per chunk.
        skip_ignored: drop the ``ignore_index`` rows before the matmuls (prompt and padding tokens then
            cost nothing). Finding them sizes the chunk loop, a host-device sync on CUDA, so the default
            (None) skips on CPU and computes every row on CUDA; pass True on CUDA when the ignored rows are
            a large share and one sync per call is acceptable (fastrm's trainers do). Inside
            ``torch.compile`` every row is computed.
        keep_logits: compute every row's logits with one matmul into one ``n x V`` buffer (n the rows
            computed) and hold it from forward to backward instead of recomputing it chunk by chunk there.
            Default (None): on a CPU when they fit in ``KEEP_LOGITS_BYTES_CPU``, never on CUDA. False bounds
            the extra memory to one chunk.

    Returns:
        float32 log-probs ``[...]`` (float64 for float64 inputs), and the entropy if asked.
        Gradients flow to ``hidden``, ``weight`` and ``bias`` (for half inputs, ``d weight`` and
        ``d bias`` are accumulated over chunks in float32).

    Under ``torch.autocast`` the float inputs are first cast to the autocast dtype (the head then runs in,
    say, bf16 exactly as ``lm_head(hidden)`` would), so a bf16 ``hidden`` and a float32 ``weight`` mix there.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    _check_inputs(hidden, weight, labels, bias, temperature, ignore_index, chunk_size, softcap)
    chosen = resolve_backend(backend, hidden.device, OP, hidden.dtype, "hidden")
    H, V = hidden.shape[-1], weight.shape[0]
    hidden_2d = hidden.reshape(-1, H)
    flat_labels = labels.reshape(-1).contiguous()
    if chunk_size is None:
        chunk_size = default_chunk_size(V, hidden.device)
    if skip_ignored is None or torch.compiler.is_compiling():  # torch.compile cannot trace a data-dependent size
        skip_ignored = host_reads_allowed(hidden.device)
    if keep_logits is not None and not isinstance(keep_logits, bool):
        raise TypeError(f"{OP}: keep_logits must be a bool or None, got {type(keep_logits).__name__}")
    hold = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden_2d, weight, bias))
    out = _LinearLogprobs.apply(hidden_2d, weight, bias, flat_labels, chosen, float(temperature), ignore_index,
                                bool(return_entropy), chunk_size, None if softcap is None else float(softcap),
                                bool(skip_ignored), keep_logits, hold)
    if return_entropy:
        logprobs, entropy = out
        return logprobs.view(labels.shape), entropy.view(labels.shape)
    return out.view(labels.shape)


class LinearLogprobs(nn.Module):
    """Module form of :func:`linear_logprobs`: ``forward(hidden, weight, labels, bias=None)``.

    Stateless (it owns no parameters, so the LM head is never registered twice): pass the head's
    weight tensor, or the ``nn.Linear`` head itself, whose ``weight`` and ``bias`` are then used::

        logprobs = LinearLogprobs(temperature=0.7)(hidden, model.lm_head, labels)
    """

    def __init__(self, temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                 chunk_size: int | None = None, softcap: float | None = None, backend: str | None = None):
        super().__init__()
        check_positive(OP, "temperature", temperature)
        self.temperature, self.ignore_index, self.return_entropy = float(temperature), ignore_index, return_entropy
        self.chunk_size, self.softcap, self.backend = chunk_size, check_softcap(OP, softcap), backend

    def forward(self, hidden, weight, labels, bias=None):
        if isinstance(weight, nn.Linear):
            if bias is not None:
                raise ValueError(f"{OP}: bias must be None when weight is an nn.Linear (its own bias is used)")
            weight, bias = weight.weight, weight.bias
        return linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                               ignore_index=self.ignore_index, return_entropy=self.return_entropy,
                               chunk_size=self.chunk_size, softcap=self.softcap, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, chunk_size={self.chunk_size}, softcap={self.softcap}")
