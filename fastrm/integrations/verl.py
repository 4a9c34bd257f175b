"""verl's loss and advantage functions backed by fastrm, with verl's exact signatures and return conventions.

Drop-in functions (same names, arguments and returns as verl 0.9's ``verl.trainer.ppo.core_algos`` and
``verl.utils.torch_functional``)::

    compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam) -> (advantages, returns)
    compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean")
        -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)
    compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)   # "vanilla"
    compute_policy_loss_gspo(...)  (same signature)                                        # "gspo"
    kl_penalty(logprob, ref_logprob, kl_penalty) -> [B, T]       # kl/k1, abs, mse/k2, low_var_kl/k3, and "+" kinds
    agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None) -> scalar
    logprobs_from_logits(logits, labels, inplace_backward=True) -> [...]
    entropy_from_logits(logits) -> [...]

In a verl run, :func:`register` puts them in place: the policy-loss registry entries ``"vanilla"`` and
``"gspo"``, the advantage registry entry ``"gae"``, and every binding of the functions above in the loaded verl
modules. verl runs its workers in Ray processes, so register in every process: set
``VERL_USE_EXTERNAL_MODULES=fastrm.integrations.verl_plugin`` in the environment of the launch (verl imports
that module in each process at ``import verl``; the module calls :func:`register`).

Conventions kept: the same dtype-independent numbers on valid positions, verl's metric names and ``.item()``
floats, verl's global-batch normalisation (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor`` from ``config.global_batch_info``). Differences, all on positions or rows nobody reads:
masked positions of the GAE outputs are 0 (verl leaves whitened values there), rows with no valid token are left
out of the seq-mean modes (as verl 0.9 does), and the outputs are float32 (float64 for float64 inputs).
``rollout_is_weights`` (rollout correction) has no fused form: with weights the call goes to verl's own
function, counted as a fallback.
"""

from __future__ import annotations

import torch

from fastrm.integrations._patching import PatchReport
from fastrm.kernels.ppo import LOG_RATIO_CLAMP
from fastrm.ops.gae import compute_gae, whiten
from fastrm.ops.logprobs import gather_logprobs
from fastrm.ops.ppo import kl_penalty as _fastrm_kl_penalty
from fastrm.ops.ppo import ppo_policy_loss, row_weights

TESTED_VERL = "0.9.1"
# verl's names of the KL estimators -> fastrm's kinds ("+": straight-through, k2's gradient; k2+ is k2).
KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3",
            "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "k3+", "k3+": "k3+"}
# verl's aggregation modes fastrm computes directly; "token-sum" is token-mean times the token count.
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# The report of the active register() (calls / fallbacks are counted there), and the backend it chose.
_active: PatchReport | None = None


def _count(site: str) -> None:
    if _active is not None:
        _active.calls[site] += 1


def _backend():
    return None if _active is None else _active.backend


# ---------------------------------------------------------------------------------------------------------------
# aggregation: fastrm's local aggregate -> verl's agg_loss value
# ---------------------------------------------------------------------------------------------------------------


def _fastrm_agg(loss_agg_mode: str) -> str:
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode} (fastrm.integrations.verl knows {AGG_MODES})")
    return "token-mean" if loss_agg_mode == "token-sum" else loss_agg_mode


def _global_scale(mask: torch.Tensor, loss_agg_mode: str, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """The factor that turns fastrm's aggregate over this micro-batch into verl's ``agg_loss`` value: verl
    divides by the global batch's token count / sequence count and multiplies by ``dp_size`` (data-parallel
    ranks average gradients), and "token-sum" is the token mean times the token count."""
    valid = mask != 0
    if loss_agg_mode in ("token-mean", "token-sum"):
        local = valid.sum()
        if loss_agg_mode == "token-sum":
            return local * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return 1.0
        return local / batch_num_tokens * dp_size
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        return 1.0
    return (valid.sum(-1) > 0).sum() / global_batch_size * dp_size


def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
             loss_scale_factor=None):
    """verl's ``agg_loss``: ``loss_mat [B, T]`` aggregated over ``loss_mask`` by fastrm's row weights
    (masked positions never enter the sum, whatever they hold)."""
    agg = _fastrm_agg(loss_agg_mode)
    valid = loss_mask != 0
    count = valid.sum(-1).to(torch.float64 if loss_mat.dtype == torch.float64 else torch.float32)
    factor = 1.0
    if agg == "seq-mean-token-sum-norm":
        factor = float(loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    row_sums = torch.where(valid, loss_mat, 0).sum(-1)
    loss = (row_sums * row_weights(count, agg, factor)).sum()
    _count("agg_loss")
    return loss * _global_scale(loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """verl's GAE: ``(advantages, returns)``, each ``[B, T]``; returns = GAE + values, advantages whitened over
    the response mask. Masked positions are skipped by the recurrence (multi-turn observation tokens) and
    come back as 0."""
    with torch.no_grad():
        values = values.to(token_level_rewards.dtype)
        advantages, returns = compute_gae(token_level_rewards, values, response_mask, gamma=float(gamma),
                                          lam=float(lam), backend=_backend())
        advantages = whiten(advantages, response_mask)
    _count("compute_gae_advantage_return")
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------------
# policy losses
# ---------------------------------------------------------------------------------------------------------------


def _ppo_kl(old_log_prob, log_prob, response_mask):
    """verl's ``ppo_kl`` metric: the masked mean of -clamp(log_prob - old_log_prob, -20, 20) (k1)."""
    with torch.no_grad():
        valid = response_mask != 0
        log_ratio = (log_prob.detach() - old_log_prob).float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.where(valid, -log_ratio, 0).sum() / (valid.sum() + 1e-8)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_low, clip_high, dual_clip,
                 loss_agg_mode, ratio_level="token", dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):
    agg = _fastrm_agg(loss_agg_mode)
    out = ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_eps=clip_low,
                          clip_eps_high=clip_high, dual_clip=dual_clip, agg=agg, ratio_level=ratio_level,
                          loss_scale_factor=loss_scale_factor if agg == "seq-mean-token-sum-norm" else None,
                          backend=_backend())
    scale = _global_scale(response_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size)
    return out._replace(loss=out.loss * scale)


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode: str = "token-mean"):
    """verl's (deprecated-name) PPO clipped policy loss with dual clip:
    ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``, all tensors."""
    assert clip_ratio_c > 1.0, f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, " \
                               f"but get the value: {clip_ratio_c}."
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    out = _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low=low, clip_high=high,
                       dual_clip=clip_ratio_c, loss_agg_mode=loss_agg_mode)
    _count("compute_policy_loss")
    return out.loss, out.clipfrac, _ppo_kl(old_log_prob, log_prob, response_mask), out.clipfrac_lower


def _config_value(config, name, default=None):
    getter = getattr(config, "get", None)
    return getter(name, default) if callable(getter) else getattr(config, name, default)


def _batch_info(config) -> dict:
    info = dict(_config_value(config, "global_batch_info", None) or {})
    return {k: info.get(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
            if info.get(k) is not None}


def _registered_loss(name, ratio_level, dual_clip_default):
    def loss_fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights=None):
        assert config is not None
        if rollout_is_weights is not None:
            return _verl_original(name, "rollout_is_weights has no fused form")(
                old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
        clip = _config_value(config, "clip_ratio")
        low = _config_value(config, "clip_ratio_low") if _config_value(config, "clip_ratio_low") is not None else clip
        high = _config_value(config, "clip_ratio_high") if _config_value(config, "clip_ratio_high") is not None \
            else clip
        dual_clip = _config_value(config, "clip_ratio_c", 3.0) if dual_clip_default else None
        if dual_clip is not None:
            assert dual_clip > 1.0, f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater " \
                                    f"than 1.0, but get the value: {dual_clip}."
        out = _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low=low, clip_high=high,
                           dual_clip=dual_clip, loss_agg_mode=loss_agg_mode, ratio_level=ratio_level,
                           **_batch_info(config))
        metrics = {
            "actor/pg_clipfrac": out.clipfrac.item(),
            "actor/ppo_kl": _ppo_kl(old_log_prob, log_prob, response_mask).item(),
            "actor/pg_clipfrac_lower": out.clipfrac_lower.item(),
        }
        _count(name)
        return out.loss, metrics

    loss_fn.__name__ = loss_fn.__qualname__ = name
    return loss_fn


compute_policy_loss_vanilla = _registered_loss("compute_policy_loss_vanilla", "token", True)
compute_policy_loss_vanilla.__doc__ = """verl's registered ``"vanilla"`` policy loss: PPO clip (``config.clip_ratio``,
``clip_ratio_low`` / ``clip_ratio_high``) with dual clip (``clip_ratio_c``, 3.0 by default), aggregated as verl does
with ``config.global_batch_info``. Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
"actor/pg_clipfrac_lower"})``."""
compute_policy_loss_gspo = _registered_loss("compute_policy_loss_gspo", "sequence", False)
compute_policy_loss_gspo.__doc__ = """verl's registered ``"gspo"`` policy loss: the sequence-level ratio
(:func:`fastrm.ppo_policy_loss` with ``ratio_level="sequence"``), no dual clip; ``pg_clipfrac_lower`` is 0."""


def _verl_original(name, reason):
    """verl's own function ``name`` (for the calls fastrm has no fused form of), counted as a fallback."""
    if _active is not None:
        _active.fallback(name, reason)
    if _active is not None and name in _active.originals:
        return _active.originals[name]
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        raise NotImplementedError(f"fastrm.integrations.verl.{name}: {reason}, and verl is not installed") from None
    fn = getattr(core_algos, name)
    if getattr(fn, "__module__", "").startswith("fastrm"):
        raise NotImplementedError(f"fastrm.integrations.verl.{name}: {reason}")
    return fn


# ---------------------------------------------------------------------------------------------------------------
# KL, log-probs, entropy
# ---------------------------------------------------------------------------------------------------------------


def kl_penalty(logprob, ref_logprob, kl_penalty):  # noqa: F811 (verl's parameter name)
    """verl's ``kl_penalty``: per-token KL estimate ``[..]`` of the named estimator (``"kl"``/``"k1"``, ``"abs"``,
    ``"mse"``/``"k2"``, ``"low_var_kl"``/``"k3"``, each with an optional ``"+"``: straight-through, k2's
    gradient). ``"full"`` is not implemented, as in verl."""
    if kl_penalty == "full":
        raise NotImplementedError
    if kl_penalty not in KL_NAMES:
        raise NotImplementedError(f"kl_penalty {kl_penalty!r} (fastrm.integrations.verl knows {sorted(KL_NAMES)})")
    shape = logprob.shape
    flat = (lambda x: x.reshape(1, -1)) if logprob.dim() < 2 else (lambda x: x.reshape(-1, shape[-1]))
    out = _fastrm_kl_penalty(flat(logprob), flat(ref_logprob), KL_NAMES[kl_penalty], backend=_backend())
    _count("kl_penalty")
    return out.reshape(shape)


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]`` (float32), with verl's in-place backward
    (d logits written into the logits buffer; verl turns it off when it also takes the entropy)."""
    out = gather_logprobs(logits, labels, inplace_backward=inplace_backward, backend=_backend())
    _count("logprobs_from_logits")
    return out


def entropy_from_logits(logits):
    """verl's ``entropy_from_logits``: the entropy of ``softmax(logits)`` per position (float32)."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    out = gather_logprobs(logits, labels, return_entropy=True, backend=_backend())[1]
    _count("entropy_from_logits")
    return out


# ---------------------------------------------------------------------------------------------------------------
# register in a verl run
# ---------------------------------------------------------------------------------------------------------------

# name in verl -> (verl module holding it, fastrm function)
CORE_ALGOS = "verl.trainer.ppo.core_algos"
TORCH_FUNCTIONAL = "verl.utils.torch_functional"
FUNCTIONS = {
    "compute_gae_advantage_return": (CORE_ALGOS, compute_gae_advantage_return),
    "compute_policy_loss": (CORE_ALGOS, compute_policy_loss),
    "compute_policy_loss_vanilla": (CORE_ALGOS, compute_policy_loss_vanilla),
    "compute_policy_loss_gspo": (CORE_ALGOS, compute_policy_loss_gspo),
    "kl_penalty": (CORE_ALGOS, kl_penalty),
    "agg_loss": (CORE_ALGOS, agg_loss),
    "logprobs_from_logits": (TORCH_FUNCTIONAL, logprobs_from_logits),
    "entropy_from_logits": (TORCH_FUNCTIONAL, entropy_from_logits),
}
REGISTRY_ENTRIES = {"POLICY_LOSS_REGISTRY": {"vanilla": "compute_policy_loss_vanilla",
                                             "gspo": "compute_policy_loss_gspo"},
                    "ADV_ESTIMATOR_REGISTRY": {"gae": "compute_gae_advantage_return"}}


def register(*, backend: str | None = None) -> PatchReport:
    """Use fastrm's functions in this process's verl: the ``"vanilla"`` / ``"gspo"`` policy losses and the
    ``"gae"`` estimator in verl's registries, and every binding of the functions above in loaded verl modules
    (modules imported later pick them up from ``core_algos`` / ``torch_functional``).

    Returns a report (a context manager whose exit undoes it); ``register()`` again replaces the previous one.
    """
    global _active
    import importlib

    try:
        import verl
    except ImportError:
        raise ImportError("fastrm.integrations.verl.register() needs verl") from None
    if _active is not None:
        _active.undo()
    report = PatchReport("verl", getattr(verl, "__version__", "unknown"), TESTED_VERL, backend)
    modules = {}
    for module_name in (CORE_ALGOS, TORCH_FUNCTIONAL):
        try:
            modules[module_name] = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 (verl's import errors are its own: report them)
            report.not_patched[module_name] = f"cannot import it: {type(err).__name__}: {err}"
    for name, (module_name, fn) in FUNCTIONS.items():
        module = modules.get(module_name)
        original = getattr(module, name, None) if module is not None else None
        if original is None:
            report.not_patched.setdefault(name, f"{module_name}.{name} not found in this verl")
            continue
        report.originals[name] = original
        where = report.replace_bindings("verl", name, original, fn)
        report.patched[name] = f"{len(where)} binding(s) ({', '.join(where)})"
    core = modules.get(CORE_ALGOS)
    for registry_name, entries in REGISTRY_ENTRIES.items():
        registry = getattr(core, registry_name, None) if core is not None else None
        if registry is None:
            report.not_patched[registry_name] = "not found in this verl"
            continue
        for key, name in entries.items():
            report.replace(registry, key, FUNCTIONS[name][1])
            report.patched[f"{registry_name}[{key!r}]"] = f"fastrm.integrations.verl.{name}"
    _active = report
    report.log()
    return report


def unregister() -> None:
    """Undo the active :func:`register`, if any."""
    global _active
    if _active is not None:
        _active.undo()
        _active = None
