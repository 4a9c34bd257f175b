"""Multi-process (gloo, CPU) training through torchrun, DDP and FSDP2: 2 processes with a per-device batch of 4
end at the same parameters as 1 process with a batch of 8 on the same data; only rank 0 writes; checkpoints
resume on another number of ranks and in another mode. Each torchrun launch is bounded by a timeout.

The equivalence tests train with SGD (tests/sgd_worker.py says why) and compare parameter updates with a tolerance
taken from the computation (:func:`assert_same_update`), so they hold on any machine."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sgd_worker import sgd
from test_rl import TINY as RL_TINY
from test_rl import params, rl_trainer
from test_trainers import TINY, reward_trainer, sft_trainer

from fastrm import advantages as fadv
from fastrm import optim
from fastrm.checkpoint import load_trainer_state
from fastrm.config import ConfigError, load_config
from fastrm.trainers.reward_model import RewardConfig

TESTS = Path(__file__).parent

# A guard against a hung rendezvous or collective, not a speed check: one launch of 3 tiny steps takes ~15 s on 2
# quiet cores and several times that on a loaded machine.
TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def use_sgd(monkeypatch):
    """In-process trainers built after this use SGD, as tests/sgd_worker.py does under torchrun."""
    monkeypatch.setattr(optim, "make_optimizer", sgd)


def torchrun(command: str, args: list[str], nproc: int = 2, optimizer: str = "configured"):
    """``torchrun ... -m fastrm <command> <args>``; a command ending in .py runs that script instead;
    ``optimizer="sgd"``: through tests/sgd_worker.py."""
    if command.endswith(".py"):
        target = [command]
    elif optimizer == "sgd":
        target = [str(TESTS / "sgd_worker.py"), command]
    else:
        target = ["-m", "fastrm", command]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *target, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def final_params(out_dir, step):
    return load_file(str(out_dir / f"checkpoint-{step}" / "model.safetensors"))


UPDATE_RTOL = 1e-3
SGD_LR = "lr=0.05"  # moves weights well above their rounding (SGD steps are gradient-sized, AdamW's lr-sized)


def assert_same_update(theirs, ours, start, steps):
    """Two SGD runs from ``start`` whose gradients differ only in fp32 summation order end at the same weights:
    per tensor, within ``UPDATE_RTOL`` of its largest move plus the rounding of the stored weights (half an ulp
    per step, ``steps * eps * max|w|``).

    Why this bound: an SGD step (with momentum and clipping) is linear in the gradient, so reordering a sum moves
    a weight by a few fp32 ulps of the gradients' scale: about 1e-6 of the tensor's largest move (measured here
    at most 3e-6). A wrong shard, a missing or doubled average, a lost token weight or a dropped optimizer state
    changes the update by a sizeable fraction of itself, far above 1e-3. So the bound holds on any machine and
    still fails for any of those bugs."""
    assert theirs.keys() == ours.keys() == start.keys()
    eps = torch.finfo(torch.float32).eps
    moved = False
    for key in ours:
        move = (ours[key].double() - start[key].double()).abs().max().item()
        scale = max(ours[key].abs().max().item(), start[key].abs().max().item())
        moved |= move > 0
        atol = UPDATE_RTOL * move + steps * eps * scale
        torch.testing.assert_close(theirs[key], ours[key], atol=atol, rtol=0, msg=key)
    assert moved, "no weight moved: the comparison would prove nothing"


def assert_only_rank0_wrote(out_dir, steps):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # one writer: no duplicate rows
    assert sorted(p.name for p in out_dir.iterdir() if "checkpoint" in p.name) == [f"checkpoint-{steps}"]
    assert not list(out_dir.glob(".tmp-*"))


RUN = {"reward": (reward_trainer, "train-rm", ["num_train_pairs=96", "num_eval_pairs=32"]),
       "sft": (sft_trainer, "sft", ["num_train_examples=96", "num_eval_examples=16", "eval_generate=4"])}


@pytest.mark.parametrize("kind,mode,batch,accum,nproc", [
    ("reward", "ddp", 8, 1, 2), ("sft", "ddp", 8, 1, 2),
    ("reward", "fsdp", 8, 1, 2), ("sft", "fsdp", 8, 1, 2),
    ("reward", "ddp", 4, 2, 2), ("sft", "fsdp", 4, 2, 2),  # gradient accumulation: no reduction on micro-batch 1
    ("reward", "fsdp", 8, 1, 1),  # the 1-rank path (what one GPU runs under torchrun)
    ("sft", "fsdp-ckpt", 8, 1, 2),  # FSDP with activation (gradient) checkpointing
])
def test_two_processes_match_one_with_the_global_batch(tmp_path, use_sgd, kind, mode, batch, accum, nproc):
    steps = 3
    common = ["max_steps=3", "save_steps=3", "eval_steps=3", "warmup_steps=0", SGD_LR, f"grad_accum_steps={accum}"]
    if mode == "fsdp-ckpt":
        mode, common = "fsdp", [*common, "model.gradient_checkpointing=true"]
    make, command, data = RUN[kind]
    single = make(tmp_path / "one", f"batch_size={batch}", *common)
    start = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    single.train()
    ours = final_params(tmp_path / "one", steps)

    torchrun(command, TINY + data + [f"batch_size={batch // nproc}", f"distributed={mode}", *common,
                                     f"output_dir={tmp_path / 'two'}"], nproc=nproc, optimizer="sgd")
    assert_same_update(final_params(tmp_path / "two", steps), ours, {k: start[k] for k in ours}, steps)
    assert_only_rank0_wrote(tmp_path / "two", steps)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in row for row in rows)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_two_processes_from_a_one_process_checkpoint(tmp_path, use_sgd, mode):
    """Under fsdp the whole optimizer state (the momentum) of the checkpoint is re-sharded onto the ranks' parameter
    shards."""
    common = ["max_steps=4", "save_steps=2", "eval_steps=4", "warmup_steps=0", "lr_scheduler=constant", SGD_LR]
    full = reward_trainer(tmp_path / "full", "batch_size=8", *common)
    full.train()
    half = reward_trainer(tmp_path / "half", "batch_size=8", *common[1:], "max_steps=2")  # then stopped
    half.train()
    torchrun("train-rm", TINY + ["num_train_pairs=96", "num_eval_pairs=32", "batch_size=4", *common,
                                 f"distributed={mode}", f"output_dir={tmp_path / 'half'}", "resume=true"],
             optimizer="sgd")
    assert_same_update(final_params(tmp_path / "half", 4), final_params(tmp_path / "full", 4),
                       final_params(tmp_path / "full", 2), steps=2)


def test_fsdp_checkpoint_is_whole_and_resumes_on_one_process(tmp_path, use_sgd):
    """FSDP gathers the shards into one ordinary checkpoint (weights and named optimizer state), which a
    single process resumes from and finishes as an uninterrupted single-process run."""
    common = ["max_steps=4", "save_steps=2", "eval_steps=4", "warmup_steps=0", "lr_scheduler=constant", SGD_LR]
    full = reward_trainer(tmp_path / "full", "batch_size=8", *common)
    start = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
    full.train()
    torchrun("train-rm", TINY + ["num_train_pairs=96", "num_eval_pairs=32", "batch_size=4", "distributed=fsdp",
                                 *common[1:], "max_steps=2", f"output_dir={tmp_path / 'half'}"], optimizer="sgd")
    state = load_trainer_state(tmp_path / "half" / "checkpoint-2")
    assert state["optimizer"]["format"] == "named"
    assert set(state["optimizer"]["state"]) == set(final_params(tmp_path / "half", 2))  # every weight trained
    resumed = reward_trainer(tmp_path / "half", "batch_size=8", *common, "resume=true")
    assert resumed.step == 2
    resumed.train()
    ours = final_params(tmp_path / "full", 4)
    assert_same_update(final_params(tmp_path / "half", 4), ours, {k: start[k] for k in ours}, steps=4)


# ---- RL ----------------------------------------------------------------------------------------------------------

RL_COMMON = ["advantage=gae", "reward=rule", "reward_fn=rl_update_worker:answer_length", "lr=1e-2", "ppo_epochs=2",
             "num_minibatches=1", "mixed_precision=no", "entropy_coef=0.01", "kl_in=loss", "kl_coef=0.1", "seed=3"]


def save_rollout(ro, path):
    """What tests/rl_update_worker.py reads: the rollout ``ro`` and, for random scores and advantages, the
    one-process statistics (whitening, normalisation, baseline) its ranks must reproduce from their halves."""
    keys = ("batch", "prompt_len", "mask", "old_logprobs", "ref_logprobs", "values", "advantages", "returns")
    generator = torch.Generator().manual_seed(0)
    rows = ro.mask.shape[0]
    scores, advantages = torch.randn(rows, generator=generator), torch.randn(ro.mask.shape, generator=generator)
    saved = {"rollout": {k: getattr(ro, k) for k in keys}, "scores": scores, "advantages": advantages,
             "whitened": fadv.whiten_advantages(advantages, ro.mask)}
    for kind in ("batch", "running"):
        norm = fadv.RewardNormalizer(kind)
        norm(scores + 1.0)
        saved[f"normalized_{kind}"] = norm(scores)
    baseline = fadv.MovingAverageBaseline("moving", decay=0.5)
    baseline(scores + 1.0)
    saved["baselined"] = baseline(scores)
    torch.save(saved, path)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_update_on_two_ranks_equals_one_process(tmp_path, use_sgd, mode):
    """Each rank updates on half the rows of one rollout (halves with different token counts): policy and critic
    end where one process updating on the whole rollout ends. The worker also checks that whitening, score
    normalisation and the baseline over two ranks equal the one-process statistics of the whole batch."""
    from rl_update_worker import answer_length

    one = rl_trainer(tmp_path / "one", *RL_COMMON, reward_fn=answer_length)
    ro = one.rollout(one.train_rows[:3])  # 6 rows: 3 per rank
    ro.mask[0::2, 1:] = 0  # rank 0's half gets fewer tokens: token means need the global token count
    assert ro.mask[0::2].sum() != ro.mask[1::2].sum()
    save_rollout(ro, tmp_path / "rollout.pt")
    start_policy, start_value = params(one.policy), params(one.value)
    one.update(ro)

    torchrun(str(TESTS / "rl_update_worker.py"), [str(tmp_path / "rollout.pt"), *RL_TINY, *RL_COMMON,
                                                   f"distributed={mode}", f"output_dir={tmp_path / 'two'}"])
    assert_same_update(final_params(tmp_path / "two", 1), params(one.policy), start_policy, steps=2)
    state = load_trainer_state(tmp_path / "two" / "checkpoint-1")
    assert_same_update(state["value_model"], params(one.value), start_value, steps=2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_runs_on_two_ranks_and_resumes_on_one(tmp_path, mode):
    """``fastrm ppo`` on 2 ranks with a learned reward model (sharded too under fsdp) and a critic built on it:
    rollouts, update, greedy eval, one checkpoint; a single process then resumes it."""
    reward_trainer(tmp_path / "rm", "max_steps=1", "save_steps=1", "eval_steps=1").train()
    args = [*RL_TINY, "advantage=gae", "reward=both", "reward_fn=rl_update_worker:answer_length",
            f"reward_model_path={tmp_path / 'rm' / 'checkpoint-1'}", "value_model=reward", "optimizer=adamw",
            "max_steps=2", "save_steps=2", "eval_steps=2", "log_steps=1", f"output_dir={tmp_path / 'run'}"]
    torchrun("ppo", [*args, f"distributed={mode}"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "objective/kl" in r] == [1, 2]  # one writer
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]

    from rl_update_worker import answer_length

    resumed = rl_trainer(tmp_path / "run", *args[len(RL_TINY):], "max_steps=3", "resume=true",
                         reward_fn=answer_length)
    assert resumed.step == 2
    resumed.train()
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()


@pytest.mark.parametrize("overrides,match", [
    (["distributed=dp"], "setting distributed='dp'"),
    (["distributed=fsdp", "optimizer=adamw8bit"], "setting optimizer='adamw8bit'.*FSDP2"),
])
def test_distributed_setting_is_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RewardConfig, None, overrides)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_explicit_mode_without_torchrun_says_how_to_launch(tmp_path, mode):
    with pytest.raises(ConfigError, match="torchrun"):
        reward_trainer(tmp_path, f"distributed={mode}")


def test_one_process_helpers_are_identities():
    from fastrm import distributed

    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert list(distributed.shard_batches([1, 2, 3, 4, 5], 2)) == [([1, 2], 2), ([3, 4], 2), ([5], 1)]
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), torch.tensor([1.0, 2.0]))


def test_shard_batches_gives_every_rank_as_many_non_empty_batches(monkeypatch):
    """5 items, batch 2 per rank, 2 ranks: global batches [1,2,3,4] and [5]; rank 1 has nothing in the second,
    so it gets a stand-in with weight 0 (an FSDP forward needs every rank)."""
    from fastrm import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares[r] = list(distributed.shard_batches([1, 2, 3, 4, 5], 2))
    assert shares[0] == [([1, 3], 2), ([5], 1)]
    assert shares[1] == [([2, 4], 2), ([5], 0)]
    assert sum(w for s in shares.values() for _, w in s) == 5  # every item counted once


def test_demo_refuses_torchrun_and_names_the_commands(monkeypatch, capsys):
    from fastrm.cli import run_command

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert run_command(["demo"]) == 2
    assert "fastrm ppo" in capsys.readouterr().err
