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

from fastrm import gguf_files, lora
from fastrm.config import TINY, ConfigError, require_setting, setting
from fastrm.layout import Batch, text_config
from fastrm.ops.linear_logprobs import linear_logprobs
from fastrm.ops.logprobs import gather_logprobs

log = logging.getLogger("fastrm")

__all__ = ["TINY", "ModelConfig", "backbone_hidden", "load_causal_lm", "load_reward_model", "reward_scores",
           "token_logprobs"]


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
        require_setting(self.hidden_size % self.num_heads == 0, f"{prefix}.hidden_size", self.hidden_size,
                f"must be divisible by {prefix}.num_heads={self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            require_setting(getattr(self, name) >= 1, f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        require_setting(self.attn_implementation in ("auto", "flash_attention_2", "sdpa", "eager"),
                f"{prefix}.attn_implementation", self.attn_implementation, "must be auto, flash_attention_2, sdpa or eager")
        require_setting(self.attn_implementation != "flash_attention_2" or importlib.util.find_spec("flash_attn") is not None,
                f"{prefix}.attn_implementation", self.attn_implementation,
                "flash-attn is not installed (pip install 'fastrm[flash]'), or use sdpa")
        require_setting(not self.load_in_8bit or torch.cuda.is_available(), f"{prefix}.load_in_8bit", self.load_in_8bit,
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
        require_setting(is_hub_name(name_or_path), setting, name_or_path,
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
    cap = getattr(text_config(model), "final_logit_softcapping", None)
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


def backbone_hidden(backbone, batch: Batch) -> torch.Tensor:
    """Last hidden states ``[N, T, H]`` of a batch in any layout (:mod:`fastrm.layout`), in the padded layout."""
    return batch.run(lambda b: b.forward(backbone).last_hidden_state, per_token=True)


def reward_scores(model, batch: Batch) -> torch.Tensor:
    """Scalar reward per sequence, float32 ``[N]``, for a batch in any layout (:mod:`fastrm.layout`).

    Padded batches go through the model's own forward, whatever its head (a decoder's last non-pad token, an
    encoder's ``[CLS]`` pooler, ...): the score is the Hugging Face model's. Packed rows run the backbone once with
    attention per sequence and apply the last-token ``score`` head where the padded forward reads it: no FLOP on
    padding. Bucketed batches run one padded forward per bucket. A model must pass
    :func:`fastrm.packing.choose_packing` before it takes packed rows."""
    model = lora.unwrap(model)  # peft: the Hugging Face model, its adapted layers in place
    return batch.run(lambda b: b.sequence_scores(model), per_token=False)


def token_logprobs(model, batch: Batch, *, temperature: float = 1.0, return_entropy: bool = False,
                   backend: str | None = None):
    """Log-prob of each next token ``labels[t + 1]`` given the prefix, float32 ``[N, T-1]`` in the padded layout
    (0 where the label is -100) for a batch in any layout (:mod:`fastrm.layout`), straight from the last hidden
    states through the LM head with ``fastrm.linear_logprobs``: the ``[N, T, V]`` logits never exist. A model whose
    logits are not its head's output (``fastrm_logits_from_head`` false, see :func:`head_logits`: scaled logits, an
    adapted LM head) gets them from its own forward and ``fastrm.gather_logprobs``; soft-capped logits (Gemma-2/3)
    stay fused, with the model's cap."""
    model = lora.unwrap(model)  # peft: the Hugging Face model, its adapted layers in place
    return batch.run(lambda b: _forward_logprobs(model, b, temperature, return_entropy, backend), per_token=True)


def _forward_logprobs(model, batch, temperature: float, return_entropy: bool, backend: str | None):
    """:func:`token_logprobs` of what the model takes in one forward (a padded batch or a packed row)."""
    labels = batch.labels[:, 1:]
    if not getattr(model, "fastrm_logits_from_head", True):
        logits = batch.forward(model).logits
        return gather_logprobs(logits[:, :-1], labels, temperature=temperature, return_entropy=return_entropy,
                               backend=backend)
    hidden = batch.forward(base_model(model)).last_hidden_state
    head = model.get_output_embeddings()
    # Prompt and padding rows are skipped before the LM head: worth the one host sync that sizes the chunks.
    return linear_logprobs(hidden[:, :-1], head.weight, labels, bias=head.bias, temperature=temperature,
                           return_entropy=return_entropy, backend=backend, skip_ignored=True,
                           softcap=getattr(model, "fastrm_logit_softcap", None))


_POSITION_TABLE = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def learned_positions(model) -> int | None:
    """The longest sequence a model with a learned absolute position table can take (GPT-2's ``wpe``, OPT's
    ``embed_positions``, BERT's ``position_embeddings``), or None where positions are computed (rotary, ALiBi,
    relative), which never index past a table. Longer input would fail with a bare ``IndexError`` mid-run, so
    trainers compare this to their longest sequence at start."""
    inputs = model.get_input_embeddings()
    for name, module in lora.unwrap(model).named_modules():
        if module is inputs or not isinstance(module, torch.nn.Embedding) or not _POSITION_TABLE.search(name):
            continue
        # OPT's table starts at row `offset`; RoBERTa-style tables (a padding row) at padding_idx + 1
        first = getattr(module, "offset", 0) or (module.padding_idx + 1 if module.padding_idx is not None else 0)
        return module.num_embeddings - first
    return None


def check_positions(model, longest: int, setting: str, value, what: str):
    """A ConfigError naming ``setting=value`` when ``longest`` tokens (``what`` says how they arise) exceed the
    model's learned position table."""
    limit = learned_positions(model)
    if limit is not None and longest > limit:
        raise ConfigError(f"setting {setting}={value}: {what} is {longest} tokens, but {type(lora.unwrap(model)).__name__} "
                          f"has learned positions for {limit} tokens only; lower {setting} (at most {limit})")
