"""gather_logprobs vs the eager ``log_softmax().gather()`` a user writes (and torch.compile of it).

    python benchmarks/bench_logprobs.py                   # CPU defaults
    python benchmarks/bench_logprobs.py --tokens 16384 --vocab 128256 --dtype bfloat16   # a GPU size

Bytes moved by the fused kernel (memory-bound): forward reads N*V logits once; backward reads them
again and writes N*V gradients: fwd = N*V*s, bwd = 2*N*V*s (s = bytes per element).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, peak_memory_mb, reexec_with_exact_malloc, time_fn, write_results  # noqa: E402

import fastrm  # noqa: E402


def eager(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def providers(device, compile_ref):
    out = {"eager": eager, "fastrm-torch": lambda x, y: fastrm.gather_logprobs(x, y, backend="torch")}
    if device == "cuda":
        out["fastrm-triton"] = lambda x, y: fastrm.gather_logprobs(x, y, backend="triton")
    if compile_ref:
        out["eager-compiled"] = torch.compile(eager)
    try:  # the anchor's own function, when installed
        from trl.trainer.utils import selective_log_softmax

        out["trl-selective_log_softmax"] = selective_log_softmax
    except Exception:
        print("note: trl not installed; skipping its selective_log_softmax")
    return out


def run(tokens, vocab, dtype, repeats, compile_ref):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    grad = torch.randn(tokens, device=device)
    ref = eager(logits.double(), labels)
    rows = []
    for name, fn in providers(device, compile_ref).items():
        got = fn(logits, labels).double()
        err = (got - ref).abs().max().item()
        assert err < 5e-2, f"{name} disagrees with float64 by {err}"  # never time a wrong answer
        x = logits.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                fn(logits, labels)

        def fwd_bwd():
            (fn(x, labels) * grad).sum().backward()
            x.grad = None  # freed after the call, so the peak includes the gradient buffer

        for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            t = time_fn(call, repeats=repeats)
            rows.append({"provider": name, "mode": mode, "tokens": tokens, "vocab": vocab, "dtype": str(dtype)[6:],
                         "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                         "peak_mb": peak_memory_mb(call), "max_abs_err": err})
    return rows


def main(argv=None):
    reexec_with_exact_malloc()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the eager formula")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = run(args.tokens, args.vocab, getattr(torch, args.dtype), args.repeats, args.compile)
    print(markdown_table(rows, ["provider", "mode", "tokens", "vocab", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mb"]))
    if not args.no_save:
        print("wrote", write_results("logprobs", rows))
    return rows


if __name__ == "__main__":
    main()
