"""The ``fastrm`` command. Thin: each subcommand parses its own arguments and calls one entry point."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from fastrm import distributed
from fastrm.checkpoint import CheckpointWriteError, release_locks
from fastrm.errors import EXIT_CHECKPOINT_WRITE, EXIT_INTERRUPTED, EXIT_NON_FINITE, EXIT_USER_ERROR, UserError
from fastrm.guard import NonFiniteLossError
from fastrm.runtime import quiet_third_parties

COMMANDS = {
    "sft": ("fastrm.trainers.sft:main", "supervised fine-tuning (no arguments: the embedded arithmetic task)"),
    "train-rm": ("fastrm.trainers.reward_model:main", "train a reward model (no arguments: the embedded task, on CPU)"),
    "dpo": ("fastrm.trainers.dpo:main", "direct preference optimisation of a policy on preference pairs: DPO, IPO, "
                                        "hinge, robust, SimPO"),
    "ppo": ("fastrm.trainers.rl:main", "RL fine-tuning: PPO / REINFORCE / RLOO / GRPO against a reward model and/or a rule"),
    "export": ("fastrm.export:main", "merge a LoRA adapter (output_dir/final of a lora.r > 0 run) into its base: a "
                                     "plain checkpoint folder"),
    "demo": ("fastrm.demo:main", "SFT -> reward model -> RL on the embedded arithmetic task, on CPU, in about a minute"),
    "selfcheck": ("fastrm.selfcheck:main", "check every op against float64 on this machine, then a quick benchmark"),
    "bench": ("fastrm.cli:bench", "run the benchmarks in the repository's benchmarks/ (fastrm bench --help)"),
}


def usage() -> str:
    lines = ["usage: fastrm [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "fastrm <command> --help lists a command's options and every setting with its default.",
              "A mistake in a setting, path or data row prints one line saying what is wrong; --debug (anywhere on "
              "the line) or FASTRM_DEBUG=1 adds the traceback.",
              f"exit codes: 0 done, 1 a bug in fastrm (with a traceback), {EXIT_USER_ERROR} a user error (nothing "
              f"trained), {EXIT_NON_FINITE} training diverged (NaN/inf), {EXIT_CHECKPOINT_WRITE} a checkpoint could "
              f"not be written (disk full, ...), {EXIT_INTERRUPTED} interrupted"]
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
    """Run a command. Under torchrun the process ends here (see :func:`exit_process`)."""
    code = run_command(argv)
    if distributed.launched_by_torchrun():
        exit_process(code)
    return code


def exit_process(code: int):
    """End a torchrun worker: leave the process group, flush, and exit without interpreter finalization.

    Measured here (CPU, gloo, torch 2.13): about 1 run in 10 under load aborted with SIGABRT ("terminate called
    without an active exception") *after* ``destroy_process_group`` had returned on every rank, while Python
    finalised, failing a job whose work was done and written. ``os._exit`` skips that finalisation; every file
    fastrm writes is closed or flushed before this point."""
    release_locks()  # os._exit skips atexit
    distributed.cleanup()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(argv=None) -> int:
    """Exit codes (:mod:`fastrm.errors`): 0 done; 1 a bug, with its traceback; 2 a user error, nothing trained (a
    bad setting or path, a malformed data row, an output_dir in use or holding an earlier run, a resume that
    changes a fixed setting, an unsafe checkpoint); 3 training diverged (NaN/inf), the last good checkpoint is
    named; 4 a checkpoint could not be written (disk full, ...), the previous one is intact; 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTRM_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastrm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module, function = COMMANDS[command][0].split(":")
    if command in ("sft", "train-rm", "dpo", "ppo", "demo", "export"):
        quiet_third_parties()
    try:
        return getattr(importlib.import_module(module), function)(rest)
    except (UserError, NonFiniteLossError, CheckpointWriteError, KeyboardInterrupt) as err:
        # A user error says what is wrong and how to fix it; a divergence names the last good checkpoint (`latest`);
        # a failed write (disk full, ...) leaves the previous checkpoint intact. No traceback unless asked.
        if debug:
            traceback.print_exc()
        if isinstance(err, UserError):
            code, message = EXIT_USER_ERROR, f"error: {err}"
        elif isinstance(err, NonFiniteLossError):
            code, message = EXIT_NON_FINITE, str(err)
        elif isinstance(err, CheckpointWriteError):
            code, message = EXIT_CHECKPOINT_WRITE, str(err)
        else:
            code, message = EXIT_INTERRUPTED, "interrupted"
        print(f"fastrm {command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
