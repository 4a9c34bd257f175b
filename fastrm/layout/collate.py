"""Collation per task: tokenized examples -> a typed batch in the layout the trainer decided at load time.

Every collator builds the right-padded batch on the host and hands it to :func:`fastrm.layout.modes`
(packed rows through the one packer, or length buckets on the device), so a trainer writes
``collate_x(examples, pad_id, self.packing.mode, self.device)`` and never looks at the layout again.
A pair-based trainer (reward model, DPO) takes :func:`collate_preference`: chosen rows first, rejected after,
with labels when its loss reads per-token log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from fastrm.layout.modes import Batch, arrange
from fastrm.layout.batches import IGNORE_INDEX, PaddedBatch


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


def pad_sequences(seqs: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None,
                  labels: list[list[int]] | None = None) -> PaddedBatch:
    """Token sequences right-padded with ``pad_id`` (labels, when given, with ``IGNORE_INDEX``)."""
    if not seqs:
        raise ValueError("pad_sequences: got no sequences")
    length = _round_up(max(len(s) for s in seqs), pad_to_multiple_of)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return PaddedBatch(_pad(seqs, pad_id, length), mask,
                       labels=_pad(labels, IGNORE_INDEX, length) if labels is not None else None)


def collate_sequences(seqs: list[list[int]], pad_id: int, mode: str = "padded", device=None,
                      pad_to_multiple_of: int | None = None, group_ids: Sequence[int] | None = None) -> Batch:
    """Token sequences as one batch in layout ``mode`` (shared | packed | bucketed | padded) on ``device``;
    ``group_ids``: one per sequence, equal for sequences that begin alike (the shared layout computes their
    common prefix once)."""
    padded = pad_sequences(seqs, pad_id, pad_to_multiple_of)
    if group_ids is not None:
        if len(group_ids) != len(seqs):
            raise ValueError(f"collate_sequences: {len(group_ids)} group ids for {len(seqs)} sequences")
        padded.group_ids = torch.as_tensor(list(group_ids), dtype=torch.long)
    return arrange(padded, mode, device)


def collate_sft(examples: Sequence[dict], pad_id: int, mode: str = "padded", device=None,
                pad_to_multiple_of: int | None = None) -> Batch:
    """``input_ids`` and ``labels`` (-100 on prompt and padding; packed: at every sequence's first token too, so
    nothing is learned across a sequence boundary)."""
    _check_examples(examples, "collate_sft")
    padded = pad_sequences([e["input_ids"] for e in examples], pad_id, pad_to_multiple_of,
                           labels=[e["labels"] for e in examples])
    return arrange(padded, mode, device)


@dataclass
class PreferenceBatch:
    """``B`` pairs as ``2B`` sequences, rows ``0..B-1`` the chosen and ``B..2B-1`` the rejected responses, and
    each pair's margin (``[B]`` float32; None when no example has one)."""

    sequences: Batch
    margin: torch.Tensor | None = None

    def to(self, device) -> PreferenceBatch:
        return replace(self, sequences=self.sequences.to(device),
                       margin=self.margin.to(device) if self.margin is not None else None)

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens

    @staticmethod
    def split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence (or per-token, padded layout) outputs of ``sequences`` as (chosen, rejected)."""
        chosen, rejected = values.chunk(2)
        return chosen, rejected


def _margins(examples) -> torch.Tensor | None:
    if not any(e.get("margin") is not None for e in examples):
        return None
    # A pair without a margin has margin 0 (the loss without a margin).
    return torch.tensor([float(e.get("margin") or 0.0) for e in examples], dtype=torch.float32)


def collate_preference(examples: Sequence[dict], pad_id: int, mode: str = "padded", device=None,
                       pad_to_multiple_of: int | None = None, *, labels: tuple[str, str] | None = None
                       ) -> PreferenceBatch:
    """Pairs of ``chosen_ids`` / ``rejected_ids``; ``labels``: the examples' keys of the two label lists (e.g.
    ``("chosen_labels", "rejected_labels")``) for a loss on per-token log-probs."""
    _check_examples(examples, "collate_preference")
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    seq_labels = None
    if labels is not None:
        seq_labels = [e[labels[0]] for e in examples] + [e[labels[1]] for e in examples]
    padded = pad_sequences(seqs, pad_id, pad_to_multiple_of, labels=seq_labels)
    padded.group_ids = torch.arange(len(examples)).repeat(2)  # a pair's two sequences begin with its prompt
    margin = _margins(examples)
    if margin is not None and device is not None:
        margin = margin.to(device)
    return PreferenceBatch(arrange(padded, mode, device), margin)


@dataclass
class RankingBatch:
    """``B`` examples of up to ``K`` ranked responses as ``B*K`` sequences (row ``b*K + k`` = response k of
    example b; a missing response is a 1-token dummy) and their ``[B, K]`` ranks (-1 where missing)."""

    sequences: Batch
    ranks: torch.Tensor

    def to(self, device) -> RankingBatch:
        return replace(self, sequences=self.sequences.to(device), ranks=self.ranks.to(device))

    @property
    def num_tokens(self) -> int:
        return self.sequences.num_tokens


def collate_ranking(examples: Sequence[dict], pad_id: int, mode: str = "padded", device=None,
                    dummy_id: int | None = None, pad_to_multiple_of: int | None = None) -> RankingBatch:
    """K is the largest response count in the batch; a missing response gets rank -1 and a 1-token dummy sequence
    (``dummy_id``, default: the example's first token, i.e. BOS) with attention on that token, so no row is fully
    masked."""
    _check_examples(examples, "collate_ranking")
    k = max(len(e["response_ids"]) for e in examples)
    seqs, ranks = [], torch.full((len(examples), k), -1, dtype=torch.long)
    groups = torch.full((len(examples), k), -1, dtype=torch.long)  # an example's responses share its prompt
    for b, e in enumerate(examples):
        if len(e["response_ids"]) != len(e["ranks"]):
            raise ValueError(f"collate_ranking: example {b} has {len(e['response_ids'])} responses but "
                             f"{len(e['ranks'])} ranks")
        dummy = [e["response_ids"][0][0] if dummy_id is None else dummy_id]
        seqs.extend(e["response_ids"])
        seqs.extend([dummy] * (k - len(e["response_ids"])))
        ranks[b, :len(e["ranks"])] = torch.as_tensor(e["ranks"], dtype=torch.long)
        groups[b, :len(e["ranks"])] = b
    padded = pad_sequences(seqs, pad_id, pad_to_multiple_of)
    padded.group_ids = groups.reshape(-1)
    return RankingBatch(arrange(padded, mode, device), ranks.to(device) if device is not None else ranks)
