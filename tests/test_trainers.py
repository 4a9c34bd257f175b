"""Reward-model and SFT trainers on a tiny model: saving/loading, padded vs packed, learning, resume,
8-bit optimizer, non-finite stop, configs and bad data (checkpoint failures: test_checkpoints.py)."""

import json

import pytest
import torch

from fastrm import checkpoint as ckpt
from fastrm import guard
from fastrm.config import ConfigError, load_config
from fastrm.layout import collate_preference, collate_sft
from fastrm.models import reward_scores, token_logprobs
from fastrm.trainers.reward_model import RewardConfig, RewardTrainer
from fastrm.trainers.sft import SFTConfig, SFTTrainer

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "log_steps=1"]


def reward_trainer(tmp_path, *overrides):
    args = TINY + ["num_train_pairs=96", "num_eval_pairs=32", "batch_size=8", "max_steps=6", "eval_steps=3",
                   "save_steps=3", f"output_dir={tmp_path}", *overrides]
    return RewardTrainer(load_config(RewardConfig, None, args)).setup()


def sft_trainer(tmp_path, *overrides):
    args = TINY + ["num_train_examples=96", "num_eval_examples=16", "batch_size=8", "max_steps=6", "eval_steps=6",
                   "save_steps=3", "eval_generate=4", f"output_dir={tmp_path}", *overrides]
    return SFTTrainer(load_config(SFTConfig, None, args)).setup()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- configs -------------------------------------------------------------------------------------------------

def test_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("lr: 0.01\nbatch_size: 16\nmodel:\n  hidden_size: 48\n")
    config = load_config(RewardConfig, path, ["batch_size=4", "model.num_heads=3"])
    assert (config.lr, config.batch_size, config.model.hidden_size, config.model.num_heads) == (0.01, 4, 48, 3)


def test_tiny_preset_is_a_layer_under_the_users_settings(tmp_path):
    from fastrm.trainers.rl import RLConfig

    tiny = load_config(RewardConfig)  # model.name_or_path=tiny: the embedded task's small-model settings
    assert (tiny.preset, tiny.lr, tiny.max_length, tiny.batch_size, tiny.warmup_steps) == ("auto", 2e-3, 32, 64, 30)
    checkpoint = tmp_path / "checkpoint"  # settings check that a model folder exists, not what it holds
    checkpoint.mkdir()
    pretrained = load_config(RewardConfig, None, [f"model.name_or_path={checkpoint}"])  # the global defaults
    assert (pretrained.lr, pretrained.max_length, pretrained.batch_size, pretrained.warmup_steps) == (1e-5, 1024, 8, 0)
    assert pretrained.warmup_ratio > 0 and pretrained.tokenizer == "auto"
    path = tmp_path / "rm.yaml"
    path.write_text("lr: 0.01\nmax_length: 48\n")
    config = load_config(RewardConfig, path, ["max_length=64"])  # YAML and overrides win over the preset
    assert (config.lr, config.max_length, config.batch_size) == (0.01, 64, 64)
    assert load_config(RewardConfig, None, ["preset=none"]).lr == 1e-5  # the tiny model without its preset
    forced = load_config(SFTConfig, None, ["preset=tiny", f"model.name_or_path={checkpoint}"])
    assert (forced.lr, forced.max_length) == (3e-3, 32)
    assert load_config(SFTConfig, None, [f"model.name_or_path={checkpoint}"]).lr == 2e-5
    rl_tiny = load_config(RLConfig, None, ["reward=rule"])
    assert (rl_tiny.lr, rl_tiny.max_new_tokens, rl_tiny.batch_size) == (1e-4, 6, 16)
    rl = load_config(RLConfig, None, [f"model.name_or_path={checkpoint}", "reward=rule"])
    assert (rl.lr, rl.max_new_tokens) == (1e-6, 256)
    with pytest.raises(ConfigError, match="setting preset='small'"):
        load_config(RewardConfig, None, ["preset=small"])


@pytest.mark.parametrize("override,match", [
    ("lr=fast", "setting 'lr'"),
    ("nope=1", "setting 'nope'"),
    ("lr=-1", "setting lr=-1.0: must be > 0"),
    ("truncation=cut", "setting truncation='cut'"),
    ("model.hidden_size=30", "model.hidden_size=30: must be divisible by model.num_heads=4"),
    ("optimizer=sgd", "setting optimizer='sgd'"),
    ("batch_size", "overrides must look like key=value"),
])
def test_bad_config_names_the_setting(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RewardConfig, None, [override])


# ---- models --------------------------------------------------------------------------------------------------

def test_saved_reward_model_loads_with_auto_class_and_scores_the_same(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trainer = reward_trainer(tmp_path, "max_steps=2", "save_steps=2")
    trainer.train()
    batch = trainer.collate(trainer.eval_examples[:8])  # packed
    padded = collate_preference(trainer.eval_examples[:8], trainer.tokenizer.pad_token_id).sequences
    trainer.model.eval()
    with torch.no_grad():
        ours = reward_scores(trainer.model, batch.sequences)
    loaded = AutoModelForSequenceClassification.from_pretrained(trainer.last_checkpoint, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(trainer.last_checkpoint)
    assert tokenizer("3+4=")["input_ids"] == trainer.tokenizer("3+4=")["input_ids"]
    with torch.no_grad():
        theirs = loaded(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_packed_and_padded_rewards_are_equal(tmp_path):
    trainer = reward_trainer(tmp_path)
    examples = trainer.train_examples[:16]
    pad = trainer.tokenizer.pad_token_id
    trainer.model.eval()
    with torch.no_grad():
        packed = reward_scores(trainer.model, collate_preference(examples, pad, "packed").sequences)
        padded = reward_scores(trainer.model, collate_preference(examples, pad).sequences)
    assert packed.shape == (32,)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert packed.std() > 0  # not a constant function, or equality would prove nothing


def test_token_logprobs_match_model_logits(tmp_path):
    trainer = sft_trainer(tmp_path)
    for mode in ("packed", "padded"):
        batch = collate_sft(trainer.train_examples[:5], trainer.tokenizer.pad_token_id, mode)
        with torch.no_grad():
            ours = token_logprobs(trainer.model, batch)  # the padded layout, whatever the batch's
            kwargs = {k: getattr(batch, k) for k in ("attention_mask", "position_ids")
                      if getattr(batch, k, None) is not None}
            logits = trainer.model(input_ids=batch.input_ids, use_cache=False, **kwargs).logits
        labels = batch.labels[:, 1:]
        ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ref = torch.where(labels != -100, ref, 0.0)
        if mode == "packed":
            ref = batch.unpack(ref)
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
        assert (labels != -100).sum() > 0


# ---- training ------------------------------------------------------------------------------------------------

def test_reward_training_reduces_loss_and_logs_trl_metrics(tmp_path):
    trainer = reward_trainer(tmp_path, "max_steps=12", "lr=5e-3")
    batch = trainer.collate(trainer.train_examples[:32])
    with torch.no_grad():
        before = trainer.compute_loss(batch)[0].item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(batch)[0].item()
    assert after < before
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "throughput/tokens_per_s"):
        assert key in train_rows[-1]
    assert any("eval/accuracy" in r for r in rows)


def test_sft_training_reduces_loss_and_scores_by_the_truth(tmp_path):
    trainer = sft_trainer(tmp_path, "max_steps=10")
    batch = trainer.collate(trainer.train_examples[:32])
    with torch.no_grad():
        before = trainer.compute_loss(batch)[0].item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(batch)[0].item()
    assert after < before
    result = trainer.evaluate()
    assert 0.0 <= result["eval/task_accuracy"] <= 1.0 and result["eval/loss"] > 0


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tmp_path):
    plain = sft_trainer(tmp_path / "a")
    checkpointed = sft_trainer(tmp_path / "b", "model.gradient_checkpointing=true")
    checkpointed.model.load_state_dict(plain.model.state_dict())
    batch = plain.collate(plain.train_examples[:8])
    losses = []
    for trainer in (plain, checkpointed):
        trainer.model.train()
        loss = trainer.compute_loss(batch)[0]
        loss.backward()
        losses.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for g0, g1 in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
    assert checkpointed.model.is_gradient_checkpointing


def test_sft_loss_is_on_completion_tokens_only(tmp_path):
    trainer = sft_trainer(tmp_path)
    example = trainer.train_examples[0]
    batch = trainer.collate([example])
    n_completion = sum(1 for x in example["labels"][1:] if x != -100)
    assert 0 < n_completion < len(example["input_ids"]) - 1  # the prompt is masked out
    assert trainer.compute_loss(batch)[1]["num_tokens"].item() == n_completion


def test_kway_ranking_data_trains_with_ranking_loss(tmp_path):
    from fastrm.tasks.arithmetic import make_ranking_data

    path = tmp_path / "rank.jsonl"
    rows = make_ranking_data(48, k=4, seed=1, max_level=0)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    trainer = reward_trainer(tmp_path / "run", f"train_data={path}", "eval_fraction=0.25", "max_steps=3")
    assert trainer.data_format == "ranking"
    trainer.train()
    assert trainer.step == 3


@pytest.mark.parametrize("make", [reward_trainer, sft_trainer])
def test_resume_continues_exactly(tmp_path, make):
    straight = make(tmp_path / "a", "max_steps=6", "save_steps=3")
    straight.train()

    first = make(tmp_path / "b", "max_steps=6", "save_steps=3")
    first.config.max_steps = 3  # stop half-way, as a killed run would
    first.train()
    resumed = make(tmp_path / "b", "max_steps=6", "save_steps=3", "resume=true")
    assert resumed.step == 3
    resumed.train()
    a, b = params(straight.model), params(resumed.model)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    assert params(first.model).keys() == a.keys()


def test_adamw8bit_optimizer_on_cpu(tmp_path):
    trainer = reward_trainer(tmp_path, "optimizer=adamw8bit", "max_steps=2", "model.hidden_size=256",
                             "model.num_heads=4")
    import bitsandbytes as bnb

    assert isinstance(trainer.optimizer, bnb.optim.AdamW8bit)
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # bitsandbytes keeps 8-bit states for tensors of >= 4096 elements
    states = [s for s in trainer.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = reward_trainer(tmp_path, "max_steps=8", "save_steps=3")
    real = trainer.compute_loss

    def poisoned(batch):
        loss, metrics = real(batch)
        return (loss * float("nan") if trainer.step == 4 else loss), metrics

    monkeypatch.setattr(trainer, "compute_loss", poisoned)
    with pytest.raises(guard.NonFiniteLossError, match="non-finite loss.* at step 5 .*checkpoint-3"):
        trainer.train()
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-3"
    state = ckpt.load_trainer_state(tmp_path / "checkpoint-3")
    assert state["step"] == 3
    resumed = reward_trainer(tmp_path, "max_steps=8", "resume=true")
    assert resumed.step == 3
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_malformed_data_names_file_and_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl, line 2"):
        reward_trainer(tmp_path / "run", f"train_data={path}")
    trainer = reward_trainer(tmp_path / "run2", f"train_data={path}", "skip_malformed=true", "eval_fraction=0")
    assert len(trainer.train_examples) == 1


def test_cli_entry_points(tmp_path, capsys):
    from fastrm.cli import main

    assert main(["train-rm", "lr=-1"]) == 2
    assert "setting lr=-1.0" in capsys.readouterr().err
    code = main(["sft", *TINY, "num_train_examples=32", "num_eval_examples=8", "batch_size=8", "max_steps=2",
                 "eval_generate=2", f"output_dir={tmp_path}"])
    assert code == 0
    assert "eval/task_accuracy" in capsys.readouterr().out
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()


def test_mixed_precision_no_survives_yaml():
    """YAML 1.1 reads a bare ``no`` as false; the setting must still mean "no mixed precision"."""
    from fastrm.trainers.rl import RLConfig

    assert load_config(RewardConfig, None, ["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(RLConfig, None, ["mixed_precision=no", "reward=rule"]).mixed_precision == "no"
