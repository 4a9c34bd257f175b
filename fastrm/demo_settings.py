"""What both demos (:mod:`fastrm.demo`: SFT -> reward model -> RL; :mod:`fastrm.demo_dpo`: SFT -> DPO) run with:
every setting of every stage, explicit, and the environment recorded beside their results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The demo runs on at most this many CPU threads: the tiny models gain nothing from more, and the same thread
# count keeps results comparable across machines.
THREADS = 2

# Every setting each stage depends on, explicit (see the module docstring). Steps are set by the command line.
MODEL = {"model.name_or_path": "tiny", "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4,
         "model.intermediate_size": 256, "model.max_position_embeddings": 64, "model.attn_implementation": "sdpa",
         "model.gradient_checkpointing": False, "model.load_in_8bit": False}
# The stage folders are the demo's own: a second demo replaces the first one's (overwrite_output_dir). The tiny preset
# is asked for in every stage (the RL policy is the SFT checkpoint, not "tiny"), under these explicit values.
COMMON = {"preset": "tiny", "overwrite_output_dir": True, "device": "cpu", "distributed": "auto", "optimizer": "adamw",
          "mixed_precision": "no", "backend": "torch", "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_ratio": 0.0,
          "tensorboard": False, "keep_checkpoints": 1}
SUPERVISED = {**MODEL, **COMMON, "tokenizer": "embedded", "train_data": None, "eval_data": None,
              "task_max_level": 0, "max_length": 32, "truncation": "truncate", "packed": True, "grad_accum_steps": 1,
              "skip_malformed": False, "batch_size": 64, "lr_scheduler": "cosine"}
SFT = {**SUPERVISED, "num_train_examples": 4000, "num_eval_examples": 200, "eval_fraction": 0.05, "lr": 3e-3,
       "warmup_steps": 10, "eval_generate": 0, "max_new_tokens": 6, "log_steps": 20}
RM = {**SUPERVISED, "num_train_pairs": 6000, "num_eval_pairs": 500, "eval_fraction": 0.1, "annotator_noise": 0.1,
      "center_coef": 0.0, "use_margin": False, "lr": 2e-3, "warmup_steps": 30, "log_steps": 20}
RL = {**COMMON, "tokenizer": "auto", "train_data": None, "eval_data": None, "task_max_level": 0,
      "num_train_prompts": 2000, "num_eval_prompts": 100, "reward": "both", "reward_model_weight": 0.1,
      "rule_weight": 1.0, "reward_fn": "embedded", "reward_model_8bit": False, "missing_eos_penalty": 1.0,
      "reward_norm": "none", "reward_clip": None, "value_model": "auto", "ref_8bit": False, "batch_size": 32,
      "num_samples": 4, "max_new_tokens": 4, "temperature": 0.7, "top_p": 1.0, "advantage": "rloo", "gamma": 1.0,
      "lam": 0.95, "whiten_advantages": True, "ppo_epochs": 1, "num_minibatches": 1, "clip_eps": 0.2,
      "clip_eps_high": None, "dual_clip": None, "loss_agg": "token-mean", "entropy_coef": 0.0, "kl_coef": 0.05,
      "kl_estimator": "k1", "kl_in": "reward", "adaptive_kl": False, "curriculum": False, "lr": 1e-3,
      "lr_scheduler": "cosine", "warmup_steps": 0, "log_steps": 10, "eval_steps": 100_000}
# DPO (fastrm demo --dpo, fastrm.demo_dpo): longer, or a larger lr, over-optimises on the noisy pairs (the chosen
# answers' log-probs fall with the rejected ones' and greedy accuracy drops: seed 0 at lr 3e-4 peaks near step 100
# and is below SFT by step 150).
STEPS = {"sft": 50, "rm": 300, "rl": 400, "dpo": 100}


def overrides(settings: dict) -> list[str]:
    """``key=value`` strings as the command line takes them (None -> null, booleans lower-case)."""
    def show(value):
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    return [f"{key}={show(value)}" for key, value in settings.items()]


def all_level0_prompts() -> list[dict]:
    return [{"prompt": f"{a}+{b}=", "difficulty": 0} for a in range(10) for b in range(10)]


def environment() -> dict:
    """Versions, device and commit, for the results file."""
    import subprocess

    import torch
    import transformers

    def version(name):
        try:
            from importlib.metadata import version as dist_version

            return dist_version(name)
        except Exception:  # not installed
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown (not a git checkout)"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {"device": f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": version("triton"), "tokenizers": version("tokenizers"), "fastrm_commit": commit,
            "platform": platform.platform()}


def accuracy_summary(before: list[float], after: list[float]) -> str:
    """A results file's line on greedy accuracy over the seeds: means before and after, smallest and largest gain."""
    gains = [a - b for b, a in zip(before, after)]
    mean_b, mean_a = sum(before) / len(before), sum(after) / len(after)
    return (f"Mean accuracy {mean_b:.3f} → {mean_a:.3f} ({mean_a - mean_b:+.3f}); smallest gain {min(gains):+.2f}, "
            f"largest {max(gains):+.2f}.")


def environment_note(env: dict) -> str:
    """A results file's paragraph on where it was measured (``env`` from :func:`environment`)."""
    return f"""Environment: {env['device']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']},
triton {env['triton']}, tokenizers {env['tokenizers']}; {env['platform']}; fastrm commit {env['fastrm_commit']}.
Wall times are of this run on this machine (the demo uses at most {THREADS} threads); other jobs on the machine
slow them down."""
