"""Rule rewards for RL: Python functions that score completions, called the way TRL's GRPOTrainer calls them.

A reward function gets one call per batch of N completions (``num_samples`` per prompt, prompts repeated)::

    def accuracy(prompts, completions, answer, **kwargs) -> list[float | None]:
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]

- ``prompts``: the prompt of each completion: its text, or for a conversational prompt row its messages;
- ``completions``: the decoded completion text, or ``[{"role": "assistant", "content": text}]`` when the prompt
  is conversational (TRL's shapes, so TRL reward functions run unchanged);
- ``completion_ids``: the completion's token ids (a list of ints, EOS included when sampled);
- every other field of the prompt row, by its column name (``answer=[...]``; a row without it gives None).

A function with ``**kwargs`` gets all of these; one without gets the ones it names (a required parameter that
is none of them is an error at setup). A function whose parameters name none of them (``f(p, c)``, fastrm's
older convention) is called ``f(prompts, completions)``.
It returns N numbers (bools count as 0/1); None marks a completion the function does not score (a multi-task
mix): the weighted sum is then over the functions that did. A wrong length, NaN/inf or anything else is an
error naming the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrm.config import require_setting
from fastrm.errors import ConfigError
from fastrm.tasks import arithmetic

EMBEDDED = "embedded"
RESERVED = ("prompts", "completions", "completion_ids")  # the arguments every call offers besides the columns


@dataclass
class RewardFunction:
    """A reward function, its name (logged as ``reward/<name>``), its weight and how it is called
    (:func:`bind`)."""

    fn: Callable
    name: str
    weight: float = 1.0
    keywords: tuple[str, ...] | None = None  # None: positional (prompts, completions); else the names it takes

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list]) -> list[float | None]:
        if self.keywords is None:
            out = self.fn(prompts, completions)
        else:
            offered = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
            out = self.fn(**{k: offered[k] for k in self.keywords})
        return check_scores(self.name, out, len(completions))


def _name(fn: Callable) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "fn" if name == "<lambda>" else name


def _import(module: str):
    """``module`` imported by name, or from a ``.py`` file path; the working directory is searched too (``python -m``
    puts it on ``sys.path``, the ``fastrm`` console script does not)."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ImportError(f"no file {path}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0] or os.getcwd() in sys.path:
            raise
    sys.path.insert(0, os.getcwd())
    return importlib.import_module(module)


def load(spec: str) -> Callable:
    """``"embedded"``: the arithmetic task's checker; else ``"package.module:function"`` or
    ``"path/to/file.py:function"``, imported."""
    if spec == EMBEDDED:
        return arithmetic.reward_fn
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ConfigError(f"setting reward_fn={spec!r}: expected 'embedded', 'package.module:function' or "
                          "'path/to/file.py:function'")
    try:
        fn = getattr(_import(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"setting reward_fn={spec!r}: cannot import it ({err})") from None
    if not callable(fn):
        raise ConfigError(f"setting reward_fn={spec!r}: {module}:{name} is a {type(fn).__name__}, not a function")
    return fn


def reward_functions(fns: Sequence[Callable], weights: Sequence[float] | None = None) -> list[RewardFunction]:
    """Name (``__name__``; repeats get ``_2``, ``_3``; ``model`` and ``rule`` are taken) and weight functions
    (all 1.0 by default)."""
    if weights is not None:
        require_setting(len(weights) == len(fns), "reward_weights", list(weights),
                f"needs one weight per reward function ({len(fns)})")
    weights = [1.0] * len(fns) if weights is None else list(weights)
    taken, out = {"model", "rule"}, []
    for fn, weight in zip(fns, weights):
        if not callable(fn):
            raise TypeError(f"a reward function must be callable, got {type(fn).__name__}")
        name, k = _name(fn), 2
        while name in taken:
            name, k = f"{_name(fn)}_{k}", k + 1
        taken.add(name)
        out.append(RewardFunction(fn, name, float(weight)))
    return out


def bind(function: RewardFunction, columns: Sequence[str]) -> RewardFunction:
    """Decide how ``function`` is called given the prompt rows' ``columns``: by keyword (TRL's convention) when it
    takes ``**kwargs`` or names any argument on offer (then every parameter it requires must be on offer: else an
    error naming what it lacks); positionally ``(prompts, completions)`` when it names none (``f(p, c)``)."""
    clash = sorted(set(columns) & set(RESERVED))
    if clash:
        raise ValueError(f"the prompt rows have a column named {clash[0]!r}, which is the name of a reward-function "
                         f"argument ({', '.join(RESERVED)}): rename that column")
    offered = (*RESERVED, *columns)
    try:
        params = inspect.signature(function.fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the positional convention
        function.keywords = None
        return function
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    if not var_keyword and not any(n in offered for n in named):
        function.keywords = None
        return function
    missing = [p.name for p in params
               if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in offered]
    if missing:
        raise ValueError(f"reward function {function.name!r} needs {', '.join(map(repr, missing))}, which the prompt "
                         f"rows do not have (columns: {', '.join(columns) or 'none'}); it is called with prompts=, "
                         "completions=, completion_ids= and the prompt row's columns by name")
    function.keywords = offered if var_keyword else tuple(n for n in named if n in offered)
    return function


def check_scores(name: str, scores, n: int) -> list[float | None]:
    """``scores`` as N floats or None; anything else is a ``ValueError`` naming the function."""
    if isinstance(scores, torch.Tensor) or type(scores).__module__ == "numpy":
        scores = scores.tolist() if getattr(scores, "ndim", 1) == 1 else scores
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise ValueError(f"reward function {name!r} returned a {type(scores).__name__}: expected a list of {n} "
                         "floats (None for a completion it does not score)")
    if len(scores) != n:
        raise ValueError(f"reward function {name!r} returned {len(scores)} scores for {n} completions")
    out = []
    for i, value in enumerate(scores):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if value is None:
            out.append(None)
            continue
        if not isinstance(value, numbers.Real):
            raise ValueError(f"reward function {name!r} returned {value!r} ({type(value).__name__}) for completion "
                             f"{i}: expected a float or None")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward function {name!r} returned {value} for completion {i}: scores must be finite "
                             "(None marks a completion it does not score)")
        out.append(value)
    return out


def score_all(functions: Sequence[RewardFunction], rows: Sequence[dict], completions: Sequence[str],
              completion_ids: Sequence[list[int]], columns: Sequence[str]) -> torch.Tensor:
    """``[N, F]`` float32 scores of N completions of the prompt ``rows`` (row i answered by completion i) by F
    functions; NaN where a function returned None."""
    conversational = [r.get("conversation") is not None for r in rows]
    prompts = [r["conversation"] if conv else r["prompt"] for r, conv in zip(rows, conversational)]
    completions = [[{"role": "assistant", "content": text}] if conv else text
                   for text, conv in zip(completions, conversational)]
    values = {k: [r.get("columns", {}).get(k) for r in rows] for k in columns}
    out = torch.empty(len(rows), len(functions))
    for j, function in enumerate(functions):
        scores = function(prompts, completions, [list(ids) for ids in completion_ids], values)
        out[:, j] = torch.tensor([math.nan if s is None else s for s in scores], dtype=torch.float32)
    return out


def weighted_sum(functions: Sequence[RewardFunction], scores: torch.Tensor) -> torch.Tensor:
    """``[N]``: each completion's weighted sum over the functions that scored it (NaN where none did)."""
    weights = torch.tensor([f.weight for f in functions], dtype=scores.dtype, device=scores.device)
    total = torch.nansum(scores * weights, dim=1)
    return torch.where(scores.isnan().all(dim=1), math.nan, total)


__all__ = ["RESERVED", "RewardFunction", "bind", "check_scores", "load", "reward_functions", "score_all",
           "weighted_sum"]
