"""No redundant work in the RL trainer, and every second of a step in a timing/* metric: the on-policy update takes
its old log-probs from its own forward (and equals the path with a separate forward), no reference model or
forward without a KL term, the step's timings cover its wall time."""

import dataclasses
import json
import time

import pytest
import torch

from fastrm.config import load_config
from fastrm.trainers.rl import RLConfig, RLTrainer

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "batch_size=3", "num_samples=2", "max_new_tokens=4",
        "num_train_prompts=12", "num_eval_prompts=4", "backend=torch", "reward=rule", "advantage=grpo"]
PHASES = ("generate", "logprobs", "score", "advantages", "update", "optimizer", "checks", "logging")


def answer_length(prompts, completions):
    return [float(len(c)) for c in completions]


def rl_trainer(tmp_path, *overrides):
    args = TINY + ["eval_steps=1000", "save_steps=1000", f"output_dir={tmp_path}", *overrides]
    return RLTrainer(load_config(RLConfig, None, args), reward_fn=answer_length).setup()


def counting_logprobs(trainer, monkeypatch) -> list:
    """The models each log-prob forward ran on: 'policy' or 'ref'."""
    calls, original = [], trainer._logprobs

    def counted(model, *args, **kwargs):
        calls.append("ref" if model is trainer.ref_p else "policy")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "_logprobs", counted)
    return calls


@pytest.mark.parametrize("kl", ["k3 in the loss", "none"])
def test_on_policy_update_equals_the_path_with_a_separate_old_forward(tmp_path, monkeypatch, kl):
    settings = ["kl_in=loss", "kl_estimator=k3", "kl_coef=0.3"] if kl != "none" else ["kl_coef=0"]
    trainer = rl_trainer(tmp_path, "ppo_epochs=1", "num_minibatches=1", "temperature=0.7", *settings)
    assert trainer.on_policy()
    assert (trainer.ref is None) == (kl == "none")  # no KL term: no reference copy at all
    with torch.no_grad():  # the policy away from the reference, so the KL term is not 0
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    calls = counting_logprobs(trainer, monkeypatch)
    ro = trainer.rollout(trainer.train_rows[:3])
    assert calls == ([] if kl == "none" else ["ref"])  # neither an old-log-prob nor (kl_coef=0) a reference forward
    assert ro.old_logprobs is None

    # the old path: a separate no-grad forward of the sampling policy for the old log-probs
    trainer.policy.eval()
    with torch.no_grad():
        old = trainer._logprobs(trainer.policy_p, ro.batch, ro.prompt_len)
    old_path = dataclasses.replace(ro, seq_kl=ro.seq_kl.clone(), old_logprobs=old)
    trainer.policy.train()
    idx = torch.randperm(ro.mask.shape[0], generator=torch.Generator().manual_seed(0))
    results = []
    for r in (ro, old_path):
        trainer.policy.zero_grad()
        loss, metrics = trainer.compute_loss(r, idx)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in trainer.policy.parameters() if p.grad is not None])
        results.append((loss.detach(), grads, metrics))
    (loss, grads, metrics), (old_loss, old_grads, old_metrics) = results
    # Both take the same forward of the same weights on the same batch (dropout is 0): the old log-probs equal
    # the current ones to float32 rounding of the log-prob (a few ulps of |log p| <= ~20).
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(loss, old_loss, rtol=64 * eps, atol=64 * eps)
    torch.testing.assert_close(grads, old_grads, rtol=64 * eps, atol=64 * eps * old_grads.abs().max().item())
    assert float(grads.abs().max()) > 0
    torch.testing.assert_close(metrics["policy/ratio"], torch.tensor(1.0))
    if kl != "none":
        # the rollout's KL statistic (for the log and the adaptive controller), measured by the update instead
        k3 = trainer._logprobs(trainer.ref_p, ro.batch, ro.prompt_len) - old_path.old_logprobs
        seq_kl = torch.where(ro.mask != 0, k3.exp() - k3 - 1, 0.0).sum(1)
        torch.testing.assert_close(ro.seq_kl, seq_kl, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(metrics["objective/kl"], seq_kl.mean(), rtol=1e-4, atol=1e-6)
        assert float(seq_kl.mean()) > 0


def test_off_policy_settings_keep_the_separate_old_forward(tmp_path, monkeypatch):
    for i, extra in enumerate([["ppo_epochs=2"], ["ppo_epochs=1", "num_minibatches=2"],
                               ["ppo_epochs=1", "kl_in=reward", "kl_coef=0.1"]]):
        trainer = rl_trainer(tmp_path / str(i), *extra)
        assert not trainer.on_policy()
        calls = counting_logprobs(trainer, monkeypatch)
        ro = trainer.rollout(trainer.train_rows[:3])
        assert calls == ["policy", "ref"] and ro.old_logprobs is not None, extra


def test_adaptive_kl_keeps_the_reference_at_kl_coef_0(tmp_path):
    trainer = rl_trainer(tmp_path, "kl_coef=0", "adaptive_kl=true")
    assert trainer.uses_reference() and trainer.ref is not None


def test_the_timings_cover_the_step(tmp_path):
    """Every phase of a step is timed: the timing/* metrics sum to the step's wall time (timing/step), which is
    the wall time of train() less what ends it (the last step's logging, the final save)."""
    trainer = rl_trainer(tmp_path / "run", "max_steps=3", "log_steps=1", "eval_steps=2", "save_steps=2",
                         "ppo_epochs=1", "kl_in=loss", "kl_coef=0.1")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/step" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["timing/logging"] > 0  # step 2 evaluated and saved: in step 3's row
    for row in rows:
        parts = sum(row[f"timing/{p}"] for p in PHASES)
        assert 0.95 * row["timing/step"] <= parts <= row["timing/step"], row
    assert sum(r["timing/step"] for r in rows) <= wall
