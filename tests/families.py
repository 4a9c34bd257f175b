"""Tiny random-init checkpoints of model families shipped with transformers, each saved with its own tokenizer class.

What a user brings to fastrm is a Hugging Face checkpoint folder: a config, weights and the model family's own
tokenizer, with that family's special-token conventions (BOS or none, EOS as pad, ``[CLS] ... [SEP]``, ...).
:func:`build_checkpoint` writes such a folder for a :class:`Family` in well under a second, offline: vocabularies
and merges are written here (byte-level BPE for GPT-2 style tokenizers, byte-fallback BPE for SentencePiece style
ones, WordPiece, Unigram), never downloaded. Decoders are saved as ``*ForCausalLM``, encoders as ``*ForMaskedLM``,
as pretrained checkpoints are; a reward model then gets a fresh head, as it would on a real checkpoint.

Use from a test module (``tests/`` is on ``sys.path``)::

    from families import FAMILIES, build_checkpoints

    @pytest.fixture(scope="module")
    def checkpoints(tmp_path_factory):
        return build_checkpoints(tmp_path_factory.mktemp("families"))
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers as T

# The embedded arithmetic task's characters: every family's vocabulary covers them.
CHARACTERS = "0123456789+-*= \n:" + string.ascii_lowercase
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _byte_level_vocab(specials: list[str]) -> tuple[dict, list]:
    """GPT-2 style byte-level BPE: the specials, the 256 byte symbols, and a couple of merges."""
    from tokenizers import pre_tokenizers

    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges = [("Ġ", "1"), ("1", "0")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def _sentencepiece_vocab(specials: list[str]) -> tuple[dict, list]:
    """SentencePiece style BPE (Llama, Gemma): the specials, 256 byte-fallback tokens, ``▁`` and characters."""
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for symbol in ["▁"] + [c for c in CHARACTERS if c.strip()]:
        vocab.setdefault(symbol, len(vocab))
    merges = [("▁", "1"), ("1", "0")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def _wordpiece_vocab() -> dict:
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for c in CHARACTERS:
        if c.strip():
            vocab.setdefault(c, len(vocab))
            vocab.setdefault("##" + c, len(vocab))
    return vocab


def llama_tokenizer():  # BOS added, no pad (fastrm pads with <unk>)
    vocab, merges = _sentencepiece_vocab(["<unk>", "<s>", "</s>"])
    return T.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def gemma_tokenizer():  # BOS added, its own pad
    vocab, merges = _sentencepiece_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return T.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def qwen2_tokenizer():  # no BOS; pad = EOS = <|endoftext|>, as the Qwen2.5 base checkpoints
    vocab, merges = _byte_level_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return T.Qwen2Tokenizer(vocab=vocab, merges=merges)


def gpt2_tokenizer():  # one special token, <|endoftext|>; no pad (fastrm pads with EOS)
    vocab, merges = _byte_level_vocab(["<|endoftext|>"])
    return T.GPT2Tokenizer(vocab=vocab, merges=merges)


def gpt_neox_tokenizer():  # no BOS added; its own <|padding|>
    vocab, merges = _byte_level_vocab(["<|endoftext|>", "<|padding|>"])
    return T.GPTNeoXTokenizer(vocab=vocab, merges=merges)


def opt_tokenizer():  # GPT-2 BPE that starts every text with </s> (OPT's BOS is its EOS), its own pad
    vocab, merges = _byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>"])
    return T.GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", add_bos_token=True)


def bert_tokenizer():  # [CLS] text [SEP]; no BOS / EOS
    return T.BertTokenizer(vocab=_wordpiece_vocab())


def roberta_tokenizer():  # <s> text </s>
    vocab, merges = _byte_level_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return T.RobertaTokenizer(vocab=vocab, merges=merges)


def deberta_v2_tokenizer():  # Unigram; [CLS] text [SEP]
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    pieces = [(s, 0.0) for s in specials] + [("▁", -2.0)]
    pieces += [(c, -3.0) for c in CHARACTERS if c.strip()] + [("▁" + c, -2.5) for c in CHARACTERS if c.strip()]
    return T.DebertaV2Tokenizer(vocab=pieces)


def _ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)


@dataclass(frozen=True)
class Family:
    """A model family: its tokenizer, a tiny config, and what fastrm does with it (checked by the tests)."""

    name: str
    encoder: bool
    tokenizer: Callable[[], object]
    config: Callable[[int, dict], object]  # (embedding rows, special token ids) -> a transformers config
    positions: str  # rotary | learned | absolute+offset | ...
    packs: bool  # packed=auto packs its reward / SFT batches (the probe proves them exact); else length buckets
    note: str = ""


FAMILIES = [
    Family("llama", False, llama_tokenizer, lambda rows, ids: T.LlamaConfig(
        vocab_size=rows, num_key_value_heads=2, max_position_embeddings=128, **SIZES, **ids),
        "rotary", True, "BOS, pad = <unk>"),
    Family("qwen2", False, qwen2_tokenizer, lambda rows, ids: T.Qwen2Config(
        vocab_size=rows, num_key_value_heads=2, max_position_embeddings=128, **SIZES, **ids),
        "rotary", True, "no BOS; pad = EOS, so reward sequences end without EOS"),
    Family("mistral", False, llama_tokenizer, lambda rows, ids: T.MistralConfig(
        vocab_size=rows, num_key_value_heads=2, max_position_embeddings=128, sliding_window=6, **SIZES, **ids),
        "rotary, sliding window 6", True, "sequences longer than the window"),
    Family("gpt_neox", False, gpt_neox_tokenizer, lambda rows, ids: T.GPTNeoXConfig(
        vocab_size=rows, max_position_embeddings=128, rotary_pct=0.5, **SIZES, **ids),
        "partial rotary, parallel residual", True, "no BOS; its own pad"),
    Family("gpt2", False, gpt2_tokenizer, lambda rows, ids: T.GPT2Config(
        vocab_size=rows, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128, **ids),
        "learned absolute", True, "no BOS; pad = EOS = <|endoftext|>"),
    Family("opt", False, opt_tokenizer, lambda rows, ids: T.OPTConfig(
        vocab_size=rows, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=128, **ids),
        "learned absolute (offset 2)", True, "its own mask ignores position ids: fastrm's varlen attention"),
    Family("gemma2", False, gemma_tokenizer, lambda rows, ids: T.Gemma2Config(
        vocab_size=rows, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=6,
        **SIZES, **ids),
        "rotary, soft-capped attention and logits, sliding window", True,
        "no SDPA in transformers; soft-capped logits: fused log-probs with its cap"),
    Family("bert", True, bert_tokenizer, lambda rows, ids: T.BertConfig(
        vocab_size=rows, max_position_embeddings=128, **SIZES, **ids),
        "learned absolute", False, "[CLS] text [SEP]; pooler + classifier head"),
    Family("roberta", True, roberta_tokenizer, lambda rows, ids: T.RobertaConfig(
        vocab_size=rows, max_position_embeddings=130, **SIZES, **ids),
        "learned absolute (offset by pad)", False, "<s> text </s>; classification head on <s>"),
    Family("deberta_v2", True, deberta_v2_tokenizer, lambda rows, ids: T.DebertaV2Config(
        vocab_size=rows, max_position_embeddings=128, **SIZES, **ids),
        "relative (disentangled)", False, "no SDPA in transformers; Unigram tokenizer"),
]
BY_NAME = {f.name: f for f in FAMILIES}
DECODERS = [f.name for f in FAMILIES if not f.encoder]
ENCODERS = [f.name for f in FAMILIES if f.encoder]


def embedding_rows(tokenizer) -> int:
    """The tokenizer's size rounded up to a multiple of 64, as real checkpoints pad their vocabularies."""
    return -(-len(tokenizer) // 64) * 64


def build_checkpoint(family: Family | str, folder: Path, seed: int = 0) -> Path:
    """Write ``folder``: a random-init tiny ``family`` model (``*ForCausalLM`` / ``*ForMaskedLM``) and its tokenizer."""
    family = BY_NAME[family] if isinstance(family, str) else family
    tokenizer = family.tokenizer()
    config = family.config(embedding_rows(tokenizer), _ids(tokenizer))
    auto = T.AutoModelForMaskedLM if family.encoder else T.AutoModelForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = auto.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_checkpoints(root: Path, names=None) -> dict[str, Path]:
    """:func:`build_checkpoint` of every family (or of ``names``) under ``root``: ``{name: folder}``."""
    return {name: build_checkpoint(name, Path(root) / name) for name in (names or [f.name for f in FAMILIES])}
