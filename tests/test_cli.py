"""The command line a new user meets: every setting listed by ``--help`` with its type, default and meaning;
``--config`` / ``--resume`` anywhere on the line; a user error is one short line and exit code 2 (a traceback
only with ``--debug``), and every setting is checked before anything is loaded or trained."""

import dataclasses
import json
import logging
import re

import pytest
import torch

from fastrm import optim
from fastrm.cli import run_command
from fastrm.config import ConfigError, describe_settings, load_config, parse_cli
from fastrm.errors import DataError, UserError
from fastrm.models import ModelConfig
from fastrm.trainers import base
from fastrm.trainers.dpo import DPOConfig
from fastrm.trainers.reward_model import RewardConfig
from fastrm.trainers.rl import RLConfig
from fastrm.trainers.sft import SFTConfig

COMMANDS = {"train-rm": RewardConfig, "sft": SFTConfig, "ppo": RLConfig, "dpo": DPOConfig}


def config_classes():
    """Every config dataclass: the model's, the shared bases and every trainer's (found, so a new one is covered)."""
    found, todo = [ModelConfig], [base.TrainerSettings]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_setting_has_a_meaning(cls):
    rows = describe_settings(cls)
    assert len(rows) >= len(dataclasses.fields(cls))
    missing = [name for name, _, _, meaning in rows if not meaning]
    assert not missing, f"{cls.__name__}: declare these with fastrm.config.setting(default, meaning): {missing}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_setting_with_type_default_and_meaning(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, type_name, default, meaning in describe_settings(COMMANDS[command]):
        row = r"^  " + r"\s+".join(re.escape(x) for x in (name, type_name, default, meaning)) + "$"
        assert re.search(row, out, re.MULTILINE), (name, type_name, default, meaning)
    assert re.search(r"^  model\.name_or_path\s+str\s", out, re.MULTILINE)  # nested settings, dotted


def test_help_shows_a_trainer_default_not_the_base_one(capsys):
    with pytest.raises(SystemExit):
        run_command(["train-rm", "--help"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["output_dir"])
    assert line.split()[2] == "runs/reward"


def test_config_and_resume_anywhere_on_the_line(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text("lr: 0.01\nbatch_size: 16\nmodel:\n  hidden_size: 48\n")
    for argv in (["--config", str(path), "batch_size=4", "--resume"],
                 ["batch_size=4", "--config", str(path), "--resume"],
                 ["--resume", "batch_size=4", "--config", str(path)]):
        config = parse_cli(RewardConfig, argv, "fastrm train-rm", "")
        assert (config.lr, config.batch_size, config.model.hidden_size, config.resume) == (0.01, 4, 48, True), argv


def test_one_parser_for_the_three_trainers(monkeypatch):
    import fastrm.config as fconfig
    from fastrm.trainers import reward_model, rl, sft

    seen = []
    monkeypatch.setattr(fconfig, "parse_cli", lambda cls, *a, **k: seen.append(cls) or (_ for _ in ()).throw(
        ConfigError("stop")))
    for module in (reward_model, sft, rl):
        monkeypatch.setattr(module, "parse_cli", fconfig.parse_cli)
        with pytest.raises(ConfigError):
            module.main([])
    assert seen == [RewardConfig, SFTConfig, RLConfig]


# ---- user errors ------------------------------------------------------------------------------------------------

def _bad_row_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": "4"}\n')
    return str(path)


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [0.1\n")
    return str(path)


def _a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file")


USER_ERRORS = [  # (command, arguments, what the one-line message must say)
    ("train-rm", lambda t: ["weight_decay=-0.1"], "setting weight_decay=-0.1: must be >= 0"),
    ("train-rm", lambda t: ["device=tpu"], "setting device='tpu'"),
    ("train-rm", lambda t: ["lr_scheduler=cosine_typo"], "setting lr_scheduler='cosine_typo': must be one of"),
    ("train-rm", lambda t: ["max_length=2"], "setting max_length=2: must be >= 3"),
    ("sft", lambda t: ["tokenizer=/no/such/tokenizer"], "setting tokenizer='/no/such/tokenizer'"),
    ("sft", lambda t: ["model.name_or_path=/no/such/model"], "setting model.name_or_path='/no/such/model': no such"),
    ("sft", lambda t: [f"train_data={t}/missing.jsonl"], "missing.jsonl': no such file"),
    ("sft", lambda t: [f"output_dir={_a_file(t)}"], "is a file, not a folder"),
    ("sft", lambda t: [f"output_dir={_a_file(t)}/run"], "cannot write there"),
    ("train-rm", lambda t: [f"train_data={_bad_row_file(t)}", f"output_dir={t}/run"], "prefs.jsonl, line 2"),
    ("train-rm", lambda t: ["--config", f"{t}/none.yaml"], "none.yaml does not exist"),
    ("train-rm", lambda t: ["--config", _bad_yaml(t)], "is not valid YAML"),
    ("train-rm", lambda t: ["lr=fast"], "setting 'lr'"),
    ("ppo", lambda t: ["reward=rule", "clip_eps=1.5"], "setting clip_eps=1.5: must lie in (0, 1)"),
    ("ppo", lambda t: ["reward=model", "reward_model_path=/no/such/rm"], "reward_model_path='/no/such/rm': no such"),
    ("ppo", lambda t: ["reward=rule", "reward_fn=no_such_module:f"], "setting reward_fn='no_such_module:f': cannot"),
]


@pytest.mark.parametrize("command,args,message", USER_ERRORS, ids=[e[2][:40] for e in USER_ERRORS])
def test_user_error_is_one_line_and_exit_code_2(tmp_path, capsys, command, args, message):
    code = run_command([command, *args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") <= 2, err
    assert err.startswith(f"fastrm {command}: error: ") and message in err, err


def test_debug_adds_the_traceback(capsys, monkeypatch):
    assert run_command(["train-rm", "--debug", "weight_decay=-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "weight_decay" in err
    monkeypatch.setenv("FASTRM_DEBUG", "1")
    assert run_command(["train-rm", "weight_decay=-1"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors are shortened: anything else is a bug and propagates (exit 1, with its traceback)."""
    from fastrm.trainers import reward_model

    monkeypatch.setattr(reward_model, "main", lambda argv: [][0])
    with pytest.raises(IndexError):
        run_command(["train-rm"])


def test_user_error_family(tmp_path):
    from fastrm.data import load_rows

    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)  # existing except clauses hold
    with pytest.raises(DataError, match="prefs.jsonl, line 2"):
        load_rows(_bad_row_file(tmp_path))


def test_cuda_device_on_a_cpu_machine_is_refused_at_start():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_config(SFTConfig, None, ["device=cuda"])


def test_settings_are_all_checked_before_anything_is_built(tmp_path):
    """Loading the config is the whole start-up check: nothing is written for a bad run."""
    with pytest.raises(ConfigError):
        load_config(RLConfig, None, ["reward=rule", "clip_eps=1.0", f"output_dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()
    json.dumps(dataclasses.asdict(load_config(RLConfig, None, ["reward=rule"])))  # a valid one loads


def test_constant_schedule_honours_the_warmup():
    """``lr_scheduler=constant`` is the schedule after the warmup, like every other one (transformers' ignores it)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = optim.make_scheduler(optimizer, "constant", warmup_steps=2, total_steps=5)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.0, 0.5, 1.0, 1.0]


def test_start_up_drops_the_bitsandbytes_hub_kernel_notice(caplog):
    """bitsandbytes 0.50 warns 'pip install kernels' on AVX512-BF16 CPUs when its optional hub GEMM cannot be
    fetched; nothing for a user to do, so the commands that load models silence that one message, not the logger."""
    from fastrm.runtime import quiet_third_parties

    quiet_third_parties()
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "offline")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
