"""The three layouts of a batch of token sequences, as types, and the one way between them.

A batch of N sequences of lengths ``l_i`` runs in one of three ways (``MODES``):

``padded`` (:class:`PaddedBatch`)
    One ``[N, T]`` batch with an attention mask: a plain Hugging Face forward.
``packed`` (:class:`PackedBatch`)
    One row ``[1, S]``, ``S = sum(l_i)``, positions restarting at 0 for every sequence, every attention layer
    attending within each sequence only (:mod:`fastrm.layout.varlen`): no FLOP on padding, O(S) memory.
``bucketed`` (:class:`BucketedBatch`)
    Padded micro-batches of sequences of similar length (longest first), the model called once per bucket:
    exact for every model, and most of the padding gone.

Every batch has ``run(fn, per_token)``: ``fn`` on what the model takes in one forward (the padded batch, the
packed row, or each bucket's micro-batch) with the outputs back in the padded layout (``[N]`` per sequence,
``[N, T]`` / ``[N, T-1]`` per token), so neither models nor trainers ask which layout they hold.
:func:`pack` is the one packer; :func:`arrange` the one place a layout is chosen from a mode.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from fastrm.layout.lengths import BUCKET_OVERHEAD_TOKENS, length_buckets
from fastrm.layout.varlen import PackingUnsupported, first_id, packed_forward, text_config

IGNORE_INDEX = -100  # a label that is not trained on (prompt, padding, a sequence's first token in a packed row)
MODES = ("shared", "packed", "bucketed", "padded")

def move_to(batch, device):
    """A copy of the dataclass ``batch`` with every tensor (also inside lists of dataclasses) on ``device``."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, list):
            return [move(v) for v in value]
        if hasattr(value, "__dataclass_fields__"):
            return move_to(value, device)
        return value

    return replace(batch, **{f.name: move(getattr(batch, f.name)) for f in fields(batch)})


def predicted_tokens(labels: torch.Tensor | None) -> torch.Tensor:
    """Labels a next-token loss trains on: position t predicts ``labels[t + 1]``."""
    if labels is None:
        raise ValueError("this batch has no labels (a next-token loss needs them)")
    return (labels[:, 1:] != IGNORE_INDEX).sum()


# ============================================================================ padded


@dataclass
class PaddedBatch:
    """``[N, T]`` token ids and attention mask (padding on either side), optional labels (``IGNORE_INDEX``: not
    trained on), position ids (counting real tokens only, for left-padded rows) and ``group_ids`` ``[N]`` (rows of
    one id begin alike, e.g. a pair's prompt: the ``shared`` layout computes their common prefix once)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None

    def to(self, device) -> PaddedBatch:
        return move_to(self, device)

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def predicted_tokens(self) -> torch.Tensor:
        return predicted_tokens(self.labels)

    def select(self, rows: torch.Tensor) -> PaddedBatch:
        """The rows ``rows`` of this batch (an RL minibatch)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def forward(self, module, **extra):
        """``module``'s own forward on this batch."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False, **extra}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return module(**inputs)

    def sequence_scores(self, model) -> torch.Tensor:
        """``[N]`` float32: a sequence-classification model's one output through its own forward, whatever its
        head (a decoder's last non-pad token, an encoder's ``[CLS]`` pooler, ...)."""
        extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
        out = model(input_ids=self.input_ids, attention_mask=self.attention_mask, **extra)
        return out.logits.squeeze(-1).float()

    def run(self, fn, per_token: bool):
        """``fn(self)``: this batch is what the model takes in one forward."""
        return fn(self)


def check_contiguous(attention_mask: torch.Tensor):
    """Every row's real tokens must be one run (left, right or both-sides padding): what the padded forward
    sees with position ids counting real tokens only."""
    mask = attention_mask != 0
    lengths = mask.sum(1)
    first = mask.int().argmax(1)
    last = attention_mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    if bool(((last - first + 1 != lengths) & (lengths > 0)).any()):
        raise ValueError("attention_mask: each row's real tokens must be contiguous (padding on the left and/or "
                         "right only) to be packed or bucketed")
    if bool((lengths == 0).any()):
        raise ValueError("attention_mask: a row has no real token")


# ============================================================================ packed


@dataclass
class PackedBatch:
    """The sequences of a padded batch in one row ``[1, S]`` (``input_ids``, ``position_ids`` restarting at 0,
    ``labels`` -100 at every sequence's first token), their boundaries (``cu_seq_lens`` int32 ``[N+1]``,
    ``seq_ends`` long ``[N]``, ``max_length``), and where each token sat in the padded batch (``token_index``
    into ``N*T``, ``padded_shape``) to put per-token outputs back."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seq_lens: torch.Tensor
    seq_ends: torch.Tensor
    max_length: int
    token_index: torch.Tensor
    padded_shape: tuple[int, int]
    labels: torch.Tensor | None = None

    def to(self, device) -> PackedBatch:
        return move_to(self, device)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def predicted_tokens(self) -> torch.Tensor:
        return predicted_tokens(self.labels)

    def forward(self, module, **extra):
        """``module``'s output with every sequence attending within itself only (needs
        :func:`fastrm.layout.varlen.enable_varlen`)."""
        return packed_forward(module, self, **extra)

    def score_positions(self, pad_id: int | None) -> torch.Tensor:
        """Where a last-token head reads each sequence: as the Hugging Face forward does on a padded batch, the
        rightmost token that is not the pad token (its first token if all are), else the last token."""
        if pad_id is None:
            return self.seq_ends
        cu = self.cu_seq_lens.long()
        lengths = cu[1:] - cu[:-1]
        ids = self.input_ids[0]
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)
        positions = torch.where(ids != pad_id, torch.arange(ids.numel(), device=ids.device), cu[:-1][sequence])
        return positions.new_full((len(lengths),), -1).scatter_reduce(0, sequence, positions, "amax")

    def sequence_scores(self, model) -> torch.Tensor:
        """``[N]`` float32: the backbone once over the row, the last-token ``score`` head where the padded forward
        reads it. A model whose head reads another token cannot be scored packed."""
        return last_token_scores(model, self.forward, self.score_positions)

    def unpack(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Per-token outputs of the row (``[1, S, ...]``, or ``[1, S-1, ...]`` for next-token outputs such as
        log-probs) in the padded layout (``[N, T, ...]`` or ``[N, T-1, ...]``), ``fill`` elsewhere."""
        rows, length = self.padded_shape
        shifted = values.shape[1] == self.input_ids.shape[1] - 1
        if shifted:  # position t predicts token t+1: append a slot so both layouts have one value per token
            values = torch.cat([values, values.new_full((1, 1, *values.shape[2:]), fill)], dim=1)
        out = values.new_full((rows * length, *values.shape[2:]), fill)
        out = out.index_put((self.token_index,), values[0])
        out = out.view(rows, length, *values.shape[2:])
        return out[:, :-1] if shifted else out

    def run(self, fn, per_token: bool):
        """``fn(self)``, per-token outputs (a tensor or a tuple of them) put back in the padded layout."""
        out = fn(self)
        if not per_token:
            return out
        return tuple(self.unpack(o) for o in out) if isinstance(out, tuple) else self.unpack(out)


def last_token_scores(model, row_forward, score_positions) -> torch.Tensor:
    """``[N]`` float32 scores of a packed row's sequences: ``row_forward(backbone)`` once over the row (its
    ``last_hidden_state`` ``[1, S, H]``), the model's last-token ``score`` head at ``score_positions(pad_id)`` (row
    positions, one per sequence)."""
    head = getattr(model, "score", None)
    # A head LoRA trains whole sits in peft's ModulesToSaveWrapper, which calls its trainable copy.
    if not isinstance(getattr(head, "original_module", head), torch.nn.Linear):
        raise PackingUnsupported(
            f"{type(model).__name__} has no last-token `score` head (its head reads another token, e.g. a "
            "pooled first token): packed rows cannot be scored")
    hidden = row_forward(getattr(model, model.base_model_prefix)).last_hidden_state
    positions = score_positions(first_id(text_config(model).pad_token_id))
    return head(hidden[0, positions]).squeeze(-1).float()


def pack(batch: PaddedBatch) -> PackedBatch:
    """The one packer: a padded batch (padding on either side) as one packed row. Labels at each sequence's first
    token become -100 (nothing is predicted across a sequence boundary)."""
    mask = batch.attention_mask
    check_contiguous(mask)
    lengths = mask.sum(1)
    index = mask.reshape(-1).nonzero().squeeze(1)  # flat indices (into N*T) of the real tokens, row by row
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lengths.cumsum(0)
    starts = cu[:-1].long()
    position_ids = torch.arange(index.numel(), device=mask.device) - torch.repeat_interleave(starts, lengths)
    labels = None
    if batch.labels is not None:
        labels = batch.labels.reshape(-1)[index].clone()
        labels[starts] = IGNORE_INDEX
        labels = labels.unsqueeze(0)
    return PackedBatch(input_ids=batch.input_ids.reshape(-1)[index].unsqueeze(0),
                       position_ids=position_ids.unsqueeze(0), cu_seq_lens=cu, seq_ends=cu[1:].long() - 1,
                       max_length=int(lengths.max()), token_index=index, padded_shape=tuple(mask.shape),
                       labels=labels)


# ============================================================================ bucketed


@dataclass
class Bucket:
    """One micro-batch of a bucketed batch: the rows it takes and where their real tokens lie."""

    rows: torch.Tensor    # [n] long, rows of the padded batch
    gather: torch.Tensor  # [n, L] long, flat index (into N*T) of each row's t-th token, real then padding
    mask: torch.Tensor    # [n, L] long, 1 on real tokens


@dataclass
class BucketedBatch:
    """A padded batch and its length buckets: run as several right-padded micro-batches."""

    padded: PaddedBatch
    buckets: list[Bucket]

    def to(self, device) -> BucketedBatch:
        return move_to(self, device)

    @property
    def num_tokens(self) -> int:
        return self.padded.num_tokens

    @property
    def predicted_tokens(self) -> torch.Tensor:
        return self.padded.predicted_tokens

    def micro_batch(self, b: Bucket) -> PaddedBatch:
        """The right-padded micro-batch of one bucket (its padding is the rows' own padding tokens)."""
        labels = None
        if self.padded.labels is not None:
            labels = self.padded.labels.reshape(-1)[b.gather].masked_fill(b.mask == 0, IGNORE_INDEX)
        return PaddedBatch(self.padded.input_ids.reshape(-1)[b.gather], b.mask, labels)

    def run(self, fn, per_token: bool):
        """``fn(micro_batch)`` for every bucket, outputs put back in the padded layout: per sequence
        (``[n] -> [N]``) or, with ``per_token``, per token (``[n, L(-1)] -> [N, T(-1)]``, 0 at padding). ``fn``
        may return a tuple of such outputs."""
        rows_total, width = self.padded.attention_mask.shape
        outputs = [fn(self.micro_batch(b)) for b in self.buckets]
        is_tuple = isinstance(outputs[0], tuple)
        merged = []
        for k in range(len(outputs[0]) if is_tuple else 1):
            parts = [out[k] if is_tuple else out for out in outputs]
            if not per_token:
                out = parts[0].new_zeros((rows_total, *parts[0].shape[1:]))
                for b, part in zip(self.buckets, parts):
                    out = out.index_put((b.rows,), part)
                merged.append(out)
                continue
            shifted = parts[0].shape[1] == self.buckets[0].gather.shape[1] - 1
            out = parts[0].new_zeros((rows_total * width, *parts[0].shape[2:]))
            for b, part in zip(self.buckets, parts):
                if shifted:  # position t predicts token t+1: one slot per token, as in the padded layout
                    part = torch.cat([part, part.new_zeros((part.shape[0], 1, *part.shape[2:]))], dim=1)
                valid = b.mask.reshape(-1) != 0
                out = out.index_put((b.gather.reshape(-1)[valid],), part.reshape(-1, *part.shape[2:])[valid])
            out = out.view(rows_total, width, *out.shape[1:])
            merged.append(out[:, :-1] if shifted else out)
        return tuple(merged) if is_tuple else merged[0]


def bucket(batch: PaddedBatch, overhead: float | None = None) -> BucketedBatch:
    """A padded batch with its length buckets (``overhead``: padded tokens a bucket boundary must save; default
    ``BUCKET_OVERHEAD_TOKENS`` of the batch's device)."""
    mask = batch.attention_mask
    check_contiguous(mask)
    if overhead is None:
        overhead = BUCKET_OVERHEAD_TOKENS.get(mask.device.type, BUCKET_OVERHEAD_TOKENS["cuda"])
    lengths = mask.sum(1)
    first = (mask != 0).int().argmax(1)
    width = mask.shape[1]
    buckets = []
    for group in length_buckets(lengths.tolist(), overhead):
        rows = torch.tensor(group, dtype=torch.long, device=mask.device)
        n = lengths[rows]
        steps = torch.arange(int(n.max()), device=mask.device).unsqueeze(0)
        # a row's t-th token; past its end, the columns after it and then before it: its own padding
        gather = rows.unsqueeze(1) * width + (first[rows].unsqueeze(1) + steps) % width
        buckets.append(Bucket(rows, gather, (steps < n.unsqueeze(1)).long()))
    return BucketedBatch(batch, buckets)


