"""The RL trainer's update (step 6 of :mod:`fastrm.trainers.rl`): ``ppo_epochs`` passes over shuffled minibatches
of a :class:`fastrm.trainers.rollout.Rollout`, clipped surrogate (or CISPO, SAPO) + value loss + entropy bonus (+ KL
as a loss term), the divergence guard's check, one optimizer step per minibatch."""

from __future__ import annotations

import time

import torch

from fastrm import distributed as fdist
from fastrm import optim
from fastrm.metrics import MetricsWindow
from fastrm.ops.ppo import kl_penalty, ppo_policy_loss, value_loss
from fastrm.trainers.rollout import Rollout, masked_mean


class PPOUpdate:
    """The update half of :class:`fastrm.trainers.rl.RLTrainer`."""

    def compute_loss(self, ro: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of one minibatch (rows ``idx`` of a rollout) and its detached metrics."""
        c = self.config
        batch = ro.batch.select(idx)
        mask, adv = ro.mask[idx], ro.advantages[idx]
        logprobs, entropy = self._logprobs(self.policy_p, batch, ro.prompt_len, return_entropy=True)
        # on-policy (old_logprobs None): the ratio is 1 and its gradient the policy gradient, as TRL computes it
        old = logprobs.detach() if ro.old_logprobs is None else ro.old_logprobs[idx]
        pol = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=c.clip_eps,
                              clip_eps_high=c.clip_eps_high, dual_clip=c.dual_clip, agg=c.loss_agg,
                              loss_scale_factor=self._loss_scale_factor(), policy_loss=c.policy_loss,
                              sapo_tau_pos=c.sapo_temperature_pos, sapo_tau_neg=c.sapo_temperature_neg,
                              backend=c.backend)
        mean_entropy = masked_mean(entropy, mask)
        # Data parallel: token means weighted to the mean over all ranks' tokens, as one process takes it.
        # (Sequence means need nothing: ranks hold equal rows.)
        token_weight = fdist.token_weight((mask != 0).sum())
        seq_weight = token_weight if c.loss_agg == "token-mean" else 1.0
        loss = seq_weight * pol.loss
        metrics = {"loss/policy": pol.loss.detach(), "policy/approxkl": pol.approx_kl, "policy/clipfrac": pol.clipfrac,
                   "policy/ratio": pol.ratio_mean, "policy/dual_clipfrac": pol.clipfrac_lower,
                   "objective/entropy": mean_entropy.detach()}
        if c.entropy_coef:
            loss = loss - c.entropy_coef * token_weight * mean_entropy
        if ro.old_logprobs is None and ro.ref_logprobs is not None:
            # on-policy: the rollout's KL is the one of these log-probs (the controller reads ro.seq_kl)
            kl = torch.where(mask != 0, kl_penalty(old, ro.ref_logprobs[idx], c.kl_estimator, backend=c.backend), 0.0)
            ro.seq_kl[idx] = kl.sum(1)
            metrics["objective/kl"] = kl.sum(1).mean()
        if c.kl_in == "loss" and self.kl_ctl.value:
            kl_loss = masked_mean(kl_penalty(logprobs, ro.ref_logprobs[idx], c.kl_estimator, backend=c.backend), mask)
            loss = loss + self.kl_ctl.value * token_weight * kl_loss
            metrics["loss/kl"] = kl_loss.detach()
        if self.value is not None:
            values = self._values(batch, ro.prompt_len)
            vl = value_loss(values, ro.values[idx], ro.returns[idx], mask, clip=c.value_clip, agg=c.loss_agg,
                            loss_scale_factor=self._loss_scale_factor(), backend=c.backend)
            loss = loss + c.vf_coef * seq_weight * vl.loss
            metrics.update({"loss/value": vl.loss.detach(), "val/clipfrac": vl.clipfrac,
                            "val/vpred": masked_mean(values.detach(), mask),
                            "val/error": masked_mean((values.detach() - ro.returns[idx]) ** 2, mask)})
        metrics["loss/total"] = loss.detach()
        return loss, metrics

    def _loss_scale_factor(self) -> float | None:
        """seq-mean-token-sum-norm divides by the longest possible completion, a constant (Dr. GRPO), not by the
        padded length of each minibatch."""
        return float(self.config.max_new_tokens) if self.config.loss_agg == "seq-mean-token-sum-norm" else None

    def update(self, ro: Rollout) -> dict:
        c = self.config
        self.policy.train()
        if self.value is not None:
            self.value.train()
        rows = ro.mask.shape[0]
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step)
        window = MetricsWindow()
        # What the rollout computed, non-finite anywhere on a completion token (a reward function returning 1e38
        # overflows the statistics): named in the guard's message if the step stops.
        rollout_flags = {"advantages": ~torch.isfinite(torch.where(ro.mask != 0, ro.advantages, 0.0)).all()}
        if ro.scores is not None:
            rollout_flags["rewards"] = ~torch.isfinite(ro.scores).all()

        def hint(names):
            if ro.scores is None or ("rewards" not in names and "advantages" not in names):
                return ""
            return (f"The largest |reward| of this step's rollouts is {ro.scores.abs().max().item():.3g}: "
                    f"normalise or clip rewards (reward_norm, reward_clip).")

        optimizer_time = 0.0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(rows, generator=generator).to(self.device)
            for idx in order.tensor_split(c.num_minibatches):
                loss, metrics = self.compute_loss(ro, idx)
                loss.backward()
                start = time.perf_counter()
                norms = {"policy gradient norm": optim.clip_gradients(self.policy, c.max_grad_norm)}
                if self.value is not None:
                    norms["value gradient norm"] = optim.clip_gradients(self.value, c.max_grad_norm)
                norms = self.guard.check_step([loss], norms, rollout_flags, hint)
                optim.apply_update(self.optimizer, self.scheduler)
                metrics["policy/grad_norm"] = norms[0]
                if self.value is not None:
                    optim.apply_update(self.value_optimizer, self.value_scheduler)
                    metrics["val/grad_norm"] = norms[1]
                self.guard.parameters_updated()
                optimizer_time += time.perf_counter() - start
                window.add(metrics, int(ro.mask[idx].sum()))
        return {**window.summary(), "timing/optimizer": optimizer_time}
