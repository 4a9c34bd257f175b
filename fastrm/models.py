"""Model loading: backbones, reward heads, attention implementation, 8-bit, and reward scoring.

The reward model *is* a Hugging Face ``AutoModelForSequenceClassification`` with one label, whatever its
head: a decoder's ``score`` on the last non-pad token, an encoder's pooler + classifier on ``[CLS]``, ...
fastrm scores padded batches through the model's own forward, so a checkpoint saved with
``save_pretrained`` loads back with ``AutoModelForSequenceClassification.from_pretrained(path)`` and scores
the same, in any tool. fastrm adds a padding-free scoring path on top of it where that is exact.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrm import gguf_files, lora, packing
from fastrm.config import ConfigError, require, setting

log = logging.getLogger("fastrm")

TINY = "tiny"


@dataclass
class ModelConfig:
    name_or_path: str = setting(TINY, "a local Hugging Face model folder or hub-cache name, a .gguf file (weights "
                                      "dequantized to float32, tokenizer from the file), or tiny: a small Llama "
                                      "built from scratch with the sizes below (never downloaded)")
    hidden_size: int = setting(64, "tiny model: hidden size")
    num_layers: int = setting(2, "tiny model: transformer blocks")
    num_heads: int = setting(4, "tiny model: attention heads (must divide hidden_size)")
    intermediate_size: int = setting(256, "tiny model: MLP width")
    max_position_embeddings: int = setting(64, "tiny model: longest sequence it can take")
    attn_implementation: str = setting("auto", "attention: auto (flash_attention_2 on CUDA when installed and the "
                                       "model class supports it, else sdpa if supported, else eager) | "
                                       "flash_attention_2 | sdpa | eager")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    load_in_8bit: bool = setting(False, "load in 8 bits (bitsandbytes); frozen models only, needs CUDA")

    def validate(self, prefix: str = "model"):
        require(self.hidden_size % self.num_heads == 0, f"{prefix}.hidden_size", self.hidden_size,
                f"must be divisible by {prefix}.num_heads={self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            require(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        require(self.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
                f"{prefix}.attn_implementation", self.attn_implementation, "must be auto, flash_attention_2, sdpa or eager")
        require(self.attn_implementation != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
                f"{prefix}.attn_implementation", self.attn_implementation,
                "flash-attn is not installed (pip install 'fastrm[flash]'), or use sdpa")
        require(not self.load_in_8bit or torch.cuda.is_available(), f"{prefix}.load_in_8bit", self.load_in_8bit,
                "8-bit loading needs a CUDA device")
        check_model_path(self.name_or_path, f"{prefix}.name_or_path")


def is_hub_name(name: str) -> bool:
    """``name`` has the form of a Hugging Face hub name (``org/name`` or ``name``), not of a path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not name.startswith(".")


def check_model_path(name_or_path: str, setting: str):
    """``tiny``, an existing local folder, or a name in Hugging Face hub form (resolved by transformers from its
    cache); anything else that does not exist is a mistyped path."""
    if gguf_files.is_gguf(name_or_path):
        gguf_files.check(name_or_path, setting)
    elif name_or_path != TINY and not Path(name_or_path).expanduser().is_dir():
        require(is_hub_name(name_or_path), setting, name_or_path,
                f"no such folder (and not {TINY!r} or a hub name org/name)")


def from_pretrained(auto_class, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained``, a path or name it cannot load being the user's error, not a crash."""
    path, gguf = gguf_files.pretrained_args(name_or_path)
    try:
        return auto_class.from_pretrained(path, **gguf, **kwargs)
    except OSError as err:  # transformers: not a model folder, not in the cache, no network for the hub
        raise ConfigError(f"cannot load a model from {name_or_path!r}: {str(err).splitlines()[0]}") from None


def model_class(name_or_path: str, auto_class, tiny_class):
    """The class ``auto_class.from_pretrained(name_or_path)`` would build (``tiny_class`` for ``tiny``), known before
    loading any weight, to pick what it supports."""
    if name_or_path == TINY:
        return tiny_class
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, lora.base_of(name_or_path))  # an adapter folder: its base's class
    try:
        return auto_class._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(f"setting model.name_or_path={name_or_path!r}: a {config.model_type} checkpoint has no "
                          f"{auto_class.__name__} class in transformers") from None


def pick_attn_implementation(requested: str, device: torch.device, cls=None) -> str:
    """``requested``, checked against what ``cls`` (the model class) supports; ``auto``: flash-attn 2 on CUDA when
    flash-attn is installed and the class supports it, else PyTorch SDPA if it does, else eager. Logged."""
    name = cls.__name__ if cls is not None else "the model"
    sdpa = cls is None or getattr(cls, "_supports_sdpa", False)
    flash = cls is None or getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)
    installed = importlib.util.find_spec("flash_attn") is not None
    if requested != "auto":
        if requested == "flash_attention_2" and not installed:
            raise ConfigError("setting model.attn_implementation='flash_attention_2': flash-attn is not installed "
                              "(pip install 'fastrm[flash]'), or use 'sdpa'")
        if requested == "flash_attention_2" and not flash:
            raise ConfigError(f"setting model.attn_implementation='flash_attention_2': {name} does not support "
                              "flash attention; use auto")
        if requested == "sdpa" and not sdpa:
            raise ConfigError(f"setting model.attn_implementation='sdpa': {name} does not support PyTorch SDPA; "
                              "use auto or eager")
        log.info("attention: %s for %s (requested)", requested, name)
        return requested
    if device.type == "cuda" and installed and flash:
        log.info("attention: flash_attention_2 for %s (flash-attn found)", name)
        return "flash_attention_2"
    if sdpa:
        reason = ("no CUDA device" if device.type != "cuda" else "flash-attn is not installed" if not installed
                  else f"{name} does not support flash attention")
        log.info("attention: PyTorch SDPA for %s (flash-attn not used: %s)", name, reason)
        return "sdpa"
    log.info("attention: eager for %s (it supports neither flash attention nor SDPA)", name)
    return "eager"


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


def _quantization(config: ModelConfig, device: torch.device, quantize: str = "none"):
    if quantize != "none":
        return lora.quantization_kwargs(quantize, device)
    if not config.load_in_8bit:
        return {}
    if device.type != "cuda":
        raise ValueError("setting load_in_8bit=True: 8-bit loading needs a CUDA device")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": device.index or 0}}


def load_reward_model(config: ModelConfig, tokenizer, device: torch.device, quantize: str = "none"):
    """A sequence-classification model with one label (the scalar reward), whatever its head. ``quantize``: frozen
    8bit / 4bit weights for LoRA (:mod:`fastrm.lora`). The names of the modules the checkpoint did not hold (the new
    head) are kept in ``model.fastrm_new_modules``: LoRA trains them fully."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    cls = model_class(config.name_or_path, AutoModelForSequenceClassification, LlamaForSequenceClassification)
    attn = pick_attn_implementation(config.attn_implementation, device, cls)
    if config.name_or_path == TINY:
        model, fresh = LlamaForSequenceClassification(tiny_config(config, tokenizer, attn, num_labels=1)), []
    else:
        path, kwargs = gguf_files.model_args(config.name_or_path, _quantization(config, device, quantize))
        model, fresh = lora.from_pretrained(AutoModelForSequenceClassification, path, num_labels=1,
                                            attn_implementation=attn, **kwargs)
        model = gguf_files.as_dense(model)
    model.fastrm_new_modules = fresh
    _match_tokenizer(model, tokenizer, config)
    return _finish(model, config, device, quantize)


def load_causal_lm(config: ModelConfig, tokenizer, device: torch.device, quantize: str = "none"):
    """A causal language model (a policy); ``quantize``: frozen 8bit / 4bit weights for LoRA (:mod:`fastrm.lora`)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cls = model_class(config.name_or_path, AutoModelForCausalLM, LlamaForCausalLM)
    attn = pick_attn_implementation(config.attn_implementation, device, cls)
    if config.name_or_path == TINY:
        model = LlamaForCausalLM(tiny_config(config, tokenizer, attn))
    else:
        path, kwargs = gguf_files.model_args(config.name_or_path, _quantization(config, device, quantize))
        model, _ = lora.from_pretrained(AutoModelForCausalLM, path, attn_implementation=attn, **kwargs)
        model = gguf_files.as_dense(model)
    _match_tokenizer(model, tokenizer, config)
    model = _finish(model, config, device, quantize)
    if not attends_causally(model):
        raise ConfigError(f"setting model.name_or_path={config.name_or_path!r}: {type(model).__name__} attends to "
                          "later tokens (an encoder's bidirectional attention); SFT and RL need a causal decoder. "
                          "An encoder can be a reward model (fastrm train-rm)")
    model.fastrm_logits_from_head, model.fastrm_logit_softcap = head_logits(model)
    if not model.fastrm_logits_from_head:
        log.info("%s changes its LM head's output (e.g. scales it): per-token log-probs are taken from its logits, "
                 "not fused from the hidden states", type(model).__name__)
    elif model.fastrm_logit_softcap is not None:
        log.info("%s soft-caps its logits at %g: the fused log-probs apply the same cap", type(model).__name__,
                 model.fastrm_logit_softcap)
    return model


def _match_tokenizer(model, tokenizer, config: ModelConfig):
    """Every token id must have an embedding row, and the model's ``pad_token_id`` must be the tokenizer's pad:
    a sequence-classification head reads the last token that is not ``config.pad_token_id``."""
    rows = model.get_input_embeddings().num_embeddings
    ids = max(tokenizer.get_vocab().values()) + 1
    if ids > rows:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"tokenizer {name!r} has {ids} token ids but the model model.name_or_path="
                          f"{config.name_or_path!r} has only {rows} embedding rows; use the checkpoint's own "
                          "tokenizer (tokenizer=auto) or one made for this model")
    pad = tokenizer.pad_token_id
    if model.config.pad_token_id != pad:
        if model.config.pad_token_id is not None:
            log.warning("model config pad_token_id=%s is not the tokenizer's pad token %s: set to %s",
                        model.config.pad_token_id, pad, pad)
        model.config.pad_token_id = pad


@torch.no_grad()
def _probe_logits(model, ids: list[int]) -> torch.Tensor:
    """``model``'s logits for one short sequence, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        device = model.get_input_embeddings().weight.device
        ids = torch.tensor([ids], device=device) % model.get_input_embeddings().num_embeddings
        return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)


def attends_causally(model) -> bool:
    """Whether a language model's prediction at a position ignores the tokens after it: changing the last of 4
    tokens must leave the logits of the first 3 as they were (false for an encoder loaded as a causal LM, e.g.
    ``BertLMHeadModel`` without ``is_decoder``)."""
    a, b = _probe_logits(model, [0, 1, 2, 3]), _probe_logits(model, [0, 1, 2, 4])
    return torch.allclose(a[:, :3], b[:, :3], rtol=0, atol=1e-6 * max(1.0, a.abs().max().item()))


@torch.no_grad()
def head_logits(model) -> tuple[bool, float | None]:
    """How ``model``'s logits follow from its LM head's output on the backbone's last hidden states, so that
    :func:`token_logprobs` can fuse the head into the log-probs: ``(True, None)`` when the logits are the head's
    output, ``(True, cap)`` when they are ``cap * tanh(head / cap)`` (Gemma-2/3's ``final_logit_softcapping``,
    which ``fastrm.linear_logprobs(softcap=cap)`` computes), ``(False, None)`` for anything else (scaled logits:
    Cohere, Granite, ...). Proven, not assumed from the config: one forward over 4 tokens whose head output is
    replaced by values spanning [-4 cap, 4 cap] (the weights of a random-init model give logits too small to tell
    a cap from none), compared with what the model returns."""
    head = model.get_output_embeddings()
    if head is None:
        return False, None
    cap = getattr(packing.text_config(model), "final_logit_softcapping", None)
    span = 4 * (cap or 30.0)
    written = []

    def replace_output(module, args, out):
        written.append(torch.linspace(-span, span, out.numel(), device=out.device).view_as(out).to(out.dtype))
        return written[-1]

    hook = head.register_forward_hook(replace_output)
    try:
        logits = _probe_logits(model, [0, 1, 2, 3])
    finally:
        hook.remove()
    if len(written) != 1 or written[0].shape != logits.shape:
        return False, None
    if torch.equal(written[0].float(), logits):
        return True, None
    if cap:  # the model's own operations, in its dtype: agreement to its rounding
        capped = (torch.tanh(written[0] / cap) * cap).float()
        if torch.allclose(capped, logits, rtol=4 * torch.finfo(written[0].dtype).eps, atol=0):
            return True, float(cap)
    return False, None


def _finish(model, config: ModelConfig, device: torch.device, quantize: str = "none"):
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if quantize != "none":  # placed on the device by from_pretrained; frozen, norms in float32
        return lora.prepare_quantized(model, config.gradient_checkpointing)
    if not config.load_in_8bit:
        model.to(device)
    return model


def base_model(model):
    """The transformer backbone of a Hugging Face model with a head (``model.model``, ``model.bert``, ...)."""
    return getattr(model, model.base_model_prefix)


def forward(module, batch: dict):
    """``module``'s output on a padded batch (``attention_mask``, optional ``position_ids``) or a packed row
    (``cu_seq_lens``: attention per sequence, :func:`fastrm.packing.packed_forward`)."""
    if "cu_seq_lens" in batch:
        return packing.packed_forward(module, batch)
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    inputs.update({k: batch[k] for k in ("attention_mask", "position_ids") if k in batch})
    return module(**inputs)


def backbone_hidden(backbone, batch: dict) -> torch.Tensor:
    """Last hidden states: ``[B, T, H]`` of a padded batch, ``[1, S, H]`` of a packed row (see :func:`forward`)."""
    return forward(backbone, batch).last_hidden_state


def _score_positions(model, batch: dict) -> torch.Tensor:
    """Where the head reads each packed sequence: as the Hugging Face forward does on a padded batch, the
    rightmost token that is not the pad token (its first token if all are), else the last token."""
    pad = packing.first_id(packing.text_config(model).pad_token_id)
    if pad is None:
        return batch["seq_ends"]
    cu = batch["cu_seq_lens"].long()
    lengths = cu[1:] - cu[:-1]
    ids = batch["input_ids"][0]
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)
    positions = torch.where(ids != pad, torch.arange(ids.numel(), device=ids.device), cu[:-1][sequence])
    return positions.new_full((len(lengths),), -1).scatter_reduce(0, sequence, positions, "amax")


def reward_scores(model, batch: dict) -> torch.Tensor:
    """Scalar reward per sequence, float32 ``[N]``.

    Padded batches (``attention_mask``) go through the model's own forward, whatever its head (a decoder's
    last non-pad token, an encoder's ``[CLS]`` pooler, ...): the score is the Hugging Face model's. Packed rows (``cu_seq_lens``,
    from :func:`fastrm.data.collate_preference_packed` or :func:`fastrm.packing.pack`) run the backbone once
    with attention per sequence and apply the last-token ``score`` head where the padded forward reads it:
    no FLOP on padding. Bucketed batches (:func:`fastrm.packing.bucket`) run one padded forward per bucket.
    A model must pass :func:`fastrm.packing.choose_packing` before it takes packed rows."""
    model = lora.unwrap(model)  # peft: the Hugging Face model, its adapted layers in place
    if "buckets" in batch:
        return packing.per_bucket(lambda sub: reward_scores(model, sub), batch, per_token=False)
    if "cu_seq_lens" in batch:
        head = getattr(model, "score", None)
        # A head LoRA trains whole sits in peft's ModulesToSaveWrapper, which calls its trainable copy.
        if not isinstance(getattr(head, "original_module", head), torch.nn.Linear):
            raise packing.PackingUnsupported(
                f"{type(model).__name__} has no last-token `score` head (its head reads another token, e.g. a "
                "pooled first token): packed rows cannot be scored")
        hidden = backbone_hidden(base_model(model), batch)
        return head(hidden[0, _score_positions(model, batch)]).squeeze(-1).float()
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    return out.logits.squeeze(-1).float()


def token_logprobs(model, batch: dict, *, temperature: float = 1.0, return_entropy: bool = False,
                   backend: str | None = None):
    """Log-prob of each next token ``labels[t + 1]`` given the prefix, float32 ``[B, T-1]`` (0 where the
    label is -100), straight from the last hidden states through the LM head with
    ``fastrm.linear_logprobs``: the ``[B, T, V]`` logits never exist. Padded batches (``attention_mask``),
    packed rows (``cu_seq_lens``: ``[1, S-1]``, every sequence's first label -100) and bucketed batches
    (:func:`fastrm.packing.bucket`: the padded layout, one forward per bucket). A model whose logits are not its
    head's output (``fastrm_logits_from_head`` false, see :func:`head_logits`: scaled logits, an adapted LM head)
    gets them from its own forward and ``fastrm.gather_logprobs``; soft-capped logits (Gemma-2/3) stay fused, with
    the model's cap."""
    import fastrm

    model = lora.unwrap(model)  # peft: the Hugging Face model, its adapted layers in place
    if "buckets" in batch:
        return packing.per_bucket(lambda sub: token_logprobs(model, sub, temperature=temperature,
                                                             return_entropy=return_entropy, backend=backend),
                                  batch, per_token=True)
    labels = batch["labels"][:, 1:]
    if not getattr(model, "fastrm_logits_from_head", True):
        logits = forward(model, batch).logits
        return fastrm.gather_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=return_entropy,
                                      backend=backend)
    hidden = backbone_hidden(base_model(model), batch)
    head = model.get_output_embeddings()
    # Prompt and padding rows are skipped before the LM head: worth the one host sync that sizes the chunks.
    return fastrm.linear_logprobs(hidden[:, :-1], head.weight, labels, bias=head.bias, temperature=temperature,
                                  return_entropy=return_entropy, backend=backend, skip_ignored=True,
                                  softcap=getattr(model, "fastrm_logit_softcap", None))
