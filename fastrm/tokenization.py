"""Tokenization: the tokenizer (embedded, a checkpoint's own, or a folder), the sequence template every example is
built on, and rows -> token-id examples for each task, with truncation at ``max_length`` counted.

Every tokenized sequence is ``head + prompt + response + tail``, the tokenizer's own :class:`SequenceTemplate`:
``BOS + ... + EOS`` for a decoder (BOS only if its tokenizer adds one), ``[CLS] ... [SEP]`` for a BERT-style encoder;
a head or EOS the chat template already emits is not doubled. Over ``max_length`` a sequence keeps its response and
loses prompt tokens from the left, then (only if the response alone is too long) response tokens from the right;
``truncation="drop"`` drops the example instead. Both are counted in the returned :class:`TokenizeReport`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fastrm import gguf_files
from fastrm.config import TINY
from fastrm.data import TRUNCATION_MODES, check_messages, common_prefix_len, extract_prompt, load_rows, validate_row
from fastrm.errors import ConfigError, DataError
from fastrm.layout import IGNORE_INDEX
from fastrm.tasks.arithmetic import build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class TokenizeReport:
    """What a ``tokenize_*`` call did: ``n_rows`` in, ``n_examples`` out, how many were cut or dropped."""

    n_rows: int = 0
    n_examples: int = 0
    truncated: int = 0
    dropped: int = 0


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
        if model_name_or_path in (None, TINY):
            spec = EMBEDDED_TOKENIZER
        else:
            spec = model_name_or_path
            if Path(spec).is_dir() and not any((Path(spec) / f).is_file() for f in TOKENIZER_FILES):
                raise ConfigError(f"tokenizer=auto: the checkpoint {spec} has no tokenizer files "
                                  f"({', '.join(TOKENIZER_FILES)}); set tokenizer=<folder with the model's tokenizer>")
    if spec is None or spec == EMBEDDED_TOKENIZER:
        if model_name_or_path not in (None, TINY):
            logger.warning("tokenizer=embedded with the checkpoint %s: the embedded task's 47-token tokenizer was "
                           "not made for it (tokenizer=auto uses the checkpoint's own)", model_name_or_path)
        return build_tokenizer()
    from transformers import AutoTokenizer

    path, gguf = gguf_files.pretrained_args(str(spec))  # a .gguf file: the tokenizer it carries
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
    p = common_prefix_len(prompt, full)
    return full[:p], full[p:]


def render_chat_prompt(tokenizer, messages: list) -> str:
    """The text a policy continues for a conversational prompt: the chat template with the generation prompt.
    (A BOS the template writes is not doubled on encoding: :func:`fastrm.generation.encode_prompts`.)"""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational prompts need a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(check_messages(messages, "prompt"), tokenize=False,
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


def _prepare(rows, tokenizer, max_length, truncation, task: str, *, policy: bool = False):
    """Validated rows, each as (prompt ids, [response ids]), and the template: a policy's (EOS-ended) for SFT or
    ``policy``, else a reward model's."""
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    template = sequence_template(tokenizer, reward=not (policy or task == "sft"))
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
            fmt = validate_row(row, task)
            prompt, responses = _texts(row, fmt, tokenizer)
        except ValueError as e:
            raise DataError(f"row {i}: {e}") from None
        layout.append((len(texts), len(responses)))
        texts.append(prompt)
        texts.extend(responses)
    ids = _encode_all(tokenizer, texts)
    encoded = [(ids[start], ids[start + 1:start + 1 + k]) for start, k in layout]
    return rows, encoded, template


def _tokenize_responses(rows, tokenizer, max_length, truncation, task: str, make_example, *, policy: bool = False):
    """One prompt, several responses per row (preference pairs, K-way rankings): fit each row to
    ``max_length``, count truncations and drops, and build each example with ``make_example(row, fitted)``.
    Scored sequences keep their tail when cut; a policy's (``policy``: the SFT template) lose it, as in SFT."""
    rows, encoded, template = _prepare(rows, tokenizer, max_length, truncation, task, policy=policy)
    report = TokenizeReport(n_rows=len(rows))
    examples = []
    for row, (prompt, responses) in zip(rows, encoded):
        fitted = _fit(prompt, responses, template, max_length, truncation, tail_on_cut=not policy)
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


def tokenize_policy_preference(rows, tokenizer, max_length: int | None = None, truncation: str = "truncate"):
    """Tokenize preference rows (any preference format) as a policy's sequences, for a loss on its log-probs
    (DPO): ``{"chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels", "prompt_len"}``. The SFT template
    (EOS after each completion, none after one cut at max_length: a policy must not learn to stop mid-answer);
    labels -100 on the head and prompt tokens, the token ids elsewhere.

    Returns ``(examples, TokenizeReport)``.
    """
    def example(row, fitted):
        chosen, rejected = fitted.sequences()
        n = fitted.prompt_len
        return {"chosen_ids": chosen, "rejected_ids": rejected, "prompt_len": n,
                "chosen_labels": [IGNORE_INDEX] * n + chosen[n:], "rejected_labels": [IGNORE_INDEX] * n + rejected[n:]}

    return _tokenize_responses(rows, tokenizer, max_length, truncation, "preference", example, policy=True)


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
