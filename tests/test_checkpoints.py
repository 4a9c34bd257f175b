"""Never lose a run (issue 16), each failure of the issue reproduced: a fresh run in a used output folder, two runs
in one folder, a kill at any point of a save or of pruning, a diverged model (lr=1e10, an exploding checkpoint, a
reward of 1e38) never becoming ``latest``, a planted pickle, ``latest`` pointing out of the folder, a full disk, and
a resume with a changed lr. Kills fork the test process and SIGKILL the child at a chosen file operation; every wait
is bounded."""

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rl import TINY as RL_TINY
from test_rl import params, rl_trainer
from test_trainers import TINY, reward_trainer

from fastrm import checkpoint as ckpt
from fastrm import distributed, guard, models, optim
from fastrm.cli import main
from fastrm.config import ConfigError

RM = [*TINY, "num_train_pairs=96", "num_eval_pairs=32", "batch_size=8", "eval_steps=100"]
RL = [*RL_TINY, "reward=rule", "reward_fn=rl_update_worker:answer_length", "advantage=gae"]
WAIT_S = 60


def names(folder, prefix=ckpt.CHECKPOINT_PREFIX):
    return sorted((p.name for p in Path(folder).iterdir() if p.name.startswith(prefix)), key=lambda n: (len(n), n))


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


def all_finite(checkpoint):
    return all(torch.isfinite(t).all() for t in load_file(str(Path(checkpoint) / "model.safetensors")).values())


# ---- forked children -----------------------------------------------------------------------------------------------

def fork(fn) -> int:
    """Run ``fn()`` in a forked child (exit 0 if it returns, 1 if it raises); returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The child's wait status, within WAIT_S (killed after)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise TimeoutError(f"child {pid} still running after {WAIT_S} s")


def read_byte(fd) -> bytes:
    ready, _, _ = select.select([fd], [], [], WAIT_S)
    assert ready, "child did not answer"
    return os.read(fd, 1)


# ---- a fresh run in a used folder ----------------------------------------------------------------------------------

def test_fresh_run_in_a_used_folder_is_refused_and_resume_or_overwrite_say_what_to_do(tmp_path, capsys, caplog):
    """Issue: run B (no --resume) in run A's folder pruned its own checkpoint by step number and left `latest`
    dangling; a later --resume started from scratch."""
    a = reward_trainer(tmp_path, "max_steps=3", "save_steps=1", "keep_checkpoints=2").train()
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    before = snapshot(tmp_path)
    assert main(["train-rm", *RM, "max_steps=3", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run's checkpoints (checkpoint-2, checkpoint-3, latest)" in err
    assert "--resume" in err and "overwrite_output_dir=true" in err
    assert snapshot(tmp_path) == before  # touched nothing, config.yaml included

    (tmp_path / "latest").write_text("checkpoint-9\n")  # broken: --resume takes the newest complete checkpoint
    b = reward_trainer(tmp_path, "max_steps=4", "save_steps=1", "keep_checkpoints=2", "resume=true")
    assert (b.step, b.run_id) == (3, a.run_id)  # the same run goes on
    assert "`latest` names 'checkpoint-9', which is incomplete or gone; using the newest complete checkpoint, " \
           "checkpoint-3" in caplog.text
    b.train()
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-4"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-4"

    c = reward_trainer(tmp_path, "max_steps=1", "save_steps=1", "overwrite_output_dir=true").train()
    assert c.run_id != a.run_id
    assert names(tmp_path) == ["checkpoint-1"] and ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]  # run A's metrics went with its checkpoints
    with pytest.raises(ConfigError, match="overwrite_output_dir=True: cannot be combined with --resume"):
        reward_trainer(tmp_path, "overwrite_output_dir=true", "resume=true")


def test_pruning_deletes_only_this_runs_oldest_written_checkpoints(tmp_path):
    def fake(step, run_id, written_at, verified=False):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        ckpt.write_state(folder, {"run_id": run_id, "step": step, "written_at": written_at})
        if verified:
            ckpt.mark_verified(folder, step)

    # ours: step 10 written first, then a rollback and steps 3, 5 (lower steps, written later); theirs: step 9
    fake(10, "ours", 1.0, verified=True)
    fake(9, "theirs", 0.5)
    fake(3, "ours", 2.0, verified=True)
    fake(5, "ours", 3.0)
    ckpt.point_latest(tmp_path, tmp_path / "checkpoint-5")
    ckpt.prune(tmp_path, "ours", keep=1)  # keeps 5 (newest, latest) and 3 (newest verified), never theirs
    assert names(tmp_path) == ["checkpoint-3", "checkpoint-5", "checkpoint-9"]
    ckpt.mark_verified(tmp_path / "checkpoint-5", 5)
    ckpt.prune(tmp_path, "ours", keep=1)
    assert names(tmp_path) == ["checkpoint-5", "checkpoint-9"]
    assert not list(tmp_path.glob(".trash-*"))


# ---- two runs in one folder --------------------------------------------------------------------------------------

def test_a_second_run_in_a_locked_folder_is_refused_and_touches_nothing(tmp_path, caplog):
    """Issue: two runs 0.5 s apart - one deleted the other's temporary checkpoint, config.yaml was the loser's."""
    go_r, go_w = os.pipe()
    held_r, held_w = os.pipe()

    def hold():
        ckpt.OutputLock(tmp_path).acquire()
        os.write(held_w, b"1")
        read_byte(go_r)  # then exits without releasing: a killed run

    pid = fork(hold)
    assert read_byte(held_r) == b"1"
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.OutputDirError, match=f"output_dir {tmp_path} is in use by pid {pid} on "
                                                  f"{socket.gethostname()}"):
        reward_trainer(tmp_path)
    assert snapshot(tmp_path) == before
    os.write(go_w, b"1")
    assert wait(pid) == 0
    trainer = reward_trainer(tmp_path)  # the holder is dead: its lock is taken over, with a log line
    assert f"taking over the lock of pid {pid}, which is no longer running" in caplog.text
    assert json.loads((tmp_path / ckpt.LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.release_output_dir()
    assert not (tmp_path / ckpt.LOCK_FILE).exists()


def test_simultaneous_starts_have_exactly_one_winner(tmp_path):
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    done_r, done_w = os.pipe()

    def contender():
        read_byte(go_r)
        try:
            ckpt.OutputLock(tmp_path).acquire()
        except ckpt.OutputDirError:
            os.write(out_w, b"0")
            return
        os.write(out_w, b"1")
        read_byte(done_r)

    pids = [fork(contender) for _ in range(4)]
    os.write(go_w, b"gggg")
    results = sorted(read_byte(out_r) for _ in pids)
    os.write(done_w, b"d")
    assert [wait(pid) for pid in pids] == [0] * 4
    assert results == [b"0", b"0", b"0", b"1"]


def test_locks_of_other_hosts_are_honoured_until_stale(tmp_path, caplog):
    lock = tmp_path / ckpt.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then", "command": "fastrm sft"}))
    with pytest.raises(ckpt.OutputDirError, match="in use by pid 1 on elsewhere"):
        ckpt.OutputLock(tmp_path).acquire()
    old = time.time() - ckpt.lock.LOCK_STALE_S - 60
    os.utime(lock, (old, old))
    ckpt.OutputLock(tmp_path).acquire().release()
    assert "taking over the lock of pid 1 on elsewhere, not refreshed for" in caplog.text
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive, on this host
    with pytest.raises(ckpt.OutputDirError, match=f"in use by pid {os.getppid()}"):
        ckpt.OutputLock(tmp_path).acquire()


# ---- kills -------------------------------------------------------------------------------------------------------

KILL_POINTS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "fsync")


def count_or_kill(monkeypatch, kill_at: int | None) -> list:
    """Count calls of the file operations in KILL_POINTS; SIGKILL this process before call number ``kill_at``."""
    calls = []

    def wrap(fn):
        def op(*args, **kwargs):
            calls.append(fn.__name__)
            if len(calls) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return op

    for name in KILL_POINTS:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    return calls


def test_a_kill_at_any_point_of_save_and_pruning_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    """Issue: 5 of 20 kills during pruning left normally named, half-deleted checkpoint folders. Here the save of
    checkpoint-3 and the pruning of checkpoints 1 and 2 (keep_checkpoints=1) are killed before each file operation
    in turn; after each, every checkpoint-N is complete, `latest` names one, and the next start clears the rest."""
    base = tmp_path / "base"
    trainer = reward_trainer(base, "max_steps=2", "save_steps=1", "keep_checkpoints=1").train()
    assert names(base) == ["checkpoint-1", "checkpoint-2"]  # 1: the newest verified, kept until 2 is

    def save_step_3(out):
        trainer.out_dir, trainer.step = out, 3
        trainer.last_checkpoint, trainer.checkpoint_verified = out / "checkpoint-2", False
        trainer.save()
        trainer.guard._verified()  # the next step ran from checkpoint-3: checkpoints 1 and 2 go

    with monkeypatch.context() as m:
        shutil.copytree(base, tmp_path / "count")
        calls = count_or_kill(m, None)
        save_step_3(tmp_path / "count")
    assert names(tmp_path / "count") == ["checkpoint-3"]
    assert {"replace", "unlink", "rmdir", "fsync"} <= set(calls) and len(calls) > 20
    # Every point but the third and later of a run of the same operation (the 7 unlinks of one folder's removal):
    # before the first (folder renamed, whole), before the second (half-deleted), and after the last.
    points = [i + 1 for i, op in enumerate(calls) if i < 2 or op != calls[i - 1] or op != calls[i - 2]]
    for kill_at in points:
        out = tmp_path / f"kill{kill_at}"
        shutil.copytree(base, out)

        def killed(out=out, kill_at=kill_at):
            count_or_kill(monkeypatch, kill_at)
            save_step_3(out)

        status = wait(fork(killed))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, calls[kill_at - 1])
        where = f"killed before {calls[kill_at - 1]} #{kill_at}"
        for name in names(out):
            assert ckpt.checkpoint_info(out / name) is not None, (where, name, sorted(os.listdir(out / name)))
        pointer = (out / "latest").read_text().strip()
        assert pointer in ("checkpoint-2", "checkpoint-3") and ckpt.checkpoint_info(out / pointer), where
        lock, resume_from, run_id = ckpt.open_output_dir(out, resume=True, overwrite=False)
        lock.release()
        assert resume_from == out / pointer and run_id == trainer.run_id, where
        assert not [p for p in os.listdir(out) if p.startswith((".tmp-", ".trash-"))], where
        assert ckpt.load_trainer_state(resume_from)["step"] == int(pointer.split("-")[1])
        shutil.rmtree(out)


# ---- divergence --------------------------------------------------------------------------------------------------

def test_a_diverged_model_never_becomes_latest_and_the_stop_names_a_good_checkpoint(tmp_path, capsys):
    """Issue: with lr=1e10 the update that blew up the weights was saved, `latest` named it as the last good
    checkpoint, and the user saw `pairwise_ranking_loss: chosen_rewards contains NaN or inf` with a traceback."""
    assert main(["train-rm", *RM, "lr=inf", f"output_dir={tmp_path / 'inf'}"]) == 2
    assert "setting lr=inf: must be > 0 and finite" in capsys.readouterr().err
    assert main(["train-rm", *RM, "lr=1e10", "max_steps=8", "save_steps=1", f"output_dir={tmp_path}"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pairwise_ranking_loss" not in err
    err = err.strip().splitlines()[-1]  # (after the progress bars of saving)
    assert err.startswith("fastrm train-rm: training diverged: non-finite ")
    for name in names(tmp_path):  # no diverged parameters under a checkpoint's name
        assert all_finite(tmp_path / name), name
    latest = ckpt.latest_checkpoint(tmp_path)
    if latest is None:  # diverged from the first checkpoint on: it is set aside, none is called good
        assert "No good checkpoint was written" in err and names(tmp_path, "diverged-") == ["diverged-checkpoint-1"]
        return
    assert f"The last good checkpoint is {latest} (`latest` names it)" in err
    assert (latest / ckpt.VERIFIED_FILE).is_file()  # a step ran from it with finite loss and gradient
    # ... and it really is good: resumed with a sane lr, training goes on
    step = int(latest.name.split("-")[1])
    trainer = reward_trainer(tmp_path, "resume=true", "lr=1e-3", f"max_steps={step + 1}", "save_steps=1")
    trainer.train()
    assert trainer.step == step + 1 and all_finite(trainer.last_checkpoint)


def test_a_checkpoint_whose_next_step_diverges_is_set_aside(tmp_path, monkeypatch):
    """Finite but exploding parameters (a head weight of 3e38) pass the finiteness check at save; the step run
    from them overflows. That checkpoint is set aside and `latest` moves back to the verified one before it."""
    trainer = reward_trainer(tmp_path, "max_steps=4", "save_steps=1", "keep_checkpoints=1", "warmup_steps=0")
    update = optim.apply_update

    def exploding_update(optimizer, scheduler):
        update(optimizer, scheduler)
        if trainer.step == 1:  # the update of step 2
            with torch.no_grad():
                trainer.model.score.weight.fill_(3e38)

    monkeypatch.setattr(optim, "apply_update", exploding_update)
    with pytest.raises(guard.NonFiniteLossError) as stop:
        trainer.train()
    assert all_finite(tmp_path / "diverged-checkpoint-2")
    assert names(tmp_path) == ["checkpoint-1"] and ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert "at step 3" in str(stop.value)
    assert f"The last good checkpoint is {tmp_path / 'checkpoint-1'} (`latest` names it); checkpoint-2, which this " \
           f"step started from, is set aside as diverged-checkpoint-2" in str(stop.value)
    assert not (tmp_path / ckpt.LOCK_FILE).exists()  # released however training ends


def test_ppo_with_lr_1e10_stops_instead_of_saving_nan_weights(tmp_path, capsys):
    """Issue: `ppo advantage=gae lr=1e10` exited 0 with NaN weights."""
    code = main(["ppo", *RL, "lr=1e10", "max_steps=6", "save_steps=1", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "training diverged" in err and "Traceback" not in err
    for name in names(tmp_path):
        assert all_finite(tmp_path / name), name
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is None or f"The last good checkpoint is {latest}" in err


def test_a_reward_of_1e38_does_not_step_the_optimizer(tmp_path):
    """Issue: a reward function returning 1e38 gave `policy/grad_norm: nan` and the optimizer still stepped."""
    trainer = rl_trainer(tmp_path, "reward=rule", "advantage=gae", reward_fn=lambda p, c: [1e38] * len(c))
    before = params(trainer.policy)
    with pytest.raises(guard.NonFiniteLossError, match=r"The largest \|reward\| of this step's rollouts is 1e\+38"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in params(trainer.policy).items())


def test_every_rank_stops_together(tmp_path):
    """Under torchrun a NaN on one rank stops every rank at the same check (none is left waiting in a collective),
    and an error of rank 0's, such as a checkpoint not written, reaches the others. Two gloo processes."""
    results_r, results_w = os.pipe()

    def rank_main(rank):
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=rank, world_size=2)
        trainer = types.SimpleNamespace(device=torch.device("cpu"), step=4, last_checkpoint=None, run_id=None)
        seen = []
        try:
            loss = torch.tensor(float("nan") if rank == 1 else 0.5)
            guard.DivergenceGuard(trainer, []).check_step([loss], {"gradient norm": torch.tensor(2.0)})
        except guard.NonFiniteLossError as err:
            seen.append(str(err).split(";")[0])

        def write():
            raise ckpt.CheckpointWriteError("checkpoint not written: no space left on device")

        try:
            distributed.run_on_main(write)
        except ckpt.CheckpointWriteError as err:
            seen.append(str(err))
        os.write(results_w, (json.dumps([rank, seen]) + "\n").encode())
        dist.destroy_process_group()

    pids = [fork(lambda rank=rank: rank_main(rank)) for rank in range(2)]
    assert [wait(pid) for pid in pids] == [0, 0]
    os.close(results_w)
    with os.fdopen(results_r) as f:
        results = sorted(json.loads(line) for line in f)
    stop = "training diverged: non-finite loss at step 5 (gradient norm 2)"
    assert results == [[rank, [stop, "checkpoint not written: no space left on device"]] for rank in range(2)]


# ---- no pickle, and `latest` stays inside ------------------------------------------------------------------------

class Payload:
    """A pickle that runs code when loaded: it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A reward model run to step 2, a checkpoint at each step."""
    out = tmp_path_factory.mktemp("finished")
    reward_trainer(out, "max_steps=2", "save_steps=1", "keep_checkpoints=2").train()
    return out


def test_a_planted_pickle_is_never_executed_and_old_states_load_safely(tmp_path, finished_run):
    """Issue: --resume loaded trainer_state.pt with torch.load(weights_only=False), so a planted pickle ran a
    command (train-rm and ppo)."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = ckpt.load_trainer_state(run / "checkpoint-2")
    assert state["step"] == 2 and state["config"]["lr"] == 2e-3  # JSON + safetensors
    assert isinstance(state["rng"]["python"], tuple) and state["rng"]["torch"].dtype == torch.uint8

    # fastrm's own older states (pickles of tensors, numbers and its config dataclasses) still load
    from fastrm.trainers.reward_model import RewardConfig

    legacy = {k: state[k] for k in ("step", "stream", "optimizer", "scheduler", "rng")}
    legacy["config"] = RewardConfig(**{**state["config"], "model": models.ModelConfig(**state["config"]["model"])})
    for name in (ckpt.STATE_JSON, ckpt.STATE_TENSORS):
        (run / "checkpoint-2" / name).unlink()
    torch.save(legacy, run / "checkpoint-2" / ckpt.LEGACY_STATE)
    resumed = reward_trainer(run, "resume=true", "max_steps=3", "save_steps=1")
    assert resumed.step == 2
    resumed.release_output_dir()

    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": Payload(marker)}, run / "checkpoint-2" / ckpt.LEGACY_STATE)
    with pytest.raises(ckpt.CheckpointLoadError, match="refusing to load this pickled trainer state"):
        reward_trainer(run, "resume=true", "max_steps=3")
    with pytest.raises(ckpt.CheckpointLoadError, match="refusing to load this pickled trainer state"):
        rl_trainer(run, "resume=true", "reward=rule")
    assert not marker.exists()


def test_latest_pointing_out_of_the_folder_is_never_followed(tmp_path, finished_run, caplog):
    """Issue: `latest` holding an absolute path or ../ was followed."""
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = str(finished_run / "checkpoint-2")
    for pointer in (elsewhere, f"../{finished_run.name}/checkpoint-2", "checkpoint-2/../../x"):
        (run / "latest").write_text(pointer)
        with pytest.raises(ckpt.CheckpointLoadError, match="never follows `latest` out of output_dir"):
            reward_trainer(run, "resume=true")
    (run / "checkpoint-7").symlink_to(finished_run / "checkpoint-2")  # a checkpoint folder linked from outside
    (run / "latest").write_text("checkpoint-7")
    with pytest.raises(ckpt.CheckpointLoadError):
        reward_trainer(run, "resume=true")
    shutil.copytree(finished_run / "checkpoint-1", run / "checkpoint-1")
    (run / "latest").write_text(elsewhere)
    trainer = reward_trainer(run, "resume=true", "max_steps=2")  # what is inside the folder is used
    assert trainer.resume_from == run / "checkpoint-1" and trainer.step == 1
    assert f"`latest` names {elsewhere!r}, which is not a checkpoint folder inside it" in caplog.text


# ---- disk full ---------------------------------------------------------------------------------------------------

def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """Issue: a full disk gave `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos` and left
    a .tmp-checkpoint-* that filled the disk again on the next run. Here the trainer state's write fails at step 2
    the way safetensors fails on a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file
    writes = []

    def full_disk(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == 2:
            Path(filename).write_bytes(b"\0" * 1000)  # partly written
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["train-rm", *RM, "max_steps=2", "save_steps=1", f"output_dir={tmp_path}"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]  # (after the progress bars of saving)
    assert err.startswith(f"fastrm train-rm: checkpoint not written: no space left on device on {tmp_path} (")
    assert "the previous checkpoint, checkpoint-1, is intact (`latest` names it)" in err
    assert names(tmp_path) == ["checkpoint-1"] and ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / ckpt.LOCK_FILE).exists()


def _can_mount_tmpfs() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


FILL_AND_SAVE = """
import json, os
from transformers import LlamaConfig, LlamaForCausalLM
from fastrm.checkpoint import CheckpointWriteError, latest_checkpoint, write_checkpoint
model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2))
out = {out!r}
write_checkpoint(out, 1, model, None, {{"step": 1}})
try:  # fill the disk
    with open(out + "/filler", "wb") as f:
        while True:
            f.write(bytes(4096))
            f.flush()
except OSError:
    pass
os.truncate(out + "/filler", max(0, os.path.getsize(out + "/filler") - 20000))  # room for small files only
try:
    write_checkpoint(out, 2, model, None, {{"step": 2}})
    print(json.dumps({{"error": None}}))
except CheckpointWriteError as err:
    print(json.dumps({{"error": str(err), "latest": latest_checkpoint(out).name, "files": sorted(os.listdir(out))}}))
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (user namespaces)")
def test_a_really_full_tmpfs(tmp_path):
    """The same on a real full file system (a 2 MB tmpfs, filled after the first checkpoint but for 20 kB), where
    the model's weights are what no longer fits."""
    out = tmp_path / "mnt"
    out.mkdir()
    script = tmp_path / "fill_and_save.py"
    script.write_text(FILL_AND_SAVE.format(tests=str(Path(__file__).parent), out=str(out)))
    command = f"mount -t tmpfs -o size=2m tmpfs {out} && exec {sys.executable} {script}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"].startswith("checkpoint not written: no space left on device on "), report
    assert report["latest"] == "checkpoint-1"
    assert not [f for f in report["files"] if f.startswith(".tmp-")]


# ---- settings changed on resume ----------------------------------------------------------------------------------

def test_resume_applies_a_changed_lr_logs_it_and_refuses_fixed_settings(tmp_path, caplog):
    """Issue: `--resume ... lr=5e-2` kept training at the old lr while config.yaml recorded the new one."""
    caplog.set_level(logging.INFO, logger="fastrm")
    common = ["save_steps=2", "warmup_steps=0", "lr_scheduler=cosine"]
    reward_trainer(tmp_path, *common, "max_steps=2", "lr=2e-3").train()
    for change, match in (("seed=1", "seed 0 -> 1"), ("model.hidden_size=48", "model.hidden_size 32 -> 48"),
                          ("batch_size=4", "batch_size '8 x 1 process\\(es\\)' -> '4 x 1 process\\(es\\)'"),
                          ("num_train_pairs=64", "num_train_pairs 96 -> 64")):
        with pytest.raises(ConfigError, match=f"cannot change within a run .*{match}"):
            reward_trainer(tmp_path, *common, "max_steps=4", "resume=true", change)
    caplog.clear()
    trainer = reward_trainer(tmp_path, *common, "max_steps=4", "resume=true", "lr=5e-2")
    assert "settings changed since it was written, applied from here: max_steps 2 -> 4; lr 0.002 -> 0.05" \
        in caplog.text
    lam = trainer.scheduler.lr_lambdas[0]
    group = trainer.optimizer.param_groups[0]
    assert (group["initial_lr"], group["lr"]) == (5e-2, 5e-2 * lam(2))  # the new lr at the saved position
    assert "lr: 0.05" in (tmp_path / "config.yaml").read_text()
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["step"] == 3 and "lr" in r] == [5e-2 * lam(3)]


def test_parameters_nonfinite_is_exact_where_a_sum_would_overflow():
    """The guard's parameter flag: 1 for a NaN or inf anywhere, 0 for finite parameters, also when they are so
    large that their sum overflows (the CPU check sums first, then takes the exact max-norm)."""
    from fastrm.guard import parameters_nonfinite

    def flag(*values):
        models = [torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(v)) for v in values])]
        return float(parameters_nonfinite(models))

    assert flag([1.0, -2.0], [3.0]) == 0.0
    assert flag([1.0, float("nan")], [3.0]) == 1.0
    assert flag([1.0], [float("-inf"), 2.0]) == 1.0
    big = torch.finfo(torch.float32).max
    assert flag([big, big], [big]) == 0.0
    assert flag([big, big], [float("inf")]) == 1.0
