"""``fastrm <command> ...`` with SGD (momentum 0.9) in place of the configured optimizer; the equivalence tests of
tests/test_distributed.py run it under torchrun (``torchrun ... tests/sgd_worker.py train-rm key=value ...``).

Why SGD: an SGD step is linear in the gradient, so two runs whose gradients differ by fp32 summation order (one
batch vs two ranks' halves reduced) end within that noise times the learning rate. AdamW divides each gradient by
its own running RMS: on a weight whose gradient is near zero, rounding noise becomes a step of about ``lr``, and
no tolerance below ``lr`` is safe on every machine. The momentum buffer keeps an optimizer state in the picture
(saved, re-sharded under FSDP, restored on resume)."""

import sys

import torch

from fastrm import optim

MOMENTUM = 0.9


def sgd(params, name, lr, weight_decay, device, sharded=False):
    """Drop-in for :func:`fastrm.optim.make_optimizer`."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=MOMENTUM,
                           weight_decay=weight_decay)


def use_sgd():
    optim.make_optimizer = sgd


if __name__ == "__main__":
    from fastrm.cli import main

    use_sgd()
    sys.exit(main(sys.argv[1:]))
