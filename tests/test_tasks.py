"""The embedded arithmetic task: checker, levels, simulated annotator, tokenizer, data files."""

import json
import math

import pytest

from fastrm.tasks import arithmetic as ar
from fastrm.tasks import (
    ArithmeticTask,
    build_tokenizer,
    is_correct,
    make_preference_data,
    make_ranking_data,
    make_sft_data,
    prepare_default_data,
    reward_fn,
    score,
    write_jsonl,
)

# --------------------------------------------------------------------------- checker


@pytest.mark.parametrize("completion", ["42", " 42", "42<eos>", "42<eos>17", "42\n", "42 junk after a space", "042"])
def test_score_exact(completion):
    assert score("37+5=", completion) == 1.0
    assert is_correct("37+5=", completion)


@pytest.mark.parametrize("prompt,answer", [("5-33=", "-28"), ("7*8=", "56"), ("0+0=", "0"), ("999-0=", "999"),
                                           ("user: 12+30=\nassistant: ", "42"), ("3 + 4 =", "7")])
def test_score_parses_all_operators_and_chat_prompts(prompt, answer):
    assert score(prompt, answer) == 1.0
    assert score(prompt, str(int(answer) + 1)) < 0.5


def test_score_close_answers_get_shaped_credit():
    expected = 0.5 * math.exp(-1 / (1 + 0.05 * 42))
    assert score("37+5=", "41") == pytest.approx(expected)
    assert score("37+5=", "43<eos>") == pytest.approx(expected)  # symmetric in the error
    assert 0 < score("37+5=", "52") < score("37+5=", "43") < 0.5  # further is worse
    assert score("37+5=", "-42") < 1e-3
    assert not is_correct("37+5=", "41")


@pytest.mark.parametrize("completion", ["", "   ", "abc", "42abc", "4.2", "<eos>42", "=42", "+", "9" * 30])
def test_score_garbage_is_zero(completion):
    assert score("37+5=", completion) == 0.0
    assert not is_correct("37+5=", completion)


def test_score_rejects_unparseable_prompt():
    with pytest.raises(ValueError, match="no arithmetic problem"):
        score("hello", "42")


def test_reward_fn_batches_and_checks_lengths():
    task = ArithmeticTask()
    prompts, completions = ["1+1=", "2+2=", "3+3="], ["2", "5", "x"]
    expected = [1.0, score("2+2=", "5"), 0.0]
    assert reward_fn(prompts, completions) == expected
    assert task.reward_fn(prompts, completions, ignored_kwarg=1) == expected
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        reward_fn(prompts, completions[:2])


# --------------------------------------------------------------------------- problems and levels


def _parts(problem):
    return ar.parse_prompt(problem.prompt)


def test_levels_have_the_documented_operators_and_ranges():
    task = ArithmeticTask(max_level=4, seed=0)
    by_level = {lvl: task.sample(400, seed=lvl, level=lvl) for lvl in range(5)}
    for lvl, problems in by_level.items():
        assert all(p.difficulty == lvl for p in problems)
        assert all(int(p.answer) == ar.expected_answer(p.prompt) for p in problems)
    ops = {lvl: {_parts(p)[1] for p in ps} for lvl, ps in by_level.items()}
    assert ops == {0: {"+"}, 1: {"+"}, 2: {"+", "-"}, 3: {"+", "-", "*"}, 4: {"+", "-", "*"}}
    assert max(max(a, b) for a, _, b in map(_parts, by_level[0])) <= 9
    assert 10 <= max(max(a, b) for a, _, b in map(_parts, by_level[1])) <= 99
    assert min(int(p.answer) for p in by_level[2]) >= 0  # level 2 never goes negative
    assert min(int(p.answer) for p in by_level[3]) < 0
    assert max(max(a, b) for a, _, b in map(_parts, by_level[4])) > 99


def test_level_none_mixes_levels_up_to_max_level():
    task = ArithmeticTask(max_level=2, seed=0)
    levels = {p.difficulty for p in task.sample(300, seed=3)}
    assert levels == {0, 1, 2}
    with pytest.raises(ValueError, match="level"):
        task.sample(3, seed=0, level=3)
    with pytest.raises(ValueError, match="max_level"):
        ArithmeticTask(max_level=ar.MAX_LEVEL + 1)


def test_generation_is_deterministic_in_the_seed():
    assert make_preference_data(50, seed=7) == make_preference_data(50, seed=7)
    assert make_preference_data(50, seed=7) != make_preference_data(50, seed=8)
    assert make_ranking_data(20, 3, seed=1) == make_ranking_data(20, 3, seed=1)
    task = ArithmeticTask(seed=5)
    assert ArithmeticTask(seed=5).sample(10) == task.sample(10)  # the task's own stream is seeded too
    hard = ArithmeticTask(max_level=4)
    assert make_sft_data(20, seed=0, task=hard) == hard.make_sft_data(20, seed=0)
    assert make_sft_data(20, seed=0, task=hard) == make_sft_data(20, seed=0, max_level=4)


def test_wrong_answers_are_wrong_and_distinct():
    task = ArithmeticTask(max_level=4)
    for problem in task.sample(200, seed=0):
        wrong = task.wrong_answers(problem, 5, seed=1)
        assert len(set(wrong)) == 5
        assert not any(is_correct(problem.prompt, w) for w in wrong)


def test_sft_rows_are_correct():
    rows = make_sft_data(100, seed=0, max_level=3)
    assert all(set(r) == {"prompt", "completion"} and is_correct(r["prompt"], r["completion"]) for r in rows)
    conv = make_sft_data(3, seed=0, conversational=True)
    assert [m["role"] for m in conv[0]["messages"]] == ["user", "assistant"]
    assert is_correct(conv[0]["messages"][0]["content"], conv[0]["messages"][1]["content"])


# --------------------------------------------------------------------------- simulated annotator


def _flipped(row):
    return score(row["prompt"], row["chosen"]) < score(row["prompt"], row["rejected"])


def test_noiseless_annotator_always_prefers_the_higher_true_score():
    rows = make_preference_data(2000, seed=0, noise=0.0, max_level=4)
    assert all(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    # both kinds of pairs occur: correct vs wrong, and wrong vs less wrong
    assert 0.6 < sum(is_correct(r["prompt"], r["chosen"]) for r in rows) / len(rows) < 0.9


@pytest.mark.parametrize("noise", [0.1, 0.25])
def test_noisy_annotator_flip_rate_matches_noise(noise):
    rows = make_preference_data(4000, seed=1, noise=noise, with_margin=True)
    flips = [_flipped(r) for r in rows]
    assert abs(sum(flips) / len(rows) - noise) < 0.025  # ~4.5 binomial standard deviations
    # Bradley-Terry-like: close pairs flip far more often than clear ones
    gaps = [r["margin"] for r in rows]
    close = [f for f, g in zip(flips, gaps) if g < 0.5]
    clear = [f for f, g in zip(flips, gaps) if g >= 0.5]
    assert len(close) > 100 and len(clear) > 100
    assert sum(close) / len(close) > 2 * sum(clear) / len(clear)


def test_margin_is_the_true_score_gap():
    rows = make_preference_data(200, seed=2, noise=0.2, with_margin=True)
    for r in rows:
        gap = abs(score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"]))
        assert r["margin"] == pytest.approx(gap, abs=1e-6)
        assert r["margin"] > 1e-3
    assert "margin" not in make_preference_data(3, seed=2)[0]
    with pytest.raises(ValueError, match="noise"):
        make_preference_data(3, seed=0, noise=0.7)


def test_conversational_preference_rows():
    row = make_preference_data(1, seed=0, conversational=True)[0]
    assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    assert row["chosen"] != row["rejected"]


def test_ranking_rows_rank_by_true_score():
    rows = make_ranking_data(500, 4, seed=0, max_level=3)
    for r in rows:
        assert len(r["responses"]) == len(r["ranks"]) == 4 and len(set(r["responses"])) == 4
        scores = [round(score(r["prompt"], x), 3) for x in r["responses"]]
        distinct = sorted(set(scores), reverse=True)
        assert r["ranks"] == [distinct.index(s) for s in scores]  # dense, 0 = best, ties shared
        assert len(set(r["ranks"])) >= 2
    assert any(len(set(r["ranks"])) < 4 for r in rows)  # ties do occur and share a rank
    noisy = make_ranking_data(500, 4, seed=0, noise=1.0, max_level=3)
    assert sum(a["ranks"] != b["ranks"] for a, b in zip(rows, noisy)) > 400
    with pytest.raises(ValueError, match="k must be"):
        make_ranking_data(2, 1, seed=0)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_basics():
    tok = build_tokenizer()
    assert len(tok) < 64
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tok.padding_side == "right"
    ids = tok.encode("37+5=", add_special_tokens=False)
    assert len(ids) == 5 and ids == [tok.convert_tokens_to_ids(c) for c in "37+5="]
    assert tok("37+5=")["input_ids"] == [tok.bos_token_id] + ids  # BOS only with special tokens
    assert tok.encode("A", add_special_tokens=False) == [tok.unk_token_id]
    text = "user: 37+5=\nassistant: 42"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok(text)["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.encode("42<eos>", add_special_tokens=False) == tok.encode("42", add_special_tokens=False) + [2]


def test_tokenizer_round_trips_through_save_pretrained(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    texts = ["37+5=42", "user: 1+2=\nassistant: 3", "<bos>9*9=81<eos><pad>", "xyz Q?"]
    for text in texts:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.padding_side == "right"
    assert loaded.chat_template == tok.chat_template
    batch = loaded(["1+2=", "11+22="], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0] and batch["attention_mask"][0] == [1] * 5 + [0, 0]


def test_chat_template_renders():
    tok = build_tokenizer()
    conv = [{"role": "user", "content": "37+5="}, {"role": "assistant", "content": "42"}]
    full = tok.apply_chat_template(conv, tokenize=False)
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert full == "user: 37+5=\nassistant: 42"
    assert prompt == "user: 37+5=\nassistant: "
    assert full.startswith(prompt)  # the data layer relies on this to split prompt from response
    ids = tok.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == prompt
    assert score(prompt, "42<eos>") == 1.0  # the checker reads chat-rendered prompts


# --------------------------------------------------------------------------- files


def test_write_jsonl_and_prepare_default_data(tmp_path):
    path = write_jsonl(tmp_path / "sub" / "x.jsonl", [{"a": 1}, {"b": "é"}])
    assert path.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": "é"}']

    paths = prepare_default_data(tmp_path / "data", n_sft=30, n_pref=40, n_eval=20, seed=3)
    assert paths.sft.name == "sft.jsonl" and paths.pref_train.name == "pref_train.jsonl"
    sft, train, ev = ([json.loads(x) for x in p.read_text().splitlines()] for p in paths)
    assert (len(sft), len(train), len(ev)) == (30, 40, 20)
    assert all(is_correct(r["prompt"], r["completion"]) for r in sft)
    assert all(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in ev)  # eval: truth
    assert train != ev  # independent streams
    again = prepare_default_data(tmp_path / "again", n_sft=30, n_pref=40, n_eval=20, seed=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
