"""Run by tests/test_distributed.py under torchrun (2 gloo processes): one PPO update of a saved rollout, each rank
holding half of its rows, with SGD (see tests/sgd_worker.py), then a checkpoint; and the rollout statistics over
the two halves, which must equal the one-process statistics of the whole rollout (saved beside it). Usage:

    torchrun --nproc-per-node 2 tests/rl_update_worker.py ROLLOUT.pt key=value ...
"""

import sys

import torch
from sgd_worker import use_sgd

from fastrm import advantages as fadv
from fastrm import distributed
from fastrm.cli import exit_process
from fastrm.config import load_config
from fastrm.trainers.rl import RLConfig, RLTrainer, Rollout


def main():
    saved = torch.load(sys.argv[1], weights_only=False)
    use_sgd()
    trainer = RLTrainer(load_config(RLConfig, None, sys.argv[2:])).setup()
    assert distributed.world_size() == 2, distributed.world_size()
    rank = distributed.rank()

    half = {k: (v[rank::2] if isinstance(v, torch.Tensor) else v) for k, v in saved["rollout"].items()}
    half["batch"] = saved["rollout"]["batch"].select(slice(rank, None, 2))
    trainer.update(Rollout(**half))
    trainer.step = 1
    trainer.save()
    if trainer.mode == "fsdp":  # each rank holds about half of every weight and of its optimizer state
        from torch.distributed.tensor import DTensor

        for model, optimizer in ((trainer.policy, trainer.optimizer), (trainer.value, trainer.value_optimizer)):
            params = [p for p in model.parameters() if p.requires_grad]  # LoRA: frozen weights have no moments
            assert all(isinstance(p, DTensor) for p in params)
            whole = sum(p.numel() for p in params)
            local = sum(p.to_local().numel() for p in params)
            moments = sum(optimizer.state[p]["momentum_buffer"].to_local().numel() for p in params)
            assert local == moments and 0.4 * whole <= local <= 0.6 * whole, (local, whole)

    # statistics over ranks == statistics of the whole batch
    scores, adv, mask = saved["scores"], saved["advantages"], saved["rollout"]["mask"]
    torch.testing.assert_close(fadv.whiten_advantages(adv[rank::2], mask[rank::2]), saved["whitened"][rank::2])
    for kind in ("batch", "running"):
        norm = fadv.RewardNormalizer(kind)
        norm(scores[rank::2] + 1.0)  # running: a first batch to merge with
        torch.testing.assert_close(norm(scores[rank::2]), saved[f"normalized_{kind}"][rank::2])
    baseline = fadv.MovingAverageBaseline("moving", decay=0.5)
    baseline(scores[rank::2] + 1.0)
    torch.testing.assert_close(baseline(scores[rank::2]), saved["baselined"][rank::2])
    exit_process(0)


if __name__ == "__main__":
    main()


def answer_length(prompts, completions):
    """A rule reward with spread on a random tiny policy (reward_fn=rl_update_worker:answer_length): the length, and
    a fraction from the characters (a batch of equally long answers still differs in reward)."""
    return [len(c) + sum(map(ord, c)) % 7 / 7 for c in completions]
