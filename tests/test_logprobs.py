import pytest
import torch
import torch.nn.functional as F

import fastrm
from fastrm import kernels
from fastrm.ops.logprobs import row_layout
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, requires_cuda, row_strided

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(shape, V, dtype, ignore_frac=0.2, scale=3.0):
    logits = (torch.randn(*shape, V, device=DEVICE) * scale).to(dtype)
    labels = torch.randint(0, V, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) < ignore_frac] = -100
    return logits, labels


def reference(logits, labels, **kw):
    """float64 ground truth (values and gradients) computed from the same rounded inputs."""
    x = logits.detach().double().requires_grad_(True)
    out = fastrm.gather_logprobs_reference(x, labels, **kw)
    return x, out


def check_against_reference(logits, labels, backend, temperature=1.0, entropy=True):
    tol = TOL[logits.dtype]
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fastrm.gather_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == labels.shape and ent.shape == labels.shape
    x64, (lp64, ent64) = reference(logits, labels, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(lp.double(), lp64, **tol)
    torch.testing.assert_close(ent.double(), ent64, **tol)
    # Random upstream gradients on both outputs, so neither term of the backward can hide.
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent) if entropy else torch.zeros_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    assert x.grad.dtype == logits.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    return lp, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((131,), 50257), ((2, 37), 1000), ((1,), 7), ((3, 1), 1)])
def test_matches_float64(backend, dtype, shape, V):
    logits, labels = make_case(shape, V, dtype)
    check_against_reference(logits, labels, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature(backend):
    logits, labels = make_case((5, 9), 333, torch.float32)
    check_against_reference(logits, labels, backend, temperature=0.6)
    check_against_reference(logits, labels, backend, temperature=1.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_backward(backend):
    logits, labels = make_case((4, 11), 500, torch.float32)
    x = logits.clone().requires_grad_(True)
    lp = fastrm.gather_logprobs(x, labels, backend=backend)
    g = torch.randn_like(lp)
    (lp * g).sum().backward()
    x64, lp64 = reference(logits, labels)
    (lp64 * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "last_dim_strided", "three_level"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(backend, layout, dtype):
    if layout == "row_strided":  # like logits[:, :-1, :]: addressed in place, no copy
        logits, labels = make_case((3, 13), 257, dtype)
        logits = row_strided(logits)
        assert row_layout(logits) is not None
    elif layout == "last_dim_strided":
        logits, labels = make_case((3, 13), 257, dtype)
        logits = non_contiguous(logits)
    else:  # three leading dims that cannot be merged: falls back to a copy
        base, _ = make_case((2, 3, 4), 65, dtype)
        logits = base[:, :-1, :-1]
        labels = torch.randint(0, 65, (2, 2, 3), device=DEVICE)
        assert row_layout(logits) is None
    check_against_reference(logits, labels, backend)


def test_row_layout_merges_and_splits():
    x = torch.empty(4, 5, 6, 7)
    assert row_layout(x) == (120, 120, 0, 7)
    assert row_layout(x[:, :-1]) == (96, 24, 210, 7)  # the last two leading dims still merge
    assert row_layout(x[:, :, :-1]) == (100, 5, 42, 7)  # the first two merge
    assert row_layout(x[:, :-1, :-1]) is None  # three independent strides: the op copies
    assert row_layout(torch.empty(7)) == (1, 1, 0, 0)
    assert row_layout(torch.empty(1, 1, 7)) == (1, 1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_gives_zero_and_zero_grad_even_over_nan(backend):
    logits, labels = make_case((6, 8), 100, torch.float32, ignore_frac=0.0)
    labels[1, :3] = -100
    labels[4, 5] = -100
    logits[1, :3] = float("nan")  # garbage under ignored positions must not leak anywhere
    x = logits.clone().requires_grad_(True)
    lp, ent = fastrm.gather_logprobs(x, labels, return_entropy=True, backend=backend)
    ignored = labels == -100
    assert torch.equal(lp[ignored], torch.zeros_like(lp[ignored]))
    assert torch.equal(ent[ignored], torch.zeros_like(ent[ignored]))
    assert torch.isfinite(lp).all() and (lp[~ignored] < 0).all()
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, labels = make_case((3, 4), 50, torch.float32, ignore_frac=0.0)
    labels[0, 0] = 7
    lp = fastrm.gather_logprobs(logits, labels, ignore_index=7, backend=backend)
    assert lp[0, 0] == 0
    mask = labels != 7
    torch.testing.assert_close(lp[mask].double(), fastrm.gather_logprobs_reference(logits.double(), labels)[mask],
                               **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf(backend):
    # Vocabulary masking with -inf (banned tokens, padded vocab) must give finite outputs and grads.
    logits, labels = make_case((4, 5), 300, torch.float32, ignore_frac=0.0)
    logits[..., 100:] = float("-inf")
    labels = labels % 100
    lp, grad = check_against_reference(logits, labels, backend)
    assert torch.isfinite(lp).all()
    assert torch.equal(grad[..., 100:], torch.zeros_like(grad[..., 100:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_grad_into_logits(backend):
    logits, labels = make_case((3, 7), 200, torch.float32)
    expected_x = logits.clone().requires_grad_(True)
    g = torch.randn(3, 7, device=DEVICE)
    (fastrm.gather_logprobs(expected_x, labels, backend=backend) * g).sum().backward()

    hidden = torch.randn(3, 7, 16, device=DEVICE, requires_grad=True)
    head = torch.randn(200, 16, device=DEVICE)
    inplace_logits = hidden @ head.t()  # a non-leaf buffer nobody else reads
    with torch.no_grad():
        inplace_logits.copy_(logits)
    inplace_logits.retain_grad()
    (fastrm.gather_logprobs(inplace_logits, labels, inplace_backward=True, backend=backend) * g).sum().backward()
    torch.testing.assert_close(inplace_logits.grad, expected_x.grad)
    # The logits buffer itself now holds the gradient: no second [..., V] tensor was allocated.
    torch.testing.assert_close(inplace_logits.detach(), expected_x.grad)
    torch.testing.assert_close(hidden.grad, expected_x.grad @ head)


def test_gradcheck_torch_path_float64():
    logits = torch.randn(3, 4, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 9, (3, 4), device=DEVICE)
    labels[0, 1] = -100

    def fn(x):
        return fastrm.gather_logprobs(x[:, :-1], labels[:, :-1], temperature=0.8, return_entropy=True, backend="torch")

    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_for_trl_selective_log_softmax(backend):
    """TRL's selective_log_softmax: logsumexp per row for fp32, per-row log_softmax for half dtypes."""

    def selective_log_softmax(logits, index):
        if logits.dtype in (torch.float32, torch.float64):
            picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
            return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        rows = [F.log_softmax(row, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1) for row, idx in zip(logits, index)]
        return torch.stack(rows)

    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = make_case((2, 9), 1000, dtype, ignore_frac=0.0)
        ours = fastrm.gather_logprobs(logits, labels, backend=backend)
        theirs = selective_log_softmax(logits, labels).float()
        # TRL's half path rounds log_softmax to bf16 before gather; ours stays in fp32.
        torch.testing.assert_close(ours, theirs, **(TOL[dtype] if dtype != torch.float32 else dict(atol=2e-5, rtol=2e-5)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_in_for_verl_logprobs_and_entropy(backend):
    """verl's logprobs_from_logits (log_softmax + gather) and entropy_from_logits (lse - sum p*z)."""
    logits, labels = make_case((3, 5), 700, torch.float32, ignore_frac=0.0)
    verl_logp = F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pd = F.softmax(logits, dim=-1)
    verl_entropy = torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)
    lp, ent = fastrm.gather_logprobs(logits, labels, return_entropy=True, backend=backend)
    torch.testing.assert_close(lp, verl_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent, verl_entropy, atol=2e-5, rtol=2e-5)


def large_logit_rows(n_rows, V, dtype, offset=1e4):
    """Rows around ``offset``: half near one-hot (one logit 30 above the rest: entropy ~1e-9), half spread
    (randn around the offset), as in TRL's entropy tests. In fp32, ulp(1e4) ~ 1e-3 dwarfs those entropies.
    (bf16's ulp at 1e4 is 64: there the peak is 128 above, and the spread rows round to one value.)"""
    logits = offset + torch.randn(n_rows, V, device=DEVICE)
    hot = torch.randint(0, V, (n_rows,), device=DEVICE)
    near_one_hot = torch.arange(n_rows, device=DEVICE) % 2 == 0
    logits[near_one_hot, hot[near_one_hot]] += 30.0 if dtype == torch.float32 else 128.0
    return logits.to(dtype), hot


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_entropy_and_logprobs_at_large_logit_offsets(backend, dtype, offset):
    # The entropy is accumulated relative to the running max, so nothing cancels: non-negative, and within
    # fp32 rounding of 1 (not of the logits' magnitude) of float64 on the same rounded logits. V = 3000 with
    # the interpreter's blocks shrunk to 1024 crosses block boundaries, where the running max moves.
    logits, labels = large_logit_rows(6, 3000, dtype, offset)
    for temperature in (1.0, 0.9):
        with _small_vocab_blocks(1024):
            lp, ent = fastrm.gather_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                             backend=backend)
        lp64, ent64 = fastrm.gather_logprobs_reference(logits.double(), labels, temperature=temperature,
                                                       return_entropy=True)
        assert (ent >= 0).all(), ent
        torch.testing.assert_close(ent.double(), ent64, atol=1e-5, rtol=1e-5)
        assert ent[0::2].max() < 1e-5 and ent[1::2].min() > 1.0  # near one-hot rows vs spread rows
        if temperature == 1.0:  # logits / 0.9 is itself rounded to ulp(1e4) in fp32, log-probs with it
            torch.testing.assert_close(lp.double(), lp64, atol=1e-5, rtol=1e-5)


def _small_vocab_blocks(block):
    import contextlib
    from unittest import mock

    from fastrm.kernels import logprobs as logprob_kernels

    return mock.patch.object(logprob_kernels, "BLOCK_V_INTERPRET", block) if kernels.INTERPRET else contextlib.nullcontext()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_inference(backend):
    logits, labels = make_case((2, 3), 64, torch.bfloat16)
    with torch.no_grad():
        lp = fastrm.gather_logprobs(logits, labels, backend=backend)
    assert not lp.requires_grad
    torch.testing.assert_close(lp.double(), fastrm.gather_logprobs_reference(logits.double(), labels), **TOL[torch.bfloat16])


def test_module_form():
    logits, labels = make_case((2, 3), 64, torch.float32)
    module = fastrm.GatherLogprobs(temperature=0.9, return_entropy=True, backend="torch")
    lp, ent = module(logits, labels)
    ref_lp, ref_ent = fastrm.gather_logprobs_reference(logits.double(), labels, temperature=0.9, return_entropy=True)
    torch.testing.assert_close(lp.double(), ref_lp, **TOL[torch.float32])
    torch.testing.assert_close(ent.double(), ref_ent, **TOL[torch.float32])
    assert "temperature=0.9" in repr(module)


def test_torch_path_memory_is_chunked(monkeypatch):
    """The torch path must never build a full [N, V] float32 temporary: with a tiny chunk it still agrees."""
    import fastrm.ops.logprobs as mod

    monkeypatch.setattr(mod, "TORCH_CHUNK_ELEMENTS", 64)  # 1 row per block at V=100
    logits, labels = make_case((5, 3), 100, torch.float32)
    check_against_reference(logits, labels, "torch")


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    logits, labels = make_case((2, 3), 10, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastrm.gather_logprobs(logits, labels[:, :2])
    with pytest.raises(ValueError, match="labels must have shape"):
        fastrm.gather_logprobs(logits, labels[0])  # would broadcast in naive code
    with pytest.raises(TypeError, match="labels must have dtype"):
        fastrm.gather_logprobs(logits, labels.float())
    with pytest.raises(TypeError, match="logits must have dtype"):
        fastrm.gather_logprobs(logits.long(), labels)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        fastrm.gather_logprobs(logits.tolist(), labels)
    with pytest.raises(ValueError, match="logits is empty"):
        fastrm.gather_logprobs(logits[:0], labels[:0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fastrm.gather_logprobs(logits, torch.full_like(labels, 10))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fastrm.gather_logprobs(logits, torch.full_like(labels, -1))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fastrm.gather_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastrm.gather_logprobs(logits, labels, ignore_index=-100.0)
    with pytest.raises(ValueError, match="labels is on meta"):
        fastrm.gather_logprobs(logits, labels.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastrm.gather_logprobs(logits, labels, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_raise_instead_of_propagating(backend):
    logits, labels = make_case((2, 3), 10, torch.float32, ignore_frac=0.0)
    logits[1, 2, 4] = float("nan")
    with pytest.raises(ValueError, match="logits contains NaN or inf"):
        fastrm.gather_logprobs(logits, labels, backend=backend)


def test_value_checks_can_be_disabled(monkeypatch):
    logits, labels = make_case((2, 3), 10, torch.float32, ignore_frac=0.0)
    logits[0, 0, 0] = float("nan")
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")
    lp = fastrm.gather_logprobs(logits, labels, backend="torch")
    assert torch.isnan(lp[0, 0]) and torch.isfinite(lp[1]).all()


def test_triton_backend_rejects_float64():
    if not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels.INTERPRET):
        pytest.skip("triton not available")
    logits, labels = make_case((2,), 10, torch.float64)
    with pytest.raises(TypeError, match="backend='triton' needs logits of dtype float32, bfloat16 or float16"):
        fastrm.gather_logprobs(logits, labels, backend="triton")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    logits, labels = make_case((2,), 10, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastrm.gather_logprobs(logits.cpu(), labels.cpu(), backend="triton")


def test_env_default_backend(monkeypatch):
    monkeypatch.setenv("FASTRM_BACKEND", "bogus")
    logits, labels = make_case((2,), 10, torch.float32)
    with pytest.raises(ValueError, match="FASTRM_BACKEND"):
        fastrm.gather_logprobs(logits, labels)


def test_outputs_are_poisoned_in_tests():
    # The whole suite relies on this: kernel outputs start as NaN, so unwritten elements fail.
    assert kernels.POISON_OUTPUTS
    assert torch.isnan(kernels.new_output((3,), dtype=torch.float32, device=DEVICE)).all()


@requires_cuda
def test_int64_offsets_beyond_2_pow_31():
    # N x V > 2**31 elements: a row index times the row stride overflows int32.
    V = 262144
    N = (2**31) // V + 3
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    lp = fastrm.gather_logprobs(logits, labels, backend="triton")
    tail = slice(N - 4, N)
    torch.testing.assert_close(lp[tail].double(), fastrm.gather_logprobs_reference(logits[tail].double(), labels[tail]),
                               **TOL[torch.bfloat16])
