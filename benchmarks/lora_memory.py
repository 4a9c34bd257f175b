"""Memory of ``fastrm ppo`` with LoRA vs full fine-tuning, same model, same run: PPO with a critic (GAE).

    python benchmarks/lora_memory.py                      # a 43M-parameter Llama (hidden 768, 6 layers)
    python benchmarks/lora_memory.py --hidden 1024 --layers 8 --lora-r 16

Builds a random-init Llama checkpoint (the embedded task's tokenizer saved beside it: nothing is downloaded),
then runs the same short ``fastrm ppo`` twice, each in its own process, with ``lora.r=0`` and ``lora.r=R``:

- **parameters and buffers** of every model the trainer holds (policy, reference, critic; each tensor counted
  once), as the run logs it (``models in memory: ... MiB``). Full fine-tuning holds the policy, a frozen copy
  as the reference and a copy as the critic; with LoRA the reference is the policy with its adapters disabled
  and the critic's layers share the policy's frozen tensors, so the base weights exist once;
- **peak RSS** of the process (``ru_maxrss``), which adds gradients, AdamW states, activations and the
  interpreter with torch and transformers loaded.

Writes ``results/lora/memory_<device>.json`` and ``.md`` (device, versions, commit, both commands, figures; a
folder of its own: ``results/*.json`` are the op benchmarks' tables).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

# The measured process: `fastrm ppo ARGS`, then its own peak RSS (kB on Linux).
CHILD = ("import resource, sys\n"
         "from fastrm.cli import run_command\n"
         "code = run_command(['ppo', *sys.argv[1:]])\n"
         "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
         "sys.exit(code)\n")
MODELS_LINE = re.compile(r"models in memory: ([0-9.]+) MiB")


def build_checkpoint(folder: Path, hidden: int, layers: int, intermediate: int) -> int:
    """A random-init Llama with the embedded task's tokenizer; returns its number of parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastrm.tasks.arithmetic import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def ppo_args(checkpoint: Path, out: Path, lora_r: int, steps: int) -> list[str]:
    return [f"model.name_or_path={checkpoint}", "reward=rule", "advantage=gae", f"max_steps={steps}",
            "batch_size=4", "num_samples=2", "max_new_tokens=8", "ppo_epochs=1", "num_eval_prompts=0",
            "optimizer=adamw", "device=cpu", "progress=false", "tensorboard=false", "save_steps=1000",
            f"lora.r={lora_r}", f"output_dir={out}"]


def measure(args: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"fastrm ppo {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    models = MODELS_LINE.search(run.stderr)
    rss = re.search(r"peak_rss_kb (\d+)", run.stdout)
    return {"models_mib": float(models.group(1)), "peak_rss_mib": int(rss.group(1)) / 1024}


def markdown(result: dict) -> str:
    env, full, lora = result["environment"], result["full"], result["lora"]
    lines = [f"# LoRA vs full fine-tuning: memory of `fastrm ppo` (PPO with a critic), {env['device']}", "",
             f"Llama, {result['parameters'] / 1e6:.1f}M parameters (float32), {result['steps']} PPO steps; "
             f"torch {env['torch']}, commit {env['git_commit']}, {env['date']}.", "",
             "| | full fine-tuning | LoRA r=%d | LoRA / full |" % result["lora_r"], "|---|---|---|---|",
             f"| parameters + buffers of policy, reference, critic | {full['models_mib']:.1f} MiB | "
             f"{lora['models_mib']:.1f} MiB | {lora['models_mib'] / full['models_mib']:.2f} |",
             f"| peak RSS of the process | {full['peak_rss_mib']:.0f} MiB | {lora['peak_rss_mib']:.0f} MiB | "
             f"{lora['peak_rss_mib'] / full['peak_rss_mib']:.2f} |", "",
             "Commands (peak RSS: the process's `ru_maxrss`, e.g. `/usr/bin/time -v`):", "", "```bash",
             f"fastrm ppo {' '.join(result['commands']['full'])}",
             f"fastrm ppo {' '.join(result['commands']['lora'])}", "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "lora")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_params = build_checkpoint(tmp / "llama", args.hidden, args.layers, args.intermediate)
        commands = {name: ppo_args(tmp / "llama", tmp / f"run-{name}", r, args.steps)
                    for name, r in (("full", 0), ("lora", args.lora_r))}
        figures = {name: measure(cmd) for name, cmd in commands.items()}
    shown = {name: [a if not a.startswith(("model.name_or_path=", "output_dir=")) else
                    a.split("=")[0] + ("=<llama checkpoint>" if a.startswith("model") else f"=runs/{name}")
                    for a in cmd] for name, cmd in commands.items()}
    result = {"environment": common.environment(), "parameters": n_params, "steps": args.steps,
              "lora_r": args.lora_r, "sizes": {"hidden": args.hidden, "layers": args.layers,
                                               "intermediate": args.intermediate},
              "commands": shown, "argv": sys.argv, **figures}
    stem = f"memory_{common.device_kind()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    common.run_script(main)
