"""PPO losses with fused forward + backward: ``ppo_policy_loss``, ``value_loss`` and ``kl_penalty``, and their
module forms ``PPOPolicyLoss``, ``ValueLoss``, ``KLPenalty``; one import site for the three owner modules
(:mod:`fastrm.ops.ppo_policy`, :mod:`fastrm.ops.ppo_value`, :mod:`fastrm.ops.kl`; what they share, the
aggregation modes included: :mod:`fastrm.ops.ppo_common`)."""

from fastrm.ops.kl import KL_KINDS, KLPenalty, kl_penalty
from fastrm.ops.ppo_common import AGG_MODES, MASK_DTYPES, row_weights
from fastrm.ops.ppo_policy import POLICY_LOSSES, RATIO_LEVELS, PolicyLossOutput, PPOPolicyLoss, ppo_policy_loss
from fastrm.ops.ppo_value import ValueLoss, ValueLossOutput, value_loss

__all__ = [
    "ppo_policy_loss",
    "value_loss",
    "kl_penalty",
    "PPOPolicyLoss",
    "ValueLoss",
    "KLPenalty",
    "PolicyLossOutput",
    "ValueLossOutput",
    "AGG_MODES",
    "KL_KINDS",
    "MASK_DTYPES",
    "POLICY_LOSSES",
    "RATIO_LEVELS",
    "row_weights",
]
