"""``fastrm demo``: the whole RLHF pipeline on the embedded arithmetic task, on CPU, in about a minute.

1. **SFT** (``fastrm sft``): a tiny Llama learns one-digit sums from scratch — deliberately briefly, so
   it is mediocre and RL has room to improve;
2. **reward model** (``fastrm train-rm``): trained on the same task's preference pairs from a noisy
   simulated annotator;
3. **RL** (``fastrm ppo``, RLOO): the SFT policy optimises 0.1 x the learned reward model's score + the
   task's rule reward, with a KL penalty to the SFT policy. (The learned reward alone is a weaker signal this
   policy can game — see docs/reward_hacking.md; ``--rl reward=model`` runs it.)

The ground-truth task score (greedy answers to all 100 one-digit sums, checked by the task's checker) is
printed after SFT and after RL. Every setting of every stage is given here explicitly, so the demo's result
does not move when a trainer's defaults change; per seed it is deterministic on a machine.
``--seeds 0-4 --write-docs`` regenerates docs/rl_demo_results.md. ``--dpo``: SFT then DPO instead (no reward model,
no RL; :mod:`fastrm.demo_dpo`, docs/dpo_demo_results.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fastrm import distributed
from fastrm.config import load_config
from fastrm.demo_settings import (
    RL, RM, SFT, STEPS, THREADS, accuracy_summary, all_level0_prompts, environment, environment_note, overrides,
)
from fastrm.errors import ConfigError
from fastrm.runtime import quiet_third_parties, setup_logging
from fastrm.trainers.reward_model import RewardConfig, RewardTrainer
from fastrm.trainers.rl import RLConfig, RLTrainer
from fastrm.trainers.sft import SFTConfig, SFTTrainer

log = logging.getLogger("fastrm")

def run(output_dir: str, seed: int, sft_steps: int = STEPS["sft"], rm_steps: int = STEPS["rm"],
        rl_steps: int = STEPS["rl"], rl_overrides=(), progress: bool = False, sft_overrides=(),
        rm_overrides=(), label: str = "") -> dict:
    """The three stages for one seed; returns (and writes to ``output_dir/demo_result.json``) the figures."""
    out = Path(output_dir)
    common = {"seed": seed, "progress": progress}
    timings = {}

    def stage(trainer, number, name):
        trainer.progress_desc = f"{label}[{number}/3] {name}"
        return trainer

    start = time.perf_counter()
    sft_config = load_config(SFTConfig, None, overrides({**SFT, **common, "max_steps": sft_steps,
                                                         "save_steps": sft_steps, "eval_steps": sft_steps,
                                                         "output_dir": out / "sft"}) + list(sft_overrides))
    sft = stage(SFTTrainer(sft_config).setup(), 1, "SFT").train()
    timings["sft_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rm_config = load_config(RewardConfig, None, overrides({**RM, **common, "max_steps": rm_steps,
                                                           "save_steps": rm_steps, "eval_steps": rm_steps,
                                                           "output_dir": out / "reward"}) + list(rm_overrides))
    rm = stage(RewardTrainer(rm_config).setup(), 2, "reward model").train()
    rm_accuracy = rm.evaluate()["eval/accuracy"]
    timings["rm_s"] = time.perf_counter() - start

    start = time.perf_counter()
    config = load_config(RLConfig, None, overrides({**RL, **common, "model.name_or_path": sft.last_checkpoint,
                                                    "reward_model_path": rm.last_checkpoint, "max_steps": rl_steps,
                                                    "save_steps": rl_steps, "output_dir": out / "rl"})
                         + list(rl_overrides))
    trainer = stage(RLTrainer(config).setup(), 3, f"RL ({config.advantage})")
    probe = all_level0_prompts() if config.task_max_level == 0 else trainer.eval_rows
    before = trainer.evaluate(probe)
    trainer.train()
    after = trainer.evaluate(probe)
    timings["rl_s"] = time.perf_counter() - start
    result = {"seed": seed, "sft_overrides": list(sft_overrides), "rm_overrides": list(rm_overrides),
              "rl_overrides": list(rl_overrides), "sft_steps": sft_steps, "rm_steps": rm_steps, "rl_steps": rl_steps,
              "rm_heldout_pair_accuracy": rm_accuracy, "after_sft": before, "after_rl": after, **timings,
              "rl_config": {k: v for k, v in vars(config).items() if k != "model"},
              "rl_checkpoint": str(trainer.last_checkpoint)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# ---- the command --------------------------------------------------------------------------------------------------

def parse_seeds(text: str) -> list[int]:
    """``"3"``, ``"0-4"`` or ``"0,2,5"``."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            seeds += list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a seed, a range 0-4 or a list 0,2,5") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: no seed in it")
    return seeds


def quiet_libraries():
    """Only the demo's own lines: no per-save / per-load bars or logs from transformers, no INFO logs of fastrm."""
    quiet_third_parties()
    import transformers

    transformers.utils.logging.set_verbosity_error()

    setup_logging()
    logging.getLogger("fastrm").setLevel(logging.WARNING)


def summary_line(r: dict) -> str:
    b, a = r["after_sft"], r["after_rl"]
    return (f"accuracy {b['eval/accuracy']:.2f} after SFT -> {a['eval/accuracy']:.2f} after RL; "
            f"true score {b['eval/true_score']:.3f} -> {a['eval/true_score']:.3f}; "
            f"learned reward {b.get('eval/model_score', float('nan')):.3f} -> "
            f"{a.get('eval/model_score', float('nan')):.3f}")


def write_docs(path: Path, results: list[dict], env: dict, command: str):
    """docs/rl_demo_results.md from the runs of ``--seeds ... --write-docs``."""
    rows = []
    for r in results:
        b, a = r["after_sft"], r["after_rl"]
        rows.append(f"| {r['seed']} | {r['rm_heldout_pair_accuracy']:.3f} | {b['eval/accuracy']:.2f} | "
                    f"**{a['eval/accuracy']:.2f}** | {a['eval/accuracy'] - b['eval/accuracy']:+.2f} | "
                    f"{b['eval/true_score']:.3f} | **{a['eval/true_score']:.3f}** | "
                    f"{r['sft_s'] + r['rm_s'] + r['rl_s']:.0f} s |")
    summary = accuracy_summary([r["after_sft"]["eval/accuracy"] for r in results], [r["after_rl"]["eval/accuracy"] for r in results])
    rl = RL
    text = f"""# `fastrm demo` results (CPU)

Generated by `{command}` (writes this file; about a minute per seed on 2 cores). Each seed is deterministic on
a given machine; another CPU, thread count or library version can move the figures a little.

Pipeline (`fastrm/demo.py`, every setting explicit there): SFT ({STEPS['sft']} steps, tiny Llama 64x2, one-digit
sums) → reward model (`train-rm`, {STEPS['rm']} steps, noisy annotator {RM['annotator_noise']}) → RL
({rl['advantage'].upper()}, n={rl['num_samples']}, {rl['batch_size']} prompts/step, {STEPS['rl']} steps, lr {rl['lr']}, temperature
{rl['temperature']}, {rl['kl_estimator']} KL penalty {rl['kl_coef']}, reward = {rl['reward_model_weight']} × learned RM +
{rl['rule_weight']} × rule checker, missing-EOS penalty {rl['missing_eos_penalty']}). Ground truth: greedy answers to all 100
one-digit sums, checked by `fastrm.tasks.arithmetic` (accuracy; true score = shaped score in [0, 1]).

| seed | RM held-out pair acc. | accuracy after SFT | accuracy after RL | gain | true score after SFT | true score after RL | wall time |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{summary}

{environment_note(env)}

The learned reward alone (`--rl reward=model`) is a weaker signal that this policy can game: see
`docs/reward_hacking.md`. That is why the demo adds the rule reward.
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="where the three stages write (one folder per "
                        "seed with --seeds)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--seeds", help="run several seeds, e.g. 0-4 or 0,2,5 (overrides --seed), and print a table")
    parser.add_argument("--write-docs", nargs="?", const="docs/rl_demo_results.md", metavar="PATH",
                        help="write the results, with versions, device and commit, to PATH "
                             "(default when given without a path: docs/rl_demo_results.md)")
    parser.add_argument("--sft-steps", type=int, default=STEPS["sft"], help="SFT steps")
    parser.add_argument("--rm-steps", type=int, default=STEPS["rm"], help="reward-model steps")
    parser.add_argument("--rl-steps", type=int, default=STEPS["rl"], help="RL steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (one line per seed instead)")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE",
                        help="an SFTConfig setting for stage 1 (repeatable; fastrm sft --help lists them)")
    parser.add_argument("--rm", action="append", default=[], metavar="KEY=VALUE",
                        help="a RewardConfig setting for stage 2 (repeatable; fastrm train-rm --help lists them)")
    parser.add_argument("--dpo", dest="dpo_mode", action="store_true",
                        help="SFT then DPO (fastrm dpo) on the task's preference pairs instead of the reward model and "
                             "RL (--write-docs: docs/dpo_demo_results.md)")
    parser.add_argument("--dpo-steps", type=int, default=STEPS["dpo"], help="DPO steps (with --dpo)")
    parser.add_argument("--dpo-arg", dest="dpo", action="append", default=[], metavar="KEY=VALUE",
                        help="a DPOConfig setting for the DPO stage (repeatable; fastrm dpo --help lists them)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a user error too")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="RLConfig settings for stage 3 (fastrm ppo --help lists them)")
    parser.add_argument("--rl", action="append", default=[], metavar="KEY=VALUE",
                        help="an RLConfig setting for stage 3 (repeatable; same as a bare KEY=VALUE)")
    args = parser.parse_intermixed_args(argv)
    if distributed.launched_by_torchrun():
        raise ConfigError("fastrm demo is a single-process CPU walk-through; under torchrun launch the stages "
                          "themselves: fastrm sft, fastrm train-rm, fastrm ppo (see the README's Multi-GPU section)")
    for name in ("sft_steps", "rm_steps", "rl_steps", "dpo_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    import torch

    torch.set_num_threads(min(THREADS, os.cpu_count() or 1))
    quiet_libraries()
    if args.dpo_mode:
        from fastrm import demo_dpo

        return demo_dpo.main(args, seeds, argv)
    progress = not args.no_progress
    print(f"fastrm demo: SFT -> reward model -> RL on one-digit sums, CPU; seed{'s' if len(seeds) > 1 else ''} "
          f"{', '.join(map(str, seeds))}", flush=True)
    results, begin = [], time.perf_counter()
    for seed in seeds:
        out = Path(args.output_dir) / f"seed_{seed}" if args.seeds else Path(args.output_dir)
        start = time.perf_counter()
        r = run(str(out), seed, args.sft_steps, args.rm_steps, args.rl_steps, args.overrides + args.rl, progress,
                args.sft, args.rm, label=f"seed {seed} " if len(seeds) > 1 else "")
        results.append(r)
        if len(seeds) == 1:
            print(f"reward model: held-out pair accuracy {r['rm_heldout_pair_accuracy']:.3f}")
            print(f"ground truth (greedy, all 100 one-digit sums): {summary_line(r)}")
            print(f"total {time.perf_counter() - start:.0f} s (sft {r['sft_s']:.0f}, rm {r['rm_s']:.0f}, "
                  f"rl {r['rl_s']:.0f}); results in {out / 'demo_result.json'}")
        else:
            print(f"seed {seed}: RM pair accuracy {r['rm_heldout_pair_accuracy']:.3f}; {summary_line(r)}; "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    if len(seeds) > 1:
        gains = [r["after_rl"]["eval/accuracy"] - r["after_sft"]["eval/accuracy"] for r in results]
        print(f"{len(seeds)} seeds in {time.perf_counter() - begin:.0f} s: accuracy gain from RL "
              f"min {min(gains):+.2f}, mean {sum(gains) / len(gains):+.2f}, max {max(gains):+.2f}")
    if args.write_docs:
        command = "fastrm demo " + " ".join(sys.argv[1:] if argv is None else argv)
        write_docs(Path(args.write_docs), results, environment(), command.strip())
        print(f"wrote {args.write_docs}")
    return 0
