"""``fastrm bench --gpu-suite``: its plumbing, in a dry run on the CPU (tiny sizes, no timing asserted)."""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import gpu_suite  # noqa: E402


def test_gpu_suite_dry_run_writes_one_results_folder(tmp_path):
    rc = bench_main.main(["--gpu-suite", "--dry-run", "--out", str(tmp_path)])  # what `fastrm bench` runs
    report = json.loads((tmp_path / "suite.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert rc == 0, {name: s.get("output_tail", "")[-1500:] for name, s in stages.items() if s["status"] != "ok"}
    assert list(stages) == ["cuda_tests", "selfcheck", "e2e_steps"] + [f"bench_{op}" for op in gpu_suite.OP_BENCHES]
    assert all(s["status"] == "ok" for s in stages.values())
    assert "cuda" in stages["cuda_tests"]["command"] and "selfcheck PASSED" in stages["selfcheck"]["output_tail"]
    env = report["environment"]
    for key in ("device", "torch", "triton", "transformers", "git_commit", "date", "optional_packages"):
        assert key in env
    # every op benchmark wrote its JSON into the one folder, and the headline compares fastrm with each
    ops = {json.loads(p.read_text())["op"] for p in (tmp_path / "ops").glob("*.json")}
    assert len(ops) == len(gpu_suite.OP_BENCHES)
    assert {h["op"] for h in report["headline"]} == ops
    assert all(h["speedup"] > 0 and h["fastrm"].startswith("fastrm") for h in report["headline"])
    e2e = report["e2e"]
    for step in ("reward_step", "ppo_step"):
        assert e2e[step]["fastrm"]["median_ms"] > 0 and e2e[step]["eager"]["median_ms"] > 0
    markdown = (tmp_path / "suite.md").read_text()
    assert env["device"] in markdown and "| ppo_step | fastrm |" in markdown and "dry run" in markdown
    if gpu_suite.environment()["optional_packages"]["matplotlib"]:
        assert (tmp_path / "e2e_steps.png").exists()


def test_gpu_suite_refuses_to_run_for_real_without_a_gpu(capsys):
    if torch.cuda.is_available():
        return
    assert gpu_suite.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
