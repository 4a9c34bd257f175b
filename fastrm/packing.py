"""Padding-free execution: sequences of different lengths without paying for padding, and exact.

A batch of N sequences of lengths ``l_i`` runs in one of three ways (``Packing.mode``):

``packed``
    One row ``[1, S]``, ``S = sum(l_i)``, positions restarting at 0 for every sequence; every attention layer
    attends within each sequence only (variable-length attention), so a step costs ``sum(l_i)`` tokens of
    MLP and ``sum(l_i**2)`` of attention, with O(S) memory, and never builds an ``[S, S]`` mask. The
    attention is, per call: **flash-attn varlen** when the model runs transformers' ``flash_attention_2``;
    else on CUDA in bf16/fp16 **torch's varlen_attn** (``torch.nn.attention.varlen``, torch >= 2.9); else
    the model's own SDPA / eager attention **per length bucket**: the sequences of one bucket gathered into a
    small padded ``[n, L]`` block (``L`` its longest), so the attention costs what each sequence alone costs
    plus a little padding (benchmarks/bench_packing.py measures it).
    Exact only for models whose attention goes through transformers' attention interface and whose
    every other layer works token by token: decided per model at load time by :func:`choose_packing`.
``bucketed``
    Padded micro-batches of sequences of similar length (longest first), the model called once per bucket:
    exact for every model (it is just padded batches), and most of the padding is gone.
``padded``
    One padded ``[N, max l_i]`` batch, as a plain Hugging Face forward.

``packed=auto`` (the trainers' default) picks ``packed`` where the load-time probe shows it equals the padded
forward for this model (outputs, hidden states and gradients), else ``bucketed``, and logs one line saying
which and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from fastrm.data import IGNORE_INDEX

log = logging.getLogger("fastrm")

MODES = ("packed", "bucketed", "padded")
SETTINGS = ("auto", "true", "false", "bucketed")
SETTING_HELP = ("padding-free batches: auto (packed rows where exact for the model, else length buckets) | true "
                "(packed rows; an error where not exact) | bucketed (padded micro-batches of similar lengths) | "
                "false (plain padded batches)")
PREFIX = "fastrm_varlen_"  # transformers attention implementations registered here: PREFIX + the model's own
WRAPPABLE = ("sdpa", "eager")
FLASH = ("flash_attention_2", "flash_attention_3")
PLAN_KWARG = "fastrm_varlen"  # the keyword that carries a VarlenPlan down to every attention call

# A bucket boundary is worth it when it saves more than this: for whole-model buckets, padded tokens (the
# cost of one more forward and backward); for attention buckets, attention scores (one more SDPA call).
BUCKET_OVERHEAD_TOKENS = {"cpu": 256, "cuda": 2048}
ATTENTION_BUCKET_OVERHEAD = 64 * 64 * 8
MAX_BUCKET_CANDIDATES = 256  # distinct lengths considered as bucket boundaries (keeps the partition O(256^2))

_SKIP_MASKS = contextvars.ContextVar("fastrm_skip_masks", default=False)
_VARLEN_CALLS = contextvars.ContextVar("fastrm_varlen_calls", default=None)
_ATTENTION_BUCKET_OVERHEAD = contextvars.ContextVar("fastrm_attention_bucket_overhead", default=None)


class PackingUnsupported(RuntimeError):
    """This model cannot run packed rows exactly; the message says why."""


# ============================================================================ length buckets


def length_buckets(lengths, overhead: float, power: int = 1) -> list[list[int]]:
    """Indices of ``lengths`` grouped into buckets of similar length, longest bucket first, each bucket's
    longest sequence first; the partition minimises ``sum over buckets (n_b * L_b**power + overhead)`` (``L_b``
    the bucket's longest length): the padded work of the buckets plus a fixed cost per bucket.

    Exact dynamic programme over the sorted lengths (a bucket is a run of them); boundaries are taken only
    where the length changes, at most ``MAX_BUCKET_CANDIDATES`` of them (evenly spread beyond that)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if math.isinf(overhead):
        return [order]
    sorted_lengths = [lengths[i] for i in order]
    starts = [0] + [k for k in range(1, len(order)) if sorted_lengths[k] != sorted_lengths[k - 1]]
    if len(starts) > MAX_BUCKET_CANDIDATES:
        step = len(starts) / MAX_BUCKET_CANDIDATES
        starts = sorted({starts[int(j * step)] for j in range(MAX_BUCKET_CANDIDATES)} | {0})
    bounds = starts + [len(order)]
    # best[k]: the cheapest split of sorted positions [0, bounds[k]); cut[k] where its last bucket starts
    best, cut = [0.0] + [float("inf")] * (len(bounds) - 1), [0] * len(bounds)
    for k in range(1, len(bounds)):
        for m in range(k):
            cost = best[m] + (bounds[k] - bounds[m]) * sorted_lengths[bounds[m]] ** power + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, m
    buckets, k = [], len(bounds) - 1
    while k > 0:
        m = cut[k]
        buckets.append(order[bounds[m]:bounds[k]])
        k = m
    return buckets[::-1]


# ============================================================================ batch layouts


def _lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.sum(1)


def _token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``B*T``) of the real tokens, row by row, in order."""
    return attention_mask.reshape(-1).nonzero().squeeze(1)


def _check_contiguous(attention_mask: torch.Tensor):
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


def pack(batch: dict) -> dict:
    """A padded batch (``input_ids`` / ``attention_mask`` ``[B, T]``, optional ``labels``; padding on either
    side) as one packed row, with what :func:`unpack` needs to put per-token outputs back in the padded layout.
    Labels at each sequence's first token become -100 (nothing is predicted across a sequence boundary)."""
    mask = batch["attention_mask"]
    _check_contiguous(mask)
    lengths = _lengths(mask)
    index = _token_index(mask)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = lengths.cumsum(0)
    starts = cu[:-1].long()
    position_ids = torch.arange(index.numel(), device=mask.device) - torch.repeat_interleave(starts, lengths)
    packed = {"input_ids": batch["input_ids"].reshape(-1)[index].unsqueeze(0),
              "position_ids": position_ids.unsqueeze(0), "cu_seq_lens": cu,
              "seq_ends": cu[1:].long() - 1, "max_length": int(lengths.max()),
              "token_index": index, "padded_shape": tuple(mask.shape)}
    if "labels" in batch:
        labels = batch["labels"].reshape(-1)[index].clone()
        labels[starts] = IGNORE_INDEX
        packed["labels"] = labels.unsqueeze(0)
    return packed


def unpack(values: torch.Tensor, packed: dict, fill: float = 0.0) -> torch.Tensor:
    """Per-token outputs of a row made by :func:`pack` (``[1, S, ...]``, or ``[1, S-1, ...]`` for next-token
    outputs such as log-probs) in the padded layout (``[B, T, ...]`` or ``[B, T-1, ...]``), ``fill`` elsewhere."""
    rows, length = packed["padded_shape"]
    shifted = values.shape[1] == packed["input_ids"].shape[1] - 1
    if shifted:  # position t predicts token t+1: append a slot so both layouts have one value per token
        values = torch.cat([values, values.new_full((1, 1, *values.shape[2:]), fill)], dim=1)
    out = values.new_full((rows * length, *values.shape[2:]), fill)
    out = out.index_put((packed["token_index"],), values[0])
    out = out.view(rows, length, *values.shape[2:])
    return out[:, :-1] if shifted else out


@dataclass
class Bucket:
    """One micro-batch of a bucketed batch: the rows it takes and where their real tokens lie."""

    rows: torch.Tensor    # [n] long, rows of the padded batch
    gather: torch.Tensor  # [n, L] long, flat index (into B*T) of each row's t-th token, real then padding
    mask: torch.Tensor    # [n, L] long, 1 on real tokens


def bucket(batch: dict, overhead: float | None = None) -> dict:
    """A padded batch plus ``"buckets"``: length buckets to run it as several right-padded micro-batches
    (:func:`per_bucket`). Anything that ignores ``"buckets"`` still sees the plain padded batch."""
    mask = batch["attention_mask"]
    _check_contiguous(mask)
    if overhead is None:
        overhead = BUCKET_OVERHEAD_TOKENS.get(mask.device.type, BUCKET_OVERHEAD_TOKENS["cuda"])
    lengths = _lengths(mask)
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
    return {**batch, "buckets": buckets}


def _bucket_inputs(batch: dict, b: Bucket) -> dict:
    """The right-padded micro-batch of one bucket (its padding is the rows' own padding tokens)."""
    sub = {"input_ids": batch["input_ids"].reshape(-1)[b.gather], "attention_mask": b.mask}
    if "labels" in batch:
        sub["labels"] = batch["labels"].reshape(-1)[b.gather].masked_fill(b.mask == 0, IGNORE_INDEX)
    return sub


def per_bucket(fn, batch: dict, per_token: bool):
    """``fn(micro_batch)`` for every bucket of a :func:`bucket` batch, outputs put back in the padded layout:
    per sequence (``[n] -> [B]``) or, with ``per_token``, per token (``[n, L(-1)] -> [B, T(-1)]``, 0 at
    padding). ``fn`` may return a tuple of such outputs."""
    rows_total, width = batch["attention_mask"].shape
    outputs = [fn(_bucket_inputs(batch, b)) for b in batch["buckets"]]
    is_tuple = isinstance(outputs[0], tuple)
    merged = []
    for k in range(len(outputs[0]) if is_tuple else 1):
        parts = [out[k] if is_tuple else out for out in outputs]
        if not per_token:
            out = parts[0].new_zeros((rows_total, *parts[0].shape[1:]))
            for b, part in zip(batch["buckets"], parts):
                out = out.index_put((b.rows,), part)
            merged.append(out)
            continue
        shifted = parts[0].shape[1] == batch["buckets"][0].gather.shape[1] - 1
        out = parts[0].new_zeros((rows_total * width, *parts[0].shape[2:]))
        for b, part in zip(batch["buckets"], parts):
            if shifted:  # position t predicts token t+1: one slot per token, as in the padded layout
                part = torch.cat([part, part.new_zeros((part.shape[0], 1, *part.shape[2:]))], dim=1)
            valid = b.mask.reshape(-1) != 0
            out = out.index_put((b.gather.reshape(-1)[valid],), part.reshape(-1, *part.shape[2:])[valid])
        out = out.view(rows_total, width, *out.shape[1:])
        merged.append(out[:, :-1] if shifted else out)
    return tuple(merged) if is_tuple else merged[0]


# ============================================================================ variable-length attention


@dataclass
class VarlenPlan:
    """The sequences of one packed row, as every attention layer needs them: ``cu_seq_lens`` (int32, on the
    row's device) and, built on first use and shared by all layers, the length buckets of the per-bucket
    attention (gather indices into the row, the real slots of each bucket, and the way back)."""

    cu_seq_lens: torch.Tensor
    lengths: list[int]
    max_length: int
    bucket_overhead: float = ATTENTION_BUCKET_OVERHEAD
    _buckets: list | None = field(default=None, repr=False)
    _inverse: torch.Tensor | None = field(default=None, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_batch(cls, batch: dict) -> VarlenPlan:
        cu = batch["cu_seq_lens"]
        lengths = (cu[1:] - cu[:-1]).tolist()  # one host read per packed forward, shared by every layer
        overhead = _ATTENTION_BUCKET_OVERHEAD.get()
        return cls(cu.to(torch.int32), lengths, max(lengths), ATTENTION_BUCKET_OVERHEAD if overhead is None else overhead)

    def buckets(self) -> tuple[list, torch.Tensor | None]:
        """``[(gather [n, L], valid, real [n, L])]`` per bucket and the permutation back to the row's order; for
        sequences all of one length, one bucket with ``gather`` None: the row is simply viewed as ``[n, L]``."""
        if self._buckets is None and len(set(self.lengths)) == 1:
            n, length = len(self.lengths), self.lengths[0]
            real = torch.ones(n, length, dtype=torch.bool, device=self.cu_seq_lens.device)
            self._buckets = [(None, None, real)]
        if self._buckets is None:
            device = self.cu_seq_lens.device
            starts = self.cu_seq_lens[:-1].long()
            lengths = torch.tensor(self.lengths, device=device)
            self._buckets, order = [], []
            for group in length_buckets(self.lengths, self.bucket_overhead, power=2):
                rows = torch.tensor(group, device=device)
                n = lengths[rows]
                steps = torch.arange(int(max(self.lengths[i] for i in group)), device=device)
                gather = starts[rows].unsqueeze(1) + torch.minimum(steps.unsqueeze(0), (n - 1).unsqueeze(1))
                real = steps.unsqueeze(0) < n.unsqueeze(1)  # [n, L]
                valid = real.reshape(-1).nonzero().squeeze(1)
                self._buckets.append((gather, valid, real))
                order.append(gather.reshape(-1)[valid])
            order = torch.cat(order)
            self._inverse = torch.empty_like(order)
            self._inverse[order] = torch.arange(order.numel(), device=device)
        return self._buckets, self._inverse

    def mask(self, k: int, real: torch.Tensor, is_causal: bool, window: int | None, dtype: torch.dtype | None):
        """The attention mask of bucket ``k`` for its base function (None: plain causal, which SDPA's
        ``is_causal`` covers), boolean (SDPA) or additive (``dtype``: the eager functions)."""
        key = (k, is_causal, window, dtype)
        if key in self._masks:
            return self._masks[key]
        n, length = real.shape
        if is_causal and window is None and dtype is None:
            mask = None
        else:
            q = torch.arange(length, device=real.device).unsqueeze(1)
            kv = torch.arange(length, device=real.device).unsqueeze(0)
            if is_causal:  # with transformers' sliding window: the last `window` tokens, itself included
                allowed = (kv <= q) & (kv > q - window) if window is not None else kv <= q
                allowed = allowed.view(1, 1, length, length).expand(n, 1, length, length)
            else:  # bidirectional: the real keys of each row (every row has one)
                allowed = real.view(n, 1, 1, length).expand(n, 1, length, length)
            mask = allowed if dtype is None else torch.zeros(allowed.shape, dtype=dtype, device=real.device) \
                .masked_fill(~allowed, torch.finfo(dtype).min)
        self._masks[key] = mask
        return mask


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _use_torch_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: dict, dropout: float,
                      is_causal: bool) -> bool:
    """torch's varlen_attn (flash kernels) covers this call: CUDA, half precision, no feature it lacks."""
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)) or _torch_varlen_attn() is None:
        return False
    if dropout or kwargs.get("softcap") is not None or kwargs.get("output_attentions"):
        return False
    if any(kwargs.get(k) is not None for k in ("s_aux", "sinks", "position_bias")):
        return False
    if kwargs.get("sliding_window") is not None and not is_causal:
        return False
    return query.shape[-1] == value.shape[-1] == key.shape[-1] <= 256 and query.shape[-1] % 8 == 0


def _torch_varlen(query, key, value, plan: VarlenPlan, scaling, window, is_causal):
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [S, heads, d]
    if not is_causal:
        window_size = (-1, -1)
    else:  # (left, right): causal is (-1, 0); a sliding window of W tokens (itself included) is (W - 1, 0)
        window_size = (window - 1, 0) if window is not None else (-1, 0)
    out = _torch_varlen_attn()(q, k, v, plan.cu_seq_lens, plan.cu_seq_lens, plan.max_length, plan.max_length,
                               scale=scaling, window_size=window_size, enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None


def _bucketed_attention(base: str, base_fn, module, query, key, value, plan: VarlenPlan, is_causal: bool,
                        kwargs: dict):
    """The model's own attention function on each length bucket of the row, as a small padded batch."""
    window = kwargs.get("sliding_window")
    buckets, inverse = plan.buckets()
    q_all, k_all, v_all = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, heads, d]
    outs = []
    for k, (gather, valid, real) in enumerate(buckets):
        if gather is None:  # equal lengths: the row is [n, L] already
            q, kk, v = (x.reshape(*real.shape, *x.shape[1:]).transpose(1, 2) for x in (q_all, k_all, v_all))
        else:
            q, kk, v = (x[gather].transpose(1, 2) for x in (q_all, k_all, v_all))  # [n, heads, L, d]
        mask = plan.mask(k, real, is_causal, window, None if base == "sdpa" else query.dtype)
        out, _ = base_fn(module, q, kk, v, mask, **kwargs)  # [n, L, heads, d]
        out = out.reshape(-1, *out.shape[2:])
        outs.append(out if valid is None else out[valid])
    out = outs[0] if inverse is None else torch.cat(outs)[inverse]
    return out.unsqueeze(0), None


def _eager_function(module):
    """The eager attention of the module's own modeling file (it carries the family's soft-capping, sinks...)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise PackingUnsupported(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
    return fn


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        plan = kwargs.pop(PLAN_KWARG, None)
        for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        base_fn = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _eager_function(module)
        if plan is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        if query.shape[0] != 1 or query.shape[2] != plan.cu_seq_lens[-1]:
            raise PackingUnsupported(f"{type(module).__name__}: a packed row of {int(plan.cu_seq_lens[-1])} tokens "
                                     f"reached attention as {tuple(query.shape)}")
        if kwargs.get("position_bias") is not None:
            raise PackingUnsupported(f"{type(module).__name__}: attention takes a position bias over the whole row")
        calls = _VARLEN_CALLS.get()
        if calls is not None:
            calls.append(type(module).__name__)
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        if kwargs.get("sliding_window") is not None and not is_causal:
            raise PackingUnsupported(f"{type(module).__name__}: a bidirectional sliding window")
        if _use_torch_varlen(query, key, value, kwargs, kwargs.get("dropout", 0.0), is_causal):
            return _torch_varlen(query, key, value, plan, kwargs.get("scaling"), kwargs.get("sliding_window"),
                                 is_causal)
        kwargs["is_causal"] = is_causal
        return _bucketed_attention(base, base_fn, module, query, key, value, plan, is_causal, kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def _make_mask(base: str):
    def mask(*args, **kwargs):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        if _SKIP_MASKS.get():  # a packed row: the attention builds its own per-sequence masks
            return None
        return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)

    return mask


def _register(base: str) -> str:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + base
    AttentionInterface.register(name, _make_attention(base))
    AttentionMaskInterface.register(name, _make_mask(base))
    return name


def base_attention(model) -> str | None:
    impl = getattr(model.config, "_attn_implementation", None)
    return impl[len(PREFIX):] if isinstance(impl, str) and impl.startswith(PREFIX) else impl


def enable_varlen(model) -> str:
    """Let ``model`` run packed rows with variable-length attention; returns the attention it will use.

    flash_attention_2/3 models already do (transformers passes ``cu_seq_lens`` to flash-attn's varlen
    kernel). SDPA and eager models get fastrm's attention implementation, which calls the model's own
    function unchanged on padded batches and per sequence on packed rows. Raises :class:`PackingUnsupported`
    for anything else. Saved checkpoints keep no trace of it (transformers does not serialise the choice)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in FLASH:
        return impl
    if isinstance(impl, str) and impl.startswith(PREFIX):
        return impl
    if impl not in WRAPPABLE:
        raise PackingUnsupported(f"attention implementation {impl!r} (packing needs sdpa, eager or flash_attention_2)")
    try:
        name = _register(impl)
    except ImportError as err:
        raise PackingUnsupported(f"this transformers has no attention/mask interface to register with ({err})") \
            from None
    model.config._attn_implementation = name  # the config setter passes it on to sub-configs
    return name


def disable_varlen(model):
    """Undo :func:`enable_varlen` (the model's own attention implementation again)."""
    base = base_attention(model)
    if base is not None and base != model.config._attn_implementation:
        model.config._attn_implementation = base


def attention_path(model, device: torch.device, half_precision: bool) -> str:
    """What the packed rows' attention will be on ``device``, for the log."""
    base = base_attention(model)
    if base in FLASH:
        return "flash-attn varlen"
    if device.type == "cuda" and half_precision and _torch_varlen_attn() is not None:
        return f"torch varlen_attn (else {base} per length bucket)"
    return f"{base} per length bucket"


@contextlib.contextmanager
def _packed_call():
    token = _SKIP_MASKS.set(True)
    try:
        yield
    finally:
        _SKIP_MASKS.reset(token)


def packed_forward(module: nn.Module, batch: dict, **extra):
    """``module``'s output on a packed row (``input_ids``, ``position_ids``, ``cu_seq_lens``), every sequence
    attending within itself only: a backbone's ``last_hidden_state`` ``[1, S, H]``, a model's ``logits``. The model
    must have :func:`enable_varlen`."""
    impl = getattr(module.config, "_attn_implementation", None)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False, **extra}
    if impl in FLASH:
        cu = batch["cu_seq_lens"].to(torch.int32)
        max_length = int(batch.get("max_length") or (cu[1:] - cu[:-1]).max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length)
    elif isinstance(impl, str) and impl.startswith(PREFIX):
        inputs[PLAN_KWARG] = VarlenPlan.from_batch(batch)
    else:
        raise PackingUnsupported(f"{type(module).__name__} runs attention {impl!r}: a packed row needs "
                                 "fastrm.packing.enable_varlen(model) (the trainers do it through choose_packing)")
    with _packed_call():
        return module(**inputs)


@contextlib.contextmanager
def count_varlen_calls():
    """Collects the attention modules that ran per sequence on a packed row (for the load-time probe)."""
    calls: list[str] = []
    token = _VARLEN_CALLS.set(calls)
    try:
        yield calls
    finally:
        _VARLEN_CALLS.reset(token)


# ============================================================================ exact for this model?

KINDS = ("reward", "causal_lm", "backbone")
PROBE_LENGTHS = (5, 17, 11, 26)
# The probe's tolerance comes from the model itself. Packing only reorders float sums (other matmul shapes,
# attention per sequence); so does any change of batch shape. The padded forward recomputed in float64 is the
# truth; the padded forward in the working dtype is some distance from it (rounding, grown over the model's depth
# and width); the packed forward must be no further from the truth than PROBE_FACTOR times that distance. Two
# roundings of the same sums are of one size (their ratio stays within ~2 over random seeds); a model that leaks
# attention across sequences, reads positions from the mask, or pools another token is off by 1e-2 to 1,
# thousands of times the rounding. The floor (PROBE_FLOOR_ULPS ulps of the working dtype) keeps a quantity that
# the working dtype happens to compute exactly (a zero) from demanding exactness of the packed run.
PROBE_FACTOR = 4.0
PROBE_FLOOR_ULPS = 4
# Where no float64 copy of the forward can run (flash-attn, quantized weights, out of memory), packed is compared
# with padded directly: this many ulps of the working dtype per layer, relative.
PROBE_FALLBACK_ULPS_PER_LAYER = 64


@dataclass
class Packing:
    """How a model runs its batches (``mode``: packed | bucketed | padded), and why."""

    mode: str
    reason: str
    attention: str | None = None  # the packed rows' attention (packed mode)

    def describe(self) -> str:
        if self.mode == "packed":
            return f"packed rows, attention {self.attention} ({self.reason})"
        if self.mode == "bucketed":
            return f"length-bucketed padded micro-batches ({self.reason})"
        return f"padded batches ({self.reason})"


def normalize_setting(value) -> str:
    """``packed=true`` / ``false`` as YAML or OmegaConf hand them over (booleans, or their str())."""
    text = str(value).lower()
    return {"1": "true", "0": "false", "yes": "true", "no": "false", "on": "true", "off": "false"}.get(text, text)


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def first_id(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _probe_lengths(model) -> list[int]:
    """A few lengths, and one past the sliding window where the model has a short one."""
    config = text_config(model)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    lengths = [n for n in PROBE_LENGTHS if n <= longest]
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window + 8 <= min(longest, 1024):
        lengths.append(window + 8)
    return lengths


def _probe_batch(model, special_ids, generator) -> dict:
    config = text_config(model)
    vocab = model.get_input_embeddings().num_embeddings
    pad, eos = first_id(config.pad_token_id), first_id(getattr(config, "eos_token_id", None))
    excluded = {i for i in (pad, eos, first_id(getattr(config, "bos_token_id", None)), *special_ids) if i is not None}
    lengths = _probe_lengths(model)
    if pad is None:
        raise PackingUnsupported("the model config has no pad_token_id (its padded forward cannot batch)")
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, vocab, (n,), generator=generator)
        for k in range(n):  # ordinary tokens only (pad inside a sequence would change what the padded head reads)
            while int(tokens[k]) in excluded:
                tokens[k] = int(torch.randint(0, vocab, (1,), generator=generator))
        if eos is not None:
            tokens[-1] = eos  # as every fastrm sequence ends
        ids[row, :n], mask[row, :n] = tokens, 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@contextlib.contextmanager
def _capture_embeddings(model):
    """The input embeddings of every forward, as leaves that gradients can be taken to."""
    captured = []

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _probe_outputs(model, kind: str, batch: dict, packed: bool, weights: dict):
    """Hidden states of the real tokens, the kind's output, and the gradient of a fixed random function of
    both with respect to the input embeddings (real tokens), for a padded or packed batch."""
    from fastrm.models import backbone_hidden, base_model, reward_scores, token_logprobs

    inputs = pack(batch) if packed else batch
    real = batch["attention_mask"].reshape(-1) != 0
    with _capture_embeddings(model) as captured:
        hidden = backbone_hidden(base_model(model), inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        hidden = hidden if packed else hidden[real]
        if kind == "reward":  # padded: the Hugging Face model's own forward, as any tool scores the checkpoint
            out = reward_scores(model, inputs)
        elif kind == "causal_lm":
            out = token_logprobs(model, inputs)
            out = unpack(out, inputs) if packed else out
        else:
            out = hidden.new_zeros(())
        weights.setdefault("hidden", torch.randn(hidden.shape, generator=weights["generator"]).to(hidden))
        weights.setdefault("out", torch.randn(out.shape, generator=weights["generator"]).to(out))
        loss = (hidden.float() * weights["hidden"].float()).sum() + (out.float() * weights["out"].float()).sum()
        grads = torch.autograd.grad(loss, captured)
    grad = sum(g.reshape(-1, g.shape[-1]) if packed else g.reshape(-1, g.shape[-1])[real] for g in grads)
    return {"hidden states": hidden.detach(), "outputs": out.detach(), "input gradients": grad}


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _float64_castable(model) -> bool:
    params = list(model.parameters())
    if not all(type(p) is nn.Parameter and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               for p in params) or base_attention(model) in FLASH:
        return False
    device = params[0].device
    if device.type == "cuda":  # a float64 copy of a large model would not fit beside it: compare with padded
        extra = sum(p.numel() * (8 - p.element_size()) for p in params)
        return extra < 0.5 * torch.cuda.mem_get_info(device)[0]
    return True


@contextlib.contextmanager
def _in_float64(model):
    """The model's floating parameters and buffers in float64 for the block, each back to its own dtype after
    (float16/bfloat16/float32 -> float64 -> back is exact; tied weights are one tensor and stay tied)."""
    saved = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    saved.setdefault((id(module), id(store), name), (store, name, tensor.dtype))
    try:
        model.to(torch.float64)
        yield
    finally:
        for store, name, dtype in saved.values():
            tensor = store[name]
            if tensor.dtype != dtype:
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    store[name] = tensor.to(dtype)


def _layers(model) -> int:
    config = text_config(model)
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1)


@dataclass
class ProbeResult:
    """One probe run: the packed forward's distance from the truth, what was allowed, and how that was derived."""

    error: float  # the largest relative distance of the packed run, over hidden states, outputs, input gradients
    tolerance: float  # what it was allowed, for that quantity
    worst: str  # the quantity where packed was furthest beyond its tolerance
    basis: str  # how the tolerance came about, for the log

    @property
    def exact(self) -> bool:
        return self.error <= self.tolerance


def _judge(packed: dict, padded: dict, truth: dict | None, dtype: torch.dtype, layers: int) -> ProbeResult:
    ulp = torch.finfo(dtype).eps
    if truth is None:
        tol = ulp * PROBE_FALLBACK_ULPS_PER_LAYER * layers
        diffs = {name: _relative_difference(packed[name], padded[name]) for name in padded}
        worst = max(diffs, key=diffs.get)
        return ProbeResult(diffs[worst], tol, worst, f"vs padded; tolerance {PROBE_FALLBACK_ULPS_PER_LAYER} "
                                                     f"{str(dtype)[6:]} ulps x {layers} layers = {tol:.2g}")
    results = []
    for name in truth:
        padded_error = _relative_difference(padded[name], truth[name])
        tol = PROBE_FACTOR * max(padded_error, PROBE_FLOOR_ULPS * ulp)
        results.append(ProbeResult(_relative_difference(packed[name], truth[name]), tol, name,
                                   f"vs float64; padded {str(dtype)[6:]} is {padded_error:.2g} from it, "
                                   f"tolerance {PROBE_FACTOR:g}x that = {tol:.2g}"))
    return max(results, key=lambda r: r.error / r.tolerance)


def _probe(model, kind: str, special_ids, autocast_dtype) -> ProbeResult:
    """Packed vs padded (and vs the padded forward in float64 where it can run)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(20240611)
    batch = {k: v.to(device) for k, v in _probe_batch(model, special_ids, generator).items()}
    weights = {"generator": generator}
    was_training = model.training
    model.eval()  # no dropout: both ways must compute the same function
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # every length its own attention bucket: the probe runs the gather / scatter of long-tailed batches too
    overhead = _ATTENTION_BUCKET_OVERHEAD.set(0)
    truth = None
    try:
        with torch.enable_grad(), count_varlen_calls() as calls:
            with autocast:
                want = _probe_outputs(model, kind, batch, False, weights)
                calls.clear()
                got = _probe_outputs(model, kind, batch, True, weights)
            seen = list(calls)
            if _float64_castable(model):
                try:
                    with _in_float64(model):
                        truth = _probe_outputs(model, kind, batch, False, weights)
                    if not all(bool(t.isfinite().all()) for t in truth.values()):
                        log.debug("packing probe: the float64 forward is not finite; comparing with padded directly")
                        truth = None
                except Exception as err:  # noqa: BLE001 - out of memory, a kernel refusing float64 or non-finite
                    # logits (a float64 mask of finfo.min summed twice gives -inf rows, NaN through 0 * value)
                    log.debug("packing probe: no float64 forward (%s); comparing with padded directly", err)
                    truth = None
    finally:
        model.train(was_training)
        _ATTENTION_BUCKET_OVERHEAD.reset(overhead)
    if base_attention(model) not in FLASH and not seen:
        raise PackingUnsupported("its attention layers never received the packed row's sequence boundaries (they do "
                                 "not go through transformers' attention interface)")
    dtype = autocast_dtype or next(model.parameters()).dtype
    return _judge(got, want, truth, dtype, _layers(model))


def verify_packing(model, kind: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether packed rows are exact for ``model`` (``kind``: reward | causal_lm | backbone), and why.

    Switches the model to variable-length attention (:func:`enable_varlen`), then runs a probe: a few random
    sequences of different lengths ending in EOS, padded and packed, in eval mode; the hidden states of every
    real token, the kind's output (reward scores as the Hugging Face forward reads them / next-token
    log-probs) and the gradients with respect to the input embeddings are compared with the padded forward
    recomputed in float64: packed may be no further from it than ``PROBE_FACTOR`` times the padded forward in
    the working dtype is (the model's own rounding at its depth), and every attention layer must have attended
    per sequence. With ``autocast_dtype`` the probe also runs under autocast, as training will (the
    half-precision kernels). Not exact: the model gets its own attention back and the reason is returned."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        enable_varlen(model)
        checks = [None] + ([autocast_dtype] if autocast_dtype is not None else [])
        summary = []
        for dtype in checks:
            result = _probe(model, kind, special_ids, dtype)
            where = f" under {str(dtype)[6:]} autocast" if dtype is not None else ""
            if not result.exact:
                raise PackingUnsupported(f"packed {result.worst} differ from padded{where}: {result.error:.2g} "
                                         f"(relative) {result.basis}")
            summary.append(f"{result.error:.1g}{where} ({result.worst} {result.basis})")
    except PackingUnsupported as err:
        disable_varlen(model)
        return False, str(err)
    except Exception as err:  # noqa: BLE001 - any failure of the packed forward means: not for this model
        disable_varlen(model)
        return False, f"the packed forward fails ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
    return True, f"probe: packed equals padded, max relative difference {', '.join(summary)}"


def choose_packing(model, setting: str, kind: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None,
                   name: str = "model") -> Packing:
    """The load-time decision for one model (``setting``: auto | true | bucketed | false), logged in one line.

    auto: packed rows where :func:`verify_packing` proves them exact, else length-bucketed padded batches (exact
    for every model). true: packed rows, and a ``ConfigError`` naming the reason where they are not exact."""
    setting = normalize_setting(setting)
    if setting not in SETTINGS:
        raise ValueError(f"setting packed={setting!r}: must be one of {', '.join(SETTINGS)}")
    label = f"{name} {type(model).__name__}"
    if setting == "false":
        decision = Packing("padded", "packed=false")
    elif setting == "bucketed":
        decision = Packing("bucketed", "packed=bucketed")
    else:
        exact, why = verify_packing(model, kind, special_ids=special_ids, autocast_dtype=autocast_dtype)
        if exact:
            device = next(model.parameters()).device
            half = autocast_dtype is not None or next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
            decision = Packing("packed", why, attention_path(model, device, half))
        elif setting == "true":
            from fastrm.config import ConfigError

            raise ConfigError(f"setting packed=true: packing is not exact for {label}: {why}. Use packed=auto "
                              "(length-bucketed batches where packing is not exact) or packed=bucketed")
        else:
            decision = Packing("bucketed", f"packing is not exact for {type(model).__name__}: {why}")
    log.info("packing (%s): %s", label, decision.describe())
    return decision
