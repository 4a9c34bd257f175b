"""Compile every Triton kernel variant fastrm's ops launch, for real NVIDIA targets, on a machine without a GPU.

Two steps, two processes:

1. **Record** (this process, kernels under ``TRITON_INTERPRET=1``): :func:`run_workload` calls every public
   op with ``backend="triton"`` on small CPU tensors, over every option that reaches a kernel (dtypes, short
   and long rows, mask dtypes, strided inputs, every ``agg`` / KL kind / flag, forward and backward), with
   the block sizes and warps of a compiled run (:func:`fastrm.kernels.compiled_launch_settings`). Each
   kernel launch is intercepted and written down -- kernel, argument dtypes and alignments, integer values,
   constexprs, ``num_warps`` -- and not run (the op carries on with its freshly allocated outputs, value
   checks off: only what is launched matters here). No launch is enumerated by hand: a new kernel, or a new
   option that changes a launch, is recorded as soon as the workload calls the op with it (:func:`op_axes`
   lists what the workload varies; ``tests/test_kernel_compile.py`` fails when an op gains a keyword it
   does not know about, or a kernel that no op call launches).
2. **Compile** (a child process without the interpreter, its own empty Triton cache): each recorded launch
   is replayed with ``JITFunction.warmup`` against a stand-in driver that reports a CUDA target, so Triton
   itself binds the arguments and picks the specialisation (integer args equal to 1 or divisible by 16,
   16-byte-aligned pointers) exactly as on a GPU. Launches that land on the same compiled variant are
   compiled once. Each variant is lowered to PTX and assembled by the ptxas bundled with Triton, whose
   ``-v`` log gives registers, spills and stack; a pool of processes shares the work.

``python -m benchmarks.kernel_compile`` prints the table; :mod:`benchmarks.kernel_resources` writes the
resource report. Results are a list of dicts (one per variant and target), see :func:`compile_variants`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Compute capability per target name. sm_100 needs the ptxas of CUDA >= 12.8 (Triton bundles it as
# ptxas-blackwell); :func:`supported_targets` drops a target the bundled ptxas cannot assemble.
TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
DEFAULT_TARGETS = ("sm_80", "sm_90")


# ---------------------------------------------------------------------------------------------------
# 1. Recording launches
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch as Triton sees it: enough to replay it for compilation."""

    kernel: str  # "module:qualname" of the @triton.jit function
    args: list  # per positional argument: {"tensor": dtype name, "aligned": bool} | int | float | bool | None
    kwargs: dict  # constexprs and launch options (num_warps, num_stages)
    op: str  # the op call that launched it, e.g. "gather_logprobs dtype=bfloat16 V=32000 return_entropy=True"
    role: str = ""  # the call's place in the workload: "heaviest", "lightest", "value" or "all" (--full)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _describe_arg(x):
    if isinstance(x, torch.Tensor):
        return {"tensor": str(x.dtype).replace("torch.", ""), "aligned": x.data_ptr() % 16 == 0}
    if isinstance(x, (bool, int, float)) or x is None:
        return x
    raise TypeError(f"kernel argument of type {type(x).__name__} cannot be recorded")


class LaunchRecorder:
    """Context manager: while active, every interpreted kernel launch is recorded instead of run, with the
    compiled launch settings in force and the ops' value checks off (the outputs hold no values)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.op, self.role = "?", ""

    @contextlib.contextmanager
    def calling(self, op: str, role: str = ""):
        """Label the launches made inside the block with the op call that makes them."""
        saved, (self.op, self.role) = (self.op, self.role), (op, role)
        try:
            yield
        finally:
            self.op, self.role = saved

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        from fastrm import kernels

        if not kernels.INTERPRET:
            raise RuntimeError("recording needs the kernels interpreted: set TRITON_INTERPRET=1 before importing fastrm")
        self._cls, self._run = InterpretedFunction, InterpretedFunction.run
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            fn = fn_self.fn
            recorder.launches.append(Launch(f"{fn.__module__}:{fn.__qualname__}", [_describe_arg(a) for a in args],
                                            {k: _describe_arg(v) for k, v in kwargs.items()}, recorder.op,
                                            recorder.role))

        InterpretedFunction.run = run
        self._settings = kernels.compiled_launch_settings()
        self._settings.__enter__()
        self._checks = os.environ.get("FASTRM_CHECK_VALUES")
        os.environ["FASTRM_CHECK_VALUES"] = "0"
        return self

    def __exit__(self, *exc):
        if self._checks is None:
            os.environ.pop("FASTRM_CHECK_VALUES", None)
        else:
            os.environ["FASTRM_CHECK_VALUES"] = self._checks
        self._settings.__exit__(*exc)
        self._cls.run = self._run
        return False


def kernel_functions() -> dict[str, object]:
    """Every launchable kernel (a ``@triton.jit`` function named ``*_kernel``) of fastrm.kernels' modules."""
    import pkgutil

    import fastrm.kernels as pkg

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "fn") and getattr(value.fn, "__module__", None) == module.__name__:
                found[f"{module.__name__}:{name}"] = value
    return found


def kernel_parameters(kernel: str) -> list[str]:
    """Parameter names of a kernel given as "module:name" or its bare name."""
    import inspect

    for name, fn in kernel_functions().items():
        if kernel in (name, name.split(":")[1]):
            return list(inspect.signature(fn.fn).parameters)
    raise KeyError(kernel)


# ---------------------------------------------------------------------------------------------------
# The workload: every op, every option that reaches a kernel
# ---------------------------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
# Rows: short (one chunk smaller than the default block) and long (several default-size chunks). The long
# sizes are multiples of 16, as padded batches usually are, so Triton's divisibility specialisation of the
# integer arguments is covered on one side and not on the other.
SHORT_T, LONG_T = 37, 3072
SHORT_V, LONG_V = 1000, 32000


def op_axes() -> dict[str, dict[str, tuple]]:
    """Per op, the call options that reach a kernel launch and their values, light to heavy. Enumerations
    come from the ops themselves (agg modes, KL kinds, reductions), so a new value is covered as it lands;
    ``tests/test_kernel_compile.py`` fails when an op gains a keyword that is neither here nor in
    :data:`NOT_KERNEL_OPTIONS`."""
    from fastrm.ops import ppo, ranking

    rows = {"T": (SHORT_T, LONG_T), "mask": ("bool", "int64", "float")}
    return {
        "gather_logprobs": {"V": (SHORT_V, LONG_V), "strided": (False, True), "return_entropy": (False, True),
                            "inplace_backward": (False, True), "softcap": (None, 30.0), "labels": ("one", "K=5"),
                            "grad": (False, True)},
        "linear_logprobs": {"return_entropy": (False, True), "bias": (False, True), "skip_ignored": (False, True),
                            "softcap": (None, 30.0), "grad": (False, True)},
        "compute_gae": {**rows, "bootstrap_value": (False, True), "grad": (False, True)},
        "ppo_policy_loss": {**rows, "grad": (False, True), "dual_clip": (None, 3.0), "agg": ppo.AGG_MODES,
                            "ratio_level": ppo.RATIO_LEVELS, "strided": (False, True),
                            "policy_loss": tuple(reversed(ppo.POLICY_LOSSES))},  # heaviest: ppo, with the dual clip
        "value_loss": {**rows, "grad": (False, True), "clip": (None, 0.2), "agg": ppo.AGG_MODES},
        "kl_penalty": {"T": rows["T"], "kind": ppo.KL_KINDS, "grad": ("none", "ref_logprobs", "logprobs", "both")},
        "pairwise_ranking_loss": {"N": (37, 3000), "margin": (None, 0.5, "tensor"), "center_coef": (0.0, 0.01),
                                  "reduction": ranking.REDUCTIONS, "grad": (False, True)},
        "ranking_loss": {"K": (4, 300), "ranks": ("int32", "int64"), "grad": (False, True)},
    }


# Keyword options of the ops that never change what is launched (runtime floats, the backend, how work is
# split on the host or held between forward and backward, metrics computed in torch).
NOT_KERNEL_OPTIONS = {"temperature", "ignore_index", "backend", "chunk_size", "keep_logits", "gamma", "lam",
                      "clip_eps", "clip_eps_high", "return_accuracy", "loss_scale_factor", "sapo_tau_pos",
                      "sapo_tau_neg"}


def workload_calls(full: bool = False) -> list[tuple[str, str, dict, str]]:
    """``(op, dtype, options, role)`` to run. ``full``: every combination. Otherwise a covering set: per op, the
    heaviest combination (the last value of every axis: longest rows, every flag on) in every dtype, the
    lightest one, and each remaining value of each axis once in the heaviest setting. So every dtype and
    every value of every option -- hence every constexpr branch -- is compiled, and in every dtype the
    configuration most likely to spill. (The full product is ~450 variants per target: minutes of
    compiling on 2 cores.)"""
    import itertools

    calls = []
    for op, axes in op_axes().items():
        if full:
            for dtype in DTYPES:
                calls += [(op, dtype, dict(zip(axes, values)), "all") for values in itertools.product(*axes.values())]
            continue
        heavy = {name: values[-1] for name, values in axes.items()}
        calls += [(op, dtype, dict(heavy), "heaviest") for dtype in DTYPES]
        calls.append((op, DTYPES[0], {name: values[0] for name, values in axes.items()}, "lightest"))
        calls += [(op, DTYPES[0], {**heavy, name: value}, "value")
                  for name, values in axes.items() for value in values[1:-1]]
    return calls


def call_op(op: str, dtype: str, options: dict, gen: torch.Generator, **runtime):
    """Run one op with ``backend="triton"``, forward, and backward unless ``options["grad"]`` is off.
    ``runtime``: more keyword arguments for the op (values that must not change what is compiled)."""
    import fastrm

    dt = getattr(torch, dtype)
    o = dict(options)
    grad = o.pop("grad")
    want_grad = grad not in (False, "none")

    def rand(*shape, requires_grad=want_grad):
        return torch.randn(*shape, generator=gen).to(dt).requires_grad_(requires_grad)

    def mask(B, T, kind):
        m = torch.rand(B, T, generator=gen) > 0.3
        return {"bool": m, "int64": m.long(), "float": m.to(dt)}[kind]

    def backward(out, leaves):
        leaves = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t.requires_grad]
        if leaves and outs:
            torch.autograd.grad(outs, leaves, [torch.randn_like(t) for t in outs])

    if op == "gather_logprobs":
        V = o.pop("V")
        base = rand(2, 3, V)
        x = base * 1.0 if want_grad else base  # a non-leaf, as a model's logits are (in-place backward needs it)
        x = x[:, :-1] if o.pop("strided") else x
        candidates = o.pop("labels")
        shape = x.shape[:-1] + ((int(candidates[2:]),) if candidates != "one" else ())
        labels = torch.randint(0, V, shape, generator=gen)
        labels[0, 0] = -100
        backward(fastrm.gather_logprobs(x, labels, backend="triton", **{"temperature": 0.7, **o, **runtime}), [base])
    elif op == "linear_logprobs":
        hidden, weight = rand(2, 3, 16), rand(SHORT_V, 16)
        bias = rand(SHORT_V) if o.pop("bias") else None
        labels = torch.randint(0, SHORT_V, (2, 3), generator=gen)
        labels[0, 0] = -100
        out = fastrm.linear_logprobs(hidden, weight, labels, bias=bias, backend="triton",
                                     **{"chunk_size": 4, **o, **runtime})
        backward(out, [hidden, weight, bias])
    elif op == "compute_gae":
        T = o.pop("T")
        r, v = rand(3, T), rand(3, T)
        boot = rand(3) if o.pop("bootstrap_value") else None
        out = fastrm.compute_gae(r, v, mask(3, T, o.pop("mask")), bootstrap_value=boot, backend="triton",
                                 **{"gamma": 0.99, "lam": 0.95, **runtime})
        backward(out, [r, v, boot])
    elif op in ("ppo_policy_loss", "value_loss"):
        T = o.pop("T")
        x = rand(3, 2 * T)[:, ::2] if o.pop("strided", False) else rand(3, T)
        fn = fastrm.ppo_policy_loss if op == "ppo_policy_loss" else fastrm.value_loss
        m = mask(3, T, o.pop("mask"))
        if o.get("policy_loss") in ("cispo", "sapo"):  # the dual clip is PPO's
            o["dual_clip"] = None
        out = fn(x, rand(3, T, requires_grad=False), rand(3, T, requires_grad=False), m, backend="triton",
                 **{**o, **runtime})
        backward(out.loss, [x])
    elif op == "kl_penalty":
        T = o.pop("T")
        lp = rand(3, T, requires_grad=grad in ("logprobs", "both"))
        ref = rand(3, T, requires_grad=grad in ("ref_logprobs", "both"))
        backward(fastrm.kl_penalty(lp, ref, o.pop("kind"), backend="triton", **runtime), [lp, ref])
    elif op == "pairwise_ranking_loss":
        N, margin = o.pop("N"), o.pop("margin")
        chosen, rejected = rand(N), rand(2 * N)[::2]  # one strided input
        margin = rand(N) if margin == "tensor" else margin
        out = fastrm.pairwise_ranking_loss(chosen, rejected, margin=margin, backend="triton", **{**o, **runtime})
        backward(out, [chosen, rejected, margin])
    elif op == "ranking_loss":
        K = o.pop("K")
        rewards = rand(3, K)
        ranks = torch.argsort(torch.rand(3, K, generator=gen), dim=-1).to(getattr(torch, o.pop("ranks")))
        ranks[0, -1] = -1
        backward(fastrm.ranking_loss(rewards, ranks, backend="triton", **runtime), [rewards])
    else:
        raise ValueError(f"the compile workload does not know how to call {op!r}: add it to call_op")


def run_workload(recorder: LaunchRecorder, full: bool = False):
    """Call every op over its kernel-relevant options (see :func:`workload_calls`), forward and backward."""
    gen = torch.Generator().manual_seed(0)
    for op, dtype, options, role in workload_calls(full):
        with recorder.calling(f"{op} dtype={dtype} " + " ".join(f"{k}={v}" for k, v in options.items()), role):
            call_op(op, dtype, options, gen)


def record_workload(full: bool = False) -> list[Launch]:
    with LaunchRecorder() as recorder:
        run_workload(recorder, full)
    return recorder.launches

# ---------------------------------------------------------------------------------------------------
# 2. Compiling launches for NVIDIA targets (in a process where the kernels are JIT functions)
# ---------------------------------------------------------------------------------------------------


def _stand_in_driver(arch: int):
    """A Triton driver that reports a CUDA device of the given compute capability and launches nothing."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInCudaDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs on the stand-in driver")

    return StandInCudaDriver()


def _use_target(fn, arch: int):
    from triton.runtime import driver

    driver.set_active(_stand_in_driver(arch))
    fn.device_caches.clear()  # a binder (and its compiled kernels) belongs to one target


def _rebuild_arg(spec):
    if isinstance(spec, dict) and "tensor" in spec:
        base = torch.empty(64, dtype=getattr(torch, spec["tensor"]))  # CPU allocations are 64-byte aligned
        return base if spec["aligned"] else base[1:]
    return spec


def _kernel(name: str):
    module, qualname = name.split(":")
    return getattr(importlib.import_module(module), qualname)


def _replay(fn, launch: dict, warmup: bool):
    args = [_rebuild_arg(a) for a in launch["args"]]
    return fn.run(*args, grid=(1,), warmup=warmup, **launch["kwargs"])


def specialization(launch: dict, arch: int) -> tuple[str, str]:
    """``(key, description)`` of the variant Triton compiles for this launch on this target, without compiling:
    Triton's own binder runs and its ``jit_cache_hook`` reports the key, then stops the compile."""
    from triton import knobs

    fn = _kernel(launch["kernel"])
    _use_target(fn, arch)
    seen = {}

    def hook(*, key, repr, **_):
        seen["key"], seen["repr"] = str(key), repr
        return True  # skip the compile

    saved, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        _replay(fn, launch, warmup=True)
    finally:
        knobs.runtime.jit_cache_hook = saved
    return seen["key"], seen["repr"]


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    regs, spills = _PTXAS_REGS.search(log), _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"unexpected ptxas log:\n{log}")
    stack, stores, loads = (int(v) for v in spills.groups())
    return {"registers": int(regs.group(1)), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def _ptxas_log(kernel, arch: int) -> str:
    """Run the bundled ptxas -v on the kernel's PTX (when Triton did not print its own log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(kernel.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                              "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
    return out.stdout + out.stderr


def compile_one(launch: dict, arch: int) -> dict:
    """Compile one launch for one target; registers, spills, shared memory and the compile time."""
    from triton import knobs

    fn = _kernel(launch["kernel"])
    _use_target(fn, arch)
    has_knob = hasattr(knobs.nvidia, "dump_ptxas_log")
    if has_knob:
        knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = _replay(fn, launch, warmup=True)
    except Exception as exc:  # noqa: BLE001 - reported as this variant's failure
        return {"error": f"{type(exc).__name__}: {exc}"[-2000:], "compile_s": time.perf_counter() - start}
    elapsed = time.perf_counter() - start
    text = log.getvalue()
    if "Used " not in text:
        text = _ptxas_log(kernel, arch)
    meta = kernel.metadata
    return {**parse_ptxas_log(text), "shared_bytes": int(meta.shared), "num_warps": int(meta.num_warps),
            "num_stages": int(meta.num_stages), "compile_s": elapsed, "error": None}


def _compile_task(task):
    launch, arch = task
    return compile_one(launch, arch)


def supported_targets(names) -> list[str]:
    """The targets whose ptxas is bundled and accepts them (sm_100 needs the Blackwell-era ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ok = []
    for name in names:
        arch = TARGETS[name]
        try:
            ptxas = get_ptxas(arch).path
            out = subprocess.run([ptxas, f"--gpu-name={sm_arch_from_capability(arch)}", "--version"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                ok.append(name)
        except Exception:  # noqa: BLE001 - an unusable ptxas means the target is not supported here
            pass
    return ok


def is_smoke_launch(launch: dict) -> bool:
    """The launches compiled for a smoke target: each op's heaviest call in bfloat16."""
    return launch.get("role") in ("heaviest", "all") and " dtype=bfloat16 " in launch["op"]


def variant_keys(launches: list[dict], target: str) -> list[str]:
    """Triton's specialisation key of each launch on ``target`` (no compiling)."""
    return [specialization(launch, TARGETS[target])[0] for launch in launches]


def compile_variants(launches: list[dict], targets, jobs: int, smoke_targets=()) -> dict:
    """Dedupe launches into compiled variants per target, compile each once, in ``jobs`` processes.
    ``smoke_targets`` compile only :func:`is_smoke_launch` launches.

    Returns ``{"targets": [...], "smoke_targets": [...], "skipped_targets": [...], "variants": [row, ...]}``;
    a row has the kernel, target, Triton's description of the variant, the ops that launch it, and
    :func:`compile_one`'s fields.
    """
    import concurrent.futures
    import multiprocessing

    requested = list(targets) + [t for t in smoke_targets if t not in targets]
    supported = supported_targets(requested)
    rows = []
    for name in supported:
        arch = TARGETS[name]
        variants: dict[tuple, dict] = {}
        for launch in launches:
            if name not in targets and not is_smoke_launch(launch):
                continue
            key, desc = specialization(launch, arch)
            row = variants.setdefault((launch["kernel"], key), {
                "kernel": launch["kernel"].split(":")[1], "module": launch["kernel"].split(":")[0], "target": name,
                "variant": desc, "kwargs": launch["kwargs"], "ops": [], "launches": 0, "_launch": launch})
            row["launches"] += 1
            if launch["op"] not in row["ops"]:
                row["ops"].append(launch["op"])
        rows += variants.values()
    # Biggest blocks first (they take longest), so the pool does not end on one long compile.
    rows.sort(key=lambda r: -max([v for v in r["kwargs"].values() if isinstance(v, int) and not isinstance(v, bool)],
                                 default=0))
    tasks = [(row.pop("_launch"), TARGETS[row["target"]]) for row in rows]
    # fork: the workers inherit the imported modules and this process's clean (non-interpreter) setup.
    context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        for row, result in zip(rows, pool.map(_compile_task, tasks, chunksize=1)):
            row.update(result)
    return {"targets": [t for t in supported if t in targets],
            "smoke_targets": [t for t in supported if t not in targets],
            "skipped_targets": [t for t in requested if t not in supported], "variants": rows}


def _run_child(request: dict, timeout: float):
    """Run a request in a fresh process where the kernels are compiled, not interpreted, with an empty Triton
    cache of its own (nothing carries over from earlier runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRM_POISON_OUTPUTS")}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory(prefix="fastrm-triton-cache-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_compile", "--child"], input=json.dumps(request),
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the compile process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def compile_in_subprocess(launches: list[Launch], targets=DEFAULT_TARGETS, jobs: int | None = None,
                          smoke_targets=(), timeout: float = 1800) -> dict:
    """:func:`compile_variants` in a child process (see :func:`_run_child`)."""
    return _run_child({"what": "compile", "launches": [l.to_json() for l in launches], "targets": list(targets),
                       "smoke_targets": list(smoke_targets), "jobs": jobs or os.cpu_count() or 1}, timeout)


def variant_keys_in_subprocess(launches: list[Launch], target: str = "sm_90", timeout: float = 600) -> list[str]:
    """:func:`variant_keys` in a child process."""
    return _run_child({"what": "keys", "launches": [l.to_json() for l in launches], "target": target}, timeout)


def problems(result: dict) -> list[str]:
    """Every compile error and every spill, one line each (empty: all good)."""
    out = []
    for row in result["variants"]:
        where = f"{row['kernel']} [{row['target']}] {row['variant']} (launched by: {row['ops'][0]})"
        if row.get("error"):
            out.append(f"compile error: {where}: {row['error']}")
        elif row["spill_store_bytes"] or row["spill_load_bytes"]:
            out.append(f"register spill: {where}: {row['registers']} registers, {row['spill_store_bytes']} bytes "
                       f"spill stores, {row['spill_load_bytes']} bytes spill loads")
    return out


def summary_table(result: dict) -> str:
    """Per kernel and target: variants, registers (max), spills (max), shared memory (max)."""
    groups: dict[tuple, list] = {}
    for row in result["variants"]:
        groups.setdefault((row["kernel"], row["target"]), []).append(row)
    lines = ["| kernel | target | variants | registers (max) | spill bytes (max) | shared bytes (max) | warps |",
             "|---|---|---|---|---|---|---|"]
    for (kernel, target), rows in sorted(groups.items()):
        good = [r for r in rows if not r.get("error")]
        errors = len(rows) - len(good)
        regs = max((r["registers"] for r in good), default=0)
        spill = max((r["spill_store_bytes"] + r["spill_load_bytes"] for r in good), default=0)
        shared = max((r["shared_bytes"] for r in good), default=0)
        warps = ",".join(str(w) for w in sorted({r["num_warps"] for r in good}))
        lines.append(f"| {kernel} | {target} | {len(rows)}{f' ({errors} failed)' if errors else ''} | {regs} | "
                     f"{spill} | {shared} | {warps} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated, of " + ",".join(TARGETS))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--full", action="store_true",
                        help="every combination of options (~450 variants per target) instead of the covering set")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-variant rows here")
    parser.add_argument("--smoke-targets", default="sm_100",
                        help="targets compiled for each op's heaviest bfloat16 call only (default sm_100)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the compiling child process
    args = parser.parse_args(argv)
    if args.child:
        request = json.loads(sys.stdin.read())
        if request["what"] == "keys":
            result = variant_keys(request["launches"], request["target"])
        else:
            result = compile_variants(request["launches"], request["targets"], request["jobs"],
                                      request["smoke_targets"])
        print(json.dumps(result))
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    smoke = [t.strip() for t in args.smoke_targets.split(",") if t.strip() and t.strip() not in targets]
    unknown = [t for t in targets + smoke if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    start = time.perf_counter()
    launches = ensure_interpreter_and_record(args.full)
    recorded = time.perf_counter()
    result = compile_in_subprocess(launches, targets, args.jobs, smoke)
    print(f"{len(launches)} launches recorded in {recorded - start:.1f} s; {len(result['variants'])} variants compiled "
          f"for {', '.join(result['targets'])}" + (f" (+ {', '.join(result['smoke_targets'])}: heaviest bfloat16 calls)"
                                                   if result["smoke_targets"] else "")
          + f" in {time.perf_counter() - recorded:.1f} s")
    if result["skipped_targets"]:
        print(f"skipped (the bundled ptxas does not support them): {', '.join(result['skipped_targets'])}")
    print(summary_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    found = problems(result)
    for line in found:
        print(line)
    return 1 if found else 0


def ensure_interpreter_and_record(full: bool = False) -> list[Launch]:
    """Record the workload; when this process's kernels are not interpreted, record in a child process that
    sets TRITON_INTERPRET=1 before importing fastrm."""
    from fastrm import kernels

    if kernels.INTERPRET:
        return record_workload(full)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = ("import json; from benchmarks.kernel_compile import record_workload; "
            f"print(json.dumps([l.to_json() for l in record_workload({bool(full)})]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"recording the launches failed:\n{proc.stderr[-4000:]}")
    return [Launch(**d) for d in json.loads(proc.stdout.splitlines()[-1])]


if __name__ == "__main__":
    if "--child" not in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # record in this process (set before fastrm is imported)
    sys.exit(main())
