"""The divergence guard: a run that goes non-finite stops before the optimizer applies it and before a checkpoint
holds it, on every rank, naming a checkpoint that is really good."""

from __future__ import annotations

import logging

import torch

from fastrm import _checks
from fastrm import checkpoint as ckpt
from fastrm import distributed

log = logging.getLogger("fastrm")


class NonFiniteLossError(RuntimeError):
    """Training diverged (a NaN/inf loss, gradient norm or parameter) and stopped before the optimizer step and
    before any checkpoint; ``latest`` names the last good checkpoint."""


def parameters_nonfinite(models) -> torch.Tensor:
    """1 if a trained parameter of ``models`` is NaN/inf, else 0, as a device tensor (no sync): one foreach
    max-norm over the (under FSDP: local) parameters, one read of each, no per-parameter kernel launch or sync."""
    tensors = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
               for m in models for p in m.parameters() if p.requires_grad]
    tensors = [t for t in tensors if t.numel()]  # an FSDP rank's shard of a small parameter may be empty
    if not tensors:
        return torch.zeros(())
    if tensors[0].device.type == "cpu":
        # A sum is finite whenever every term is, so only a sum that overflowed needs the exact max-norm below,
        # which ATen runs on a CPU as a per-tensor loop several times slower than a sum (no foreach kernel);
        # a CPU has no device sync to avoid.
        if bool(torch.isfinite(torch.stack([t.sum().float() for t in tensors]).sum())):
            return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        largest = torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))
    else:
        largest = torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))]).max()
    return (~torch.isfinite(largest)).float()


INVALID_INPUT = "invalid input to an op"


class DivergenceGuard:
    """Stops a diverging run - before the optimizer applies a non-finite update and before a checkpoint with
    non-finite parameters is written - on all ranks together, with a message naming a checkpoint that is really
    good, which ``latest`` then names.

    One fused check per optimizer step (:meth:`check_step`): the step's losses and gradient norms, and the
    parameters the previous update left (a device flag computed after it, :meth:`parameters_updated`), become a
    few flags on the device, summed over ranks in one collective and read in one host sync, which also reads the
    gradient norms for the metrics. Before an evaluation or a checkpoint :meth:`check_parameters` reads the
    parameter flag at once. The trainers run ops with their finiteness checks deferred to this guard
    (:func:`fastrm._checks.deferred_finite_checks`): a NaN model output reaches it instead of raising on one rank.

    A checkpoint is *verified* once a step has run from it with finite values (a ``verified`` file in it). When a
    step diverges from an unverified checkpoint's parameters, that checkpoint is set aside as
    ``diverged-checkpoint-N`` and ``latest`` moves back to the newest remaining one (pruning always keeps the newest
    verified checkpoint, so there is one if any was verified)."""

    def __init__(self, trainer, models: list):
        self.trainer, self.models = trainer, models
        self.pending: torch.Tensor | None = None  # parameter flag of the last update, not read yet
        self.parameters_checked_at: int | None = None

    def parameters_updated(self):
        self.pending = parameters_nonfinite(self.models)

    def check_step(self, losses: list[torch.Tensor], grad_norms: dict[str, torch.Tensor],
                   extra: dict[str, torch.Tensor] | None = None, hint=None) -> list[float]:
        """Before the optimizer step: stop if a loss, a gradient norm (named in ``grad_norms``), an ``extra`` flag
        (a named quantity -> nonzero if non-finite) or the parameters are non-finite. Returns the gradient norms.
        ``hint(names)``: a sentence for the stop message given the non-finite quantities' names, computed only
        then ("" for none)."""
        flags = {"loss": torch.stack([(~torch.isfinite(x.detach().float())).any() for x in losses]).any(),
                 **{name: ~torch.isfinite(norm) for name, norm in grad_norms.items()}, **(extra or {})}
        if self.pending is not None:
            flags["parameters"] = self.pending
            self.pending = None
        # Value checks the ops ran on the GPU without a sync (fastrm._checks) report here, in the same read.
        invalid_input = _checks.deferred_failure(self.trainer.device)
        flags[INVALID_INPUT] = invalid_input if invalid_input is not None else torch.zeros(())
        values = self._read(flags, list(grad_norms.values()))
        norms = values[len(flags):]
        bad = [name for name, v in zip(flags, values) if v]
        if INVALID_INPUT in bad:  # the cause of whatever else is non-finite: stop with the op's own message
            _checks.raise_deferred_errors()
            raise ValueError("an op found invalid input on another rank; its message is in that rank's output")
        if bad:
            shown = ", ".join(f"{name} {v:.4g}" for name, v in zip(grad_norms, norms))
            self.stop(f"non-finite {', '.join(bad)} at step {self.trainer.step + 1} ({shown})",
                      "before the optimizer step", hint(bad) if hint else "")
        self._verified()
        return norms

    def check_parameters(self):
        """Stop if the last update left a non-finite parameter (read before an evaluation, checkpoint or rollout)."""
        if self.pending is None and self.parameters_checked_at == self.trainer.step:
            return
        flag = self.pending if self.pending is not None else parameters_nonfinite(self.models)
        self.pending = None
        if self._read({"parameters": flag}, [])[0]:
            self.stop(f"non-finite parameters after the update of step {self.trainer.step}",
                      "before any evaluation, rollout or checkpoint")
        self.parameters_checked_at = self.trainer.step

    def _read(self, flags: dict, norms: list) -> list[float]:
        """The flags summed over ranks, then the norms (equal on every rank): one collective, one host sync."""
        vec = torch.stack([t.detach().to(device=self.trainer.device, dtype=torch.float64).reshape(())
                           for t in [*flags.values(), *norms]])
        world = distributed.world_size()
        if world > 1:
            distributed.all_reduce_sum(vec)
            vec[len(flags):] /= world
        return vec.tolist()

    def _verified(self):
        t = self.trainer
        if t.last_checkpoint is None or t.checkpoint_verified:
            return
        t.checkpoint_verified = True
        if distributed.is_main() and t.run_id is not None:
            try:
                ckpt.mark_verified(t.last_checkpoint, t.step)
                ckpt.prune(t.out_dir, t.run_id, t.config.keep_checkpoints)
            except OSError as err:
                log.warning("could not mark %s verified or prune older checkpoints: %s", t.last_checkpoint, err)

    def stop(self, what: str, when: str, hint: str = ""):
        """Raise NonFiniteLossError on every rank, once rank 0 has set aside an unverified checkpoint the diverged
        step started from and pointed ``latest`` at the good one."""
        t = self.trainer
        suspect = t.last_checkpoint if (t.last_checkpoint is not None and not t.checkpoint_verified) else None
        good = distributed.run_on_main(ckpt.set_aside_diverged, t.out_dir, t.run_id, suspect) if t.run_id else None
        where = (f"the last good checkpoint is {good} (`latest` names it)" if good
                 else "no good checkpoint was written")
        if suspect is not None:
            where += f"; {suspect.name}, which this step started from, is set aside as diverged-{suspect.name}"
        raise NonFiniteLossError(
            f"training diverged: {what}; stopped {when}, so no checkpoint holds them. "
            f"{where[:1].upper() + where[1:]}.{' ' + hint if hint else ''} Lower the learning rate or check "
            f"the data, then resume (--resume; a changed lr applies).")
