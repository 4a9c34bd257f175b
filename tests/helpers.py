"""Shared test utilities (import as ``from helpers import ...``).

Output poisoning: conftest sets FASTRM_POISON_OUTPUTS=1, so every buffer a launcher allocates
(``fastrm.kernels.new_output``) starts as NaN and an unwritten element fails the comparison.
"""

import pytest
import torch

from fastrm import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Both backends are always tested; "triton" runs compiled on CUDA and interpreted on CPU.
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels.INTERPRET),
    reason="triton kernels need CUDA or TRITON_INTERPRET=1"))]

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def requires_cuda(test):
    """A GPU test: marked ``cuda`` (``pytest -m cuda`` runs them all; the GPU suite does) and skipped
    where there is no CUDA GPU."""
    return pytest.mark.cuda(_skip_without_cuda(test))


# Tolerances against a float64 reference, by input dtype.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` laid out with a stride gap on the last dim's neighbour."""
    pad = torch.empty(*x.shape[:-1], x.shape[-1] * 2, dtype=x.dtype, device=x.device)
    pad.normal_()
    pad[..., ::2] = x
    out = pad[..., ::2]
    assert not out.is_contiguous()
    return out


def row_strided(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """Same values, last dim contiguous but rows spaced apart (like logits[:, :-1, :])."""
    pad = torch.randn(*x.shape[:-1], x.shape[-1] + extra, dtype=x.dtype, device=x.device)
    pad[..., : x.shape[-1]] = x
    out = pad[..., : x.shape[-1]]
    assert not out.is_contiguous() and out.stride(-1) == 1
    return out


# Tiny random-init models of the families whose attention and caches differ (GQA, sliding windows, soft-capping,
# learned positions, parallel residual, OPT's offset positions).
TINY_FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, sliding_window=6)),
    "gemma2": ("Gemma2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, sliding_window=6)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=32)),
}


def tiny_model(name: str, kind: str, **config):
    """A random-init ``TINY_FAMILIES[name]`` model, ``kind`` ``reward`` (a sequence-classification head) or
    ``causal_lm``, with ``config`` (vocabulary, special tokens, ...) added; Gemma-2 on eager attention (its
    soft-capping), the others on SDPA."""
    import transformers as t

    config_name, sizes = TINY_FAMILIES[name]
    auto = t.AutoModelForSequenceClassification if kind == "reward" else t.AutoModelForCausalLM
    return auto.from_config(getattr(t, config_name)(**config, **sizes),
                            attn_implementation="eager" if name == "gemma2" else "sdpa")
