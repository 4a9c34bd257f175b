"""fastrm.generation.prepacked_linears: the CPU float32 decode path on oneDNN-prepacked weights."""

import contextlib

import pytest
import torch

from fastrm import generation
from helpers import TINY_FAMILIES, tiny_model
from fastrm.tokenization import load_tokenizer


def _llama(vocab):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available()
                                  or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
                                  reason="this torch build has no oneDNN linear")


@needs_onednn
def test_prepacked_linears_compute_the_same_function_and_are_undone():
    model = _llama(100)
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with generation.prepacked_linears(model):
            assert all("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
            got = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    # float32 roundings of dot products of 64-128 terms, reordered, through two layers
    torch.testing.assert_close(got, want, rtol=0, atol=128 * torch.finfo(torch.float32).eps * want.abs().max().item())


@needs_onednn
def test_prepacked_linears_keep_another_wrapper_and_stand_aside_under_autocast():
    model = _llama(100)
    layer = model.lm_head
    wrapper = layer.forward
    layer.forward = wrapper  # an instance forward someone else set
    with generation.prepacked_linears(model):
        assert layer.forward is not wrapper
    assert layer.__dict__["forward"] is wrapper
    del layer.forward
    with torch.autocast("cpu", dtype=torch.bfloat16), generation.prepacked_linears(model):
        assert "forward" not in layer.__dict__  # autocast decides the matmul's precision: left alone


@needs_onednn
def test_generate_samples_as_without_prepacking(monkeypatch):
    tokenizer = load_tokenizer("embedded")
    model = _llama(len(tokenizer))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = ["1+2=", "13+4*7=", "7+7="]
    torch.manual_seed(3)
    got = generation.generate(model, tokenizer, prompts, max_new_tokens=8, num_return_sequences=2, return_logprobs=True)
    monkeypatch.setattr(generation, "prepacked_linears", lambda model: contextlib.nullcontext())
    torch.manual_seed(3)
    want = generation.generate(model, tokenizer, prompts, max_new_tokens=8, num_return_sequences=2,
                               return_logprobs=True)
    assert torch.equal(got["completion_ids"], want["completion_ids"])
    torch.testing.assert_close(got["sampler_logprobs"], want["sampler_logprobs"], rtol=0,
                               atol=256 * torch.finfo(torch.float32).eps)


# ---- fastrm's decode loop ----------------------------------------------------------------------------------------

EPS32 = torch.finfo(torch.float32).eps


def _causal_lm(name: str, vocab: int, tokenizer):
    torch.manual_seed(0)
    model = tiny_model(name, "causal_lm", vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    return model.float().eval()


PROMPTS = ["1+2=", "13+4*7=", "7+7=", "2*3*4*5+6="]  # of different lengths: left padding


@pytest.mark.parametrize("name", list(TINY_FAMILIES))
def test_greedy_decoding_chooses_what_generate_chooses(name):
    """Token for token, and the same log-probs (one forward per token in both, on the same cache kinds)."""
    tokenizer = load_tokenizer("embedded")
    model = _causal_lm(name, len(tokenizer), tokenizer)
    kwargs = dict(max_new_tokens=9, num_return_sequences=2, do_sample=False, return_logprobs=True)
    got = generation.generate(model, tokenizer, PROMPTS, engine="fastrm", **kwargs)
    want = generation.generate(model, tokenizer, PROMPTS, engine="hf", **kwargs)
    assert got["completion_ids"].shape[0] == 8
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(got[key], want[key]), key
    # float32 log-softmax over the vocabulary of the same logits, summed in another order at most
    torch.testing.assert_close(got["sampler_logprobs"], want["sampler_logprobs"], rtol=0,
                               atol=64 * EPS32 * (1 + want["sampler_logprobs"].abs().max().item()))


def _ends_early(tokenizer):
    """A Llama whose greedy choice is EOS wherever it would have chosen the token most rows choose mid-completion
    (that token's and EOS's rows of the LM head swapped), so rows end at different steps."""
    model = _causal_lm("llama", len(tokenizer), tokenizer)
    first = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=9, do_sample=False, engine="hf")
    rows_with = {}
    for t in first["completion_ids"][:, 1:6].unique().tolist():
        rows_with[t] = int((first["completion_ids"][:, 1:6] == t).any(1).sum())
    token = max(rows_with, key=rows_with.get)
    with torch.no_grad():
        head = model.lm_head.weight
        head[[token, tokenizer.eos_token_id]] = head[[tokenizer.eos_token_id, token]].clone()
    return model


def test_rows_end_at_eos_and_min_new_tokens_holds_it_off(monkeypatch):
    """Rows that ended take pad; once half of them have, the loop goes on with the others only (the cache's rows
    selected) and still chooses what generate chooses."""
    from transformers import DynamicCache

    tokenizer = load_tokenizer("embedded")
    model = _ends_early(tokenizer)
    selected = []
    real = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, i: selected.append(len(i)) or real(self, i))
    for min_new in (0, 6):
        selected.clear()
        kwargs = dict(max_new_tokens=9, do_sample=False, min_new_tokens=min_new, return_logprobs=True,
                      num_return_sequences=2)
        got = generation.generate(model, tokenizer, PROMPTS, engine="fastrm", **kwargs)
        want = generation.generate(model, tokenizer, PROMPTS, engine="hf", **kwargs)
        lengths = got["completion_mask"].sum(1)
        if min_new:
            assert lengths.min() >= min_new + 1, lengths
        else:
            assert (lengths < 8).sum() >= 4 and selected and selected[0] <= 4, (lengths, selected)
        for key in ("completion_ids", "completion_mask"):
            assert torch.equal(got[key], want[key]), (min_new, key)
        assert (got["completion_ids"][got["completion_mask"] == 0] == tokenizer.pad_token_id).all()
        assert (got["sampler_logprobs"][got["completion_mask"] == 0] == 0).all()
        torch.testing.assert_close(got["sampler_logprobs"], want["sampler_logprobs"], rtol=0,
                                   atol=64 * EPS32 * (1 + want["sampler_logprobs"].abs().max().item()))


def test_sampled_tokens_and_their_logprobs_are_the_policys_at_the_temperature_and_top_p():
    """A forward over prompt + completion gives the sampler's log-probs: log-softmax(logits / T) after top-p, and
    every sampled token lies in its step's nucleus."""
    tokenizer = load_tokenizer("embedded")
    model = _causal_lm("llama", len(tokenizer), tokenizer)
    torch.manual_seed(5)
    out = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=6, num_return_sequences=3, temperature=0.7,
                              top_p=0.9, return_logprobs=True)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.double()
    prompt_len = out["prompt_ids"].shape[1]
    scores = logits[:, prompt_len - 1:-1] / 0.7
    want = torch.zeros_like(out["sampler_logprobs"], dtype=torch.float64)
    for t in range(scores.shape[1]):
        step = scores[:, t]
        from transformers.generation.logits_process import TopPLogitsWarper

        kept = TopPLogitsWarper(0.9)(None, step.clone())
        token = out["completion_ids"][:, t]
        assert torch.isfinite(kept.gather(1, token[:, None])).all()  # inside the nucleus
        want[:, t] = kept.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
    want = torch.where(out["completion_mask"] != 0, want, 0.0)
    # the sampler's float32 logits (a cached forward) against float64 ones of the same float32 model
    bound = 256 * EPS32 * (1 + scores.abs().max().item())
    torch.testing.assert_close(out["sampler_logprobs"].double(), want, rtol=0, atol=bound)


def test_top_p_filters_as_transformers_does():
    from transformers.generation.logits_process import TopPLogitsWarper

    scores = torch.randn(64, 301, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.05, 0.5, 0.9, 0.999):
        want = TopPLogitsWarper(p)(None, scores.clone())
        assert torch.equal(generation._top_p(scores.clone(), p).isinf(), want.isinf()), p


@pytest.mark.parametrize("vocab", [7, 1024, 1500])
def test_sample_categorical_draws_from_the_softmax_and_never_a_masked_token(vocab):
    gen = torch.Generator().manual_seed(vocab)
    row = torch.randn(vocab, generator=gen) * 2
    row[[0, vocab // 2, vocab - 1]] = -torch.inf  # masked: block edges and the last token
    draws = 60_000
    torch.manual_seed(0)
    token, logprob = generation.sample_categorical(row.expand(draws, vocab).clone(), temperature=0.7)
    p = torch.softmax(row.double() / 0.7, -1)
    freq = torch.bincount(token, minlength=vocab).double() / draws
    assert (freq[p == 0] == 0).all()
    seen = p > 1e-4
    z = (freq - p)[seen] / (p * (1 - p) / draws).sqrt()[seen]
    # the largest of up to 2500 standard normal deviations: beyond 5.5 with probability ~1e-4
    assert z.abs().max() < 5.5, z.abs().max()
    want = torch.log_softmax(row.double() / 0.7, -1)[token]
    # (s - max) / T and log(sum) in float32: a few roundings of numbers up to |want|
    assert (logprob.double() - want).abs().max() <= 8 * EPS32 * (1 + want.abs().max())


def test_sample_categorical_of_non_finite_logits_stays_in_range_and_says_so():
    scores = torch.randn(4, 3000)
    scores[1, 7], scores[2, 9] = float("nan"), float("inf")
    token, logprob = generation.sample_categorical(scores)
    assert ((token >= 0) & (token < 3000)).all()
    assert torch.isfinite(logprob[[0, 3]]).all() and not torch.isfinite(logprob[[1, 2]]).any()


def test_reserved_cache_layers_write_in_place_and_sliding_ones_keep_their_own():
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    tokenizer = load_tokenizer("embedded")
    for name in ("llama", "mistral"):
        model = _causal_lm(name, len(tokenizer), tokenizer)
        enc = generation.encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
        cache = generation.shared_prefill(model, enc, 2)
        plain = sum(type(layer) is DynamicLayer for layer in cache.layers)
        assert generation.reserve(cache, 5) == plain == (2 if name == "llama" else 0)
        if name == "llama":
            layer = cache.layers[0]
            before = layer.keys.clone()
            keys, _ = layer.update(torch.randn(8, 2, 1, 8), torch.randn(8, 2, 1, 8))
            assert keys.data_ptr() == layer.fastrm_buffers[0].data_ptr() and torch.equal(keys[:, :, :-1], before)
            layer.batch_select_indices(torch.tensor([0, 1]))  # tensors replaced: back to concatenating
            assert layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))[0].shape[0] == 2
    assert isinstance(cache, DynamicCache)


def test_fastrm_engine_falls_back_to_generate_where_the_forward_cannot_keep_one_logit(monkeypatch):
    tokenizer = load_tokenizer("embedded")
    model = _causal_lm("gpt2", len(tokenizer), tokenizer)
    torch.manual_seed(2)
    want = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=5, num_return_sequences=2, engine="hf")
    monkeypatch.setattr(generation, "_forward_parameters", lambda model: {"input_ids", "attention_mask"})
    torch.manual_seed(2)
    got = generation.generate(model, tokenizer, PROMPTS, max_new_tokens=5, num_return_sequences=2)
    assert torch.equal(got["completion_ids"], want["completion_ids"])
    with pytest.raises(ValueError, match="engine='vllm'"):
        generation.generate(model, tokenizer, PROMPTS, max_new_tokens=5, engine="vllm")
