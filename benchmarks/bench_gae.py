"""compute_gae: GAE advantages and returns, fastrm vs the reversed-time Python loop.

    python benchmarks/bench_gae.py --quick                          # CPU-sized: B 8,256 x T 128,1024
    python benchmarks/bench_gae.py                                  # full sweep (default on CUDA)
    python benchmarks/bench_gae.py --batch 256 --seqlen 1024 --modes fwd --layout holes

Providers: fastrm Triton (CUDA; one launch for the batch) and torch path (vectorized, no loop over T);
``python-loop`` = ``fastrm.compute_gae_reference``, the mask-aware reversed loop of verl (TRL's and
OpenRLHF's are the same loop without the mask), differentiated by autograd; ``torch.compile`` of that loop
only up to ``--compile-max-seqlen`` (dynamo unrolls the loop: compiling takes ~20 s at T=128 on a CPU and
grows with T). Inputs are float32 by default, as rewards and values are in RLHF trainers.

Masks (``--layout``): right_pad (responses of random length >= T/2, padding at the end), left_pad, or
holes (70 % of positions valid at random, like masked observation tokens in multi-turn rollouts).

Bytes the op cannot avoid (memory-bound on a GPU; s = bytes per value, m = bytes per mask element):
fwd reads rewards, values, mask and writes advantages, returns: B*T*(4s + m); bwd reads the two incoming
gradients and the mask and writes d rewards, d values: B*T*(4s + m); fwd+bwd twice that.
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

QUICK = {"batch": [8, 256], "seqlen": [128, 1024]}
FULL = {"batch": [8, 64, 256, 1024], "seqlen": [128, 1024, 4096, 16384]}
GAMMA, LAM = 0.99, 0.95
BYTES_FORMULA = "fwd B*T*(4s+m), bwd B*T*(4s+m), fwd+bwd 2*B*T*(4s+m) (s = bytes per value, m = per mask element)"


def python_loop(rewards, values, mask):
    return fastrm.compute_gae_reference(rewards, values, mask, GAMMA, LAM)


def providers(device: str, compile_ref: bool) -> list[Provider]:
    out = []
    for backend in common.fastrm_backends(device):
        out.append(Provider(f"fastrm-{backend}",
                            lambda r, v, m, b=backend: fastrm.compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend=b)))
    out.append(Provider("python-loop", python_loop))
    if compile_ref:
        out.append(Provider("python-loop-compiled", torch.compile(python_loop)))
    return out


def make_mask(batch: int, seqlen: int, layout: str, gen, device: str) -> torch.Tensor:
    pos = torch.arange(seqlen, device=device)
    lengths = torch.randint(max(1, seqlen // 2), seqlen + 1, (batch,), generator=gen, device=device)
    if layout == "right_pad":
        return pos[None, :] < lengths[:, None]
    if layout == "left_pad":
        return pos[None, :] >= (seqlen - lengths)[:, None]
    return torch.rand(batch, seqlen, generator=gen, device=device) < 0.7  # "holes"


def make_case(size: dict, dtype: torch.dtype, device: str, layout: str = "right_pad") -> Case:
    B, T = size["batch"], size["seqlen"]
    gen = torch.Generator(device=device).manual_seed(0)
    rewards = torch.randn(B, T, generator=gen, device=device).to(dtype)
    values = torch.randn(B, T, generator=gen, device=device).to(dtype)
    mask = make_mask(B, T, layout, gen, device)
    grad_outputs = (torch.randn(B, T, generator=gen, device=device), torch.randn(B, T, generator=gen, device=device))
    per_elem = 4 * rewards.element_size() + mask.element_size()
    return common.autograd_case(size, python_loop, (rewards, values, mask), grad_inputs=(0, 1),
                                grad_outputs=grad_outputs, extra={"layout": layout},
                                bytes_moved=lambda mode: (2 if mode == "fwd+bwd" else 1) * B * T * per_elem)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, batch="B", seqlen="T")
    parser.add_argument("--layout", default="right_pad", choices=["right_pad", "left_pad", "holes"])
    parser.add_argument("--compile-max-seqlen", type=int, default=128,
                        help="compile the Python loop only for T up to this (compile time grows with T)")
    args = parser.parse_args(argv)
    run = common.Run("gae", "compute_gae", args, baseline="python-loop", plot_x="seqlen", plot_panel="batch",
                     default_dtype="float32", bytes_formula=BYTES_FORMULA)
    provs = providers(run.device, args.compile)

    def sized_providers(size):
        if not args.compile or size["seqlen"] <= args.compile_max_seqlen:
            return provs
        run.note(f"python-loop-compiled skipped for T > {args.compile_max_seqlen} (--compile-max-seqlen): "
                 "dynamo unrolls the loop, so compile time grows with T")
        return [p for p in provs if p.name != "python-loop-compiled"]

    # memory: inputs, the float64 truth with its autograd graph (~T small tensors per step), outputs, gradients
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL),
                                lambda size: make_case(size, run.dtype, run.device, args.layout), sized_providers,
                                memory_needed=lambda size: size["batch"] * size["seqlen"] * 160)

if __name__ == "__main__":
    common.run_script(main)
