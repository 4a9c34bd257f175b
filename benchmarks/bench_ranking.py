"""ranking_loss: the K-way (InstructGPT) reward-model ranking loss, fastrm vs the [B, K, K] broadcast.

    python benchmarks/bench_ranking.py --quick                      # CPU-sized: B 512 x K 2,4,8,16
    python benchmarks/bench_ranking.py                              # full sweep (default on CUDA)
    python benchmarks/bench_ranking.py --batch 4096 --k 16

Providers: fastrm Triton (CUDA) and torch path, which never build the [B, K, K] pair matrix;
``reference`` = the broadcast of all pairs a user writes (``fastrm.ranking_loss_reference``: every
``r_i - r_j``, masked to i ranked above j, ``-logsigmoid`` mean); ``torch.compile`` of it. Ranks are a
random permutation per prompt (no ties, none missing).

Tiny inputs (B*K rewards): launch-bound on a GPU, so no GB/s is reported; the memory column shows the
[B, K, K] temporaries of the reference.
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

QUICK = {"batch": [512], "k": [2, 4, 8, 16]}
FULL = {"batch": [512, 4096], "k": [2, 4, 8, 16]}


def providers(device: str, compile_ref: bool) -> list[Provider]:
    out = [Provider(f"fastrm-{b}", lambda x, y, b=b: fastrm.ranking_loss(x, y, backend=b))
           for b in common.fastrm_backends(device)]
    out.append(Provider("reference", fastrm.ranking_loss_reference))
    if compile_ref:
        out.append(Provider("reference-compiled", torch.compile(fastrm.ranking_loss_reference)))
    return out


def make_case(size: dict, dtype: torch.dtype, device: str) -> Case:
    B, K = size["batch"], size["k"]
    gen = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(B, K, generator=gen, device=device).to(dtype)
    ranks = torch.argsort(torch.rand(B, K, generator=gen, device=device), dim=-1)
    return common.autograd_case(size, fastrm.ranking_loss_reference, (rewards, ranks), grad_inputs=(0,))


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, batch="B (prompts)", k="K (responses per prompt)")
    args = parser.parse_args(argv)
    run = common.Run("ranking", "ranking_loss", args, baseline="reference", plot_x="k", plot_panel="batch",
                     default_dtype="float32")
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL), lambda size: make_case(size, run.dtype, run.device),
                                providers(run.device, args.compile))


if __name__ == "__main__":
    common.run_script(main)
