"""Models and tokenizers from a GGUF file (llama.cpp's format, e.g. ``SmolLM2-135M-Instruct-Q4_1.gguf``).

``model.name_or_path`` (and ``tokenizer``) may be the path of a ``.gguf`` file: transformers' GGUF loader
(``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package) dequantizes its weights to float32 and
builds the tokenizer from the file's vocabulary, so training starts from the file as from a model folder. A
trained model is saved as an ordinary Hugging Face folder (safetensors), never back to GGUF.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastrm.config import ConfigError, require_setting

SUFFIX = ".gguf"


def is_gguf(name_or_path) -> bool:
    return isinstance(name_or_path, (str, Path)) and str(name_or_path).lower().endswith(SUFFIX)


def check(name_or_path: str, setting: str):
    """An existing ``.gguf`` file, and the ``gguf`` package to read it."""
    path = Path(name_or_path).expanduser()
    require_setting(path.is_file(), setting, name_or_path, "no such .gguf file")
    require_setting(importlib.util.find_spec("gguf") is not None, setting, name_or_path,
            "reading a .gguf file needs the gguf package (pip install gguf)")


def pretrained_args(name_or_path: str) -> tuple[str, dict]:
    """``(path, kwargs)`` for a config's or tokenizer's ``from_pretrained``: the file's folder and
    ``gguf_file=<its name>`` for a .gguf file, else the name unchanged and no keyword."""
    if not is_gguf(name_or_path):
        return name_or_path, {}
    path = Path(name_or_path).expanduser()
    return str(path.parent), {"gguf_file": path.name}


def model_args(name_or_path: str, quantization: dict) -> tuple[str, dict]:
    """``(path, kwargs)`` for a model's ``from_pretrained``, ``quantization`` (bitsandbytes keywords) included. A
    .gguf file loads dense: every weight dequantized to float32 (transformers would otherwise keep them in GGUF
    blocks where a matmul kernel is installed: not trainable, not savable)."""
    path, kwargs = pretrained_args(name_or_path)
    if not kwargs:
        return path, dict(quantization)
    if quantization:
        raise ConfigError(f"{name_or_path}: a .gguf file loads dequantized to float32; 8-/4-bit loading "
                          "(load_in_8bit, lora.quantize) needs a Hugging Face model folder")
    from transformers import GgufConfig

    return path, {**kwargs, "quantization_config": GgufConfig(dequantize=True)}


def as_dense(model):
    """A model loaded from a .gguf file as an ordinary one (its weights are dense float32 already): without the
    GGUF quantizer's mark, which would refuse ``save_pretrained``."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "GgufHfQuantizer":
        quantizer.remove_quantization_config(model)
    return model
