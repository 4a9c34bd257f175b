"""LoRA and QLoRA through ``peft``: the ``lora.*`` settings, adapters on a loaded model, adapter folders as models.

With ``lora.r > 0`` a trainer freezes the model's weights and trains low-rank adapters on its linear layers
(``lora.target_modules``, default ``all-linear``: every linear layer of the transformer, not the LM head) plus,
for a reward model, its whole head (``score`` / ``classifier`` / pooler: every module the checkpoint did not
hold, trained fully through peft's ``modules_to_save``). ``lora.quantize=4bit|8bit`` loads the frozen weights
through bitsandbytes (QLoRA: NF4 with double quantization, bf16 compute), on CUDA only.

What is saved (checkpoints and ``output_dir/final``) is the adapter folder peft writes (``adapter_config.json``,
``adapter_model.safetensors``) plus the tokenizer: ``PeftModel.from_pretrained`` / ``AutoPeftModelFor...`` load
it on its base. fastrm itself accepts an adapter folder wherever it takes a model (``model.name_or_path``,
``reward_model_path``, ``value_model``): the base is loaded and the adapter merged in. ``fastrm export`` writes
that merged model as a plain checkpoint.

In RL the reference policy is the policy with its adapters disabled (peft's ``disable_adapter``), and a critic
built from the policy shares the policy's frozen weights: one copy of the base weights for all three.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastrm.config import TINY, ConfigError, require_setting, setting

log = logging.getLogger("fastrm")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
QUANTIZE = ("none", "8bit", "4bit")
ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    r: int = setting(0, "LoRA rank: train rank-r adapters on frozen weights (peft); 0: full fine-tuning")
    alpha: float = setting(32.0, "LoRA scale numerator: an adapter adds (alpha / r) * B A to its layer's weight")
    dropout: float = setting(0.05, "dropout on the input of each LoRA branch")
    target_modules: Any = setting(ALL_LINEAR, "layers that get adapters: all-linear (every linear layer of the "
                                  "transformer, not the LM head or a reward head), a list of module names "
                                  "[q_proj, v_proj], or a regular expression over full module names (peft's meaning)")
    quantize: str = setting("none", "frozen base weights in bitsandbytes 8bit or 4bit (QLoRA: NF4, double "
                                    "quantization, bf16 compute) on CUDA: none | 8bit | 4bit; needs lora.r > 0")

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self, prefix: str = "lora"):
        require_setting(self.r >= 0, f"{prefix}.r", self.r, "must be >= 0 (0: no adapters, full fine-tuning)")
        require_setting(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        require_setting(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must lie in [0, 1)")
        targets = self.target_modules
        require_setting((isinstance(targets, str) and targets.strip() != "")
                or (isinstance(targets, (list, tuple)) and len(targets) > 0
                    and all(isinstance(t, str) and t for t in targets)),
                f"{prefix}.target_modules", targets, "must be all-linear, a non-empty list of module names or a "
                "regular expression")
        require_setting(self.quantize in QUANTIZE, f"{prefix}.quantize", self.quantize, "must be none, 8bit or 4bit")
        require_setting(self.quantize == "none" or self.enabled, f"{prefix}.quantize", self.quantize,
                f"needs {prefix}.r > 0: quantized weights are frozen, so only adapters on them can train")


def validate_with(settings: LoraSettings, model_name_or_path: str, distributed: str):
    """Checks of ``lora.*`` against the model and the data-parallel mode (a trainer's ``validate``)."""
    settings.validate()
    if settings.enabled:
        require_peft(f"setting lora.r={settings.r}")
        require_setting(model_name_or_path != TINY, "lora.r", settings.r,
                "LoRA adapts a pretrained checkpoint's frozen weights; model.name_or_path=tiny is built from random "
                "weights that no saved adapter could be reloaded onto. Set model.name_or_path to a checkpoint, or "
                "lora.r=0")
    require_setting(settings.quantize == "none" or distributed != "fsdp", "lora.quantize", settings.quantize,
            "quantized (bitsandbytes) weights cannot be sharded by FSDP; use distributed=ddp: the frozen weights are "
            "replicated, but only the adapters have gradients and optimizer states")


# ---- loading ---------------------------------------------------------------------------------------------------------

def adapter_config(name_or_path: str) -> dict | None:
    """The ``adapter_config.json`` of a peft adapter folder; None for anything else (a model folder, a hub name)."""
    path = Path(name_or_path) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def base_of(name_or_path: str) -> str:
    """The model an adapter folder adapts, following chains (an adapter trained on an adapter's model); the
    name itself for a model."""
    seen = []
    while (config := adapter_config(name_or_path)) is not None:
        seen.append(name_or_path)
        base = config.get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{name_or_path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
        if base in seen:
            raise ConfigError(f"{name_or_path}: adapter folders name each other as their base: {seen}")
        name_or_path = base
    return name_or_path


def from_pretrained(auto_class, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained(name_or_path, **kwargs, output_loading_info=True)``, where an adapter folder loads
    its base (recursively) with the adapter merged in. Returns ``(model, names of the modules whose weights the
    checkpoint did not hold)``: a reward head on a base checkpoint, which LoRA then trains fully."""
    config = adapter_config(name_or_path)
    if config is None:
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        fresh = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", ())})
        return model, fresh
    if "quantization_config" in kwargs:
        raise ConfigError(f"{name_or_path} is a LoRA adapter, to be merged into its base, which this run loads in 8 or "
                          f"4 bits (bitsandbytes), where the merge would be rounded. Merge it in full precision first "
                          f"(fastrm export {name_or_path} <folder>) and point at that folder")
    require_peft(f"{name_or_path} (a LoRA adapter folder)")
    from peft import PeftModel

    base, fresh = from_pretrained(auto_class, config["base_model_name_or_path"], **kwargs)
    model = PeftModel.from_pretrained(base, name_or_path).merge_and_unload()
    model.name_or_path = str(name_or_path)
    log.info("%s: a LoRA adapter on %s, merged into it", name_or_path, config["base_model_name_or_path"])
    # the adapter trained the modules its base lacked (modules_to_save): loaded now, no longer fresh
    saved = set(config.get("modules_to_save") or ())
    return model, [m for m in fresh if not any(m == s or m.endswith("." + s) for s in saved)]


def quantization_kwargs(quantize: str, device: torch.device) -> dict:
    """``from_pretrained`` keyword arguments that load the weights in bitsandbytes 8 or 4 bits (``{}`` for none)."""
    if quantize == "none":
        return {}
    check_quantization_device(quantize, device)
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    place = (device.index or 0) if device.type == "cuda" else str(device)
    return {"quantization_config": config, "device_map": {"": place}}


def check_quantization_device(quantize: str, device: torch.device):
    if device.type != "cuda":
        raise ConfigError(f"setting lora.quantize={quantize!r}: quantized (bitsandbytes) base weights need a CUDA "
                          f"device, and this run's device is {device.type}; use lora.quantize=none here (LoRA itself "
                          f"runs anywhere)")


def prepare_quantized(model, gradient_checkpointing: bool):
    """peft's preparation of a k-bit model for adapter training: every weight frozen, the non-quantized ones (norms)
    in float32, inputs of checkpointed blocks requiring gradients."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


# ---- adapters --------------------------------------------------------------------------------------------------------

def _linear_classes() -> tuple:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def reward_head_modules(model, fresh: list[str]) -> list[str]:
    """Names of a sequence-classification model's head modules, trained fully: its top-level modules outside the
    transformer (``score``, ``classifier``, DeBERTa's ``pooler``) and every module the checkpoint did not hold
    (BERT's ``bert.pooler`` on a masked-LM checkpoint)."""
    heads = [name for name, child in model.named_children()
             if name != model.base_model_prefix and any(True for _ in child.parameters())]
    heads += [name for name in fresh if not any(name == h or name.startswith(h + ".") for h in heads)]
    return heads


def peft_config(settings: LoraSettings, task: str, heads: list[str] = (), model=None):
    """The ``peft.LoraConfig`` for ``settings``; ``heads`` train fully and get no adapters."""
    from peft import LoraConfig, TaskType

    targets = settings.target_modules
    targets = list(targets) if isinstance(targets, (list, tuple)) else targets
    exclude = None
    if heads and model is not None:  # the linear layers inside the heads are trained whole, not adapted
        exclude = [name for name, module in model.named_modules()
                   if any(name == h or name.startswith(h + ".") for h in heads)
                   and isinstance(module, _linear_classes())] or None
    task_type = {"causal": TaskType.CAUSAL_LM, "reward": TaskType.SEQ_CLS}.get(task)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                      exclude_modules=exclude, modules_to_save=list(heads) or None, task_type=task_type)


def add_adapters(model, settings: LoraSettings, task: str):
    """``model`` (a ``*ForCausalLM`` for ``task="causal"``, a ``*ForSequenceClassification`` for ``"reward"``, as
    :mod:`fastrm.models` loads them) as a peft model: its weights frozen, LoRA adapters on
    ``settings.target_modules``, a reward model's head trained fully. The adapter config names the model's folder
    (absolute when local) as the base to load it on."""
    require_peft(f"setting lora.r={settings.r}")
    from peft import get_peft_model

    fresh = getattr(model, "fastrm_new_modules", [])
    heads = reward_head_modules(model, fresh) if task == "reward" else []
    name = getattr(model, "name_or_path", None)
    if name and Path(name).exists():
        model.name_or_path = str(Path(name).resolve())
    try:
        peft_model = get_peft_model(model, peft_config(settings, task, heads, model))
    except ValueError as err:  # e.g. target modules not found in the model
        raise ConfigError(f"setting lora.target_modules={settings.target_modules!r}: "
                          f"{str(err).splitlines()[0]}") from None
    hf = peft_model.get_base_model()
    head = hf.get_output_embeddings()
    if head is not None and type(head) is not nn.Linear:
        # an adapted LM head: its weight alone is not what it computes, so log-probs come from the model's logits
        hf.fastrm_logits_from_head = False
    trained, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s%s: %.3fM of %.2fM parameters trained (%.2f%%)", settings.r, settings.alpha,
             _targets_text(peft_model), f"; trained fully: {', '.join(heads)}" if heads else "", trained / 1e6,
             total / 1e6, 100 * trained / max(total, 1))
    return peft_model


def _targets_text(peft_model) -> str:
    names = sorted({name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if _is_lora_layer(module)})
    return ", ".join(names) or "nothing"


def _is_lora_layer(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def add_adapters_in_place(module: nn.Module, settings: LoraSettings) -> nn.Module:
    """LoRA adapters injected into ``module`` (a transformer backbone, e.g. a critic's), its weights frozen and the
    adapters trainable; no peft wrapper (the module keeps its own forward and its parameter names gain
    ``lora_A`` / ``lora_B``)."""
    from peft import inject_adapter_in_model

    module.requires_grad_(False)
    inject_adapter_in_model(peft_config(settings, task=""), module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # a peft model exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def require_peft(what: str):
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{what} needs peft, which is not installed: pip install 'fastrm[lora]'")


def unwrap(model):
    """The Hugging Face model inside a peft model (its adapted layers in place), else ``model``."""
    return model.get_base_model() if is_peft(model) else model


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose frozen parameters and buffers are the original's own tensors, not copies: a second
    set of layers over the same weights, costing no memory for them. Trained parameters (adapters) are copied, so
    the copy trains its own."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()] if not t.requires_grad}
    return copy.deepcopy(module, memo)


def trained_names(module: nn.Module) -> list[str]:
    return [name for name, param in module.named_parameters() if param.requires_grad]


def saved_names(model) -> list[str] | None:
    """The state-dict entries a checkpoint of ``model`` holds: a peft model's adapters and fully trained heads (what
    its ``save_pretrained`` writes), or None for all of a plain model's."""
    return trained_names(model) if is_peft(model) else None


def load_trained_state(module: nn.Module, state: dict, what: str):
    """Load the trained parameters ``state`` (a LoRA critic's adapters and head) into ``module``; every trained
    parameter must be there and nothing else."""
    expected = set(trained_names(module))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"{what}: the saved trained weights do not match this run's LoRA settings "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the checkpoint's lora.* "
                          f"settings")
    module.load_state_dict(state, strict=False)


def load_adapter_weights(model, folder: Path):
    """The adapters (and fully trained heads) saved in ``folder`` into the peft ``model``, exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"resume from {folder}: it holds no LoRA adapter ({ADAPTER_WEIGHTS}) but this run trains "
                          f"one (lora.r > 0); resume with the checkpoint's lora.* settings")
    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ConfigError(f"resume from {folder}: its adapter has weights this model lacks: {sorted(unexpected)[:3]}")


def memory_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules`` on this process (an FSDP rank: its shards), each storage
    counted once (shared weights, tied embeddings): what they hold in memory together."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if hasattr(tensor, "to_local"):  # an FSDP DTensor: this rank's shard
                tensor = tensor.to_local()
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), tensor.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
