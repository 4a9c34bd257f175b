"""Multi-process (gloo, CPU) training through torchrun, DDP and FSDP2: 2 processes with a per-device batch of 4
end at the same parameters as 1 process with a batch of 8 on the same data; only rank 0 writes; checkpoints
resume on another number of ranks and in another mode. Each torchrun launch is bounded by a timeout."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastrm.config import ConfigError, load_config
from fastrm.trainers.reward import RewardConfig
from test_trainers import TINY, reward_trainer, sft_trainer

TIMEOUT_S = 120  # one 2-process launch of 3 tiny steps takes ~15 s on 2 CPU cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(command: str, args: list[str], nproc: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "fastrm", command, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def final_params(out_dir, step):
    return load_file(str(out_dir / f"checkpoint-{step}" / "model.safetensors"))


def assert_same_params(theirs, ours):
    assert theirs.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], atol=1e-5, rtol=1e-5, msg=key)


def assert_only_rank0_wrote(out_dir, steps):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))  # one writer: no duplicate rows
    assert sorted(p.name for p in out_dir.iterdir() if "checkpoint" in p.name) == [f"checkpoint-{steps}"]
    assert not list(out_dir.glob(".tmp-*"))


RUN = {"reward": (reward_trainer, "train-rm", ["num_train_pairs=96", "num_eval_pairs=32"]),
       "sft": (sft_trainer, "sft", ["num_train_examples=96", "num_eval_examples=16", "eval_generate=4"])}


@pytest.mark.parametrize("kind,mode,batch,accum", [
    ("reward", "ddp", 8, 1), ("sft", "ddp", 8, 1),
    ("reward", "fsdp", 8, 1), ("sft", "fsdp", 8, 1),
    ("reward", "ddp", 4, 2), ("sft", "fsdp", 4, 2),  # gradient accumulation: no reduction on the first micro-batch
])
def test_two_processes_match_one_with_the_global_batch(tmp_path, kind, mode, batch, accum):
    steps = 3
    common = ["max_steps=3", "save_steps=3", "eval_steps=3", "warmup_steps=0", "optimizer=adamw",
              f"grad_accum_steps={accum}"]
    make, command, data = RUN[kind]
    single = make(tmp_path / "one", f"batch_size={batch}", *common)
    single.train()
    ours = final_params(tmp_path / "one", steps)

    torchrun(command, TINY + data + [f"batch_size={batch // 2}", f"distributed={mode}", *common,
                                     f"output_dir={tmp_path / 'two'}"])
    assert_same_params(final_params(tmp_path / "two", steps), ours)
    assert_only_rank0_wrote(tmp_path / "two", steps)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/loss" in row for row in rows)


def test_resume_on_two_processes_from_a_one_process_checkpoint(tmp_path):
    common = ["max_steps=4", "save_steps=2", "eval_steps=4", "warmup_steps=0", "optimizer=adamw",
              "lr_scheduler=constant"]
    full = reward_trainer(tmp_path / "full", "batch_size=8", *common)
    full.train()
    half = reward_trainer(tmp_path / "half", "batch_size=8", *common[1:], "max_steps=2")  # then stopped
    half.train()
    torchrun("train-rm", TINY + ["num_train_pairs=96", "num_eval_pairs=32", "batch_size=4", *common,
                                 f"output_dir={tmp_path / 'half'}", "resume=true"])
    assert_same_params(final_params(tmp_path / "half", 4), final_params(tmp_path / "full", 4))


def test_fsdp_checkpoint_is_whole_and_resumes_on_one_process(tmp_path):
    """FSDP gathers the shards into one ordinary checkpoint (weights and named optimizer state), which a
    single process resumes from and finishes exactly as an uninterrupted single-process run."""
    common = ["max_steps=4", "save_steps=2", "eval_steps=4", "warmup_steps=0", "optimizer=adamw",
              "lr_scheduler=constant"]
    full = reward_trainer(tmp_path / "full", "batch_size=8", *common)
    full.train()
    torchrun("train-rm", TINY + ["num_train_pairs=96", "num_eval_pairs=32", "batch_size=4", "distributed=fsdp",
                                 *common[1:], "max_steps=2", f"output_dir={tmp_path / 'half'}"])
    state = torch.load(tmp_path / "half" / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"]["format"] == "named"
    assert set(state["optimizer"]["state"]) == set(final_params(tmp_path / "half", 2))  # every weight trained
    resumed = reward_trainer(tmp_path / "half", "batch_size=8", *common, "resume=true")
    assert resumed.step == 2
    resumed.train()
    assert_same_params(final_params(tmp_path / "half", 4), final_params(tmp_path / "full", 4))


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
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), torch.tensor([1.0, 2.0]))
