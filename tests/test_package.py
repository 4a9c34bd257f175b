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
    assert Path(result.stdout.strip()).parent == ROOT / "kernels"


def test_no_top_level_kernels_module_is_installed():
    # `kernels` is Hugging Face's package name; transformers probes for it. Ours must not answer.
    result = _run("import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)", "/")
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout


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
    result = subprocess.run([sys.executable, "-m", "fastrm", "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "selfcheck" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "fastrm", "nope"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_selfcheck_passes_on_this_machine():
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    result = subprocess.run([sys.executable, "-m", "fastrm", "selfcheck", "--skip-bench"], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "selfcheck PASSED" in result.stdout
    assert result.stdout.count("PASS ") >= 16  # 8 ops x 2 backends
