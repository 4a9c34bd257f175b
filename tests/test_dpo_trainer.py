"""``fastrm dpo`` on tiny models: it trains and logs TRL's metrics; packed and padded pairs give the same sequence
log-probs; resume is bitwise; the reference (frozen copy, LoRA adapters disabled, precomputed) is the initial policy;
SimPO runs without one; every setting is validated; K-way rows become pairs; and 2 SGD steps equal TRL 1.16's
DPOTrainer on the same model and data."""

import json
import math

import pytest
import torch

from fastrm import lora, optim, packing
from fastrm.layout import PaddedBatch, enable_varlen
from fastrm.config import ConfigError, load_config
from fastrm.trainers.dpo import DPOConfig, DPOTrainer, ranking_to_pairs, sequence_logps

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "log_steps=1", "backend=torch"]


def dpo_trainer(tmp_path, *overrides, train_data=None):
    args = TINY + ["num_train_pairs=48", "num_eval_pairs=16", "batch_size=8", "max_steps=4", "eval_steps=4",
                   "save_steps=2", "eval_generate=4", "lr=1e-2", f"output_dir={tmp_path}", *overrides]
    return DPOTrainer(load_config(DPOConfig, None, args), train_data=train_data).setup()


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trains_and_logs_trl_metrics(tmp_path):
    trainer = dpo_trainer(tmp_path)
    assert trainer.packing.mode == "shared" and trainer.ref is not None
    before = params(trainer.model)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 4
    assert abs(train_rows[0]["loss"] - math.log(2)) < 1e-5  # step 1: the policy is its reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(math.isfinite(r[key]) for r in train_rows), key
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and {"eval/rewards/accuracies", "eval/task_accuracy"} <= set(evals[-1])
    assert any(not torch.equal(before[k], v) for k, v in params(trainer.model).items())
    ref = params(trainer.ref)  # the frozen copy did not move
    assert all(torch.equal(before[k], ref[k]) for k in before)
    assert (tmp_path / "final" / "config.json").is_file()


def test_packed_and_padded_sequence_logps_are_equal(tmp_path):
    trainer = dpo_trainer(tmp_path / "a", "max_steps=1")
    examples = trainer.train_examples[:6]
    packed = sequence_logps(trainer.model, trainer.collate(examples))
    trainer.packing = packing.Packing("padded", "test")
    batch = trainer.collate(examples)
    assert isinstance(batch.sequences, PaddedBatch)
    padded = sequence_logps(trainer.model, batch)
    # float32 sums of ~10 log-probs, each from a different attention layout: a few float32 ulps of the sums
    ulps = 64 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(packed, padded, rtol=0, atol=ulps * padded.abs().max().item())
    # the completion tokens only: a sequence's log-prob equals the sum over its completion tokens by hand
    e = examples[0]
    ids = torch.tensor([e["chosen_ids"]])
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
    by_hand = logits.gather(1, ids[0, 1:, None])[e["prompt_len"] - 1:].sum()
    torch.testing.assert_close(padded[0], by_hand, rtol=0, atol=ulps * by_hand.abs().item())


def test_resume_continues_exactly(tmp_path):
    straight = dpo_trainer(tmp_path / "a", "eval_generate=0")
    straight.train()
    first = dpo_trainer(tmp_path / "b", "eval_generate=0")
    first.config.max_steps = 2  # stop half-way, as a killed run would
    first.train()
    resumed = dpo_trainer(tmp_path / "b", "eval_generate=0", "resume=true")
    assert resumed.step == 2
    resumed.train()
    a, b = params(straight.model), params(resumed.model)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    # the reference of the resumed run is the initial policy, not the checkpoint it resumed from
    assert all(torch.equal(straight.ref.state_dict()[k], v) for k, v in resumed.ref.state_dict().items())


def test_precomputed_reference_trains_as_the_frozen_copy(tmp_path):
    live = dpo_trainer(tmp_path / "a", "max_steps=2")
    live.train()
    pre = dpo_trainer(tmp_path / "b", "max_steps=2", "precompute_ref_logprobs=true")
    assert pre.ref is None and "ref_chosen_logps" in pre.train_examples[0]
    init = params(pre.model)  # the same seed: the live run's initial weights too
    assert all(torch.equal(init[k], v) for k, v in params(live.ref).items())
    pre.train()
    # The reference log-probs come from other packed rows (other batch neighbours): float32 rounding of the
    # sums, through 2 AdamW steps of lr 1e-2 whose per-weight step is sign-like: compare the trained weights loosely
    # against how far they moved.
    a, b = params(live.model), params(pre.model)
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05 * moved


def test_simpo_runs_without_a_reference(tmp_path):
    trainer = dpo_trainer(tmp_path, "loss_type=simpo", "beta=2.0", "simpo_gamma=0.5", "max_steps=2")
    assert trainer.ref is None and trainer.ref_p is None
    trainer.train()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss"]) and row["loss"] > 0


@pytest.mark.parametrize("loss_type,extra", [("ipo", []), ("hinge", []), ("robust", ["label_smoothing=0.1"]),
                                             ("sigmoid", ["label_smoothing=0.1"])])
def test_other_loss_types_take_a_step(tmp_path, loss_type, extra):
    trainer = dpo_trainer(tmp_path, f"loss_type={loss_type}", "max_steps=1", "eval_generate=0", *extra)
    trainer.train()
    assert trainer.step == 1


@pytest.mark.parametrize("override,match", [
    ("loss_type=kto", "setting loss_type='kto'"),
    ("beta=0", "setting beta=0.0"),
    ("label_smoothing=0.5", "setting label_smoothing=0.5"),
    ("loss_type=hinge label_smoothing=0.1", "setting label_smoothing=0.1"),
    ("loss_type=simpo precompute_ref_logprobs=true", "setting precompute_ref_logprobs=True"),
    ("annotator_noise=0.7", "setting annotator_noise=0.7"),
    ("eval_generate=-1", "setting eval_generate=-1"),
])
def test_bad_settings_name_the_setting(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(DPOConfig, None, TINY + [f"output_dir={tmp_path}", *override.split()])


def test_ranking_rows_become_pairs_of_the_best(tmp_path):
    rows = [{"prompt": "1+1=", "responses": ["3", "2", "5"], "ranks": [1, 0, 1]},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    assert ranking_to_pairs(rows) == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                                      {"prompt": "1+1=", "chosen": "2", "rejected": "5"}, rows[1]]
    path = tmp_path / "k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:1] * 6))
    trainer = dpo_trainer(tmp_path / "run", f"train_data={path}", "eval_fraction=0", "max_steps=1")
    assert len(trainer.train_examples) == 12
    trainer.train()


def test_lora_reference_is_the_policy_without_adapters(tmp_path_factory):
    pytest.importorskip("peft")
    from families import build_checkpoint

    path = build_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    out = tmp_path_factory.mktemp("run")
    trainer = DPOTrainer(load_config(DPOConfig, None, [
        "tensorboard=false", "progress=false", "device=cpu", "backend=torch", f"model.name_or_path={path}",
        "lora.r=4", "lora.dropout=0", "max_length=40", "max_steps=2", "save_steps=2", "eval_steps=2",
        "batch_size=4", "lr=1e-2", "warmup_ratio=0", "num_train_pairs=16", "num_eval_pairs=4", "eval_generate=0",
        f"output_dir={out}"])).setup()
    assert trainer.ref is None and trainer.ref_p is None and lora.is_peft(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = trainer.collate(trainer.train_examples[:4])
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if "lora_" not in n)
    # the reference the trainer uses = the untouched base checkpoint's log-probs
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path)
    base.fastrm_logits_from_head, base.fastrm_logit_softcap = True, None
    enable_varlen(base)  # the batch is a packed row, as the trainer's probe chose
    with torch.no_grad():
        ref = trainer._reference_logps(batch)
        want = sequence_logps(base, batch)
        policy = sequence_logps(trainer.model, batch)
    torch.testing.assert_close(ref, want, rtol=0, atol=64 * torch.finfo(torch.float32).eps * want.abs().max().item())
    assert not torch.allclose(policy, want)


def test_cli_lists_every_setting_and_trains(tmp_path, capsys):
    from fastrm.cli import run_command

    with pytest.raises(SystemExit) as exit_:
        run_command(["dpo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in ("loss_type", "beta", "label_smoothing", "simpo_gamma", "precompute_ref_logprobs", "max_length",
                 "lora.r", "num_train_pairs"):
        assert f"  {name} " in text, name
    code = run_command(["dpo", *TINY, "num_train_pairs=16", "num_eval_pairs=8", "batch_size=8", "max_steps=1",
                        "eval_generate=2", f"output_dir={tmp_path}"])
    assert code == 0
    assert "held-out:" in capsys.readouterr().out
    assert run_command(["dpo", "beta=-1", f"output_dir={tmp_path / 'x'}"]) == 2


# ---- against TRL's DPOTrainer ---------------------------------------------------------------------------------------

# 2 plain-SGD steps (lr 1, no clipping) from the same weights on the same 4 pairs (one full batch a step, so the
# sampling order cannot differ). fastrm's packed rows with fused log-probs and TRL's padded forward compute the same
# float32 sums in another order: their gradients differ by float32 rounding, a few eps32 relative through this
# 1-layer model's ~10 sums deep, so the weights end within (64 eps32) x (how far the steps moved them) of each other
# (measured: 0.7e-6 and 0.7e-6 of the move for sigmoid and ipo). A wrong loss, reference, label mask or EOS changes
# the gradient itself: an error of the order of the move.
TRL_REL_TOL = 64 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_two_sgd_steps_equal_trl_dpo_trainer(tmp_path, monkeypatch, loss_type):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastrm.tasks.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = tmp_path / "init"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [{"prompt": "3+4=", "chosen": "7", "rejected": "8"}, {"prompt": "2+2=", "chosen": "4", "rejected": "22"},
            {"prompt": "9+1=", "chosen": "10", "rejected": "1"}, {"prompt": "5+0=", "chosen": "5", "rejected": "50"}]
    beta, lr = 0.5, 1.0

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, learning_rate=lr, optim="sgd",
                         lr_scheduler_type="constant", report_to=[], logging_steps=1, save_strategy="no",
                         use_cpu=True, bf16=False, seed=0, disable_tqdm=True, per_device_train_batch_size=4,
                         max_grad_norm=1e9, beta=beta, loss_type=[loss_type], max_length=64)
    theirs = trl.DPOTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    init = params(theirs.model)
    theirs.train()

    monkeypatch.setattr(optim, "make_optimizer", lambda params_, *a, **k: torch.optim.SGD(
        [p for p in params_ if p.requires_grad], lr=lr))
    ours = DPOTrainer(load_config(DPOConfig, None, [
        f"model.name_or_path={model_dir}", "tensorboard=false", "progress=false", "device=cpu", "backend=torch",
        "mixed_precision=no", "max_steps=2", "batch_size=4", f"lr={lr}", "lr_scheduler=constant", "warmup_steps=0",
        "warmup_ratio=0", "max_grad_norm=1e9", f"beta={beta}", f"loss_type={loss_type}", "max_length=64",
        "eval_fraction=0", "save_steps=2", f"output_dir={tmp_path / 'ours'}"]), train_data=rows).setup()
    assert ours.packing.mode == "shared"
    start = params(ours.model)
    for k in init:
        torch.testing.assert_close(start[k], init[k], rtol=0, atol=0)
    ours.train()
    end_theirs, end_ours = params(theirs.model), params(ours.model)
    moved = max((end_theirs[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, "the parameters did not move: the comparison would prove nothing"
    worst = max((end_ours[k] - end_theirs[k]).abs().max().item() for k in init)
    print(f"{loss_type}: max |fastrm - TRL| = {worst:.2e}, parameters moved up to {moved:.2e}")
    assert worst < TRL_REL_TOL * moved, f"max |fastrm - TRL| = {worst:.2e} (parameters moved up to {moved:.2e})"
