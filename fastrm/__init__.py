"""fastrm: fused Triton kernels for RLHF and the trainers that run on them.

Ops (each with ``backend="auto" | "triton" | "torch"``, an nn.Module form and a plain reference):
``gather_logprobs``, ``compute_gae`` (+ ``whiten``), ``pairwise_ranking_loss``, ``ranking_loss``.
"""

__version__ = "0.1.0"

from fastrm.kernels.gae import compute_gae_reference
from fastrm.kernels.logprobs import gather_logprobs_reference
from fastrm.kernels.ranking import pairwise_ranking_loss_reference, ranking_loss_reference
from fastrm.ops.gae import GAE, compute_gae, whiten
from fastrm.ops.logprobs import GatherLogprobs, gather_logprobs
from fastrm.ops.ranking import PairwiseRankingLoss, RankingLoss, pairwise_ranking_loss, ranking_loss

__all__ = [
    "GAE",
    "GatherLogprobs",
    "PairwiseRankingLoss",
    "RankingLoss",
    "compute_gae",
    "compute_gae_reference",
    "gather_logprobs",
    "gather_logprobs_reference",
    "pairwise_ranking_loss",
    "pairwise_ranking_loss_reference",
    "ranking_loss",
    "ranking_loss_reference",
    "whiten",
]
