"""Batched sampling with the Hugging Face ``generate`` API (KV cache), prompts left-padded."""

from __future__ import annotations

import contextlib
import functools
import logging

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
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1,
             synced_gpus: bool = False, return_logprobs: bool = False) -> dict:
    """Sample completions. Returns ``prompt_ids`` [N, P] (left-padded), ``completion_ids`` [N, C]
    (right-padded with pad after EOS), ``completion_mask`` [N, C] (1 up to and including EOS).

    ``synced_gpus``: keep stepping until every rank is done (FSDP: each forward is a collective, so a rank
    whose sequences all ended early must still join the others' forwards).

    ``return_logprobs``: also ``sampler_logprobs`` [N, C] float32, the log-probability of each sampled token
    under the distribution it was sampled from: log-softmax of ``generate``'s processed scores (``output_scores``:
    after the temperature, top-p and every other logits processor), 0 after EOS. Costs one [N, V] float32 tensor
    per generated token, kept until generation ends (as HF keeps them)."""
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, device)
    kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "num_return_sequences": num_return_sequences,
              "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "use_cache": True,
              "synced_gpus": synced_gpus}
    if do_sample:
        # remove_invalid_values: a diverged policy's NaN/inf logits would stop sampling with an error (a device-side
        # assert on CUDA) before the trainer's divergence guard sees them; replaced, the rollout completes and the
        # guard stops the step on its non-finite log-probs. Finite logits sample exactly as without it.
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0, remove_invalid_values=True)
    if return_logprobs:
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    cache = None
    with prepacked_linears(model):
        if num_return_sequences > 1 and not synced_gpus:
            cache = shared_prefill(model, enc, num_return_sequences)
        if cache is not None:  # each prompt prefilled once; its samples start from copies of its cache
            enc = {k: v.repeat_interleave(num_return_sequences, 0) for k, v in enc.items()}
            out = model.generate(**enc, **{**kwargs, "num_return_sequences": 1, _cache_keyword(model): cache})
            enc = {k: v[::num_return_sequences] for k, v in enc.items()}
        else:
            out = model.generate(**enc, **kwargs)
    scores = out.scores if return_logprobs else None
    out = out.sequences if return_logprobs else out
    prompt_len = enc["input_ids"].shape[1]
    completion = out[:, prompt_len:]
    is_eos = completion == tokenizer.eos_token_id
    # 1 up to and including the first EOS, 0 after it.
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    completion_mask = (~after_eos).long()
    completion = completion.masked_fill(after_eos, tokenizer.pad_token_id)
    prompt_ids = enc["input_ids"].repeat_interleave(num_return_sequences, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_return_sequences, 0)
    result = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion,
              "completion_mask": completion_mask}
    if return_logprobs:
        result["sampler_logprobs"] = sampled_logprobs(scores, out[:, prompt_len:], completion_mask)
    return result


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
    import inspect

    forward = getattr(getattr(model, "get_base_model", lambda: model)(), "forward", None)
    try:
        return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def sampled_logprobs(scores, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` float32 log-probs of ``tokens`` under ``scores`` (C processed-logit tensors [N, V], one per
    step, as ``generate(output_scores=True)`` returns them), 0 where ``mask`` is 0. One step at a time: no
    [N, C, V] tensor."""
    if len(scores) != tokens.shape[1]:
        raise ValueError(f"{len(scores)} score tensors for {tokens.shape[1]} generated positions")
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, step in enumerate(scores):
        out[:, t] = torch.log_softmax(step.float(), dim=-1).gather(1, tokens[:, t:t + 1]).squeeze(1)
    return torch.where(mask != 0, out, 0.0)


def decode_completions(tokenizer, completion_ids, completion_mask) -> list[str]:
    texts = []
    for ids, mask in zip(completion_ids.tolist(), completion_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t != tokenizer.eos_token_id]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def generate_completions(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    out = generate(model, tokenizer, prompts, **kwargs)
    return decode_completions(tokenizer, out["completion_ids"], out["completion_mask"])
