"""Smoke set of the benchmark harness (benchmarks/): every op's script runs end to end on the CPU paths at
tiny sizes, through pytest-benchmark, and what it writes has the promised structure. A provider that
disagrees with float64 must be refused. Timing numbers are never asserted: only that they exist."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import bench_gae, bench_logprobs, bench_pairwise, bench_ranking, common  # noqa: E402

import fastrm  # noqa: E402
from fastrm import cli  # noqa: E402

FAST = ["--repeats", "2", "--min-time", "0", "--copy-buffer-mib", "16", "--no-compile"]
ENV_KEYS = {"device", "device_kind", "torch", "triton", "cuda", "git_commit", "date", "torch_threads",
            "load_avg_start", "load_avg_end", "other_processes_load", "copy_gbs", "malloc"}

# op -> (script, tiny size options, the providers every CPU run must have)
CASES = {
    "logprobs": (bench_logprobs, ["--tokens", "8", "--vocab", "1000"], {"fastrm-torch", "fastrm-torch-inplace", "eager"}),
    "gae": (bench_gae, ["--batch", "4", "--seqlen", "37", "--layout", "holes"], {"fastrm-torch", "python-loop"}),
    "pairwise": (bench_pairwise, ["--batch", "64"], {"fastrm-torch", "reference"}),
    "ranking": (bench_ranking, ["--batch", "8", "--k", "2,5"], {"fastrm-torch", "reference"}),
}


@pytest.mark.parametrize("op", list(CASES))
def test_each_op_script_runs_and_writes_its_results(op, tmp_path, benchmark):
    script, sizes, providers = CASES[op]
    plots = op == "ranking"  # one op draws its plots; the others skip matplotlib to keep the set fast
    argv = sizes + FAST + ["--out", str(tmp_path)] + ([] if plots else ["--no-plots"])
    rc = benchmark.pedantic(script.main, args=(argv,), rounds=1, iterations=1)
    assert rc == 0

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    result = json.loads((tmp_path / f"{op}_{kind}.json").read_text())
    assert ENV_KEYS <= set(result["environment"])
    assert result["environment"]["copy_gbs"] > 0
    assert result["config"]["modes"] == list(common.MODES)
    rows = result["rows"]
    assert providers <= {r["provider"] for r in rows}
    assert not any("triton" in r["provider"] for r in rows if not torch.cuda.is_available())  # never interpreted
    sizes_seen = {tuple(r[k] for k in result["size_keys"]) for r in rows}
    assert len(sizes_seen) == (2 if op == "ranking" else 1)
    for size in sizes_seen:
        for provider in providers:
            got = {r["mode"] for r in rows if r["provider"] == provider
                   and tuple(r[k] for k in result["size_keys"]) == size}
            assert got == ({"bwd", "fwd+bwd"} if provider.endswith("-inplace") else set(common.MODES)), provider
    for r in rows:
        assert r["status"] == "ok", r
        assert r["n_samples"] >= 2 and len(r["samples_ms"]) == r["n_samples"]
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["err_out"] <= r["tol"]  # the agreement check ran and passed
        assert r["err_grad"] <= r["tol"]  # gradients too, as backward modes were asked for
        if sys.platform.startswith("linux") and not torch.cuda.is_available():
            assert r["peak_mb"] >= 0
        if r["provider"] == result["baseline"]:
            assert r["speedup"] == pytest.approx(1.0)
        assert (r["gbs"] is not None) == (op in ("logprobs", "gae"))  # bandwidth only for memory-bound ops

    table = (tmp_path / f"{op}_{kind}.md").read_text()
    assert result["environment"]["device"] in table and "| mode | provider | median ms |" in table
    for provider in providers:
        assert f"| {provider} |" in table
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    if plots and common_has_matplotlib():
        assert pngs == [f"{op}_{kind}_{k}.png" for k in ("memory", "time")]
    elif not plots:
        assert pngs == []


def common_has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _run(argv):
    args = common.base_parser("test").parse_args(argv + FAST + ["--no-save"])
    return common.Run("gae", "compute_gae", args, baseline="python-loop", plot_x="seqlen", plot_panel="batch",
                      default_dtype="float32")


def _gae(r, v, m):
    return fastrm.compute_gae(r, v, m, gamma=bench_gae.GAMMA, lam=bench_gae.LAM, backend="torch")


def _scaled_grad(x, factor):
    """x in value, ``factor`` times its gradient."""
    return x * factor - (x * (factor - 1)).detach()


def test_a_provider_that_disagrees_with_float64_is_refused_not_timed():
    run = _run([])
    case = bench_gae.make_case({"batch": 3, "seqlen": 20}, torch.float32, "cpu")
    good = common.Provider("fastrm-torch", _gae)
    wrong_value = common.Provider("wrong-value", lambda r, v, m: tuple(o * 1.01 for o in _gae(r, v, m)))
    wrong_grad = common.Provider("wrong-grad", lambda r, v, m: _gae(_scaled_grad(r, 1.5), v, m))
    run.bench(case, [good, wrong_value, wrong_grad])

    by = {(r["provider"], r["mode"]): r for r in run.rows}
    assert all(by[("fastrm-torch", m)]["status"] == "ok" for m in common.MODES)
    for name in ("wrong-value", "wrong-grad"):
        for mode in common.MODES:
            row = by[(name, mode)]
            assert row["status"] == "wrong" and "median_ms" not in row and "samples_ms" not in row
    assert by[("wrong-value", "fwd")]["err_out"] > common.TOLERANCE[torch.float32]
    assert by[("wrong-grad", "fwd")]["err_out"] <= common.TOLERANCE[torch.float32]  # right values...
    assert by[("wrong-grad", "fwd")]["err_grad"] > common.TOLERANCE[torch.float32]  # ...wrong gradient
    assert run.finish() == 1  # a refused provider fails the run


def test_a_forward_only_run_checks_values_but_not_gradients():
    run = _run(["--modes", "fwd"])
    case = bench_gae.make_case({"batch": 3, "seqlen": 20}, torch.float32, "cpu")
    run.bench(case, [common.Provider("wrong-grad", lambda r, v, m: _gae(_scaled_grad(r, 1.5), v, m))])
    (row,) = run.rows
    assert row["mode"] == "fwd" and row["status"] == "ok" and row["err_grad"] is None
    assert run.finish() == 0


def _raises(exc):
    def provider(*args):
        raise exc
    return provider


def test_a_provider_out_of_memory_is_skipped_and_the_others_still_run():
    run = _run(["--modes", "fwd"])
    case = bench_gae.make_case({"batch": 2, "seqlen": 8}, torch.float32, "cpu")
    run.bench(case, [common.Provider("eager", _raises(torch.OutOfMemoryError("out of memory"))),
                     common.Provider("python-loop", bench_gae.python_loop)])
    assert [(r["provider"], r["status"]) for r in run.rows] == [("eager", "skipped"), ("python-loop", "ok")]
    assert run.finish() == 0  # running out of memory is a fact about the size, not a failure


def test_a_failing_fastrm_provider_fails_the_run_and_others_still_run():
    run = _run(["--modes", "fwd"])
    case = bench_gae.make_case({"batch": 2, "seqlen": 8}, torch.float32, "cpu")
    run.bench(case, [common.Provider("fastrm-broken", _raises(RuntimeError("boom"))),
                     common.Provider("python-loop", bench_gae.python_loop)])
    assert [(r["provider"], r["status"]) for r in run.rows] == [("fastrm-broken", "error"), ("python-loop", "ok")]
    assert "boom" in run.rows[0]["note"]
    assert run.finish() == 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.cuda.is_available(), reason="CPU RSS peak on Linux")
def test_cpu_peak_memory_sees_a_temporary_the_heap_could_have_hidden():
    if common.timing_malloc() is None:
        pytest.skip("not glibc")
    for _ in range(3):  # under the timing thresholds an 8 MiB block is recycled from the resident heap...
        torch.ones(2**21).sum()
    peak = common.peak_memory_mb(lambda: torch.ones(2**21).sum())  # ...but measured, it is its own mmap
    if peak is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 7.5 <= peak <= 12


def test_percentiles_and_sweep():
    s = common.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["n_samples"]) == (3.0, 1.8, 4.2, 5)
    parser = common.base_parser("t")
    common.add_size_options(parser, a="A", b="B")
    args = parser.parse_args(["--quick", "--b", "4,5"])
    assert common.sweep(args, {"a": [1, 2], "b": [3]}, {"a": [9], "b": [3]}) == [
        {"a": 1, "b": 4}, {"a": 1, "b": 5}, {"a": 2, "b": 4}, {"a": 2, "b": 5}]
    with pytest.raises(SystemExit):
        common.base_parser("t").parse_args(["--modes", "forward"])


def test_fastrm_bench_runs_the_benchmarks_from_any_directory(tmp_path):
    cmd = [sys.executable, "-m", "fastrm", "bench", "gae", "--batch", "2", "--seqlen", "8", "--modes", "fwd",
           "--no-save"] + FAST
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "python-loop" in result.stdout and "fastrm-torch" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastrm", "bench", "nope"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown op" in bad.stderr


def test_fastrm_bench_says_when_it_cannot_find_the_benchmarks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastrm, "__file__", str(tmp_path / "site-packages" / "fastrm" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTRM_BENCHMARKS_DIR", raising=False)
    assert cli.bench(["--list"]) == 2
    err = capsys.readouterr().err
    assert "cannot find the benchmarks/ folder" in err and "FASTRM_BENCHMARKS_DIR" in err
    monkeypatch.setenv("FASTRM_BENCHMARKS_DIR", str(ROOT / "benchmarks"))
    assert cli.find_benchmarks_dir()[0] == ROOT / "benchmarks"


def test_python_m_benchmarks_runs_every_op_script():
    assert list(bench_main.SCRIPTS)[:4] == ["logprobs", "gae", "pairwise", "ranking"]
    assert {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")} == {
        m.rsplit(".", 1)[1] for m in bench_main.SCRIPTS.values()}
    for module in bench_main.SCRIPTS.values():  # each one a script on the shared harness
        assert callable(importlib.import_module(module).main)


def test_benchmarks_readme_shows_the_committed_results():
    """benchmarks/README.md's tables are generated from results/*.json (`python -m benchmarks readme`):
    after a new run, regenerate them so the README never shows numbers other than the files'."""
    text = common.README.read_text()
    start, end = text.index(common.BEGIN) + len(common.BEGIN), text.index(common.END)
    assert text[start:end].strip() == common.render_results_section().strip()
    for path in common.RESULTS_DIR.glob("*.json"):
        result = json.loads(path.read_text())
        assert result["environment"]["device_kind"] == "cpu" or result["environment"]["cuda"]
        assert all(r["status"] in ("ok", "skipped") for r in result["rows"]), path.name
