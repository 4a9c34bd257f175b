"""TRL on fastrm's kernels: ``patch()`` routes TRL's own trainers through fastrm's ops, with an undo.

One line for a TRL user, before ``trainer.train()``::

    import fastrm.integrations.trl; fastrm.integrations.trl.patch()

or scoped (undone on exit, the report says what ran)::

    with fastrm.integrations.trl.patch() as report:
        trainer.train()
    print(report)

What is routed (each site is looked up in the installed TRL and checked, never assumed; the report and the
``fastrm`` logger say which sites were patched and which were not, and why):

* ``fused_lm_head``: ``trl.trainer.utils._ChunkedLogProbFunction``, the chunked fused LM head that TRL 1.x's
  ``add_fused_lm_head`` installs on the policy and reference models of GRPOTrainer and RLOOTrainer (and SFT,
  DPO, KTO, async GRPO): per-token log-probs and entropies of ``hidden @ lm_head.T`` go through
  :func:`fastrm.linear_logprobs`, the model's ``final_logit_softcapping`` and logit scale included (a scale s
  is folded exactly: ``softcap(s x, c) / T = softcap(x, c / s) / (T / s)``). A call asking for an output
  fastrm does not compute (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``) goes to TRL's function and is
  counted as a fallback.
* ``selective_log_softmax`` / ``entropy_from_logits`` / ``selective_log_softmax_and_entropy``: the functions in
  ``trl.trainer.utils`` and every binding of them in a loaded TRL module (TRL < 1.0's GRPO / RLOO / PPO trainers
  called these; TRL 1.x's experimental trainers still do) go through :func:`fastrm.gather_logprobs`, with
  ``index [..., K]`` as K candidate labels and ``row_mask`` as ignored positions.
* ``reward_loss``: ``RewardTrainer.compute_loss``: the Bradley-Terry loss (with ``margin`` and
  ``center_rewards_coefficient``) is :func:`fastrm.pairwise_ranking_loss` on the rewards TRL's own
  ``compute_loss`` produced (its metrics untouched). Each step the value is checked against TRL's; a TRL whose
  loss has a term fastrm does not know keeps its own loss, with a warning.
* ``ppo``: TRL 1.x ships no PPOTrainer; where one is installed (TRL < 1.0), its log-prob and entropy calls are
  covered by the bindings above.

Outputs are float32 (TRL's GPU kernels also return float32; its CPU fallback returns the logits' dtype).
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys

import torch

from fastrm.integrations._patching import PatchReport, bind
from fastrm.ops.linear_logprobs import linear_logprobs
from fastrm.ops.logprobs import gather_logprobs
from fastrm.ops.ranking import pairwise_ranking_loss

TESTED_TRL = "1.16"
IGNORE_INDEX = -100
# The log-prob functions TRL modules import by name; each binding found is replaced.
LOGPROB_FUNCTIONS = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy")
# Outputs of TRL's chunked LM head that fastrm computes; the others fall back to TRL.
FUSED_HEAD_OUTPUTS = {"log_probs", "entropy"}
FUSED_HEAD_PARAMS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                     "logit_scale", "outputs")
TRAINER_MODULES = ("grpo_trainer", "rloo_trainer", "reward_trainer", "sft_trainer", "dpo_trainer", "kto_trainer",
                   "ppo_trainer")

_active: PatchReport | None = None


def patch(*, backend: str | None = None) -> PatchReport:
    """Route the installed TRL's log-prob, entropy and reward-loss computations through fastrm.

    Args:
        backend: the fastrm backend of every routed call (``"auto"`` default: Triton on CUDA, torch elsewhere).

    Returns:
        A :class:`PatchReport` (also a context manager that undoes the patch on exit). Calling ``patch()`` while
        a patch is active undoes that one first.
    """
    global _active
    try:
        import trl
    except ImportError:
        raise ImportError("fastrm.integrations.trl.patch() needs TRL (pip install trl)") from None
    if _active is not None:
        _active.undo()
    report = PatchReport("TRL", getattr(trl, "__version__", "unknown"), TESTED_TRL, backend)
    modules = _import_trainer_modules(report)
    _patch_fused_head(report, modules)
    _patch_logprob_functions(report)
    _patch_reward_loss(report, modules)
    if "ppo_trainer" not in modules:
        report.not_patched["ppo"] = (f"TRL {report.version} ships no PPOTrainer (removed in TRL 1.x); nothing "
                                     "to patch")
    _active = report
    report.log()
    return report


def unpatch() -> None:
    """Undo the active patch, if any."""
    global _active
    if _active is not None:
        _active.undo()
        _active = None


# ---------------------------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------------------------


def _import_trainer_modules(report: PatchReport) -> dict:
    """The TRL trainer modules that exist in this version, imported (so their bindings can be found)."""
    found = {}
    for name in TRAINER_MODULES:
        for package in ("trl.trainer", "trl.experimental.ppo"):
            try:
                found[name] = importlib.import_module(f"{package}.{name}")
                break
            except ImportError:
                continue
    return found


# ---------------------------------------------------------------------------------------------------------------
# the fused LM head (GRPO, RLOO, ... in TRL 1.x)
# ---------------------------------------------------------------------------------------------------------------


class _FusedHeadShim:
    """Stands in for ``ChunkedLogProbFunction`` where ``add_fused_lm_head``'s forward looks it up: ``.apply``
    with TRL's arguments, returning TRL's tuple ``(log_probs, *optional outputs)``."""

    site = "fused_lm_head"

    def __init__(self, original, report: PatchReport, optional_outputs: tuple):
        self.original, self.report, self.optional_outputs = original, report, optional_outputs
        self.signature = inspect.Signature(list(inspect.signature(original.forward).parameters.values())[1:])

    def apply(self, *args, **kwargs):
        a = bind(self.signature, args, kwargs)
        if a is None:
            return self._fallback("arguments do not fit ChunkedLogProbFunction.forward", args, kwargs)
        outputs = tuple(a["outputs"])
        extra = set(outputs) - FUSED_HEAD_OUTPUTS
        if extra:
            return self._fallback(f"outputs {sorted(extra)} are not computed by fastrm", args, kwargs)
        scale, cap = a["logit_scale"], a["final_logit_softcapping"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            return self._fallback(f"logit_scale={scale!r} (fastrm folds only a finite scale > 0)", args, kwargs)
        hidden, weight, bias = a["hidden"], a["weight"], a["bias"]
        # Outside autocast TRL runs the head in hidden's dtype (weight cast to it), as lm_head(hidden) would not.
        if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        want_entropy = "entropy" in outputs
        out = linear_logprobs(hidden, weight, a["targets"], bias=bias, temperature=a["temperature"] / scale,
                              softcap=None if cap is None else cap / scale, return_entropy=want_entropy,
                              backend=self.report.backend)
        log_probs, entropy = out if want_entropy else (out, None)
        self.report.calls[self.site] += 1
        return (log_probs,) + tuple(entropy if name == "entropy" else None for name in self.optional_outputs)

    def _fallback(self, reason, args, kwargs):
        self.report.fallback(self.site, reason)
        return self.original.apply(*args, **kwargs)


def _patch_fused_head(report: PatchReport, modules: dict) -> None:
    site = _FusedHeadShim.site
    utils = sys.modules.get("trl.trainer.utils")
    original = getattr(utils, "_ChunkedLogProbFunction", None) if utils is not None else None
    if original is None:
        report.not_patched[site] = ("trl.trainer.utils has no _ChunkedLogProbFunction (TRL < 1.x computes "
                                    "log-probs from full logits: see the logprob function sites)")
        return
    params = tuple(inspect.signature(original.forward).parameters)[1:]
    if params != FUSED_HEAD_PARAMS:
        report.not_patched[site] = f"ChunkedLogProbFunction.forward{params} differs from the one fastrm knows"
        return
    chunked = sys.modules.get("trl.kernels.chunked_logprob")
    optional = tuple(getattr(chunked, "OPTIONAL_OUTPUTS", ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")))
    report.replace(utils, "_ChunkedLogProbFunction", _FusedHeadShim(original, report, optional))
    users = [name.replace("_trainer", "") for name, module in modules.items()
             if getattr(module, "add_fused_lm_head", None) is not None]
    report.patched[site] = (f"trl.trainer.utils._ChunkedLogProbFunction (add_fused_lm_head; used by "
                            f"{', '.join(users) or 'no trainer found'}) -> fastrm.linear_logprobs")


# ---------------------------------------------------------------------------------------------------------------
# selective_log_softmax & co. (every TRL module that imported them)
# ---------------------------------------------------------------------------------------------------------------


def _logprob_shim(name: str, original, report: PatchReport):
    signature = inspect.signature(original)
    known = {"logits", "index", "temperature", "row_mask", "chunk_size", "entropy_requires_grad"}
    unknown = set(signature.parameters) - known

    def shim(*args, **kwargs):
        a = bind(signature, args, kwargs)
        if a is None or unknown:
            reason = "arguments do not fit" if a is None else f"unknown parameters {sorted(unknown)}"
            report.fallback(name, reason)
            return original(*args, **kwargs)
        logits = a["logits"]
        temperature = a.get("temperature", 1.0)
        if name == "entropy_from_logits":
            labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
            report.calls[name] += 1
            return gather_logprobs(logits, labels, return_entropy=True, backend=report.backend)[1]
        index, row_mask = a["index"], a.get("row_mask")
        labels = index if row_mask is None else index.masked_fill(row_mask == 0, IGNORE_INDEX)
        report.calls[name] += 1
        if name == "selective_log_softmax":
            return gather_logprobs(logits, labels, temperature=temperature, backend=report.backend)
        logprobs, entropy = gather_logprobs(logits, labels, temperature=temperature, return_entropy=True,
                                            backend=report.backend)
        return logprobs, (entropy if a.get("entropy_requires_grad", True) else entropy.detach())

    shim.__wrapped__ = original
    shim.__name__ = shim.__qualname__ = name
    shim.__doc__ = f"fastrm.gather_logprobs standing in for TRL's {name} (fastrm.integrations.trl.patch)."
    return shim


def _patch_logprob_functions(report: PatchReport) -> None:
    utils = sys.modules.get("trl.trainer.utils")
    for name in LOGPROB_FUNCTIONS:
        original = getattr(utils, name, None) if utils is not None else None
        if original is None:
            report.not_patched[name] = f"trl.trainer.utils has no {name}"
            continue
        where = report.replace_bindings("trl", name, original, _logprob_shim(name, original, report))
        users = [m.rsplit(".", 1)[-1] for m in where if m != "trl.trainer.utils"]
        report.patched[name] = (f"{len(where)} binding(s) (trl.trainer.utils"
                                f"{', ' + ', '.join(users) if users else ''}) -> fastrm.gather_logprobs")


# ---------------------------------------------------------------------------------------------------------------
# the reward-model loss
# ---------------------------------------------------------------------------------------------------------------


def _patch_reward_loss(report: PatchReport, modules: dict) -> None:
    site = "reward_loss"
    trainer_cls = getattr(modules.get("reward_trainer"), "RewardTrainer", None)
    if trainer_cls is None:
        report.not_patched[site] = "no trl RewardTrainer"
        return
    original = trainer_cls.compute_loss
    params = tuple(inspect.signature(original).parameters)
    if params[:4] != ("self", "model", "inputs", "return_outputs"):
        report.not_patched[site] = f"RewardTrainer.compute_loss{params} differs from the one fastrm knows"
        return

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        margin = inputs.get("margin")
        trl_loss, outputs = original(self, model, inputs, True, num_items_in_batch)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        center = getattr(self.args, "center_rewards_coefficient", None) or 0.0
        loss = pairwise_ranking_loss(chosen, rejected, margin=None if margin is None else margin.to(chosen.dtype),
                                     center_coef=center, backend=report.backend)
        # TRL's loss came from the same rewards: a difference beyond rounding means a term fastrm lacks.
        ours, theirs = float(loss.detach()), float(trl_loss.detach())
        if abs(ours - theirs) > 64 * torch.finfo(chosen.dtype).eps * (1.0 + abs(theirs)):
            report.fallback(site, f"TRL's loss {theirs:.6g} != fastrm's {ours:.6g}: this TRL adds a term "
                                   "fastrm does not know; TRL's loss is used")
            loss = trl_loss
        else:
            report.calls[site] += 1
        return (loss, outputs) if return_outputs else loss

    compute_loss.__wrapped__ = original
    report.replace(trainer_cls, "compute_loss", compute_loss)
    report.patched[site] = ("RewardTrainer.compute_loss -> fastrm.pairwise_ranking_loss (margin, "
                            "center_rewards_coefficient; checked against TRL's value each step)")
