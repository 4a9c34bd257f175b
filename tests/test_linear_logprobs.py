"""linear_logprobs: chunked LM head + log-softmax + gather, checked against float64 eager autograd.

Tolerances (``tol`` below). Ground truth is float64 eager autograd through
``log_softmax((hidden @ weight.T + bias) / T)`` on the very same (already rounded) inputs. The op
computes each logit with a matmul in the inputs' dtype, so for half inputs every logit carries a
rounding error of up to u * |logit| (unit roundoff u = 2**-8 bf16, 2**-11 fp16), and backward rounds
d logits to half once more before the d hidden / d weight matmuls. Every output is a smooth function of
the logits, so its error is first order in u times the size of that output: we check
``|got - ref| <= c * u * max|ref|`` elementwise. Measured over 30 seeds x both backends at these sizes,
the worst was 0.6 u max|ref| (log-probs), 3.4 (entropy) and 9 (gradients, which sum V or N rounded
terms); we allow c = 8 for values and 16 for gradients. float32 uses c = 256 (worst seen: 50), i.e.
about 1.5e-5 relative to the largest element. A real bug (a missing 1/T, a dropped entropy term, a chunk
counted twice or skipped) is an O(1) relative error, far outside these bounds.
"""

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastrm
from fastrm import kernels
from fastrm.kernels.linear_logprobs import linear_logprobs_reference
from fastrm.ops.linear_logprobs import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_CUDA, LinearLogprobs, default_chunk_size
from fastrm.ops.linear_logprobs import linear_logprobs
from helpers import BACKENDS, DEVICE, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def tol(dtype, ref, grad=False):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10)
    c = 256 if dtype == torch.float32 else (16 if grad else 8)
    return dict(atol=c * UNIT_ROUNDOFF[dtype] * ref.abs().max().item(), rtol=0.0)


def make_case(shape, H, V, dtype, ignore_frac=0.2, logit_std=3.0, bias=True):
    """Fresh random inputs; logits have std ~ logit_std so the softmax is far from uniform."""
    hidden = torch.randn(*shape, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * (logit_std / math.sqrt(H))).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    labels = torch.randint(0, V, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) < ignore_frac] = -100
    return hidden, weight, b, labels


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def check_against_float64(hidden, weight, bias, labels, backend, temperature=1.0, chunk_size=None,
                          ignore_index=-100, keep_logits=None):
    """Values, entropy and d hidden / d weight / d bias against float64 eager autograd."""
    dtype = hidden.dtype
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    lp, ent = linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True,
                              chunk_size=chunk_size, ignore_index=ignore_index, backend=backend,
                              keep_logits=keep_logits)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == out_dtype and ent.dtype == out_dtype
    assert lp.shape == labels.shape and ent.shape == labels.shape

    h64, w64, b64 = leaf(hidden.double()), leaf(weight.double()), leaf(None if bias is None else bias.double())
    lp64, ent64 = linear_logprobs_reference(h64, w64, labels, bias=b64, temperature=temperature,
                                            ignore_index=ignore_index, return_entropy=True)
    torch.testing.assert_close(lp.double(), lp64, **tol(dtype, lp64))
    torch.testing.assert_close(ent.double(), ent64, **tol(dtype, ent64))
    # Random upstream gradients on both outputs, so neither term of the backward can hide.
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    pairs = [(h.grad, h64.grad), (w.grad, w64.grad)] + ([(b.grad, b64.grad)] if bias is not None else [])
    for got, ref in pairs:
        assert got.dtype == dtype and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, **tol(dtype, ref, grad=True))
    return lp, ent, h.grad, w.grad, (b.grad if bias is not None else None)


# ---- values and gradients ----------------------------------------------------------------------------------

CHUNKINGS = {  # name: (N, chunk_size)
    "divides": (64, 16),
    "ragged": (67, 13),
    "one_row": (9, 1),
    "bigger_than_n": (23, 100),
    "default": (50, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("keep_logits", [True, False], ids=["kept", "recomputed"])
def test_matches_float64(backend, dtype, chunking, keep_logits):
    N, chunk_size = CHUNKINGS[chunking]
    hidden, weight, bias, labels = make_case((N,), 64, 1000, dtype)
    check_against_float64(hidden, weight, bias, labels, backend, chunk_size=chunk_size, keep_logits=keep_logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_logits_survive_a_second_backward(backend):
    """Backward overwrites kept logits with d logits: a retained graph's second backward recomputes them (chunk by
    chunk: the same gradients, up to float32 summation order)."""
    hidden, weight, bias, labels = make_case((37,), 32, 500, torch.float32)
    h, w = leaf(hidden), leaf(weight)
    lp, ent = linear_logprobs(h, w, labels, bias=bias, return_entropy=True, chunk_size=8, backend=backend,
                              keep_logits=True)
    loss = (lp * torch.randn_like(lp)).sum() + ent.sum()
    loss.backward(retain_graph=True)
    first = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss.backward()
    torch.testing.assert_close(h.grad, first[0], **tol(torch.float32, first[0], grad=True))
    torch.testing.assert_close(w.grad, first[1], **tol(torch.float32, first[1], grad=True))


def test_keep_logits_default_follows_the_byte_budget(monkeypatch):
    """CPU calls compute all their logits at once up to KEEP_LOGITS_BYTES_CPU ([n, V] is allocated once), and chunk
    by chunk past it (one chunk's buffer)."""
    import fastrm.ops.linear_logprobs as mod

    N, H, V, chunk = 64, 8, 1000, 8
    hidden, weight, bias, labels = make_case((N,), H, V, torch.float32, ignore_frac=0.0)
    for budget, kept in ((4 * N * V, True), (4 * N * V - 1, False)):
        monkeypatch.setattr(mod, "KEEP_LOGITS_BYTES_CPU", budget)
        h = leaf(hidden)
        with _LargestAllocation() as seen:
            linear_logprobs(h, weight, labels, chunk_size=chunk, backend="torch").sum().backward()
        assert (seen.max_bytes >= 4 * N * V) == kept, (budget, seen.max_bytes, seen.op)
    with pytest.raises(TypeError, match="keep_logits must be a bool or None"):
        linear_logprobs(hidden, weight, labels, keep_logits=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(backend, temperature):
    hidden, weight, bias, labels = make_case((31,), 32, 500, torch.float32)
    check_against_float64(hidden, weight, bias, labels, backend, temperature=temperature, chunk_size=8)


def test_float64_on_the_torch_path():
    hidden, weight, bias, labels = make_case((2, 9), 16, 300, torch.float64)
    # auto sends float64 to the PyTorch path even where triton is the default.
    check_against_float64(hidden, weight, bias, labels, "auto", temperature=0.9, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias(backend):
    hidden, weight, _, labels = make_case((20,), 32, 400, torch.bfloat16, bias=False)
    check_against_float64(hidden, weight, None, labels, backend, chunk_size=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_non_contiguous_hidden_and_weight(backend):
    # hidden [B, T, H] shifted like hidden[:, :-1] (non-contiguous), weight a transposed view of [H, V].
    B, T, H, V = 3, 12, 32, 600
    full, _, bias, _ = make_case((B, T), H, V, torch.float32)
    hidden = full[:, :-1]
    assert not hidden.is_contiguous()
    weight = (torch.randn(H, V, device=DEVICE) / math.sqrt(H) * 3).t()
    assert not weight.is_contiguous()
    labels = torch.randint(0, V, (B, T - 1), device=DEVICE)
    labels[0, :4] = -100
    lp, ent, *_ = check_against_float64(hidden, weight, bias, labels, backend, chunk_size=7)
    assert lp.shape == (B, T - 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_rows_are_zero_and_do_not_contribute(backend):
    N, H, V = 40, 16, 300
    hidden, weight, bias, labels = make_case((N,), H, V, torch.float32, ignore_frac=0.0)
    labels[3:17] = -100  # a whole chunk (chunk_size=5) and two partial ones
    labels[30] = -100
    ignored = labels == -100
    hidden[ignored] = float("nan")  # garbage under ignored positions must not leak anywhere
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    lp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=5, backend=backend)
    assert torch.equal(lp[ignored], torch.zeros_like(lp[ignored]))
    assert torch.equal(ent[ignored], torch.zeros_like(ent[ignored]))
    assert (lp[~ignored] < 0).all() and torch.isfinite(ent).all()
    (lp.sum() + 0.5 * ent.sum()).backward()
    assert torch.equal(h.grad[ignored], torch.zeros_like(h.grad[ignored]))
    # d weight / d bias equal those of the kept rows alone (computed in float64 without the ignored rows).
    keep = ~ignored
    w64, b64 = leaf(weight.double()), leaf(bias.double())
    lp64, ent64 = linear_logprobs_reference(hidden[keep].double(), w64, labels[keep], bias=b64, return_entropy=True)
    (lp64.sum() + 0.5 * ent64.sum()).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol(torch.float32, w64.grad, grad=True))
    torch.testing.assert_close(b.grad.double(), b64.grad, **tol(torch.float32, b64.grad, grad=True))
    torch.testing.assert_close(lp[keep].double(), lp64, **tol(torch.float32, lp64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    hidden, weight, bias, labels = make_case((6,), 8, 50, torch.float32)
    labels[:] = -100
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    lp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=4, backend=backend)
    assert torch.equal(lp, torch.zeros(6, device=DEVICE)) and torch.equal(ent, torch.zeros(6, device=DEVICE))
    (lp.sum() + ent.sum()).backward()
    for grad in (h.grad, w.grad, b.grad):
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    hidden, weight, bias, labels = make_case((12,), 16, 100, torch.float32, ignore_frac=0.0)
    labels[[0, 5]] = 7
    lp, *_ = check_against_float64(hidden, weight, bias, labels, backend, chunk_size=4, ignore_index=7)
    assert lp[0] == 0 and lp[5] == 0 and (lp[labels != 7] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logprobs", "entropy"])
def test_single_output_backward(backend, which):
    # Only one output feeds the loss: the other's upstream gradient is None inside backward.
    hidden, weight, bias, labels = make_case((25,), 16, 200, torch.float32)
    h, w = leaf(hidden), leaf(weight)
    lp, ent = linear_logprobs(h, w, labels, bias=bias, return_entropy=True, chunk_size=6, backend=backend)
    g = torch.randn_like(lp)
    ((lp if which == "logprobs" else ent) * g).sum().backward()
    h64, w64 = leaf(hidden.double()), leaf(weight.double())
    lp64, ent64 = linear_logprobs_reference(h64, w64, labels, bias=bias.double(), return_entropy=True)
    ((lp64 if which == "logprobs" else ent64) * g.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, **tol(torch.float32, h64.grad, grad=True))
    torch.testing.assert_close(w.grad.double(), w64.grad, **tol(torch.float32, w64.grad, grad=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("keep_logits", [True, False], ids=["kept", "recomputed"])
def test_only_the_needed_gradients(backend, trainable, keep_logits, monkeypatch):
    hidden, weight, bias, labels = make_case((30,), 16, 200, torch.bfloat16)
    named = ((hidden, "hidden"), (weight, "weight"), (bias, "bias"))
    h, w, b = (leaf(x) if trainable == name else x for x, name in named)
    mm_shapes = []
    real_mm = torch.mm

    def spy_mm(a, b_, *args, **kwargs):
        mm_shapes.append((tuple(a.shape), tuple(b_.shape)))
        return real_mm(a, b_, *args, **kwargs)

    lp = linear_logprobs(h, w, labels, bias=b, chunk_size=8, backend=backend, keep_logits=keep_logits)
    g = torch.randn_like(lp)
    monkeypatch.setattr(torch, "mm", spy_mm)
    (lp * g).sum().backward()
    monkeypatch.undo()
    h64, w64, b64 = leaf(hidden.double()), leaf(weight.double()), leaf(bias.double())
    (linear_logprobs_reference(h64, w64, labels, bias=b64) * g.double()).sum().backward()
    got = {"hidden": h, "weight": w, "bias": b}[trainable].grad
    ref = {"hidden": h64, "weight": w64, "bias": b64}[trainable].grad
    torch.testing.assert_close(got.double(), ref, **tol(torch.bfloat16, ref, grad=True))
    for name, x in (("hidden", h), ("weight", w), ("bias", b)):
        if name != trainable:
            assert x.grad is None
    # Skipped work: no d weight matmul (g.T @ hidden_c: [V, C] x [C, H]) unless weight needs its gradient.
    dw_products = [s for s in mm_shapes if s[1] == (s[0][1], 16) and s[0][1] < 200]  # [Vb, c] x [c, H], c rows
    assert bool(dw_products) == (trainable == "weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_at_large_logit_offsets(backend):
    # Logits ~1e4 (a bias of 1e4 on a small head), half the rows near one-hot: the entropy is non-negative
    # and matches float64 (the log-softmax kernels accumulate relative to the running max).
    H, V = 8, 700
    hidden = torch.randn(6, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE) * 0.3
    bias = torch.full((V,), 1e4, device=DEVICE)
    labels = torch.randint(0, V, (6,), device=DEVICE)
    bias[labels[0]] += 12.0  # every row peaks at labels[0]: near one-hot, entropy ~1e-2
    lp, ent = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=4, backend=backend)
    # float64 on the fp32 logits the op computes (their own rounding, ulp(1e4) ~ 1e-3, is not the point here).
    logits = torch.addmm(bias, hidden, weight.t())
    lp64, ent64 = fastrm.gather_logprobs_reference(logits.double(), labels, return_entropy=True)
    assert (ent >= 0).all(), ent
    torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.double(), lp64, atol=1e-5, rtol=1e-5)
    assert ent.max() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_inference(backend):
    hidden, weight, bias, labels = make_case((2, 7), 16, 100, torch.bfloat16)
    with torch.no_grad():
        lp = linear_logprobs(leaf(hidden), leaf(weight), labels, bias=bias, chunk_size=3, backend=backend)
    assert not lp.requires_grad
    ref = linear_logprobs_reference(hidden.double(), weight.double(), labels, bias=bias.double())
    torch.testing.assert_close(lp.double(), ref, **tol(torch.bfloat16, ref))


def test_gradcheck_torch_path_float64():
    hidden = torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3), device=DEVICE)
    labels[1, 0] = -100

    def fn(h, w, b):
        return linear_logprobs(h[:, :-1], w, labels, bias=b, temperature=0.8, return_entropy=True, chunk_size=2,
                               backend="torch")

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_gather_logprobs_on_full_logits(backend):
    hidden, weight, bias, labels = make_case((3, 10), 32, 700, torch.float32)
    h1, w1, h2, w2 = leaf(hidden), leaf(weight), leaf(hidden), leaf(weight)
    lp, ent = linear_logprobs(h1, w1, labels, bias=bias, temperature=0.8, return_entropy=True, chunk_size=4,
                              backend=backend)
    lp_ref, ent_ref = fastrm.gather_logprobs(h2 @ w2.t() + bias, labels, temperature=0.8, return_entropy=True,
                                             backend=backend)
    torch.testing.assert_close(lp, lp_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent, ent_ref, atol=2e-5, rtol=2e-5)
    g1, g2 = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g1 + ent * g2).sum().backward()
    (lp_ref * g1 + ent_ref * g2).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_runs_the_head_in_the_autocast_dtype(backend):
    # Mixed inputs as under autocast training: bf16 activations, float32 master weights of the head.
    hidden, weight, bias, labels = make_case((3, 7), 16, 120, torch.float32)
    h, w, b = leaf(hidden.bfloat16()), leaf(weight), leaf(bias)
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        lp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=4, backend=backend)
    g = torch.randn_like(lp)
    (lp * g + ent).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # The same as casting the inputs to bf16 by hand, outside autocast.
    h2, w2, b2 = leaf(hidden.bfloat16()), leaf(weight.bfloat16()), leaf(bias.bfloat16())
    lp2, ent2 = linear_logprobs(h2, w2, labels, bias=b2, return_entropy=True, chunk_size=4, backend=backend)
    (lp2 * g + ent2).sum().backward()
    torch.testing.assert_close(lp, lp2)
    torch.testing.assert_close(ent, ent2)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad.float())
    torch.testing.assert_close(b.grad, b2.grad.float())
    with pytest.raises(TypeError, match="weight must have the same dtype as hidden"):  # no autocast: no mixing
        linear_logprobs(h, w, labels, backend=backend)


# ---- memory: nothing [N, V] is ever built ---------------------------------------------------------------------

class _LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) any ATen op allocates: matmul outputs, temporaries, buffers.
    Outputs that alias an argument's storage (views, in-place ops, the interpreter's byte views) are
    not allocations and are skipped."""

    def __init__(self):
        super().__init__()
        self.max_bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                inputs.add(a.untyped_storage().data_ptr())
            elif isinstance(a, (torch.UntypedStorage, torch.TypedStorage)):
                inputs.add(a.data_ptr())
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.max_bytes:
                    self.max_bytes, self.op = nbytes, str(func)
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_builds_n_by_v(backend, dtype):
    N, H, V, chunk = 64, 8, 1000, 8
    hidden, weight, bias, labels = make_case((N,), H, V, dtype)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    with _LargestAllocation() as seen:
        lp, ent = linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=chunk, backend=backend,
                                  keep_logits=False)
        (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None
    # Largest allocation: one chunk of logits (C x V, float32 on the torch path) or the float32 V x H
    # weight gradient; never anything N x V (the eager logits alone are N x V x itemsize bytes).
    assert seen.max_bytes <= 4 * max(chunk * V, V * H, N * H), (seen.max_bytes, seen.op)
    assert seen.max_bytes < N * V * dtype.itemsize
    # The recorder does see an [N, V] tensor when one is built: the eager formula trips it.
    with _LargestAllocation() as eager:
        linear_logprobs_reference(leaf(hidden), weight, labels, bias=bias).sum().backward()
    assert eager.max_bytes >= N * V * dtype.itemsize


def test_default_chunk_bounds_memory(monkeypatch):
    import fastrm.ops.linear_logprobs as mod

    N, H, V = 64, 8, 1000
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS_CPU", 10 * V)  # default chunk: 10 rows
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS_CUDA", 10 * V)
    hidden, weight, bias, labels = make_case((N,), H, V, torch.float32)
    h = leaf(hidden)
    with _LargestAllocation() as seen:
        linear_logprobs(h, weight, labels, bias=bias, backend="torch", keep_logits=False).sum().backward()
    assert h.grad is not None
    assert seen.max_bytes <= 4 * 10 * V < 4 * N * V, (seen.max_bytes, seen.op)


# ---- module form, chunk size, dispatch -------------------------------------------------------------------------

def test_module_form_with_linear_head_and_with_weight():
    H, V = 16, 120
    head = nn.Linear(H, V, device=DEVICE)
    hidden, _, _, labels = make_case((2, 5), H, V, torch.float32)
    module = LinearLogprobs(temperature=0.9, return_entropy=True, chunk_size=3, backend="torch")
    lp, ent = module(hidden, head, labels)
    ref_lp, ref_ent = linear_logprobs_reference(hidden.double(), head.weight.double(), labels,
                                                bias=head.bias.double(), temperature=0.9, return_entropy=True)
    torch.testing.assert_close(lp.double(), ref_lp, **tol(torch.float32, ref_lp))
    torch.testing.assert_close(ent.double(), ref_ent, **tol(torch.float32, ref_ent))
    lp.sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None and head.bias.grad.abs().sum() > 0
    lp2, _ = module(hidden, head.weight, labels, head.bias)  # the same with tensors
    torch.testing.assert_close(lp2, lp)
    assert list(module.parameters()) == []  # stateless: the head is never registered twice
    assert "temperature=0.9" in repr(module) and "chunk_size=3" in repr(module)
    with pytest.raises(ValueError, match="bias must be None when weight is an nn.Linear"):
        module(hidden, head, labels, head.bias)


def test_default_chunk_size():
    assert default_chunk_size(1000, torch.device("cpu")) == CHUNK_ELEMENTS_CPU // 1000
    assert default_chunk_size(128256, torch.device("cuda")) == CHUNK_ELEMENTS_CUDA // 128256
    assert default_chunk_size(10 * CHUNK_ELEMENTS_CPU, torch.device("cpu")) == 1  # never 0


def test_triton_backend_rejects_float64_and_auto_uses_torch():
    if not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels.INTERPRET):
        pytest.skip("triton not available")
    hidden, weight, bias, labels = make_case((4,), 8, 20, torch.float64)
    with pytest.raises(TypeError, match="backend='triton' needs hidden of dtype float32"):
        linear_logprobs(hidden, weight, labels, backend="triton")
    assert linear_logprobs(hidden, weight, labels, backend="auto").dtype == torch.float64


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    hidden, weight, bias, labels = make_case((4,), 8, 20, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_logprobs(hidden.cpu(), weight.cpu(), labels.cpu(), backend="triton")


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    hidden, weight, bias, labels = make_case((2, 3), 8, 10, torch.float32, ignore_frac=0.0)
    cases = [
        (TypeError, "hidden must be a torch.Tensor", dict(hidden=hidden.tolist())),
        (TypeError, "hidden must have dtype", dict(hidden=hidden.long())),
        (ValueError, "hidden is empty", dict(hidden=hidden[:0], labels=labels[:0])),
        (TypeError, "weight must have the same dtype as hidden", dict(weight=weight.double())),
        (ValueError, "weight must be 2-D", dict(weight=weight[0])),
        (ValueError, r"weight must have shape \[V, H\] with H = hidden.shape\[-1\] = 8", dict(weight=weight[:, :7])),
        (TypeError, "bias must have the same dtype as hidden", dict(bias=bias.half())),
        (ValueError, r"bias must have shape \[V\] = \[10\]", dict(bias=bias[:9])),
        (ValueError, "bias must be 1-D", dict(bias=bias[None])),
        (TypeError, "labels must have dtype", dict(labels=labels.float())),
        (ValueError, "labels must have shape hidden.shape", dict(labels=labels[0])),  # would broadcast naively
        (ValueError, r"labels must lie in \[0, 10\)", dict(labels=torch.full_like(labels, 10))),
        (ValueError, r"labels must lie in \[0, 10\)", dict(labels=torch.full_like(labels, -1))),
        (ValueError, "labels is on meta", dict(labels=labels.to("meta"))),
        (ValueError, "weight is on meta", dict(weight=weight.to("meta"))),
        (ValueError, "temperature must be a finite number > 0", dict(temperature=0.0)),
        (TypeError, "ignore_index must be an int", dict(ignore_index=-100.0)),
        (ValueError, "chunk_size must be an int >= 1", dict(chunk_size=0)),
        (TypeError, "chunk_size must be an int >= 1", dict(chunk_size=2.0)),
        (TypeError, "chunk_size must be an int >= 1", dict(chunk_size=True)),
        (ValueError, "backend must be one of", dict(backend="cuda")),
    ]
    for error, message, override in cases:
        kw = dict(hidden=hidden, weight=weight, labels=labels, bias=bias)
        kw.update(override)
        with pytest.raises(error, match=message):
            linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        LinearLogprobs(temperature=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_raises_instead_of_propagating(backend, monkeypatch):
    hidden, weight, bias, labels = make_case((2, 3), 8, 10, torch.float32, ignore_frac=0.0)
    hidden[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match="linear_logprobs: logits .* contains NaN or inf"):
        linear_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")  # production loops may switch the check off
    lp = linear_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[0]).all()


# ---- realistic size on a GPU -------------------------------------------------------------------------------------

def _check_against_float32_eager(hidden, weight, labels, lp, ent, grad_hidden, grad_weight, g_lp, g_ent, rows,
                                  vocab_rows, row_chunk):
    """Values and d hidden on a few token rows, and d weight on a few vocabulary rows, against the float32
    eager computation (``linear_logprobs_reference``: lm_head logits in the inputs' dtype, float32
    log-softmax, autograd). Row i of d hidden depends on token i only; row v of d weight needs every
    token, so the reference walks the tokens in chunks of ``row_chunk`` and sums their parts in float32.
    Each row is compared at its own scale (label rows of d weight are far larger than the others)."""
    dtype = hidden.dtype
    h = hidden[rows].detach().clone().requires_grad_(True)
    lp32, ent32 = linear_logprobs_reference(h, weight.detach(), labels[rows], return_entropy=True)
    (lp32 * g_lp[rows] + ent32 * g_ent[rows]).sum().backward()
    torch.testing.assert_close(lp[rows], lp32, **tol(dtype, lp32))
    torch.testing.assert_close(ent[rows], ent32, **tol(dtype, ent32))
    for got, ref in zip(grad_hidden[rows], h.grad):
        torch.testing.assert_close(got.double(), ref.double(), **tol(dtype, ref.double(), grad=True))
    if grad_weight is None:
        return
    w_sel = weight[vocab_rows].detach().clone().requires_grad_(True)
    ref_dw = torch.zeros(w_sel.shape, dtype=torch.float64, device=w_sel.device)
    for start in range(0, hidden.shape[0], row_chunk):
        sl = slice(start, start + row_chunk)
        h_c = hidden[sl].detach()
        logits = (h_c @ weight.detach().t()).index_copy(1, vocab_rows, h_c @ w_sel.t())
        lp_c, ent_c = fastrm.gather_logprobs_reference(logits, labels[sl], return_entropy=True)
        (part,) = torch.autograd.grad((lp_c * g_lp[sl] + ent_c * g_ent[sl]).sum(), w_sel)
        ref_dw += part.double()
    for got, ref in zip(grad_weight[vocab_rows], ref_dw):
        torch.testing.assert_close(got.double(), ref, **tol(dtype, ref, grad=True))


def test_float32_eager_check_helper_on_cpu_sizes():
    # The helper the CUDA test relies on, exercised here at a small size so it cannot silently rot.
    hidden, weight, _, labels = make_case((40,), 32, 500, torch.bfloat16, ignore_frac=0.25, bias=False)
    h, w = leaf(hidden), leaf(weight)
    lp, ent = linear_logprobs(h, w, labels, return_entropy=True, chunk_size=16, backend="torch")
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    kept = (labels != -100).nonzero().squeeze(1)
    rows = kept[[0, len(kept) // 2, -1]]
    vocab_rows = torch.unique(torch.cat([labels[rows], torch.tensor([3, 499], device=DEVICE)]))
    args = (hidden, weight, labels, lp, ent)
    _check_against_float32_eager(*args, h.grad, w.grad, g_lp, g_ent, rows, vocab_rows, row_chunk=7)
    with pytest.raises(AssertionError):  # and it does fail on a wrong d hidden ...
        _check_against_float32_eager(*args, h.grad * 1.1, None, g_lp, g_ent, rows, vocab_rows, row_chunk=7)
    wrong_dw = w.grad.clone()
    wrong_dw[3] *= 1.1  # ... or on one wrong row of d weight
    with pytest.raises(AssertionError):
        _check_against_float32_eager(*args, h.grad, wrong_dw, g_lp, g_ent, rows, vocab_rows, row_chunk=7)


@requires_cuda
@pytest.mark.parametrize("train_head", [False, True])
def test_realistic_size_llama3_vocab_bf16(train_head):
    N, H, V = 4096, 4096, 128256
    dtype = torch.bfloat16
    logits_bytes = N * V * 2  # what the eager lm_head(hidden) alone would hold
    hidden = torch.randn(N, H, device="cuda", dtype=dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda") * (2.0 / math.sqrt(H))).to(dtype).requires_grad_(train_head)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[: N // 4] = -100  # a prompt
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = linear_logprobs(hidden, weight, labels, return_entropy=True)  # auto: triton kernels on CUDA
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    # One chunk of bf16 logits: 2**27 elements = 256 MiB, vs 1002 MiB for the eager logits.
    assert fwd_peak < 0.4 * logits_bytes, fwd_peak / 2**20
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    (lp * g_lp + ent * g_ent).sum().backward()
    torch.cuda.synchronize()
    bwd_peak = torch.cuda.max_memory_allocated() - base
    # The gradients themselves are unavoidable: d hidden (N x H bf16) and, when the head trains, its
    # float32 accumulator plus the final bf16 d weight (V x H x 6 bytes; independent of N).
    unavoidable = N * H * 2 + (V * H * 6 if train_head else 0)
    assert bwd_peak - unavoidable < logits_bytes / 2, (bwd_peak - unavoidable) / 2**20
    ignored = labels == -100
    assert torch.equal(lp[ignored], torch.zeros_like(lp[ignored]))
    assert torch.equal(hidden.grad[ignored], torch.zeros_like(hidden.grad[ignored]))
    assert (weight.grad is not None) == train_head
    rows = torch.tensor([N // 4, N // 2 + 3, N - 1], device="cuda")
    vocab_rows = torch.unique(torch.cat([labels[rows], torch.tensor([0, V - 1], device="cuda")]))
    _check_against_float32_eager(hidden.detach(), weight.detach(), labels, lp, ent, hidden.grad, weight.grad,
                                 g_lp, g_ent, rows, vocab_rows, row_chunk=512)
