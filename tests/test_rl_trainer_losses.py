"""Issue #23's options in the RL trainer on a tiny model: TRL's loss_type names, CISPO, REINFORCE++, DAPO's
dynamic sampling and overlong shaping, TIS / ICEPOP with the sampler's own log-probs; their settings' errors."""

import math

import pytest
import torch
from test_rl import answer_length, params, rl_trainer

from fastrm.config import ConfigError, load_config
from fastrm.generation import generate
from fastrm.loss_types import LOSS_TYPES
from fastrm.ops.ppo import ppo_policy_loss
from fastrm.trainers.rl import RLConfig


def config(*overrides):
    return load_config(RLConfig, None, ["reward=rule", *overrides])


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_type_sets_loss_agg_and_policy_loss(loss_type):
    c = config(f"loss_type={loss_type}")
    assert (c.loss_agg, c.policy_loss) == LOSS_TYPES[loss_type]
    again = config(f"loss_type={loss_type}", f"loss_agg={c.loss_agg}", f"policy_loss={c.policy_loss}")
    assert (again.loss_agg, again.policy_loss) == LOSS_TYPES[loss_type]  # consistent explicit settings are fine
    plain = config()
    assert (plain.loss_agg, plain.policy_loss) == ("token-mean", "ppo")


def _trl_aggregate(loss_type, per_token_loss, mask, max_completion_length):
    """TRL 1.16 GRPOTrainer._compute_loss's aggregation (one process, no gradient accumulation)."""
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)  # bnpo; dapo / cispo: num_items_in_batch


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_loss_type_aggregates_as_trl(loss_type):
    B, T, max_len, eps, eps_high = 5, 8, 12, 0.2, 0.28
    torch.manual_seed(0)
    lengths = torch.tensor([8, 3, 5, 1, 7])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    logprobs = -(torch.rand(B, T, dtype=torch.float64) * 2 + 0.1)
    old = logprobs + torch.randn(B, T, dtype=torch.float64) * 0.3
    adv = torch.randn(B, 1, dtype=torch.float64).expand(B, T).contiguous()
    agg, policy_loss = LOSS_TYPES[loss_type]
    x = logprobs.clone().requires_grad_(True)
    ours = ppo_policy_loss(x, old, adv, mask, clip_eps=eps, clip_eps_high=eps_high, agg=agg, policy_loss=policy_loss,
                           loss_scale_factor=float(max_len) if agg.endswith("norm") else None, backend="torch").loss
    y = logprobs.clone().requires_grad_(True)
    coef_1 = torch.exp(y - old)
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=1 + eps_high).detach() * adv * y  # TRL's epsilon_high = 1 + eps_high
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, 1.0, 1.05).double()
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:
        per_token = -torch.min(coef_1 * adv, torch.clamp(coef_1, 1 - eps, 1 + eps_high) * adv)
    trl = _trl_aggregate(loss_type, per_token, mask, max_len)
    ours.backward()
    trl.backward()
    torch.testing.assert_close(ours, trl, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("overrides,match", [
    (["loss_type=grpo", "loss_agg=token-mean"],
     r"setting loss_agg='token-mean' conflicts with loss_type=grpo \(which means loss_agg=seq-mean-token-mean\)"),
    (["loss_type=cispo", "policy_loss=ppo"], "setting policy_loss='ppo' conflicts with loss_type=cispo"),
    (["loss_type=luspo"], "setting loss_type='luspo': must be one of grpo, dr_grpo, dapo, bnpo, cispo, sapo"),
    (["loss_type=sapo", "dual_clip=3.0"], "setting dual_clip=3.0: applies to policy_loss=ppo only"),
    (["sapo_temperature_pos=1.0"], "setting sapo_temperature_pos=1.0: applies to policy_loss=sapo only"),
    (["loss_type=sapo", "sapo_temperature_neg=0"], "setting sapo_temperature_neg=0"),
    (["policy_loss=cispo2"], "setting policy_loss='cispo2'"),
    (["policy_loss=cispo", "dual_clip=3.0"], "setting dual_clip=3.0: applies to policy_loss=ppo only"),
    (["max_extra_draws=-1"], "setting max_extra_draws=-1"),
    (["dynamic_sampling=true", "num_samples=1"], "setting num_samples=1: dynamic_sampling"),
    (["overlong_buffer=300", "max_new_tokens=256"],
     r"setting overlong_buffer=300: must lie in \[0, max_new_tokens=256\]"),
    (["overlong_buffer=4", "overlong_penalty=-1"], "setting overlong_penalty=-1"),
    (["rollout_correction=is"], "setting rollout_correction='is'"),
    (["rollout_correction=tis", "rollout_is_threshold=1.0"], "setting rollout_is_threshold=1.0: must be > 1"),
    (["rollout_correction=tis", "rollout_is_threshold_lower=0.5"],
     "setting rollout_is_threshold_lower=0.5: applies to rollout_correction=icepop only"),
    (["rollout_correction=icepop", "rollout_is_threshold_lower=1.5"], "setting rollout_is_threshold_lower=1.5"),
    (["advantage=reinforce_pp_baseline", "num_samples=1"], "setting num_samples=1: advantage=reinforce_pp_baseline"),
])
def test_bad_settings_name_the_setting(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(*overrides)


def test_sampler_logprobs_are_the_sampling_distribution(tmp_path):
    """generate(return_logprobs=True) gives log-softmax(logits / temperature) of the sampled tokens: a forward
    pass of the same model over the sampled sequences finds the same numbers (top_p=1: no truncation)."""
    trainer = rl_trainer(tmp_path, "reward=rule", "max_new_tokens=5", reward_fn=answer_length)
    torch.manual_seed(0)
    prompts = [r["prompt"] for r in trainer.train_rows[:3]]
    gen = generate(trainer.policy, trainer.tokenizer, prompts, max_new_tokens=5, temperature=0.7,
                   num_return_sequences=2, return_logprobs=True)
    batch = trainer._sequences(gen)
    P = gen["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = trainer.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).logits.double() / 0.7
    want = torch.log_softmax(logits[:, P - 1:-1], -1).gather(-1, gen["completion_ids"][..., None])[..., 0]
    mask = gen["completion_mask"] != 0
    want = torch.where(mask, want, 0.0)
    assert gen["sampler_logprobs"].dtype == torch.float32
    torch.testing.assert_close(gen["sampler_logprobs"].double(), want, atol=1e-4, rtol=1e-4)  # float32 forward


@pytest.mark.parametrize("overrides", [
    ["advantage=reinforce_pp", "loss_type=cispo", "clip_eps_high=4.0"],
    ["advantage=reinforce_pp_baseline", "loss_type=dr_grpo", "overlong_buffer=2", "overlong_penalty=0.5"],
    ["advantage=grpo", "loss_type=dapo", "dynamic_sampling=true", "max_extra_draws=2"],
    ["advantage=grpo", "loss_type=grpo", "rollout_correction=tis", "rollout_is_threshold=1.2"],
    ["advantage=grpo", "loss_type=sapo", "sapo_temperature_pos=0.8"],
    ["advantage=rloo", "loss_type=bnpo", "rollout_correction=icepop", "rollout_is_threshold=1.2"],
])
def test_one_iteration_with_the_new_options(tmp_path, overrides):
    trainer = rl_trainer(tmp_path, "reward=rule", "lr=1e-2", "ppo_epochs=1", *overrides, reward_fn=answer_length)
    before = params(trainer.policy)
    row = trainer.train_step()
    assert any(not torch.equal(before[k], v) for k, v in params(trainer.policy).items())
    for key in ("loss/policy", "policy/clipfrac", "objective/scores"):
        assert math.isfinite(float(row[key])), key
    if "dynamic_sampling=true" in overrides:
        assert row["rollout/draws"] >= 1 and row["rollout/dropped_groups"] >= 0
    if "overlong_buffer=2" in overrides:
        assert -0.5 <= row["reward/overlong_penalty"] <= 0
    if any(o.startswith("rollout_correction") for o in overrides):
        assert row["rollout_correction/abs_logp_diff"] >= 0
        assert ("rollout_correction/truncated_fraction" in row) == ("rollout_correction=tis" in overrides)


def test_rollout_correction_weights_reach_the_advantages(tmp_path, monkeypatch):
    """The trainer hands correction_weights the sampler's log-probs (one per completion token) and multiplies the
    advantages by its weights: weights 0 on the first token of every row leave exactly those advantages 0."""
    import fastrm.trainers.rollout as rollout_module

    seen = {}

    def spy(old, sampler, mask, mode, threshold, lower):
        seen.update(shape=sampler.shape, old_shape=old.shape, mode=mode, threshold=threshold)
        weights = torch.where(mask != 0, 1.0, 0.0)
        weights[:, 0] = 0.0
        return weights, {"rollout_correction/weight": weights.mean()}

    monkeypatch.setattr(rollout_module, "correction_weights", spy)
    trainer = rl_trainer(tmp_path, "reward=rule", "advantage=reinforce", "rollout_correction=tis",
                         "rollout_is_threshold=3.0", reward_fn=answer_length)
    ro = trainer.rollout(trainer.train_rows[:3])
    assert seen == {"shape": ro.mask.shape, "old_shape": ro.mask.shape, "mode": "tis", "threshold": 3.0}
    assert (ro.advantages[:, 0] == 0).all()
    assert (ro.advantages[:, 1:][ro.mask[:, 1:] != 0] != 0).any()


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    """A reward that is the same for both samples of every other prompt: those groups are dropped and replaced."""
    calls = {"n": 0}

    def alternating(prompts, completions):
        calls["n"] += 1
        return [float(i % 2) * (1.0 + 0.1 * (i % 4 == 1)) if (i // 2) % 2 == 0 else 1.0
                for i in range(len(completions))]

    trainer = rl_trainer(tmp_path, "reward=rule", "advantage=grpo", "dynamic_sampling=true", "max_extra_draws=3",
                         reward_fn=alternating)
    ro = trainer.rollout(trainer.train_rows[:3])
    scores = ro.scores.view(-1, 2)
    assert ro.mask.shape[0] == 6 and ro.stats["rollout/draws"] >= 2
    assert (scores[:, 0] != scores[:, 1]).all()
