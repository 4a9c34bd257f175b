"""gather_logprobs: per-token log-probs of chosen tokens, fastrm vs ``log_softmax().gather()``.

    python benchmarks/bench_logprobs.py --quick                     # CPU-sized: tokens 512,2048 x vocab 32000,128256
    python benchmarks/bench_logprobs.py                             # full sweep (default on CUDA), bfloat16
    python benchmarks/bench_logprobs.py --tokens 2048 --vocab 32000 --modes fwd,fwd+bwd

Providers: fastrm Triton (CUDA) and torch path, each also with ``inplace_backward=True`` (d logits written
into the logits buffer); ``eager`` = ``log_softmax(logits.float()).gather()``, the line most RLHF code runs;
``torch.compile`` of it; and, when installed, TRL's ``selective_log_softmax``, flash-attn's Triton
cross-entropy and Liger's cross-entropy (negated per-token losses; both CUDA only).

Bytes the op cannot avoid (memory-bound; s = bytes per logit; labels and the [N] outputs are < 0.1 %):
fwd reads the logits once, N*V*s; bwd reads them again and writes d logits, 2*N*V*s; fwd+bwd 3*N*V*s.
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

QUICK = {"tokens": [512, 2048], "vocab": [32000, 128256]}
FULL = {"tokens": [1024, 4096, 16384, 32768], "vocab": [32000, 128256, 256000]}
BYTES_FORMULA = "fwd N*V*s, bwd 2*N*V*s, fwd+bwd 3*N*V*s (s = bytes per logit)"


def eager(logits, labels):
    """What a user writes (TRL / verl / OpenRLHF before fusing): materialises [N, V] float32 log-probs."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def providers(device: str, compile_ref: bool, notes: list[str]) -> list[Provider]:
    out = []
    for backend in common.fastrm_backends(device):
        out.append(Provider(f"fastrm-{backend}",
                            lambda x, y, b=backend: fastrm.gather_logprobs(x, y, backend=b)))
        out.append(Provider(f"fastrm-{backend}-inplace",
                            lambda x, y, b=backend: fastrm.gather_logprobs(x, y, backend=b, inplace_backward=True),
                            modes=("bwd", "fwd+bwd")))  # its forward is fastrm-{backend}'s
    out.append(Provider("eager", eager))
    if compile_ref:
        out.append(Provider("eager-compiled", torch.compile(eager)))
    try:
        from trl.trainer.utils import selective_log_softmax

        out.append(Provider("trl-selective_log_softmax", selective_log_softmax))
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        notes.append(f"TRL not available ({type(exc).__name__}): skipped trl-selective_log_softmax")
    if device != "cuda":
        notes.append("flash-attn and Liger cross-entropy are Triton kernels for CUDA: not run on CPU")
        return out
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

        for inplace in (False, True):
            out.append(Provider("flash-attn-ce" + ("-inplace" if inplace else ""),
                                lambda x, y, i=inplace: -cross_entropy_loss(x, y, inplace_backward=i)[0],
                                modes=("bwd", "fwd+bwd") if inplace else common.MODES))
    except Exception as exc:  # noqa: BLE001
        notes.append(f"flash-attn not available ({type(exc).__name__}): skipped flash-attn-ce")
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        def liger(x, y):
            loss = liger_cross_entropy(x, y, reduction="none")
            return -(loss[0] if isinstance(loss, tuple) else loss)

        out.append(Provider("liger-ce", liger))
    except Exception as exc:  # noqa: BLE001
        notes.append(f"Liger not available ({type(exc).__name__}): skipped liger-ce")
    return out


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, 2**23 // vocab)  # float64 chunks of about 64 MiB
    for start in range(0, n_rows, rows):
        yield slice(start, min(n_rows, start + rows))


def make_case(size: dict, dtype: torch.dtype, device: str) -> Case:
    N, V = size["tokens"], size["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, generator=gen, device=device, dtype=dtype).mul_(2)
    labels = torch.randint(0, V, (N,), generator=gen, device=device)
    weights = torch.randn(N, generator=gen, device=device)
    # The float64 ground truth, a block of rows at a time: log p[label] and d/dlogits sum(w * log p[label]).
    ref_logp = torch.cat([fastrm.gather_logprobs_reference(logits[sl].double(), labels[sl]) for sl in _row_chunks(N, V)])

    def ref_grad(sl):
        g = -torch.softmax(logits[sl].double(), dim=-1) * weights[sl, None].double()
        g[torch.arange(g.shape[0], device=device), labels[sl]] += weights[sl].double()
        return g

    def check(outs, grads):
        err = {"out": common.relative_error([(outs[0].reshape(-1), ref_logp)])}
        if grads is not None:
            err["grad"] = common.relative_error((grads[0][sl], ref_grad(sl)) for sl in _row_chunks(N, V))
        return err

    s = logits.element_size()
    return Case(size=size, inputs=(logits, labels), grad_inputs=(0,), grad_outputs=(weights,), check=check,
                bytes_moved=lambda mode: {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * N * V * s)


def memory_needed(size: dict, dtype: torch.dtype, device: str) -> int:
    """Bytes to run the size at all: on CUDA the logits and fastrm's in-place gradient (bigger providers
    that run out of memory are caught and reported); on CPU the eager fwd+bwd, whose float32 log-probs,
    their gradient and d logits would otherwise get the process killed instead of raising."""
    n = size["tokens"] * size["vocab"]
    s = torch.tensor([], dtype=dtype).element_size()
    return n * (2 * s + 4) if device == "cuda" else n * (3 * s + 3 * 4)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, tokens="N (rows of logits)", vocab="V")
    args = parser.parse_args(argv)
    run = common.Run("logprobs", "gather_logprobs", args, baseline="eager", plot_x="tokens", plot_panel="vocab",
                     bytes_formula=BYTES_FORMULA)
    notes: list[str] = []
    provs = providers(run.device, args.compile, notes)
    for text in notes:
        run.note(text)
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL), lambda size: make_case(size, run.dtype, run.device),
                                provs, memory_needed=lambda size: memory_needed(size, run.dtype, run.device))


if __name__ == "__main__":
    common.run_script(main)
