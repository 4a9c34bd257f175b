"""DAPO's rollout-side parts (Yu et al. 2025, arXiv:2503.14476), used by the RL trainer, each usable on its own.

* :func:`overlong_penalty`: the soft overlong punishment. With ``L_max`` the longest completion and a buffer of
  ``L_cache`` tokens, a completion of ``L`` tokens gets ``0`` while ``L <= L_max - L_cache``, then
  ``((L_max - L_cache) - L) / L_cache`` (falling linearly to -1 at ``L = L_max``), times ``penalty_factor``
  (verl's ``overlong_buffer.len`` / ``penalty_factor``), added to its reward.
* :func:`informative_groups`: dynamic sampling's filter: a prompt whose n samples all got the same reward has
  zero group-relative advantage (no signal); the trainer drops such groups and draws more prompts.
* :func:`dynamic_sampling`: the loop: sample and score a prompt batch, keep its informative groups, draw more
  prompt batches (at most ``max_extra_draws``) until ``batch_size`` prompts are kept; the kept groups of several
  draws become one batch (:class:`ScoredSamples`, re-padded: prompts on the left, completions on the right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0) -> torch.Tensor:
    """``[B]`` float32 penalties (<= 0) for completions of ``lengths`` tokens; ``max_len`` is ``L_max``, ``buffer_len``
    ``L_cache`` (``1 <= buffer_len <= max_len``). Lengths past ``max_len`` (not produced by a capped sampler) get
    the full ``-penalty_factor``."""
    if not 1 <= buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must lie in [1, max_len={max_len}], got {buffer_len}")
    if not penalty_factor >= 0:
        raise ValueError(f"overlong penalty_factor must be >= 0, got {penalty_factor}")
    expected = max_len - buffer_len
    exceed = (lengths.float() - expected).clamp(0, buffer_len)
    return -exceed / buffer_len * penalty_factor


def informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """``[B // n]`` bool: True for a group (n adjacent samples of a prompt) whose scores are not all equal."""
    if scores.dim() != 1 or scores.numel() % n:
        raise ValueError(f"scores must be 1-D with a multiple of n={n} entries, got shape {tuple(scores.shape)}")
    g = scores.view(-1, n)
    return (g != g[:, :1]).any(dim=1)


def _pad_to(x: torch.Tensor, length: int, value, left: bool) -> torch.Tensor:
    extra = length - x.shape[1]
    if extra == 0:
        return x
    pad = torch.full((x.shape[0], extra), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_generations(parts: list[dict], pad_token_id: int) -> dict:
    """One generation dict (:func:`fastrm.generation.generate`'s keys) from several: prompt tensors left-padded and
    completion tensors right-padded to the longest, then stacked row-wise. Padding: ``pad_token_id`` for ids,
    0 for masks and for the sampler's log-probs."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for key in parts[0]:
        left = key.startswith("prompt")
        length = max(p[key].shape[1] for p in parts)
        value = pad_token_id if key.endswith("_ids") else 0
        out[key] = torch.cat([_pad_to(p[key], length, value, left) for p in parts], dim=0)
    return out


def select_rows(gen: dict, rows: torch.Tensor) -> dict:
    """The rows ``rows`` (indices or a bool mask) of every tensor of a generation dict."""
    return {k: v[rows] for k, v in gen.items()}


@dataclass
class ScoredSamples:
    """n sampled completions per prompt and their rewards: ``gen`` (:func:`fastrm.generation.generate`'s dict),
    ``completions`` (texts), ``rows`` (the prompt row of each completion), ``scores`` ``[B]`` float32, ``parts``
    (reward parts to log: means over the batch)."""

    gen: dict
    completions: list
    rows: list
    scores: torch.Tensor
    parts: dict

    def select(self, index: list[int]) -> ScoredSamples:
        rows = torch.tensor(index, dtype=torch.long, device=self.scores.device)
        return ScoredSamples(select_rows(self.gen, rows.to(self.gen["completion_ids"].device)),
                             [self.completions[i] for i in index], [self.rows[i] for i in index], self.scores[rows],
                             self.parts)

    @staticmethod
    def concat(pieces: list[ScoredSamples], pad_token_id: int, parts: dict | None = None) -> ScoredSamples:
        """The pieces' rows stacked; ``parts``: those of the first piece unless given."""
        parts = pieces[0].parts if parts is None else parts
        return ScoredSamples(concat_generations([p.gen for p in pieces], pad_token_id),
                             [c for p in pieces for c in p.completions], [r for p in pieces for r in p.rows],
                             torch.cat([p.scores for p in pieces]), parts)


def dynamic_sampling(sample: Callable[[list], ScoredSamples], rows: list, next_rows: Callable[[], list], n: int,
                     max_extra_draws: int, pad_token_id: int,
                     reduce_sum: Callable[[int], int] = lambda x: x) -> tuple[ScoredSamples, dict]:
    """DAPO's dynamic sampling: ``sample(rows)`` (n completions per row, scored), keeping the groups whose scores
    differ; while fewer than ``len(rows)`` groups are kept, ``sample(next_rows())`` again, at most
    ``max_extra_draws`` times. Returns exactly ``len(rows)`` groups, the informative ones first (in draw order),
    topped up with uninformative ones when the draws ran out, and the statistics to log:
    ``rollout/draws`` (prompt batches sampled), ``rollout/dropped_groups`` (uninformative groups seen),
    ``rollout/filled_groups`` (uninformative groups kept to fill the batch).

    ``reduce_sum``: the sum over ranks of a count (data parallel: every rank draws as often as the rank that
    lacks the most, since sampling is a collective under FSDP)."""
    want = len(rows)
    informative, spare, parts = [], [], []
    draws = dropped = kept = 0
    while True:
        piece = sample(rows)
        parts.append(piece.parts)
        draws += 1
        good = informative_groups(piece.scores, n).tolist()
        for flag, bucket in ((True, informative), (False, spare)):
            index = [g * n + j for g, ok in enumerate(good) if ok == flag for j in range(n)]
            if index:
                bucket.append(piece.select(index))
        kept += sum(good)
        dropped += len(good) - sum(good)
        if reduce_sum(max(want - kept, 0)) == 0 or draws > max_extra_draws:
            break
        rows = next_rows()
    mean_parts = {k: sum(float(p[k]) for p in parts) / len(parts) for k in parts[0]}  # each draw a mean over as many
    batch = ScoredSamples.concat(informative + spare, pad_token_id, mean_parts)
    batch = batch.select(list(range(want * n))) if len(batch.rows) > want * n else batch
    stats = {"rollout/draws": draws, "rollout/dropped_groups": dropped,
             "rollout/filled_groups": max(want - kept, 0)}
    return batch, stats
