"""linear_logprobs: per-token log-probs straight from hidden states and the LM head, fastrm vs eager
``log_softmax(hidden @ weight.T).gather()``.

    python benchmarks/bench_linear_logprobs.py --quick              # CPU-sized: N 512,2048 x V 32000, H 256
    python benchmarks/bench_linear_logprobs.py                      # full sweep (default on CUDA), bfloat16, H 4096
    python benchmarks/bench_linear_logprobs.py --tokens 8192 --vocab 128256 --hidden 4096

Providers: fastrm Triton (CUDA) and torch path with their defaults: on CUDA chunked over tokens so the [N, V]
logits never exist (backward recomputes each chunk's logits); on a CPU, logits up to ``KEEP_LOGITS_BYTES_CPU``
(256 MiB, both quick sizes) come from one matmul and are held for backward, and ``fastrm-torch-chunked``
(``keep_logits=False``) is the chunked, memory-bounded mode there. ``eager`` = the lm_head matmul, then
``log_softmax().gather()`` in float32, as policy-gradient code does; ``torch.compile`` of it. Gradients flow to
hidden and weight.

Compute-bound (three N*V*H matmuls for eager and for held logits, four for the chunked op, which recomputes the
logits): no GB/s. Eager holds N*V logits plus their float32 log-softmax and its gradient; held logits, N*V.
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

QUICK = {"tokens": [512, 2048], "vocab": [32000], "hidden": [256]}
FULL = {"tokens": [4096, 8192, 16384], "vocab": [32000, 128256], "hidden": [4096]}


def eager(hidden, weight, labels):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def providers(device: str, compile_ref: bool) -> list[Provider]:
    out = [Provider(f"fastrm-{b}", lambda h, w, y, b=b: fastrm.linear_logprobs(h, w, y, backend=b))
           for b in common.fastrm_backends(device)]
    if device == "cpu":  # (CUDA's default is the chunked mode)
        out.append(Provider("fastrm-torch-chunked",
                            lambda h, w, y: fastrm.linear_logprobs(h, w, y, backend="torch", keep_logits=False)))
    out.append(Provider("eager", eager))
    if compile_ref:
        out.append(Provider("eager-compiled", torch.compile(eager)))
    return out


def make_case(size: dict, dtype: torch.dtype, device: str) -> Case:
    N, V, H = size["tokens"], size["vocab"], size["hidden"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device) * H**-0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    weights = torch.randn(N, generator=gen, device=device)
    return common.autograd_case(size, fastrm.linear_logprobs_reference, (hidden, weight, labels), grad_inputs=(0, 1),
                                grad_outputs=(weights,))


def memory_needed(size: dict, dtype: torch.dtype, device: str) -> int:
    """Eager fwd+bwd: the logits, their float32 log-softmax and its gradient, d logits; plus the float64 check."""
    n = size["tokens"] * size["vocab"]
    s = torch.tensor([], dtype=dtype).element_size()
    return n * (2 * s + 2 * 4) + (0 if device == "cuda" else n * 8 * 2)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, tokens="N (tokens)", vocab="V", hidden="H")
    args = parser.parse_args(argv)
    run = common.Run("linear_logprobs", "linear_logprobs", args, baseline="eager", plot_x="tokens", plot_panel="vocab")
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL), lambda size: make_case(size, run.dtype, run.device),
                                providers(run.device, args.compile),
                                memory_needed=lambda size: memory_needed(size, run.dtype, run.device))


if __name__ == "__main__":
    common.run_script(main)
