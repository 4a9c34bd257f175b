"""The embedded default task: integer arithmetic with a checkable answer.

``"37+5="`` -> ``"42"`` (then EOS). Because the answer is checkable, a policy can be scored by the
truth (:func:`score`), not only by a learned reward model, and a tiny model trained from scratch on
CPU learns it in minutes. Everything here is generated at run time from a seed; nothing downloads.

Difficulty levels (operands in the prompt are never negative; answers may be from level 3 on):

=====  ==========================================================
level  problems
=====  ==========================================================
0      ``a+b``, one digit each
1      ``a+b``, up to two digits each
2      ``a+b`` / ``a-b``, up to two digits, ``a >= b`` for ``-``
3      as 2 but ``a-b`` may be negative, plus one-digit ``a*b``
4      up to three-digit ``+`` / ``-``, two-digit times one-digit
=====  ==========================================================

Data generators (all deterministic given ``seed``):

* :meth:`ArithmeticTask.make_sft_data` -> ``{"prompt", "completion"}`` rows.
* :meth:`ArithmeticTask.make_preference_data` -> ``{"prompt", "chosen", "rejected"}`` rows from a
  simulated noisy annotator (see there), optional ``"margin"``.
* :meth:`ArithmeticTask.make_ranking_data` -> ``{"prompt", "responses", "ranks"}`` K-way rows.

The module-level functions of the same names build a default :class:`ArithmeticTask` for you.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

MAX_LEVEL = 4
DEFAULT_MAX_LEVEL = 2

# Text after which a completion is over, whatever the tokenizer (ours is "<eos>").
STOP_STRINGS = ("<eos>", "<pad>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")

LEVEL_DESCRIPTIONS = {
    0: "one-digit a+b",
    1: "up to two-digit a+b",
    2: "up to two-digit a+b and a-b (a >= b)",
    3: "up to two-digit a+b and a-b (may be negative), one-digit a*b",
    4: "up to three-digit a+b and a-b, two-digit times one-digit a*b",
}

_PROMPT_RE = re.compile(r"(\d+)\s*([+\-*])\s*(\d+)\s*=")
_INT_RE = re.compile(r"-?\d{1,18}")
# Flip weight exp(-gap / _FLIP_TAU): closer pairs (small true-score gap) flip more often.
_FLIP_TAU = 0.2


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    difficulty: int


# ----------------------------------------------------------------------------- ground truth


def parse_prompt(prompt: str) -> tuple[int, str, int]:
    """``(a, op, b)`` of the last ``a op b =`` in ``prompt`` (so chat-rendered prompts work too)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    matches = _PROMPT_RE.findall(prompt)
    if not matches:
        raise ValueError(f"no arithmetic problem ('a+b=', 'a-b=' or 'a*b=') found in prompt {prompt!r}")
    a, op, b = matches[-1]
    return int(a), op, int(b)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def expected_answer(prompt: str) -> int:
    """The true integer answer of ``prompt``."""
    return _apply(*parse_prompt(prompt))


def parse_completion(completion: str) -> int | None:
    """The integer a completion answers, or None for garbage.

    The completion is cut at the first EOS-like string (``<eos>``, ``</s>``, ...), stripped, and its
    first whitespace-separated word must be an integer (``-?\\d+``, at most 18 digits).
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    text = completion
    for stop in STOP_STRINGS:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    words = text.split()
    if not words or not _INT_RE.fullmatch(words[0]):
        return None
    return int(words[0])


def _shaped(err: int, answer: int) -> float:
    if err == 0:
        return 1.0
    scale = 1.0 + 0.05 * abs(answer)
    return 0.5 * math.exp(-err / scale)


def score(prompt: str, completion: str) -> float:
    """Ground-truth reward: 1.0 exactly correct, ``0.5*exp(-|err|/(1+0.05|answer|))`` (< 0.5) when the
    completion parses to a wrong integer, 0.0 for garbage. See :func:`parse_completion`."""
    answer = expected_answer(prompt)
    value = parse_completion(completion)
    if value is None:
        return 0.0
    return _shaped(abs(value - answer), answer)


def is_correct(prompt: str, completion: str) -> bool:
    return parse_completion(completion) == expected_answer(prompt)


def reward_fn(prompts: Sequence[str], completions: Sequence[str], **kwargs) -> list[float]:
    """Rule-based reward over a batch: ``[score(p, c) for p, c in zip(prompts, completions)]``.

    Extra keyword arguments (as TRL passes them) are ignored.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"reward_fn: got {len(prompts)} prompts but {len(completions)} completions")
    return [score(p, c) for p, c in zip(prompts, completions)]


# ----------------------------------------------------------------------------- task


def _rng(seed) -> random.Random:
    if isinstance(seed, random.Random):
        return seed
    if seed is None or isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise TypeError(f"seed must be an int, a str or a random.Random, got {type(seed).__name__}")
    return random.Random(seed)


def _derive_seed(seed: int, tag: str) -> int:
    digest = hashlib.sha256(f"fastrm:{seed}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ArithmeticTask:
    """Integer-arithmetic problems at difficulty levels ``0..max_level`` (see the module docstring).

    ``seed`` seeds the task's own stream, used when a method is called without ``seed``; passing a
    seed (int, str or ``random.Random``) makes that call independent of the task's stream.
    """

    def __init__(self, max_level: int = DEFAULT_MAX_LEVEL, seed: int = 0):
        if isinstance(max_level, bool) or not isinstance(max_level, int) or not 0 <= max_level <= MAX_LEVEL:
            raise ValueError(f"max_level must be an int in [0, {MAX_LEVEL}], got {max_level!r}")
        self.max_level = max_level
        self.seed = seed
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"ArithmeticTask(max_level={self.max_level}, seed={self.seed!r})"

    @property
    def levels(self) -> list[int]:
        return list(range(self.max_level + 1))

    # --- ground truth (the rule-based reward) -------------------------------------------------
    score = staticmethod(score)
    is_correct = staticmethod(is_correct)
    reward_fn = staticmethod(reward_fn)
    expected_answer = staticmethod(expected_answer)

    # --- problems -----------------------------------------------------------------------------
    def _stream(self, seed) -> random.Random:
        return self._rng if seed is None else _rng(seed)

    def _check_level(self, level):
        if level is None:
            return None
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= self.max_level:
            raise ValueError(f"level must be None or an int in [0, {self.max_level}] (max_level), got {level!r}")
        return level

    def _operands(self, rng: random.Random, level: int) -> tuple[int, str, int]:
        if level == 0:
            return rng.randint(0, 9), "+", rng.randint(0, 9)
        if level == 1:
            return rng.randint(0, 99), "+", rng.randint(0, 99)
        if level == 2:
            a, op, b = rng.randint(0, 99), rng.choice("+-"), rng.randint(0, 99)
            if op == "-" and a < b:
                a, b = b, a
            return a, op, b
        if level == 3:
            op = rng.choice("+-*")
            if op == "*":
                return rng.randint(0, 9), op, rng.randint(0, 9)
            return rng.randint(0, 99), op, rng.randint(0, 99)
        op = rng.choice("+-*")
        if op == "*":
            return rng.randint(0, 99), op, rng.randint(0, 9)
        return rng.randint(0, 999), op, rng.randint(0, 999)

    def _problem(self, rng: random.Random, level: int | None) -> Problem:
        lvl = rng.randint(0, self.max_level) if level is None else level
        a, op, b = self._operands(rng, lvl)
        return Problem(prompt=f"{a}{op}{b}=", answer=str(_apply(a, op, b)), difficulty=lvl)

    def sample(self, n: int, seed=None, level: int | None = None) -> list[Problem]:
        """``n`` problems at ``level`` (None: each uniformly from ``0..max_level``)."""
        _check_n(n)
        rng, level = self._stream(seed), self._check_level(level)
        return [self._problem(rng, level) for _ in range(n)]

    # --- wrong answers ------------------------------------------------------------------------
    def _wrong_answer(self, rng: random.Random, problem: Problem) -> str:
        """One plausible wrong answer (may coincide with the right one; callers filter)."""
        a, op, b = parse_prompt(problem.prompt)
        ans = int(problem.answer)
        kind = rng.random()
        if kind < 0.25:  # off by one
            return str(ans + rng.choice((-1, 1)))
        if kind < 0.40:  # off by ten (a carry / borrow slip)
            return str(ans + rng.choice((-10, 10)))
        if kind < 0.55:  # two digits swapped
            digits = list(str(abs(ans)))
            if len(digits) >= 2:
                i = rng.randrange(len(digits) - 1)
                digits[i], digits[i + 1] = digits[i + 1], digits[i]
                return ("-" if ans < 0 else "") + str(int("".join(digits)))
            return str(ans + rng.choice((-2, 2)))
        if kind < 0.65:  # a digit dropped or doubled
            s = str(abs(ans))
            i = rng.randrange(len(s))
            s = s[:i] + s[i + 1:] if len(s) >= 2 and rng.random() < 0.5 else s[:i] + s[i] + s[i:]
            return ("-" if ans < 0 else "") + str(int(s))
        if kind < 0.75:  # wrong operator
            other = {"+": "-", "-": "+", "*": "+"}[op]
            return str(_apply(a, other, b))
        if kind < 0.80:  # sign slip
            return str(-ans) if ans != 0 else "1"
        if kind < 0.95:  # random answer of the same kind of problem
            return self._problem(rng, problem.difficulty).answer
        return rng.choice((problem.prompt[:-1], str(a), "=", "+", f"{ans}{op}"))  # garbage or echo

    def wrong_answers(self, problem: Problem, k: int, seed=None) -> list[str]:
        """``k`` distinct wrong answers to ``problem`` (none parses to the right integer)."""
        rng = self._stream(seed)
        out: list[str] = []
        seen = {problem.answer}
        tries = 0
        while len(out) < k:
            cand = self._wrong_answer(rng, problem) if tries < 50 * k else str(int(problem.answer) + 11 + tries)
            tries += 1
            if cand in seen or parse_completion(cand) == int(problem.answer):
                continue
            seen.add(cand)
            out.append(cand)
        return out

    # --- datasets -----------------------------------------------------------------------------
    def make_sft_data(self, n: int, seed=None, level: int | None = None, *, conversational: bool = False) -> list[dict]:
        """``n`` rows ``{"prompt": "37+5=", "completion": "42"}`` (``{"messages": [...]}`` if conversational)."""
        problems = self.sample(n, seed, level)
        if conversational:
            return [{"messages": [_user(p.prompt), _assistant(p.answer)]} for p in problems]
        return [{"prompt": p.prompt, "completion": p.answer} for p in problems]

    def make_preference_data(self, n: int, seed=None, noise: float = 0.1, level: int | None = None, *,
                             with_margin: bool = False, conversational: bool = False,
                             p_correct: float = 0.75) -> list[dict]:
        """``n`` rows ``{"prompt", "chosen", "rejected"}`` labelled by a simulated noisy annotator.

        Each pair is the correct answer against a plausible wrong one (probability ``p_correct``) or
        two wrong answers whose true scores differ by more than 1e-3. The annotator prefers the
        higher true :func:`score` but flips the label; ``noise`` is the expected fraction of flipped pairs, spread
        Bradley-Terry-like over the pairs: pair ``i`` flips with probability ``min(0.5, c * exp(-gap_i
        / 0.2))`` (gap = true-score difference) with ``c`` chosen so the mean over the ``n`` pairs is
        ``noise``. So close pairs flip far more often than correct-vs-garbage ones. ``noise=0`` gives a
        perfect annotator. ``with_margin`` adds ``"margin"``: the absolute true-score gap (the
        annotator's preference strength, >= 0, also for flipped pairs).
        """
        _check_n(n)
        noise = float(noise)
        if not 0.0 <= noise <= 0.5:
            raise ValueError(f"noise must lie in [0, 0.5] (0.5 = coin-flip labels), got {noise}")
        rng, level = self._stream(seed), self._check_level(level)
        pairs = []  # (prompt, better, worse, gap)
        for _ in range(n):
            problem = self._problem(rng, level)
            while True:
                if rng.random() < p_correct:
                    better, worse = problem.answer, self.wrong_answers(problem, 1, rng)[0]
                else:
                    better, worse = self.wrong_answers(problem, 2, rng)
                s_b, s_w = score(problem.prompt, better), score(problem.prompt, worse)
                if abs(s_b - s_w) > 1e-3:  # a preference, not a near-tie of two hopeless answers
                    break
            if s_b < s_w:
                better, worse, s_b, s_w = worse, better, s_w, s_b
            pairs.append((problem.prompt, better, worse, s_b - s_w))
        probs = _flip_probabilities([gap for *_, gap in pairs], noise)
        rows = []
        for (prompt, better, worse, gap), p in zip(pairs, probs):
            chosen, rejected = (worse, better) if rng.random() < p else (better, worse)
            if conversational:
                row = {"prompt": [_user(prompt)], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)]}
            else:
                row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if with_margin:
                row["margin"] = round(gap, 6)
            rows.append(row)
        return rows

    def make_ranking_data(self, n: int, k: int, seed=None, noise: float = 0.0, level: int | None = None, *,
                          p_correct: float = 0.8) -> list[dict]:
        """``n`` K-way rows ``{"prompt", "responses": [k strings], "ranks": [k ints]}``.

        Ranks are dense by descending true score (rounded to 3 decimals): 0 = best, equal scores share
        a rank, and every row
        has at least two distinct ranks. The correct answer is among the responses with probability
        ``p_correct``. ``noise``: with that probability the annotator swaps the ranks of two responses
        of different score.
        """
        _check_n(n)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an int >= 2, got {k!r}")
        if not 0.0 <= float(noise) <= 1.0:
            raise ValueError(f"noise must lie in [0, 1], got {noise}")
        rng, level = self._stream(seed), self._check_level(level)
        rows = []
        for _ in range(n):
            problem = self._problem(rng, level)
            while True:
                if rng.random() < p_correct:
                    responses = [problem.answer] + self.wrong_answers(problem, k - 1, rng)
                else:
                    responses = self.wrong_answers(problem, k, rng)
                rng.shuffle(responses)
                scores = [round(score(problem.prompt, r), 3) for r in responses]  # near-equal = tied
                if len(set(scores)) >= 2:
                    break
            levels = sorted(set(scores), reverse=True)
            ranks = [levels.index(s) for s in scores]
            if noise and rng.random() < noise:
                i, j = rng.sample(range(k), 2)
                while ranks[i] == ranks[j]:
                    i, j = rng.sample(range(k), 2)
                ranks[i], ranks[j] = ranks[j], ranks[i]
            rows.append({"prompt": problem.prompt, "responses": responses, "ranks": ranks})
        return rows


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _flip_probabilities(gaps: list[float], noise: float) -> list[float]:
    """Per-pair flip probabilities ``min(0.5, c * exp(-gap / tau))`` whose mean is ``noise``."""
    if not gaps or noise <= 0.0:
        return [0.0] * len(gaps)
    weights = [math.exp(-g / _FLIP_TAU) for g in gaps]
    lo, hi = 0.0, 0.5 / min(weights)  # at hi every probability is clipped to 0.5, mean 0.5 >= noise
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(min(0.5, mid * w) for w in weights) / len(weights) < noise:
            lo = mid
        else:
            hi = mid
    return [min(0.5, hi * w) for w in weights]


# ----------------------------------------------------------------------------- module-level helpers


def _task(task, max_level) -> ArithmeticTask:
    return ArithmeticTask(max_level) if task is None else task


def make_sft_data(n: int, seed=0, level: int | None = None, *, max_level: int = DEFAULT_MAX_LEVEL,
                  conversational: bool = False, task: ArithmeticTask | None = None) -> list[dict]:
    """:meth:`ArithmeticTask.make_sft_data` of ``task`` (default: ``ArithmeticTask(max_level)``)."""
    return _task(task, max_level).make_sft_data(n, seed, level, conversational=conversational)


def make_preference_data(n: int, seed=0, noise: float = 0.1, level: int | None = None, *,
                         with_margin: bool = False, conversational: bool = False,
                         max_level: int = DEFAULT_MAX_LEVEL, task: ArithmeticTask | None = None) -> list[dict]:
    """:meth:`ArithmeticTask.make_preference_data` of ``task`` (default: ``ArithmeticTask(max_level)``)."""
    return _task(task, max_level).make_preference_data(n, seed, noise, level, with_margin=with_margin,
                                                       conversational=conversational)


def make_ranking_data(n: int, k: int, seed=0, noise: float = 0.0, level: int | None = None, *,
                      max_level: int = DEFAULT_MAX_LEVEL, task: ArithmeticTask | None = None) -> list[dict]:
    """:meth:`ArithmeticTask.make_ranking_data` of ``task`` (default: ``ArithmeticTask(max_level)``)."""
    return _task(task, max_level).make_ranking_data(n, k, seed, noise, level)


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    """Write ``rows`` one JSON object per line (UTF-8), creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


class DefaultData(NamedTuple):
    sft: Path
    pref_train: Path
    pref_eval: Path


def prepare_default_data(out_dir, n_sft: int = 2000, n_pref: int = 2000, n_eval: int = 500, seed: int = 0, *,
                         noise: float = 0.1, eval_noise: float = 0.0, with_margin: bool = False,
                         max_level: int = DEFAULT_MAX_LEVEL) -> DefaultData:
    """Write ``sft.jsonl``, ``pref_train.jsonl`` (annotator noise ``noise``) and ``pref_eval.jsonl``
    (``eval_noise``, default 0: labels are the truth) under ``out_dir``; each file has its own
    stream derived from ``seed``. Returns their paths."""
    task = ArithmeticTask(max_level, seed)
    out = Path(out_dir)
    return DefaultData(
        sft=write_jsonl(out / "sft.jsonl", task.make_sft_data(n_sft, _derive_seed(seed, "sft"))),
        pref_train=write_jsonl(out / "pref_train.jsonl", task.make_preference_data(
            n_pref, _derive_seed(seed, "pref_train"), noise, with_margin=with_margin)),
        pref_eval=write_jsonl(out / "pref_eval.jsonl", task.make_preference_data(
            n_eval, _derive_seed(seed, "pref_eval"), eval_noise, with_margin=with_margin)),
    )


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3
CHARACTERS = "0123456789+-*= \n:" + "abcdefghijklmnopqrstuvwxyz"

# Messages are "role: content", one per line; the generation prompt is "\nassistant: ". The
# template emits no special tokens (the data layer adds BOS/EOS), and the rendering of a prompt with
# add_generation_prompt=True is an exact prefix of the rendering of prompt + assistant reply.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nassistant: ' }}{%- endif -%}"
)


def build_tokenizer(model_max_length: int = 2048):
    """A character-level ``PreTrainedTokenizerFast`` (vocab of 47): ``<pad>``=0, ``<bos>``=1,
    ``<eos>``=2, ``<unk>``=3, then digits, ``+-*=``, space, newline, ``:`` and ``a``-``z``.

    ``tok(text)`` prepends ``<bos>`` (``add_special_tokens=False`` does not); EOS is never added
    automatically. Right padding, and a chat template (see ``CHAT_TEMPLATE``). Built offline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="right", clean_up_tokenization_spaces=False, model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
