"""fastrm.data: row formats, validation with file/line errors, tokenization + truncation; fastrm.layout's collators."""

import json
import re

import pytest
import torch

from fastrm.data import (
    IGNORE_INDEX,
    detect_format,
    epoch_order,
    extract_prompt,
    iterate_batches,
    load_rows,
    num_batches,
)
from fastrm.layout import collate_preference, collate_ranking, collate_sft
from fastrm.tasks import build_tokenizer, make_preference_data, make_ranking_data, make_sft_data, write_jsonl
from fastrm.tokenization import load_tokenizer, tokenize_preference, tokenize_ranking, tokenize_sft


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


BOS, EOS, PAD = 1, 2, 0
U = {"role": "user", "content": "2+3="}


def A(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("row,fmt", [
    ({"prompt": "1+1=", "chosen": "2", "rejected": "3"}, "preference"),
    ({"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5}, "preference"),
    ({"chosen": "1+1=2", "rejected": "1+1=3"}, "implicit_preference"),
    ({"prompt": [U], "chosen": [A("5")], "rejected": [A("6")]}, "conversational_preference"),
    ({"chosen": [U, A("5")], "rejected": [U, A("6")]}, "conversational_preference"),
    ({"prompt": "1+1=", "responses": ["2", "3"], "ranks": [0, 1]}, "ranking"),
    ({"prompt": "1+1=", "completion": "2"}, "sft"),
    ({"messages": [U, A("5")]}, "conversational_sft"),
    ({"prompt": [U], "completion": [A("5")]}, "conversational_sft"),
])
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt
    assert load_rows([row]) == [row]  # and each is valid


def test_detect_format_rejects_unknown_rows():
    with pytest.raises(ValueError, match="unrecognised row with keys"):
        detect_format({"text": "hello"})
    with pytest.raises(ValueError, match="JSON object"):
        detect_format(["a"])


# --------------------------------------------------------------------------- loading and validation


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"})


@pytest.mark.parametrize("bad,what", [
    ('{"prompt": "1+1=", "chosen": "2"', "invalid JSON"),
    ('{"prompt": "1+1=", "chosen": "2"}', "missing key 'rejected'"),
    ('{"prompt": "1+1=", "chosen": 2, "rejected": "3"}', "'chosen' must be a string, got int"),
    ('{"prompt": "", "chosen": "2", "rejected": "3"}', "'prompt' is an empty string"),
    ('{"prompt": "1+1=", "chosen": "2", "rejected": "2"}', "identical"),
    ('{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": "big"}', "'margin' must be a number"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"prompt": "1+1=", "completion": "2"}', "a sft row .* where preference rows are expected"),
    ('{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "2"}], '
     '"rejected": [{"role": "assistant", "content": "3"}]}', r"'prompt'\[0\] is missing 'content'"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, what):
    path = _write_lines(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(ValueError, match=rf"prefs\.jsonl, line 3: .*{what}"):
        load_rows(path)


@pytest.mark.parametrize("bad,what", [
    ({"prompt": "1+1=", "responses": ["2", "3", "4"], "ranks": [0, 1]}, "'responses' has 3 entries but 'ranks' has 2"),
    ({"prompt": "1+1=", "responses": ["2", "3"], "ranks": [0, "1"]}, r"'ranks'\[1\] must be an int"),
    ({"prompt": "1+1=", "responses": ["2", "3"], "ranks": [1, 1]}, "all 'ranks' are equal"),
    ({"prompt": "1+1=", "responses": ["2", " "], "ranks": [0, 1]}, r"'responses'\[1\] is an empty string"),
    ({"prompt": "1+1=", "responses": ["2"], "ranks": [0]}, "at least 2"),
])
def test_malformed_ranking_rows(tmp_path, bad, what):
    good = {"prompt": "1+1=", "responses": ["2", "3"], "ranks": [0, 1]}
    path = write_jsonl(tmp_path / "rank.jsonl", [good, bad])
    with pytest.raises(ValueError, match=rf"rank\.jsonl, line 2: .*{what}"):
        load_rows(path, "ranking")


@pytest.mark.parametrize("bad,what", [
    ({"prompt": "1+1=", "completion": ""}, "'completion' is an empty string"),
    ({"messages": [U]}, "must end with an assistant message"),
    ({"messages": [U, A("")]}, "final assistant message is empty"),
    ({"messages": "hi"}, "must be a list"),
])
def test_malformed_sft_rows_in_memory_name_the_row(bad, what):
    with pytest.raises(ValueError, match=rf"row 2: .*{what}"):
        load_rows([{"prompt": "1+1=", "completion": "2"}, bad])


def test_skip_malformed_counts_and_keeps_the_rest(tmp_path):
    empty_chosen = '{"prompt": "x", "chosen": "", "rejected": "3"}'
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, "{oops", "", GOOD, empty_chosen, GOOD])
    rows, report = load_rows(path, skip_malformed=True, return_report=True)
    assert len(rows) == 3 and report.n_rows == 3 and report.skipped == 2  # the blank line is not malformed
    assert re.search(r"d\.jsonl, line 2: invalid JSON", report.errors[0])
    assert re.search(r"d\.jsonl, line 5: 'chosen' is an empty string", report.errors[1])
    assert report.formats == {"preference": 3}
    with pytest.raises(ValueError, match="line 2"):
        load_rows(path)
    bad_only = _write_lines(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match=r"no valid rows \(2 malformed"):
        load_rows(bad_only, skip_malformed=True)


def test_load_rows_sources(tmp_path):
    rows = make_preference_data(5, seed=0)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load_rows(path) == rows
    assert load_rows(str(path), "preference") == rows

    class DatasetLike:  # iterates dicts, like datasets.Dataset
        def __iter__(self):
            return iter(rows)

    assert load_rows(DatasetLike()) == rows
    assert load_rows(r for r in rows) == rows
    with pytest.raises(TypeError, match="iterable of row dicts"):
        load_rows(rows[0])
    with pytest.raises(ValueError, match="where ranking rows are expected"):
        load_rows(rows, "ranking")


# --------------------------------------------------------------------------- preference tokenization


def test_standard_preference_tokenization(tok):
    rows = [{"prompt": "37+5=", "chosen": "42", "rejected": "41", "margin": 0.5},
            {"prompt": "1+1=", "chosen": "2", "rejected": "11"}]
    examples, report = tokenize_preference(rows, tok, max_length=64)
    assert (report.n_rows, report.n_examples, report.truncated, report.dropped) == (2, 2, 0, 0)
    assert examples[0]["chosen_ids"] == [BOS] + enc(tok, "37+5=") + enc(tok, "42") + [EOS]
    assert examples[0]["rejected_ids"] == [BOS] + enc(tok, "37+5=41") + [EOS]
    assert examples[0]["prompt_len"] == 6 and examples[0]["margin"] == 0.5
    assert "margin" not in examples[1]


def test_implicit_prompt_is_split_at_the_longest_common_prefix(tok):
    assert extract_prompt({"chosen": "2+3=5", "rejected": "2+3=55"}) == {"prompt": "2+3=", "chosen": "5",
                                                                         "rejected": "55"}
    # TRL's rule: a space right before the split point goes with the responses
    assert extract_prompt({"chosen": "q: 2+3= 5", "rejected": "q: 2+3= 6"})["prompt"] == "q: 2+3="
    split = extract_prompt({"chosen": [U, A("5")], "rejected": [U, A("6")]})
    assert split["prompt"] == [U] and split["chosen"] == [A("5")]
    implicit, _ = tokenize_preference([{"chosen": "37+5=42", "rejected": "37+5=24"}], tok)
    explicit, _ = tokenize_preference([{"prompt": "37+5=", "chosen": "42", "rejected": "24"}], tok)
    assert implicit == explicit
    with pytest.raises(ValueError, match="identical"):
        load_rows([{"chosen": "1+1=2", "rejected": "1+1=2"}])


def test_conversational_preference_uses_the_chat_template(tok):
    row = {"prompt": [U], "chosen": [A("5")], "rejected": [A("6")]}
    (ex,), _ = tokenize_preference([row], tok)
    rendered_prompt = "user: 2+3=\nassistant: "
    assert ex["chosen_ids"] == [BOS] + enc(tok, rendered_prompt) + enc(tok, "5") + [EOS]
    assert tok.decode(ex["rejected_ids"], skip_special_tokens=True) == rendered_prompt + "6"
    assert ex["prompt_len"] == 1 + len(rendered_prompt)
    # implicit conversational: multi-turn, the shared leading messages are the prompt
    turns = [U, A("5"), {"role": "user", "content": "1+1="}]
    (imp,), _ = tokenize_preference([{"chosen": turns + [A("2")], "rejected": turns + [A("3")]}], tok)
    (exp,), _ = tokenize_preference([{"prompt": turns, "chosen": [A("2")], "rejected": [A("3")]}], tok)
    assert imp == exp
    text = tok.decode(imp["chosen_ids"], skip_special_tokens=True)
    assert text == "user: 2+3=\nassistant: 5\nuser: 1+1=\nassistant: 2"


def test_chat_template_that_emits_bos_is_not_doubled(tok):
    from fastrm.tasks.arithmetic import CHAT_TEMPLATE

    t = build_tokenizer()
    t.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    (ex,), _ = tokenize_preference([{"prompt": [U], "chosen": [A("5")], "rejected": [A("6")]}], t)
    (ref,), _ = tokenize_preference([{"prompt": [U], "chosen": [A("5")], "rejected": [A("6")]}], tok)
    assert ex == ref and ex["chosen_ids"].count(BOS) == 1


def test_tokenizer_without_bos_or_chat_template(tok):
    t = build_tokenizer()
    t.add_bos_token = False  # the tokenizer's own template (what tok(text) adds) decides, not its bos_token
    t.bos_token = None
    (ex,), _ = tokenize_preference([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}], t)
    assert ex["chosen_ids"] == enc(tok, "1+1=2") + [EOS]
    t.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_preference([{"prompt": [U], "chosen": [A("5")], "rejected": [A("6")]}], t)


def test_tokenize_validates_in_memory_rows_and_arguments(tok):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    with pytest.raises(ValueError, match="row 2: 'rejected' is an empty string"):
        tokenize_preference([good, dict(good, rejected="")], tok)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_preference([good], tok, max_length=2)
    with pytest.raises(ValueError, match="truncation"):
        tokenize_preference([good], tok, truncation="left")


def test_tokenize_accepts_a_jsonl_path(tok, tmp_path):
    rows = make_preference_data(4, seed=0)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert tokenize_preference(path, tok)[0] == tokenize_preference(rows, tok)[0]


# --------------------------------------------------------------------------- truncation


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(tok):
    prompt = "1+2+3+4+5+6+7+8+9="  # 18 tokens
    rows = [{"prompt": prompt, "chosen": "45", "rejected": "4500"},  # too long: 1 + 18 + 4 + 1 = 24
            {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]  # fits
    examples, report = tokenize_preference(rows, tok, max_length=12)
    assert (report.truncated, report.dropped, report.n_examples) == (1, 0, 2)
    ex = examples[0]
    kept = 12 - 2 - 4  # the budget left by the longer response; both sequences share that prompt
    assert ex["chosen_ids"] == [BOS] + enc(tok, prompt)[-kept:] + enc(tok, "45") + [EOS]
    assert ex["rejected_ids"] == [BOS] + enc(tok, prompt)[-kept:] + enc(tok, "4500") + [EOS]
    assert len(ex["rejected_ids"]) == 12 and ex["prompt_len"] == 1 + kept
    assert examples[1]["chosen_ids"] == [BOS] + enc(tok, "1+1=2") + [EOS]


def test_a_response_longer_than_max_length_is_cut_from_the_right(tok):
    row = {"prompt": "1+1=", "chosen": "2", "rejected": "123456789"}
    (ex,), report = tokenize_preference([row], tok, max_length=6)
    assert report.truncated == 1
    assert ex["rejected_ids"] == [BOS] + enc(tok, "1234") + [EOS]  # the prompt is gone, EOS kept
    assert ex["chosen_ids"] == [BOS] + enc(tok, "2") + [EOS]
    assert ex["prompt_len"] == 1


def test_drop_mode_drops_and_counts(tok):
    rows = [{"prompt": "1+2+3+4=", "chosen": "10", "rejected": "11"},
            {"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    examples, report = tokenize_preference(rows, tok, max_length=8, truncation="drop")
    assert (report.n_rows, report.n_examples, report.dropped, report.truncated) == (2, 1, 1, 0)
    assert examples[0]["chosen_ids"] == [BOS] + enc(tok, "1+1=2") + [EOS]


def test_sft_truncation_cuts_the_prompt_then_the_completion_without_eos(tok):
    rows = [{"prompt": "1+2+3+4+5=", "completion": "15"}, {"prompt": "1+1=", "completion": "123456789"}]
    examples, report = tokenize_sft(rows, tok, max_length=6)
    assert report.truncated == 2
    assert examples[0]["input_ids"] == [BOS] + enc(tok, "5=15") + [EOS] and examples[0]["prompt_len"] == 3
    assert examples[1]["input_ids"] == [BOS] + enc(tok, "12345")  # no EOS: the answer did not end here
    assert examples[1]["labels"] == [IGNORE_INDEX] + enc(tok, "12345")
    _, dropped = tokenize_sft(rows, tok, max_length=6, truncation="drop")
    assert dropped.dropped == 2 and dropped.n_examples == 0


# --------------------------------------------------------------------------- ranking and SFT tokenization


def test_ranking_tokenization(tok):
    rows = [{"prompt": "1+1=", "responses": ["2", "3", "11"], "ranks": [0, 1, 1]},
            {"prompt": [U], "responses": [[A("5")], "6"], "ranks": [0, 1]}]
    examples, report = tokenize_ranking(rows, tok, max_length=32)
    assert report.n_examples == 2
    assert examples[0]["response_ids"] == [[BOS] + enc(tok, "1+1=" + r) + [EOS] for r in ["2", "3", "11"]]
    assert examples[0]["ranks"] == [0, 1, 1]
    assert [tok.decode(s, skip_special_tokens=True) for s in examples[1]["response_ids"]] == [
        "user: 2+3=\nassistant: 5", "user: 2+3=\nassistant: 6"]


def test_sft_labels_mask_the_prompt(tok):
    (ex,), _ = tokenize_sft([{"prompt": "37+5=", "completion": "42"}], tok)
    assert ex["input_ids"] == [BOS] + enc(tok, "37+5=42") + [EOS]
    assert ex["labels"] == [IGNORE_INDEX] * 6 + enc(tok, "42") + [EOS]


def test_sft_messages_train_on_the_last_assistant_turn_only(tok):
    msgs = [U, A("5"), {"role": "user", "content": "1+1="}, A("2")]
    (ex,), _ = tokenize_sft([{"messages": msgs}], tok)
    assert tok.decode(ex["input_ids"], skip_special_tokens=True) == "user: 2+3=\nassistant: 5\nuser: 1+1=\nassistant: 2"
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert trained == enc(tok, "2") + [EOS]
    (pc,), _ = tokenize_sft([{"prompt": msgs[:3], "completion": msgs[3:]}], tok)
    assert pc == ex


# --------------------------------------------------------------------------- collators


def _packed_sequences(batch):
    cu = batch.cu_seq_lens.tolist()
    row = batch.input_ids[0]
    return [row[a:b].tolist() for a, b in zip(cu[:-1], cu[1:])]


def _unpadded(batch):
    return [r[m.bool()].tolist() for r, m in zip(batch.input_ids, batch.attention_mask)]


def test_padded_and_packed_preference_collators_carry_the_same_tokens(tok):
    rows = make_preference_data(7, seed=3, with_margin=True, max_level=4)
    examples, _ = tokenize_preference(rows, tok)
    padded_pairs = collate_preference(examples, PAD)
    packed_pairs = collate_preference(examples, PAD, "packed")
    padded, packed = padded_pairs.sequences, packed_pairs.sequences
    expected = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]  # chosen first
    B = len(examples)
    assert padded.input_ids.shape == (2 * B, max(map(len, expected)))
    assert _unpadded(padded) == expected
    assert padded.attention_mask.sum(1).tolist() == [len(s) for s in expected]
    assert (padded.input_ids[padded.attention_mask == 0] == PAD).all()
    assert padded.attention_mask[:, 0].all()  # right padding

    S = sum(map(len, expected))
    assert packed.input_ids.shape == (1, S) and packed.position_ids.shape == (1, S)
    assert packed.cu_seq_lens.dtype == torch.int32 and packed.cu_seq_lens.shape == (2 * B + 1,)
    assert packed.seq_ends.dtype == torch.long and packed.seq_ends.shape == (2 * B,)
    assert _packed_sequences(packed) == expected == _unpadded(padded)
    assert (packed.input_ids[0, packed.seq_ends] == EOS).all()
    assert (packed.input_ids[0] == EOS).sum() == 2 * B  # and there is no other EOS
    assert packed.max_length == max(map(len, expected))
    starts = packed.cu_seq_lens[:-1].long()
    assert (packed.position_ids[0, starts] == 0).all()
    assert packed.position_ids[0].tolist() == [i for s in expected for i in range(len(s))]
    margins = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
    assert torch.equal(padded_pairs.margin, margins) and torch.equal(packed_pairs.margin, margins)


def test_preference_collators_margin_handling(tok):
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "1+1=", "chosen": "2", "rejected": "4"}]
    examples, _ = tokenize_preference(rows, tok)
    assert collate_preference(examples, PAD).margin is None
    assert collate_preference(examples, PAD, "packed").margin is None
    examples[1]["margin"] = 0.25  # a pair without a margin counts as margin 0
    assert collate_preference(examples, PAD).margin.tolist() == [0.0, 0.25]
    padded = collate_preference(examples, PAD, pad_to_multiple_of=8).sequences
    assert padded.input_ids.shape == (4, 8)
    with pytest.raises(ValueError, match="empty batch"):
        collate_preference([], PAD, "packed")


def test_ranking_collator_fills_missing_responses(tok):
    rows = [{"prompt": "1+1=", "responses": ["2", "3", "11"], "ranks": [0, 1, 1]},
            {"prompt": "2+2=", "responses": ["4", "44"], "ranks": [0, 1]}]
    examples, _ = tokenize_ranking(rows, tok)
    ranked = collate_ranking(examples, PAD)
    batch = ranked.sequences
    assert batch.input_ids.shape[0] == 6 and ranked.ranks.tolist() == [[0, 1, 1], [0, 1, -1]]
    seqs = _unpadded(batch)
    assert seqs[:3] == examples[0]["response_ids"] and seqs[3:5] == examples[1]["response_ids"]  # row b*K + k
    assert seqs[5] == [BOS] and batch.attention_mask[5].sum() == 1  # 1-token dummy, never fully masked


def test_sft_collators(tok):
    rows = make_sft_data(5, seed=0, max_level=4)
    examples, _ = tokenize_sft(rows, tok)
    padded = collate_sft(examples, PAD)
    packed = collate_sft(examples, PAD, "packed")
    assert _unpadded(padded) == [e["input_ids"] for e in examples] == _packed_sequences(packed)
    assert (padded.labels[padded.attention_mask == 0] == IGNORE_INDEX).all()
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        assert padded.labels[i, :n].tolist() == e["labels"]
        trained = padded.labels[i][padded.labels[i] != IGNORE_INDEX].tolist()
        assert tok.decode(trained, skip_special_tokens=True) == rows[i]["completion"] and trained[-1] == EOS
    assert packed.labels.shape == packed.input_ids.shape == packed.position_ids.shape
    assert packed.labels[0].tolist() == [t for e in examples for t in e["labels"]]  # prompts start masked
    starts = packed.cu_seq_lens[:-1].long()
    assert (packed.labels[0, starts] == IGNORE_INDEX).all()
    # even where a sequence starts with a trained token (no BOS, prompt cut away), nothing is learned
    # across the boundary from the previous sequence's EOS
    bare = collate_sft([{"input_ids": [5, 6, EOS], "labels": [5, 6, EOS]}] * 2, PAD, "packed")
    assert bare.labels[0].tolist() == [IGNORE_INDEX, 6, EOS, IGNORE_INDEX, 6, EOS]


# --------------------------------------------------------------------------- batching


def test_iterate_batches_is_deterministic_and_resumable():
    data = list(range(23))
    epoch0 = list(iterate_batches(data, 5, seed=1, epoch=0))
    assert [len(b) for b in epoch0] == [5, 5, 5, 5, 3] and sorted(sum(epoch0, [])) == data
    assert epoch0 == list(iterate_batches(data, 5, seed=1, epoch=0))
    assert epoch0 != list(iterate_batches(data, 5, seed=1, epoch=1))
    assert epoch0 != list(iterate_batches(data, 5, seed=2, epoch=0))
    assert list(iterate_batches(data, 5, seed=1, epoch=0, start_batch=2)) == epoch0[2:]
    assert [len(b) for b in iterate_batches(data, 5, seed=1, epoch=0, drop_last=True)] == [5] * 4
    assert list(iterate_batches(data, 10, seed=0, epoch=0, shuffle=False))[0] == list(range(10))
    assert num_batches(23, 5) == 5 and num_batches(23, 5, drop_last=True) == 4
    order = epoch_order(23, 5, seed=1, epoch=0)
    assert [[data[i] for i in b] for b in order] == epoch0  # the index form the trainers use
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(data, 0, seed=0, epoch=0))


# --------------------------------------------------------------------------- tokenizer loading


def test_load_tokenizer_embedded_or_local_folder(tmp_path):
    assert load_tokenizer("embedded").get_vocab() == build_tokenizer().get_vocab()
    assert load_tokenizer(None).eos_token_id == EOS
    t = build_tokenizer()
    t.pad_token = None
    t.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode("12+3=", add_special_tokens=False) == t.encode("12+3=", add_special_tokens=False)
    assert loaded.pad_token_id == t.unk_token_id  # no pad token: its unknown token pads (it is not EOS)
    t.unk_token = None
    t.save_pretrained(tmp_path / "tok2")
    assert load_tokenizer(tmp_path / "tok2").pad_token_id == EOS  # no pad and no unknown token: EOS pads
    with pytest.raises(ValueError, match="never downloads"):
        load_tokenizer("gpt2")


# --------------------------------------------------------------------------- end to end


def test_default_task_data_round_trip(tok, tmp_path):
    from fastrm.tasks import prepare_default_data

    paths = prepare_default_data(tmp_path, n_sft=20, n_pref=20, n_eval=10, seed=0)
    rows = load_rows(paths.pref_train, "preference")
    examples, report = tokenize_preference(rows, tok, max_length=32)
    assert report.n_examples == 20 and report.truncated == 0
    for row, ex in zip(rows, examples):
        assert tok.decode(ex["chosen_ids"], skip_special_tokens=True) == row["prompt"] + row["chosen"]
    sft, _ = tokenize_sft(load_rows(paths.sft, "sft"), tok, max_length=32)
    assert len(sft) == 20
    ranking, _ = tokenize_ranking(make_ranking_data(4, 3, seed=0), tok)
    assert collate_ranking(ranking, PAD).ranks.shape == (4, 3)
