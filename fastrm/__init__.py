"""fastrm: fused Triton kernels for RLHF and the trainers that run on them.

Ops (each with ``backend="auto" | "triton" | "torch"``, an nn.Module form and a plain reference):
``gather_logprobs``, ``linear_logprobs``, ``compute_gae`` (+ ``whiten``), ``pairwise_ranking_loss``,
``ranking_loss``, ``ppo_policy_loss``, ``value_loss``, ``kl_penalty``; ``dpo_loss`` (DPO, IPO, hinge, robust,
SimPO: [B]-sized, plain PyTorch).

Inside other libraries: ``fastrm.integrations.trl.patch()`` (TRL's trainers on fastrm's ops) and
``fastrm.integrations.verl`` (verl's loss functions, ``register()`` for a verl run).
"""

__version__ = "0.1.0"

from fastrm._checks import raise_deferred_errors
from fastrm.kernels.gae import compute_gae_reference
from fastrm.kernels.linear_logprobs import linear_logprobs_reference
from fastrm.kernels.logprobs import gather_logprobs_reference
from fastrm.kernels.ppo import kl_penalty_reference, ppo_policy_loss_reference, value_loss_reference
from fastrm.kernels.ranking import pairwise_ranking_loss_reference, ranking_loss_reference
from fastrm.ops.dpo import DPOLoss, DPOLossOutput, dpo_loss
from fastrm.ops.gae import GAE, compute_gae, whiten
from fastrm.ops.linear_logprobs import LinearLogprobs, linear_logprobs
from fastrm.ops.logprobs import GatherLogprobs, gather_logprobs
from fastrm.ops.ppo import (
    KLPenalty,
    PolicyLossOutput,
    PPOPolicyLoss,
    ValueLoss,
    ValueLossOutput,
    kl_penalty,
    ppo_policy_loss,
    value_loss,
)
from fastrm.ops.ranking import PairwiseRankingLoss, RankingLoss, pairwise_ranking_loss, ranking_loss

__all__ = [
    "DPOLoss",
    "DPOLossOutput",
    "dpo_loss",
    "KLPenalty",
    "PPOPolicyLoss",
    "PolicyLossOutput",
    "ValueLoss",
    "ValueLossOutput",
    "kl_penalty",
    "kl_penalty_reference",
    "ppo_policy_loss",
    "ppo_policy_loss_reference",
    "value_loss",
    "value_loss_reference",
    "GAE",
    "GatherLogprobs",
    "LinearLogprobs",
    "PairwiseRankingLoss",
    "RankingLoss",
    "compute_gae",
    "compute_gae_reference",
    "gather_logprobs",
    "gather_logprobs_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "pairwise_ranking_loss",
    "pairwise_ranking_loss_reference",
    "raise_deferred_errors",
    "ranking_loss",
    "ranking_loss_reference",
    "whiten",
]
