"""Data layer: load and validate rows, tokenize them, and order them into batches (collation: :mod:`fastrm.layout`).

Row formats (``detect_format`` names them; extra keys are ignored):

=============================  ===========================================================================
format                         row
=============================  ===========================================================================
``preference``                 ``{"prompt": str, "chosen": str, "rejected": str, "margin"?: float}``
``implicit_preference``        ``{"chosen": str, "rejected": str, "margin"?}``: full texts; the prompt is
                               their longest common prefix (as TRL's ``extract_prompt``)
``conversational_preference``  ``"chosen"`` / ``"rejected"`` (and optional ``"prompt"``) are lists of
                               ``{"role", "content"}`` messages, rendered with the chat template; without
                               a prompt the shared leading messages are the prompt
``ranking``                    ``{"prompt", "responses": [K], "ranks": [K ints]}``, rank 0 = best, ties
                               share a rank; prompt/responses may be messages (conversational)
``sft``                        ``{"prompt": str, "completion": str}``: loss on the completion only
``conversational_sft``         ``{"messages": [...]}`` (loss on the last, assistant, turn only) or
                               ``{"prompt": [messages], "completion": [messages]}``
``prompt``                     RL prompts: ``{"prompt": str, "difficulty"?: float, ...}``; every other field
                               is passed to the reward functions (:mod:`fastrm.rewards`)
``conversational_prompt``      ``{"prompt": [messages]}`` or ``{"messages": [...]}``, rendered with the chat
                               template and its generation prompt
=============================  ===========================================================================

Sources (:func:`load_rows`): a JSONL file, a Parquet file (or a folder of them), a
``datasets.Dataset.save_to_disk`` folder, a ``datasets.Dataset`` / ``DatasetDict`` object, or any iterable of
dicts. Parquet and ``save_to_disk`` folders are read with the ``datasets`` library (imported only then); of a
``DatasetDict`` one split is taken (``split=``, the trainers' ``train_split`` / ``eval_split``). In rows read
through ``datasets`` a null field counts as absent (Arrow gives every row every column).

Tokenization and the sequence template: :mod:`fastrm.tokenization`; collation: :mod:`fastrm.layout`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fastrm.errors import ConfigError, DataError
from fastrm.layout import IGNORE_INDEX

logger = logging.getLogger(__name__)


FORMAT_TASK = {
    "preference": "preference",
    "implicit_preference": "preference",
    "conversational_preference": "preference",
    "ranking": "ranking",
    "sft": "sft",
    "conversational_sft": "sft",
    "prompt": "prompt",
    "conversational_prompt": "prompt",
}
FORMATS = tuple(FORMAT_TASK)
TASKS = ("preference", "ranking", "sft", "prompt")
TRUNCATION_MODES = ("truncate", "drop")


@dataclass
class LoadReport:
    """What :func:`load_rows` read: rows kept, malformed rows skipped (with their messages)."""

    source: str
    n_rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first ``max_errors_kept`` skip messages
    formats: dict[str, int] = field(default_factory=dict)  # rows kept per format


# ============================================================================ formats and validation


def _is_messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def detect_format(row) -> str:
    """Name the format of ``row`` (one of ``FORMATS``) from its keys and value types.

    Raises ``ValueError`` if the row is not an object or matches no format. Detection does not
    validate the values; :func:`validate_row` does.
    """
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    if "responses" in row or "ranks" in row:
        return "ranking"
    if "chosen" in row or "rejected" in row:
        if any(isinstance(row.get(k), list) for k in ("prompt", "chosen", "rejected")):
            return "conversational_preference"
        return "preference" if "prompt" in row else "implicit_preference"
    if "messages" in row:
        return "conversational_sft"
    if "completion" in row:
        if any(isinstance(row.get(k), list) for k in ("prompt", "completion")):
            return "conversational_sft"
        return "sft"
    if "prompt" in row:
        return "conversational_prompt" if isinstance(row["prompt"], list) else "prompt"
    raise ValueError(f"unrecognised row with keys {sorted(row)}: expected prompt/chosen/rejected, chosen/rejected, "
                     "prompt/responses/ranks, prompt/completion, messages or prompt")


def _check_text(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key!r} is an empty string")
    return value


def check_messages(value, key: str, *, last_assistant: bool = False) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list of {{'role', 'content'}} messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{key!r} is an empty message list")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{key!r}[{i}] must be a {{'role', 'content'}} object, got {type(m).__name__}")
        for k in ("role", "content"):
            if k not in m:
                raise ValueError(f"{key!r}[{i}] is missing {k!r}")
            if not isinstance(m[k], str):
                raise ValueError(f"{key!r}[{i}][{k!r}] must be a string, got {type(m[k]).__name__}")
        if not m["role"].strip():
            raise ValueError(f"{key!r}[{i}]['role'] is an empty string")
    if last_assistant:
        if value[-1]["role"] != "assistant":
            raise ValueError(f"{key!r} must end with an assistant message, got role {value[-1]['role']!r}")
        if not value[-1]["content"].strip():
            raise ValueError(f"{key!r}: the final assistant message is empty")
    return value


def _check_margin(row: dict):
    margin = row.get("margin")
    if margin is None:
        return
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"'margin' must be a number, got {type(margin).__name__}")
    if not math.isfinite(margin):
        raise ValueError(f"'margin' must be finite, got {margin}")


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extract_prompt(row: dict) -> dict:
    """Split an implicit-prompt preference row at the longest common prefix of chosen and rejected.

    Works on strings (character prefix; a space just before the split point goes to the responses,
    as in TRL's ``extract_prompt``) and on message lists (message prefix). The split is moved left if
    needed so both responses are non-empty. Returns a new row with ``prompt`` / ``chosen`` /
    ``rejected`` (other keys kept).
    """
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical")
    p = common_prefix_len(chosen, rejected)
    if isinstance(chosen, str) and p > 0 and chosen[p - 1] == " ":
        p -= 1
    p = max(0, min(p, len(chosen) - 1, len(rejected) - 1))
    out = dict(row)
    out.update(prompt=chosen[:p], chosen=chosen[p:], rejected=rejected[p:])
    return out


def _validate_prompt(row) -> str:
    """An RL prompt row: ``prompt`` (text or messages) or ``messages``; other fields are the reward functions'."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    if "prompt" in row:
        fmt = "conversational_prompt" if isinstance(row["prompt"], list) else "prompt"
        if fmt == "prompt":
            _check_text(row, "prompt")
        else:
            check_messages(row["prompt"], "prompt")
    elif "messages" in row:
        fmt = "conversational_prompt"
        check_messages(row["messages"], "messages")
    else:
        raise ValueError("needs 'prompt' (a string, or a list of {'role', 'content'} messages) or 'messages', "
                         f"got keys {sorted(row)}")
    difficulty = row.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (int, float))
                                   or not math.isfinite(difficulty)):
        raise ValueError(f"'difficulty' must be a finite number, got {difficulty!r}")
    return fmt


def _validate(row, task: str | None = None) -> str:
    if task == "prompt":  # a prompt row may carry any other fields (chosen, completion, ...) for its rewards
        return _validate_prompt(row)
    fmt = detect_format(row)
    if task is not None and FORMAT_TASK[fmt] != task:
        raise ValueError(f"a {FORMAT_TASK[fmt]} row ({fmt}) where {task} rows are expected")
    if fmt == "preference":
        _check_text(row, "prompt")
        if _check_text(row, "chosen") == _check_text(row, "rejected"):
            raise ValueError("'chosen' and 'rejected' are identical")
        _check_margin(row)
    elif fmt == "implicit_preference":
        _check_text(row, "chosen"), _check_text(row, "rejected")
        extract_prompt(row)
        _check_margin(row)
    elif fmt == "conversational_preference":
        for key in ("chosen", "rejected"):
            if key not in row:
                raise ValueError(f"missing key {key!r}")
        if "prompt" in row:
            check_messages(row["prompt"], "prompt")
            check_messages(row["chosen"], "chosen", last_assistant=True)
            check_messages(row["rejected"], "rejected", last_assistant=True)
            if row["chosen"] == row["rejected"]:
                raise ValueError("'chosen' and 'rejected' are identical")
        else:
            check_messages(row["chosen"], "chosen", last_assistant=True)
            check_messages(row["rejected"], "rejected", last_assistant=True)
            extract_prompt(row)
        _check_margin(row)
    elif fmt == "ranking":
        for key in ("prompt", "responses", "ranks"):
            if key not in row:
                raise ValueError(f"missing key {key!r}")
        conversational = isinstance(row["prompt"], list)
        if conversational:
            check_messages(row["prompt"], "prompt")
        else:
            _check_text(row, "prompt")
        responses, ranks = row["responses"], row["ranks"]
        if not isinstance(responses, list):
            raise ValueError(f"'responses' must be a list, got {type(responses).__name__}")
        if not isinstance(ranks, list):
            raise ValueError(f"'ranks' must be a list, got {type(ranks).__name__}")
        if len(responses) != len(ranks):
            raise ValueError(f"'responses' has {len(responses)} entries but 'ranks' has {len(ranks)}")
        if len(responses) < 2:
            raise ValueError(f"'responses' needs at least 2 entries, got {len(responses)}")
        for i, r in enumerate(responses):
            if conversational and isinstance(r, list):
                check_messages(r, f"responses[{i}]", last_assistant=True)
            elif not isinstance(r, str):
                raise ValueError(f"'responses'[{i}] must be a string, got {type(r).__name__}")
            elif not r.strip():
                raise ValueError(f"'responses'[{i}] is an empty string")
        for i, r in enumerate(ranks):
            if isinstance(r, bool) or not isinstance(r, int):
                raise ValueError(f"'ranks'[{i}] must be an int, got {type(r).__name__}")
            if r < 0:
                raise ValueError(f"'ranks'[{i}] must be >= 0 (0 = best), got {r}")
        if len(set(ranks)) < 2:
            raise ValueError("all 'ranks' are equal: the row carries no preference")
    elif fmt == "sft":
        _check_text(row, "prompt"), _check_text(row, "completion")
    elif fmt in ("prompt", "conversational_prompt"):
        _validate_prompt(row)
    else:  # conversational_sft
        if "messages" in row:
            check_messages(row["messages"], "messages", last_assistant=True)
        else:
            for key in ("prompt", "completion"):
                if key not in row:
                    raise ValueError(f"missing key {key!r}")
            check_messages(row["prompt"], "prompt")
            check_messages(row["completion"], "completion", last_assistant=True)
    return fmt


def validate_row(row, task: str | None = None) -> str:
    """Check one row; return its format. ``ValueError`` says what is wrong (no location).

    ``task`` (``"preference"``, ``"ranking"``, ``"sft"`` or ``"prompt"``) also requires the row to be of that task.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    return _validate(row, task)


# ============================================================================ loading


DEFAULT_SPLIT = "train"


def _is_datasets_object(obj) -> bool:
    """A ``datasets`` Dataset / DatasetDict (or their iterable forms), without importing ``datasets``."""
    return type(obj).__module__.split(".")[0] == "datasets"


def _is_split_dict(obj) -> bool:
    return _is_datasets_object(obj) and type(obj).__name__ in ("DatasetDict", "IterableDatasetDict")


def _open_dataset(path: Path):
    """A Parquet file, a folder of Parquet files, or a ``save_to_disk`` folder as a ``datasets`` object."""
    import datasets

    saved = path.is_dir() and any((path / name).is_file()
                                  for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    files = [str(path)]
    if path.is_dir() and not saved:
        files = sorted(str(f) for f in path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path} is a folder but neither a datasets save_to_disk folder nor a folder of "
                            ".parquet files")
    try:
        return datasets.load_from_disk(str(path)) if saved else datasets.Dataset.from_parquet(files)
    except Exception as err:  # noqa: BLE001 (pyarrow / datasets errors of a bad file: named, chained)
        raise DataError(f"{path}: cannot read it with datasets ({type(err).__name__}: {err})") from err


def _select_split(dataset, split: str, name: str):
    """The ``split`` of a DatasetDict (an error naming the splits there are); a Dataset as it is."""
    if not _is_split_dict(dataset):
        return dataset
    if split not in dataset:
        raise ConfigError(f"{name} has the splits {sorted(dataset)}, not {split!r} "
                          "(choose one with train_split= / eval_split=)")
    return dataset[split]


def dataset_splits(source) -> list[str] | None:
    """The split names of a DatasetDict source (an object or a ``save_to_disk`` folder), else None."""
    if _is_split_dict(source):
        return list(source)
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "dataset_dict.json").is_file():
        return list(json.loads((Path(source) / "dataset_dict.json").read_text())["splits"])
    return None


def _iter_source(source, split: str = DEFAULT_SPLIT) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row-or-exception)``; ``location`` is 'FILE, line N' (JSONL), 'FILE, row N' (read
    with ``datasets``; 'FOLDER [split], row N' for a DatasetDict) or 'row N' (in memory), 1-based."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(f"data file {path} does not exist")
        if path.is_dir() or path.suffix == ".parquet":
            dataset = _open_dataset(path)
            prefix = f"{path} [{split}], " if _is_split_dict(dataset) else f"{path}, "
            yield from _iter_dataset(_select_split(dataset, split, str(path)), prefix)
            return
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}, line {lineno}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, ValueError(f"not valid UTF-8 ({e})")
                    continue
                if not text.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                try:
                    yield where, json.loads(text)
                except json.JSONDecodeError as e:
                    yield where, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
        return
    if _is_datasets_object(source):
        prefix = f"split {split!r}, " if _is_split_dict(source) else ""
        yield from _iter_dataset(_select_split(source, split, "the DatasetDict"), prefix)
        return
    if isinstance(source, (dict, bytes)):
        raise TypeError("source must be a data file path or an iterable of row dicts, got a single "
                        f"{type(source).__name__}")
    try:
        iterator = iter(source)
    except TypeError:
        raise TypeError("source must be a data file path or an iterable of row dicts, "
                        f"got {type(source).__name__}") from None
    for i, row in enumerate(iterator, start=1):
        yield f"row {i}", row


def _iter_dataset(dataset, prefix: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset, start=1):
        # Arrow gives every row every column: null there means the field is absent (e.g. an optional margin).
        yield f"{prefix}row {i}", {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row


def source_name(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


def load_rows(source, task: str | None = None, *, split: str = DEFAULT_SPLIT, skip_malformed: bool = False,
              return_report: bool = False, max_errors_kept: int = 20):
    """Load and validate rows from a JSONL file, a Parquet file or folder, a ``save_to_disk`` folder, a
    ``datasets.Dataset`` / ``DatasetDict`` (its ``split``), or an iterable of dicts.

    ``task`` (``"preference"``, ``"ranking"``, ``"sft"``, ``"prompt"``) fixes what rows must be; with None the first
    valid row decides and every later row must be of the same task (formats within it may mix).
    A malformed row (invalid JSON, missing key, wrong type, empty string, ranks/responses length
    mismatch, ...) raises ``ValueError`` naming the file and 1-based line (``"data.jsonl, line 7:
    'chosen' is an empty string"``; ``"prefs.parquet, row 7"`` for files read with ``datasets``; ``"row 7"``
    for in-memory sources). A missing file or a split the source does not have is an error too. With
    ``skip_malformed=True`` such rows are skipped, counted and logged instead. Blank lines are ignored. No
    valid row at all is an error either way.

    Returns the list of rows (the dicts as given; null fields of ``datasets`` rows left out), or
    ``(rows, LoadReport)`` if ``return_report``.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    report = LoadReport(source=source_name(source))
    rows: list[dict] = []
    first_where = None
    for where, item in _iter_source(source, split):
        try:
            if isinstance(item, Exception):
                raise item
            fmt = _validate(item, task)
            if task is None:
                task = FORMAT_TASK[fmt]
                first_where = where
        except ValueError as e:
            msg = f"{where}: {e}"
            if first_where is not None and "rows are expected" in str(e):
                msg += f" (the task was set by {first_where})"
            if not skip_malformed:
                raise DataError(msg) from None
            report.skipped += 1
            if len(report.errors) < max_errors_kept:
                report.errors.append(msg)
            continue
        rows.append(item)
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
    report.n_rows = len(rows)
    if report.skipped:
        logger.warning("%s: skipped %d malformed row(s); first: %s", report.source, report.skipped,
                       report.errors[0] if report.errors else "")
    if not rows:
        raise DataError(f"{report.source}: no valid rows" + (f" ({report.skipped} malformed skipped; first: "
                                                               f"{report.errors[0]})" if report.skipped else ""))
    return (rows, report) if return_report else rows


# ============================================================================ batching


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = False, *,
                shuffle: bool = True) -> list[list[int]]:
    """The batches of epoch ``epoch`` as lists of indices into ``range(n)``, fixed by ``(seed, epoch)``.

    The permutation comes from Python's ``random`` seeded with a string of ``seed`` and ``epoch``
    (stable across Python versions and platforms), so a resumed run reproduces it exactly.
    ``drop_last`` drops a final short batch.
    """
    _check_batch_size(batch_size)
    order = list(range(n))
    if shuffle:
        random.Random(f"fastrm.epoch_order:{seed}:{epoch}").shuffle(order)
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(num_batches(n, batch_size, drop_last))]


def iterate_batches(examples: Sequence, batch_size: int, seed: int, epoch: int, drop_last: bool = False, *,
                    shuffle: bool = True, start_batch: int = 0) -> Iterator[list]:
    """Yield the batches of :func:`epoch_order` as lists of examples, from batch ``start_batch`` on
    (a resumed run skips the batches it already did and continues exactly)."""
    for indices in epoch_order(len(examples), batch_size, seed, epoch, drop_last, shuffle=shuffle)[start_batch:]:
        yield [examples[i] for i in indices]


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "LoadReport",
    "detect_format",
    "epoch_order",
    "extract_prompt",
    "iterate_batches",
    "load_rows",
    "load_train_eval",
    "num_batches",
    "validate_row",
]


def load_train_eval(train_data, eval_data, eval_fraction: float, seed: int, skip_malformed: bool = False, *,
                    task: str | None = None, train_split: str = DEFAULT_SPLIT, eval_split: str = "test"):
    """Rows of ``train_data`` and of ``eval_data`` (any :func:`load_rows` source). Without ``eval_data``: the
    ``eval_split`` of ``train_data`` when it is a DatasetDict that has one, else a seeded ``eval_fraction`` of
    ``train_data`` held out. Skipped malformed rows are logged."""
    train, report = load_rows(train_data, task, split=train_split, skip_malformed=skip_malformed, return_report=True)
    if report.skipped:
        logger.warning("skipped %d malformed rows of %s", report.skipped, report.source)
    if eval_data is not None:
        return train, load_rows(eval_data, task, split=eval_split, skip_malformed=skip_malformed)
    if eval_split in (dataset_splits(train_data) or ()):
        logger.info("evaluating on the %r split of %s", eval_split, report.source)
        return train, load_rows(train_data, task, split=eval_split, skip_malformed=skip_malformed)
    n_eval = int(len(train) * eval_fraction)
    if n_eval == 0:
        return train, []
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [train[i] for i in order[n_eval:]], [train[i] for i in order[:n_eval]]
