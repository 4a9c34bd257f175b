"""``fastrm bench --gpu-suite``: everything worth knowing from a GPU lease, in one command, in ~8 minutes.

    fastrm bench --gpu-suite                        # on a CUDA machine; results in benchmarks/results/gpu-suite-<date>/
    fastrm bench --gpu-suite --out /tmp/suite       # somewhere else
    fastrm bench --gpu-suite --dry-run              # the plumbing, on a CPU, in seconds (tiny sizes, CI runs it)

Stages, in order, each in its own process with its own time limit, so one failure (or an out-of-memory)
cannot stop the rest; what does not fit in the remaining budget is recorded as skipped:

1. the CUDA-marked tests (``pytest -m cuda``: compiled kernels at default block sizes, no host sync under
   ``torch.cuda.set_sync_debug_mode("error")``, the Triton path under ``torch.compile``);
2. ``fastrm selfcheck`` (every op vs float64, then its quick benchmark);
3. every op's benchmark at realistic sizes, bf16 (``benchmarks/bench_*.py``: log-probs over 16k tokens at
   V = 32k and 152k, ``linear_logprobs`` at Qwen2-0.5B's head, GAE 512 x 2048, PPO losses 512 x 2048,
   pairwise over 64k pairs, K-wise with K = 8), each against eager PyTorch, ``torch.compile`` of it, and
   TRL / Liger / flash-attn when installed;
4. a reward-model step and a PPO step end to end on a random-init Qwen2-0.5B-shaped model
   (``benchmarks/e2e_steps.py``), fastrm vs plain PyTorch.

Writes ``suite.json`` (device, versions, commit, every stage's status, time and output tail, the headline
ratios) and ``suite.md`` into the results folder, beside each benchmark's own JSON / markdown / PNG. PNG
plots need matplotlib; without it the suite notes that and carries on. Needs nothing beyond fastrm's own
dependencies (torch, triton, transformers): flash-attn, bitsandbytes, TRL, Liger are optional anchors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

ROOT = common.BENCH_DIR.parent
BUDGET_S = 480

# op benchmark -> (arguments on a GPU, arguments of the dry run); bf16 on CUDA (the scripts' default there).
OP_BENCHES = {
    "logprobs": (["--tokens", "16384", "--vocab", "32000,151936"], ["--tokens", "8", "--vocab", "300"]),
    "linear_logprobs": (["--tokens", "16384", "--vocab", "32000,151936", "--hidden", "896"],
                        ["--tokens", "8", "--vocab", "300", "--hidden", "16"]),
    "gae": (["--batch", "512", "--seqlen", "2048"], ["--batch", "4", "--seqlen", "37"]),
    "ppo": (["--batch", "512", "--seq", "2048"], ["--batch", "4", "--seq", "37"]),
    "pairwise": (["--batch", "65536"], ["--batch", "64"]),
    "ranking": (["--batch", "4096", "--k", "8"], ["--batch", "8", "--k", "4"]),
}
DRY_RUN_TIMING = ["--repeats", "2", "--min-time", "0", "--copy-buffer-mib", "16", "--no-compile"]


def environment() -> dict:
    import torch

    env = common.environment()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_count=torch.cuda.device_count(), compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    optional = {}
    for name in ("flash_attn", "liger_kernel", "trl", "bitsandbytes", "matplotlib"):
        try:
            module = __import__(name)
            optional[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent or broken: either way not used
            optional[name] = None
    env["optional_packages"] = optional
    return env


class Suite:
    def __init__(self, out: Path, budget_s: float, dry_run: bool):
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.start = time.monotonic()
        self.stages: list[dict] = []

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, cmd: list[str], limit_s: float, call=None) -> dict:
        """Run one stage as a subprocess within ``min(limit_s, what is left of the budget)``; or, in the dry
        run, ``call()`` in this process when given (the same code as the command, without a process start)."""
        limit = min(limit_s, self.remaining())
        record = {"stage": name, "command": " ".join(cmd), "limit_s": round(limit, 1)}
        if limit < 5:
            record.update(status="skipped", note="the suite's time budget is spent")
            print(f"[{name}] skipped: out of time")
            self.stages.append(record)
            return record
        print(f"[{name}] {' '.join(cmd)}  (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        try:
            if call is not None and self.dry_run:
                code, output = _call_captured(call)
            else:
                # The dry run's children see the CPU as it is: no interpreter (selfcheck would also check
                # every kernel interpreted, slowly), no poisoned outputs (a test-suite setting).
                env = {k: v for k, v in os.environ.items()
                       if not (self.dry_run and k in ("TRITON_INTERPRET", "FASTRM_POISON_OUTPUTS"))}
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
                code, output = proc.returncode, proc.stdout + proc.stderr
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired as exc:
            status, code = "timeout", None
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        record.update(status=status, returncode=code, seconds=round(time.monotonic() - t0, 1),
                      output_tail=output[-4000:])
        (self.out / f"{name}.log").write_text(output)
        print(f"[{name}] {status} in {record['seconds']} s", flush=True)
        self.stages.append(record)
        return record


def _call_captured(call) -> tuple[int, str]:
    import contextlib
    import io
    import traceback

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            code = call()
        except Exception:  # noqa: BLE001 - a failed stage is recorded, the suite goes on
            traceback.print_exc()
            code = 1
    return code, buffer.getvalue()


def headline(out: Path) -> list[dict]:
    """Per op benchmark result: fastrm's best provider vs each other provider, per size and mode (ratios of
    median times; > 1 means fastrm is faster)."""
    rows = []
    for path in sorted(out.glob("ops/*.json")):
        result = json.loads(path.read_text())
        size_keys = result.get("size_keys", [])
        ok = [r for r in result["rows"] if r["status"] == "ok"]
        groups: dict[tuple, list] = {}
        for r in ok:
            groups.setdefault(tuple(r.get(k) for k in size_keys) + (r["mode"],), []).append(r)
        for key, rs in groups.items():
            ours = [r for r in rs if r["provider"].startswith("fastrm")]
            if not ours:
                continue
            best = min(ours, key=lambda r: r["median_ms"])
            for other in rs:
                if other["provider"].startswith("fastrm"):
                    continue
                rows.append({"op": result["op"], "size": dict(zip(size_keys, key[:-1])), "mode": key[-1],
                             "fastrm": best["provider"], "fastrm_ms": best["median_ms"], "vs": other["provider"],
                             "vs_ms": other["median_ms"], "speedup": other["median_ms"] / best["median_ms"],
                             "memory_ratio": (best["peak_mb"] / other["peak_mb"]) if best.get("peak_mb") and other.get("peak_mb") else None})
    return rows


def render(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fastrm GPU suite{' (dry run)' if report['dry_run'] else ''}", "",
             f"**{env['device']}**, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"CUDA {env['cuda']}, commit {env['git_commit']}, {env['date']}; total {report['total_s']:.0f} s "
             f"of a {report['budget_s']:.0f} s budget.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '-')} |" for s in report["stages"]]
    if report["headline"]:
        lines += ["", "## Op benchmarks: fastrm vs each alternative (median time ratio, > 1 = fastrm faster)", "",
                  "| op | size | mode | fastrm | fastrm ms | vs | their ms | speed-up | memory (fastrm / theirs) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for h in report["headline"]:
            size = " ".join(f"{k}={v}" for k, v in h["size"].items())
            mem = f"{h['memory_ratio']:.2f}" if h["memory_ratio"] is not None else "-"
            lines.append(f"| {h['op']} | {size} | {h['mode']} | {h['fastrm']} | {h['fastrm_ms']:.3g} | {h['vs']} | "
                         f"{h['vs_ms']:.3g} | {h['speedup']:.2f}x | {mem} |")
    e2e = report.get("e2e")
    if e2e:
        lines += ["", f"## End-to-end steps: {e2e['model']}, {e2e['dtype']}, B={e2e['batch']}, T={e2e['seq']}", "",
                  "| step | variant | median ms | tokens/s | peak MiB |", "|---|---|---|---|---|"]
        for step in ("reward_step", "ppo_step"):
            for variant in ("fastrm", "eager"):
                r = e2e.get(step, {}).get(variant, {})
                if "median_ms" in r:
                    peak = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "-"
                    lines.append(f"| {step} | {variant} | {r['median_ms']:.1f} | {r['tokens_per_s']:.0f} | {peak} |")
                elif r:
                    lines.append(f"| {step} | {variant} | {r.get('error', '?')} | | |")
            if "speedup" in e2e.get(step, {}):
                lines.append(f"| {step} | speed-up | {e2e[step]['speedup']:.2f}x | | |")
    if report["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def e2e_plot(e2e: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [s for s in ("reward_step", "ppo_step") if all("median_ms" in e2e.get(s, {}).get(v, {})
                                                           for v in ("fastrm", "eager"))]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, variant in enumerate(("fastrm", "eager")):
        ax.bar([j + 0.4 * i for j in range(len(steps))], [e2e[s][variant]["median_ms"] for s in steps], 0.4,
               label=variant)
    ax.set_xticks([j + 0.2 for j in range(len(steps))], steps)
    ax.set_ylabel("median ms per step")
    ax.set_title(f"{e2e['model']}, B={e2e['batch']} T={e2e['seq']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = out / "e2e_steps.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm bench --gpu-suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results/gpu-suite-<UTC date>)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (default 480)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes, one test file, no compile: checks the plumbing in seconds (runs on CPU)")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("fastrm bench --gpu-suite needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run to check the plumbing on this machine", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or common.RESULTS_DIR / f"gpu-suite-{stamp}{'-dry-run' if args.dry_run else ''}"
    (out / "ops").mkdir(parents=True, exist_ok=True)
    suite = Suite(out, args.budget, args.dry_run)
    notes = []
    py = sys.executable

    # 1. CUDA-marked tests (the dry run only collects them: without a GPU they would all be skipped).
    tests = ["--collect-only", "tests/test_no_sync.py", "tests/test_torch_compile.py"] if args.dry_run else ["tests"]
    suite.stage("cuda_tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs",
                               f"--junitxml={out / 'cuda_tests.xml'}", *tests], limit_s=150)
    # 2. selfcheck
    suite.stage("selfcheck", [py, "-m", "fastrm", "selfcheck"] + (["--skip-bench"] if args.dry_run else []),
                limit_s=45)
    # 3. end-to-end steps (before the op benchmarks: on a short lease, the step times matter most)
    e2e_json = out / "e2e_steps.json"
    e2e_args = ["--tiny", "--steps", "1", "--warmup", "0"] if args.dry_run else ["--steps", "5", "--warmup", "2"]
    e2e_args += ["--json", str(e2e_json)]
    from benchmarks import e2e_steps

    suite.stage("e2e_steps", [py, "-m", "benchmarks.e2e_steps", *e2e_args], limit_s=120,
                call=lambda: e2e_steps.main(e2e_args))
    e2e = json.loads(e2e_json.read_text()) if e2e_json.exists() else None
    # 4. op benchmarks
    import importlib

    for op, (gpu_args, dry_args) in OP_BENCHES.items():
        argv_op = (dry_args + DRY_RUN_TIMING + ["--no-plots"] if args.dry_run else gpu_args) + ["--out", str(out / "ops")]
        script = importlib.import_module(f"benchmarks.bench_{op}")
        suite.stage(f"bench_{op}", [py, "-m", "benchmarks", op, *argv_op], limit_s=120 if op == "logprobs" else 60,
                    call=lambda s=script, a=argv_op: s.main(a))

    env = environment()
    if not env["optional_packages"]["matplotlib"]:
        notes.append("matplotlib is not installed: no PNG plots (pip install matplotlib for them)")
    elif e2e and e2e_plot(e2e, out) is None:
        notes.append("no end-to-end plot: a step failed")
    if not cuda:
        notes.append("no CUDA GPU: dry run only, every figure here is from the CPU and means nothing for a GPU")
    report = {"suite": "gpu_suite", "dry_run": args.dry_run, "budget_s": args.budget, "environment": env,
              "total_s": time.monotonic() - suite.start, "stages": suite.stages, "headline": headline(out),
              "e2e": e2e, "notes": notes}
    (out / "suite.json").write_text(json.dumps(report, indent=1))
    (out / "suite.md").write_text(render(report))
    print(render(report))
    print("wrote", out)
    failed = [s["stage"] for s in suite.stages if s["status"] not in ("ok", "skipped")]
    if failed:
        print("stages not ok: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
