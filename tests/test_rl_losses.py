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


# ---------------------------------------------------------------------------------------------------------------
# SAPO
# ---------------------------------------------------------------------------------------------------------------

TAUS = (1.0, 1.05)


def sapo_float64(logprobs, old, adv, mask, taus=TAUS, agg="seq-mean-token-mean"):
    """The SAPO paper's objective, as TRL 1.16 and verl write it, in float64 (autograd gives its gradient)."""
    m = mask.double()
    ratio = torch.exp(logprobs - old)
    tau = torch.where(adv > 0, taus[0], taus[1]).double()
    per_token = -adv * torch.sigmoid(tau * (ratio - 1)) * 4 / tau * m
    keep = m.sum(-1) > 0
    if agg == "token-mean":
        return per_token.sum() / m.sum()
    return (per_token.sum(-1)[keep] / m.sum(-1)[keep]).mean()


def check_sapo(backend, logprobs, old, adv, mask, agg="seq-mean-token-mean", taus=TAUS):
    x = _leaf(logprobs)
    kwargs = {} if taus == TAUS else {"sapo_tau_pos": taus[0], "sapo_tau_neg": taus[1]}
    out = ppo_policy_loss(x, old, adv, mask, policy_loss="sapo", agg=agg, backend=backend, **kwargs)
    x64 = _leaf(_clean64(logprobs, mask))
    want = sapo_float64(x64, _clean64(old, mask), _clean64(adv, mask), mask, taus, agg)
    torch.testing.assert_close(out.loss.double(), want.detach(), **LOSS_TOL)
    ref = ppo_policy_loss_reference(x64.detach(), _clean64(old, mask), _clean64(adv, mask), mask, agg=agg,
                                    policy_loss="sapo", sapo_taus=taus)
    for got, exp in zip(out, ref):
        torch.testing.assert_close(got.double(), exp.double(), **LOSS_TOL)
    assert out.clipfrac == 0 and out.clipfrac_lower == 0
    out.loss.backward()
    want.backward()
    assert x.grad.dtype == logprobs.dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[logprobs.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_sapo_matches_float64(backend, layout, agg):
    check_sapo(backend, *make_cispo_inputs(7, 33, layout), agg=agg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sapo_dtypes_strides_temperatures(backend, dtype):
    logprobs, old, adv, mask = make_cispo_inputs(5, 301, "holes", dtype)
    check_sapo(backend, non_contiguous(logprobs), row_strided(old), adv.t().contiguous().t(), mask, taus=(0.5, 2.0))


def test_sapo_equals_trl_grpo_trainer_math():
    """TRL 1.16 GRPOTrainer._compute_loss, loss_type="sapo" (beta=0): soft_coef_1 = sigmoid(tau (coef_1 - 1)) * 4 /
    tau, per_token_loss = -soft_coef_1 * A, aggregated as grpo (each completion's token mean, then the mean)."""
    logprobs, old, adv, mask = make_cispo_inputs(6, 13, "right_pad", torch.float64)
    mask[:, 0] = True  # TRL counts every completion (none is empty here)
    x = _leaf(logprobs)
    ours = ppo_policy_loss(x, old, adv, mask, policy_loss="sapo", agg="seq-mean-token-mean", backend="torch").loss
    ours.backward()
    y = _leaf(logprobs)
    m = mask.double()
    coef_1 = torch.exp(y - old)
    temperatures = torch.where(adv > 0, 1.0, 1.05).double()
    soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
    per_token_loss = -soft_coef_1 * adv
    trl = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    trl.backward()
    torch.testing.assert_close(ours, trl, **TOL[torch.float64])
    torch.testing.assert_close(x.grad, y.grad, **TOL[torch.float64])


def test_sapo_option_errors():
    logprobs, old, adv, mask = make_cispo_inputs(2, 3, "full")
    with pytest.raises(ValueError, match="sapo_tau_pos applies to policy_loss='sapo' only"):
        ppo_policy_loss(logprobs, old, adv, mask, sapo_tau_pos=1.0)
    with pytest.raises(ValueError, match="sapo_tau_neg must be > 0"):
        ppo_policy_loss(logprobs, old, adv, mask, policy_loss="sapo", sapo_tau_neg=0.0)
    with pytest.raises(ValueError, match="dual_clip applies to policy_loss='ppo' only"):
        PPOPolicyLoss(policy_loss="sapo", dual_clip=3.0)


# ---------------------------------------------------------------------------------------------------------------
# REINFORCE++ and REINFORCE++-baseline
# ---------------------------------------------------------------------------------------------------------------

from fastrm import advantages as fadv  # noqa: E402
from fastrm import dapo  # noqa: E402
from fastrm.rollout_correction import correction_weights  # noqa: E402


def _rf_mask(B, T):
    """Right-padded completion masks of random lengths (>= 1), one row full."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    return (torch.arange(T)[None, :] < lengths[:, None]).long()


def reinforce_pp_float64(scores, mask, kl, kl_coef, gamma, n=None):
    """OpenRLHF's REINFORCE++ (n given: -baseline, the group mean subtracted from the score first), in float64:
    token rewards -kl_coef * kl_t plus the score on the last valid token, the discounted return-to-go
    G_t = r_t + gamma * G_{t+1} over valid tokens, then (G - mean) / sqrt(var + 1e-8) over all valid tokens
    (unbiased variance)."""
    s = scores.double()
    if n is not None:
        g = s.view(-1, n)
        s = (g - g.mean(1, keepdim=True)).reshape(-1)
    m = mask.double()
    rewards = -kl_coef * kl.double() * m
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask != 0)
    rewards = rewards + torch.where(last, s[:, None], 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float64)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * m[:, t]  # verl: reset after EOS (masked tail rows contribute nothing)
    valid = mask != 0
    mean = returns[valid].mean()
    var = returns[valid].var(unbiased=True)
    return torch.where(valid, (returns - mean) / torch.sqrt(var + 1e-8), 0.0)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_float64(estimator, gamma):
    n, B, T = 3, 12, 9
    mask = _rf_mask(B, T)
    scores = torch.randn(B) * 2 + 0.5
    kl = torch.randn(B, T) * 0.1
    adv, returns = fadv.compute_advantages(estimator, scores, mask, n=n, kl=kl, kl_coef=0.2, gamma=gamma)
    want = reinforce_pp_float64(scores, mask, kl, 0.2, gamma, n if estimator.endswith("baseline") else None)
    assert returns is None
    torch.testing.assert_close(adv.double(), want, atol=1e-5, rtol=1e-5)  # float32 scan over T <= 9 tokens


def test_reinforce_pp_baseline_equals_verl_without_kl_in_reward():
    """verl's compute_reinforce_plus_plus_baseline_outcome_advantage (score - group mean, tiled over the
    completion, masked_whiten) equals ours when no KL is in the rewards and gamma = 1."""
    n, B, T = 4, 8, 7
    mask = _rf_mask(B, T)
    scores = torch.randn(B)
    ours, _ = fadv.compute_advantages("reinforce_pp_baseline", scores, mask, n=n)
    s = scores.double().view(-1, n)
    s = (s - s.mean(1, keepdim=True)).reshape(-1)
    tiled = s[:, None].expand(B, T) * mask
    valid = mask != 0
    mean, var = tiled[valid].mean(), tiled[valid].var(unbiased=True)
    verl = (tiled - mean) * torch.rsqrt(var + 1e-8) * mask
    torch.testing.assert_close(ours.double(), verl, atol=1e-5, rtol=1e-5)


def test_reinforce_pp_baseline_needs_groups():
    with pytest.raises(ValueError, match="n >= 2"):
        fadv.compute_advantages("reinforce_pp_baseline", torch.randn(4), torch.ones(4, 3), n=1)
    with pytest.raises(ValueError, match="multiple of n=3"):
        fadv.compute_advantages("reinforce_pp_baseline", torch.randn(4), torch.ones(4, 3), n=3)


def test_rl_is_an_alias_of_advantages():
    from fastrm import rl

    assert rl is fadv and rl.grpo_scores is fadv.grpo_scores


# ---------------------------------------------------------------------------------------------------------------
# DAPO: overlong shaping, the group filter, dynamic sampling
# ---------------------------------------------------------------------------------------------------------------


def test_overlong_penalty_matches_the_paper():
    """R = 0 for L <= L_max - L_cache, ((L_max - L_cache) - L) / L_cache inside the buffer (-1 at L_max)."""
    L_max, cache, factor = 20, 6, 0.5
    lengths = torch.arange(0, L_max + 1)
    got = dapo.overlong_penalty(lengths, L_max, cache, factor)
    want = [0.0 if L <= L_max - cache else ((L_max - cache) - L) / cache * factor for L in range(L_max + 1)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=0)
    assert got[-1] == -factor
    with pytest.raises(ValueError, match="buffer_len must lie in"):
        dapo.overlong_penalty(lengths, L_max, L_max + 1)
    with pytest.raises(ValueError, match="penalty_factor must be >= 0"):
        dapo.overlong_penalty(lengths, L_max, 3, -1.0)


def test_informative_groups():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.5, 2.5, 2.5])
    assert dapo.informative_groups(scores, 3).tolist() == [False, True, False]


def _fake_sampler(pattern, n, P=2, C=3):
    """sample(rows) giving draw k's groups the informative flags pattern[k]; rows are ints (the prompt ids)."""
    calls = []

    def sample(rows):
        k = len(calls)
        calls.append(rows)
        flags = pattern[k]
        scores = torch.tensor([float(j) if ok else 1.0 for ok in flags for j in range(n)])
        B = len(rows) * n
        c_len = C + k  # each draw's completions one token longer: re-padding is exercised
        gen = {"prompt_ids": torch.full((B, P), 7), "prompt_mask": torch.ones(B, P, dtype=torch.long),
               "completion_ids": torch.arange(B * c_len).view(B, c_len),
               "completion_mask": torch.ones(B, c_len, dtype=torch.long)}
        return dapo.ScoredSamples(gen, [f"{k}:{i}" for i in range(B)], [r for r in rows for _ in range(n)], scores,
                                  {"reward/rule": torch.tensor(float(k))})
    return sample, calls


def test_dynamic_sampling_draws_until_full():
    n = 2
    sample, calls = _fake_sampler([[True, False, False], [False, True, False], [True, True, True]], n)
    batches = iter([[10, 11, 12], [20, 21, 22]])
    out, stats = dapo.dynamic_sampling(sample, [0, 1, 2], lambda: next(batches), n, max_extra_draws=4, pad_token_id=0)
    assert stats == {"rollout/draws": 3, "rollout/dropped_groups": 4, "rollout/filled_groups": 0}
    assert out.rows == [0, 0, 11, 11, 20, 20]  # informative groups, in draw order, cut at batch_size
    assert out.gen["completion_ids"].shape == (6, 5) and out.gen["completion_mask"][:2, 3:].sum() == 0
    assert out.completions[:2] == ["0:0", "0:1"] and out.scores.shape == (6,)
    assert out.parts["reward/rule"] == pytest.approx(1.0)  # the mean over the three draws


def test_dynamic_sampling_fills_with_dropped_groups_when_draws_run_out():
    n = 2
    sample, calls = _fake_sampler([[False, True], [False, False]], n)
    out, stats = dapo.dynamic_sampling(sample, [0, 1], lambda: [5, 6], n, max_extra_draws=1, pad_token_id=0)
    assert stats == {"rollout/draws": 2, "rollout/dropped_groups": 3, "rollout/filled_groups": 1}
    assert out.rows == [1, 1, 0, 0] and len(calls) == 2


def test_dynamic_sampling_draws_while_any_rank_lacks_groups():
    """reduce_sum sees the other ranks' missing groups: this rank, full after one draw, still draws."""
    sample, calls = _fake_sampler([[True], [True]], 2)
    out, stats = dapo.dynamic_sampling(sample, [0], lambda: [1], 2, max_extra_draws=1, pad_token_id=0,
                                       reduce_sum=lambda x: x + 1)
    assert stats["rollout/draws"] == 2 and out.rows == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# rollout correction: TIS and ICEPOP
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tis", "icepop"])
def test_correction_weights_match_float64(mode):
    B, T, C = 6, 11, 1.5
    mask = make_mask(B, T, "holes").cpu()
    old = -(torch.rand(B, T) * 3 + 0.05)
    sampler = old + torch.randn(B, T) * 0.4
    sampler[~mask] = float("nan")  # never read
    w, metrics = correction_weights(old, sampler, mask, mode, C)
    ratio = torch.exp(old.double() - torch.where(mask, sampler, 0).double())
    if mode == "tis":
        want = ratio.clamp(max=C)
        outside = ratio > C
    else:
        outside = (ratio < 1 / C) | (ratio > C)
        want = torch.where(outside, 0.0, ratio)
    want = torch.where(mask, want, 0.0)
    torch.testing.assert_close(w.double(), want, atol=1e-6, rtol=1e-6)
    frac = (outside & mask).sum() / mask.sum()
    assert 0 < frac < 1
    key = "truncated_fraction" if mode == "tis" else "masked_fraction"
    torch.testing.assert_close(metrics[f"rollout_correction/{key}"].double(), frac.double())
    diff = (old.double() - torch.where(mask, sampler, 0).double()).abs()[mask].mean()
    torch.testing.assert_close(metrics["rollout_correction/abs_logp_diff"].double(), diff, atol=1e-6, rtol=1e-6)


def test_correction_weight_is_the_weighted_policy_loss():
    """A weight >= 0 folded into the advantage is the weight on the token's loss, as TRL / verl apply it."""
    logprobs, old, adv, mask = make_cispo_inputs(5, 9, "right_pad", torch.float64)
    w = torch.rand(5, 9, dtype=torch.float64) * 2
    w[0, :3] = 0.0
    for policy_loss, dual in (("ppo", 3.0), ("cispo", None)):
        x, y = _leaf(logprobs), _leaf(logprobs)
        folded = ppo_policy_loss(x, old, adv * w, mask, clip_eps_high=EPS_HIGH, dual_clip=dual,
                                 policy_loss=policy_loss, backend="torch").loss
        m = mask.double()
        ratio = torch.exp(y - old)
        if policy_loss == "ppo":
            per = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1 + EPS_HIGH))
            per = torch.where(adv < 0, torch.minimum(per, -adv * dual), per)
        else:
            per = -ratio.clamp(max=1 + EPS_HIGH).detach() * adv * y
        weighted = (per * w * m).sum() / m.sum()
        folded.backward()
        weighted.backward()
        torch.testing.assert_close(folded, weighted, **TOL[torch.float64])
        torch.testing.assert_close(x.grad, y.grad, **TOL[torch.float64])


def test_correction_weights_bad_settings():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="must be 'tis' or 'icepop'"):
        correction_weights(x, x, m, "is", 2.0)
    with pytest.raises(ValueError, match="threshold must be > 1"):
        correction_weights(x, x, m, "tis", 1.0)
    with pytest.raises(ValueError, match=r"threshold_lower must lie in \[0, 1\)"):
        correction_weights(x, x, m, "icepop", 2.0, 1.5)
