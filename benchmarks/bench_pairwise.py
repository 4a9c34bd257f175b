"""pairwise_ranking_loss: the Bradley-Terry reward-model loss, fastrm vs TRL's formula.

    python benchmarks/bench_pairwise.py --quick                     # CPU-sized: B 1024,65536
    python benchmarks/bench_pairwise.py                             # full sweep (default on CUDA)
    python benchmarks/bench_pairwise.py --batch 8192 --modes fwd+bwd

Providers: fastrm Triton (CUDA; one fused kernel writes the loss and both gradients) and torch path;
``reference`` = TRL RewardTrainer's ``-logsigmoid(c - r - m).mean() + center_coef * mean((c + r) ** 2)``
(``fastrm.pairwise_ranking_loss_reference``) with margin 0.5 and center_coef 0.01; ``torch.compile`` of it.

The op reads 2*B values: even at B=256k that is a few MB, so on a GPU it is bound by launches and
syncs, not by bandwidth, and no GB/s is reported. Inputs are float32 by default (reward heads' output).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from benchmarks.common import Case, Provider  # noqa: E402

import fastrm  # noqa: E402

QUICK = {"batch": [1024, 65536]}
FULL = {"batch": [1024, 8192, 65536, 262144]}
MARGIN, CENTER_COEF = 0.5, 0.01


def reference(chosen, rejected):
    return fastrm.pairwise_ranking_loss_reference(chosen, rejected, margin=MARGIN, center_coef=CENTER_COEF)


def providers(device: str, compile_ref: bool) -> list[Provider]:
    out = [Provider(f"fastrm-{b}", lambda c, r, b=b: fastrm.pairwise_ranking_loss(
        c, r, margin=MARGIN, center_coef=CENTER_COEF, backend=b)) for b in common.fastrm_backends(device)]
    out.append(Provider("reference", reference))
    if compile_ref:
        out.append(Provider("reference-compiled", torch.compile(reference)))
    return out


def make_case(size: dict, dtype: torch.dtype, device: str) -> Case:
    gen = torch.Generator(device=device).manual_seed(0)
    chosen = (torch.randn(size["batch"], generator=gen, device=device) + 0.5).to(dtype)
    rejected = torch.randn(size["batch"], generator=gen, device=device).to(dtype)
    return common.autograd_case(size, reference, (chosen, rejected), grad_inputs=(0, 1))


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, batch="B (pairs)")
    args = parser.parse_args(argv)
    run = common.Run("pairwise", "pairwise_ranking_loss", args, baseline="reference", plot_x="batch",
                     default_dtype="float32")
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL), lambda size: make_case(size, run.dtype, run.device),
                                providers(run.device, args.compile))


if __name__ == "__main__":
    common.run_script(main)
