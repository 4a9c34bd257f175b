"""``fastrm export ADAPTER OUTPUT``: a LoRA adapter merged into its base model, written as a plain checkpoint.

The adapter folder is what a LoRA run saves (``output_dir/final`` or a ``checkpoint-<step>``). The output is an
ordinary Hugging Face folder, the merged model and the tokenizer, that ``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification.from_pretrained`` load with no peft: for a reward model it scores as the
adapter model does (one label, the pad token fastrm used).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from fastrm import checkpoint as ckpt
from fastrm import lora
from fastrm.config import ConfigError
from fastrm.models import ModelConfig, load_causal_lm, load_reward_model
from fastrm.runtime import setup_logging
from fastrm.tokenization import TOKENIZER_FILES, load_tokenizer

log = logging.getLogger("fastrm")


def export(adapter: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Merge the LoRA adapter in the folder ``adapter`` into its base and write model + tokenizer to ``output``
    (through a temporary folder renamed into place). Returns ``output``."""
    adapter, output = Path(adapter), Path(output)
    config = lora.adapter_config(str(adapter))
    if config is None:
        raise ConfigError(f"{adapter} holds no LoRA adapter ({lora.ADAPTER_CONFIG}); give the "
                          f"output_dir/final or checkpoint folder of a run with lora.r > 0")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} exists and is not empty; choose another folder or pass --overwrite")
    task = config.get("task_type")
    if task not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ConfigError(f"{adapter} is a {task!r} adapter; fastrm writes CAUSAL_LM (sft, ppo) and "
                          f"SEQ_CLS (train-rm) adapters")
    tokenizer = load_tokenizer("auto", str(adapter) if _has_tokenizer(adapter) else lora.base_of(str(adapter)))
    model_config = ModelConfig(name_or_path=str(adapter))
    load = load_reward_model if task == "SEQ_CLS" else load_causal_lm
    model = load(model_config, tokenizer, torch.device("cpu"))  # the base with the adapter merged in

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f"{ckpt.TMP_PREFIX}{output.name}-{os.getpid()}"
    if tmp.exists():
        ckpt.discard(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if output.exists() or output.is_symlink():
        ckpt.discard(output)
    os.replace(tmp, output)
    log.info("%s merged into %s: written to %s", adapter, lora.base_of(str(adapter)), output)
    return output


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastrm export", description="Merge a LoRA adapter (output_dir/final or a checkpoint of a run with "
        "lora.r > 0) into its base model and write a plain checkpoint folder (model + tokenizer) that "
        "from_pretrained loads without peft.")
    parser.add_argument("adapter", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("output", help="the folder to write the merged model and tokenizer to")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    setup_logging()
    out = export(args.adapter, args.output, overwrite=args.overwrite)
    print(f"merged model and tokenizer written to {out}")
    return 0
