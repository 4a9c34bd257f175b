"""fastrm.generation.prepacked_linears: the CPU float32 decode path on oneDNN-prepacked weights."""

import contextlib

import pytest
import torch

from fastrm import generation
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
