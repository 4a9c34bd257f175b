"""The ``fastrm`` command. Thin: each subcommand parses its own arguments and calls one entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

COMMANDS = {
    "sft": ("fastrm.trainers.sft:main", "supervised fine-tuning (no arguments: the embedded arithmetic task)"),
    "train-rm": ("fastrm.trainers.reward:main", "train a reward model (no arguments: the embedded task, on CPU)"),
    "ppo": ("fastrm.trainers.rl:main", "RL fine-tuning: PPO / REINFORCE / RLOO / GRPO against a reward model and/or a rule"),
    "export": ("fastrm.export:main", "merge a LoRA adapter (output_dir/final of a lora.r > 0 run) into its base: a "
                                     "plain checkpoint folder"),
    "demo": ("fastrm.demo:main", "SFT -> reward model -> RL on the embedded arithmetic task, on CPU, in about a minute"),
    "selfcheck": ("fastrm.selfcheck:main", "check every op against float64 on this machine, then a quick benchmark"),
    "bench": ("fastrm.cli:bench", "run the benchmarks in the repository's benchmarks/ (fastrm bench --help)"),
}


def usage() -> str:
    lines = ["usage: fastrm <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "fastrm <command> --help for a command's options"]
    return "\n".join(lines)


def find_benchmarks_dir() -> tuple[Path | None, list[Path]]:
    """The repository's ``benchmarks/`` folder, which is not installed with the package: ``$FASTRM_BENCHMARKS_DIR``,
    else beside the (editable-installed) package's source, else under the current directory.
    Returns ``(folder or None, the places looked at)``."""
    import fastrm

    candidates = []
    if os.environ.get("FASTRM_BENCHMARKS_DIR"):
        candidates.append(Path(os.environ["FASTRM_BENCHMARKS_DIR"]).expanduser())
    candidates += [Path(fastrm.__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        if (folder / "__main__.py").is_file() and (folder / "common.py").is_file():
            return folder.resolve(), candidates
    return None, candidates


def bench(argv) -> int:
    """``fastrm bench [OP ...] [options]``: ``python -m benchmarks`` run from the repository root."""
    import subprocess

    folder, looked = find_benchmarks_dir()
    if folder is None:
        print("fastrm bench: cannot find the benchmarks/ folder; looked in:\n"
              + "".join(f"  {p}\n" for p in looked)
              + "The benchmarks live in the fastrm repository and are not installed with the package. Run this "
                "from a clone installed with `pip install -e .`, or set FASTRM_BENCHMARKS_DIR to the clone's "
                "benchmarks/ folder.", file=sys.stderr)
        return 2
    if folder.name != "benchmarks":
        print(f"fastrm bench: {folder} must be named benchmarks/ (it is imported as the `benchmarks` package)",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], cwd=folder.parent)


def main(argv=None) -> int:
    """Run a command. Under torchrun the process ends here (see :func:`fastrm.distributed.exit_process`)."""
    code = run_command(argv)
    from fastrm import distributed

    if distributed.launched_by_torchrun():
        distributed.exit_process(code)
    return code


def run_command(argv=None) -> int:
    """Exit codes: 0 done; 2 a user error, nothing trained (a bad setting, an output_dir in use or holding an
    earlier run, a resume that changes a fixed setting, an unsafe checkpoint); 3 training diverged (NaN/inf), the
    last good checkpoint is named; 4 a checkpoint could not be written (disk full, ...), the previous one is intact."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastrm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    from fastrm.checkpoint import CheckpointWriteError
    from fastrm.config import ConfigError
    from fastrm.training import NonFiniteLossError

    module, function = COMMANDS[command][0].split(":")
    try:
        return getattr(importlib.import_module(module), function)(rest)
    except ConfigError as err:  # a user mistake: the message names the setting, no traceback needed
        print(f"fastrm {command}: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # training diverged; `latest` names the last good checkpoint
        print(f"fastrm {command}: {err}", file=sys.stderr)
        return 3
    except CheckpointWriteError as err:  # disk full or another OS error; the previous checkpoint is intact
        print(f"fastrm {command}: {err}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
