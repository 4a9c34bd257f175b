"""Static resource report of every Triton kernel, per NVIDIA target, computed without a GPU.

    python -m benchmarks.kernel_resources            # covering set of variants, sm_80 / sm_90 / sm_100
    python -m benchmarks.kernel_resources --full     # every combination of options (~450 variants per target)

For every compiled variant (benchmarks/kernel_compile.py: recorded from the ops, compiled by Triton, assembled
by its bundled ptxas): registers per thread, spill bytes, stack, shared memory, warps; the **estimated
occupancy** on A100 (sm_80), H100 / H200 (sm_90) and B200 (sm_100) -- resident warps per SM allowed by
registers, shared memory, threads and blocks, the standard occupancy calculation; and the **bytes each
kernel moves per element** (per logit, per [B, T] position, per pair) from the dtypes of the launch.
Then the **compiled variants a training run triggers**: the ops called as a PPO / reward-model run calls
them, over batches whose padded length changes every step, counted with Triton's own specialisation keys.

Writes ``results/kernels/kernel_resources.json`` and ``.md`` (device "none": nothing runs, everything is static).
Occupancy here is what the resources allow; a row-scan kernel runs one program per row, so a batch of B rows
also caps it at B programs over the whole GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # launches are recorded through the interpreter

from benchmarks import common, kernel_compile as kc  # noqa: E402

# Per-SM limits (CUDA occupancy calculator / programming guide, compute capability 8.0, 9.0, 10.0).
GPUS = {
    "sm_80": {"gpus": "A100", "regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem": 167936,
              "smem_per_block_reserved": 1024},
    "sm_90": {"gpus": "H100 / H200", "regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem": 233472,
              "smem_per_block_reserved": 1024},
    "sm_100": {"gpus": "B200", "regs": 65536, "threads": 2048, "warps": 64, "blocks": 32, "smem": 233472,
               "smem_per_block_reserved": 1024},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)

# Bytes a kernel moves per element of its main axis: per kernel, the pointer arguments read and written once
# per element, each with the constexpr flag it depends on (None: always). Everything per row (labels, stats,
# bootstrap values) is left out: < 1 % at realistic sizes. Neighbour re-loads that hit L1 are not counted.
TRAFFIC = {
    "_logprob_fwd_kernel": ("logit", [("logits_ptr", None)], []),
    "_logprob_bwd_kernel": ("logit", [("logits_ptr", None)], [("grad_logits_ptr", None)]),
    "_gae_fwd_kernel": ("position", [("r_ptr", None), ("v_ptr", None), ("m_ptr", None)],
                        [("adv_ptr", None), ("ret_ptr", None)]),
    "_gae_bwd_kernel": ("position", [("gadv_ptr", None), ("gret_ptr", None), ("m_ptr", None)],
                        [("dr_ptr", None), ("dv_ptr", None)]),
    "_ppo_policy_fwd_kernel": ("position", [("logp_ptr", None), ("old_ptr", None), ("adv_ptr", None),
                                            ("mask_ptr", None)], [("grad_ptr", "WRITE_GRADS")]),
    "_value_loss_fwd_kernel": ("position", [("v_ptr", None), ("old_ptr", "HAS_CLIP"), ("ret_ptr", None),
                                            ("mask_ptr", None)], [("grad_ptr", "WRITE_GRADS")]),
    "_kl_fwd_kernel": ("position", [("logp_ptr", None), ("ref_ptr", None)], [("out_ptr", None)]),
    "_kl_bwd_kernel": ("position", [("logp_ptr", None), ("ref_ptr", None), ("gout_ptr", None)],
                       [("glogp_ptr", "NEED_LOGP"), ("gref_ptr", "NEED_REF")]),
    "_pairwise_fwd_kernel": ("pair", [("chosen_ptr", None), ("rejected_ptr", None), ("margin_ptr", "HAS_MARGIN_TENSOR")],
                             [("loss_ptr", "PER_ELEMENT"), ("correct_ptr", "PER_ELEMENT"),
                              ("grad_chosen_ptr", "WRITE_GRADS"), ("grad_rejected_ptr", "WRITE_GRADS"),
                              ("grad_margin_ptr", "WRITE_MARGIN_GRAD")]),
    "_ranking_fwd_kernel": ("response", [("rewards_ptr", None), ("ranks_ptr", None)], [("grad_ptr", "WRITE_GRADS")]),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
               "int8": 1, "uint8": 1, "bool": 1}


def occupancy(row: dict, target: str) -> dict:
    """Resident blocks and warps per SM and the limiting resource, from registers, shared memory, threads."""
    gpu = GPUS[target]
    warps = row["num_warps"]
    regs_per_warp = math.ceil(row["registers"] * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": gpu["regs"] // (regs_per_warp * warps),
        "threads": gpu["threads"] // (32 * warps),
        "blocks": gpu["blocks"],
        "shared memory": gpu["smem"] // (row["shared_bytes"] + gpu["smem_per_block_reserved"]),
    }
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / gpu["warps"], "limited_by": limiter}


def bytes_per_element(kernel_name: str, launch_args: list, kwargs: dict):
    """``(bytes, unit)`` moved per element by one launch, from its arguments' dtypes; None when unknown."""
    spec = TRAFFIC.get(kernel_name)
    if spec is None:
        return None
    unit, reads, writes = spec
    names = kc.kernel_parameters(kernel_name)
    total = 0
    for arg, flag in reads + writes:
        if flag is not None and not kwargs.get(flag):
            continue
        value = launch_args[names.index(arg)]
        total += DTYPE_BYTES[value["tensor"]]
    return total, unit


def training_run_variants(steps: int = 30, seed: int = 0) -> dict:
    """The compiled variants a run triggers: the ops called as the trainers call them, for ``steps`` steps
    whose padded lengths vary, counted per kernel with Triton's specialisation keys (sm_90)."""
    import torch

    import fastrm

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    with kc.LaunchRecorder() as recorder:
        for step in range(steps):
            # V: any multiple of 16 above one 4096-logit block compiles like Qwen2's 151936 (kept small: the
            # matmuls around the kernels do run, on the CPU).
            B, T, V, H = 4, rng.randint(40, 1500), 8192, 16
            mask = torch.rand(B, T, generator=gen) > 0.2
            with recorder.calling("ppo step"):
                # rollout: log-probs of policy and reference from hidden states (bf16), rewards with a k3 penalty,
                # GAE in fp32; update: the same log-probs with entropy and a gradient, both losses.
                hidden = torch.randn(B, T, H, generator=gen).to(torch.bfloat16)
                weight = torch.randn(V, H, generator=gen).to(torch.bfloat16)
                labels = torch.randint(0, V, (B, T), generator=gen)
                labels[~mask] = -100
                with torch.no_grad():
                    old = fastrm.linear_logprobs(hidden, weight, labels, backend="triton", skip_ignored=True)
                    ref = fastrm.linear_logprobs(hidden, weight, labels, backend="triton", skip_ignored=True)
                    kl = fastrm.kl_penalty(old, ref, "k3", backend="triton")
                    values = torch.randn(B, T, generator=gen)
                    adv, ret = fastrm.compute_gae(-0.05 * kl, values, mask, gamma=1.0, lam=0.95, backend="triton")
                h = hidden.clone().requires_grad_(True)
                logp, ent = fastrm.linear_logprobs(h, weight, labels, return_entropy=True, backend="triton",
                                                   skip_ignored=True)
                pol = fastrm.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0, backend="triton")
                v = values.clone().requires_grad_(True)
                vl = fastrm.value_loss(v, values, ret, mask, clip=0.2, backend="triton")
                (pol.loss + 0.5 * vl.loss - 0.01 * ent.sum()).backward()
            with recorder.calling("reward-model step"):
                chosen = torch.randn(rng.randint(4, 64), generator=gen).requires_grad_(True)
                rejected = torch.randn(chosen.shape[0], generator=gen).requires_grad_(True)
                fastrm.pairwise_ranking_loss(chosen, rejected, backend="triton").backward()
    launches = recorder.launches
    keys = kc.variant_keys_in_subprocess(launches, "sm_90")
    per_kernel = defaultdict(set)
    for launch, key in zip(launches, keys):
        per_kernel[launch.kernel.split(":")[1]].add(key)
    return {"steps": steps, "launches": len(launches), "padded_lengths": "uniform 40..1500 per step",
            "variants_per_kernel": {k: len(v) for k, v in sorted(per_kernel.items())},
            "total_variants": sum(len(v) for v in per_kernel.values())}


def enrich(result: dict, launches: list) -> list[dict]:
    """Per-variant rows with occupancy and bytes per element added."""
    by_op = {}
    for launch in launches:
        by_op.setdefault((launch.kernel.split(":")[1], launch.op), launch)
    rows = []
    for row in result["variants"]:
        row = dict(row)
        if not row.get("error"):
            row.update(occupancy(row, row["target"]))
        launch = by_op.get((row["kernel"], row["ops"][0]))
        traffic = bytes_per_element(row["kernel"], launch.args, launch.kwargs) if launch else None
        row["bytes_per_element"], row["element"] = traffic if traffic else (None, None)
        rows.append(row)
    return rows


def per_kernel_table(rows: list[dict]) -> str:
    """One line per kernel and target: the worst variant's registers, spills, smem, occupancy."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["kernel"], int(row["target"].split("_")[1]))].append(row)
    lines = ["| kernel | target | variants | registers max (min) | spill bytes | stack bytes | shared bytes max "
             "| warps | est. occupancy min (max), limited by | bytes / element |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), rs in sorted(groups.items()):
        target = f"sm_{arch}"
        good = [r for r in rs if not r.get("error")]
        if not good:
            lines.append(f"| {kernel} | {target} | {len(rs)} | compile failed | | | | | | |")
            continue
        worst = min(good, key=lambda r: r["occupancy"])
        traffic = sorted({(r["bytes_per_element"], r["element"]) for r in good if r["bytes_per_element"]})
        per_elem = (f"{traffic[0][0]}-{traffic[-1][0]} B / {traffic[0][1]}" if len(traffic) > 1 else
                    f"{traffic[0][0]} B / {traffic[0][1]}") if traffic else "-"
        lines.append(
            f"| {kernel} | {target} ({GPUS[target]['gpus']}) | {len(rs)} | {max(r['registers'] for r in good)} "
            f"({min(r['registers'] for r in good)}) | {max(r['spill_store_bytes'] + r['spill_load_bytes'] for r in good)} "
            f"| {max(r['stack_bytes'] for r in good)} | {max(r['shared_bytes'] for r in good)} "
            f"| {','.join(str(w) for w in sorted({r['num_warps'] for r in good}))} "
            f"| {worst['occupancy']:.0%} ({max(r['occupancy'] for r in good):.0%}), {worst['limited_by']} | {per_elem} |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """The per-kernel table with where it comes from, and the training run's variant count."""
    env = report["environment"]
    run = report["training_run"]
    variants = ", ".join(f"{k} {v}" for k, v in run["variants_per_kernel"].items())
    lines = [
        f"Triton {env['triton']}, torch {env['torch']}, ptxas bundled with Triton; commit {env['git_commit']}, "
        f"{env['date']}; {report['config']['set']} set of variants; compiled in {report['compile_s']:.0f} s on "
        f"{env['cpu_cores']} cores. Command: `{report['config']['command']}`.", "",
        per_kernel_table(report["variants"]), "",
        "File: `results/kernels/kernel_resources.json` (every variant: Triton's description, the op calls that "
        "launch it, registers, spills, stack, shared memory, warps, occupancy, bytes per element).", "",
        f"Compiled variants a training run triggers ({run['steps']} PPO + reward-model steps, padded lengths "
        f"{run['padded_lengths']}, sm_90): **{run['total_variants']}** in all -- {variants}.", "",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- kernels:begin -->", "<!-- kernels:end -->"


def update_readme(report: dict, readme: Path = common.README) -> Path:
    """Put :func:`render_markdown` between the kernels markers of benchmarks/README.md."""
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render_markdown(report) + text[end:])
    return readme


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every combination of options, not the covering set")
    parser.add_argument("--targets", default="sm_80,sm_90,sm_100")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30, help="steps of the simulated training run")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR / "kernels")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    launches = kc.ensure_interpreter_and_record(args.full)
    start = time.perf_counter()
    result = kc.compile_in_subprocess(launches, targets, args.jobs)
    compile_s = time.perf_counter() - start
    env = common.environment()
    env["device"], env["device_kind"] = "none (static: compiled for NVIDIA targets, nothing run)", "static"
    report = {
        "benchmark": "kernel_resources", "environment": env,
        "config": {"set": "full" if args.full else "covering", "targets": result["targets"],
                   "skipped_targets": result["skipped_targets"], "argv": sys.argv[1:],
                   "command": "python -m benchmarks.kernel_resources" + (" --full" if args.full else "")},
        "gpus": GPUS, "compile_s": compile_s, "variants": enrich(result, launches),
        "training_run": training_run_variants(args.steps),
    }
    text = render_markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_resources.json").write_text(json.dumps(report, indent=1))
    (args.out / "kernel_resources.md").write_text(text)
    print("wrote", args.out / "kernel_resources.json", "and .md")
    if args.out.resolve() == (common.RESULTS_DIR / "kernels").resolve():
        print("wrote", update_readme(report))
    found = kc.problems(result)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
