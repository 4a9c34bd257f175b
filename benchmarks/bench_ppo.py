"""ppo_policy_loss: the PPO clipped surrogate (+ dual clip) over a masked [B, T] batch, fastrm vs the
formula as verl / TRL write it.

    python benchmarks/bench_ppo.py --quick                          # CPU-sized: B 8,64 x T 2048
    python benchmarks/bench_ppo.py                                  # full sweep (default on CUDA)
    python benchmarks/bench_ppo.py --batch 8 --seq 2048
    python benchmarks/bench_ppo.py --quick --policy-loss cispo      # CISPO (results: ppo_cispo_<device>)
    python benchmarks/bench_ppo.py --quick --policy-loss sapo       # SAPO (results: ppo_sapo_<device>)

Providers: fastrm Triton (CUDA; one pass per row writes the loss sums, the metrics and d logprobs) and
torch path; ``reference`` = ``fastrm.ppo_policy_loss_reference`` (verl's ``compute_policy_loss``: ratio,
two clipped branches, dual clip, masked token-mean, plus the clip fraction and approx-KL metrics, each a
separate elementwise pass); ``torch.compile`` of it. With ``--policy-loss cispo`` the reference is CISPO as TRL
writes it (``-clamp(ratio, max=1 + eps_high).detach() * A * logprobs``, masked token-mean) and fastrm runs
``policy_loss="cispo"`` (no dual clip); ``--policy-loss sapo``: SAPO as TRL writes it (``-sigmoid(tau (ratio - 1)) *
4 / tau * A``, tau 1.0 where A > 0 else 1.05, masked token-mean) against ``policy_loss="sapo"``.

Bytes the op cannot avoid (memory-bound; s = bytes per element, m = mask bytes): fwd reads logprobs,
old_logprobs, advantages and the mask, B*T*(3s+m); fwd+bwd also writes d logprobs, B*T*(4s+m).
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

QUICK = {"batch": [8, 64], "seq": [2048]}
FULL = {"batch": [8, 64, 256], "seq": [1024, 2048, 8192]}
BYTES_FORMULA = "fwd B*T*(3s+m), bwd B*T*s, fwd+bwd B*T*(4s+m) (s = bytes per element, m = mask bytes)"
DUAL_CLIP = 3.0


CISPO_EPS_HIGH = 4.0  # TRL's recommended epsilon_high = 5.0 is the bound 1 + CISPO_EPS_HIGH


def reference(logprobs, old, advantages, mask):
    return fastrm.ppo_policy_loss_reference(logprobs, old, advantages, mask, dual_clip=DUAL_CLIP)[0]


def cispo_reference(logprobs, old, advantages, mask):
    m = mask.to(logprobs.dtype)
    weight = torch.exp(logprobs - old).clamp(max=1 + CISPO_EPS_HIGH).detach()
    return (-weight * advantages * logprobs * m).sum() / m.sum()


def sapo_reference(logprobs, old, advantages, mask):
    m = mask.to(logprobs.dtype)
    tau = torch.where(advantages > 0, 1.0, 1.05).to(logprobs.dtype)
    gate = torch.sigmoid(tau * (torch.exp(logprobs - old) - 1)) * 4 / tau
    return (-gate * advantages * m).sum() / m.sum()


REFERENCES = {"ppo": reference, "cispo": cispo_reference, "sapo": sapo_reference}
OPTIONS = {"ppo": {"dual_clip": DUAL_CLIP}, "cispo": {"policy_loss": "cispo", "clip_eps_high": CISPO_EPS_HIGH},
           "sapo": {"policy_loss": "sapo"}}


def providers(device: str, compile_ref: bool, policy_loss: str = "ppo") -> list[Provider]:
    options, ref = OPTIONS[policy_loss], REFERENCES[policy_loss]
    out = [Provider(f"fastrm-{b}", lambda lp, old, adv, m, b=b: fastrm.ppo_policy_loss(
        lp, old, adv, m, backend=b, **options).loss) for b in common.fastrm_backends(device)]
    out.append(Provider("reference", ref))
    if compile_ref:
        out.append(Provider("reference-compiled", torch.compile(ref)))
    return out


def make_case(size: dict, dtype: torch.dtype, device: str, policy_loss: str = "ppo") -> Case:
    B, T = size["batch"], size["seq"]
    gen = torch.Generator(device=device).manual_seed(0)
    logprobs = (-torch.rand(B, T, generator=gen, device=device) * 3).to(dtype)
    old = (logprobs.float() + 0.2 * torch.randn(B, T, generator=gen, device=device)).to(dtype)
    advantages = torch.randn(B, T, generator=gen, device=device).to(dtype)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # right padding
    s, m = logprobs.element_size(), mask.element_size()
    return common.autograd_case(size, REFERENCES[policy_loss], (logprobs, old, advantages, mask), grad_inputs=(0,),
                                bytes_moved=lambda mode: {"fwd": B * T * (3 * s + m), "bwd": B * T * s,
                                                          "fwd+bwd": B * T * (4 * s + m)}[mode])


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, batch="B (sequences)", seq="T (tokens per sequence)")
    parser.add_argument("--policy-loss", choices=tuple(REFERENCES), default="ppo",
                        help="the surrogate: ppo (clipped ratio, dual clip), cispo or sapo")
    args = parser.parse_args(argv)
    name, op = (("ppo", "ppo_policy_loss") if args.policy_loss == "ppo"
                else (f"ppo_{args.policy_loss}", f"ppo_policy_loss({args.policy_loss})"))
    run = common.Run(name, op, args, baseline="reference", plot_x="seq", plot_panel="batch",
                     default_dtype="float32", bytes_formula=BYTES_FORMULA)
    return run.sweep_and_finish(common.sweep(args, QUICK, FULL),
                                lambda size: make_case(size, run.dtype, run.device, args.policy_loss),
                                providers(run.device, args.compile, args.policy_loss))


if __name__ == "__main__":
    common.run_script(main)
