"""``fastrm demo``: the whole RLHF pipeline on the embedded arithmetic task, on CPU, in minutes.

1. **SFT** (``fastrm sft``): a tiny Llama learns one-digit sums from scratch — deliberately briefly, so
   it is mediocre and RL has room to improve;
2. **reward model** (``fastrm train-rm``): trained on the same task's preference pairs from a noisy
   simulated annotator;
3. **RL** (``fastrm ppo``, RLOO): the SFT policy optimises 0.5 x the learned reward model's score + the
   task's rule reward, with a KL penalty to the SFT policy. (The learned reward alone is hackable by this
   policy — see docs/reward_hacking.md; ``reward=model`` reproduces that.)

The ground-truth task score (greedy answers to all 100 one-digit sums, checked by the task's checker) is
printed after SFT and after RL. Extra ``key=value`` arguments are RLConfig overrides for stage 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("fastrm")

# Stage settings (tuned for a 2-core CPU; see docs/rl_demo_results.md for the numbers they give).
TINY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=256"]
SFT_ARGS = ["task_max_level=0", "num_train_examples=4000", "batch_size=64", "lr=3e-3", "warmup_steps=10",
            "eval_generate=0"]
RM_ARGS = ["task_max_level=0", "num_train_pairs=6000", "batch_size=64", "lr=2e-3"]
RL_ARGS = ["task_max_level=0", "reward=both", "reward_model_weight=0.5", "rule_weight=1.0", "advantage=rloo", "num_samples=4", "batch_size=32",
           "max_new_tokens=4", "temperature=0.7", "lr=5e-4", "ppo_epochs=1", "kl_coef=0.05", "num_eval_prompts=100",
           "eval_steps=100", "save_steps=1000", "missing_eos_penalty=1.0"]


def all_level0_prompts() -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "difficulty": 0} for a in range(10) for b in range(10)]


def run(output_dir: str, seed: int, sft_steps: int, rm_steps: int, rl_steps: int, rl_overrides=(),
        progress: bool = False, sft_overrides=(), rm_overrides=()) -> dict:
    from fastrm.config import load_config
    from fastrm.trainers.reward import RewardConfig, RewardTrainer
    from fastrm.trainers.rl import RLConfig, RLTrainer
    from fastrm.trainers.sft import SFTConfig, SFTTrainer

    out = Path(output_dir)
    # The demo's stage folders are its own: a second demo replaces the first one's (sft/, reward/, rl/).
    # The RL stage's policy is the SFT checkpoint, not "tiny": the tiny preset is asked for, in every stage.
    common = [f"seed={seed}", f"progress={str(progress).lower()}", "device=cpu", "overwrite_output_dir=true",
              "preset=tiny"]
    timings = {}
    start = time.perf_counter()
    sft = SFTTrainer(load_config(SFTConfig, None, TINY_MODEL + SFT_ARGS + common + [
        f"max_steps={sft_steps}", f"save_steps={sft_steps}", f"eval_steps={sft_steps}",
        f"output_dir={out / 'sft'}", *sft_overrides])).setup().train()
    timings["sft_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rm = RewardTrainer(load_config(RewardConfig, None, TINY_MODEL + RM_ARGS + common + [
        f"max_steps={rm_steps}", f"save_steps={rm_steps}", f"eval_steps={rm_steps}",
        f"output_dir={out / 'reward'}", *rm_overrides])).setup().train()
    rm_accuracy = rm.evaluate()["eval/accuracy"]
    timings["rm_s"] = time.perf_counter() - start

    start = time.perf_counter()
    config = load_config(RLConfig, None, RL_ARGS + common + [
        f"model.name_or_path={sft.last_checkpoint}", f"reward_model_path={rm.last_checkpoint}",
        f"max_steps={rl_steps}", f"output_dir={out / 'rl'}", *rl_overrides])
    trainer = RLTrainer(config).setup()
    probe = all_level0_prompts() if config.task_max_level == 0 else trainer.eval_rows
    before = trainer.evaluate(probe)
    trainer.train()
    after = trainer.evaluate(probe)
    timings["rl_s"] = time.perf_counter() - start
    result = {"seed": seed, "sft_overrides": list(sft_overrides), "rm_overrides": list(rm_overrides), "sft_steps": sft_steps, "rm_steps": rm_steps, "rl_steps": rl_steps,
              "rm_heldout_pair_accuracy": rm_accuracy, "after_sft": before, "after_rl": after, **timings,
              "rl_config": {k: v for k, v in vars(config).items() if k != "model"},
              "rl_checkpoint": str(trainer.last_checkpoint)}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--rm-steps", type=int, default=300)
    parser.add_argument("--rl-steps", type=int, default=400)
    parser.add_argument("--progress", action="store_true", help="tqdm bars")
    parser.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="SFTConfig override")
    parser.add_argument("--rm", action="append", default=[], metavar="KEY=VALUE", help="RewardConfig override")
    parser.add_argument("overrides", nargs="*", help="RLConfig key=value overrides for the RL stage")
    args = parser.parse_args(argv)
    from fastrm import distributed

    if distributed.launched_by_torchrun():
        from fastrm.config import ConfigError

        raise ConfigError("fastrm demo is a single-process CPU walk-through; under torchrun launch the stages "
                          "themselves: fastrm sft, fastrm train-rm, fastrm ppo (see the README's Multi-GPU section)")
    from fastrm.training import setup_logging

    setup_logging()
    logging.getLogger("fastrm").setLevel(logging.WARNING)
    start = time.perf_counter()
    r = run(args.output_dir, args.seed, args.sft_steps, args.rm_steps, args.rl_steps, args.overrides, args.progress,
            args.sft, args.rm)
    b, a = r["after_sft"], r["after_rl"]
    print(f"reward model: held-out pair accuracy {r['rm_heldout_pair_accuracy']:.3f}")
    print(f"ground truth (greedy, all 100 one-digit sums): accuracy {b['eval/accuracy']:.3f} after SFT -> "
          f"{a['eval/accuracy']:.3f} after RL; true score {b['eval/true_score']:.3f} -> {a['eval/true_score']:.3f}; "
          f"learned reward {b.get('eval/model_score', float('nan')):.3f} -> {a.get('eval/model_score', float('nan')):.3f}")
    print(f"total {time.perf_counter() - start:.0f} s (sft {r['sft_s']:.0f}, rm {r['rm_s']:.0f}, rl {r['rl_s']:.0f}); "
          f"results in {Path(args.output_dir) / 'demo_result.json'}")
    return 0
