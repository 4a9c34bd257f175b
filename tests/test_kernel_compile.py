"""Every Triton kernel variant the ops launch compiles for real NVIDIA targets, with no register spill -- on a
CPU-only machine (benchmarks/kernel_compile.py: launches are recorded from the ops themselves, then compiled by
Triton and assembled by its bundled ptxas for sm_80 and sm_90, and sm_100 for each op's heaviest bf16 call).
"""

import inspect
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from fastrm import kernels

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import kernel_compile as kc  # noqa: E402

import fastrm  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.HAS_TRITON or not kernels.INTERPRET,
                                reason="records launches through the Triton interpreter (CPU-only machines)")


@pytest.fixture(scope="module")
def launches():
    return kc.record_workload()


def test_every_kernel_is_launched_by_some_op_call(launches):
    # A kernel that no op call of the workload launches would never be compiled here.
    launched = {launch.kernel for launch in launches}
    missing = sorted(set(kc.kernel_functions()) - launched)
    assert not missing, f"kernels no workload call launches (add their op's options to op_axes): {missing}"
    assert {op for op, *_ in kc.workload_calls()} == set(kc.op_axes())


def test_every_op_keyword_is_known_to_the_workload():
    # A new keyword option of an op either changes what is launched (then the workload must vary it) or not.
    ops = {"gather_logprobs": fastrm.gather_logprobs, "linear_logprobs": fastrm.linear_logprobs,
           "compute_gae": fastrm.compute_gae, "ppo_policy_loss": fastrm.ppo_policy_loss,
           "value_loss": fastrm.value_loss, "kl_penalty": fastrm.kl_penalty,
           "pairwise_ranking_loss": fastrm.pairwise_ranking_loss, "ranking_loss": fastrm.ranking_loss}
    axes = kc.op_axes()
    assert set(axes) == set(ops)
    for name, fn in ops.items():
        params = inspect.signature(fn).parameters
        keywords = {p for p, spec in params.items() if spec.default is not inspect.Parameter.empty}
        unknown = keywords - set(axes[name]) - kc.NOT_KERNEL_OPTIONS
        assert not unknown, f"{name}: options {sorted(unknown)} are neither varied by op_axes nor in NOT_KERNEL_OPTIONS"


def test_every_variant_compiles_for_sm80_sm90_without_spills(launches):
    result = kc.compile_in_subprocess(launches, targets=("sm_80", "sm_90"), smoke_targets=("sm_100",))
    assert result["targets"] == ["sm_80", "sm_90"]  # the bundled ptxas always handles these
    found = kc.problems(result)
    assert not found, "\n".join(found)
    by_kernel = defaultdict(set)
    for row in result["variants"]:
        by_kernel[row["kernel"]].add(row["target"])
        assert row["registers"] > 0 and row["num_warps"] >= 1
    assert set(by_kernel) == {name.split(":")[1] for name in kc.kernel_functions()}
    for kernel, targets in by_kernel.items():
        assert {"sm_80", "sm_90"} <= targets, kernel
        if result["smoke_targets"]:
            assert "sm_100" in targets, kernel


def _launches_of(calls):
    gen = torch.Generator().manual_seed(0)
    with kc.LaunchRecorder() as recorder:
        for op, dtype, options, extra in calls:
            with recorder.calling(op):
                kc.call_op(op, dtype, options, gen, **extra)
    return recorder.launches


def test_runtime_values_do_not_cause_recompiles():
    # gamma, lam, the clip ranges, temperature, margins are runtime arguments: one compiled variant whatever
    # their values. T is too; Triton specialises integers only on "== 1" and "divisible by 16", and
    # compute_gae's forward not even that (its chunks run backwards, nothing to vectorise).
    heavy = {op: {name: values[-1] for name, values in axes.items()} for op, axes in kc.op_axes().items()}
    calls = []
    for gamma, lam in ((0.99, 0.95), (1.0, 1.0), (0.5, 0.0)):
        calls.append(("compute_gae", "float32", heavy["compute_gae"], {"gamma": gamma, "lam": lam}))
    for eps, high, dual in ((0.2, None, 3.0), (0.1, 0.28, 10.0)):
        calls.append(("ppo_policy_loss", "float32", heavy["ppo_policy_loss"],
                      {"clip_eps": eps, "clip_eps_high": high, "dual_clip": dual}))
    for clip in (0.2, 5.0):
        calls.append(("value_loss", "float32", heavy["value_loss"], {"clip": clip}))
    for temperature in (1.0, 0.6):
        calls.append(("gather_logprobs", "float32", heavy["gather_logprobs"], {"temperature": temperature}))
    for margin, center in ((0.5, 0.01), (2.0, 0.3)):
        calls.append(("pairwise_ranking_loss", "float32", {**heavy["pairwise_ranking_loss"], "margin": margin},
                      {"center_coef": center}))
    runtime = _launches_of(calls)

    # Row lengths (contiguous [B, T] inputs, as trainers pass them): every long T gives the same chunk size;
    # the row kernels see at most the two divisibility classes of T (and of the row strides, = T), the GAE
    # forward one.
    lengths = (1000, 1001, 1027, 2048, 3000, 3001, 4096, 4099)
    contiguous = {"ppo_policy_loss": {"strided": False}}
    rows = _launches_of([(op, "float32", {**heavy[op], "T": T, **contiguous.get(op, {})}, {}) for T in lengths
                         for op in ("compute_gae", "ppo_policy_loss", "value_loss", "kl_penalty")])

    keys = kc.variant_keys_in_subprocess(runtime + rows)  # one child process for both
    variants = defaultdict(set)
    for launch, key in zip(runtime, keys):
        variants[launch.kernel].add(key)
    for kernel, seen in variants.items():
        assert len(seen) == 1, f"{kernel}: runtime values gave {len(seen)} compiled variants"
    variants = defaultdict(set)
    for launch, key in zip(rows, keys[len(runtime):]):
        variants[launch.kernel.split(":")[1]].add(key)
    assert len(variants["_gae_fwd_kernel"]) == 1
    for kernel, seen in variants.items():
        assert len(seen) <= 2, f"{kernel}: {len(seen)} compiled variants over row lengths {lengths}"


def test_readme_kernel_table_matches_the_committed_report():
    # benchmarks/README.md shows exactly what results/kernels/kernel_resources.json holds, and that report is
    # clean: every kernel, no spill, no compile error.
    import json

    from benchmarks import kernel_resources as kr

    report = json.loads((ROOT / "benchmarks" / "results" / "kernels" / "kernel_resources.json").read_text())
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert text[text.index(kr.BEGIN) + len(kr.BEGIN):text.index(kr.END)] == "\n" + kr.render_markdown(report)
    assert not kc.problems(report)
    assert {row["kernel"] for row in report["variants"]} == {name.split(":")[1] for name in kc.kernel_functions()}
    assert {"sm_80", "sm_90"} <= set(report["config"]["targets"])
