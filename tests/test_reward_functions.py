"""Rule reward functions in RL (fastrm.rewards): TRL's calling convention (prompts=, completions=, completion_ids=,
the prompt row's other columns by name), the older (prompts, completions) one, several weighted functions each
logged, None for completions a function does not score, clear errors for bad returns, and eval/score on custom
prompt data (also printed by `fastrm ppo`)."""

import json
import math
import sys

import pytest
import torch

from fastrm import rewards
from fastrm.config import ConfigError, load_config
from fastrm.tokenization import load_tokenizer
from fastrm.trainers.rl import RLConfig, RLTrainer

datasets = pytest.importorskip("datasets")

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "batch_size=2", "num_samples=2", "max_new_tokens=3",
        "eval_steps=1000", "save_steps=1000", "backend=torch", "advantage=rloo", "reward=rule"]
PROMPTS = [{"prompt": "1+1=", "answer": "2", "task": "sum"}, {"prompt": "2+3=", "answer": "5", "task": "copy"},
           {"prompt": "4+4=", "answer": "8", "task": "sum"}, {"prompt": "9+0=", "answer": "9", "task": "copy"}]
CALLS = []  # (function name, keyword arguments) of every call of the module-level reward functions below


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def text(completion):  # TRL's shapes: a string, or [{"role": "assistant", "content": ...}] (conversational)
    return completion[0]["content"] if isinstance(completion, list) else completion


def overlap(prompts, completions, answer, **kwargs):  # TRL style: named column + **kwargs
    CALLS.append(("overlap", dict(prompts=prompts, completions=completions, answer=answer, **kwargs)))
    return [float(len(set(text(c)) & set(a))) for c, a in zip(completions, answer)]


def length(completion_ids):  # names only what it uses
    CALLS.append(("length", dict(completion_ids=completion_ids)))
    return [len(ids) / 10 for ids in completion_ids]


def sums_only(completions, task):  # a multi-task mix: None where it does not apply
    CALLS.append(("sums_only", dict(completions=completions, task=task)))
    return [float(len(text(c))) if t == "sum" else None for c, t in zip(completions, task)]


def rl_trainer(tmp_path, *overrides, **kwargs):
    config = load_config(RLConfig, None, TINY + [f"output_dir={tmp_path}", *overrides])
    return RLTrainer(config, **kwargs).setup()


def parquet(tmp_path, rows, name="prompts.parquet"):
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / name))
    return tmp_path / name


# --------------------------------------------------------------------------- unit: binding and checking


def test_binding_follows_trl_and_the_older_convention():
    columns = ["answer", "task"]
    offered = dict(prompts=["p"], completions=["c"], completion_ids=[[5, 2]], columns={"answer": ["a"], "task": [None]})

    def trl_style(completions, **kwargs):
        return [float(sorted(kwargs) == ["answer", "completion_ids", "prompts", "task"])]

    def named(completions, answer, scale=1.0):
        return [scale * (completions == ["c"] and answer == ["a"])]

    def older(p, c):
        return [float(p == ["p"] and c == ["c"])]

    def wants_solution(completions, solution):
        return [0.0]

    fns = rewards.reward_functions([trl_style, named, older, lambda prompts, completions: [1.0], trl_style],
                                   weights=[1, 2, 3, 4, 5])
    assert [(f.name, f.weight) for f in fns] == [("trl_style", 1.0), ("named", 2.0), ("older", 3.0), ("fn", 4.0),
                                               ("trl_style_2", 5.0)]
    for fn in fns:
        rewards.bind(fn, columns)
        assert fn(**offered) == [1.0], fn.name
    assert fns[1].keywords == ("completions", "answer") and fns[2].keywords is None
    with pytest.raises(ValueError, match="reward function 'wants_solution' needs 'solution', which the prompt rows "
                                         "do not have \\(columns: answer, task\\)"):
        rewards.bind(rewards.reward_functions([wants_solution])[0], columns)
    with pytest.raises(ValueError, match="a column named 'completions'.*rename that column"):
        rewards.bind(fns[0], ["completions"])
    with pytest.raises(ConfigError, match=r"setting reward_weights=\[1.0\]: needs one weight per reward function"):
        rewards.reward_functions([older, named], [1.0])


@pytest.mark.parametrize("returned,match", [
    ([1.0], "returned 1 scores for 2 completions"),
    ([1.0, math.nan], "returned nan for completion 1: scores must be finite"),
    ([math.inf, 1.0], "returned inf for completion 0"),
    (["1", 1.0], "returned '1' \\(str\\) for completion 0: expected a float or None"),
    (3.0, "returned a float: expected a list of 2 floats"),
    ("ab", "returned a str"),
    (torch.ones(2, 1), "returned a Tensor"),  # not flattened silently
])
def test_bad_scores_name_the_function(returned, match):
    with pytest.raises(ValueError, match=f"reward function 'judge' {match}"):
        rewards.check_scores("judge", returned, 2)


def test_scores_accept_numbers_of_any_kind_and_none():
    import numpy as np

    mixed = [True, np.float32(0.5), torch.tensor(2.0), None, 3]
    assert rewards.check_scores("f", mixed, 5) == [1.0, 0.5, 2.0, None, 3.0]
    assert rewards.check_scores("f", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    assert rewards.check_scores("f", np.array([1.0, 2.0]), 2) == [1.0, 2.0]
    fns = rewards.reward_functions([len, len], [1.0, 0.5])
    scores = torch.tensor([[1.0, 2.0], [math.nan, 2.0], [math.nan, math.nan]])
    total = rewards.weighted_sum(fns, scores)
    assert total[:2].tolist() == [2.0, 1.0] and math.isnan(total[2])


# --------------------------------------------------------------------------- the RL trainer


def test_columns_reach_weighted_functions_and_every_score_is_logged(tmp_path):
    train = parquet(tmp_path, PROMPTS)
    trainer = rl_trainer(tmp_path / "run", f"train_data={train}", f"eval_data={train}", "num_eval_prompts=3",
                         "reward_fn=[test_reward_functions:overlap, test_reward_functions:length]",
                         "reward_weights=[1.0, 0.5]", "rule_weight=2.0")
    assert trainer.columns == ["answer", "task"]
    ro = trainer.rollout(trainer.train_rows[:2])
    (name1, call1), (name2, call2) = CALLS
    assert (name1, name2) == ("overlap", "length")
    # every completion with its prompt row's fields (num_samples=2 per prompt), as TRL passes them
    assert call1["prompts"] == ["1+1=", "1+1=", "2+3=", "2+3="] and call1["completions"] == ro.completions
    assert call1["answer"] == ["2", "2", "5", "5"] and call1["task"] == ["sum", "sum", "copy", "copy"]
    mask = ro.mask.bool()
    completion_ids = [ro.batch.input_ids[i, ro.prompt_len:][mask[i]].tolist() for i in range(4)]
    assert call1["completion_ids"] == completion_ids == call2["completion_ids"]
    overlap_scores = [len(set(c) & set(a)) for c, a in zip(call1["completions"], call1["answer"])]
    length_scores = [len(ids) / 10 for ids in completion_ids]
    stats = ro.stats
    assert stats["reward/overlap"] == pytest.approx(sum(overlap_scores) / 4)
    assert stats["reward/length"] == pytest.approx(sum(length_scores) / 4)
    rule = [o + 0.5 * n for o, n in zip(overlap_scores, length_scores)]
    assert float(stats["reward/rule"]) == pytest.approx(sum(rule) / 4)
    assert float(stats["objective/scores"]) == pytest.approx(2.0 * sum(rule) / 4)
    # evaluation: greedy answers to the eval prompts, scored by the same functions
    CALLS.clear()
    result = trainer.evaluate()
    (_, e1), (_, e2) = CALLS
    assert e1["answer"] == ["2", "5", "8"] and "eval/accuracy" not in result  # no embedded task here
    overlap_eval = [len(set(c) & set(a)) for c, a in zip(e1["completions"], e1["answer"])]
    length_eval = [len(ids) / 10 for ids in e2["completion_ids"]]
    assert result["eval/score/overlap"] == pytest.approx(sum(overlap_eval) / 3)
    assert result["eval/score/length"] == pytest.approx(sum(length_eval) / 3)
    assert result["eval/score"] == pytest.approx(sum(o + 0.5 * n for o, n in zip(overlap_eval, length_eval)) / 3)


def test_none_scores_and_conversational_prompts(tmp_path):
    tok = load_tokenizer("embedded")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    rows = [dict(r, prompt=[{"role": "user", "content": r["prompt"][:-1]}]) for r in PROMPTS]
    trainer = rl_trainer(tmp_path / "run", f"tokenizer={tmp_path / 'tok'}", "num_eval_prompts=4",
                         "reward_weights=[1.0, 1.0]", reward_fn=[sums_only, overlap],
                         train_data=datasets.Dataset.from_list(rows), eval_data=rows)
    ro = trainer.rollout(trainer.train_rows[:2])
    (_, s), (_, o) = CALLS
    # TRL's shapes for a conversational prompt: its messages, and the completion as an assistant message
    assert o["prompts"][0] == [{"role": "user", "content": "1+1"}] and trainer.train_rows[0]["prompt"] == "1+1="
    assert [c[0]["content"] for c in o["completions"]] == ro.completions
    assert all(c[0]["role"] == "assistant" and len(c) == 1 for c in o["completions"])
    sums = [len(c[0]["content"]) for c in s["completions"][:2]]  # the "copy" prompt's completions: None
    overlaps = [len(set(c[0]["content"]) & set(a)) for c, a in zip(o["completions"], o["answer"])]
    assert ro.stats["reward/sums_only"] == pytest.approx(sum(sums) / 2)  # over the completions it scored
    expected = [sums[0] + overlaps[0], sums[1] + overlaps[1], overlaps[2], overlaps[3]]
    assert float(ro.stats["reward/rule"]) == pytest.approx(sum(expected) / 4)
    # with reward=rule, a completion no function scores has no reward at all: an error, not a silent 0
    only_sums = rl_trainer(tmp_path / "run2", f"tokenizer={tmp_path / 'tok'}", reward_fn=sums_only, train_data=rows)
    with pytest.raises(ValueError, match=r"no reward function scored completion 2 \(all returned None\) of the "
                                         r"prompt '2\+3='"):
        only_sums.rollout(only_sums.train_rows[:2])
    evaluation = only_sums.evaluate(only_sums.train_rows)  # evaluation counts only the prompts scored
    assert set(evaluation) == {"eval/score", "eval/score/sums_only", "eval/eos_fraction"}


def test_bad_reward_functions_are_named(tmp_path):
    def short(prompts, completions):
        return [1.0]

    trainer = rl_trainer(tmp_path / "a", reward_fn=short, train_data=PROMPTS)
    with pytest.raises(ValueError, match="reward function 'short' returned 1 scores for 4 completions"):
        trainer.rollout(trainer.train_rows[:2])

    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="reward function 'needs_solution' needs 'solution'"):
        rl_trainer(tmp_path / "b", reward_fn=needs_solution, train_data=PROMPTS)
    with pytest.raises(ValueError, match="setting reward_fn='test_reward_functions:nope': cannot import it"):
        rl_trainer(tmp_path / "c", "reward_fn=test_reward_functions:nope", train_data=PROMPTS)


def test_reward_functions_load_from_a_file_or_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def score(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    assert rewards.load(f"{tmp_path / 'my_rewards.py'}:score")(completions=["a"]) == [1.0]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)  # as the fastrm console script runs: the working directory not on sys.path
    assert rewards.load("my_rewards:score")(completions=["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="'my_rewards:nope': cannot import it"):
        rewards.load("my_rewards:nope")
    with pytest.raises(ValueError, match="'nowhere.py:f': cannot import it \\(no file nowhere.py\\)"):
        rewards.load("nowhere.py:f")
    with pytest.raises(ValueError, match="expected 'embedded', 'package.module:function'"):
        rewards.load("my_rewards")


@pytest.mark.parametrize("overrides,match", [
    (["reward_fn=[m:f1,m:f2]", "reward_weights=[1.0]"], "setting reward_weights=\\[1.0\\]: needs one weight per "
                                                        "reward_fn function \\(2\\)"),
    (["reward_fn=[]"], "setting reward_fn=\\[\\]: must be"),
    (["reward_weights=[nan]"], "setting reward_weights=\\[nan\\]: must be finite"),
])
def test_bad_reward_settings(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(RLConfig, None, ["reward=rule", *overrides])


def test_ppo_cli_prints_the_rule_score_before_and_after(tmp_path, capsys):
    from fastrm.cli import main

    datasets.DatasetDict(train=datasets.Dataset.from_list(PROMPTS),
                         test=datasets.Dataset.from_list(PROMPTS[:2])).save_to_disk(str(tmp_path / "dict"))
    code = main(["ppo", *TINY, f"output_dir={tmp_path / 'run'}", f"train_data={tmp_path / 'dict'}", "max_steps=1",
                 "reward_fn=[test_reward_functions:overlap,test_reward_functions:length]", "reward_weights=[1,0.5]"])
    assert code == 0
    out = capsys.readouterr().out
    for key in ("eval/score", "eval/score/overlap", "eval/score/length"):
        assert f"{key} " in out and " -> " in out, out
    assert "eval/accuracy" not in out
    # the eval prompts are the DatasetDict's 'test' split: scored before, at the last step, and after
    assert [len(c[1]["answer"]) for c in CALLS if c[0] == "overlap"] == [2, 4, 2, 2]
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/overlap", "reward/length", "reward/rule", "objective/scores"} <= set(logged)
