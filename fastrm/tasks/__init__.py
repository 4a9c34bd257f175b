"""Built-in tasks with a checkable answer, so policies can be scored by the truth.

The default is :mod:`fastrm.tasks.arithmetic` (``"37+5="`` -> ``"42"``).
"""

from fastrm.tasks.arithmetic import (
    CHAT_TEMPLATE,
    DEFAULT_MAX_LEVEL,
    MAX_LEVEL,
    ArithmeticTask,
    DefaultData,
    Problem,
    build_tokenizer,
    expected_answer,
    is_correct,
    make_preference_data,
    make_ranking_data,
    make_sft_data,
    parse_completion,
    prepare_default_data,
    reward_fn,
    score,
    write_jsonl,
)

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MAX_LEVEL",
    "MAX_LEVEL",
    "ArithmeticTask",
    "DefaultData",
    "Problem",
    "build_tokenizer",
    "expected_answer",
    "is_correct",
    "make_preference_data",
    "make_ranking_data",
    "make_sft_data",
    "parse_completion",
    "prepare_default_data",
    "reward_fn",
    "score",
    "write_jsonl",
]
