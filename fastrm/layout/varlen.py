"""Variable-length attention: every attention layer of a Hugging Face model attends within each sequence of a
packed row only (:class:`fastrm.layout.PackedBatch`), without an ``[S, S]`` mask.

Per call: **flash-attn varlen** when the model runs transformers' ``flash_attention_2``; else on CUDA in
bf16/fp16 **torch's varlen_attn** (``torch.nn.attention.varlen``, torch >= 2.9); else the model's own SDPA / eager
attention **per length bucket**: the sequences of one bucket gathered into a small padded ``[n, L]`` block (``L``
its longest), so the attention costs what each sequence alone costs plus a little padding. fastrm registers its
attention with transformers' attention interface (:func:`enable_varlen`); whether that is exact for a model is
decided at load time by :func:`fastrm.packing.choose_packing`.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from fastrm.layout.lengths import length_buckets

PREFIX = "fastrm_varlen_"  # transformers attention implementations registered here: PREFIX + the model's own
WRAPPABLE = ("sdpa", "eager")
FLASH = ("flash_attention_2", "flash_attention_3")
PLAN_KWARG = "fastrm_varlen"  # the keyword that carries a VarlenPlan down to every attention call
# A boundary between attention buckets is worth it when it saves more than this many attention scores (the cost of
# one more SDPA call).
ATTENTION_BUCKET_OVERHEAD = 64 * 64 * 8

_SKIP_MASKS = contextvars.ContextVar("fastrm_skip_masks", default=False)
_VARLEN_CALLS = contextvars.ContextVar("fastrm_varlen_calls", default=None)
_ATTENTION_BUCKET_OVERHEAD = contextvars.ContextVar("fastrm_attention_bucket_overhead", default=None)


class PackingUnsupported(RuntimeError):
    """This model cannot run packed rows exactly; the message says why."""


def text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def first_id(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


@contextlib.contextmanager
def attention_bucket_overhead(value: float):
    """Within: attention buckets split at ``value`` scores saved (0: every length its own bucket)."""
    token = _ATTENTION_BUCKET_OVERHEAD.set(value)
    try:
        yield
    finally:
        _ATTENTION_BUCKET_OVERHEAD.reset(token)


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
    def from_cu_seq_lens(cls, cu: torch.Tensor) -> VarlenPlan:
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


@dataclass
class SharedPlan:
    """The segments of a packed row whose sequences share prefixes (:class:`fastrm.layout.SharedPrefixBatch`):
    segment ``s`` is the row's tokens ``[starts[s], starts[s] + lengths[s])``; it attends causally to itself and to
    every token of its prefix, the row's tokens ``[prefix_starts[s], prefix_starts[s] + prefix_lengths[s])``
    (``prefix_lengths[s]`` 0: a shared prefix itself, or a sequence alone). Each bucket gathers segments of similar
    length into a small padded block ``[n, L]`` whose keys are ``[prefix | own tokens]``: a response pays for its
    prompt's keys, never for its prompt's queries."""

    starts: list[int]
    lengths: list[int]
    prefix_starts: list[int]
    prefix_lengths: list[int]
    device: torch.device | str = "cpu"
    bucket_overhead: float = ATTENTION_BUCKET_OVERHEAD
    _buckets: list | None = field(default=None, repr=False)
    _inverse: torch.Tensor | None = field(default=None, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def buckets(self) -> tuple[list, torch.Tensor]:
        """``[(queries [n, Lq], keys [n, Lk], valid, allowed [n, Lq, Lk] or None for plain causal, distance
        [n, Lq, Lk] from each key's position to the query's, real [n, Lq])]`` and the permutation from the buckets' real query
        slots back to the row's order."""
        if self._buckets is not None:
            return self._buckets, self._inverse
        device = self.device
        self._buckets, order = [], []
        overhead = self.bucket_overhead if _ATTENTION_BUCKET_OVERHEAD.get() is None else _ATTENTION_BUCKET_OVERHEAD.get()
        # Segments with a prefix and without are bucketed apart: a prompt's own block has no prefix keys to pad.
        for has_prefix in (False, True):
            members = [s for s in range(len(self.lengths)) if (self.prefix_lengths[s] > 0) == has_prefix]
            if not members:
                continue
            for group in length_buckets([self.lengths[s] for s in members], overhead, power=2):
                segs = [members[i] for i in group]
                n = torch.tensor([self.lengths[s] for s in segs], device=device)
                start = torch.tensor([self.starts[s] for s in segs], device=device)
                steps = torch.arange(int(n.max()), device=device)
                queries = start.unsqueeze(1) + torch.minimum(steps.unsqueeze(0), (n - 1).unsqueeze(1))
                real = steps.unsqueeze(0) < n.unsqueeze(1)
                allowed = None
                keys = queries
                if has_prefix:
                    p = torch.tensor([self.prefix_lengths[s] for s in segs], device=device)
                    p_start = torch.tensor([self.prefix_starts[s] for s in segs], device=device)
                    p_steps = torch.arange(int(p.max()), device=device)
                    prefix_keys = p_start.unsqueeze(1) + torch.minimum(p_steps.unsqueeze(0), (p - 1).unsqueeze(1))
                    keys = torch.cat([prefix_keys, queries], dim=1)
                    own = (steps.view(1, 1, -1) <= steps.view(1, -1, 1)) & real.unsqueeze(1)  # [n, Lq, Lq]
                    in_prefix = (p_steps.view(1, -1) < p.view(-1, 1)).unsqueeze(1).expand(-1, len(steps), -1)
                    allowed = torch.cat([in_prefix, own], dim=2)  # [n, Lq, Lp + Lq]
                    # positions: the prefix's from 0, each segment's own continuing after its prefix
                    q_pos = p.view(-1, 1) + steps.view(1, -1)
                    k_pos = torch.cat([p_steps.view(1, -1).expand(len(segs), -1), q_pos], dim=1)
                    distance = q_pos.unsqueeze(2) - k_pos.unsqueeze(1)  # [n, Lq, Lk], >= 0 where allowed
                else:
                    distance = (steps.view(1, -1, 1) - steps.view(1, 1, -1)).expand(len(segs), -1, -1)
                valid = real.reshape(-1).nonzero().squeeze(1)
                self._buckets.append((queries, keys, valid, allowed, distance, real))
                order.append(queries.reshape(-1)[valid])
        order = torch.cat(order)
        self._inverse = torch.empty_like(order)
        self._inverse[order] = torch.arange(order.numel(), device=device)
        return self._buckets, self._inverse

    def _mask(self, k: int, allowed, distance, real, window: int | None, dtype: torch.dtype | None):
        """Bucket ``k``'s mask for its base function: boolean (SDPA; None for plain causal) or additive (eager);
        with transformers' sliding ``window``, the last ``window`` positions only, the query's own included."""
        key = (k, window, dtype)
        if key not in self._masks:
            if allowed is None:
                if dtype is None and window is None:
                    self._masks[key] = None
                    return None
                allowed = distance >= 0
            if window is not None:
                allowed = allowed & (distance < window)
            # a padding query slot (its output is dropped) attends to every key: a fully masked row would be NaN
            # (SDPA), or -inf through an eager float32 softmax, and NaN poisons the real rows' gradients
            allowed = allowed | ~real.unsqueeze(2)
            mask = allowed.unsqueeze(1)
            if dtype is not None:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
            self._masks[key] = mask
        return self._masks[key]

    def attend(self, base: str, base_fn, module, query, key, value, kwargs: dict):
        """The model's own attention function on every bucket; the row's output ``[1, S, heads, d]``."""
        buckets, inverse = self.buckets()
        q_all, k_all, v_all = (x[0].transpose(0, 1) for x in (query, key, value))  # [S, heads, d]
        outs = []
        window = kwargs.get("sliding_window")
        for k, (queries, keys, valid, allowed, distance, real) in enumerate(buckets):
            q = q_all[queries].transpose(1, 2)  # [n, heads, Lq, d]
            kk, v = (x[keys].transpose(1, 2) for x in (k_all, v_all))  # [n, heads, Lk, d]
            mask = self._mask(k, allowed, distance, real, window, None if base == "sdpa" else query.dtype)
            out, _ = base_fn(module, q, kk, v, mask, **kwargs)  # [n, Lq, heads, d]
            outs.append(out.reshape(-1, *out.shape[2:])[valid])
        return torch.cat(outs)[inverse].unsqueeze(0), None


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


# Keywords a grouped SDPA call reproduces or may ignore; any other with a value goes to transformers' own function.
_GROUPED_SDPA_KWARGS = frozenset({"dropout", "scaling", "is_causal", "sliding_window", "position_ids", "use_cache",
                                  "output_attentions"})


def _grouped_sdpa(base_fn):
    """transformers' SDPA attention repeats a grouped-query model's keys and values once per query head whenever a
    mask is given (CUDA's kernels take no mask with ``enable_gqa``), and every bucket here has one. On a CPU, SDPA
    reads the grouped heads with a mask directly, bitwise equal and with no copies (tests/test_packing.py): that
    path, for the masked calls it covers; everything else runs ``base_fn``."""
    def attention(module, query, key, value, mask, **kwargs):
        groups = getattr(module, "num_key_value_groups", 1)
        if (query.device.type != "cpu" or mask is None or not isinstance(groups, int) or groups <= 1
                or query.shape[1] != key.shape[1] * groups or kwargs.get("output_attentions")
                or any(v is not None for k, v in kwargs.items() if k not in _GROUPED_SDPA_KWARGS)):
            return base_fn(module, query, key, value, mask, **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    return attention


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
        if base == "sdpa":
            base_fn = _grouped_sdpa(base_fn)
        total = plan.total if isinstance(plan, SharedPlan) else plan.cu_seq_lens[-1]
        if query.shape[0] != 1 or query.shape[2] != total:
            raise PackingUnsupported(f"{type(module).__name__}: a packed row of {int(total)} tokens "
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
        if isinstance(plan, SharedPlan):
            if not is_causal:
                raise PackingUnsupported(f"{type(module).__name__}: a shared prefix needs causal attention (a "
                                         "prompt must not see its responses)")
            kwargs["is_causal"] = True
            return plan.attend(base, base_fn, module, query, key, value, kwargs)
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


def packed_forward(module: nn.Module, row, *, plan: SharedPlan | None = None, **extra):
    """``module``'s output on a packed row (a :class:`fastrm.layout.PackedBatch`: ``input_ids``, ``position_ids``,
    ``cu_seq_lens``, ``max_length``), every sequence attending within itself only: a backbone's
    ``last_hidden_state`` ``[1, S, H]``, a model's ``logits``. The model must have :func:`enable_varlen`.
    ``plan``: the row's sequences share prefixes (a :class:`SharedPlan`; fastrm's attention only)."""
    impl = getattr(module.config, "_attn_implementation", None)
    inputs = {"input_ids": row.input_ids, "position_ids": row.position_ids, "use_cache": False, **extra}
    if plan is not None:
        if not (isinstance(impl, str) and impl.startswith(PREFIX)):
            raise PackingUnsupported(f"{type(module).__name__} runs attention {impl!r}: shared prefixes need "
                                     "fastrm's attention (sdpa or eager underneath)")
        inputs[PLAN_KWARG] = plan
    elif impl in FLASH:
        cu = row.cu_seq_lens.to(torch.int32)
        max_length = int(row.max_length or (cu[1:] - cu[:-1]).max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length)
    elif isinstance(impl, str) and impl.startswith(PREFIX):
        inputs[PLAN_KWARG] = VarlenPlan.from_cu_seq_lens(row.cu_seq_lens)
    else:
        raise PackingUnsupported(f"{type(module).__name__} runs attention {impl!r}: a packed row needs "
                                 "fastrm.layout.enable_varlen(model) (the trainers do it through "
                                 "fastrm.packing.choose_packing)")
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
