"""The shared benchmark harness: every op script (bench_*.py) is argparse + a few functions on top of this.

What one run does, for every size of the sweep and every provider (fastrm Triton, fastrm torch, the plain
PyTorch a user writes, ``torch.compile`` of it, an anchor library's own function):

1. **Agreement first.** The provider's output (and, when a backward mode is asked for, its input gradients)
   is compared with a float64 computation of the plain reference. A provider that disagrees beyond the
   dtype's tolerance is *refused*: it gets a row with ``status="wrong"`` and is never timed, and the run
   exits non-zero.
2. **Time** each mode -- ``fwd`` (under ``no_grad``, as in rollouts), ``bwd`` (the backward alone: each
   timed call backpropagates a graph made by an untimed forward just before) and ``fwd+bwd``. CUDA:
   ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls). CPU: wall clock after warm-up,
   at least ``--repeats`` calls and at least ``--min-time`` seconds, with the garbage collector paused;
   ``torch.get_num_threads()`` is recorded. Median and 20/80 percentiles.
3. **Peak memory** of one call. CUDA: the caching allocator's peak. CPU: the resident-set high-water mark
   (``/proc/self/clear_refs``), with glibc switched by ``mallopt`` to give every block of 64 KiB or more
   its own mmap for that one call (:func:`exact_malloc`), so freed memory leaves the RSS at once. Timed
   calls run with glibc's steady-state thresholds instead (:func:`timing_malloc`): a 64 KiB threshold
   for the whole process (``MALLOC_MMAP_THRESHOLD_=65536``) makes every mid-sized temporary a fresh mmap
   with its page faults: it slowed the chunked log-prob torch path about 2x and the Python GAE loop's
   backward 8x here (benchmarks/README.md), which a user's process does not pay.
4. **Bandwidth** for memory-bound ops: the op script states the bytes the op cannot avoid moving; GB/s is
   that over the median time, and ``% copy`` compares it with this device's ``tensor.copy_`` bandwidth,
   measured once per run (:func:`copy_bandwidth_gbs`).

Results: ``results/<name>_<cpu|cuda>.json`` (environment: device, torch / triton / CUDA versions, git
commit, date, threads, load average; every timing sample), a markdown table beside it, and PNG plots
of time and memory against size (matplotlib, ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest allowed max|got - want| / max|want| against float64, by the inputs' dtype. Loose enough for the
# plain PyTorch a user writes (TRL computes bf16 log-softmax in bf16), tight enough to catch a wrong answer.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# The thresholds used for memory measurement and for timing (glibc mallopt, through fastrm.runtime.glibc).
EXACT_MMAP_THRESHOLD = 64 * 1024
TIMING_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its dynamic threshold on 64-bit (its steady state)


def _glibc():
    from fastrm.runtime import glibc

    return glibc()


def timing_malloc() -> dict | None:
    """Fix glibc at the thresholds its dynamic scheme settles on in a long-running process (blocks up to
    32 MiB reused from the heap), so every provider is timed under the same, realistic allocator state."""
    libc = _glibc()
    if libc is None:
        return None
    from fastrm.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    libc.mallopt(M_MMAP_THRESHOLD, TIMING_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, 2 * TIMING_MMAP_THRESHOLD)
    return {"timing_mmap_threshold": TIMING_MMAP_THRESHOLD, "memory_mmap_threshold": EXACT_MMAP_THRESHOLD}


@contextlib.contextmanager
def exact_malloc():
    """For one measured call: every block >= 64 KiB gets its own mmap (returned to the OS when freed) and
    free heap pages are handed back first, so the RSS high-water mark is the call's true peak. Restores
    :func:`timing_malloc`'s state after. Yields whether glibc's controls were available."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    from fastrm.runtime import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD

    libc.mallopt(M_MMAP_THRESHOLD, EXACT_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, EXACT_MMAP_THRESHOLD)
    libc.malloc_trim(0)
    try:
        yield True
    finally:
        timing_malloc()


def run_script(main):
    """A script's ``__main__``."""
    sys.exit(main())


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=BENCH_DIR, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    """Everything needed to trace a number back to what produced it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fastrm

    cuda = torch.cuda.is_available()
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU: {_cpu_name()}",
        "device_kind": device_kind(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "fastrm": fastrm.__version__,
        "python": platform.python_version(),
        "git_commit": commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_avg_start": list(os.getloadavg()),
        "fastrm_check_values": os.environ.get("FASTRM_CHECK_VALUES", "1") != "0",
    }


def cpu_busy_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process) -- Linux only.
    Two readings give the cores that *other* processes kept busy in between: the noise on a CPU timing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    own = os.times()
    return (time.monotonic(), (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"),
            own.user + own.system)


def other_processes_load(start, end) -> float | None:
    """Average number of cores busy with other processes between two :func:`cpu_busy_seconds` readings."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def available_memory_bytes() -> int | None:
    """Free device memory (CUDA) or MemAvailable (CPU, Linux); None when unknown."""
    if torch.cuda.is_available():
        _free_memory()  # blocks cached by the allocator count as free
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------
# Timing, memory, bandwidth
# ---------------------------------------------------------------------------------------------------


def percentile(sorted_samples: list[float], q: float) -> float:
    """Linear-interpolated q-quantile (0 <= q <= 1) of already sorted samples."""
    if not sorted_samples:
        return float("nan")
    pos = q * (len(sorted_samples) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    return {"median_ms": percentile(s, 0.5), "p20_ms": percentile(s, 0.2), "p80_ms": percentile(s, 0.8),
            "n_samples": len(s), "samples_ms": samples_ms}


def time_fn(fn, *, setup=None, repeats: int = 10, min_time_s: float = 0.5, max_time_s: float = 30.0,
            max_repeats: int = 1000, warmup: int = 2, grad_to_none=None) -> dict:
    """Median and 20/80 percentiles (ms) of ``fn()``, with every sample; ``setup()`` (untimed) runs before
    each call when given (the backward-only mode makes its forward there).

    CUDA: ``triton.testing.do_bench`` (its own warm-up and repeat counts, L2 flushed before each call), or
    with ``setup`` the same scheme written out with CUDA events. CPU: ``warmup`` calls, then at least
    ``repeats`` timed calls and enough to fill ``min_time_s`` (at most ``max_repeats``), GC paused; a call
    so slow that ``repeats`` of them would pass ``max_time_s`` gets as many as fit there, at least 3.
    """
    if torch.cuda.is_available():
        if setup is None:
            import triton.testing

            try:
                samples = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="all")
            except (AssertionError, TypeError, ValueError):  # an older triton without return_mode="all"
                q = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])
                return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "n_samples": None, "samples_ms": []}
            return summarize([float(s) for s in samples])
        return summarize(_cuda_events_with_setup(fn, setup, warmup_ms=25, rep_ms=100))
    setup = setup or (lambda: None)
    estimate = 0.0
    for _ in range(max(1, warmup)):
        setup()
        start = time.perf_counter()
        fn()
        estimate = time.perf_counter() - start
    n = min(max_repeats, max(repeats, math.ceil(min_time_s / max(estimate, 1e-9))))
    if n * estimate > max_time_s:
        n = max(3, int(max_time_s / estimate))
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            setup()
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(samples)


def _cuda_events_with_setup(fn, setup, warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's scheme (L2 flushed by zeroing 256 MiB, CUDA events around each call) with an untimed setup."""
    flush = torch.empty(2**26, dtype=torch.int32, device="cuda")

    def one():
        setup()
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    events = [one() for _ in range(3)]
    torch.cuda.synchronize()
    estimate = max(1e-3, sum(s.elapsed_time(e) for s, e in events) / len(events))
    for _ in range(max(1, int(warmup_ms / estimate))):
        one()
    events = [one() for _ in range(max(5, int(rep_ms / estimate)))]
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_mb(fn, setup=None) -> float | None:
    """Peak extra memory (MiB) allocated during one call of ``fn`` (after an unmeasured ``setup()``).

    CUDA: the caching allocator's peak. CPU (Linux): the process's resident-set high-water mark, reset
    just before the call through /proc/self/clear_refs, under :func:`exact_malloc` so that freed blocks
    leave the RSS at once (without glibc it is approximate). None where neither is available.
    """
    if setup is not None:
        setup()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with exact_malloc():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            base = _proc_status_mb("VmRSS")
        except (OSError, KeyError):
            return None
        fn()
        return _proc_status_mb("VmHWM") - base


@functools.lru_cache(maxsize=None)  # once per process: `python -m benchmarks` runs several ops
def copy_bandwidth_gbs(nbytes: int | None = None) -> dict:
    """This device's ``dst.copy_(src)`` bandwidth: bytes = read src + write dst = 2 * nbytes.

    The denominator of every "% copy" column. Default buffer: 1 GiB on CUDA (well past L2), 256 MiB on CPU.
    """
    if nbytes is None:
        nbytes = 2**30 if torch.cuda.is_available() else 2**28
    device = device_kind()
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.zeros_like(src)
    t = time_fn(functools.partial(dst.copy_, src), repeats=10, min_time_s=0.3)
    del src, dst
    return {"copy_gbs": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9, "copy_buffer_bytes": nbytes}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and ("out of memory" in text or "can't allocate" in text)


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Agreement with float64
# ---------------------------------------------------------------------------------------------------


def relative_error(pairs) -> float:
    """``max |got - want| / max |want|`` over an iterable of ``(got, want)`` tensor pairs (chunks of
    one result may come one pair at a time, so a float64 reference never has to exist whole)."""
    diff = ref = 0.0
    for got, want in pairs:
        want = want.double()
        diff = max(diff, (got.double() - want).abs().max().item())
        ref = max(ref, want.abs().max().item())
    if math.isnan(diff):
        return math.inf
    return diff / ref if ref > 0 else diff


def float64_autograd_reference(fn, inputs, grad_inputs, grad_outputs):
    """Outputs and input gradients of ``fn`` run in float64 (integer inputs stay as they are)."""
    leaves = [x.detach().double().requires_grad_(i in grad_inputs) if x.is_floating_point() else x
              for i, x in enumerate(inputs)]
    outs = as_tuple(fn(*leaves))
    grads = _input_grads(outs, [w.double() for w in grad_outputs], [leaves[i] for i in grad_inputs])
    return [o.detach() for o in outs], list(grads)


def autograd_case(size: dict, reference, inputs: tuple, grad_inputs: tuple, grad_outputs: tuple | None = None,
                  bytes_moved=None, extra: dict | None = None) -> "Case":
    """A :class:`Case` judged against ``reference`` run in float64 under autograd (once, on first use).

    ``grad_outputs`` default to a single scalar 1 (a loss)."""
    device = inputs[0].device
    if grad_outputs is None:
        grad_outputs = (torch.ones((), device=device),)
    truth = {}

    def check(outs, grads):
        if not truth:
            truth["out"], truth["grad"] = float64_autograd_reference(reference, inputs, grad_inputs, grad_outputs)
        err = {"out": relative_error(zip(outs, truth["out"]))}
        if grads is not None:
            err["grad"] = relative_error(zip(grads, truth["grad"]))
        return err

    return Case(size=size, inputs=tuple(inputs), grad_inputs=tuple(grad_inputs), grad_outputs=tuple(grad_outputs),
                check=check, bytes_moved=bytes_moved, extra=extra or {})


def _input_grads(outs, grad_outputs, inputs) -> tuple:
    """d(sum of outputs weighted by grad_outputs) / d inputs, as ``torch.autograd.grad`` returns them.

    Not ``.backward()``: accumulating into a leaf's ``.grad`` may copy a gradient that aliases a saved
    tensor (``inplace_backward`` writes d logits into the logits buffer), a copy no real model makes since
    there the logits come out of a matmul, not a leaf."""
    pairs = [(o, w) for o, w in zip(as_tuple(outs), grad_outputs) if o.requires_grad]
    if not pairs:
        raise RuntimeError("output has no gradient: the provider is not differentiable")
    return torch.autograd.grad([o for o, _ in pairs], inputs, [w for _, w in pairs])


def fastrm_backends(device: str) -> list[str]:
    """fastrm's backends worth timing here: Triton only compiled on CUDA (never the CPU interpreter)."""
    from fastrm import kernels

    return ["triton", "torch"] if device == "cuda" and kernels.HAS_TRITON else ["torch"]


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# ---------------------------------------------------------------------------------------------------
# Providers, cases, the run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One implementation of an op: ``fn(*case.inputs)`` returns the op's output(s)."""

    name: str
    fn: Callable
    modes: tuple = MODES  # the modes this provider takes part in


@dataclass
class Case:
    """One size of one op: inputs shared by every provider, and how to judge an answer.

    ``check(outputs, grads)`` returns ``{"out": err, "grad": err}`` (``relative_error`` against float64;
    ``grads`` is None when only the forward was run). ``bytes_moved(mode)`` is the traffic the op cannot
    avoid, or None for an op that is not memory-bound.
    """

    size: dict
    inputs: tuple
    grad_inputs: tuple          # indices of the inputs that get a gradient in bwd / fwd+bwd
    grad_outputs: tuple         # the incoming gradient for each output (a fixed random weighting)
    check: Callable
    bytes_moved: Callable | None = None
    extra: dict = field(default_factory=dict)  # e.g. layout, dtype names: copied into every row


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every op script shares; each script adds its own size options."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="the CPU-sized subset of the sweep (default on CPU)")
    sweep.add_argument("--full", action="store_true", help="the full sweep (default on CUDA)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="input dtype (each op has its default)")
    p.add_argument("--modes", type=_mode_list, default=list(MODES), help="comma-separated subset of fwd,bwd,fwd+bwd")
    p.add_argument("--providers", type=_str_list, default=None,
                   help="comma-separated names (or parts of names) of the providers to run; default all")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile of the plain reference (default: on with CUDA; off on CPU, "
                        "where inductor compiles each shape for 1-20 s)")
    p.add_argument("--repeats", type=int, default=10, help="CPU: at least this many timed calls per measurement")
    p.add_argument("--min-time", type=float, default=0.5, help="CPU: time at least this many seconds per measurement")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's choice)")
    p.add_argument("--value-checks", action=argparse.BooleanOptionalAction, default=True,
                   help="fastrm's value checks (label range, finiteness; one sync each) as a user gets them")
    p.add_argument("--copy-buffer-mib", type=int, default=None,
                   help="buffer for the copy-bandwidth reference (default 1024 on CUDA, 256 on CPU)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write no files")
    p.add_argument("--no-plots", action="store_true", help="write JSON and markdown but no PNG plots")
    return p


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def int_list(text: str) -> list[int]:
    return [int(v) for v in _str_list(text)]


def _mode_list(text: str) -> list[str]:
    modes = _str_list(text)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return modes


def add_size_options(parser: argparse.ArgumentParser, **helps: str):
    """One ``--KEY 1,2,3`` option per size key of the sweep; each replaces that key's list of values."""
    for key, help_ in helps.items():
        parser.add_argument(f"--{key}", type=int_list, default=None, help=f"comma-separated {help_}")


def sweep(args, quick: dict, full: dict) -> list[dict]:
    """The sizes to run: the product of the chosen grid's lists, each list replaceable by ``--KEY``."""
    grid = dict(full if args.full else quick)
    for key in grid:
        if getattr(args, key, None):
            grid[key] = getattr(args, key)
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


class Run:
    """One benchmark run of one op: settings, rows, notes; ``finish()`` writes the results."""

    def __init__(self, name: str, op: str, args, *, baseline: str, plot_x: str, plot_panel: str | None = None,
                 default_dtype: str | None = None, bytes_formula: str | None = None):
        self.name, self.op, self.args, self.baseline = name, op, args, baseline
        self.plot = {"x": plot_x, "panel": plot_panel}
        self.bytes_formula = bytes_formula
        self.device = device_kind()
        cuda = self.device == "cuda"
        if not (args.quick or args.full):
            args.full = cuda
        if args.compile is None:
            args.compile = cuda
        self.dtype = DTYPES[args.dtype or default_dtype or ("bfloat16" if cuda else "float32")]
        if args.threads:
            torch.set_num_threads(args.threads)
        if not args.value_checks:
            os.environ["FASTRM_CHECK_VALUES"] = "0"
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.env = environment()
        self.env["malloc"] = timing_malloc() if not cuda else None
        self.env.update(copy_bandwidth_gbs(args.copy_buffer_mib * 2**20 if args.copy_buffer_mib else None))
        self.cpu_start = cpu_busy_seconds()  # the run proper starts here
        print(f"{name}: {self.env['device']} | torch {self.env['torch']} | triton {self.env['triton']} | "
              f"threads {self.env['torch_threads']} | load {self.env['load_avg_start'][0]:.2f} | "
              f"copy {self.env['copy_gbs']:.1f} GB/s | {'full' if args.full else 'quick'} sweep | "
              f"{str(self.dtype)[6:]} | compile {'on' if args.compile else 'off'}")
        if not cuda and self.env["load_avg_start"][0] > 0.5:
            self.note(f"load average {self.env['load_avg_start'][0]:.2f} at start: other work shares the CPU, "
                      "timings are noisy")
        if not cuda and self.env["malloc"] is None:
            self.note("glibc's mallopt is not available: CPU peak-memory figures are approximate")

    # --- notes and filters --------------------------------------------------------------------------

    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)
            print("note:", text)

    def select(self, providers: list[Provider]) -> list[Provider]:
        wanted = self.args.providers
        if not wanted:
            return providers
        return [p for p in providers if any(w == p.name or w in p.name for w in wanted)]

    def fits(self, size: dict, needed_bytes: int) -> bool:
        """False (with a note) when the size cannot fit in this device's available memory."""
        avail = available_memory_bytes()
        if avail is None or needed_bytes <= 0.85 * avail:
            return True
        self.note(f"skipped {_size_text(size)}: needs about {needed_bytes / 2**30:.1f} GiB, "
                  f"{avail / 2**30:.1f} GiB available")
        self.rows.append({**size, "dtype": str(self.dtype)[6:], "provider": "*", "mode": "*", "status": "skipped",
                          "note": "does not fit in memory"})
        return False

    # --- the sweep --------------------------------------------------------------------------------

    def sweep_and_finish(self, sizes: list[dict], make_case: Callable[[dict], Case], providers,
                         memory_needed: Callable[[dict], int] | None = None) -> int:
        """Bench every size that fits (``memory_needed(size)`` bytes), then :meth:`finish`.
        ``providers`` is a list, or a function of the size returning one."""
        for size in sizes:
            if memory_needed is None or self.fits(size, memory_needed(size)):
                self.bench(make_case(size), providers(size) if callable(providers) else providers)
        return self.finish()

    # --- one size ---------------------------------------------------------------------------------

    def bench(self, case: Case, providers: list[Provider]):
        """Check, then time and measure, every provider on one case."""
        print(f"  {_size_text(case.size)}")
        for provider in self.select(providers):
            modes = [m for m in self.args.modes if m in provider.modes]
            if modes:
                self._bench_provider(case, provider, modes)

    def _row(self, case, provider, mode, status, **fields) -> dict:
        row = {**case.size, **case.extra, "dtype": str(self.dtype)[6:], "provider": provider.name, "mode": mode,
               "status": status, **fields}
        self.rows.append(row)
        return row

    def _bench_provider(self, case: Case, provider: Provider, modes: list[str]):
        need_grad = any(m != "fwd" for m in modes)
        tol = TOLERANCE[self.dtype]
        try:
            err, failure = self.check(case, provider, need_grad), None
        except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the others
            err, failure = None, exc
        if failure is not None:
            self._failed(case, provider, modes, failure)
            return
        worst = max(v for v in err.values() if v is not None)
        if not worst <= tol:
            for mode in modes:
                self._row(case, provider, mode, "wrong", err_out=err["out"], err_grad=err.get("grad"), tol=tol,
                          note="disagrees with float64: refused, not timed")
            print(f"    {provider.name:<28} REFUSED: disagrees with float64 by {worst:.3g} (tolerance {tol:g})")
            return
        for mode in modes:
            try:
                call, setup = self._mode_call(case, provider, mode)
                t = time_fn(call, setup=setup, repeats=self.args.repeats, min_time_s=self.args.min_time)
                peak = peak_memory_mb(call, setup)
                del call, setup
            except Exception as exc:  # noqa: BLE001
                failure = exc
            if failure is not None:  # handled out here, where the traceback no longer holds the tensors
                self._failed(case, provider, [mode], failure)
                failure = None
                continue
            nbytes = case.bytes_moved(mode) if case.bytes_moved else None
            gbs = nbytes / (t["median_ms"] * 1e-3) / 1e9 if nbytes else None
            row = self._row(case, provider, mode, "ok", **t, peak_mb=peak, bytes=nbytes, gbs=gbs,
                            pct_copy_bw=100 * gbs / self.env["copy_gbs"] if gbs else None,
                            err_out=err["out"], err_grad=err.get("grad"), tol=tol)
            print(f"    {provider.name:<28} {mode:<8} {row['median_ms']:>10.3f} ms  "
                  f"[{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]  peak {_fmt(peak)} MiB"
                  + (f"  {gbs:.1f} GB/s" if gbs else ""))
        _free_memory()

    def _failed(self, case: Case, provider: Provider, modes: list[str], exc: BaseException):
        """Rows for a provider that raised: ``skipped`` when it ran out of memory, else ``error``."""
        status = "skipped" if _is_oom(exc) else "error"
        exc.__traceback__ = None
        _free_memory()
        text = f"{type(exc).__name__}: {str(exc)[:200]}"
        for mode in modes:
            self._row(case, provider, mode, status, note=text)
        print(f"    {provider.name:<28} {','.join(modes):<8} {status.upper()}: {text[:120]}")

    def check(self, case: Case, provider: Provider, need_grad: bool) -> dict:
        """Run the provider once on fresh copies of the inputs and compare with float64."""
        leaves = list(case.inputs)
        grads = None
        if need_grad:
            for i in case.grad_inputs:
                leaves[i] = case.inputs[i].detach().clone().requires_grad_(True)
            outs = as_tuple(provider.fn(*leaves))
            grads = list(_input_grads(outs, case.grad_outputs, [leaves[i] for i in case.grad_inputs]))
        else:
            with torch.no_grad():
                outs = as_tuple(provider.fn(*[x.detach().clone() if x.is_floating_point() else x
                                              for x in case.inputs]))
        err = case.check([o.detach() for o in outs], grads)
        del leaves, outs, grads
        return err

    @staticmethod
    def _mode_call(case: Case, provider: Provider, mode: str):
        """``(call, setup)`` for one mode: the timed zero-argument callable, and an untimed callable run
        before each call (or None)."""
        fn = provider.fn
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    fn(*case.inputs)
            return forward, None
        leaves = list(case.inputs)
        for i in case.grad_inputs:
            leaves[i] = case.inputs[i].detach().clone().requires_grad_(True)
        grad_leaves = [leaves[i] for i in case.grad_inputs]

        def backward(outs):
            _input_grads(outs, case.grad_outputs, grad_leaves)  # the gradients are freed inside the call

        if mode == "fwd+bwd":
            return lambda: backward(fn(*leaves)), None
        # bwd: a fresh forward before every call, untimed. (Backpropagating one retained graph again and
        # again is not an option: an in-place backward overwrites what the graph saved.)
        graph = []

        def make_graph():
            graph.append(fn(*leaves))
        return lambda: backward(graph.pop()), make_graph

    # --- results ----------------------------------------------------------------------------------

    def finish(self) -> int:
        """Ratios against the baseline, then the table, JSON, markdown and plots. Returns the exit code:
        1 when a provider was refused or a fastrm provider failed, else 0."""
        add_ratios(self.rows, self.baseline)
        self.env["load_avg_end"] = list(os.getloadavg())  # includes this run's own threads
        self.env["other_processes_load"] = other_processes_load(self.cpu_start, cpu_busy_seconds())
        if self.device == "cpu" and (self.env["other_processes_load"] or 0) > 0.25:
            self.note(f"other processes kept {self.env['other_processes_load']:.2f} cores busy on average during "
                      "this run: CPU timings are noisy")
        size_keys = [k for k in self.rows[0] if k not in ROW_FIELDS] if self.rows else []
        result = {
            "benchmark": self.name, "op": self.op, "environment": self.env,
            "config": {"argv": sys.argv[1:], "sweep": "full" if self.args.full else "quick",
                       "dtype": str(self.dtype)[6:], "modes": self.args.modes, "compile": self.args.compile,
                       "repeats": self.args.repeats, "min_time_s": self.args.min_time,
                       "value_checks": self.args.value_checks},
            "baseline": self.baseline, "size_keys": size_keys, "plot": self.plot,
            "bytes_formula": self.bytes_formula, "tolerance": TOLERANCE[self.dtype], "notes": self.notes,
            "rows": self.rows,
        }
        table = markdown_table(result)
        print()
        print(table)
        if not self.args.no_save:
            for path in write_results(result, self.args.out, plots=not self.args.no_plots):
                print("wrote", path)
        self.result = result
        return exit_code(self.rows)


ROW_FIELDS = {"dtype", "provider", "mode", "status", "median_ms", "p20_ms", "p80_ms", "n_samples", "samples_ms",
              "peak_mb", "bytes", "gbs", "pct_copy_bw", "err_out", "err_grad", "tol", "note", "speedup",
              "mem_ratio", "cpu_ms", "paired_ratio"}  # paired_ratio: median time ratio to the baseline, interleaved


def exit_code(rows: list[dict]) -> int:
    bad = [r for r in rows if r["status"] == "wrong" or (r["status"] == "error" and r["provider"].startswith("fastrm"))]
    return 1 if bad else 0


def add_ratios(rows: list[dict], baseline: str):
    """speedup = baseline median / median; mem_ratio = peak / baseline peak (same size and mode)."""
    def key(r):
        return tuple((k, v) for k, v in r.items() if k not in ROW_FIELDS) + (("mode", r["mode"]),)

    base = {key(r): r for r in rows if r["provider"] == baseline and r["status"] == "ok"}
    for r in rows:
        b = base.get(key(r))
        if r["status"] != "ok" or b is None:
            continue
        r["speedup"] = b["median_ms"] / r["median_ms"] if r["median_ms"] > 0 else None
        r["mem_ratio"] = r["peak_mb"] / b["peak_mb"] if r.get("peak_mb") is not None and b.get("peak_mb") else None


def _size_text(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(result: dict) -> str:
    """One row per (size, mode, provider): time with the 20-80 % range, speed-up and memory vs the baseline,
    bandwidth (memory-bound ops), agreement with float64."""
    rows, keys, base = result["rows"], result["size_keys"], result["baseline"]
    show_bw = any(r.get("gbs") for r in rows)
    cols = keys + ["mode", "provider", "median ms", "p20-p80 ms", f"x vs {base}", "peak MiB", f"mem vs {base}"]
    cols += ["GB/s", "% copy BW"] if show_bw else []
    cols += ["max rel err", "status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["status"] == "ok":
            err = max(e for e in (r.get("err_out"), r.get("err_grad")) if e is not None)
            cells = [_fmt(r.get(k)) for k in keys] + [
                r["mode"], r["provider"], _fmt(r["median_ms"]), f"{_fmt(r['p20_ms'])}-{_fmt(r['p80_ms'])}",
                _fmt(r.get("speedup"), 2) + ("x" if r.get("speedup") else ""), _fmt(r.get("peak_mb")),
                _fmt(r.get("mem_ratio"), 2)]
            cells += [_fmt(r.get("gbs")), _fmt(r.get("pct_copy_bw"), 2)] if show_bw else []
            cells += [f"{err:.1e}", "ok"]
        else:
            cells = [_fmt(r.get(k)) for k in keys] + [r["mode"], r["provider"]] + [""] * (len(cols) - len(keys) - 4)
            cells += [f"{r['err_out']:.1e}" if r.get("err_out") is not None else "", f"{r['status']}: {r.get('note', '')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_environment(result: dict) -> str:
    e = result["environment"]
    parts = [f"**{e['device']}**", f"torch {e['torch']}", f"triton {e['triton']}"]
    if e.get("cuda"):
        parts.append(f"CUDA {e['cuda']}")
    else:
        parts.append(f"{e['torch_threads']} torch threads of {e['cpu_cores']} cores")
        parts.append(f"load avg {e['load_avg_start'][0]:.2f} at start")
        if e.get("other_processes_load") is not None:
            parts.append(f"other processes busy {e['other_processes_load']:.2f} cores during the run")
    parts += [f"copy bandwidth {e['copy_gbs']:.1f} GB/s", f"commit {e['git_commit']}", e["date"],
              f"{result['config']['sweep']} sweep, {result['config']['dtype']}"]
    return ", ".join(parts)


def result_stem(result: dict) -> str:
    return f"{result['benchmark']}_{result['environment']['device_kind']}"


def write_results(result: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>_time.png`` / ``<stem>_memory.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=1))
    notes = "".join(f"- {n}\n" for n in result["notes"])
    md_path.write_text(f"### {result['benchmark']} ({result['op']})\n\n{describe_environment(result)}\n\n"
                       + (f"{notes}\n" if notes else "") + markdown_table(result) + "\n")
    written = [json_path, md_path]
    if plots:
        written += plot_results(result, out_dir)
    return written


def plot_results(result: dict, out_dir: Path) -> list[Path]:
    """Median time (with the 20-80 % band as error bars) and peak memory against size, one line per provider;
    one panel per mode (columns) and per value of the panel key (rows). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        print("note: matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return []
    x_key, panel_key = result["plot"]["x"], result["plot"]["panel"]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    panels = sorted({r.get(panel_key) for r in rows}, key=lambda v: (v is None, v)) if panel_key else [None]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}  # the same in every panel
    markers = {p: "osD^vP*X"[i % 8] for i, p in enumerate(providers)}
    paths = []
    for metric, label, fname in (("median_ms", "median time (ms)", "time"), ("peak_mb", "peak memory (MiB)", "memory")):
        fig, axes = plt.subplots(len(panels), len(modes), figsize=(max(6.4, 4.2 * len(modes)), 3.4 * len(panels)),
                                 squeeze=False)
        for i, panel in enumerate(panels):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for provider in providers:
                    pts = sorted((r[x_key], r) for r in rows if r["provider"] == provider and r["mode"] == mode
                                 and (panel_key is None or r.get(panel_key) == panel) and r.get(metric) is not None)
                    if not pts:
                        continue
                    xs = [p[0] for p in pts]
                    ys = [p[1][metric] for p in pts]
                    if metric == "median_ms":
                        err = [[y - p[1]["p20_ms"] for y, p in zip(ys, pts)], [p[1]["p80_ms"] - y for y, p in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, marker=markers[provider], capsize=2, label=provider,
                                    color=colors[provider])
                    else:
                        ax.plot(xs, ys, marker=markers[provider], label=provider, color=colors[provider])
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                if metric == "median_ms":  # time spans decades; memory starts at 0 (in-place, fused)
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # a label even within a decade
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                else:
                    ax.set_ylim(bottom=0)
                ax.set_xlabel(x_key)
                ax.set_ylabel(label)
                ax.set_title(f"{mode}" + (f", {panel_key}={panel}" if panel_key else ""), fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
        if not any(ax.has_data() for ax in axes.flat):  # e.g. no provider measured peak memory
            plt.close(fig)
            continue
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes.flat:  # every provider once, even those missing from the first panel
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
        e = result["environment"]
        fig.suptitle(f"{result['op']}: {label} | {e['device']} | torch {e['torch']} | {result['config']['dtype']}",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.07 + 0.03 * ((len(labels) - 1) // 4), 1, 0.95))
        path = Path(out_dir) / f"{result_stem(result)}_{fname}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# benchmarks/README.md
# ---------------------------------------------------------------------------------------------------

README = BENCH_DIR / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def render_results_section(results_dir: Path = RESULTS_DIR) -> str:
    """The markdown of every results/*.json: where it came from, notes, the table and its plots."""
    parts = []
    for path in sorted(Path(results_dir).glob("*.json")):
        result = json.loads(path.read_text())
        stem = result_stem(result)
        notes = "".join(f"- {n}\n" for n in result["notes"])
        parts.append(f"### {result['benchmark']} ({result['op']}) on {result['environment']['device']}\n\n"
                     f"{describe_environment(result)}. File: `results/{path.name}`.\n\n"
                     + (f"{notes}\n" if notes else "") + markdown_table(result) + "\n")
        for fname in ("time", "memory"):
            if (Path(results_dir) / f"{stem}_{fname}.png").exists():
                parts.append(f"![{result['op']} {fname}](results/{stem}_{fname}.png)\n")
    return "\n".join(parts) if parts else "No results yet.\n"


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> Path:
    """Replace what stands between the results markers of benchmarks/README.md."""
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + render_results_section(results_dir) + "\n" + text[end:])
    return readme
