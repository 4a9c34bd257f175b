"""Shared prefixes: sequences that begin with the same tokens (a preference pair's prompt, a GRPO group's prompt, the
K responses of a ranking example) packed into one row with that prefix once.

The row holds, per group, the group's common prefix (attending causally to itself), then each member's own tokens,
which attend to the whole prefix and causally to themselves, their positions continuing from the prefix's end
(:class:`fastrm.layout.varlen.SharedPlan`). For a causal model this is the unshared computation exactly: a token's
hidden state depends only on the tokens before it, and the prefix's are the same tokens at the same positions in
every member. Gradients reach the prefix from every member and add up, as they do into the weights when each
member is computed apart. Whether a model's forward really is causal and position-driven is proven at load time by
:mod:`fastrm.packing`'s probe (a model that is not gets plain packed rows).

The common prefix is found from the tokens themselves (the longest one all members of a group share, keeping at
least one token of each member its own), so it is right whatever the tokenizer does at the prompt's boundary.
Outputs come back in the padded layout of the batch (:meth:`SharedPrefixBatch.forward`): a per-token loss or
metric reads them as it reads a padded batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrm.layout.batches import (
    PackedBatch,
    PaddedBatch,
    check_contiguous,
    last_token_scores,
    move_to,
    pack,
    predicted_tokens,
)
from fastrm.layout.varlen import SharedPlan, packed_forward


@dataclass
class SharedPrefixBatch:
    """A padded batch (``padded``, whose ``group_ids`` say which rows share a prefix) run as one row ``[1, S]``
    (``input_ids``, ``position_ids``) with each group's common prefix once: the segments of the row
    (``starts``/``lengths``, and each one's ``prefix_starts``/``prefix_lengths``), and ``source`` ``[N*T]``, the row
    position of every token of the padded batch (-1 at padding)."""

    padded: PaddedBatch
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    starts: list[int]
    lengths: list[int]
    prefix_starts: list[int]
    prefix_lengths: list[int]

    def to(self, device) -> SharedPrefixBatch:
        return move_to(self, device)

    @property
    def labels(self) -> torch.Tensor | None:
        """The padded batch's labels: every output of :meth:`forward` is in its layout."""
        return self.padded.labels

    @property
    def num_tokens(self) -> int:
        """The batch's real tokens, each sequence's counted whole (as every layout counts them: throughput)."""
        return self.padded.num_tokens

    @property
    def computed_tokens(self) -> int:
        """Tokens the row computes (each shared prefix once)."""
        return int(self.input_ids.numel())

    @property
    def shared_tokens(self) -> int:
        """Tokens the padded batch holds that the row computes once for several sequences."""
        return self.num_tokens - self.computed_tokens

    @property
    def predicted_tokens(self) -> torch.Tensor:
        return predicted_tokens(self.labels)

    def plan(self) -> SharedPlan:
        return SharedPlan(self.starts, self.lengths, self.prefix_starts, self.prefix_lengths, self.input_ids.device)

    def to_padded(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token outputs of the row ``[1, S, ...]`` in the padded layout ``[N, T, ...]`` (0 at padding); a shared
        prefix's outputs are given to every member (their gradients add up in the row)."""
        rows, length = self.padded.attention_mask.shape
        real = self.source >= 0
        out = values[0].index_select(0, self.source.clamp_min(0))
        out = torch.where(real.view(-1, *[1] * (out.dim() - 1)), out, out.new_zeros(()))
        return out.view(rows, length, *values.shape[2:])

    def forward(self, module, **extra):
        """``module``'s output on the row, its ``last_hidden_state`` / ``logits`` in the padded layout."""
        out = packed_forward(module, self, plan=self.plan(), **extra)
        for name in ("last_hidden_state", "logits"):
            if getattr(out, name, None) is not None:
                out[name] = self.to_padded(out[name])
        return out

    def score_positions(self, pad_id: int | None) -> torch.Tensor:
        """Row positions where a last-token head reads each sequence, as the Hugging Face forward reads a padded
        batch: the rightmost token that is not the pad token (the sequence's first token if all are)."""
        ids, mask = self.padded.input_ids, self.padded.attention_mask != 0
        columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        readable = mask & (ids != pad_id) if pad_id is not None else mask
        first = torch.where(mask, columns, ids.shape[1]).amin(1)
        last = torch.where(readable, columns, -1).amax(1)
        column = torch.where(last >= 0, last, first)
        return self.source.view(ids.shape).gather(1, column.unsqueeze(1)).squeeze(1)

    def sequence_scores(self, model) -> torch.Tensor:
        """``[N]`` float32: the backbone once over the row, the last-token ``score`` head where the padded forward
        reads each sequence."""
        return last_token_scores(model, lambda backbone: packed_forward(backbone, self, plan=self.plan()),
                                 self.score_positions)

    def run(self, fn, per_token: bool):
        """``fn(self)``: its outputs are in the padded layout already."""
        return fn(self)


def _common_prefix(rows: list[torch.Tensor]) -> int:
    """Tokens all ``rows`` begin with, leaving each at least one token of its own."""
    shortest = min(len(r) for r in rows)
    same = torch.stack([r[:shortest] for r in rows]).eq(rows[0][:shortest]).all(0)
    differs = (~same).nonzero()
    common = int(differs[0]) if len(differs) else shortest
    return min(common, shortest - 1)


def share(batch: PaddedBatch) -> SharedPrefixBatch | PackedBatch:
    """``batch`` as one row with the common prefix of each group of rows (``batch.group_ids``: equal ids share;
    negative: alone) computed once. A batch where nothing is shared is simply packed (:func:`pack`)."""
    if batch.group_ids is None:
        return pack(batch)
    mask = batch.attention_mask
    check_contiguous(mask)
    n_rows, width = mask.shape
    if batch.group_ids.shape != (n_rows,):
        raise ValueError(f"group_ids: expected one id per row, shape ({n_rows},), got {tuple(batch.group_ids.shape)}")
    host_mask, host_ids = mask.cpu() != 0, batch.input_ids.cpu()
    lengths = host_mask.sum(1).tolist()
    first = host_mask.int().argmax(1).tolist()
    tokens = [host_ids[r, first[r]:first[r] + lengths[r]] for r in range(n_rows)]
    groups: dict[int, list[int]] = {}
    for r, g in enumerate(batch.group_ids.tolist()):
        groups.setdefault(g if g >= 0 else -1 - r - n_rows, []).append(r)  # a negative id: a group of its own
    prefixes = {g: _common_prefix([tokens[r] for r in rows]) if len(rows) > 1 else 0 for g, rows in groups.items()}
    if not any(prefixes.values()):
        return pack(batch)
    ids, positions, source = [], [], torch.full((n_rows, width), -1, dtype=torch.long)
    starts, seg_lengths, prefix_starts, prefix_lengths = [], [], [], []
    cursor = 0
    for g, rows in groups.items():
        shared = prefixes[g]
        if shared:
            ids.append(tokens[rows[0]][:shared])
            positions.append(torch.arange(shared))
            starts.append(cursor), seg_lengths.append(shared), prefix_starts.append(0), prefix_lengths.append(0)
            prefix_at, cursor = cursor, cursor + shared
        for r in rows:
            own = lengths[r] - shared
            ids.append(tokens[r][shared:])
            positions.append(torch.arange(shared, lengths[r]))
            starts.append(cursor), seg_lengths.append(own)
            prefix_starts.append(prefix_at if shared else 0), prefix_lengths.append(shared)
            here = torch.arange(cursor, cursor + own)
            source[r, first[r]:first[r] + lengths[r]] = torch.cat([torch.arange(prefix_at, prefix_at + shared), here]) \
                if shared else here
            cursor += own
    device = mask.device
    return SharedPrefixBatch(batch, torch.cat(ids).unsqueeze(0).to(device), torch.cat(positions).unsqueeze(0).to(device),
                             source.reshape(-1).to(device), starts, seg_lengths, prefix_starts, prefix_lengths)
