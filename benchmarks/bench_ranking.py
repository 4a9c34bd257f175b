"""Ranking losses vs the plain PyTorch a user writes.

    python benchmarks/bench_ranking.py                                 # CPU: reference vs torch path
    python benchmarks/bench_ranking.py --dtype bfloat16                # on CUDA the Triton kernels join in
    python benchmarks/bench_ranking.py --pairwise-batch 1024,65536 --ranking-k 2,4,8,16

pairwise_ranking_loss: TRL's ``-logsigmoid(c - r - m).mean() + center_coef * mean((c + r)**2)``
(``pairwise_ranking_loss_reference``) vs fastrm, B up to 64k. ranking_loss: the [B, K, K] broadcast
of all pairs (``ranking_loss_reference``) vs fastrm's loop over the anchor, B=512, K in 2..16.
Both ops are tiny and launch-bound on a GPU; the interesting columns are the launch count (time)
and, for ranking_loss, the [B, K, K] memory the reference builds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_memory_mb, reexec_with_exact_malloc, time_fn, write_results  # noqa: E402

from fastrm import kernels  # noqa: E402
from fastrm.kernels.ranking import pairwise_ranking_loss_reference, ranking_loss_reference  # noqa: E402
from fastrm.ops.ranking import pairwise_ranking_loss, ranking_loss  # noqa: E402

MARGIN = 0.5
CENTER_COEF = 0.01


def _backends(device):
    backends = ["torch"]
    if device == "cuda" and kernels.HAS_TRITON:
        backends.append("triton")
    return backends


def _time_modes(fwd, fwd_bwd, repeats):
    out = {}
    for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        t = time_fn(call, repeats=repeats)
        out[mode] = {"median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "peak_mb": peak_memory_mb(call)}
    return out


def bench_pairwise(batches, dtype, repeats, device):
    rows = []
    for batch in batches:
        torch.manual_seed(0)
        chosen = torch.randn(batch, device=device, dtype=dtype)
        rejected = torch.randn(batch, device=device, dtype=dtype)
        truth = pairwise_ranking_loss_reference(chosen.double(), rejected.double(), MARGIN, CENTER_COEF)
        providers = {"reference": lambda c, r: pairwise_ranking_loss_reference(c, r, MARGIN, CENTER_COEF)}
        for backend in _backends(device):
            providers[f"fastrm-{backend}"] = lambda c, r, b=backend: pairwise_ranking_loss(
                c, r, margin=MARGIN, center_coef=CENTER_COEF, backend=b)
        for name, fn in providers.items():
            err = abs(fn(chosen, rejected).double().item() - truth.item())
            assert err < 5e-2, f"{name} disagrees with float64 by {err}"  # never time a wrong answer
            c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    fn(chosen, rejected)

            def fwd_bwd():
                fn(c, r).backward()
                c.grad = r.grad = None

            for mode, t in _time_modes(fwd, fwd_bwd, repeats).items():
                rows.append({"op": "pairwise", "provider": name, "mode": mode, "B": batch, "K": 2,
                             "dtype": str(dtype)[6:], **t, "abs_err": err})
    return rows


def bench_ranking(batch, ks, dtype, repeats, device):
    rows = []
    for k in ks:
        torch.manual_seed(0)
        rewards = torch.randn(batch, k, device=device, dtype=dtype)
        ranks = torch.argsort(torch.randn(batch, k, device=device), dim=-1)
        truth = ranking_loss_reference(rewards.double(), ranks)
        providers = {"reference": ranking_loss_reference}
        for backend in _backends(device):
            providers[f"fastrm-{backend}"] = lambda x, y, b=backend: ranking_loss(x, y, backend=b)
        for name, fn in providers.items():
            err = abs(fn(rewards, ranks).double().item() - truth.item())
            assert err < 5e-2, f"{name} disagrees with float64 by {err}"
            x = rewards.clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    fn(rewards, ranks)

            def fwd_bwd():
                fn(x, ranks).backward()
                x.grad = None

            for mode, t in _time_modes(fwd, fwd_bwd, repeats).items():
                rows.append({"op": "ranking", "provider": name, "mode": mode, "B": batch, "K": k,
                             "dtype": str(dtype)[6:], **t, "abs_err": err})
    return rows


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    reexec_with_exact_malloc()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairwise-batch", type=_ints, default=[1024, 8192, 65536], help="comma-separated B")
    parser.add_argument("--ranking-batch", type=int, default=512)
    parser.add_argument("--ranking-k", type=_ints, default=[2, 4, 8, 16], help="comma-separated K")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    rows = bench_pairwise(args.pairwise_batch, dtype, args.repeats, device)
    rows += bench_ranking(args.ranking_batch, args.ranking_k, dtype, args.repeats, device)
    print(markdown_table(rows, ["op", "provider", "mode", "B", "K", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb"]))
    if not args.no_save:
        print("wrote", write_results("ranking", rows))
    return rows


if __name__ == "__main__":
    main()
