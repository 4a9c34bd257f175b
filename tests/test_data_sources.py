"""Data files through the ``datasets`` library: Parquet files and folders, ``save_to_disk`` folders (a Dataset or a
DatasetDict, its splits), ``datasets`` objects given in Python; the same rows as JSONL, errors naming file and row,
and every trainer (reward, SFT, RL) training on them."""

import ast
from pathlib import Path

import pytest

import fastrm
from fastrm.data import load_rows, load_train_eval
from fastrm.tasks import build_tokenizer, make_preference_data, make_sft_data, write_jsonl
from fastrm.tokenization import prepare_prompts

datasets = pytest.importorskip("datasets")

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "tensorboard=false", "progress=false", "device=cpu", "backend=torch"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    # Parquet files are converted into the datasets cache: keep the test's in its own folder.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def prefs_with_optional_margin(n):
    rows = make_preference_data(n, seed=1)
    for i, row in enumerate(rows):
        if i % 2:
            row["margin"] = 0.25 * i  # absent on every other row: null in the Arrow column
    return rows


# --------------------------------------------------------------------------- load_rows


def test_parquet_and_save_to_disk_give_the_jsonl_rows(tmp_path):
    rows = prefs_with_optional_margin(6)
    expected = load_rows(write_jsonl(tmp_path / "p.jsonl", rows))
    rows = [dict(row, margin=row.get("margin")) for row in rows]  # an Arrow table has every column in every row
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_rows(tmp_path / "p.parquet") == expected  # null margins count as absent
    # a folder of Parquet shards, read in name order
    (tmp_path / "shards").mkdir()
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "shards" / "part-1.parquet"))
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
    assert load_rows(tmp_path / "shards") == expected
    # save_to_disk: a Dataset, and a DatasetDict with its splits
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved"), "preference") == expected
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:4]),
                                  validation=datasets.Dataset.from_list(rows[4:]))
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "dict") == expected[:4]
    assert load_rows(tmp_path / "dict", split="validation") == expected[4:]
    with pytest.raises(ValueError, match=r"dict has the splits \['train', 'validation'\], not 'test'"):
        load_rows(tmp_path / "dict", split="test")
    # datasets objects given in Python
    assert load_rows(datasets.Dataset.from_list(rows)) == expected
    assert load_rows(splits, split="validation") == expected[4:]


def test_bad_rows_and_files_are_named(tmp_path):
    rows = make_preference_data(4, seed=2)
    rows[2]["chosen"] = ""
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "prefs.parquet"))
    with pytest.raises(ValueError, match=r"prefs\.parquet, row 3: 'chosen' is an empty string"):
        load_rows(tmp_path / "prefs.parquet")
    kept, report = load_rows(tmp_path / "prefs.parquet", skip_malformed=True, return_report=True)
    assert len(kept) == 3 and report.skipped == 1
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows)).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"dict \[train\], row 3: 'chosen' is an empty string"):
        load_rows(tmp_path / "dict")
    with pytest.raises(ValueError, match=r"row 3: 'chosen' is an empty string"):
        load_rows(datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"data file .*nothing\.parquet does not exist"):
        load_rows(tmp_path / "nothing.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read it with datasets"):
        load_rows(tmp_path / "broken.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a datasets save_to_disk folder nor a folder of .parquet files"):
        load_rows(tmp_path / "empty")


def test_train_eval_split_selection(tmp_path):
    rows = make_sft_data(10, seed=3)
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:7]),
                                  test=datasets.Dataset.from_list(rows[7:]))
    splits.save_to_disk(str(tmp_path / "dict"))
    # without eval_data: the DatasetDict's eval_split, not a held-out fraction of train
    train, evaluation = load_train_eval(tmp_path / "dict", None, 0.5, seed=0, task="sft")
    assert (train, evaluation) == (rows[:7], rows[7:])
    # no such split: eval_fraction of train, as for files
    train, evaluation = load_train_eval(tmp_path / "dict", None, 0.3, seed=0, eval_split="validation")
    assert len(train) == 5 and len(evaluation) == 2
    assert sorted(map(str, train + evaluation)) == sorted(map(str, rows[:7]))
    # both chosen by name
    train, evaluation = load_train_eval(tmp_path / "dict", tmp_path / "dict", 0.5, 0, train_split="test",
                                        eval_split="train")
    assert (train, evaluation) == (rows[7:], rows[:7])


def test_prompt_rows_keep_their_other_fields(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% endif %}")
    rows = [{"prompt": "1+1=", "answer": "2", "difficulty": 1}, {"prompt": [{"role": "user", "content": "2+2"}],
                                                                    "answer": "4"}]
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "prompts.parquet"))
    loaded = load_rows(tmp_path / "prompts.parquet", "prompt")
    assert loaded == rows[:1]
    prepared = prepare_prompts(rows, tok)
    assert prepared[0] == {"prompt": "1+1=", "conversation": None, "difficulty": 1.0,
                           "columns": {"answer": "2", "difficulty": 1}}
    assert prepared[1] == {"prompt": "2+2=", "conversation": rows[1]["prompt"], "columns": {"answer": "4"}}
    with pytest.raises(ValueError, match=r"row 2: 'difficulty' must be a finite number"):
        load_rows([rows[0], {"prompt": "x", "difficulty": "hard"}], "prompt")
    with pytest.raises(ValueError, match=r"row 1: needs 'prompt'"):
        load_rows([{"question": "x"}], "prompt")


def test_datasets_is_imported_lazily():
    """``import fastrm`` stays fast: no fastrm module imports ``datasets`` at module level (only inside the
    functions that read Parquet / save_to_disk data)."""
    root = Path(fastrm.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "datasets" for n in names), f"{path}: imports datasets at module level"


# --------------------------------------------------------------------------- trainers


def test_reward_and_sft_trainers_train_on_parquet_and_datasets(tmp_path):
    from fastrm.config import load_config
    from fastrm.trainers.reward_model import RewardConfig, RewardTrainer
    from fastrm.trainers.sft import SFTConfig, SFTTrainer

    common = TINY + ["batch_size=4", "max_steps=2", "eval_steps=2", "save_steps=2"]
    prefs = make_preference_data(12, seed=4)
    datasets.Dataset.from_list(prefs).to_parquet(str(tmp_path / "prefs.parquet"))
    rm = RewardTrainer(load_config(RewardConfig, None, [*common, f"output_dir={tmp_path / 'rm'}", "eval_fraction=0.25",
                                                        f"train_data={tmp_path / 'prefs.parquet'}"])).setup()
    assert (len(rm.train_examples), len(rm.eval_examples)) == (9, 3)
    rm.train()
    assert (tmp_path / "rm" / "checkpoint-2").is_dir() and 0.0 <= rm.evaluate()["eval/accuracy"] <= 1.0

    sft_rows = make_sft_data(12, seed=5)
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(sft_rows[:8]),
                                  validation=datasets.Dataset.from_list(sft_rows[8:]))
    splits.save_to_disk(str(tmp_path / "sft"))
    sft = SFTTrainer(load_config(SFTConfig, None, [*common, f"output_dir={tmp_path / 'sft'}", "eval_split=validation",
                                                   f"train_data={tmp_path / 'sft'}"])).setup()
    assert (len(sft.train_examples), len(sft.eval_examples)) == (8, 4)
    # a DatasetDict object given in Python instead of a path
    config = load_config(SFTConfig, None, [*common, f"output_dir={tmp_path / 'sft2'}", "eval_split=validation"])
    sft2 = SFTTrainer(config, train_data=splits).setup()
    assert sft2.train_examples == sft.train_examples and sft2.eval_examples == sft.eval_examples
    sft2.train()
    assert (tmp_path / "sft2" / "checkpoint-2").is_dir()
