"""ppo_policy_loss / value_loss / kl_penalty: both backends against float64 references, and against the
verl and TRL formulas they replace, values and gradients."""

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, requires_cuda, row_strided

from fastrm import kernels
from fastrm.kernels import ppo as ppo_kernels
from fastrm.kernels.ppo import kl_penalty_reference, ppo_policy_loss_reference, value_loss_reference
from fastrm.ops.ppo import (
    KLPenalty,
    PolicyLossOutput,
    PPOPolicyLoss,
    ValueLoss,
    ValueLossOutput,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KINDS = ["k1", "abs", "k2", "k3"]
LAYOUTS = ["full", "right_pad", "left_pad", "holes"]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
# Losses and metrics are accumulated in float32 whatever the input dtype, so they are float32-accurate
# against a float64 reference on the same (rounded) inputs; gradients come back rounded to the input dtype.
LOSS_TOL = TOL[torch.float32]
METRIC_TOL = dict(atol=1e-6, rtol=0)

EPS, EPS_HIGH, DUAL = 0.2, 0.28, 2.0
CLIP = 0.2
# Every generated value keeps this distance (in log-ratio, or in value units) from any branch boundary, so
# rounding the inputs to bf16/fp16 (and float32 arithmetic in the kernels) can never flip a branch.
GAP = 0.05


def _leaf(x: torch.Tensor, requires_grad=True) -> torch.Tensor:
    return x.detach().clone().requires_grad_(requires_grad)


def _uniform(lo, hi, n):
    return torch.rand(n, device=DEVICE, dtype=torch.float64) * (hi - lo) + lo


@pytest.fixture
def small_blocks(monkeypatch):
    """16-wide chunks: T=37 and T=300 walk several chunks per row, the last one partial."""
    import fastrm.kernels

    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T", 16)  # the shared row-scan chunk sizes
    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T_INTERPRET", 16)


def make_mask(B, T, layout, *, empty_row=True):
    """[B, T] bool mask; row 0 is full, and with ``empty_row`` (B >= 3) the middle row has no valid token."""
    pos = torch.arange(T, device=DEVICE)
    lengths = torch.randint(1, T + 1, (B,), device=DEVICE)
    lengths[0] = T
    if layout == "full":
        m = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    elif layout == "right_pad":
        m = pos[None, :] < lengths[:, None]
    elif layout == "left_pad":
        m = pos[None, :] >= (T - lengths)[:, None]
    elif layout == "holes":  # multi-turn: observation tokens masked out in the middle of the response
        m = torch.rand(B, T, device=DEVICE) < 0.6
        m[:, 0] = True
    else:
        raise ValueError(layout)
    if empty_row and B >= 3:
        m[B // 2] = False
    return m


def _cycle_over_valid(mask, n_kinds):
    """An integer kind per position: over the valid positions (in random order) 0, 1, ..., n_kinds - 1,
    0, 1, ...; masked positions get random kinds. So any batch with >= n valid tokens has the first n kinds."""
    flat = mask.reshape(-1)
    kind = torch.randint(0, n_kinds, flat.shape, device=DEVICE)
    idx = flat.nonzero().squeeze(1)
    idx = idx[torch.randperm(idx.numel(), device=DEVICE)]
    kind[idx] = torch.arange(idx.numel(), device=DEVICE) % n_kinds
    return kind.view(mask.shape)


# ----------------------------------------------------------------------------------------------
# Input generators: every branch of each loss is hit, away from its boundaries
# ----------------------------------------------------------------------------------------------


def policy_bands(clip_eps, clip_eps_high, dual_clip):
    """Log-ratio intervals: inside the clip range, above it (below the dual clip), below it, past the dual clip."""
    lo, hi = math.log(1 - clip_eps), math.log(1 + clip_eps_high)
    dual = math.log(dual_clip or DUAL)
    assert hi + 2 * GAP < dual
    return [(lo + GAP, hi - GAP), (hi + GAP, dual - GAP), (lo - 1.0, lo - GAP), (dual + GAP, dual + 0.7)]


# (band, sign of A); the first three give, in order: unclipped, clipped, dual-clipped (when dual clip is on).
POLICY_CASES = [(0, 1), (1, 1), (3, -1), (2, -1), (2, 1), (1, -1), (0, -1), (3, 1)]


def make_policy_inputs(B, T, layout="holes", dtype=torch.float32, *, clip_eps=EPS, clip_eps_high=EPS,
                       dual_clip=DUAL, empty_row=True, mask=None):
    mask = make_mask(B, T, layout, empty_row=empty_row) if mask is None else mask
    bands = policy_bands(clip_eps, clip_eps_high, dual_clip)
    case = _cycle_over_valid(mask, len(POLICY_CASES)).reshape(-1)
    n = case.numel()
    log_ratio = torch.empty(n, device=DEVICE, dtype=torch.float64)
    sign = torch.empty(n, device=DEVICE, dtype=torch.float64)
    for k, (band, s) in enumerate(POLICY_CASES):
        sel = case == k
        log_ratio[sel] = _uniform(*bands[band], int(sel.sum()))
        sign[sel] = s
    logprobs = -_uniform(0.05, 3.0, n)
    old = logprobs - log_ratio
    adv = sign * _uniform(0.1, 2.0, n)
    shape = (B, T)
    return (logprobs.view(shape).to(dtype), old.view(shape).to(dtype), adv.view(shape).to(dtype), mask)


def make_value_inputs(B, T, layout="holes", dtype=torch.float32, *, clip=CLIP, empty_row=True, mask=None):
    """Values inside the clip range, outside it with the clipped error larger, outside it with it smaller."""
    mask = make_mask(B, T, layout, empty_row=empty_row) if mask is None else mask
    cases = [0, 1, 2] if clip - GAP > 0 else [1, 2]
    case = torch.tensor(cases, device=DEVICE)[_cycle_over_valid(mask, len(cases)).reshape(-1)]
    n = case.numel()
    old = 0.5 * torch.randn(n, device=DEVICE, dtype=torch.float64)
    sign = torch.where(torch.rand(n, device=DEVICE) < 0.5, -1.0, 1.0).to(torch.float64)
    inside = _uniform(-(clip - GAP), clip - GAP, n) if clip - GAP > 0 else torch.zeros(n, device=DEVICE, dtype=torch.float64)
    diff = torch.where(case == 0, inside, sign * (clip + _uniform(GAP, 1.0, n)))
    values = old + diff
    # Outside the range the clipped value is old + sign * clip; the clipped error is the larger one iff
    # returns lies on the values' side of the midpoint between the two.
    mid = (values + old + sign * clip) / 2
    offset = _uniform(GAP, 1.0, n)
    returns = torch.where(case == 1, mid + sign * offset, mid - sign * offset)
    returns = torch.where(case == 0, old + torch.randn_like(old), returns)
    shape = (B, T)
    return values.view(shape).to(dtype), old.view(shape).to(dtype), returns.view(shape).to(dtype), mask


# x = ref_logprobs - logprobs: the bulk (no clamp), the k3 clamp at 10 (both sides), the log-ratio clamp at
# +-20 (both sides), and exact ties (d = 0, where abs has gradient 0). The k3 clamp is active for x outside
# about [-11.0, 2.611]; every band keeps 0.3 away from that and from +-20.
KL_BANDS = [(-10.7, 2.3), (2.9, 19.7), None, (20.3, 30.0), (-19.7, -11.3), (-30.0, -20.3), (-1.0, 1.0)]


def make_kl_inputs(B, T, dtype=torch.float32):
    everything = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    case = _cycle_over_valid(everything, len(KL_BANDS)).reshape(-1)
    n = case.numel()
    x = torch.zeros(n, device=DEVICE, dtype=torch.float64)
    for k, band in enumerate(KL_BANDS):
        sel = case == k
        if band is not None:
            x[sel] = _uniform(*band, int(sel.sum()))
    logprobs = (-_uniform(0.0, 5.0, n)).to(dtype)
    ref = (logprobs.double() + x).to(dtype)
    ref = torch.where(case == 2, logprobs, ref)  # exact ties, whatever the rounding
    return logprobs.view(B, T), ref.view(B, T)


# ----------------------------------------------------------------------------------------------
# Checkers: fastrm vs the float64 reference on the same (rounded) inputs
# ----------------------------------------------------------------------------------------------


def _clean64(x, mask):
    # The references multiply by the mask as verl does, so they need finite masked positions.
    return torch.where(mask != 0, x.detach(), 0).double()


def _grad_output(dtype):
    # Not 1: the backward must scale the saved gradient by grad_output.
    return (torch.rand((), device=DEVICE, dtype=torch.float64) + 0.5).to(dtype)


def check_policy(backend, logprobs, old, adv, mask, *, clip_eps=EPS, clip_eps_high=None, dual_clip=None,
                 agg="token-mean", grad_tol=None):
    logprobs = _leaf(logprobs)
    out = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                          dual_clip=dual_clip, agg=agg, backend=backend)
    assert isinstance(out, PolicyLossOutput)
    float64 = logprobs.dtype == torch.float64
    assert out.loss.dtype == (torch.float64 if float64 else torch.float32) and out.loss.shape == ()
    for metric in out[1:]:
        assert metric.dtype == torch.float32 and metric.shape == () and not metric.requires_grad

    lp64 = _leaf(_clean64(logprobs, mask))
    ref = ppo_policy_loss_reference(lp64, _clean64(old, mask), _clean64(adv, mask), mask, clip_eps=clip_eps,
                                    clip_eps_high=clip_eps_high, dual_clip=dual_clip, agg=agg)
    torch.testing.assert_close(out.loss.double(), ref[0], **(TOL[torch.float64] if float64 else LOSS_TOL))
    for name, got, want in zip(PolicyLossOutput._fields[1:], out[1:], ref[1:]):
        tol = METRIC_TOL if name.startswith("clipfrac") else LOSS_TOL
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda m: f"{name}: {m}")

    g_out = _grad_output(out.loss.dtype)
    (grad,) = torch.autograd.grad(out.loss, logprobs, g_out)
    (want,) = torch.autograd.grad(ref[0], lp64, g_out.double())
    assert grad.dtype == logprobs.dtype and grad.shape == logprobs.shape
    assert torch.isfinite(grad).all()
    assert (grad[mask == 0] == 0).all()
    torch.testing.assert_close(grad.double(), want, **(grad_tol or TOL[logprobs.dtype]))
    return out, grad


def check_value(backend, values, old, returns, mask, *, clip=CLIP, agg="token-mean", grad_tol=None):
    values = _leaf(values)
    out = value_loss(values, old, returns, mask, clip=clip, agg=agg, backend=backend)
    assert isinstance(out, ValueLossOutput)
    float64 = values.dtype == torch.float64
    assert out.loss.dtype == (torch.float64 if float64 else torch.float32) and out.loss.shape == ()
    assert out.clipfrac.dtype == torch.float32 and not out.clipfrac.requires_grad

    v64 = _leaf(_clean64(values, mask))
    ref_loss, ref_clipfrac = value_loss_reference(v64, _clean64(old, mask), _clean64(returns, mask), mask,
                                                  clip=clip, agg=agg)
    torch.testing.assert_close(out.loss.double(), ref_loss, **(TOL[torch.float64] if float64 else LOSS_TOL))
    torch.testing.assert_close(out.clipfrac.double(), ref_clipfrac.double(), **METRIC_TOL)

    g_out = _grad_output(out.loss.dtype)
    (grad,) = torch.autograd.grad(out.loss, values, g_out)
    (want,) = torch.autograd.grad(ref_loss, v64, g_out.double())
    assert grad.dtype == values.dtype and grad.shape == values.shape
    assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    torch.testing.assert_close(grad.double(), want, **(grad_tol or TOL[values.dtype]))
    return out, grad


def check_kl(backend, logprobs, ref, kind, *, need=(True, True)):
    logprobs, ref = _leaf(logprobs, need[0]), _leaf(ref, need[1])
    kl = kl_penalty(logprobs, ref, kind, backend=backend)
    float64 = logprobs.dtype == torch.float64
    assert kl.dtype == (torch.float64 if float64 else torch.float32) and kl.shape == logprobs.shape
    lp64, ref64 = _leaf(logprobs.double(), need[0]), _leaf(ref.double(), need[1])
    want = kl_penalty_reference(lp64, ref64, kind)
    torch.testing.assert_close(kl.double(), want, **(TOL[torch.float64] if float64 else LOSS_TOL))

    g_out = torch.randn_like(kl) + 0.5
    inputs = [t for t in (logprobs, ref) if t.requires_grad]
    got = torch.autograd.grad(kl, inputs, g_out)
    ref_inputs = [t for t in (lp64, ref64) if t.requires_grad]
    expected = torch.autograd.grad(want, ref_inputs, g_out.double())
    for g, w, x in zip(got, expected, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, **TOL[x.dtype])
    return kl, got


# ----------------------------------------------------------------------------------------------
# ppo_policy_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual_clip", [None, DUAL])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_policy_matches_reference(backend, agg, dual_clip, T, small_blocks):
    B = 7
    lp, old, adv, mask = make_policy_inputs(B, T, "holes", dual_clip=dual_clip)
    out, grad = check_policy(backend, lp, old, adv, mask, dual_clip=dual_clip, agg=agg)
    # Every branch is exercised: some tokens clipped, some not; the dual clip active on some, never without it.
    assert 0 < out.clipfrac < 1
    if dual_clip is None:
        assert out.clipfrac_lower == 0
    else:
        assert 0 < out.clipfrac_lower < 1
    assert (grad[mask] == 0).any() and (grad[mask] != 0).any()
    assert (grad[B // 2] == 0).all()  # the row without a valid token


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_policy_layouts(backend, layout):
    lp, old, adv, mask = make_policy_inputs(5, 37, layout, clip_eps_high=EPS_HIGH, empty_row=layout != "full")
    for agg in AGGS:
        check_policy(backend, lp, old, adv, mask, clip_eps_high=EPS_HIGH, dual_clip=DUAL, agg=agg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_asymmetric_clip(backend):
    # clip_eps_high > clip_eps (DAPO's "clip higher"): ratios in (1 + eps, 1 + eps_high) are not clipped.
    eps, eps_high = 0.1, 0.3
    lp, old, adv, mask = make_policy_inputs(6, 40, clip_eps=eps, clip_eps_high=eps_high)
    for agg in AGGS:
        out, _ = check_policy(backend, lp, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, agg=agg)
    symmetric = ppo_policy_loss(lp, old, adv, mask, clip_eps=eps, backend=backend)
    assert symmetric.clipfrac > out.clipfrac  # the wider upper bound clips fewer tokens
    # Positive advantage, ratio 1.2: inside the asymmetric range (gradient -A * ratio), outside the symmetric one.
    one = torch.ones(1, 1, device=DEVICE)
    for high, expected in [(eps_high, -1.2), (None, 0.0)]:
        x = _leaf(torch.log(1.2 * one))
        ppo_policy_loss(x, 0 * one, one, one > 0, clip_eps=eps, clip_eps_high=high, backend=backend).loss.backward()
        torch.testing.assert_close(x.grad, expected * one)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_zero_clip_eps(backend):
    # clip_eps = 0: every ratio != 1 is on the clipped side for one sign of A.
    lp, old, adv, mask = make_policy_inputs(4, 30, clip_eps=0.3, clip_eps_high=0.3)
    out, _ = check_policy(backend, lp, old, adv, mask, clip_eps=0.0, agg="seq-mean-token-sum")
    assert 0 < out.clipfrac < 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_policy_dtypes(backend, dtype):
    lp, old, adv, mask = make_policy_inputs(5, 37, "right_pad", dtype)
    for agg in AGGS:
        out, _ = check_policy(backend, lp, old, adv, mask, dual_clip=DUAL, agg=agg)
        assert 0 < out.clipfrac < 1 and 0 < out.clipfrac_lower < 1


def test_policy_float64_torch_auto_and_gradcheck():
    lp, old, adv, mask = make_policy_inputs(4, 9, "holes", torch.float64, dual_clip=DUAL)
    for backend in ("torch", "auto"):  # auto: float64 always takes the PyTorch path
        for agg in AGGS:
            check_policy(backend, lp, old, adv, mask, dual_clip=DUAL, agg=agg)
    for agg in AGGS:
        for dual_clip in (None, DUAL):
            fn = lambda x: ppo_policy_loss(x, old, adv, mask, dual_clip=dual_clip, agg=agg, backend="torch").loss  # noqa: E731
            assert torch.autograd.gradcheck(fn, (_leaf(lp),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_policy_mask_dtypes(backend, mask_dtype):
    lp, old, adv, mask = make_policy_inputs(5, 20, "holes")
    out_bool = ppo_policy_loss(lp, old, adv, mask, dual_clip=DUAL, agg="seq-mean-token-mean", backend=backend)
    out, _ = check_policy(backend, lp, old, adv, mask.to(mask_dtype), dual_clip=DUAL, agg="seq-mean-token-mean")
    for a, b in zip(out, out_bool):
        torch.testing.assert_close(a.detach(), b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_non_contiguous(backend, small_blocks):
    B, T = 5, 37
    lp, old, adv, mask = make_policy_inputs(B, T, "holes", dual_clip=DUAL)
    # GRPO-style advantages: one per sequence, expanded over T (stride 0); the others strided in T or in B.
    seq_adv = adv[:, :1].clone()
    adv_expanded = seq_adv.expand(B, T)
    mask_strided = torch.zeros(B, 2 * T, dtype=torch.bool, device=DEVICE)
    mask_strided[:, ::2] = mask
    mask_strided = mask_strided[:, ::2]
    assert adv_expanded.stride(1) == 0 and not mask_strided.is_contiguous()
    for agg in AGGS:
        out, grad = check_policy(backend, non_contiguous(lp), row_strided(old), adv_expanded, mask_strided,
                                 dual_clip=DUAL, agg=agg)
        contiguous = ppo_policy_loss(lp, old, adv_expanded.contiguous(), mask, dual_clip=DUAL, agg=agg, backend=backend)
        torch.testing.assert_close(out.loss, contiguous.loss)
    # A transposed (column-major) batch.
    lp_t, old_t, adv_t = (x.t().contiguous().t() for x in (lp, old, adv))
    assert not lp_t.is_contiguous()
    check_policy(backend, lp_t, old_t, adv_t, mask.t().contiguous().t(), dual_clip=DUAL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_garbage_on_masked_positions(backend):
    lp, old, adv, mask = make_policy_inputs(5, 37, "right_pad", dual_clip=DUAL)
    lp = torch.where(mask, lp, float("nan"))
    old = torch.where(mask, old, float("inf"))
    adv = torch.where(mask, adv, float("-inf"))
    for agg in AGGS:
        out, grad = check_policy(backend, lp, old, adv, mask, dual_clip=DUAL, agg=agg)  # no error, no leak
        assert all(torch.isfinite(m) for m in out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dual_clip", [None, DUAL])
def test_policy_log_ratio_clamp(backend, dual_clip):
    # |logprobs - old| > 20: ratio = exp(+-20) and zero gradient (as verl's clamp); a band just inside.
    B, T = 4, 24
    lp, old, adv, mask = make_policy_inputs(B, T, "full", dual_clip=dual_clip, empty_row=False)
    far = torch.rand(B, T, device=DEVICE) < 0.3
    beyond = torch.where(torch.rand(B, T, device=DEVICE) < 0.5, -1.0, 1.0) * (20.5 + 5 * torch.rand(B, T, device=DEVICE))
    near = torch.rand(B, T, device=DEVICE) < 0.2
    inside = torch.where(torch.rand(B, T, device=DEVICE) < 0.5, -1.0, 1.0) * (15 + 4.5 * torch.rand(B, T, device=DEVICE))
    old = torch.where(far, lp - beyond, torch.where(near, lp - inside, old))
    for agg in AGGS:
        out, grad = check_policy(backend, lp, old, adv, mask, dual_clip=dual_clip, agg=agg)
        assert (grad[far] == 0).all()
        assert torch.isfinite(out.loss) and out.ratio_mean > 1e6
    # One token each: the metrics use the clamped log-ratio too (k3 = exp(-20) - 1 + 20, not ... + 25).
    one = torch.ones(1, 1, device=DEVICE)
    for log_ratio, a in [(-25.0, 1.0), (-25.0, -1.0), (25.0, -1.0)]:
        x = _leaf(log_ratio * one)
        out = ppo_policy_loss(x, 0 * one, a * one, one > 0, dual_clip=dual_clip, backend=backend)
        out.loss.backward()
        r = math.exp(math.copysign(20.0, log_ratio))
        assert x.grad.item() == 0.0
        torch.testing.assert_close(out.ratio_mean.double().item(), r, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.approx_kl.double().item(), r - 1 - math.copysign(20.0, log_ratio), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_no_valid_token(backend, monkeypatch):
    lp, old, adv, _ = make_policy_inputs(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool, device=DEVICE)
    for agg in AGGS:
        with pytest.raises(ValueError, match="mask has no valid position"):
            ppo_policy_loss(lp, old, adv, mask, agg=agg, backend=backend)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")  # unchecked: loss 0, metrics 0, zero grads, never NaN
    for agg in AGGS:
        x = _leaf(lp)
        out = ppo_policy_loss(x, old, adv, mask, agg=agg, backend=backend)
        out.loss.backward()
        assert out.loss.item() == 0.0 and all(m.item() == 0.0 for m in out[1:])
        assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_gradient_only_for_logprobs(backend):
    lp, old, adv, mask = make_policy_inputs(3, 8)
    lp, old, adv = _leaf(lp), _leaf(old), _leaf(adv)  # old/adv wrongly left requiring grad: treated as data
    out = ppo_policy_loss(lp, old, adv, mask, backend=backend)
    out.loss.backward()
    assert lp.grad is not None and (lp.grad != 0).any()
    assert old.grad is None and adv.grad is None
    # Nothing requires grad: the loss is a plain tensor; under no_grad too.
    plain = ppo_policy_loss(lp.detach(), old.detach(), adv.detach(), mask, backend=backend)
    with torch.no_grad():
        no_grad = ppo_policy_loss(lp, old, adv, mask, backend=backend)
    assert not plain.loss.requires_grad and not no_grad.loss.requires_grad
    torch.testing.assert_close(plain.loss, out.loss.detach())
    torch.testing.assert_close(no_grad.loss, out.loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_retain_graph_and_module(backend):
    lp, old, adv, mask = make_policy_inputs(4, 12, dual_clip=DUAL)
    module = PPOPolicyLoss(clip_eps=EPS, clip_eps_high=EPS_HIGH, dual_clip=DUAL, agg="seq-mean-token-mean",
                           backend=backend)
    assert "seq-mean-token-mean" in repr(module) and repr(backend) in repr(module)
    x = _leaf(lp)
    out = module(x, old, adv, mask)
    ref = ppo_policy_loss_reference(lp.double(), old.double(), adv.double(), mask, EPS, EPS_HIGH, DUAL,
                                    "seq-mean-token-mean")
    torch.testing.assert_close(out.loss.double(), ref[0], **LOSS_TOL)
    out.loss.backward(retain_graph=True)
    first = x.grad.clone()
    out.loss.backward()  # the saved gradient buffer is not consumed by the first backward
    torch.testing.assert_close(x.grad, 2 * first)


# ----------------------------------------------------------------------------------------------
# value_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [CLIP, None])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_value_matches_reference(backend, agg, clip, T, small_blocks):
    B = 7
    v, old, ret, mask = make_value_inputs(B, T, "holes")
    out, grad = check_value(backend, v, old, ret, mask, clip=clip, agg=agg)
    if clip is None:
        assert out.clipfrac == 0 and (grad[mask] != 0).all()
    else:
        assert 0 < out.clipfrac < 1
        assert (grad[mask] == 0).any() and (grad[mask] != 0).any()
    assert (grad[B // 2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_value_layouts(backend, layout):
    v, old, ret, mask = make_value_inputs(5, 37, layout, empty_row=layout != "full")
    for agg in AGGS:
        check_value(backend, v, old, ret, mask, agg=agg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_value_dtypes(backend, dtype):
    v, old, ret, mask = make_value_inputs(5, 37, "left_pad", dtype)
    for agg in AGGS:
        for clip in (CLIP, None):
            check_value(backend, v, old, ret, mask, clip=clip, agg=agg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_zero_clip(backend):
    # clip = 0: the clipped value is old_values itself.
    v, old, ret, mask = make_value_inputs(4, 30, clip=0.0)
    out, _ = check_value(backend, v, old, ret, mask, clip=0.0)
    assert 0 < out.clipfrac < 1


def test_value_float64_torch_auto_and_gradcheck():
    v, old, ret, mask = make_value_inputs(4, 9, "holes", torch.float64)
    for backend in ("torch", "auto"):
        for agg in AGGS:
            check_value(backend, v, old, ret, mask, agg=agg)
    for agg in AGGS:
        for clip in (CLIP, None):
            fn = lambda x: value_loss(x, old, ret, mask, clip=clip, agg=agg, backend="torch").loss  # noqa: E731
            assert torch.autograd.gradcheck(fn, (_leaf(v),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_non_contiguous_float_mask_and_garbage(backend, small_blocks):
    v, old, ret, mask = make_value_inputs(5, 37, "right_pad")
    fmask = mask.to(torch.float16)
    ret_g = torch.where(mask, ret, float("nan"))
    old_g = torch.where(mask, old, float("inf"))
    for agg in AGGS:
        out, grad = check_value(backend, non_contiguous(v), row_strided(old_g), non_contiguous(ret_g),
                                fmask.t().contiguous().t(), agg=agg)
        assert torch.isfinite(out.loss) and torch.isfinite(out.clipfrac)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_no_valid_token_and_module(backend):
    v, old, ret, mask = make_value_inputs(3, 6)
    with pytest.raises(ValueError, match="mask has no valid position"):
        value_loss(v, old, ret, torch.zeros_like(mask), backend=backend)
    module = ValueLoss(clip=CLIP, agg="seq-mean-token-sum", backend=backend)
    assert "seq-mean-token-sum" in repr(module)
    x = _leaf(v)
    out = module(x, old, ret, mask)
    ref_loss, ref_clipfrac = value_loss_reference(v.double(), old.double(), ret.double(), mask, CLIP, "seq-mean-token-sum")
    torch.testing.assert_close(out.loss.double(), ref_loss, **LOSS_TOL)
    torch.testing.assert_close(out.clipfrac.double(), ref_clipfrac, **METRIC_TOL)
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


# ----------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 37, 300])
def test_kl_matches_reference(backend, kind, T, small_blocks):
    B = 7
    lp, ref = make_kl_inputs(B, T)
    kl, (g_lp, g_ref) = check_kl(backend, lp, ref, kind)
    torch.testing.assert_close(g_ref, -g_lp)  # every kind is a function of logprobs - ref_logprobs
    tie = lp == ref
    assert tie.any()
    if kind == "abs":
        assert (g_lp[tie] == 0).all() and (g_lp[~tie] != 0).all()
    if kind == "k3":
        # The clamps are hit: saturated at 10 with zero gradient there, and unsaturated elsewhere.
        clamped = kl == 10.0
        assert clamped.any() and (~clamped).any()
        assert (g_lp[clamped] == 0).all() and (g_lp[~clamped & ~tie] != 0).all()
        assert (kl > -1e-6).all()  # >= 0 up to fp32 rounding of exp(x) - x - 1 near x = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_kl_dtypes(backend, dtype):
    lp, ref = make_kl_inputs(5, 37, dtype)
    for kind in KINDS:
        check_kl(backend, lp, ref, kind)


def test_kl_float64_torch_auto_and_gradcheck():
    lp, ref = make_kl_inputs(3, 14, torch.float64)
    for backend in ("torch", "auto"):
        for kind in KINDS:
            check_kl(backend, lp, ref, kind)
    for kind in KINDS:
        fn = lambda a, b: kl_penalty(a, b, kind, backend="torch")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (_leaf(lp), _leaf(ref)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_one_input_needs_grad_and_reward_use(backend):
    lp, ref = make_kl_inputs(4, 21)
    for kind in KINDS:
        check_kl(backend, lp, ref, kind, need=(True, False))
        check_kl(backend, lp, ref, kind, need=(False, True))
    # As a reward penalty: no graph, same numbers.
    x = _leaf(lp)
    with torch.no_grad():
        penalty = kl_penalty(x, ref, "k3", backend=backend)
    assert not penalty.requires_grad
    torch.testing.assert_close(penalty.double(), kl_penalty_reference(lp.double(), ref.double(), "k3"), **LOSS_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_non_contiguous_and_expanded_grad(backend, small_blocks):
    lp, ref = make_kl_inputs(5, 37)
    lp_nc, ref_nc = _leaf(non_contiguous(lp)), _leaf(row_strided(ref))
    for kind in KINDS:
        # kl.sum() hands the backward a stride-0 expanded grad_output; a masked mean a strided one.
        mask = torch.rand(5, 37, device=DEVICE) < 0.7
        kl = kl_penalty(lp_nc, ref_nc, kind, backend=backend)
        loss = kl.sum() + (kl * mask).sum() / mask.sum()
        g_lp, g_ref = torch.autograd.grad(loss, [lp_nc, ref_nc])
        lp64, ref64 = _leaf(lp.double()), _leaf(ref.double())
        want = kl_penalty_reference(lp64, ref64, kind)
        w_lp, w_ref = torch.autograd.grad(want.sum() + (want * mask).sum() / mask.sum(), [lp64, ref64])
        torch.testing.assert_close(kl.double(), want, **LOSS_TOL)
        torch.testing.assert_close(g_lp.double(), w_lp, **TOL[torch.float32])
        torch.testing.assert_close(g_ref.double(), w_ref, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_kl_strided_grad_output(backend, kind):
    # The backward reads grad_output through its strides: a stride-0 expansion (kl.sum()) and a
    # transposed view (a loss computed on kl.t()) must both give the right gradient.
    lp, ref = make_kl_inputs(5, 19)
    w = torch.randn(19, 5, device=DEVICE)
    for reduce in (lambda k: k.sum(), lambda k: (k.t() * w).sum()):
        x, y = _leaf(lp), _leaf(ref)
        g_x, g_y = torch.autograd.grad(reduce(kl_penalty(x, y, kind, backend=backend)), [x, y])
        lp64, ref64 = _leaf(lp.double()), _leaf(ref.double())
        w_x, w_y = torch.autograd.grad(reduce(kl_penalty_reference(lp64, ref64, kind)), [lp64, ref64])
        torch.testing.assert_close(g_x.double(), w_x, **TOL[torch.float32])
        torch.testing.assert_close(g_y.double(), w_y, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_module(backend):
    lp, ref = make_kl_inputs(3, 10)
    module = KLPenalty("k2", backend=backend)
    assert "'k2'" in repr(module)
    x = _leaf(lp)
    kl = module(x, ref)
    torch.testing.assert_close(kl.double(), 0.5 * (lp.double() - ref.double()) ** 2, **LOSS_TOL)
    kl.mean().backward()
    torch.testing.assert_close(x.grad, (lp - ref) / kl.numel(), **TOL[torch.float32])
    assert KLPenalty().kind == "k1"


# ----------------------------------------------------------------------------------------------
# Equality with the anchors: verl's compute_policy_loss / agg_loss / compute_value_loss and TRL's PPO
# trainer losses, written out below as those projects write them (not imported: neither is a dependency).
# ----------------------------------------------------------------------------------------------


def _verl_masked_mean(values, mask):
    # verl.utils.torch_functional.masked_mean: sum(values * mask) / (sum(mask) + 1e-8)
    return (values * mask).sum() / (mask.sum() + 1e-8)


def _verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        return _verl_masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return torch.sum(loss_mat * loss_mask, dim=-1).mean()  # token sum per row, mean over rows
    if loss_agg_mode == "seq-mean-token-mean":
        return (torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)).mean()
    raise ValueError(loss_agg_mode)


def _verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange, cliprange_low,
                              cliprange_high, clip_ratio_c, loss_agg_mode):
    """verl's vanilla PPO policy loss: the log-ratio clamped to +-20 before exp; the PPO max of the plain and
    clipped surrogate; the dual clip (min with -A * clip_ratio_c) applied where A < 0; agg_loss over the mask."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = _verl_masked_mean(-negative_approx_kl, response_mask)
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = _verl_masked_mean(torch.gt(pg_losses2, pg_losses1).double(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = _verl_masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).double(),
                                          response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = _verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def _verl_compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode):
    vpredclipped = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    clipped_vf_losses = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _verl_agg_loss(clipped_vf_losses, response_mask, loss_agg_mode)
    vf_clipfrac = _verl_masked_mean(torch.gt(vf_losses2, vf_losses1).double(), response_mask)
    return vf_loss, vf_clipfrac


def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_ppo_losses(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, padding_mask,
                    padding_mask_p1, cliprange, cliprange_value):
    """TRL PPOTrainer's minibatch losses: no log-ratio clamp, one symmetric clip range, token mean over the
    non-padding positions (the value loss over one more position than the policy loss)."""
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * _trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = _trl_masked_mean((vf_losses2 > vf_losses1).double(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = _trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = _trl_masked_mean((pg_losses2 > pg_losses).double(), ~padding_mask)
    return pg_loss, pg_clipfrac, vf_loss, vf_clipfrac


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_policy_equals_verl(backend, agg):
    # verl has no empty-row exclusion (0/0 for seq-mean-token-mean), so every row has a valid token here.
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64 and backend == "triton":
            continue
        lp, old, adv, mask = make_policy_inputs(6, 33, "right_pad", dtype, clip_eps_high=EPS_HIGH, empty_row=False)
        # verl's epsilon in masked_mean moves its result by ~1e-8 relative: the float64 tolerance allows that.
        tol = dict(atol=1e-9, rtol=1e-7) if dtype == torch.float64 else LOSS_TOL
        for dual_clip in (None, DUAL):
            x = _leaf(lp)
            out = ppo_policy_loss(x, old, adv, mask, clip_eps=EPS, clip_eps_high=EPS_HIGH, dual_clip=dual_clip,
                                  agg=agg, backend=backend)
            x64 = _leaf(lp.double())
            # verl always applies the dual clip; an enormous clip_ratio_c is "no dual clip".
            pg_loss, pg_clipfrac, _, pg_clipfrac_lower = _verl_compute_policy_loss(
                old.double(), x64, adv.double(), mask.double(), EPS, None, EPS_HIGH,
                1e12 if dual_clip is None else dual_clip, agg,
            )
            torch.testing.assert_close(out.loss.double(), pg_loss, **tol)
            torch.testing.assert_close(out.clipfrac.double(), pg_clipfrac, **METRIC_TOL)
            torch.testing.assert_close(out.clipfrac_lower.double(), pg_clipfrac_lower, **METRIC_TOL)
            assert 0 < pg_clipfrac < 1 and (dual_clip is None) == (pg_clipfrac_lower == 0)
            (g,) = torch.autograd.grad(out.loss, x)
            (want,) = torch.autograd.grad(pg_loss, x64)
            torch.testing.assert_close(g.double(), want, **(tol if dtype == torch.float64 else TOL[dtype]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_value_equals_verl(backend, agg):
    v, old, ret, mask = make_value_inputs(6, 33, "left_pad", empty_row=False)
    x = _leaf(v)
    out = value_loss(x, old, ret, mask, clip=CLIP, agg=agg, backend=backend)
    x64 = _leaf(v.double())
    vf_loss, vf_clipfrac = _verl_compute_value_loss(x64, ret.double(), old.double(), mask.double(), CLIP, agg)
    torch.testing.assert_close(out.loss.double(), vf_loss, **LOSS_TOL)
    torch.testing.assert_close(out.clipfrac.double(), vf_clipfrac, **METRIC_TOL)
    (g,) = torch.autograd.grad(out.loss, x)
    (want,) = torch.autograd.grad(vf_loss, x64)
    torch.testing.assert_close(g.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_equal_trl(backend):
    B, T = 6, 29
    INVALID_LOGPROB = 1.0  # what TRL writes into padded log-prob positions
    # TRL: the response ends at sequence_lengths[b]; padding_mask is everything after it, and the value
    # loss also covers the first padding position (padding_mask_p1).
    sequence_lengths = torch.randint(0, T - 1, (B,), device=DEVICE)
    idx = torch.arange(T, device=DEVICE)[None, :]
    padding_mask = idx > sequence_lengths[:, None]
    padding_mask_p1 = idx > (sequence_lengths + 1)[:, None]
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64 and backend == "triton":
            continue
        tol = TOL[torch.float64] if dtype == torch.float64 else LOSS_TOL
        lp, old, adv, _ = make_policy_inputs(B, T, dtype=dtype, mask=~padding_mask)
        v, old_v, ret, _ = make_value_inputs(B, T, dtype=dtype, mask=~padding_mask_p1)
        lp = lp.masked_fill(padding_mask, INVALID_LOGPROB)
        v = v.masked_fill(padding_mask_p1, 0)
        x, y = _leaf(lp), _leaf(v)
        pol = ppo_policy_loss(x, old, adv, ~padding_mask, clip_eps=EPS, backend=backend)
        val = value_loss(y, old_v, ret, ~padding_mask_p1, clip=CLIP, backend=backend)
        x64, y64 = _leaf(lp.double()), _leaf(v.double())
        pg_loss, pg_clipfrac, vf_loss, vf_clipfrac = _trl_ppo_losses(
            x64, old.double(), adv.double(), y64, old_v.double(), ret.double(), padding_mask, padding_mask_p1, EPS, CLIP
        )
        assert 0 < pg_clipfrac < 1 and 0 < vf_clipfrac < 1
        torch.testing.assert_close(pol.loss.double(), pg_loss, **tol)
        torch.testing.assert_close(val.loss.double(), vf_loss, **tol)
        torch.testing.assert_close(pol.clipfrac.double(), pg_clipfrac, **METRIC_TOL)
        torch.testing.assert_close(val.clipfrac.double(), vf_clipfrac, **METRIC_TOL)
        # TRL's total loss pg_loss + vf_coef * vf_loss, gradients w.r.t. the log-probs and the value predictions.
        vf_coef = 0.1
        g_x, g_y = torch.autograd.grad(pol.loss + vf_coef * val.loss, [x, y])
        w_x, w_y = torch.autograd.grad(pg_loss + vf_coef * vf_loss, [x64, y64])
        gtol = TOL[torch.float64] if dtype == torch.float64 else TOL[torch.float32]
        torch.testing.assert_close(g_x.double(), w_x, **gtol)
        torch.testing.assert_close(g_y.double(), w_y, **gtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_equals_verl_kl_penalty(backend):
    # verl's kl_penalty names: "kl" -> k1, "abs", "mse" -> k2, "low_var_kl" -> k3.
    lp, ref = make_kl_inputs(4, 33)
    verl = {
        "k1": lambda a, b: a - b,
        "abs": lambda a, b: (a - b).abs(),
        "k2": lambda a, b: 0.5 * (a - b).square(),
        "k3": lambda a, b: torch.clamp(torch.exp(torch.clamp(b - a, -20, 20)) - torch.clamp(b - a, -20, 20) - 1, -10, 10),
    }
    for kind, formula in verl.items():
        x, y = _leaf(lp), _leaf(ref)
        kl = kl_penalty(x, y, kind, backend=backend)
        x64, y64 = _leaf(lp.double()), _leaf(ref.double())
        want = formula(x64, y64)
        torch.testing.assert_close(kl.double(), want, **LOSS_TOL)
        w = torch.randn_like(want)
        got = torch.autograd.grad((kl * w).sum(), [x, y])
        expected = torch.autograd.grad((want * w).sum(), [x64, y64])
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.double(), e, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

_B, _T = 3, 4
_X = torch.randn(_B, _T)
_M = torch.ones(_B, _T, dtype=torch.bool)
_NAN = torch.tensor([[0.1, float("nan"), 0.2, 0.3]] * _B)
_INF_MASKED = torch.tensor([[0.1, 0.2, 0.3, float("inf")]] * _B)
_MASK_LAST_OFF = torch.tensor([[1, 1, 1, 0]] * _B, dtype=torch.bool)

_COMMON_BAD = [
    # (which tensor argument to replace, replacement, exception, match)
    (0, [[1.0] * _T] * _B, TypeError, "{0} must be a torch.Tensor"),
    (1, None, TypeError, "{1} must be a torch.Tensor"),
    (0, _X.long(), TypeError, "{0} must have dtype"),
    (1, _X.half(), TypeError, "{1} must have the same dtype as {0}"),
    (2, _X[0], ValueError, "{2} must be 2-D"),
    (0, _X[None], ValueError, "{0} must be 2-D"),
    (1, torch.randn(_B, _T + 1), ValueError, "{1} must have the same shape"),
    (2, torch.randn(_B, 1), ValueError, "{2} must have the same shape"),  # broadcastable, still refused
    (2, _X.t(), ValueError, "{2} must have the same shape"),
    (1, torch.randn(_B, _T, device="meta"), ValueError, "{1} is on meta"),
    (2, _NAN, ValueError, "{2} contains NaN or inf at a position where mask is 1"),
    (1, _NAN, ValueError, "{1} contains NaN or inf"),
]
_MASK_BAD = [
    ("x", TypeError, "mask must be a torch.Tensor"),
    (torch.ones(_B, _T, dtype=torch.complex64), TypeError, "mask must have dtype"),
    (torch.ones(_B, 1, dtype=torch.bool), ValueError, "mask must have the same shape"),
    (torch.ones(_T, dtype=torch.bool), ValueError, "mask must be 2-D"),
    (torch.full((_B, _T), 2.0), ValueError, "mask must contain only 0 and 1"),
    (torch.zeros(_B, _T, dtype=torch.bool), ValueError, "mask has no valid position"),
    (torch.ones(_B, _T, dtype=torch.bool, device="meta"), ValueError, "mask is on meta"),
]


@pytest.mark.parametrize("which, bad, exc, match", _COMMON_BAD)
@pytest.mark.parametrize("op", ["policy", "value"])
def test_bad_tensor_args(op, which, bad, exc, match):
    names = ["logprobs", "old_logprobs", "advantages"] if op == "policy" else ["values", "old_values", "returns"]
    fn = ppo_policy_loss if op == "policy" else value_loss
    args = [_X, _X.clone(), _X.clone(), _M]
    args[which] = bad
    with pytest.raises(exc, match=match.format(*names)):
        fn(*args)


@pytest.mark.parametrize("bad, exc, match", _MASK_BAD)
@pytest.mark.parametrize("op", ["policy", "value"])
def test_bad_mask(op, bad, exc, match):
    fn = ppo_policy_loss if op == "policy" else value_loss
    with pytest.raises(exc, match=match):
        fn(_X, _X.clone(), _X.clone(), bad)


@pytest.mark.parametrize("op", ["policy", "value"])
def test_empty_and_masked_garbage(op):
    fn = ppo_policy_loss if op == "policy" else value_loss
    first = "logprobs" if op == "policy" else "values"
    with pytest.raises(ValueError, match=f"{first} is empty"):
        fn(torch.randn(0, _T), torch.randn(0, _T), torch.randn(0, _T), torch.ones(0, _T, dtype=torch.bool))
    # inf only where the mask is 0: accepted, and the result is finite.
    out = fn(_INF_MASKED, _X.clone(), _INF_MASKED.clone(), _MASK_LAST_OFF)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(clip_eps=-0.1), ValueError, "clip_eps must lie in \\[0, 1\\)"),
        (dict(clip_eps=1.0), ValueError, "clip_eps must lie in \\[0, 1\\)"),
        (dict(clip_eps=float("nan")), ValueError, "clip_eps must be finite"),
        (dict(clip_eps="0.2"), TypeError, "clip_eps must be a real number"),
        (dict(clip_eps=None), TypeError, "clip_eps must be a real number"),
        (dict(clip_eps_high=-0.01), ValueError, "clip_eps_high must be >= 0"),
        (dict(clip_eps_high=float("inf")), ValueError, "clip_eps_high must be finite"),
        (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1"),
        (dict(dual_clip=0.5), ValueError, "dual_clip must be > 1"),
        (dict(dual_clip=True), TypeError, "dual_clip must be None or a real number"),
        (dict(agg="mean"), ValueError, "agg must be one of"),
        (dict(agg="token-sum"), ValueError, "agg must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_policy_bad_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ppo_policy_loss(_X, _X.clone(), _X.clone(), _M, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(exc, match=match):
            PPOPolicyLoss(**kwargs)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(clip=-0.1), ValueError, "clip must be >= 0"),
        (dict(clip=float("inf")), ValueError, "clip must be finite"),
        (dict(clip="0.2"), TypeError, "clip must be None or a real number"),
        (dict(agg="sum"), ValueError, "agg must be one of"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_value_bad_params(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        value_loss(_X, _X.clone(), _X.clone(), _M, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(exc, match=match):
            ValueLoss(**kwargs)


@pytest.mark.parametrize(
    "logprobs, ref, kwargs, exc, match",
    [
        ("x", _X, {}, TypeError, "logprobs must be a torch.Tensor"),
        (_X, None, {}, TypeError, "ref_logprobs must be a torch.Tensor"),
        (_X.int(), _X, {}, TypeError, "logprobs must have dtype"),
        (_X, _X.bfloat16(), {}, TypeError, "ref_logprobs must have the same dtype as logprobs"),
        (_X[0], _X[0], {}, ValueError, "logprobs must be 2-D"),
        (_X, _X[:, :2], {}, ValueError, "ref_logprobs must have the same shape"),
        (_X, _X[:1], {}, ValueError, "ref_logprobs must have the same shape"),
        (torch.randn(_B, 0), torch.randn(_B, 0), {}, ValueError, "logprobs is empty"),
        (_X, _X.to("meta"), {}, ValueError, "ref_logprobs is on meta"),
        (_X, _NAN, {}, ValueError, "ref_logprobs contains NaN or inf"),
        (_INF_MASKED, _X, {}, ValueError, "logprobs contains NaN or inf"),
        (_X, _X, dict(kind="low_var_kl"), ValueError, "kind must be one of"),
        (_X, _X, dict(kind="k4"), ValueError, "kind must be one of"),
        (_X, _X, dict(backend="fast"), ValueError, "backend must be one of"),
    ],
)
def test_kl_bad_input(logprobs, ref, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kl_penalty(logprobs, ref, **kwargs)


def test_kl_module_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        KLPenalty("mse")


def test_value_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")
    out = ppo_policy_loss(_NAN, _X, _X, _M, backend="torch")  # no device sync, no error
    assert torch.isnan(out.loss)
    assert torch.isnan(kl_penalty(_NAN, _X, backend="torch")).any()


@pytest.mark.skipif(not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels.INTERPRET), reason="needs triton")
def test_triton_rejects_float64():
    x = torch.randn(2, 3, device=DEVICE, dtype=torch.float64)
    m = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(TypeError, match="needs logprobs of dtype .*got torch.float64"):
        ppo_policy_loss(x, x, x, m, backend="triton")
    with pytest.raises(TypeError, match="needs values of dtype .*got torch.float64"):
        value_loss(x, x, x, m, backend="triton")
    with pytest.raises(TypeError, match="needs logprobs of dtype .*got torch.float64"):
        kl_penalty(x, x, backend="triton")


# ----------------------------------------------------------------------------------------------
# Compiled kernels (CUDA only): sizes too slow for the interpreter, default block sizes
# ----------------------------------------------------------------------------------------------


@requires_cuda
def test_device_mismatch_cuda():
    x = torch.randn(2, 3, device="cuda")
    m = torch.ones(2, 3, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match="old_logprobs is on cpu"):
        ppo_policy_loss(x, x.cpu(), x, m)
    with pytest.raises(ValueError, match="mask is on cpu"):
        value_loss(x, x, x, m.cpu())
    with pytest.raises(ValueError, match="ref_logprobs is on cpu"):
        kl_penalty(x, x.cpu())


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_policy_and_value_large(dtype):
    # T = 4099 crosses the default 1024-wide chunks with a partial last one; 64 rows, some empty.
    B, T = 64, 4099
    lp, old, adv, mask = make_policy_inputs(B, T, "holes", dtype, clip_eps_high=EPS_HIGH, dual_clip=DUAL)
    v, old_v, ret, _ = make_value_inputs(B, T, "holes", dtype, mask=mask)
    for agg in AGGS:
        out, _ = check_policy("triton", lp, old, adv, mask, clip_eps_high=EPS_HIGH, dual_clip=DUAL, agg=agg)
        assert 0 < out.clipfrac < 1 and 0 < out.clipfrac_lower < 1
        check_value("triton", v, old_v, ret, mask, agg=agg)
        torch_out = ppo_policy_loss(lp, old, adv, mask, clip_eps_high=EPS_HIGH, dual_clip=DUAL, agg=agg, backend="torch")
        torch.testing.assert_close(out.loss, torch_out.loss, **LOSS_TOL)
    check_policy("triton", non_contiguous(lp), row_strided(old), adv[:, :1].expand(B, T), mask, dual_clip=DUAL)


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_kl_large(dtype):
    lp, ref = make_kl_inputs(33, 5000, dtype)
    for kind in KINDS:
        check_kl("triton", lp, ref, kind)
        check_kl("triton", non_contiguous(lp), row_strided(ref), kind)


@requires_cuda
def test_cuda_auto_uses_triton_and_matches_torch(monkeypatch):
    monkeypatch.delenv("FASTRM_BACKEND", raising=False)
    calls = []
    launch = ppo_kernels.ppo_policy_fwd
    monkeypatch.setattr(ppo_kernels, "ppo_policy_fwd", lambda *a, **k: calls.append(1) or launch(*a, **k))
    lp, old, adv, mask = make_policy_inputs(8, 513, "right_pad", dual_clip=DUAL)
    auto = ppo_policy_loss(lp, old, adv, mask, dual_clip=DUAL)
    assert calls == [1]
    torch_out = ppo_policy_loss(lp, old, adv, mask, dual_clip=DUAL, backend="torch")
    for a, b in zip(auto, torch_out):
        torch.testing.assert_close(a, b, **LOSS_TOL)
