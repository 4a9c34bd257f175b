"""Options of the log-prob ops: K candidate labels per position and logit soft-capping.

Each is checked against a float64 computation (values and gradients), on both backends, across dtypes,
with ignored labels, odd shapes and non-contiguous inputs; kernel outputs start as NaN (conftest).
"""

import pytest
import torch

import fastrm
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, row_strided

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(shape, V, dtype, scale=3.0):
    return (torch.randn(*shape, V, device=DEVICE) * scale).to(dtype)


def make_labels(shape, V, ignore_frac=0.2):
    labels = torch.randint(0, V, shape, device=DEVICE)
    labels[torch.rand(shape, device=DEVICE) < ignore_frac] = -100
    return labels


def check_vs_float64(logits, labels, backend, *, entropy=True, **kw):
    """Values and gradients (random upstream gradients on every output) against float64."""
    tol = TOL[logits.dtype]
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = fastrm.gather_logprobs(x, labels, return_entropy=True, backend=backend, **kw)
    assert lp.shape == labels.shape and ent.shape == logits.shape[:-1]
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    x64 = logits.detach().double().requires_grad_(True)
    lp64, ent64 = fastrm.gather_logprobs_reference(x64, labels, return_entropy=True, **kw)
    torch.testing.assert_close(lp.double(), lp64, **tol)
    torch.testing.assert_close(ent.double(), ent64, **tol)
    g_lp = torch.randn_like(lp)
    g_ent = torch.randn_like(ent) if entropy else torch.zeros_like(ent)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    ((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum()).backward()
    assert x.grad.dtype == logits.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    return lp, x.grad


# ---------------------------------------------------------------------------------------------------------------
# K candidate labels per position
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,K,V", [((2, 7), 3, 300), ((5,), 1, 1000), ((3, 1), 5, 7), ((1,), 8, 33)])
def test_k_labels_match_float64(backend, dtype, shape, K, V):
    logits = make_logits(shape, V, dtype)
    labels = make_labels(shape + (K,), V)
    check_vs_float64(logits, labels, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_labels_duplicates_and_temperature(backend):
    logits = make_logits((4, 6), 97, torch.float32)
    labels = make_labels((4, 6, 4), 97)
    labels[..., 1] = labels[..., 0]  # duplicate candidates: their gradients add up
    check_vs_float64(logits, labels, backend, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_labels_equal_one_label_at_a_time(backend):
    """The K path gives exactly what K separate single-label calls give (values and summed gradients)."""
    logits = make_logits((3, 5), 211, torch.float32)
    labels = make_labels((3, 5, 3), 211)
    x = logits.clone().requires_grad_(True)
    out = fastrm.gather_logprobs(x, labels, backend=backend)
    out.sum().backward()
    y = logits.clone().requires_grad_(True)
    singles = [fastrm.gather_logprobs(y, labels[..., k].contiguous(), backend=backend) for k in range(3)]
    torch.stack(singles, -1).sum().backward()
    torch.testing.assert_close(out, torch.stack(singles, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_labels_fully_ignored_rows(backend):
    logits = make_logits((2, 4), 50, torch.float32)
    labels = make_labels((2, 4, 3), 50, ignore_frac=0.0)
    labels[0, 1] = -100  # every candidate of one position ignored
    labels[1, 2, 0] = -100  # one candidate of another
    lp, grad = check_vs_float64(logits, labels, backend)
    assert (lp[0, 1] == 0).all() and (grad[0, 1] == 0).all()
    assert lp[1, 2, 0] == 0 and lp[1, 2, 1] != 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "last_dim_strided", "labels_strided"])
def test_k_labels_non_contiguous(backend, layout):
    logits = make_logits((3, 9), 129, torch.float32)
    labels = make_labels((3, 9, 4), 129)
    if layout == "row_strided":
        logits = row_strided(logits)
    elif layout == "last_dim_strided":
        logits = non_contiguous(logits)
    else:
        labels = labels.transpose(0, 1).contiguous().transpose(0, 1)
        assert not labels.is_contiguous()
    check_vs_float64(logits, labels, backend)


def test_k_labels_shape_errors():
    logits = make_logits((2, 3), 10, torch.float32)
    for bad in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, 1, 1, dtype=torch.long),
                torch.zeros(3, 3, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="labels must have shape"):
            fastrm.gather_logprobs(logits, bad.to(DEVICE))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        fastrm.gather_logprobs(logits, torch.full((2, 3, 2), 10, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------------
# softcap (Gemma-2/3 final_logit_softcapping)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,V", [((2, 9), 300), ((1,), 1000), ((4, 1), 7)])
def test_softcap_gather_matches_float64(backend, dtype, shape, V):
    # scale 20 vs cap 5: most logits sit on the saturated part of tanh, where the gradient is small.
    logits = make_logits(shape, V, dtype, scale=20.0)
    check_vs_float64(logits, make_labels(shape, V), backend, softcap=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_with_temperature_and_k_labels(backend):
    logits = make_logits((3, 4), 150, torch.float32, scale=40.0)
    check_vs_float64(logits, make_labels((3, 4), 150), backend, softcap=30.0, temperature=0.6)
    check_vs_float64(logits, make_labels((3, 4, 3), 150), backend, softcap=30.0, temperature=1.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_changes_the_result(backend):
    """The cap is applied (the test above would pass for a no-op if the reference ignored it too)."""
    logits = make_logits((2, 5), 64, torch.float32, scale=20.0)
    labels = make_labels((2, 5), 64, ignore_frac=0.0)
    capped = fastrm.gather_logprobs(logits, labels, softcap=3.0, backend=backend)
    x = logits.double()
    by_hand = torch.log_softmax(3.0 * torch.tanh(x / 3.0), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(capped.double(), by_hand, **TOL[torch.float32])
    assert (capped - fastrm.gather_logprobs(logits, labels, backend=backend)).abs().max() > 1.0


UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def linear_tol(dtype, ref, grad=False):
    """The logits are rounded to the inputs' dtype by the matmul (as lm_head does): error relative to the
    largest value, as tests/test_linear_logprobs.py takes it."""
    c = 256 if dtype == torch.float32 else (16 if grad else 8)
    return dict(atol=c * UNIT_ROUNDOFF[dtype] * ref.abs().max().item(), rtol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_linear_matches_float64(backend, dtype):
    N, H, V = 37, 16, 300
    hidden = torch.randn(N, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 2.0).to(dtype)  # logits of std ~8 against a cap of 4
    bias = torch.randn(V, device=DEVICE).to(dtype)
    labels = make_labels((N,), V)
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    lp, ent = fastrm.linear_logprobs(h, w, labels, bias=b, softcap=4.0, temperature=0.8, return_entropy=True,
                                     chunk_size=8, backend=backend)
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight, bias))
    lp64, ent64 = fastrm.linear_logprobs_reference(h64, w64, labels, bias=b64, softcap=4.0, temperature=0.8,
                                                   return_entropy=True)
    torch.testing.assert_close(lp.double(), lp64, **linear_tol(dtype, lp64))
    torch.testing.assert_close(ent.double(), ent64, **linear_tol(dtype, ent64))
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    (lp64 * g_lp.double() + ent64 * g_ent.double()).sum().backward()
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **linear_tol(dtype, want, grad=True))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "5"])
def test_softcap_errors(bad):
    logits = make_logits((2,), 5, torch.float32)
    labels = torch.zeros(2, dtype=torch.long, device=DEVICE)
    with pytest.raises((TypeError, ValueError), match="softcap"):
        fastrm.gather_logprobs(logits, labels, softcap=bad)
    with pytest.raises((TypeError, ValueError), match="softcap"):
        fastrm.linear_logprobs(logits, torch.randn(3, 5, device=DEVICE), labels, softcap=bad)
