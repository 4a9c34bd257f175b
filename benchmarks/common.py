"""Shared benchmark harness: timing, peak memory, environment record, JSON + markdown output.

CPU timings are wall-clock medians over repeats after warm-up; CUDA timings use
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Every results file records the
device, library versions and git commit, so a number can always be traced to what produced it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {platform.processor() or platform.machine()}",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "git_commit": commit + ("-dirty" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def time_fn(fn, *, repeats: int = 10, warmup: int = 2) -> dict:
    """Median and 20/80 percentiles in milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2]}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    q = statistics.quantiles(samples, n=5) if len(samples) > 1 else [samples[0]] * 4
    return {"median_ms": statistics.median(samples), "p20_ms": q[0], "p80_ms": q[3], "samples_ms": samples}


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_mb(fn) -> float | None:
    """Peak extra memory (MiB) allocated during one call.

    CUDA: the caching allocator's peak. CPU (Linux): the process's resident-set high-water mark,
    reset just before the call through /proc/self/clear_refs; exact as long as freed blocks go back
    to the OS, which :func:`reexec_with_exact_malloc` arranges. None where neither is available.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_mb("VmRSS")
    except OSError:
        return None
    fn()
    return _proc_status_mb("VmHWM") - base


def reexec_with_exact_malloc():
    """Re-run this script with glibc's mmap threshold pinned at 64 KiB.

    glibc otherwise raises the threshold after large frees and keeps later temporaries on its heap,
    where they stay resident and hide from (or linger in) the RSS peak. Call first thing in main().
    """
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    path = RESULTS_DIR / f"{name}_{kind}.json"
    payload = {"benchmark": name, "environment": env, "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=1))
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
