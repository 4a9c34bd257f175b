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
from torch import nn

from fastrm import runtime
from fastrm.config import ConfigError
from fastrm.layout import (
    FLASH,
    IGNORE_INDEX,
    PackingUnsupported,
    PaddedBatch,
    arrange,
    attention_path,
    base_attention,
    count_varlen_calls,
    disable_varlen,
    enable_varlen,
    first_id,
    text_config,
)
from fastrm.layout.varlen import attention_bucket_overhead
from fastrm.models import backbone_hidden, base_model, reward_scores, token_logprobs

log = logging.getLogger("fastrm")

SETTINGS = ("auto", "true", "unshared", "false", "bucketed")
SETTING_HELP = ("padding-free batches: auto (packed rows where exact for the model, a shared prompt computed once "
                "for all its responses where that is exact too, else length buckets) | true (as auto; an error where "
                "packing is not exact) | unshared (as auto, every sequence computed whole) | bucketed (padded "
                "micro-batches of similar lengths) | false (plain padded batches)")

# ============================================================================ exact for this model?

HEADS = ("reward", "causal_lm", "backbone")  # what a probed model ends in: its output is compared too
PROBE_LENGTHS = (5, 17, 11, 26)
PROBE_SHARED_ROWS, PROBE_SHARED_PREFIX = (1, 2, 3), 7  # these rows begin with the same 7 tokens: one prompt
# The probe's tolerance comes from the model itself. Packing only reorders float sums (other matmul shapes,
# attention per sequence); so does any change of batch shape. The padded forward recomputed in float64 is the
# truth; the padded forward in the working dtype is some distance from it (rounding, grown over the model's depth
# and width); the packed forward must be no further from the truth than PROBE_FACTOR times that distance. Two
# roundings of the same sums are of one size (their ratio stays within ~2 over random seeds); a model that leaks
# attention across sequences, reads positions from the mask, or pools another token is off by 1e-2 to 1,
# thousands of times the rounding. The floor (PROBE_FLOOR_ULPS ulps of the working dtype) keeps a quantity that
# the working dtype happens to compute exactly (a zero) from demanding exactness of the packed run.
PROBE_FACTOR = 4.0
PROBE_FLOOR_ULPS = 4
# Where no float64 copy of the forward can run (flash-attn, quantized weights, out of memory), packed is compared
# with padded directly: this many ulps of the working dtype per layer, relative.
PROBE_FALLBACK_ULPS_PER_LAYER = 64


@dataclass
class Packing:
    """How a model runs its batches (``mode``: shared | packed | bucketed | padded), and why."""

    mode: str
    reason: str
    attention: str | None = None  # the packed rows' attention (shared and packed modes)

    def describe(self) -> str:
        if self.mode == "shared":
            return f"packed rows, a shared prompt computed once, attention {self.attention} ({self.reason})"
        if self.mode == "packed":
            return f"packed rows, attention {self.attention} ({self.reason})"
        if self.mode == "bucketed":
            return f"length-bucketed padded micro-batches ({self.reason})"
        return f"padded batches ({self.reason})"

    def adopt(self, model):
        """Give ``model``, another instance of the probed architecture (e.g. the reference reloaded in 8 bits), the
        attention this decision needs."""
        if self.mode in ("shared", "packed"):
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
    # (a row past a short sliding window shares the prompt too: the window must count the prompt's positions)
    shared = [r for r in PROBE_SHARED_ROWS if r < len(lengths)] + list(range(len(PROBE_LENGTHS), len(lengths)))
    groups = torch.full((len(lengths),), -1, dtype=torch.long)
    for r in shared:  # a prompt and its responses: the shared layout computes the prompt once
        ids[r, :PROBE_SHARED_PREFIX] = ids[shared[0], :PROBE_SHARED_PREFIX]
        groups[r] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return PaddedBatch(ids, mask, labels, group_ids=groups)


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


def _probe_outputs(model, head: str, batch: PaddedBatch, mode: str, weights: dict):
    """Hidden states of the real tokens, the head's output, and the gradient of a fixed random function of
    both with respect to the input embeddings (real tokens; in the ``shared`` layout, its row's tokens), for the
    batch in layout ``mode`` (padded | packed | shared)."""
    inputs = arrange(batch, mode)
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
    grad = sum(g.reshape(-1, g.shape[-1]) if mode != "padded" else g.reshape(-1, g.shape[-1])[real] for g in grads)
    return {"hidden states": hidden.detach(), "outputs": out.detach(), "input gradients": grad,
            "row": inputs}


def _fold_into(shared, outputs: dict) -> dict:
    """Unshared probe outputs compared with a shared row's: each real token's input gradient added into the row
    position that computed it (a prompt's, from all its responses)."""
    row = shared["row"]
    source = row.source[row.source >= 0]
    grad = outputs["input gradients"]
    folded = grad.new_zeros((row.computed_tokens, grad.shape[-1])).index_add_(0, source, grad)
    return {**outputs, "input gradients": folded}


def _relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    return diff / scale if scale > 0 else diff


def _float64_castable(model) -> bool:
    params = list(model.parameters())
    if not all(type(p) is nn.Parameter and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               for p in params) or base_attention(model) in FLASH:
        return False
    device = params[0].device
    if device.type == "cuda":  # a float64 copy of a large model would not fit beside it: compare with padded
        extra = sum(p.numel() * (8 - p.element_size()) for p in params)
        return extra < 0.5 * torch.cuda.mem_get_info(device)[0]
    return True


@contextlib.contextmanager
def _in_float64(model):
    """The model's floating parameters and buffers in float64 for the block, each back to its own dtype after
    (float16/bfloat16/float32 -> float64 -> back is exact; tied weights are one tensor and stay tied)."""
    saved = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    saved.setdefault((id(module), id(store), name), (store, name, tensor.dtype))
    try:
        model.to(torch.float64)
        yield
    finally:
        for store, name, dtype in saved.values():
            tensor = store[name]
            if tensor.dtype != dtype:
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    store[name] = tensor.to(dtype)


def _layers(model) -> int:
    config = text_config(model)
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1)


@dataclass
class ProbeResult:
    """One probe run: the packed forward's distance from the truth, what was allowed, and how that was derived."""

    error: float  # the largest relative distance of the packed run, over hidden states, outputs, input gradients
    tolerance: float  # what it was allowed, for that quantity
    worst: str  # the quantity where packed was furthest beyond its tolerance
    basis: str  # how the tolerance came about, for the log

    @property
    def exact(self) -> bool:
        return self.error <= self.tolerance


def _judge(packed: dict, padded: dict, truth: dict | None, dtype: torch.dtype, layers: int) -> ProbeResult:
    ulp = torch.finfo(dtype).eps
    if truth is None:
        tol = ulp * PROBE_FALLBACK_ULPS_PER_LAYER * layers
        diffs = {name: _relative_difference(packed[name], padded[name]) for name in padded}
        worst = max(diffs, key=diffs.get)
        return ProbeResult(diffs[worst], tol, worst, f"vs padded; tolerance {PROBE_FALLBACK_ULPS_PER_LAYER} "
                                                     f"{str(dtype)[6:]} ulps x {layers} layers = {tol:.2g}")
    results = []
    for name in truth:
        padded_error = _relative_difference(padded[name], truth[name])
        tol = PROBE_FACTOR * max(padded_error, PROBE_FLOOR_ULPS * ulp)
        results.append(ProbeResult(_relative_difference(packed[name], truth[name]), tol, name,
                                   f"vs float64; padded {str(dtype)[6:]} is {padded_error:.2g} from it, "
                                   f"tolerance {PROBE_FACTOR:g}x that = {tol:.2g}"))
    return max(results, key=lambda r: r.error / r.tolerance)


def _probe(model, kind: str, special_ids, autocast_dtype, shared: bool = False) -> dict[str, ProbeResult]:
    """Packed (and with ``shared``, shared-prefix) vs padded, and vs the padded forward in float64 where it can run:
    ``{"packed": result, "shared": result}``. A shared row that fails to run is a shared result of infinite error."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(20240611)
    batch = _probe_batch(model, special_ids, generator).to(device)
    weights = {"generator": generator}
    was_training = model.training
    model.eval()  # no dropout: both ways must compute the same function
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # every length its own attention bucket: the probe runs the gather / scatter of long-tailed batches too
    truth, got_shared, shared_error = None, None, None
    try:
        with torch.enable_grad(), attention_bucket_overhead(0), count_varlen_calls() as calls:
            with autocast:
                want = _probe_outputs(model, kind, batch, "padded", weights)
                calls.clear()
                got = _probe_outputs(model, kind, batch, "packed", weights)
                seen = list(calls)
                if shared:
                    try:
                        got_shared = _probe_outputs(model, kind, batch, "shared", weights)
                    except Exception as err:  # noqa: BLE001 - any failure: no shared prefixes for this model
                        shared_error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            if _float64_castable(model):
                try:
                    with _in_float64(model):
                        truth = _probe_outputs(model, kind, batch, "padded", weights)
                    if not all(bool(t.isfinite().all()) for k, t in truth.items() if k != "row"):
                        log.debug("packing probe: the float64 forward is not finite; comparing with padded directly")
                        truth = None
                except Exception as err:  # noqa: BLE001 - out of memory, a kernel refusing float64 or non-finite
                    # logits (a float64 mask of finfo.min summed twice gives -inf rows, NaN through 0 * value)
                    log.debug("packing probe: no float64 forward (%s); comparing with padded directly", err)
                    truth = None
    finally:
        model.train(was_training)
    if base_attention(model) not in FLASH and not seen:
        raise PackingUnsupported("its attention layers never received the packed row's sequence boundaries (they do "
                                 "not go through transformers' attention interface)")
    dtype = autocast_dtype or next(model.parameters()).dtype
    results = {"packed": _judge(_values(got), _values(want), _values(truth), dtype, _layers(model))}
    if shared_error is not None:
        results["shared"] = ProbeResult(float("inf"), 0.0, f"forward ({shared_error})", "it fails")
    elif got_shared is not None:
        results["shared"] = _judge(_values(got_shared), _values(_fold_into(got_shared, want)),
                                   _values(_fold_into(got_shared, truth)) if truth is not None else None,
                                   dtype, _layers(model))
    return results


def _values(outputs: dict | None) -> dict | None:
    return None if outputs is None else {k: v for k, v in outputs.items() if k != "row"}


def _verify(model, head: str, special_ids, autocast_dtype, shared: bool) -> tuple[bool, str, bool, str]:
    """(packed exact, why; shared prefixes exact, why): the probe in the working dtype and, with
    ``autocast_dtype``, under autocast as training will run."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    try:
        enable_varlen(model)
        checks = [None] + ([autocast_dtype] if autocast_dtype is not None else [])
        summary, shared_summary, shared_why = [], [], None
        for dtype in checks:
            results = _probe(model, head, special_ids, dtype, shared=shared and shared_why is None)
            where = f" under {str(dtype)[6:]} autocast" if dtype is not None else ""
            result = results["packed"]
            if not result.exact:
                raise PackingUnsupported(f"packed {result.worst} differ from padded{where}: {result.error:.2g} "
                                         f"(relative) {result.basis}")
            summary.append(f"{result.error:.1g}{where} ({result.worst} {result.basis})")
            if "shared" in results:
                one = results["shared"]
                if one.exact:
                    shared_summary.append(f"{one.error:.1g}{where}")
                else:
                    shared_why = f"shared-prefix {one.worst} differ from unshared{where}: {one.error:.2g} ({one.basis})"
    except PackingUnsupported as err:
        disable_varlen(model)
        return False, str(err), False, ""
    except Exception as err:  # noqa: BLE001 - any failure of the packed forward means: not for this model
        disable_varlen(model)
        return False, f"the packed forward fails ({type(err).__name__}: {str(err).splitlines()[0][:160]})", False, ""
    why = f"probe: packed equals padded, max relative difference {', '.join(summary)}"
    if not shared:
        return True, why, False, ""
    if shared_why is not None:
        return True, why, False, shared_why
    return True, why, True, f"shared prompt equals unshared, max relative difference {', '.join(shared_summary)}"


def verify_packing(model, head: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether packed rows are exact for ``model`` (``head``: reward | causal_lm | backbone), and why.

    Switches the model to variable-length attention (:func:`enable_varlen`), then runs a probe: a few random
    sequences of different lengths ending in EOS, padded and packed, in eval mode; the hidden states of every
    real token, the head's output (reward scores as the Hugging Face forward reads them / next-token
    log-probs) and the gradients with respect to the input embeddings are compared with the padded forward
    recomputed in float64: packed may be no further from it than ``PROBE_FACTOR`` times the padded forward in
    the working dtype is (the model's own rounding at its depth), and every attention layer must have attended
    per sequence. With ``autocast_dtype`` the probe also runs under autocast, as training will (the
    half-precision kernels). Not exact: the model gets its own attention back and the reason is returned."""
    exact, why, _, _ = _verify(model, head, special_ids, autocast_dtype, shared=False)
    return exact, why


def verify_sharing(model, head: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None
                   ) -> tuple[bool, str]:
    """Whether the ``shared`` layout (:mod:`fastrm.layout.shared`: a prompt computed once for all its responses) is
    exact for ``model``: the probe of :func:`verify_packing` with three of its rows beginning alike, the shared
    row's hidden states, head outputs and input gradients (each prompt token's summed over its responses) held to
    the same float64-derived tolerance. Packing itself must be exact first."""
    exact, why, shared, shared_why = _verify(model, head, special_ids, autocast_dtype, shared=True)
    if not exact:
        return False, why
    return shared, shared_why


def choose_packing(model, setting: str, head: str, *, special_ids=(), autocast_dtype: torch.dtype | None = None,
                   name: str = "model") -> Packing:
    """The load-time decision for one model (``setting``: auto | true | unshared | bucketed | false), logged in one
    line.

    auto: packed rows where :func:`verify_packing` proves them exact (``shared``: each prompt once for all its
    responses, where :func:`verify_sharing` proves that exact too), else length-bucketed padded batches (exact for
    every model). true: the same, and a ``ConfigError`` naming the reason where packing is not exact. unshared:
    as auto without shared prompts."""
    setting = normalize_setting(setting)
    if setting not in SETTINGS:
        raise ValueError(f"setting packed={setting!r}: must be one of {', '.join(SETTINGS)}")
    label = f"{name} {type(model).__name__}"
    if setting == "false":
        decision = Packing("padded", "packed=false")
    elif setting == "bucketed":
        decision = Packing("bucketed", "packed=bucketed")
    else:
        exact, why, shared, shared_why = _verify(model, head, special_ids, autocast_dtype,
                                                 shared=setting != "unshared")
        if exact:
            device = next(model.parameters()).device
            half = autocast_dtype is not None or next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
            if shared:
                decision = Packing("shared", f"{why}; {shared_why}", attention_path(model, device, half))
            else:
                note = "packed=unshared" if setting == "unshared" else f"no shared prompts: {shared_why}"
                decision = Packing("packed", f"{why}; {note}", attention_path(model, device, half))
        elif setting == "true":
            raise ConfigError(f"setting packed=true: packing is not exact for {label}: {why}. Use packed=auto "
                              "(length-bucketed batches where packing is not exact) or packed=bucketed")
        else:
            decision = Packing("bucketed", f"packing is not exact for {type(model).__name__}: {why}")
    log.info("packing (%s): %s", label, decision.describe())
    runtime.release_free_memory()  # the probe's float64 copy of the model, freed but still resident
    return decision
