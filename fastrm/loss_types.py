"""TRL's ``GRPOConfig.loss_type`` names on fastrm's policy-loss settings (``loss_agg``, ``policy_loss``).

=========  ===========================  ============  =====================================================
loss_type  loss_agg                     policy_loss   TRL 1.16's meaning
=========  ===========================  ============  =====================================================
grpo       seq-mean-token-mean          ppo           each completion's token mean, mean over completions
dr_grpo    seq-mean-token-sum-norm      ppo           token sum / (completions * max_completion_length)
dapo       token-mean                   ppo           token sum / valid tokens of the global batch
bnpo       token-mean                   ppo           token sum / valid tokens of the local batch
cispo      token-mean                   cispo         CISPO's weight, aggregated as dapo
sapo       seq-mean-token-mean          sapo          SAPO's sigmoid gate, aggregated as grpo
=========  ===========================  ============  =====================================================

fastrm's trainer takes one minibatch per optimizer step and weights a token mean by the tokens of every rank
(``fastrm.distributed.token_weight``), so ``token-mean`` is dapo's normaliser; bnpo's per-process token mean is
the same with one process and differs under data parallelism only (fastrm then gives dapo's).
``seq-mean-token-sum-norm`` divides by ``max_new_tokens`` in the trainer (Dr. GRPO's constant).
"""

from __future__ import annotations

from fastrm.config import ConfigError

LOSS_TYPES = {
    "grpo": ("seq-mean-token-mean", "ppo"),
    "dr_grpo": ("seq-mean-token-sum-norm", "ppo"),
    "dapo": ("token-mean", "ppo"),
    "bnpo": ("token-mean", "ppo"),
    "cispo": ("token-mean", "cispo"),
    "sapo": ("seq-mean-token-mean", "sapo"),
}
DEFAULT_AGG, DEFAULT_POLICY_LOSS = "token-mean", "ppo"


def resolve_loss_type(loss_type: str | None, loss_agg: str | None, policy_loss: str | None) -> tuple[str, str]:
    """``(loss_agg, policy_loss)``: what ``loss_type`` means, or the settings as given (their defaults when None).
    A ``loss_agg`` / ``policy_loss`` set to another value than ``loss_type``'s is a ConfigError naming both."""
    if loss_type is None:
        return loss_agg or DEFAULT_AGG, policy_loss or DEFAULT_POLICY_LOSS
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"setting loss_type={loss_type!r}: must be one of {', '.join(LOSS_TYPES)} (or null)")
    agg, loss = LOSS_TYPES[loss_type]
    for name, given, implied in (("loss_agg", loss_agg, agg), ("policy_loss", policy_loss, loss)):
        if given is not None and given != implied:
            raise ConfigError(f"setting {name}={given!r} conflicts with loss_type={loss_type} (which means "
                              f"{name}={implied}); set one of them")
    return agg, loss
