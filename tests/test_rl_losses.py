"""The policy-gradient losses and estimators the field uses now (issue #23): CISPO's clipped stop-gradient weight,
REINFORCE++ (and -baseline) advantages, DAPO's overlong shaping and group filter, rollout-mismatch correction
(TIS / ICEPOP) and TRL's loss_type names in the RL trainer.

Each against a float64 reference written here from the published formula (and TRL 1.16's trainer math where
TRL spells it out), on random non-zero inputs, masks with padding, holes and an empty row, odd shapes,
non-contiguous inputs and fp32 / bf16 / fp16 inputs, gradients too.
"""

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, row_strided
from test_ppo import LAYOUTS, LOSS_TOL, METRIC_TOL, make_mask

from fastrm.kernels.ppo import ppo_policy_loss_reference
from fastrm.ops.ppo import PPOPolicyLoss, ppo_policy_loss

EPS_HIGH = 0.28
GAP = 0.05  # log-ratios keep this distance from the bound log(1 + EPS_HIGH): rounding cannot flip a branch


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def _clean64(x, mask):
    return torch.where(mask != 0, x.detach(), 0).double()


def make_cispo_inputs(B, T, layout="holes", dtype=torch.float32, eps_high=EPS_HIGH):
    """Log-ratios half below the bound, half above it (each GAP away), advantages of both signs, none near 0."""
    mask = make_mask(B, T, layout)
    bound = math.log(1 + eps_high)
    below = bound - GAP - torch.rand(B, T, dtype=torch.float64, device=DEVICE) * 1.2
    above = bound + GAP + torch.rand(B, T, dtype=torch.float64, device=DEVICE) * 1.2
    log_ratio = torch.where(torch.rand(B, T, device=DEVICE) < 0.5, below, above)
    logprobs = -(torch.rand(B, T, dtype=torch.float64, device=DEVICE) * 3 + 0.05)
    sign = torch.where(torch.rand(B, T, device=DEVICE) < 0.5, -1.0, 1.0).double()
    adv = sign * (torch.rand(B, T, dtype=torch.float64, device=DEVICE) * 1.9 + 0.1)
    return logprobs.to(dtype), (logprobs - log_ratio).to(dtype), adv.to(dtype), mask


def cispo_float64(logprobs, old, adv, mask, eps_high, agg="token-mean", factor=None):
    """The published formula in float64: loss_t = -sg(min(ratio, 1 + eps_high)) * A_t * logprobs_t."""
    m = mask.double()
    ratio = torch.exp(logprobs - old)
    w = torch.clamp(ratio, max=1 + eps_high).detach()
    per_token = -w * adv * logprobs * m
    if agg == "token-mean":
        return per_token.sum() / m.sum()
    keep = m.sum(-1) > 0
    rows = per_token.sum(-1)[keep]
    if agg == "seq-mean-token-mean":
        return (rows / m.sum(-1)[keep]).mean()
    if agg == "seq-mean-token-sum":
        return rows.mean()
    return rows.mean() / (mask.shape[1] if factor is None else factor)


def check_cispo(backend, logprobs, old, adv, mask, agg="token-mean", eps_high=EPS_HIGH, factor=None):
    x = _leaf(logprobs)
    out = ppo_policy_loss(x, old, adv, mask, clip_eps_high=eps_high, policy_loss="cispo", agg=agg,
                          loss_scale_factor=factor, backend=backend)
    x64 = _leaf(_clean64(logprobs, mask))
    want = cispo_float64(x64, _clean64(old, mask), _clean64(adv, mask), mask, eps_high, agg, factor)
    torch.testing.assert_close(out.loss.double(), want.detach(), **LOSS_TOL)
    ref = ppo_policy_loss_reference(x64.detach(), _clean64(old, mask), _clean64(adv, mask), mask,
                                    clip_eps_high=eps_high, agg=agg, loss_scale_factor=factor, policy_loss="cispo")
    torch.testing.assert_close(out.loss.double(), ref[0], **LOSS_TOL)
    for name, got, exp in zip(("clipfrac", "approx_kl", "ratio_mean", "clipfrac_lower"), out[1:], ref[1:]):
        tol = METRIC_TOL if name.startswith("clipfrac") else LOSS_TOL
        torch.testing.assert_close(got.double(), exp.double(), **tol, msg=lambda msg: f"{name}: {msg}")
    out.loss.backward()
    want.backward()
    assert x.grad.dtype == logprobs.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[logprobs.dtype])
    return out, x.grad


# ---------------------------------------------------------------------------------------------------------------
# CISPO
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_cispo_matches_float64(backend, layout, agg):
    logprobs, old, adv, mask = make_cispo_inputs(7, 33, layout)
    out, grad = check_cispo(backend, logprobs, old, adv, mask, agg, factor=50.0 if agg.endswith("norm") else None)
    assert 0 < out.clipfrac < 1  # weights truncated and not
    assert (grad[mask] != 0).all()  # CISPO keeps every valid token's gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cispo_dtypes_strides_and_long_rows(backend, dtype):
    logprobs, old, adv, mask = make_cispo_inputs(5, 301, "holes", dtype)
    check_cispo(backend, non_contiguous(logprobs), row_strided(old), adv.t().contiguous().t(), mask,
                "seq-mean-token-mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cispo_sequence_ratio(backend):
    """ratio_level="sequence": the weight is min(row's ratio, bound), the row's mean log-ratio over valid tokens."""
    logprobs, old, adv, mask = make_cispo_inputs(6, 17, "right_pad")
    x = _leaf(logprobs)
    out = ppo_policy_loss(x, old, adv, mask, clip_eps_high=EPS_HIGH, policy_loss="cispo", ratio_level="sequence",
                          agg="token-mean", backend=backend)
    out.loss.backward()
    m = mask.double()
    lr = ((logprobs - old).double() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
    w = torch.exp(lr).clamp(max=1 + EPS_HIGH)
    want_grad = -w * adv.double() * m / m.sum()
    torch.testing.assert_close(x.grad.double(), want_grad, **LOSS_TOL)
    torch.testing.assert_close(out.loss.double(), (want_grad * logprobs.double()).sum(), **LOSS_TOL)


def test_cispo_equals_trl_grpo_trainer_math():
    """TRL 1.16 GRPOTrainer._compute_loss, loss_type="cispo" (beta=0, one process, no accumulation): its
    ``epsilon_high`` is the bound itself, so epsilon_high = 1 + clip_eps_high; aggregated over the batch's tokens."""
    B, T = 6, 13
    logprobs, old, adv, mask = make_cispo_inputs(B, T, "right_pad", torch.float64, eps_high=4.0)
    x = _leaf(logprobs)
    ours = ppo_policy_loss(x, old, adv, mask, clip_eps_high=4.0, policy_loss="cispo", backend="torch").loss
    ours.backward()
    y = _leaf(logprobs)
    m = mask.double()
    epsilon_high = 5.0
    coef_1 = torch.exp(y - old)
    clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
    per_token_loss = -clamped_ratios * adv * y
    trl = (per_token_loss * m).sum() / m.sum().clamp(min=1.0)  # num_items_in_batch: the valid tokens
    trl.backward()
    torch.testing.assert_close(ours, trl, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, y.grad, **TOL[torch.float64])


def test_cispo_option_errors():
    logprobs, old, adv, mask = make_cispo_inputs(2, 3, "full")
    with pytest.raises(ValueError, match="policy_loss must be one of"):
        ppo_policy_loss(logprobs, old, adv, mask, policy_loss="cispo2")
    with pytest.raises(ValueError, match="dual_clip applies to policy_loss='ppo' only"):
        ppo_policy_loss(logprobs, old, adv, mask, policy_loss="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="dual_clip applies"):
        PPOPolicyLoss(policy_loss="cispo", dual_clip=3.0)
    module = PPOPolicyLoss(clip_eps_high=EPS_HIGH, policy_loss="cispo", backend="torch")
    assert "policy_loss='cispo'" in repr(module)
    torch.testing.assert_close(module(logprobs, old, adv, mask).loss,
                               ppo_policy_loss(logprobs, old, adv, mask, clip_eps_high=EPS_HIGH,
                                               policy_loss="cispo", backend="torch").loss)
