"""Batched sampling with the Hugging Face ``generate`` API (KV cache), prompts left-padded."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import torch

from fastrm.tokenization import sequence_template

log = logging.getLogger("fastrm")


def encode_prompts(tokenizer, prompts: list[str], device) -> dict:
    """Left-padded ``input_ids`` / ``attention_mask``: each prompt after the head of the tokenizer's
    :class:`~fastrm.data.SequenceTemplate` (BOS if it adds one; a prompt whose text already starts with it, as
    chat templates write it, keeps one), as the data layer lays out a training sequence's prompt."""
    ids = prompt_token_ids(tokenizer, prompts)
    length = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, length - len(x):] = torch.tensor(x, dtype=torch.long)
        attention_mask[i, length - len(x):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def prompt_token_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's token ids as the policy reads them: the head of the tokenizer's
    :class:`~fastrm.data.SequenceTemplate`, then the prompt's own tokens."""
    template = sequence_template(tokenizer)
    return [list(template.head) + template.strip(tokenizer(p, add_special_tokens=False)["input_ids"], [])[0]
            for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, do_sample: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, min_new_tokens: int = 0,
             synced_gpus: bool = False, return_logprobs: bool = False, engine: str = "fastrm") -> dict:
    """Sample completions. Returns ``prompt_ids`` [N, P] (left-padded), ``completion_ids`` [N, C]
    (right-padded with pad after EOS), ``completion_mask`` [N, C] (1 up to and including EOS).

    ``engine``: ``fastrm`` (:func:`decode`: each prompt prefilled once, then a decode loop that applies only the
    temperature, top-p and ``min_new_tokens``), or ``hf`` (the model's own ``generate`` with those settings and
    top-k off). ``fastrm`` falls back to ``hf`` where it cannot run (see :func:`decode`) and under ``synced_gpus``.

    ``synced_gpus``: keep stepping until every rank is done (FSDP: each forward is a collective, so a rank
    whose sequences all ended early must still join the others' forwards).

    ``return_logprobs``: also ``sampler_logprobs`` [N, C] float32, the log-probability of each sampled token
    under the distribution it was sampled from (log-softmax of the processed logits: after the temperature and
    top-p), 0 after EOS."""
    if engine not in ("fastrm", "hf"):
        raise ValueError(f"engine={engine!r}: expected 'fastrm' or 'hf'")
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, device)
    sampling = Sampling(do_sample, temperature, top_p, min_new_tokens, _token_ids(tokenizer.eos_token_id),
                        tokenizer.pad_token_id)
    with prepacked_linears(model):
        out = None
        if engine == "fastrm" and not synced_gpus:
            out = decode(model, enc, num_return_sequences, max_new_tokens, sampling, return_logprobs=return_logprobs)
        if out is None:
            out = _hf_generate(model, enc, num_return_sequences, max_new_tokens, sampling, synced_gpus,
                               return_logprobs)
    completion, logprobs = out
    is_eos = torch.isin(completion, sampling.eos.to(completion.device))
    # 1 up to and including the first EOS, 0 after it.
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    completion = completion.masked_fill(after_eos, tokenizer.pad_token_id)
    prompt_ids = enc["input_ids"].repeat_interleave(num_return_sequences, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_return_sequences, 0)
    result = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": completion_mask}
    if return_logprobs:
        result["sampler_logprobs"] = torch.where(completion_mask != 0, logprobs, 0.0)
    return result


def _token_ids(ids) -> torch.Tensor:
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return torch.tensor(ids, dtype=torch.long)


def _hf_generate(model, enc: dict, copies: int, max_new_tokens: int, sampling: "Sampling", synced_gpus: bool,
                 return_logprobs: bool):
    """``(completion ids, sampler log-probs or None)`` from the model's own ``generate``; each prompt is
    prefilled once (:func:`shared_prefill`) where its cache can be repeated."""
    kwargs = {"do_sample": sampling.do_sample, "max_new_tokens": max_new_tokens, "num_return_sequences": copies,
              "pad_token_id": sampling.pad, "eos_token_id": sampling.eos.tolist() or None, "use_cache": True,
              "synced_gpus": synced_gpus, "min_new_tokens": sampling.min_new_tokens}
    if sampling.do_sample:
        # remove_invalid_values: a diverged policy's NaN/inf logits would stop sampling with an error (a device-side
        # assert on CUDA) before the trainer's divergence guard sees them; replaced, the rollout completes and the
        # guard stops the step on its non-finite log-probs. Finite logits sample exactly as without it.
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, remove_invalid_values=True)
    if return_logprobs:
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    cache = shared_prefill(model, enc, copies) if copies > 1 and not synced_gpus else None
    if cache is not None:  # each prompt prefilled once; its samples start from copies of its cache
        enc = {k: v.repeat_interleave(copies, 0) for k, v in enc.items()}
        out = model.generate(**enc, **{**kwargs, "num_return_sequences": 1, _cache_keyword(model): cache})
    else:
        out = model.generate(**enc, **kwargs)
    sequences = out.sequences if return_logprobs else out
    completion = sequences[:, enc["input_ids"].shape[1]:]
    if not return_logprobs:
        return completion, None
    return completion, sampled_logprobs(out.scores, completion)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from a step's logits (the same settings in both engines)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    eos: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pad: int | None = None

    def next_token(self, logits: torch.Tensor, step: int, logprobs: bool = True):
        """The token each row takes after these ``[N, V]`` logits, and its log-probability under the distribution
        it was drawn from (after the temperature and top-p; the greedy choice's under the raw logits, None unless
        ``logprobs``)."""
        scores = logits.float()
        if step < self.min_new_tokens and self.eos.numel():
            scores[:, self.eos.to(scores.device)] = -math.inf  # (the forward's output: free to overwrite)
        if not self.do_sample:
            token = scores.argmax(-1, keepdim=True)
            return token.squeeze(1), (scores.log_softmax(-1).gather(1, token).squeeze(1) if logprobs else None)
        temperature = self.temperature
        if self.top_p < 1.0:
            scores, temperature = _top_p(scores / temperature, self.top_p), 1.0
        return sample_categorical(scores, temperature)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most ``1 - top_p`` (the most
    likely token always stays), as transformers' ``TopPLogitsWarper``."""
    ascending, order = scores.sort(-1)
    drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), -math.inf)


_BLOCK = 1024


def sample_categorical(scores: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``softmax(scores / temperature)``, and its log-probability (float32).

    By inverting the CDF with one uniform number per row, two levels deep: the row's weights summed in float64
    blocks of 1024, a block drawn from their cumulative sums, then a token from the block's. ``torch.multinomial``
    draws an exponential number per vocabulary entry instead, 16 x 49k of them a step in a SmolLM2 rollout, a
    visible part of a CPU decode step. A token of probability 0 (masked: -inf) has an empty interval and is never drawn.
    Non-finite logits (a diverged policy) still give a token in range, and a non-finite log-prob that the trainer's
    divergence guard reports."""
    rows, vocab = scores.shape
    top = scores.amax(-1, keepdim=True)
    weights = ((scores - top) / temperature).exp_() if temperature != 1.0 else (scores - top).exp_()
    full = vocab // _BLOCK * _BLOCK
    sums = weights[:, :full].reshape(rows, -1, _BLOCK).sum(-1, dtype=torch.float64)
    if full < vocab:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True, dtype=torch.float64)], 1)
    cdf = sums.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(rows, 1, dtype=torch.float64, device=scores.device) * total
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp_(min=0)), 0.0)
    index = block * _BLOCK + torch.arange(_BLOCK, device=scores.device)
    inside = index < vocab
    local = torch.where(inside, weights.gather(1, index.clamp(max=vocab - 1)), 0.0).double()
    # u - before >= 0 exactly (u >= before); past the block's last token only by rounding: its last nonzero token
    offset = torch.searchsorted(local.cumsum(-1), u - before, right=True)
    last = (torch.arange(_BLOCK, device=scores.device) * (local > 0)).amax(-1, keepdim=True)
    token = (block * _BLOCK + torch.minimum(offset, last)).squeeze(1)
    logprob = (scores.gather(1, token[:, None]) - top).squeeze(1) / temperature - total.squeeze(1).log().float()
    return token, logprob


@torch.no_grad()
def decode(model, enc: dict, copies: int, max_new_tokens: int, sampling: Sampling, *, return_logprobs: bool = False,
           prefill=None):
    """fastrm's sampling loop: ``(completion ids [N, C], sampler log-probs [N, C] or None)`` for ``copies``
    samples of each left-padded prompt of ``enc``, or None where this model cannot run it (no KV cache to build and
    repeat, an encoder-decoder, a forward without ``logits_to_keep``); C stops early once every row has ended.

    Each prompt is prefilled once (``prefill``, :func:`shared_prefill` by default); then one forward per token on
    the model's own cache, logits of the last position only. Unlike ``generate``, no logits processor runs but the
    temperature, top-p and ``min_new_tokens`` (:class:`Sampling`): the model's ``generation_config`` (repetition
    penalty, top-k, ...) would make the sampled distribution differ from the policy whose log-probs train it."""
    params = _forward_parameters(model)
    checkpointed = model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if "logits_to_keep" not in params or checkpointed:
        return None  # (a checkpointed model in training mode drops its cache: generate recomputes instead)
    cache = (prefill or shared_prefill)(model, enc, copies)
    if cache is None:
        return None
    reserve(cache, max_new_tokens)
    ids = enc["input_ids"].repeat_interleave(copies, 0)
    mask = enc["attention_mask"].repeat_interleave(copies, 0)
    # positions counting each row's real tokens from 0 (left padding), as generate makes them
    position = mask.long().sum(1, keepdim=True) - 1
    tokens, live = ids[:, -1:], torch.arange(ids.shape[0], device=ids.device)  # live: the rows in the cache
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)  # of the live rows: past their EOS
    eos = sampling.eos.to(ids.device)
    completion = torch.full((ids.shape[0], max_new_tokens), 0 if sampling.pad is None else sampling.pad,
                            dtype=ids.dtype, device=ids.device)
    logprobs = torch.zeros(completion.shape, device=ids.device) if return_logprobs else None
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
    for step in range(max_new_tokens):
        if "position_ids" in params:
            kwargs["position_ids"] = position
        logits = model(input_ids=tokens, attention_mask=mask, **kwargs).logits[:, -1]
        token, logprob = sampling.next_token(logits, step, return_logprobs)
        if sampling.pad is not None:  # a row past its EOS takes pad, as generate gives it
            token = token.masked_fill(done, sampling.pad)
        completion[live, step] = token
        if return_logprobs:
            logprobs[live, step] = logprob
        if step == 0 and cache.get_seq_length() != ids.shape[1]:
            raise RuntimeError(f"{type(model).__name__} did not extend its KV cache in decode (holds "
                               f"{cache.get_seq_length()} positions, expected {ids.shape[1]}): run generation=hf")
        done |= torch.isin(token, eos)
        left = int((~done).sum())
        if step + 1 == max_new_tokens or left == 0:
            return completion[:, :step + 1], (logprobs[:, :step + 1] if return_logprobs else None)
        tokens, position = token[:, None], position + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        if left <= done.numel() // 2 and hasattr(cache, "batch_select_indices"):
            # half the rows have ended: go on with the others only (a copy of the cache, then each step costs
            # what the rows left cost; finished rows of a smaller share stay, their tokens overwritten by pad)
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            reserve(cache, max_new_tokens - step - 1)
            tokens, position, mask, live, done = tokens[keep], position[keep], mask[keep], live[keep], done[keep]
    raise AssertionError("unreachable")  # (max_new_tokens >= 1: the loop returns)


def reserve(cache, tokens: int) -> int:
    """Room for ``tokens`` more positions in each full-attention layer of a transformers ``DynamicCache``, so that
    a decode step writes its keys and values in place: ``DynamicLayer`` concatenates, copying the whole cache of
    every layer at every token (on a CPU, a cost of the order of the step's matmuls; together with
    :func:`sample_categorical`, ``fastrm bench generation`` measures the loop against ``generate``). The layers' keys and values stay what they were, views of the larger buffers; a layer
    whose tensors something else replaced (a reorder, a crop) concatenates again. Sliding-window layers keep their
    own update. Returns how many layers it reserved."""
    layer_type = _reserved_layer_type()
    count = 0
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if (type(layer) not in (layer_type, layer_type.__base__) or not getattr(layer, "is_initialized", False)
                or not isinstance(keys, torch.Tensor) or keys.dim() != 4 or values.dim() != 4):
            continue
        buffers = []
        for x in (keys, values):
            buffer = x.new_empty(*x.shape[:2], x.shape[2] + tokens, x.shape[3])
            buffer[:, :, :x.shape[2]].copy_(x)
            buffers.append(buffer)
        layer.__class__ = layer_type
        layer.fastrm_buffers = tuple(buffers)
        layer.keys, layer.values = (b[:, :, :x.shape[2]] for b, x in zip(buffers, (keys, values)))
        count += 1
    return count


@functools.cache
def _reserved_layer_type():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new positions into room reserved by :func:`reserve`."""

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = self.fastrm_buffers
            length, new = self.keys.shape[2], key_states.shape[2]
            if (self.keys.data_ptr() != keys.data_ptr() or self.values.data_ptr() != values.data_ptr()
                    or self.keys.shape[:2] != keys.shape[:2] or length + new > keys.shape[2]):
                return super().update(key_states, value_states, *args, **kwargs)
            keys[:, :, length:length + new].copy_(key_states)
            values[:, :, length:length + new].copy_(value_states)
            self.keys, self.values = keys[:, :, :length + new], values[:, :, :length + new]
            return self.keys, self.values

    return ReservedLayer


def _forward_parameters(model) -> set[str]:
    import inspect

    forward = getattr(getattr(model, "get_base_model", lambda: model)(), "forward", None)
    try:
        return set(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return set()


def _prepackable(module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and type(weight) is torch.nn.Parameter and type(weight.data) is torch.Tensor
            and weight.dtype == torch.float32 and weight.device.type == "cpu")


@contextlib.contextmanager
def prepacked_linears(model, rows_hint: int = 16):
    """Within: on a CPU in float32 (no autocast), every plain ``nn.Linear`` of ``model`` multiplies by a oneDNN
    copy of its weight packed for small batches. Decoding multiplies a few rows by every weight once per token, and
    MKL's GEMM reads the weights at about half the bandwidth oneDNN's packed kernel does: on SmolLM2-135M, 16 rows x
    48 tokens sample in 5.2 s instead of 7.1 s (``fastrm bench vs-trl``'s generate phase). The copies (one model's
    weights) live for the block only.
    Checked once per call on the first layer (packed vs plain within K float32 roundings of a K-term dot product,
    the worst-case bound); anything else (CUDA, half precision, quantized or sharded weights, no oneDNN) runs as is."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    layers = [m for m in model.modules() if _prepackable(m)]
    if (not layers or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu")
            or not hasattr(mkldnn, "_reorder_linear_weight")):
        yield
        return
    patched = []  # (layer, the instance forward it had: another wrapper's, or None)
    try:
        for layer in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows_hint)
            patched.append((layer, layer.__dict__.get("forward")))
            layer.forward = functools.partial(_packed_linear, packed=packed, bias=layer.bias)
        probe = layers[0]
        x = torch.randn(3, probe.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = probe(x), torch.nn.functional.linear(x, probe.weight, probe.bias)
        bound = probe.in_features * torch.finfo(torch.float32).eps * (x.abs() @ probe.weight.abs().T).max()
        if not bool((got - want).abs().max() <= bound):
            raise RuntimeError(f"oneDNN packed linear differs from F.linear by {(got - want).abs().max():.3g}")
    except Exception as err:  # noqa: BLE001 - this build's oneDNN op refuses or differs: the plain path
        log.debug("prepacked linears not used: %s", err)
        _unpatch(patched)
        yield
        return
    try:
        yield
    finally:
        _unpatch(patched)


def _unpatch(patched):
    for layer, previous in patched:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous


def _packed_linear(x, packed, bias):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def shared_prefill(model, enc: dict, copies: int):
    """The KV cache of every prompt but its last token, computed once per prompt and repeated ``copies`` times
    (``generate`` with ``num_return_sequences`` would prefill each prompt once per sample); ``generate`` then
    starts each sample from its prompt's last token. None where this model's cache cannot be built or repeated
    here (``generate`` then prefills as usual)."""
    from transformers import DynamicCache

    ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids.shape[1] < 2 or not hasattr(DynamicCache, "batch_repeat_interleave"):
        return None
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    cache = DynamicCache(config=config)
    # position ids as generate makes them for left-padded prompts: counting the real tokens from 0
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          use_cache=True, logits_to_keep=1, **{_cache_keyword(model): cache})
    cache.batch_repeat_interleave(copies)
    return cache


def _cache_keyword(model) -> str:
    """``cache`` (transformers >= 5.2x's name for the KV cache argument), or ``past_key_values`` before it."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def sampled_logprobs(scores, tokens: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` float32 log-probs of ``tokens`` under ``scores`` (C processed-logit tensors [N, V], one per
    step, as ``generate(output_scores=True)`` returns them; :func:`generate` zeroes them after EOS). One step at a
    time: no [N, C, V] tensor."""
    if len(scores) != tokens.shape[1]:
        raise ValueError(f"{len(scores)} score tensors for {tokens.shape[1]} generated positions")
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, step in enumerate(scores):
        out[:, t] = torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
    return out


def decode_completions(tokenizer, completion_ids, completion_mask) -> list[str]:
    texts = []
    for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def generate_completions(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    out = generate(model, tokenizer, prompts, **kwargs)
    return decode_completions(tokenizer, out["completion_ids"], out["completion_mask"])
