"""Data layer: load and validate rows, tokenize them, and collate batches (padded or padding-free).

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

Every tokenized sequence is ``head + prompt + response + tail``, the tokenizer's own
:class:`SequenceTemplate`: ``BOS + ... + EOS`` for a decoder (BOS only if its tokenizer adds one),
``[CLS] ... [SEP]`` for a BERT-style encoder; a head or EOS the chat template already emits is not
doubled. Over ``max_length`` a sequence keeps its response and loses prompt tokens from the left, then
(only if the response alone is too long) response tokens from the right; ``truncation="drop"`` drops
the example instead. Both are counted in the returned :class:`TokenizeReport`.
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

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

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


@dataclass
class TokenizeReport:
    """What a ``tokenize_*`` call did: ``n_rows`` in, ``n_examples`` out, how many were cut or dropped."""

    n_rows: int = 0
    n_examples: int = 0
    truncated: int = 0
    dropped: int = 0


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


def _check_messages(value, key: str, *, last_assistant: bool = False) -> list:
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


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
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
    p = _common_prefix_len(chosen, rejected)
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
            _check_messages(row["prompt"], "prompt")
    elif "messages" in row:
        fmt = "conversational_prompt"
        _check_messages(row["messages"], "messages")
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
            _check_messages(row["prompt"], "prompt")
            _check_messages(row["chosen"], "chosen", last_assistant=True)
            _check_messages(row["rejected"], "rejected", last_assistant=True)
            if row["chosen"] == row["rejected"]:
                raise ValueError("'chosen' and 'rejected' are identical")
        else:
            _check_messages(row["chosen"], "chosen", last_assistant=True)
            _check_messages(row["rejected"], "rejected", last_assistant=True)
            extract_prompt(row)
        _check_margin(row)
    elif fmt == "ranking":
        for key in ("prompt", "responses", "ranks"):
            if key not in row:
                raise ValueError(f"missing key {key!r}")
        conversational = isinstance(row["prompt"], list)
        if conversational:
            _check_messages(row["prompt"], "prompt")
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
                _check_messages(r, f"responses[{i}]", last_assistant=True)
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
            _check_messages(row["messages"], "messages", last_assistant=True)
        else:
            for key in ("prompt", "completion"):
                if key not in row:
                    raise ValueError(f"missing key {key!r}")
            _check_messages(row["prompt"], "prompt")
            _check_messages(row["completion"], "completion", last_assistant=True)
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


# ============================================================================ tokenization


EMBEDDED_TOKENIZER = "embedded"
AUTO_TOKENIZER = "auto"


def load_tokenizer(spec=EMBEDDED_TOKENIZER, model_name_or_path: str | None = None):
    """``"embedded"`` (or None): the built-in task's character tokenizer
    (:func:`fastrm.tasks.arithmetic.build_tokenizer`); ``"auto"``: the tokenizer saved with the checkpoint
    ``model_name_or_path`` (the embedded one for the ``tiny`` model); else a tokenizer folder. Loaded offline with
    ``AutoTokenizer.from_pretrained(path, local_files_only=True)``: nothing is downloaded.

    A tokenizer without a pad token gets one (logged): its unknown token when it has one distinct from EOS, else
    its EOS token (see :func:`sequence_template` for what that means for a reward model).
    """
    if spec == AUTO_TOKENIZER:
        from fastrm.models import TINY

        if model_name_or_path in (None, TINY):
            spec = EMBEDDED_TOKENIZER
        else:
            spec = model_name_or_path
            if Path(spec).is_dir() and not any((Path(spec) / f).is_file() for f in TOKENIZER_FILES):
                raise ConfigError(f"tokenizer=auto: the checkpoint {spec} has no tokenizer files "
                                  f"({', '.join(TOKENIZER_FILES)}); set tokenizer=<folder with the model's tokenizer>")
    if spec is None or spec == EMBEDDED_TOKENIZER:
        from fastrm.models import TINY
        from fastrm.tasks.arithmetic import build_tokenizer

        if model_name_or_path not in (None, TINY):
            logger.warning("tokenizer=embedded with the checkpoint %s: the embedded task's 47-token tokenizer was "
                           "not made for it (tokenizer=auto uses the checkpoint's own)", model_name_or_path)
        return build_tokenizer()
    from transformers import AutoTokenizer

    from fastrm.gguf_files import pretrained_args

    path, gguf = pretrained_args(str(spec))  # a .gguf file: the tokenizer it carries
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **gguf)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {str(spec)!r} is neither {EMBEDDED_TOKENIZER!r} nor a local tokenizer folder "
                          f"or cached checkpoint (fastrm never downloads; save the tokenizer with save_pretrained "
                         f"first): {str(err).splitlines()[0]}") from None
    ensure_pad_token(tokenizer, str(spec))
    return tokenizer


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


def ensure_pad_token(tokenizer, name: str = "the tokenizer"):
    """Give a tokenizer without a pad token one: its unknown token if it has one that is not EOS (Llama-2,
    Mistral), else EOS (GPT-2, GPT-NeoX, Llama-3 style, where EOS is the only special token)."""
    if tokenizer.pad_token_id is not None:
        return
    unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
    if unk is not None and unk != eos:
        tokenizer.pad_token = tokenizer.unk_token
    elif eos is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        raise ConfigError(f"{name} has no pad, unknown or EOS token to pad batches with; set tokenizer.pad_token")
    logger.info("%s has no pad token: padding with %r (id %d)", name, tokenizer.pad_token, tokenizer.pad_token_id)


@dataclass(frozen=True)
class SequenceTemplate:
    """How one text becomes a model input: ``head + text + tail``, as the model family writes it.

    ``head`` and ``tail`` are the special tokens the tokenizer's own template puts around a text: BOS for
    Llama / Mistral / Gemma, nothing for GPT-2 / Qwen2, ``[CLS]`` ... ``[SEP]`` for BERT, ``<s>`` ... ``</s>``
    for RoBERTa. A decoder template has no tail, so fastrm ends a sequence with EOS: the model sees where an
    answer ends and an SFT policy learns to stop (``tail_is_eos``)."""

    head: tuple[int, ...]
    tail: tuple[int, ...]
    eos: int | None
    tail_is_eos: bool

    def strip(self, prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
        """``prompt`` without a head a chat template already wrote, ``response`` without its tail or EOS, so
        neither is doubled when the template's own are added."""
        n = len(self.head)
        if n and prompt[:n] == list(self.head):
            prompt = prompt[n:]
        t = len(self.tail)
        if t and response[-t:] == list(self.tail):
            response = response[:-t]
        elif self.eos is not None and response and response[-1] == self.eos:
            response = response[:-1]
        return prompt, response


def _own_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens ``tokenizer`` adds before and after a text (``add_special_tokens=True``)."""
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise ValueError(f"cannot find the special-token template of {type(tokenizer).__name__}: {probe!r} encodes "
                     f"to {bare} alone and {full} with special tokens")


def sequence_template(tokenizer, *, reward: bool = False) -> SequenceTemplate:
    """The :class:`SequenceTemplate` of ``tokenizer``; ``reward=True`` for sequences a reward model scores.

    A decoder whose pad token is its EOS (GPT-2 style) scores without the EOS tail: a sequence-classification
    head reads the last token that is not pad, so it would skip that EOS anyway, and a token after the one read
    changes nothing under causal attention; without it, padded and packed batches read the same token.
    Policies (``reward=False``) need EOS to learn when to stop: a tokenizer without one is an error."""
    head, own_tail = _own_special_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None and not reward:
        raise ConfigError("the tokenizer has no eos_token: a policy could never learn to end its answer (an encoder's "
                          "tokenizer? encoders can be reward models); set tokenizer.eos_token before tokenizing")
    if own_tail:
        return SequenceTemplate(tuple(head), tuple(own_tail), eos, tail_is_eos=False)
    if eos is None:
        return SequenceTemplate(tuple(head), (), None, tail_is_eos=False)
    if reward and tokenizer.pad_token_id == eos:
        return SequenceTemplate(tuple(head), (), eos, tail_is_eos=False)
    return SequenceTemplate(tuple(head), (eos,), eos, tail_is_eos=True)


def _render(tokenizer, prompt_msgs: list, response_msgs: list) -> tuple[str, str]:
    """``(prompt_text, response_text)`` of a conversation through the tokenizer's chat template.

    The prompt is rendered with the generation prompt; the response is what the full conversation
    adds after it. For a template whose generation prompt is not a prefix of the full rendering, the
    split falls back to the longest common prefix.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational rows need a tokenizer with a chat_template")
    full = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not prompt_msgs:
        return "", full
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    p = _common_prefix_len(prompt, full)
    return full[:p], full[p:]


def render_chat_prompt(tokenizer, messages: list) -> str:
    """The text a policy continues for a conversational prompt: the chat template with the generation prompt.
    (A BOS the template writes is not doubled on encoding: :func:`fastrm.generation.encode_prompts`.)"""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational prompts need a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(_check_messages(messages, "prompt"), tokenize=False,
                                         add_generation_prompt=True)


def _as_assistant(response) -> list:
    return response if isinstance(response, list) else [{"role": "assistant", "content": response}]


def _texts(row: dict, fmt: str, tokenizer) -> tuple[str, list[str]]:
    """``(prompt_text, [response_text, ...])`` of a validated row."""
    if fmt == "implicit_preference" or (fmt == "conversational_preference" and "prompt" not in row):
        row = extract_prompt(row)
        fmt = "conversational_preference" if isinstance(row["chosen"], list) else "preference"
    if fmt == "preference":
        return row["prompt"], [row["chosen"], row["rejected"]]
    if fmt == "conversational_preference":
        prompt, chosen = _render(tokenizer, row["prompt"], row["chosen"])
        _, rejected = _render(tokenizer, row["prompt"], row["rejected"])
        return prompt, [chosen, rejected]
    if fmt == "ranking":
        if isinstance(row["prompt"], list):
            rendered = [_render(tokenizer, row["prompt"], _as_assistant(r)) for r in row["responses"]]
            return rendered[0][0], [r for _, r in rendered]
        return row["prompt"], list(row["responses"])
    if fmt == "sft":
        return row["prompt"], [row["completion"]]
    if "messages" in row:
        prompt, completion = _render(tokenizer, row["messages"][:-1], row["messages"][-1:])
    else:
        prompt, completion = _render(tokenizer, row["prompt"], row["completion"])
    return prompt, [completion]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@dataclass
class _Fitted:
    head: list[int]
    prompt: list[int]
    responses: list[list[int]]
    tails: list[list[int]]
    truncated: bool

    def sequences(self) -> list[list[int]]:
        return [self.head + self.prompt + r + t for r, t in zip(self.responses, self.tails)]

    @property
    def prompt_len(self) -> int:
        return len(self.head) + len(self.prompt)


def _fit(prompt: list[int], responses: list[list[int]], template: SequenceTemplate, max_length: int | None,
         mode: str, *, tail_on_cut: bool) -> _Fitted | None:
    """Lay out ``head + prompt + response + tail`` (see :class:`SequenceTemplate`) for responses sharing one
    prompt, within max_length.

    The prompt is cut from the left just enough for the longest response, so all responses still see
    the same prompt; a response longer than the whole budget is cut from the right. ``tail_on_cut``:
    whether a cut response still ends with the tail (yes for reward models, which read the EOS position,
    and for encoders, whose ``[SEP]`` is structural; no for SFT, which must not learn to stop mid-answer).
    Returns None if ``mode == "drop"`` and the example does not fit.
    """
    head, tail = list(template.head), list(template.tail)
    responses = [template.strip(prompt, r)[1] for r in responses]  # the tail is added below, once
    prompt = template.strip(prompt, [])[0]
    fitted = _Fitted(head, prompt, responses, [tail for _ in responses], truncated=False)
    if max_length is None:
        return fitted
    budget = max_length - len(head) - len(tail)
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= budget:
        return fitted
    if mode == "drop":
        return None
    keep = max(0, budget - longest)
    fitted.prompt = prompt[len(prompt) - keep:] if keep else []
    fitted.truncated = True
    if longest > budget:
        new_responses, new_tails = [], []
        for r in responses:
            if len(r) > budget:
                if tail_on_cut:
                    new_responses.append(r[:budget]), new_tails.append(tail)
                else:
                    new_responses.append(r[:budget + len(tail)]), new_tails.append([])
            else:
                new_responses.append(r), new_tails.append(tail)
        fitted.responses, fitted.tails = new_responses, new_tails
    return fitted


def _prepare(rows, tokenizer, max_length, truncation, task: str):
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    template = sequence_template(tokenizer, reward=task != "sft")
    if max_length is not None:
        need = len(template.head) + len(template.tail) + 1
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < need:
            raise ConfigError(f"max_length must be None or an int >= {need} (the tokenizer's {len(template.head)} "
                              f"leading and {len(template.tail)} trailing special tokens + 1), got {max_length!r}")
    if isinstance(rows, (str, os.PathLike)):
        rows = load_rows(rows, task)
    rows = list(rows)
    texts, layout = [], []
    for i, row in enumerate(rows, start=1):
        try:
            fmt = _validate(row, task)
            prompt, responses = _texts(row, fmt, tokenizer)
        except ValueError as e:
            raise DataError(f"row {i}: {e}") from None
        layout.append((len(texts), len(responses)))
        texts.append(prompt)
        texts.extend(responses)
    ids = _encode_all(tokenizer, texts)
    encoded = [(ids[start], ids[start + 1:start + 1 + k]) for start, k in layout]
    return rows, encoded, template


def _tokenize_responses(rows, tokenizer, max_length, truncation, task: str, make_example):
    """One prompt, several responses per row (preference pairs, K-way rankings): fit each row to
    ``max_length`` (responses keep their EOS when cut), count truncations and drops, and build each
    example with ``make_example(row, fitted)``."""
    rows, encoded, template = _prepare(rows, tokenizer, max_length, truncation, task)
    report = TokenizeReport(n_rows=len(rows))
    examples = []
    for row, (prompt, responses) in zip(rows, encoded):
        fitted = _fit(prompt, responses, template, max_length, truncation, tail_on_cut=True)
        if fitted is None:
            report.dropped += 1
            continue
        report.truncated += fitted.truncated
        examples.append(make_example(row, fitted))
    report.n_examples = len(examples)
    logger.debug("tokenize_%s: %s", task, report)
    return examples, report


def tokenize_preference(rows, tokenizer, max_length: int | None = None, truncation: str = "truncate"):
    """Tokenize preference rows (any preference format) into ``{"chosen_ids", "rejected_ids",
    "prompt_len", "margin"?}`` examples (lists of ints; ``prompt_len`` counts BOS + kept prompt tokens,
    shared by both sequences).

    ``rows``: validated rows or a JSONL path. Returns ``(examples, TokenizeReport)``.
    """
    def example(row, fitted):
        chosen, rejected = fitted.sequences()
        ex = {"chosen_ids": chosen, "rejected_ids": rejected, "prompt_len": fitted.prompt_len}
        if row.get("margin") is not None:
            ex["margin"] = float(row["margin"])
        return ex

    return _tokenize_responses(rows, tokenizer, max_length, truncation, "preference", example)


def tokenize_ranking(rows, tokenizer, max_length: int | None = None, truncation: str = "truncate"):
    """Tokenize K-way rows into ``{"response_ids": [K lists], "ranks": [K], "prompt_len"}`` examples.

    Returns ``(examples, TokenizeReport)``.
    """
    def example(row, fitted):
        return {"response_ids": fitted.sequences(), "ranks": list(row["ranks"]), "prompt_len": fitted.prompt_len}

    return _tokenize_responses(rows, tokenizer, max_length, truncation, "ranking", example)


def tokenize_sft(rows, tokenizer, max_length: int | None = None, truncation: str = "truncate"):
    """Tokenize SFT rows into ``{"input_ids", "labels", "prompt_len"}``; ``labels`` is -100 on BOS and
    prompt tokens (for ``messages`` rows: everything before the last assistant turn), the token ids
    elsewhere (the completion and its EOS; a completion cut by truncation gets no EOS).

    Returns ``(examples, TokenizeReport)``.
    """
    rows, encoded, template = _prepare(rows, tokenizer, max_length, truncation, "sft")
    report = TokenizeReport(n_rows=len(rows))
    examples = []
    for prompt, responses in encoded:
        fitted = _fit(prompt, responses, template, max_length, truncation, tail_on_cut=False)
        if fitted is None:
            report.dropped += 1
            continue
        report.truncated += fitted.truncated
        (input_ids,) = fitted.sequences()
        n = fitted.prompt_len
        examples.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * n + input_ids[n:], "prompt_len": n})
    report.n_examples = len(examples)
    logger.debug("tokenize_sft: %s", report)
    return examples, report


# ============================================================================ collators


def _check_examples(examples, name: str):
    if not examples:
        raise ValueError(f"{name}: got an empty batch")


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


def _pad(seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def _attention_mask(seqs: list[list[int]], length: int) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()


def _margins(examples) -> torch.Tensor | None:
    if not any(e.get("margin") is not None for e in examples):
        return None
    # A pair without a margin has margin 0 (the loss without a margin).
    return torch.tensor([float(e.get("margin") or 0.0) for e in examples], dtype=torch.float32)


def _pack(seqs: list[list[int]]) -> dict:
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError("cannot pack an empty sequence")
    flat = [t for s in seqs for t in s]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
    return {
        "input_ids": torch.tensor(flat, dtype=torch.long).unsqueeze(0),
        "position_ids": position_ids.unsqueeze(0),
        "seq_ends": cu[1:].to(torch.long) - 1,
        "cu_seq_lens": cu,
        "max_length": max(lengths),
    }


def collate_padded(seqs: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """``{"input_ids": [N, L], "attention_mask": [N, L]}`` of token sequences, right-padded with ``pad_id``."""
    if not seqs:
        raise ValueError("collate_padded: got no sequences")
    length = _round_up(max(len(s) for s in seqs), pad_to_multiple_of)
    return {"input_ids": _pad(seqs, pad_id, length), "attention_mask": _attention_mask(seqs, length)}


def collate_packed(seqs: list[list[int]]) -> dict:
    """Padding-free: token sequences in one row, as :func:`collate_preference_packed` lays them out (``input_ids``,
    ``position_ids`` restarting at 0, ``cu_seq_lens``, ``seq_ends``, ``max_length``)."""
    if not seqs:
        raise ValueError("collate_packed: got no sequences")
    return _pack(seqs)


def collate_preference_padded(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """``{"input_ids": [2B, L], "attention_mask": [2B, L], "margin"?: [B] float32}``, right-padded with
    ``pad_id``; rows ``0..B-1`` are the chosen sequences and rows ``B..2B-1`` the rejected ones."""
    _check_examples(examples, "collate_preference_padded")
    batch = collate_padded([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pad_id,
                           pad_to_multiple_of)
    margin = _margins(examples)
    if margin is not None:
        batch["margin"] = margin
    return batch


def collate_preference_packed(examples: Sequence[dict]) -> dict:
    """Padding-free: all 2B sequences (B chosen, then B rejected) concatenated into one row.

    ``{"input_ids": [1, S], "position_ids": [1, S] (0 at each sequence start), "seq_ends": [2B] long
    (index of each sequence's last token), "cu_seq_lens": [2B+1] int32, "max_length": int,
    "margin"?: [B]}``; S is the total token count.
    """
    _check_examples(examples, "collate_preference_packed")
    batch = _pack([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples])
    margin = _margins(examples)
    if margin is not None:
        batch["margin"] = margin
    return batch


def _ranking_sequences(examples: Sequence[dict], dummy_id: int | None, name: str):
    """The ``B*K`` sequences of a K-way batch (row ``b*K + k`` = response k of example b; a missing response is
    a 1-token dummy) and the ``[B, K]`` ranks (-1 where missing)."""
    _check_examples(examples, name)
    k = max(len(e["response_ids"]) for e in examples)
    seqs, ranks = [], torch.full((len(examples), k), -1, dtype=torch.long)
    for b, e in enumerate(examples):
        if len(e["response_ids"]) != len(e["ranks"]):
            raise ValueError(f"{name}: example {b} has {len(e['response_ids'])} responses but {len(e['ranks'])} ranks")
        dummy = [e["response_ids"][0][0] if dummy_id is None else dummy_id]
        seqs.extend(e["response_ids"])
        seqs.extend([dummy] * (k - len(e["response_ids"])))
        ranks[b, :len(e["ranks"])] = torch.as_tensor(e["ranks"], dtype=torch.long)
    return seqs, ranks


def collate_ranking_padded(examples: Sequence[dict], pad_id: int, dummy_id: int | None = None,
                           pad_to_multiple_of: int | None = None) -> dict:
    """``{"input_ids": [B*K, L], "attention_mask": [B*K, L], "ranks": [B, K] long}``; row ``b*K + k``
    is response k of example b. K is the largest response count in the batch; a missing response
    gets rank -1 and a 1-token dummy sequence (``dummy_id``, default: the example's first token,
    i.e. BOS) with attention on that token, so no row is fully masked."""
    seqs, ranks = _ranking_sequences(examples, dummy_id, "collate_ranking_padded")
    length = _round_up(max(len(s) for s in seqs), pad_to_multiple_of)
    return {"input_ids": _pad(seqs, pad_id, length), "attention_mask": _attention_mask(seqs, length), "ranks": ranks}


def collate_ranking_packed(examples: Sequence[dict], dummy_id: int | None = None) -> dict:
    """Padding-free K-way batch: the ``B*K`` sequences of :func:`collate_ranking_padded` (same order, same
    1-token dummies) in one row, as :func:`collate_preference_packed` lays them out, and ``"ranks": [B, K]``."""
    seqs, ranks = _ranking_sequences(examples, dummy_id, "collate_ranking_packed")
    return {**_pack(seqs), "ranks": ranks}


def collate_sft_padded(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """``{"input_ids": [B, L], "labels": [B, L] (-100 on prompt and padding), "attention_mask": [B, L]}``."""
    _check_examples(examples, "collate_sft_padded")
    seqs = [e["input_ids"] for e in examples]
    length = _round_up(max(len(s) for s in seqs), pad_to_multiple_of)
    return {"input_ids": _pad(seqs, pad_id, length),
            "labels": _pad([e["labels"] for e in examples], IGNORE_INDEX, length),
            "attention_mask": _attention_mask(seqs, length)}


def collate_sft_packed(examples: Sequence[dict]) -> dict:
    """Padding-free SFT: ``{"input_ids": [1, S], "labels": [1, S], "position_ids": [1, S],
    "cu_seq_lens": [B+1] int32, "max_length": int, "seq_ends": [B]}``. The first label of every
    sequence is -100 too, so nothing is learned across a sequence boundary."""
    _check_examples(examples, "collate_sft_packed")
    batch = _pack([e["input_ids"] for e in examples])
    labels = []
    for e in examples:
        labels.append(IGNORE_INDEX)
        labels.extend(e["labels"][1:])
    batch["labels"] = torch.tensor(labels, dtype=torch.long).unsqueeze(0)
    return batch


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
    "SequenceTemplate",
    "TokenizeReport",
    "collate_padded",
    "collate_packed",
    "collate_preference_packed",
    "collate_preference_padded",
    "collate_ranking_packed",
    "collate_ranking_padded",
    "collate_sft_packed",
    "collate_sft_padded",
    "detect_format",
    "epoch_order",
    "extract_prompt",
    "iterate_batches",
    "load_rows",
    "load_tokenizer",
    "load_train_eval",
    "num_batches",
    "prepare_prompts",
    "sequence_template",
    "tokenize_preference",
    "tokenize_ranking",
    "tokenize_sft",
    "validate_row",
]


def count_tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a collated batch: every token of a packed row, the mask's ones otherwise."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


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


def prepare_prompts(rows: Sequence[dict], tokenizer, source: str = "prompts") -> list[dict]:
    """RL prompt rows (validated, task ``"prompt"``) as ``{"prompt": the text the policy continues (a
    conversational prompt rendered with the chat template and its generation prompt), "conversation": the
    messages or None, "difficulty"?: float, "columns": every other field}``. ``columns`` go to the reward
    functions as keyword arguments (:mod:`fastrm.rewards`)."""
    out = []
    for i, row in enumerate(rows, start=1):
        key = "prompt" if "prompt" in row else "messages"
        prompt = row[key]
        conversation = prompt if isinstance(prompt, list) else None
        if conversation is not None:
            try:
                prompt = render_chat_prompt(tokenizer, conversation)
            except Exception as err:  # noqa: BLE001 (a template's own raise_exception is a jinja error)
                raise ValueError(f"{source}, row {i}: {err}") from None
        prepared = {"prompt": prompt, "conversation": conversation,
                    "columns": {k: v for k, v in row.items() if k != "prompt"}}
        if row.get("difficulty") is not None:
            prepared["difficulty"] = float(row["difficulty"])
        out.append(prepared)
    return out
