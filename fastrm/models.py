"""Model loading: backbones, reward heads, attention implementation, 8-bit, and reward scoring.

The reward model *is* a Hugging Face ``AutoModelForSequenceClassification`` with one label: a scalar
head on the last non-pad token. Saved with ``save_pretrained`` it loads back with
``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` and scores the same, in
any tool. fastrm adds a padding-free scoring path on top of it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from fastrm.config import require

log = logging.getLogger("fastrm")

TINY = "tiny"


@dataclass
class ModelConfig:
    # A local path / hub-cache name of a Hugging Face model, or "tiny": a small Llama built from scratch
    # with the sizes below (nothing is downloaded, ever).
    name_or_path: str = TINY
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    gradient_checkpointing: bool = False
    load_in_8bit: bool = False  # frozen models only (reference / reward at inference); needs CUDA

    def validate(self, prefix: str = "model"):
        require(self.hidden_size % self.num_heads == 0, f"{prefix}.hidden_size", self.hidden_size,
                f"must be divisible by {prefix}.num_heads={self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            require(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        require(self.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
                f"{prefix}.attn_implementation", self.attn_implementation, "must be auto, flash_attention_2, sdpa or eager")


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("setting model.attn_implementation='flash_attention_2': flash-attn is not installed "
                             "(pip install 'fastrm[flash]'), or use 'sdpa'")
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        log.info("attention: flash_attention_2 (flash-attn found)")
        return "flash_attention_2"
    reason = "no CUDA device" if device.type != "cuda" else "flash-attn is not installed"
    log.info("attention: PyTorch SDPA (flash-attn not used: %s)", reason)
    return "sdpa"


def tiny_config(config: ModelConfig, tokenizer, attn_implementation: str, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
        **extra,
    )


def _quantization(config: ModelConfig, device: torch.device):
    if not config.load_in_8bit:
        return {}
    if device.type != "cuda":
        raise ValueError("setting load_in_8bit=True: 8-bit loading needs a CUDA device")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device.index or 0}}


def load_reward_model(config: ModelConfig, tokenizer, device: torch.device):
    """A sequence-classification model with one label (the scalar reward)."""
    from transformers import AutoModelForSequenceClassification

    attn = pick_attn_implementation(config.attn_implementation, device)
    if config.name_or_path == TINY:
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification(tiny_config(config, tokenizer, attn, num_labels=1))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            config.name_or_path, num_labels=1, attn_implementation=attn, **_quantization(config, device))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return _finish(model, config, device)


def load_causal_lm(config: ModelConfig, tokenizer, device: torch.device):
    from transformers import AutoModelForCausalLM

    attn = pick_attn_implementation(config.attn_implementation, device)
    if config.name_or_path == TINY:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(tiny_config(config, tokenizer, attn))
    else:
        model = AutoModelForCausalLM.from_pretrained(config.name_or_path, attn_implementation=attn,
                                                     **_quantization(config, device))
    return _finish(model, config, device)


def _finish(model, config: ModelConfig, device: torch.device):
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if not config.load_in_8bit:
        model.to(device)
    return model


def reward_scores(model, batch: dict) -> torch.Tensor:
    """Scalar reward per sequence, float32 ``[N]``.

    Padded batches (``attention_mask``) go through the model as usual: the head reads the last non-pad
    token. Packed batches (``position_ids`` + ``seq_ends``, one row, no padding) run the backbone once
    over all sequences — the attention is block-diagonal because positions restart at 0 — and apply the
    head to each sequence's last token, so no FLOP is spent on padding.
    """
    if "seq_ends" in batch:
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                          use_cache=False).last_hidden_state
        last = hidden[0, batch["seq_ends"]]
        return model.score(last).squeeze(-1).float()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits.squeeze(-1).float()


def token_logprobs(model, batch: dict, *, temperature: float = 1.0, return_entropy: bool = False,
                   backend: str | None = None):
    """Log-prob of each next token ``labels[t + 1]`` given the prefix, float32 ``[B, T-1]`` (0 where the
    label is -100), straight from the last hidden states through the LM head with
    ``fastrm.linear_logprobs``: the ``[B, T, V]`` logits never exist. Works on padded
    (``attention_mask``) and packed (``position_ids``) batches."""
    import fastrm

    backbone = getattr(model, model.base_model_prefix)
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    inputs.update({k: batch[k] for k in ("attention_mask", "position_ids") if k in batch})
    hidden = backbone(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    labels = batch["labels"][:, 1:]
    return fastrm.linear_logprobs(hidden[:, :-1], head.weight, labels, bias=head.bias, temperature=temperature,
                                  return_entropy=return_entropy, backend=backend)
