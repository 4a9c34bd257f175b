"""benchmarks/vs_trl.py (fastrm bench vs-trl): its summary and its argument checks; the runs themselves take minutes
on SmolLM2 and are a benchmark, not a test."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import vs_trl  # noqa: E402


def test_the_summary_reports_cpu_time_ratio_rss_and_phases():
    runs = [{"framework": "fastrm", "workload": "grpo", "steps": [[10.0, 20.0], [11.0, 22.0]], "packing": "packed",
             "phases": [{"timing/generate": 5.0, "timing/step": 10.0}], "peak_rss_mib": 3000.0},
            {"framework": "trl", "workload": "grpo", "steps": [[30.0, 42.0]], "phases": [], "peak_rss_mib": 2500.0,
             "packing": "padded"}]
    env = {"commit": "abc", "torch": "2", "transformers": "5", "trl": "1.16.0", "date": "today"}
    text = vs_trl.summary(runs, env, argparse.Namespace(threads=2, workload="grpo", steps=2, rounds=1))
    assert "| grpo | fastrm | packed | 21.00 | 10.50 | 3000 | 2 | 2.00x |" in text  # medians of CPU and wall
    assert "| grpo | trl | padded | 42.00 | 30.00 | 2500 | 1 |  |" in text
    assert "generate 5.00" in text and "TRL 1.16.0" in text and "process CPU time" in text


def test_bad_counts_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        vs_trl.main(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
