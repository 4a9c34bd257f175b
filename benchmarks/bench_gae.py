"""compute_gae vs the plain Python reversed-time loop a user writes (verl's mask-aware GAE).

    python benchmarks/bench_gae.py                          # B=256, T=1024, right-padded rows
    python benchmarks/bench_gae.py --batch 64 --seqlen 4096 --layout holes

Providers: the Python loop (fastrm.kernels.gae.compute_gae_reference), fastrm's vectorized PyTorch path
(backend='torch', input checks included), and on CUDA the Triton kernel (backend='triton'). Every provider
is checked against the float64 loop before it is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, time_fn, write_results  # noqa: E402

from fastrm.kernels.gae import compute_gae_reference  # noqa: E402
from fastrm.ops.gae import compute_gae  # noqa: E402


def make_inputs(batch, seqlen, layout, device):
    torch.manual_seed(0)
    rewards = torch.randn(batch, seqlen, device=device)
    values = torch.randn(batch, seqlen, device=device)
    pos = torch.arange(seqlen, device=device)
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), device=device)
    if layout == "right_pad":
        mask = pos[None, :] < lengths[:, None]
    elif layout == "left_pad":
        mask = pos[None, :] >= (seqlen - lengths)[:, None]
    else:  # "holes": multi-turn, observation tokens masked in the middle
        mask = torch.rand(batch, seqlen, device=device) < 0.7
    return rewards, values, mask


def providers(device):
    out = {
        "python-loop": lambda r, v, m: compute_gae_reference(r, v, m, 0.99, 0.95),
        "fastrm-torch": lambda r, v, m: compute_gae(r, v, m, gamma=0.99, lam=0.95, backend="torch"),
    }
    if device == "cuda":
        out["fastrm-triton"] = lambda r, v, m: compute_gae(r, v, m, gamma=0.99, lam=0.95, backend="triton")
    return out


def run(batch, seqlen, layout, repeats, loop_repeats):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, v, m = make_inputs(batch, seqlen, layout, device)
    ref = compute_gae_reference(r.double(), v.double(), m, 0.99, 0.95)
    rows = []
    for name, fn in providers(device).items():
        got = fn(r, v, m)
        err = max((g.double() - w).abs().max().item() for g, w in zip(got, ref))
        assert err < 1e-3, f"{name} disagrees with the float64 loop by {err}"  # never time a wrong answer
        n = loop_repeats if name == "python-loop" else repeats
        t = time_fn(lambda: fn(r, v, m), repeats=n, warmup=1 if name == "python-loop" else 3)
        rows.append({"provider": name, "batch": batch, "seqlen": seqlen, "layout": layout,
                     "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "min_ms": min(t.get("samples_ms", [t["p20_ms"]])), "max_abs_err": err})
    base = rows[0]["median_ms"]
    for row in rows:
        row["speedup_vs_loop"] = base / row["median_ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--layout", default="right_pad", choices=["right_pad", "left_pad", "holes"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--loop-repeats", type=int, default=5, help="repeats for the (slow) Python loop")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args.batch, args.seqlen, args.layout, args.repeats, args.loop_repeats)
    print(markdown_table(rows, ["provider", "batch", "seqlen", "layout", "median_ms", "p20_ms", "p80_ms", "min_ms",
                                "speedup_vs_loop"]))
    if not args.no_save:
        print("wrote", write_results(f"gae_{args.layout}", rows))
    return rows


if __name__ == "__main__":
    main()
