"""The RL trainer's rollout (steps 2-5 of :mod:`fastrm.trainers.rl`): sample completions, take their log-probs under
the policy and the reference (and the critic's values), score them, and turn the scores into advantages. What it
hands the update is one typed :class:`Rollout`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from fastrm import distributed as fdist
from fastrm import advantages as fadv
from fastrm import dapo, rewards, runtime
from fastrm.generation import decode_completions, generate
from fastrm.layout import IGNORE_INDEX, Batch, PaddedBatch, arrange, collate_sequences
from fastrm.metrics import reduce_sums
from fastrm.models import reward_scores, token_logprobs
from fastrm.ops.ppo import kl_penalty
from fastrm.packing import Packing
from fastrm.rollout_correction import correction_weights


@dataclass
class Rollout:
    """One batch of sampled completions and everything the update reads of it. Rows are prompt x sample; per-token
    tensors are ``[N, C]`` over the completion tokens (``C`` the longest completion)."""

    batch: PaddedBatch           # prompt (left-padded) + completion (right-padded), labels on the completion
    prompt_len: int              # columns of the prompt part of ``batch``
    mask: torch.Tensor           # [N, C] 1 on completion tokens
    old_logprobs: torch.Tensor | None  # [N, C] under the policy that sampled; None on-policy (the update's own)
    ref_logprobs: torch.Tensor | None  # [N, C] under the frozen reference; None when no KL term reads it
    advantages: torch.Tensor     # [N, C]
    returns: torch.Tensor | None = None  # [N, C] the critic's targets (gae)
    values: torch.Tensor | None = None   # [N, C] the critic's values when sampled (gae)
    scores: torch.Tensor | None = None   # [N] the rewards after penalty, normalisation and clipping
    seq_kl: torch.Tensor | None = None   # [N] KL to the reference summed over each completion
    sampler_logprobs: torch.Tensor | None = None  # [N, C] under the sampler's own distribution (rollout_correction)
    stats: dict = field(default_factory=dict)           # what the step logs of the rollout
    completions: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)    # the prompt of each row

    @property
    def rows(self) -> int:
        return self.mask.shape[0]


class TokenValueModel(nn.Module):
    """Critic: a transformer backbone and ``Linear(H, 1)`` applied at every position -> ``[B, T]`` values."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: Batch) -> torch.Tensor:
        """``[N, T]`` values of a batch in any layout (:mod:`fastrm.layout`), in the padded layout."""
        return batch.run(lambda b: self.head(b.forward(self.backbone).last_hidden_state).squeeze(-1).float(),
                         per_token=True)


def _call(model, *args):
    return model(*args)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = (mask != 0).to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


class RolloutSteps:
    """The rollout half of :class:`fastrm.trainers.rl.RLTrainer` (it holds the models, the reward functions and the
    controllers this reads)."""

    def _autocast(self):
        return runtime.autocast(self.autocast, self.device)

    def _sequences(self, gen: dict) -> PaddedBatch:
        """Prompt (left-padded) + completion as one batch for the forward passes, with position ids that
        skip the left padding (as generate used) and labels on the completion tokens only."""
        input_ids = torch.cat([gen["prompt_ids"], gen["completion_ids"]], dim=1)
        attention_mask = torch.cat([gen["prompt_mask"], gen["completion_mask"]], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        labels[:, : gen["prompt_ids"].shape[1]] = IGNORE_INDEX
        groups = torch.as_tensor(self._prompt_groups(input_ids.shape[0]), device=input_ids.device)
        return PaddedBatch(input_ids, attention_mask, labels, position_ids, groups)

    def _prompt_groups(self, rows: int) -> list[int]:
        """The prompt of each rollout row: a prompt's samples are consecutive rows, and the shared layout computes
        their prompt once."""
        return [i // self.config.num_samples for i in range(rows)]

    def _forward(self, model: fdist.Parallel, fn, batch: PaddedBatch, decision: Packing, **kwargs):
        """``fn(model, batch)``, per-token outputs, on the rollout ``batch`` laid out as ``decision`` says (one
        packed row, or length buckets: completions of different lengths pay for no padding); the outputs come
        back in the padded layout of ``batch``."""
        return model(fn, arrange(batch, decision.mode), **kwargs)

    def _logprobs(self, model: fdist.Parallel, batch, prompt_len, return_entropy=False):
        """``[B, C]`` log-probs of the completion tokens (and entropies)."""
        with self._autocast():
            out = self._forward(model, token_logprobs, batch, self.policy_packing, temperature=self.config.temperature,
                                return_entropy=return_entropy, backend=self.config.backend)
        if return_entropy:
            return out[0][:, prompt_len - 1:], out[1][:, prompt_len - 1:]
        return out[:, prompt_len - 1:]

    def _ref_logprobs(self, batch, prompt_len):
        if self.ref is not None:
            return self._logprobs(self.ref_p, batch, prompt_len)
        with self.policy.disable_adapter():  # LoRA: the reference is the policy without its adapters
            return self._logprobs(self.policy_p, batch, prompt_len)

    def _values(self, batch, prompt_len):
        with self._autocast():
            return self._forward(self.value_p, _call, batch, self.value_packing)[:, prompt_len - 1:-1].float()

    @torch.no_grad()
    def model_scores(self, rows: list[dict], gen: dict, completions: list[str]) -> torch.Tensor:
        """``[B]`` float32: the learned reward model's score of each prompt + completion (one packed row, length
        buckets or one padded batch, as decided for the reward model); ``rows[i]`` is the prompt row completion i
        answers."""
        seqs = self._reward_inputs([r["prompt"] for r in rows], gen, completions)
        batch = collate_sequences(seqs, self.reward_tokenizer.pad_token_id, self.reward_packing.mode, self.device,
                                  group_ids=self._prompt_groups(len(seqs)))
        with self._autocast():
            return self.reward_p(reward_scores, batch).float()

    def rule_scores(self, rows: list[dict], gen: dict, completions: list[str]) -> torch.Tensor:
        """``[B, F]`` float32: each reward function's score of each completion (NaN where it returned None);
        ``rows[i]`` is the prompt row completion i answers."""
        ids = [[t for t, m in zip(c_ids, c_mask) if m]
               for c_ids, c_mask in zip(gen["completion_ids"].tolist(), gen["completion_mask"].tolist())]
        return rewards.score_all(self.rules, rows, completions, ids, self.columns)

    def rule_means(self, scores: torch.Tensor, prefix: str) -> dict:
        """``{prefix + name: mean of the function's scores over the completions it scored, on all ranks}``."""
        scored = ~scores.isnan()
        sums = reduce_sums(*scores.nan_to_num(0.0).sum(0).tolist(), *scored.sum(0).tolist())
        f = len(self.rules)
        return {prefix + fn.name: sums[j] / sums[f + j] for j, fn in enumerate(self.rules) if sums[f + j]}

    @torch.no_grad()
    def score(self, rows: list[dict], gen: dict, completions: list[str]) -> tuple[torch.Tensor, dict]:
        """Weighted reward of each completion, ``[B]`` float32, and the parts to log (``reward/model``,
        ``reward/rule``: the weighted sum of the reward functions, ``reward/<function name>``)."""
        c = self.config
        parts, total = {}, torch.zeros(len(completions), device=self.device)
        if self.reward_model is not None:
            model_scores = self.model_scores(rows, gen, completions)
            parts["reward/model"] = model_scores.mean()
            total = total + c.reward_model_weight * model_scores
        if c.reward in ("rule", "both"):
            per_function = self.rule_scores(rows, gen, completions)
            rule = rewards.weighted_sum(self.rules, per_function)
            unscored = rule.isnan().nonzero().flatten().tolist()
            if unscored and c.reward == "rule":
                i = unscored[0]
                raise ValueError(f"no reward function scored completion {i} (all returned None) of the prompt "
                                 f"{rows[i]['prompt']!r:.200}; {len(unscored)} such completions in this batch")
            rule = rule.nan_to_num(0.0).to(self.device)  # reward=both: the model's score alone there
            parts["reward/rule"] = rule.mean()
            parts.update(self.rule_means(per_function, "reward/"))
            total = total + c.rule_weight * rule
        return total, parts

    def _reward_inputs(self, prompts: list[str], gen: dict, completions: list[str]) -> list[list[int]]:
        """Prompt + completion of each rollout as the reward model reads it: its own template (head, tail) around
        the policy's tokens, or around its own tokenization of the texts when the tokenizers differ. A completion
        cut at max_new_tokens (no EOS) gets no EOS tail: the reward model sees an unfinished answer."""
        t, eos = self.reward_template, self.tokenizer.eos_token_id
        seqs = []
        for i, (p_ids, p_mask, c_ids, c_mask) in enumerate(zip(
                gen["prompt_ids"].tolist(), gen["prompt_mask"].tolist(), gen["completion_ids"].tolist(),
                gen["completion_mask"].tolist())):
            c_ids = [tok for tok, m in zip(c_ids, c_mask) if m]
            ended = bool(c_ids) and c_ids[-1] == eos
            if self.reward_same_tokens:
                prompt, completion = [tok for tok, m in zip(p_ids, p_mask) if m], c_ids
            else:
                encode = self.reward_tokenizer
                prompt = encode(prompts[i], add_special_tokens=False)["input_ids"]
                completion = encode(completions[i], add_special_tokens=False)["input_ids"]
            prompt, completion = t.strip(prompt, completion)
            tail = list(t.tail) if ended or not t.tail_is_eos else []
            seqs.append(list(t.head) + prompt + completion + tail)
        return seqs

    @torch.no_grad()
    def _sample_and_score(self, rows: list[dict]) -> dapo.ScoredSamples:
        """``num_samples`` completions per prompt row (with the sampler's log-probs when rollout_correction is on),
        and their rewards."""
        c = self.config
        gen = self.policy_p(generate, self.tokenizer, [r["prompt"] for r in rows], max_new_tokens=c.max_new_tokens,
                            do_sample=True, temperature=c.temperature, top_p=c.top_p,
                            num_return_sequences=c.num_samples, min_new_tokens=c.min_new_tokens,
                            synced_gpus=self.policy_p.is_fsdp, return_logprobs=c.rollout_correction != "none",
                            engine=c.generation)
        completions = decode_completions(self.tokenizer, gen["completion_ids"], gen["completion_mask"])
        rows_n = [r for r in rows for _ in range(c.num_samples)]
        start = time.perf_counter()
        scores, parts = self.score(rows_n, gen, completions)
        self._score_time += time.perf_counter() - start
        return dapo.ScoredSamples(gen, completions, rows_n, scores, parts)

    @torch.no_grad()
    def rollout(self, rows: list[dict]) -> Rollout:
        """Sample, score and compute advantages for one batch of prompt rows."""
        c = self.config
        n = c.num_samples
        self.policy.eval()
        if self.value is not None:
            self.value.eval()
        timing = {}
        start = time.perf_counter()
        self._score_time = 0.0  # of every draw: _sample_and_score adds to it
        if c.dynamic_sampling:  # DAPO: only prompts whose samples differ in reward, drawing more as needed
            samples, draw_stats = dapo.dynamic_sampling(
                self._sample_and_score, rows, lambda: fdist.shard(next(self.sampler)), n, c.max_extra_draws,
                self.tokenizer.pad_token_id, lambda x: int(reduce_sums(x)[0]))
        else:
            samples, draw_stats = self._sample_and_score(rows), {}
        gen, completions, rows_n, raw_scores, parts = (samples.gen, samples.completions, samples.rows, samples.scores,
                                                       {**samples.parts, **draw_stats})
        prompts_n = [r["prompt"] for r in rows_n]
        timing["timing/score"] = self._score_time
        timing["timing/generate"] = time.perf_counter() - start - self._score_time

        start = time.perf_counter()
        batch = self._sequences(gen)
        prompt_len = gen["prompt_ids"].shape[1]
        mask = gen["completion_mask"]
        old_logprobs = None if self.on_policy() else self._logprobs(self.policy_p, batch, prompt_len)
        ref_logprobs = self._ref_logprobs(batch, prompt_len) if self.uses_reference() else None
        values = self._values(batch, prompt_len) if self.value is not None else None
        timing["timing/logprobs"] = time.perf_counter() - start

        start = time.perf_counter()
        # on a valid position: batches of several draws are re-padded, and pad may be the EOS token
        has_eos = ((gen["completion_ids"] == self.tokenizer.eos_token_id) & (mask != 0)).any(dim=1)
        scores = raw_scores
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~has_eos).float()
        if c.overlong_buffer:  # DAPO's soft overlong punishment
            overlong = dapo.overlong_penalty(mask.sum(1), c.max_new_tokens, c.overlong_buffer, c.overlong_penalty)
            scores = scores + overlong.to(scores.device)
            parts["reward/overlong_penalty"] = overlong.mean()
        scores = self.normalizer(scores)
        kl_measured = old_logprobs is not None and ref_logprobs is not None
        if kl_measured:
            kl = torch.where(mask != 0, kl_penalty(old_logprobs, ref_logprobs, c.kl_estimator, backend=c.backend), 0.0)
        else:  # no KL term, or on-policy: the update measures it on its own log-probs (compute_loss)
            kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kl_coef = self.kl_ctl.value
        advantages, returns = fadv.compute_advantages(
            c.advantage, scores, mask, n=n, kl=kl if c.kl_in == "reward" else None, kl_coef=kl_coef, values=values,
            gamma=c.gamma, lam=c.lam, baseline=self.baseline, scale_rewards=c.scale_rewards)
        if c.whiten_advantages and c.advantage not in fadv.WHITENED_ESTIMATORS:
            advantages = fadv.whiten_advantages(advantages, mask)  # statistics over all ranks' rollouts
        sampler_logprobs = gen.get("sampler_logprobs")
        if c.rollout_correction != "none":  # a constant weight >= 0 per token: folded into the advantage
            weights, correction = correction_weights(old_logprobs, sampler_logprobs, mask, c.rollout_correction,
                                                     c.rollout_is_threshold, c.rollout_is_threshold_lower)
            advantages = advantages * weights
            parts.update(correction)
        timing["timing/advantages"] = time.perf_counter() - start

        seq_kl = kl.sum(1)
        non_score = -kl_coef * seq_kl if c.kl_in == "reward" else torch.zeros_like(seq_kl)
        stats = {
            "objective/scores": raw_scores.mean(),
            "objective/non_score_reward": non_score.mean(),
            "objective/rlhf_reward": (raw_scores + non_score).mean(),
            "objective/kl_coef": kl_coef,
            "rollout/length": mask.sum(1).float().mean(),
            "rollout/eos_fraction": has_eos.float().mean(),
            **parts, **timing,
        }
        if kl_measured:
            stats["objective/kl"] = seq_kl.mean()
        if self.task is not None:
            start = time.perf_counter()
            truth = [self.task.score(p, x) for p, x in zip(prompts_n, completions)]
            stats["objective/true_score"] = sum(truth) / len(truth)
            stats["objective/true_accuracy"] = sum(self.task.is_correct(p, x)
                                                   for p, x in zip(prompts_n, completions)) / len(truth)
            stats["timing/score"] += time.perf_counter() - start  # the task's own scores, for the log
        return Rollout(batch=batch, prompt_len=prompt_len, mask=mask, old_logprobs=old_logprobs,
                       ref_logprobs=ref_logprobs, values=values, advantages=advantages, returns=returns, scores=scores,
                       seq_kl=seq_kl, sampler_logprobs=sampler_logprobs, stats=stats, completions=completions,
                       prompts=prompts_n)

    # ---- the update --------------------------------------------------------------------------------------------
