import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastrm

ROOT = Path(__file__).resolve().parents[1]


def _run(code, cwd):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("cwd", [ROOT, Path("/")])
def test_fastrm_kernels_imports_from_anywhere(cwd):
    result = _run("import fastrm.kernels.logprobs as k, fastrm; print(k.__file__)", cwd)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == ROOT / "fastrm" / "kernels"


def test_no_top_level_module_of_the_repo_shadows_an_installed_package():
    # `python -m pytest` / `python -m fastrm` put the repo root first on sys.path: any importable name there wins
    # over site-packages (transformers >= 5.25 imports PyPI's `kernels` at model load). Only the package itself,
    # tests and benchmarks may sit there; none of those names is one of our dependencies'.
    importable = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir()
                                                        if p.is_dir() and (p / "__init__.py").exists()}
    assert importable <= {"fastrm", "tests", "benchmarks"}, sorted(importable)


@pytest.mark.parametrize("cwd", [ROOT, Path("/")])
def test_transformers_hub_kernels_import_from_the_repo_root(cwd):
    # what broke on transformers 5.25: its hub_kernels integration does `from kernels import ...` at model load
    code = ("import importlib.util, transformers.integrations.hub_kernels as h; s = importlib.util.find_spec('kernels');"
            " print(s.origin if s else '')")
    result = _run(code, cwd)
    assert result.returncode == 0, result.stderr
    origin = result.stdout.strip()
    assert not origin or Path(origin).parent != ROOT / "kernels", origin


def test_public_api_is_exported():
    for name in ["gather_logprobs", "GatherLogprobs", "gather_logprobs_reference",
                 "compute_gae", "GAE", "compute_gae_reference", "whiten",
                 "pairwise_ranking_loss", "PairwiseRankingLoss", "pairwise_ranking_loss_reference",
                 "ranking_loss", "RankingLoss", "ranking_loss_reference",
                 "linear_logprobs", "LinearLogprobs", "linear_logprobs_reference",
                 "ppo_policy_loss", "PPOPolicyLoss", "ppo_policy_loss_reference",
                 "value_loss", "ValueLoss", "value_loss_reference",
                 "kl_penalty", "KLPenalty", "kl_penalty_reference"]:
        assert name in fastrm.__all__ and callable(getattr(fastrm, name)), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- test-command -->" in readme and "<!-- main-command -->" in readme
    result = subprocess.run(["bash", "-c", "awk '/<!-- test-command -->/{found=1; next} found && /^```bash/{inblock=1; next} "
                             "inblock && /^```/{exit} inblock{print}' README.md"], cwd=ROOT, capture_output=True, text=True)
    assert "python -m pytest" in result.stdout
    assert "pip install torch==2.13.0" in result.stdout  # never let the install resolve a CUDA torch here
    assert "awk" in (ROOT / ".ci" / "run").read_text()


def test_cli_help_lists_commands():  # timeouts guard against a hang only (a loaded machine imports torch slowly)
    result = subprocess.run([sys.executable, "-m", "fastrm", "--help"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0 and "selfcheck" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastrm", "nope"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_selfcheck_passes_on_this_machine():
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    result = subprocess.run([sys.executable, "-m", "fastrm", "selfcheck", "--skip-bench"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selfcheck PASSED" in result.stdout
    assert result.stdout.count("PASS ") >= 16  # 8 ops x 2 backends
