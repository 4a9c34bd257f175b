"""fastrm.integrations.verl against verl's own functions, and against faithful float64 references.

Two implementations are compared with the adapter, on the same inputs, values, metrics and gradients:

* ``reference``: float64 references written here from verl 0.9.1's formulas (always runs);
* ``verl``: verl 0.9.1's own ``core_algos`` / ``torch_functional`` functions, when verl imports. verl is not a
  dev dependency (its full install pins transformers < 5.11 and pulls Ray); ``pip install verl==0.9.1 --no-deps
  tensordict==0.10.0 ray codetiming`` next to fastrm's dev install makes these run on CPU.
"""

import math
import types

import pytest
import torch

import fastrm
from fastrm.integrations import verl as fv

B, T, V = 6, 11, 37


def _verl():
    try:
        from verl.trainer.ppo import core_algos
        from verl.utils import torch_functional
        from verl.workers.config import ActorConfig
    except Exception as err:  # noqa: BLE001 (any import failure means: verl cannot run here)
        pytest.skip(f"verl does not import here ({type(err).__name__}: {err})")
    return core_algos, torch_functional, ActorConfig


# ---------------------------------------------------------------------------------------------------------------
# float64 references (verl 0.9.1's formulas, one process unless the batch info says otherwise)
# ---------------------------------------------------------------------------------------------------------------


def _masked_mean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)


def ref_agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return (loss_mat * m).sum() / (m.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    seq_mask = (m.sum(-1) > 0).to(m.dtype)
    rows = (loss_mat * m).sum(-1)
    if mode == "seq-mean-token-mean":
        rows = rows / (m.sum(-1) + 1e-8)
    n = seq_mask.sum() if global_batch_size is None else global_batch_size
    loss = (rows * seq_mask).sum() / n * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def ref_gae(rewards, values, mask, gamma, lam):
    m = mask.to(rewards.dtype)
    next_value, running, out = 0.0, 0.0, []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        next_value = values[:, t] * m[:, t] + (1 - m[:, t]) * next_value
        running = step * m[:, t] + (1 - m[:, t]) * running
        out.append(running)
    adv = torch.stack(out[::-1], 1)
    returns = adv + values
    mean = _masked_mean(adv, m)
    var = _masked_mean((adv - mean) ** 2, m) * m.sum() / (m.sum() - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


def ref_policy_loss(old, logp, adv, mask, low, high, dual_clip, mode, ratio_level="token", **batch_info):
    m = mask.to(logp.dtype)
    nak = logp - old
    if ratio_level == "sequence":
        seq = (nak * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_ratio = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    else:
        log_ratio = torch.clamp(nak, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(pg1, pg2)
    clipfrac = _masked_mean(torch.gt(pg2, pg1).to(m.dtype), m)
    lower = torch.zeros((), dtype=m.dtype)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        lower = _masked_mean((torch.gt(clipped, pg3) & (adv < 0)).to(m.dtype), m)
        clipped = torch.where(adv < 0, torch.minimum(pg3, clipped), clipped)
    ppo_kl = _masked_mean(-(torch.clamp(nak, -20.0, 20.0) if ratio_level == "token" else nak), m)
    return ref_agg_loss(clipped, mask, mode, **batch_info), clipfrac, ppo_kl, lower


def ref_kl(logp, ref, name):
    base = name.rstrip("+")
    d = logp - ref
    if base in ("kl", "k1"):
        value = d
    elif base == "abs":
        value = d.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * d.square()
    else:
        x = torch.clamp(ref - logp, -20, 20)
        value = torch.clamp(x.exp() - x - 1, -10, 10)
    if not name.endswith("+") or base in ("mse", "k2"):
        return value
    k2 = 0.5 * d.square()
    return k2 - k2.detach() + value.detach()


@pytest.fixture(params=["reference", "verl"])
def impl(request):
    """The implementation the adapter is compared with: a namespace of verl's function names."""
    if request.param == "reference":
        return types.SimpleNamespace(
            name="reference", agg_loss=ref_agg_loss, compute_gae_advantage_return=ref_gae, kl_penalty=ref_kl,
            logprobs_from_logits=lambda logits, labels: torch.log_softmax(logits, -1).gather(
                -1, labels.unsqueeze(-1)).squeeze(-1),
            entropy_from_logits=lambda logits: -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1),
            policy_loss=ref_policy_loss)
    core_algos, torch_functional, _ = _verl()

    def policy_loss(old, logp, adv, mask, low, high, dual_clip, mode, ratio_level="token", **batch_info):
        config = actor_config(low, high, dual_clip, batch_info)
        name = "gspo" if ratio_level == "sequence" else "vanilla"
        loss, metrics = core_algos.get_policy_loss_fn(name)(old, logp, adv, mask, mode, config)
        return loss, metrics["actor/pg_clipfrac"], metrics["actor/ppo_kl"], metrics["actor/pg_clipfrac_lower"]

    return types.SimpleNamespace(
        name="verl", agg_loss=core_algos.agg_loss, compute_gae_advantage_return=core_algos.compute_gae_advantage_return,
        kl_penalty=core_algos.kl_penalty, logprobs_from_logits=torch_functional.logprobs_from_logits_v2,
        entropy_from_logits=torch_functional.entropy_from_logits, policy_loss=policy_loss)


def actor_config(low, high, dual_clip, batch_info):
    """A verl ActorConfig when verl imports (its gspo loss asserts the type), else a plain namespace."""
    try:
        from verl.workers.config import ActorConfig
    except Exception:  # noqa: BLE001
        config = types.SimpleNamespace(clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high,
                                       clip_ratio_c=dual_clip or 3.0, global_batch_info=dict(batch_info))
        config.get = lambda name, default=None: getattr(config, name, default)
        return config
    config = ActorConfig(strategy="fsdp", clip_ratio=low, clip_ratio_low=low, clip_ratio_high=high,
                         clip_ratio_c=dual_clip or 3.0, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=4,
                         rollout_n=1)
    config.global_batch_info.update(batch_info)
    return config


def make_mask():
    mask = (torch.rand(B, T) < 0.75).float()
    mask[:, 0] = 1.0
    mask[B // 2] = 0.0  # a row with no valid token
    mask[B // 2, 0] = 0.0
    return mask


def close(got, want, dtype=torch.float32):
    # float64: verl's masked means divide by (count + 1e-8), a relative difference of 1e-8 / count.
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               **tol)


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae(impl, dtype):
    rewards, values = torch.randn(B, T, dtype=dtype), torch.randn(B, T, dtype=dtype)
    mask = make_mask()
    mask[B // 2, :3] = 1.0  # whitening needs the valid positions anyway
    adv, ret = fv.compute_gae_advantage_return(rewards, values, mask, gamma=0.97, lam=0.9)
    adv_w, ret_w = impl.compute_gae_advantage_return(rewards, values, mask, 0.97, 0.9)
    valid = mask != 0
    close(adv[valid], adv_w[valid], dtype)
    close(ret[valid], ret_w[valid], dtype)
    assert (adv[~valid] == 0).all() and (ret[~valid] == 0).all()


@pytest.mark.parametrize("mode", fv.AGG_MODES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("batch_info", [{}, {"dp_size": 2, "batch_num_tokens": 80, "global_batch_size": 11,
                                             "loss_scale_factor": 32}])
def test_registered_policy_losses(impl, mode, ratio_level, batch_info):
    mask = make_mask()
    logp = -torch.rand(B, T) * 3
    old = logp + 0.3 * torch.randn(B, T)
    adv = torch.randn(B, T)
    dual_clip = 3.0 if ratio_level == "token" else None
    config = actor_config(0.2, 0.28, dual_clip, batch_info)
    ours_fn = fv.compute_policy_loss_vanilla if ratio_level == "token" else fv.compute_policy_loss_gspo
    x = logp.clone().requires_grad_(True)
    loss, metrics = ours_fn(old, x, adv, mask, mode, config)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    y = logp.double().clone().requires_grad_(True)
    want = impl.policy_loss(old.double(), y, adv.double(), mask.double(), 0.2, 0.28, dual_clip, mode,
                            ratio_level=ratio_level, **batch_info)
    want[0].backward()
    close(loss, want[0])
    close(x.grad, y.grad)
    close(metrics["actor/pg_clipfrac"], want[1])
    close(metrics["actor/ppo_kl"], want[2])
    close(metrics["actor/pg_clipfrac_lower"], want[3])


def test_compute_policy_loss_old_signature(impl):
    mask = make_mask()
    logp = -torch.rand(B, T) * 3
    old, adv = logp + 0.3 * torch.randn(B, T), torch.randn(B, T)
    out = fv.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, cliprange_high=0.3, clip_ratio_c=2.5,
                                 loss_agg_mode="seq-mean-token-mean")
    want = ref_policy_loss(old.double(), logp.double(), adv.double(), mask.double(), 0.2, 0.3, 2.5,
                           "seq-mean-token-mean")
    if impl.name == "verl":
        core_algos, _, _ = _verl()
        with pytest.warns(Warning):
            want = core_algos.compute_policy_loss(old, logp, adv, mask, cliprange=0.2, cliprange_high=0.3,
                                                  clip_ratio_c=2.5, loss_agg_mode="seq-mean-token-mean")
    assert len(out) == 4
    for got, w in zip(out, want):
        close(got, w)


@pytest.mark.parametrize("name", sorted(fv.KL_NAMES))
def test_kl_penalty(impl, name):
    logp = -torch.rand(B, T) * 4
    ref = logp + torch.randn(B, T) * 2
    x, r = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    out = fv.kl_penalty(x, r, kl_penalty=name)
    w = torch.randn(B, T)
    (out * w).sum().backward()
    x64, r64 = logp.double().requires_grad_(True), ref.double().requires_grad_(True)
    want = impl.kl_penalty(x64, r64, name)
    (want * w.double()).sum().backward()
    close(out, want)
    close(x.grad, x64.grad)
    close(r.grad, r64.grad)
    with pytest.raises(NotImplementedError):
        fv.kl_penalty(logp, ref, "full")


@pytest.mark.parametrize("mode", fv.AGG_MODES)
def test_agg_loss(impl, mode):
    mask = make_mask()
    loss_mat = torch.randn(B, T)
    for info in ({}, {"dp_size": 4, "batch_num_tokens": 123, "global_batch_size": 17, "loss_scale_factor": 9}):
        x = loss_mat.clone().requires_grad_(True)
        got = fv.agg_loss(x, mask, mode, **info)
        got.backward()
        y = loss_mat.double().requires_grad_(True)
        want = impl.agg_loss(y, mask.double(), mode, **info)
        want.backward()
        close(got, want)
        close(x.grad, y.grad)


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_logprobs_and_entropy(impl, inplace_backward):
    logits = torch.randn(B, T, V) * 3
    labels = torch.randint(0, V, (B, T))
    x = logits.clone().requires_grad_(True)
    source = x * 1.0  # the in-place backward writes into this buffer, not into the leaf
    lp = fv.logprobs_from_logits(source, labels, inplace_backward=inplace_backward)
    w = torch.randn(B, T)
    (lp * w).sum().backward()
    y = logits.double().requires_grad_(True)
    want = impl.logprobs_from_logits(y, labels)
    (want * w.double()).sum().backward()
    close(lp, want)
    close(x.grad, y.grad)
    z = logits.clone().requires_grad_(True)
    ent = fv.entropy_from_logits(z)
    (ent * w).sum().backward()
    u = logits.double().requires_grad_(True)
    want_ent = impl.entropy_from_logits(u)
    (want_ent * w.double()).sum().backward()
    close(ent, want_ent)
    close(z.grad, u.grad)


def test_register_routes_verl_and_undoes():
    core_algos, torch_functional, _ = _verl()
    originals = {name: getattr(core_algos, name) for name in ("kl_penalty", "agg_loss")}
    vanilla = core_algos.POLICY_LOSS_REGISTRY["vanilla"]
    with fv.register() as report:
        assert core_algos.get_policy_loss_fn("vanilla") is fv.compute_policy_loss_vanilla
        assert core_algos.get_policy_loss_fn("gspo") is fv.compute_policy_loss_gspo
        assert core_algos.get_adv_estimator_fn("gae") is fv.compute_gae_advantage_return
        assert core_algos.kl_penalty is fv.kl_penalty and torch_functional.entropy_from_logits is fv.entropy_from_logits
        logp = -torch.rand(B, T)
        core_algos.kl_penalty(logp, logp + 0.1, kl_penalty="low_var_kl")
        assert report.calls["kl_penalty"] == 1
        # rollout correction has no fused form: verl's own vanilla loss runs, counted as a fallback
        config = actor_config(0.2, 0.2, 3.0, {})
        mask = torch.ones(B, T)
        loss, _ = core_algos.get_policy_loss_fn("vanilla")(logp + 0.1, logp, torch.randn(B, T), mask,
                                                           "token-mean", config, torch.rand(B, T))
        assert report.fallbacks["compute_policy_loss_vanilla"] == 1 and math.isfinite(loss.item())
        assert "fastrm on verl" in str(report)
    assert core_algos.POLICY_LOSS_REGISTRY["vanilla"] is vanilla
    assert all(getattr(core_algos, name) is fn for name, fn in originals.items())


def test_fastrm_exports_and_bad_mode():
    assert fv.agg_loss is not None and fastrm.ppo_policy_loss is not None
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fv.agg_loss(torch.randn(2, 3), torch.ones(2, 3), "token-median")
