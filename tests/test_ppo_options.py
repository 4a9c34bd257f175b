"""Options of the PPO ops that verl / TRL users reach for: GSPO's sequence-level ratio, the
seq-mean-token-sum-norm aggregation, and the straight-through k1+ / abs+ / k3+ KL estimators.

Both backends against float64 references written the way verl writes them (values, metrics, gradients),
across dtypes, mask layouts (padding, holes, an empty row), odd lengths and non-contiguous inputs.
"""

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, row_strided
from test_ppo import LAYOUTS, LOSS_TOL, METRIC_TOL, make_kl_inputs, make_mask, make_policy_inputs, make_value_inputs

from fastrm.kernels.ppo import kl_penalty_reference, ppo_policy_loss_reference, value_loss_reference
from fastrm.ops.ppo import PPOPolicyLoss, kl_penalty, ppo_policy_loss, value_loss

EPS, EPS_HIGH = 0.2, 0.28
GAP = 0.05  # every row's mean log-ratio keeps this distance from a clip boundary (rounding cannot flip a branch)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _clean64(x, mask):
    return torch.where(mask != 0, x.detach(), 0).double()


def make_sequence_inputs(B, T, layout="holes", dtype=torch.float32, *, dual_clip=None):
    """Per row a target mean log-ratio in one of the bands (inside the clip range, above, below, and past
    the dual clip), per-token log-ratios scattered around it with exactly that mean over the valid tokens,
    and per-token advantages of one sign per row (mixed magnitudes)."""
    mask = make_mask(B, T, layout)
    lo, hi = math.log(1 - EPS), math.log(1 + EPS_HIGH)
    dual = math.log(dual_clip or 3.0)
    bands = [(lo + GAP, hi - GAP), (hi + GAP, dual - GAP), (lo - 1.0, lo - GAP), (dual + GAP, dual + 0.7)]
    m = mask.double()
    counts = m.sum(1, keepdim=True).clamp_min(1)
    noise = 0.3 * torch.randn(B, T, device=DEVICE, dtype=torch.float64)
    noise = noise - (noise * m).sum(1, keepdim=True) / counts  # zero mean over each row's valid tokens
    targets = torch.empty(B, 1, device=DEVICE, dtype=torch.float64)
    signs = torch.empty(B, 1, device=DEVICE, dtype=torch.float64)
    for b in range(B):
        band = bands[b % len(bands)]
        targets[b] = band[0] + (band[1] - band[0]) * torch.rand((), dtype=torch.float64)
        signs[b] = 1.0 if (b // len(bands)) % 2 == 0 else -1.0
    logprobs = -(torch.rand(B, T, device=DEVICE, dtype=torch.float64) * 3 + 0.05)
    old = logprobs - (targets + noise)
    adv = signs * (torch.rand(B, T, device=DEVICE, dtype=torch.float64) * 1.9 + 0.1)
    return logprobs.to(dtype), old.to(dtype), adv.to(dtype), mask


def check_sequence_policy(backend, logprobs, old, adv, mask, *, agg="seq-mean-token-mean", dual_clip=None,
                          loss_scale_factor=None):
    x = _leaf(logprobs)
    out = ppo_policy_loss(x, old, adv, mask, clip_eps=EPS, clip_eps_high=EPS_HIGH, dual_clip=dual_clip, agg=agg,
                          ratio_level="sequence", loss_scale_factor=loss_scale_factor, backend=backend)
    x64 = _leaf(_clean64(logprobs, mask))
    ref = ppo_policy_loss_reference(x64, _clean64(old, mask), _clean64(adv, mask), mask, clip_eps=EPS,
                                    clip_eps_high=EPS_HIGH, dual_clip=dual_clip, agg=agg, ratio_level="sequence",
                                    loss_scale_factor=loss_scale_factor)
    torch.testing.assert_close(out.loss.double(), ref[0], **LOSS_TOL)
    for name, got, want in zip(("clipfrac", "approx_kl", "ratio_mean", "clipfrac_lower"), out[1:], ref[1:]):
        tol = METRIC_TOL if name.startswith("clipfrac") else LOSS_TOL
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=lambda msg: f"{name}: {msg}")
    out.loss.backward()
    ref[0].backward()
    assert x.grad.dtype == logprobs.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[logprobs.dtype])
    return out, x.grad


# ---------------------------------------------------------------------------------------------------------------
# GSPO: sequence-level importance ratio
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_sequence_ratio_matches_verl_gspo(backend, layout, agg):
    logprobs, old, adv, mask = make_sequence_inputs(9, 37, layout)
    out, grad = check_sequence_policy(backend, logprobs, old, adv, mask, agg=agg)
    assert 0 < out.clipfrac < 1  # both branches are hit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sequence_ratio_dtypes_and_dual_clip(backend, dtype):
    logprobs, old, adv, mask = make_sequence_inputs(8, 29, "right_pad", dtype, dual_clip=2.0)
    out, _ = check_sequence_policy(backend, logprobs, old, adv, mask, dual_clip=2.0)
    assert out.clipfrac_lower > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_ratio_long_rows_and_strides(backend, small_blocks):
    """Rows longer than one chunk (the kernel's first pass walks several), non-contiguous inputs."""
    logprobs, old, adv, mask = make_sequence_inputs(5, 300, "holes")
    check_sequence_policy(backend, non_contiguous(logprobs), row_strided(old), adv.t().contiguous().t(), mask)


@pytest.fixture
def small_blocks(monkeypatch):
    import fastrm.kernels

    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T", 16)
    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T_INTERPRET", 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_ratio_is_one_value_per_row(backend):
    """Every token of a row sees the same ratio; a row's gradient is -A_t * s_b / its weight; the log-ratio
    clamp at 10 (verl's) stops a row's gradient."""
    logprobs, old, adv, _ = make_sequence_inputs(4, 12, "full")
    mask = torch.ones(4, 12, dtype=torch.bool, device=DEVICE)
    old[2] = logprobs[2] - 11.0  # mean log-ratio 11 > 10: clamped, no gradient
    x = _leaf(logprobs)
    out = ppo_policy_loss(x, old, adv, mask, clip_eps=EPS, clip_eps_high=10.0 ** 6, ratio_level="sequence",
                          agg="seq-mean-token-sum", backend=backend)
    out.loss.backward()
    s = torch.exp((logprobs - old).double().mean(1, keepdim=True).clamp(max=10.0))
    want = -adv.double() * s / 4
    want[2] = 0.0
    unclipped = (s > 1 - EPS).expand_as(want) | (adv > 0)  # below 1 - eps with A < 0 is the clipped branch
    torch.testing.assert_close(x.grad.double()[unclipped], want[unclipped], **LOSS_TOL)


def test_sequence_ratio_equals_trl_gspo():
    """With one advantage per sequence (GRPO), verl's stop-gradient form equals TRL's
    importance_sampling_level="sequence" (whose ratio is a differentiable mean): same loss, same gradient."""
    B, T = 6, 10
    logprobs, old, _, mask = make_sequence_inputs(B, T, "right_pad", torch.float64)
    adv = torch.randn(B, 1, dtype=torch.float64, device=DEVICE).expand(B, T).contiguous()
    x = _leaf(logprobs)
    ours = ppo_policy_loss(x, old, adv, mask, clip_eps=EPS, clip_eps_high=EPS_HIGH, ratio_level="sequence",
                           agg="seq-mean-token-mean", backend="torch").loss
    ours.backward()
    # TRL 1.16 GRPOTrainer._compute_loss, loss_type="grpo", importance_sampling_level="sequence", beta=0.
    y = _leaf(logprobs)
    m = mask.double()
    log_w = (((y - old) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - EPS, 1 + EPS_HIGH)
    a = adv[:, :1]
    per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    keep = m.sum(-1) > 0  # fastrm leaves rows without valid tokens out of the mean over rows
    trl = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0))[keep].mean()
    trl.backward()
    torch.testing.assert_close(ours, trl, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, y.grad, **TOL[torch.float64])


def test_ratio_level_bad_value():
    logprobs, old, adv, mask = make_sequence_inputs(2, 3, "full")
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        ppo_policy_loss(logprobs, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        PPOPolicyLoss(ratio_level="tokens")


# ---------------------------------------------------------------------------------------------------------------
# seq-mean-token-sum-norm
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factor", [None, 64.0])
def test_seq_mean_token_sum_norm_policy_and_value(backend, factor):
    agg = "seq-mean-token-sum-norm"
    logprobs, old, adv, mask = make_policy_inputs(7, 23, "holes")
    x = _leaf(logprobs)
    out = ppo_policy_loss(x, old, adv, mask, clip_eps=EPS, agg=agg, loss_scale_factor=factor, backend=backend)
    x64 = _leaf(_clean64(logprobs, mask))
    ref = ppo_policy_loss_reference(x64, _clean64(old, mask), _clean64(adv, mask), mask, clip_eps=EPS, agg=agg,
                                    loss_scale_factor=factor)
    torch.testing.assert_close(out.loss.double(), ref[0], **LOSS_TOL)
    out.loss.backward()
    ref[0].backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **LOSS_TOL)
    # = seq-mean-token-sum / factor (T by default)
    plain = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=EPS, agg="seq-mean-token-sum", backend=backend).loss
    torch.testing.assert_close(out.loss, plain / (factor or 23), **LOSS_TOL)

    values, old_values, returns, mask = make_value_inputs(6, 19, "right_pad")
    v = _leaf(values)
    vl = value_loss(v, old_values, returns, mask, clip=0.2, agg=agg, loss_scale_factor=factor, backend=backend)
    v64 = _leaf(_clean64(values, mask))
    want, _ = value_loss_reference(v64, _clean64(old_values, mask), _clean64(returns, mask), mask, clip=0.2,
                                   agg=agg, loss_scale_factor=factor)
    torch.testing.assert_close(vl.loss.double(), want, **LOSS_TOL)
    vl.loss.backward()
    want.backward()
    torch.testing.assert_close(v.grad.double(), v64.grad, **LOSS_TOL)


def test_loss_scale_factor_errors():
    logprobs, old, adv, mask = make_policy_inputs(3, 4, "full")
    with pytest.raises(ValueError, match="loss_scale_factor only applies to agg='seq-mean-token-sum-norm'"):
        ppo_policy_loss(logprobs, old, adv, mask, loss_scale_factor=4.0)
    for bad, exc in ((0.0, ValueError), (-2.0, ValueError), (float("nan"), ValueError), ("4", TypeError)):
        with pytest.raises(exc, match="loss_scale_factor"):
            ppo_policy_loss(logprobs, old, adv, mask, agg="seq-mean-token-sum-norm", loss_scale_factor=bad)


# ---------------------------------------------------------------------------------------------------------------
# straight-through KL estimators
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["k1+", "abs+", "k3+"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_straight_through_kl(backend, kind, dtype):
    lp, ref = make_kl_inputs(5, 37, dtype)
    lp, ref = non_contiguous(lp), row_strided(ref)
    x, y = _leaf(lp), _leaf(ref)
    kl = kl_penalty(x, y, kind, backend=backend)
    base = kl_penalty(lp, ref, kind[:-1], backend=backend)
    assert torch.equal(kl.detach(), base)  # the value is the base estimator's, bit for bit
    w = torch.randn_like(kl)
    g_x, g_y = torch.autograd.grad((kl * w).sum(), [x, y])
    x64, y64 = _leaf(lp.double()), _leaf(ref.double())
    want = kl_penalty_reference(x64, y64, kind)
    w_x, w_y = torch.autograd.grad((want * w.double()).sum(), [x64, y64])
    torch.testing.assert_close(kl.double(), want, **LOSS_TOL)
    torch.testing.assert_close(g_x.double(), w_x, **TOL[dtype])
    torch.testing.assert_close(g_y.double(), w_y, **TOL[dtype])
    # the gradient is k2's: d = logprobs - ref_logprobs, unclamped
    d = (lp.double() - ref.double()) * w.double()
    torch.testing.assert_close(g_x.double(), d, **TOL[dtype])
