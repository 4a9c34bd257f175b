"""RL trainer and its pieces on a tiny model: one iteration of each estimator, hand-computed advantages and
loss, KL controllers, curriculum, rule and learned-RM rewards, resume equality, bad configs."""

import json
import math

import pytest
import torch

from fastrm import advantages as fadv
from fastrm.config import ConfigError, load_config
from fastrm.layout import PaddedBatch
from fastrm.models import ModelConfig, load_reward_model
from fastrm.tokenization import load_tokenizer
from fastrm.trainers.rl import RLConfig, RLTrainer

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "batch_size=3", "num_samples=2", "max_new_tokens=3",
        "num_train_prompts=12", "num_eval_prompts=4", "eval_steps=1000", "save_steps=1000", "backend=torch"]


def rl_trainer(tmp_path, *overrides, reward_fn=None):
    args = TINY + [f"output_dir={tmp_path}", *overrides]
    return RLTrainer(load_config(RLConfig, None, args), reward_fn=reward_fn).setup()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def answer_length(prompts, completions):
    """A rule reward with spread on a random tiny policy: the length, and a fraction from the characters (a batch
    of equally long answers still differs in reward)."""
    return [len(c) + sum(map(ord, c)) % 7 / 7 for c in completions]


# ---- one iteration of each estimator -------------------------------------------------------------------------

@pytest.mark.parametrize("advantage", ["gae", "reinforce", "reinforce_baseline", "rloo", "grpo"])
def test_one_iteration_runs_and_changes_the_policy(tmp_path, advantage):
    trainer = rl_trainer(tmp_path, f"advantage={advantage}", "reward=rule", "lr=1e-2", "ppo_epochs=1",
                         reward_fn=answer_length)
    before = params(trainer.policy)
    ref_before = params(trainer.ref)
    row = trainer.train_step()
    after = params(trainer.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], v) for k, v in params(trainer.ref).items())  # the reference is frozen
    for key in ("objective/kl", "objective/entropy", "objective/scores", "objective/true_score", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "timing/generate", "timing/logprobs", "timing/advantages",
                "timing/update"):
        assert math.isfinite(float(row[key])), key
    assert ("loss/value" in row) == (advantage == "gae")
    assert ("val/clipfrac" in row) == (advantage == "gae")
    assert trainer.step == 1


# ---- advantages by hand ---------------------------------------------------------------------------------------

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_reinforce_discounted_returns_by_hand():
    scores = torch.tensor([1.0, 2.0])
    adv, ret = fadv.compute_advantages("reinforce", scores, MASK, gamma=0.5)
    assert ret is None
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))
    # with a per-token KL penalty in the rewards: r_t = -0.5 * kl_t (+ score on the last token)
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, 2.0, 9.0]])
    adv, _ = fadv.compute_advantages("reinforce", scores, MASK, gamma=1.0, kl=kl, kl_coef=0.5)
    row0 = [-0.1 - 0.2 + 0.7, -0.2 + 0.7, 1 - 0.3]
    row1 = [-0.5 + 1.0, 2.0 - 1.0, 0.0]  # the masked 9.0 never counts
    torch.testing.assert_close(adv, torch.tensor([row0, row1]))


def test_reinforce_baseline_moving_and_batch_by_hand():
    mask = torch.ones(2, 1)
    moving = fadv.MovingAverageBaseline("moving", decay=0.5)
    adv1, _ = fadv.compute_advantages("reinforce_baseline", torch.tensor([1.0, 3.0]), mask, baseline=moving)
    torch.testing.assert_close(adv1[:, 0], torch.tensor([-1.0, 1.0]))  # first batch: its own mean 2
    adv2, _ = fadv.compute_advantages("reinforce_baseline", torch.tensor([6.0, 6.0]), mask, baseline=moving)
    torch.testing.assert_close(adv2[:, 0], torch.tensor([4.0, 4.0]))  # baseline 2 from before this batch
    assert moving.value == pytest.approx(0.5 * 2 + 0.5 * 6)
    batch = fadv.MovingAverageBaseline("batch")
    adv3, _ = fadv.compute_advantages("reinforce_baseline", torch.tensor([6.0, 2.0]), mask, baseline=batch)
    torch.testing.assert_close(adv3[:, 0], torch.tensor([2.0, -2.0]))


def test_rloo_and_grpo_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, n = 3
    mask = torch.ones(6, 2)
    adv, _ = fadv.compute_advantages("rloo", scores, mask, n=3)
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    torch.testing.assert_close(adv, expected[:, None].expand(6, 2))
    adv, _ = fadv.compute_advantages("grpo", scores, mask, n=3, grpo_eps=0.0)
    s1, s2 = math.sqrt(7.0), math.sqrt(3.0)  # unbiased stds: (4 + 1 + 9) / 2, (1 + 1 + 4) / 2
    expected = torch.tensor([-2 / s1, -1 / s1, 3 / s1, -1 / s2, -1 / s2, 2 / s2])
    torch.testing.assert_close(adv, expected[:, None].expand(6, 2))
    adv, _ = fadv.compute_advantages("grpo", scores, mask, n=3, scale_rewards="none")
    torch.testing.assert_close(adv[:, 0], torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))
    adv, _ = fadv.compute_advantages("grpo", scores, mask, n=3, scale_rewards="batch", grpo_eps=0.0)
    s = math.sqrt(((scores - 2.0) ** 2).sum().item() / 5)  # unbiased std of all six scores (mean 2)
    torch.testing.assert_close(adv[:, 0], torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]) / s)
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        fadv.grpo_scores(scores, 3, scale_rewards="global")
    with pytest.raises(ValueError, match="n >= 2"):
        fadv.rloo_scores(scores, 1)


def test_gae_by_hand():
    scores = torch.tensor([1.0, 2.0])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    gamma, lam = 0.9, 0.8
    adv, ret = fadv.compute_advantages("gae", scores, MASK, values=values, gamma=gamma, lam=lam)
    expected = torch.zeros(2, 3)
    for b, length in ((0, 3), (1, 2)):
        rewards = [0.0] * (length - 1) + [float(scores[b])]
        running = 0.0
        for t in reversed(range(length)):
            nxt = float(values[b, t + 1]) if t + 1 < length else 0.0
            running = rewards[t] + gamma * nxt - float(values[b, t]) + gamma * lam * running
            expected[b, t] = running
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * MASK)
    with pytest.raises(ValueError, match="needs values"):
        fadv.compute_advantages("gae", scores, MASK)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        fadv.compute_advantages("ppo2", scores, MASK)


def test_reward_normalizer_and_clip():
    norm = fadv.RewardNormalizer("batch", clip=1.0)
    out = norm(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    z = (10 - 2.5) / math.sqrt(25.0)  # unbiased std of [0, 0, 0, 10] is 5
    torch.testing.assert_close(out, torch.tensor([-0.5, -0.5, -0.5, min(z, 1.0)]))
    running = fadv.RewardNormalizer("running")
    running(torch.tensor([1.0, 3.0]))
    running(torch.tensor([5.0, 7.0]))
    assert (running.count, running.mean) == (4, pytest.approx(4.0))
    assert running.m2 / 3 == pytest.approx(torch.tensor([1.0, 3, 5, 7]).var().item())


# ---- the loss by hand -------------------------------------------------------------------------------------------

def test_minibatch_loss_equals_hand_computation(tmp_path):
    c_eps, vf, ent, kl_coef, v_clip = 0.2, 0.5, 0.01, 0.3, 0.2
    trainer = rl_trainer(tmp_path, "advantage=gae", "reward=rule", f"clip_eps={c_eps}", f"vf_coef={vf}",
                         f"entropy_coef={ent}", "kl_in=loss", f"kl_coef={kl_coef}", "kl_estimator=k3",
                         f"value_clip={v_clip}", "temperature=0.7", reward_fn=answer_length)
    with torch.no_grad():  # make the policy differ from the reference, so the KL term is not 0
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ro = trainer.rollout(trainer.train_rows[:3])
    rows = ro.mask.shape[0]
    gen = torch.Generator().manual_seed(0)
    # move old log-probs and values so clipping is active on some tokens
    ro.old_logprobs = ro.old_logprobs + 0.3 * torch.randn(ro.old_logprobs.shape, generator=gen)
    ro.values = ro.values + 0.5 * torch.randn(ro.values.shape, generator=gen)
    idx = torch.arange(rows)
    loss, metrics = trainer.compute_loss(ro, idx)

    # by hand: full logits, log_softmax(logits / T), no fused ops
    batch, P, mask = ro.batch, ro.prompt_len, ro.mask.bool()
    with torch.no_grad():
        logits = trainer.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).logits.float() / 0.7
        ref_logits = trainer.ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids).logits.float() / 0.7
        values = trainer.value(PaddedBatch(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids))
    logp_all = torch.log_softmax(logits[:, P - 1:-1], -1)
    tokens = batch.input_ids[:, P:]
    logp = logp_all.gather(-1, tokens[..., None])[..., 0]
    ref_logp = torch.log_softmax(ref_logits[:, P - 1:-1], -1).gather(-1, tokens[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = (logp - ro.old_logprobs).exp()
    adv = ro.advantages
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c_eps, 1 + c_eps))
    policy_loss = pg[mask].mean()
    v = values[:, P - 1:-1]
    old_v, ret = ro.values, ro.returns
    v_clipped = old_v + (v - old_v).clamp(-v_clip, v_clip)
    v_loss = 0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)[mask].mean()
    d = ref_logp - logp
    k3 = (d.exp() - d - 1)[mask].mean()
    expected = policy_loss + vf * v_loss + kl_coef * k3 - ent * entropy[mask].mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["loss/policy"], policy_loss, rtol=1e-4, atol=1e-5)
    clipfrac = ((-adv * ratio.clamp(1 - c_eps, 1 + c_eps)) > (-adv * ratio))[mask].float().mean()
    assert 0 < float(clipfrac) < 1  # the clipped branch really was exercised
    torch.testing.assert_close(metrics["policy/clipfrac"], clipfrac)


# ---- KL controllers -------------------------------------------------------------------------------------------

def test_kl_controllers():
    adaptive = fadv.AdaptiveKLController(0.1, target=1.0, horizon=100)
    adaptive.update(current_kl=2.0, n_steps=10)  # above target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    grown = adaptive.value
    adaptive.update(current_kl=0.9, n_steps=10)  # below target: shrinks by the proportional error -0.1
    assert adaptive.value == pytest.approx(grown * (1 - 0.1 * 10 / 100))
    assert adaptive.value < grown
    fresh = fadv.AdaptiveKLController(0.0, 1.0, 10)
    fresh.load_state_dict(adaptive.state_dict())
    assert fresh.value == adaptive.value
    fixed = fadv.FixedKLController(0.05)
    for kl in (0.0, 10.0, 1e6):
        fixed.update(kl, 64)
    assert fixed.value == 0.05


def test_trainer_adaptive_kl_moves_coefficient(tmp_path):
    trainer = rl_trainer(tmp_path, "advantage=rloo", "reward=rule", "adaptive_kl=true", "kl_coef=0.1",
                         "kl_target=1e-9", "kl_horizon=10", "lr=1e-2", reward_fn=answer_length)
    trainer.train_step()  # the first rollout has KL exactly 0 (policy == reference): below target
    assert trainer.kl_ctl.value < 0.1


# ---- curriculum -----------------------------------------------------------------------------------------------

def test_curriculum_order_and_widening():
    prompts = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]
    difficulty = [5, 1, 7, 1, 3, 0, 9, 2]
    sampler = fadv.CurriculumSampler(prompts, difficulty, batch_size=2, start_fraction=0.25, warmup_steps=4, seed=3)
    assert sampler.order == [5, 1, 3, 7, 4, 0, 2, 6]  # easy -> hard, ties in data order
    assert [sampler.pool_size(s) for s in range(6)] == [2, 4, 5, 7, 8, 8]  # ceil(8 * (0.25 + 0.75 s / 4))
    first = next(sampler)
    assert sorted(first) == ["p1", "p5"]  # only the two easiest at step 0
    seen = set()
    for _ in range(3):
        seen.update(next(sampler))
    assert all(difficulty[int(p[1])] <= 5 for p in seen)  # never beyond the pool of step 3 (7 easiest)
    # step schedule: constant within each stage
    staged = fadv.CurriculumSampler(prompts, difficulty, batch_size=2, start_fraction=0.5, warmup_steps=4,
                                  schedule="step", num_stages=2)
    assert [staged.pool_size(s) for s in range(5)] == [4, 4, 6, 6, 8]
    # by a function (prompt length), and resume from the state
    by_len = fadv.CurriculumSampler(["aaaa", "a", "aaa", "aa"], len, batch_size=1, warmup_steps=0)
    assert by_len.order == [1, 3, 2, 0]
    a = fadv.CurriculumSampler(prompts, difficulty, 2, warmup_steps=4, seed=1)
    b = fadv.CurriculumSampler(prompts, difficulty, 2, warmup_steps=4, seed=1)
    [next(a) for _ in range(3)]
    b.load_state_dict(a.state_dict())
    assert next(a) == next(b)


def test_trainer_curriculum_is_used_and_logged(tmp_path):
    trainer = rl_trainer(tmp_path, "advantage=grpo", "reward=rule", "curriculum=true", "curriculum_start=0.25",
                         "curriculum_steps=10", "num_train_prompts=40", "task_max_level=2", reward_fn=answer_length)
    row = trainer.train_step()
    assert row["curriculum/pool_size"] == 10
    assert row["curriculum/batch_difficulty"] == 0  # the easiest quarter of levels 0..2 is all level 0


# ---- rewards ----------------------------------------------------------------------------------------------------

def test_rule_reward_path(tmp_path):
    calls = []

    def reward(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return [10.0 * len(c) + (p == "1+1=") for p, c in zip(prompts, completions)]

    trainer = rl_trainer(tmp_path, "advantage=rloo", "reward=rule", "rule_weight=0.5", reward_fn=reward)
    ro = trainer.rollout([{"prompt": "1+1="}, {"prompt": "2+3="}])
    prompts, completions = calls[-1]
    assert prompts == ["1+1=", "1+1=", "2+3=", "2+3="]
    expected = [0.5 * (10.0 * len(c) + (p == "1+1=")) for p, c in zip(prompts, completions)]
    assert float(ro.stats["objective/scores"]) == pytest.approx(sum(expected) / 4)
    # the embedded checker by name
    trainer2 = rl_trainer(tmp_path / "b", "advantage=rloo", "reward=rule")
    from fastrm.tasks.arithmetic import reward_fn

    assert [(f.fn, f.name, f.weight) for f in trainer2.rules] == [(reward_fn, "reward_fn", 1.0)]


def test_learned_reward_model_path(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer("embedded")
    rm = load_reward_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer,
                           torch.device("cpu"))
    rm.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    trainer = rl_trainer(tmp_path / "run", "advantage=grpo", "reward=both", f"reward_model_path={tmp_path / 'rm'}",
                         "reward_model_weight=2.0", "rule_weight=0.0")
    prompts = [{"prompt": "12+3="}, {"prompt": "4+4="}]
    ro = trainer.rollout(prompts)
    # the same scores from the saved model, loaded with the Auto class, one unpadded row at a time (its head reads
    # the last token that is not <pad>, which a random tiny policy may sample: packed rows read the same token)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", num_labels=1).eval()
    expected = []
    for i in range(4):
        prompt_ids = tokenizer(ro.prompts[i])["input_ids"]
        completion = ro.batch.input_ids[i, ro.prompt_len:][ro.mask[i].bool()].tolist()
        with torch.no_grad():
            expected.append(loaded(input_ids=torch.tensor([prompt_ids + completion])).logits.item())
    assert float(ro.stats["reward/model"]) == pytest.approx(sum(expected) / 4, abs=1e-5)
    assert float(ro.stats["objective/scores"]) == pytest.approx(2.0 * sum(expected) / 4, abs=1e-5)
    # a critic built on the reward model starts from its head
    trainer_v = rl_trainer(tmp_path / "run2", "advantage=gae", "reward=model", f"reward_model_path={tmp_path / 'rm'}",
                           "value_model=reward")
    torch.testing.assert_close(trainer_v.value.head.weight, loaded.score.weight)


# ---- resume -----------------------------------------------------------------------------------------------------

def test_resume_equals_straight_run(tmp_path):
    common = ["advantage=gae", "reward=rule", "lr=1e-2", "ppo_epochs=2", "num_minibatches=2", "max_steps=4",
              "adaptive_kl=true", "kl_target=0.01", "seed=7"]
    straight = rl_trainer(tmp_path / "a", *common, reward_fn=answer_length).train()
    half = rl_trainer(tmp_path / "b", *common, "max_steps=2", reward_fn=answer_length).train()
    assert half.step == 2
    resumed = RLTrainer(load_config(RLConfig, None, TINY + [f"output_dir={tmp_path / 'b'}", *common, "resume=true"]),
                        reward_fn=answer_length).setup()
    assert resumed.step == 2 and resumed.kl_ctl.value == half.kl_ctl.value
    resumed.train()
    for name, value in params(straight.policy).items():
        torch.testing.assert_close(params(resumed.policy)[name], value, rtol=0, atol=0, msg=name)
    for name, value in params(straight.value).items():
        torch.testing.assert_close(params(resumed.value)[name], value, rtol=0, atol=0, msg=name)
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    # and the run really learned something between the halves
    assert any(not torch.equal(v, params(half.policy)[k]) for k, v in params(straight.policy).items())


# ---- bad configs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    (["advantage=rloo", "num_samples=1"], "setting num_samples=1: advantage=rloo"),
    (["advantage=grpo", "num_samples=1"], "setting num_samples=1: advantage=grpo"),
    (["advantage=gae", "value_model=none", "reward=rule"], "setting value_model='none': advantage=gae needs a critic"),
    (["advantage=ppo2"], "setting advantage='ppo2'"),
    (["reward=model"], "setting reward_model_path=None: reward=model needs"),
    (["reward=rules"], "setting reward='rules'"),
    (["kl_estimator=k4", "reward=rule"], "setting kl_estimator='k4'"),
    (["dual_clip=0.5", "reward=rule"], "setting dual_clip=0.5"),
    (["num_minibatches=100", "reward=rule"], "setting num_minibatches=100"),
    (["value_model=reward", "reward=rule"], "setting value_model='reward': value_model=reward needs"),
    (["scale_rewards=global", "reward=rule"], "setting scale_rewards='global'"),
    (["grpo_scale=false", "scale_rewards=batch", "reward=rule"], "setting grpo_scale=False: conflicts"),
    (["loss_agg=token-sum", "reward=rule"], "setting loss_agg='token-sum'"),
])
def test_bad_config_names_the_setting(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RLConfig, None, overrides)


def test_grpo_scale_is_an_alias_of_scale_rewards():
    for old, new in (("false", "none"), ("true", "group")):
        config = load_config(RLConfig, None, ["reward=rule", "advantage=grpo", f"grpo_scale={old}"])
        assert config.scale_rewards == new and config.grpo_scale is None
    config = load_config(RLConfig, None, ["reward=rule", "kl_estimator=k3+", "loss_agg=seq-mean-token-sum-norm"])
    assert config.kl_estimator == "k3+" and config.scale_rewards == "group"


def test_nonfinite_loss_stops_training(tmp_path):
    from fastrm.guard import NonFiniteLossError

    trainer = rl_trainer(tmp_path, "advantage=rloo", "reward=rule", reward_fn=answer_length)
    compute_loss = trainer.compute_loss

    def nan_loss(ro, idx):
        loss, metrics = compute_loss(ro, idx)
        return loss * float("nan"), metrics

    trainer.compute_loss = nan_loss
    before = params(trainer.policy)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        trainer.train_step()
    assert all(torch.equal(before[k], v) for k, v in params(trainer.policy).items())


def test_demo_cli_runs_the_whole_pipeline(tmp_path, capsys):
    """Several seeds in one process, the results file with versions, device and commit, and each seed's result
    the same as a run of that seed alone (deterministic per seed, nothing carried from one seed to the next)."""
    from fastrm.cli import main

    tiny = ["--sft-steps", "3", "--rm-steps", "3", "--rl-steps", "2", "--sft", "model.hidden_size=32",
            "--rm", "model.hidden_size=32", "--sft", "num_train_examples=256", "--sft", "num_eval_examples=16",
            "--rm", "num_train_pairs=256", "--rm", "num_eval_pairs=32", "--rl", "num_train_prompts=64"]
    docs = tmp_path / "results.md"
    code = main(["demo", "--output-dir", str(tmp_path / "many"), "--seeds", "0-1", "--write-docs", str(docs),
                 "--no-progress", *tiny])
    assert code == 0
    out = capsys.readouterr().out
    assert "seed 1:" in out and "after SFT ->" in out and "after RL" in out
    results = [json.loads((tmp_path / "many" / f"seed_{s}" / "demo_result.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in results] == [0, 1] and results[1]["rl_steps"] == 2
    assert 0.0 <= results[1]["after_rl"]["eval/accuracy"] <= 1.0
    text = docs.read_text()
    import torch
    import transformers

    for needle in ("| 0 |", "| 1 |", f"torch {torch.__version__}", f"transformers {transformers.__version__}",
                   "fastrm commit", "--seeds 0-1"):
        assert needle in text, needle

    assert main(["demo", "--output-dir", str(tmp_path / "one"), "--seed", "1", "--no-progress", *tiny]) == 0
    alone = json.loads((tmp_path / "one" / "demo_result.json").read_text())
    for key in ("rm_heldout_pair_accuracy", "after_sft", "after_rl"):
        assert alone[key] == results[1][key], key
    assert (tmp_path / "one" / "rl" / "latest").is_file()


def test_ppo_cli_reports_bad_settings(capsys):
    from fastrm.cli import main

    assert main(["ppo", "advantage=magic"]) == 2
    assert "advantage" in capsys.readouterr().err


def test_conversational_prompts_are_rendered_with_the_chat_template(tmp_path):
    tokenizer = load_tokenizer("embedded")
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}={% endif %}")
    tokenizer.save_pretrained(tmp_path / "tok")
    rows = [{"prompt": [{"role": "user", "content": "12+3"}], "difficulty": 1},
            {"messages": [{"role": "system", "content": "1"}, {"role": "user", "content": "+4"}]},
            {"prompt": "7+1="}, {"prompt": "<bos>2+2="}]  # the last one rendered by its author, BOS included
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    trainer = rl_trainer(tmp_path / "run", f"tokenizer={tmp_path / 'tok'}", f"train_data={tmp_path / 'prompts.jsonl'}",
                         "advantage=rloo", "reward=rule", "batch_size=2", reward_fn=answer_length)
    assert [r["prompt"] for r in trainer.train_rows] == ["<bos>12+3=", "<bos>1+4=", "7+1=", "<bos>2+2="]
    assert trainer.train_rows[0]["difficulty"] == 1.0
    # what the policy sees: exactly one BOS, first, whether the template, the tokenizer or both wrote it
    from fastrm.generation import encode_prompts

    encoded = encode_prompts(trainer.tokenizer, [r["prompt"] for r in trainer.train_rows], "cpu")
    bos = trainer.tokenizer.bos_token_id
    for ids, mask in zip(encoded["input_ids"].tolist(), encoded["attention_mask"].tolist()):
        real = [t for t, m in zip(ids, mask) if m]
        assert real[0] == bos and real.count(bos) == 1, real
    row = trainer.train_step()
    assert math.isfinite(float(row["loss/policy"]))


@pytest.mark.parametrize("row,match", [
    ({"prompt": [{"role": "user"}]}, "prompts.jsonl, line 1: 'prompt'\\[0\\] is missing 'content'"),
    ({"question": "1+1="}, "prompts.jsonl, line 1: needs 'prompt'"),
])
def test_bad_prompt_rows_name_the_file_and_row(tmp_path, row, match):
    (tmp_path / "prompts.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        rl_trainer(tmp_path / "run", f"train_data={tmp_path / 'prompts.jsonl'}", "reward=rule", "advantage=rloo")
