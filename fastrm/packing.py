"""Padding-free execution, decided per model at load time: packed rows where they are exact, else length buckets.

A batch runs in one of three layouts (:mod:`fastrm.layout`): ``packed`` (one row, variable-length attention),
``bucketed`` (padded micro-batches of similar length, exact for every model) or ``padded``. Packed rows are exact
only for models whose attention goes through transformers' attention interface and whose every other layer works
token by token; :func:`verify_packing` proves it for one model by a probe (packed against padded: outputs, hidden
states and gradients), and :func:`choose_packing` turns the ``packed`` setting into the decision a trainer holds:

``packed=auto`` (the trainers' default) picks ``packed`` where the load-time probe shows it equals the padded
forward for this model, else ``bucketed``, and logs one line saying which and why.

This module sits above :mod:`fastrm.models` (the probe runs their forwards); the layouts and the attention sit
below them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from fastrm.config import ConfigError
from fastrm.layout import (
    FLASH,
    IGNORE_INDEX,
    PackingUnsupported,
    PaddedBatch,
    attention_path,
    base_attention,
    count_varlen_calls,
    disable_varlen,
    enable_varlen,
    first_id,
    pack,
    text_config,
)
from fastrm.layout.varlen import attention_bucket_overhead
from fastrm.models import backbone_hidden, base_model, reward_scores, token_logprobs

log = logging.getLogger("fastrm")

SETTINGS = ("auto", "true", "false", "bucketed")
SETTING_HELP = ("padding-free batches: auto (packed rows where exact for the model, else length buckets) | true "
                "(packed rows; an error where not exact) | bucketed (padded micro-batches of similar lengths) | "
                "false (plain padded batches)")

# ============================================================================ exact for this model?

HEADS = ("reward", "causal_lm", "backbone")  # what a probed model ends in: its output is compared too
PROBE_LENGTHS = (5, 17, 11, 26)
# Largest relative difference (max |packed - padded| / max |padded|, over hidden states, outputs and input
# gradients) still counted as equal. Packing only reorders float sums (other matmul shapes, attention per
# sequence): in float32 that moves results by ~1e-6 relative; a model that leaks attention across sequences,
# reads positions from the mask, or pools another token is off by 1e-2 to 1. In bf16/fp16 the same reordering
# moves results by a few bf16 ulps (2**-8 each).
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass
class Packing:
    """How a model runs its batches (``mode``: packed | bucketed | padded), and why."""

    mode: str
    reason: str
    attention: str | None = None  # the packed rows' attention (packed mode)

    def describe(self) -> str:
        if self.mode == "packed":
            return f"packed rows, attention {self.attention} ({self.reason})"
        if self.mode == "bucketed":
            return f"length-bucketed padded micro-batches ({self.reason})"
        return f"padded batches ({self.reason})"

    def adopt(self, model):
        """Give ``model``, another instance of the probed architecture (e.g. the reference reloaded in 8 bits), the
        attention this decision needs."""
        if self.mode == "packed":
            enable_varlen(model)


def normalize_setting(value) -> str:
    """``packed=true`` / ``false`` as YAML or OmegaConf hand them over (booleans, or their str())."""
    text = str(value).lower()
    return {"1": "true", "0": "false", "yes": "true", "no": "false", "on": "true", "off": "false"}.get(text, text)


def _probe_lengths(model) -> list[int]:
    """A few lengths, and one past the sliding window where the model has a short one."""
    config = text_config(model)
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    lengths = [n for n in PROBE_LENGTHS if n <= longest]
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window + 8 <= min(longest, 1024):
        lengths.append(window + 8)
    return lengths


def _probe_batch(model, special_ids, generator) -> dict:
    config = text_config(model)
    vocab = model.get_input_embeddings().num_embeddings
    pad, eos = first_id(config.pad_token_id), first_id(getattr(config, "eos_token_id", None))
    excluded = {i for i in (pad, eos, first_id(getattr(config, "bos_token_id", None)), *special_ids) if i is not None}
    lengths = _probe_lengths(model)
    if pad is None:
        raise PackingUnsupported("the model config has no pad_token_id (its padded forward cannot batch)")
    ids = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(0, vocab, (n,), generator=generator)
        for k in range(n):  # ordinary tokens only (pad inside a sequence would change what the padded head reads)
            while int(tokens[k]) in excluded:
                tokens[k] = int(torch.randint(0, vocab, (1,), generator=generator))
        if eos is not None:
            tokens[-1] = eos  # as every fastrm sequence ends
        ids[row, :n], mask[row, :n] = tokens, 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return PaddedBatch(ids, mask, labels)


@contextlib.contextmanager
def _capture_embeddings(model):
    """The input embeddings of every forward, as leaves that gradients can be taken to."""
    captured = []

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _probe_outputs(model, head: str, batch: PaddedBatch, packed: bool, weights: dict):
    """Hidden states of the real tokens, the head's output, and the gradient of a fixed random function of
    both with respect to the input embeddings (real tokens), for a padded or packed batch."""
    inputs = pack(batch) if packed else batch
    real = batch.attention_mask.reshape(-1) != 0
    with _capture_embeddings(model) as captured:
        hidden = backbone_hidden(base_model(model), inputs)  # the padded layout either way
        hidden = hidden.reshape(-1, hidden.shape[-1])[real]
        if head == "reward":  # padded: the Hugging Face model's own forward, as any tool scores the checkpoint
            out = reward_scores(model, inputs)
        elif head == "causal_lm":
            out = token_logprobs(model, inputs)
        else:
            out = hidden.new_zeros(())
        weights.setdefault("hidden", torch.randn(hidden.shape, generator=weights["generator"]).to(hidden))
        weights.setdefault("out", torch.randn(out.shape, generator=weights["generator"]).to(out))
        loss = (hidden.float() * weights["hidden"].float()).sum() + (out.float() * weights["out"].float()).sum()
        grads = torch.autograd.grad(loss, captured)
    grad = sum(g.reshape(-1, g.shape[-1]) if packed else g.reshape(-1, g.shape[-1])[real] for g in grads)
    return {"hidden states": hidden.detach(), "outputs": out.detach(), "input gradients": grad}


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _probe(model, kind: str, special_ids, autocast_dtype) -> tuple[float, float, str]:
    """(largest relative difference packed vs padded, its tolerance, what differed most)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(20240611)
    batch = _probe_batch(model, special_ids, generator).to(device)
    weights = {"generator": generator}
    was_training = model.training
    model.eval()  # no dropout: both ways must compute the same function
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # every length its own attention bucket: the probe runs the gather / scatter of long-tailed batches too
    try:
        with torch.enable_grad(), autocast, attention_bucket_overhead(0), count_varlen_calls() as calls:
            want = _probe_outputs(model, kind, batch, False, weights)
            calls.clear()
            got = _probe_outputs(model, kind, batch, True, weights)
    finally:
        model.train(was_training)
    if base_attention(model) not in FLASH and not calls:
        raise PackingUnsupported("its attention layers never received the packed row's sequence boundaries (they do "
                                 "not go through transformers' attention interface)")
    diffs = {name: _relative_difference(got[name], want[name]) for name in want}
    worst = max(diffs, key=diffs.get)
    dtype = autocast_dtype or next(model.parameters()).dtype
    return diffs[worst], PROBE_TOLERANCE.get(dtype, 3e-2), worst


def verify_packing(model, head: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether packed rows are exact for ``model`` (``head``: reward | causal_lm | backbone), and why.

    Switches the model to variable-length attention (:func:`enable_varlen`), then runs a probe: a few random
    sequences of different lengths ending in EOS, padded and packed, in eval mode; the hidden states of every
    real token, the head's output (reward scores as the Hugging Face forward reads them / next-token
    log-probs) and the gradients with respect to the input embeddings must agree (``PROBE_TOLERANCE``), and
    every attention layer must have attended per sequence. With ``autocast_dtype`` the probe also runs under
    autocast, as training will (the half-precision kernels). Not exact: the model gets its own attention
    back and the reason is returned."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    try:
        enable_varlen(model)
        checks = [None] + ([autocast_dtype] if autocast_dtype is not None else [])
        summary = []
        for dtype in checks:
            diff, tol, worst = _probe(model, head, special_ids, dtype)
            where = f" under {str(dtype)[6:]} autocast" if dtype is not None else ""
            if not diff <= tol:
                raise PackingUnsupported(f"packed {worst} differ from padded by {diff:.2g}{where} (relative; "
                                         f"tolerance {tol:g})")
            summary.append(f"{diff:.1g}{where}")
    except PackingUnsupported as err:
        disable_varlen(model)
        return False, str(err)
    except Exception as err:  # noqa: BLE001 - any failure of the packed forward means: not for this model
        disable_varlen(model)
        return False, f"the packed forward fails ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
    return True, f"probe: packed equals padded, max relative difference {', '.join(summary)}"


def choose_packing(model, setting: str, head: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None,
                   name: str = "model") -> Packing:
    """The load-time decision for one model (``setting``: auto | true | bucketed | false), logged in one line.

    auto: packed rows where :func:`verify_packing` proves them exact, else length-bucketed padded batches (exact
    for every model). true: packed rows, and a ``ConfigError`` naming the reason where they are not exact."""
    setting = normalize_setting(setting)
    if setting not in SETTINGS:
        raise ValueError(f"setting packed={setting!r}: must be one of {', '.join(SETTINGS)}")
    label = f"{name} {type(model).__name__}"
    if setting == "false":
        decision = Packing("padded", "packed=false")
    elif setting == "bucketed":
        decision = Packing("bucketed", "packed=bucketed")
    else:
        exact, why = verify_packing(model, head, special_ids=special_ids, autocast_dtype=autocast_dtype)
        if exact:
            device = next(model.parameters()).device
            half = autocast_dtype is not None or next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
            decision = Packing("packed", why, attention_path(model, device, half))
        elif setting == "true":
            raise ConfigError(f"setting packed=true: packing is not exact for {label}: {why}. Use packed=auto "
                              "(length-bucketed batches where packing is not exact) or packed=bucketed")
        else:
            decision = Packing("bucketed", f"packing is not exact for {type(model).__name__}: {why}")
    log.info("packing (%s): %s", label, decision.describe())
    return decision
