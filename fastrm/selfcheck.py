"""``fastrm selfcheck``: prove the ops are right on this machine, then show what they buy.

1. Correctness: every op, on every backend available here, against a float64 computation of its
   reference on fresh random inputs, values and gradients.
2. A quick benchmark: the plain PyTorch code a user would write vs fastrm (torch path on CPU,
   Triton on CUDA), median wall time and peak memory where measurable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastrm
from fastrm import kernels


def available_backends(device: str) -> list[str]:
    backends = ["torch"]
    if kernels.HAS_TRITON and (device == "cuda" or kernels.INTERPRET):
        backends.append("triton")
    return backends


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    return out.detach(), [x.grad for x in leaves], weights


def check_gather_logprobs(backend, device):
    logits = torch.randn(37, 1003, device=device) * 3
    labels = torch.randint(0, 1003, (37,), device=device)
    labels[::5] = -100
    ours, (g_ours,), w = _grads(lambda x: fastrm.gather_logprobs(x, labels, temperature=0.8, backend=backend), logits)
    x64 = logits.double().requires_grad_(True)
    ref = fastrm.gather_logprobs_reference(x64, labels, temperature=0.8)
    (ref * w.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(g_ours, x64.grad))


def check_compute_gae(backend, device):
    B, T = 6, 53
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    adv, ret = fastrm.compute_gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    ref_adv, ref_ret = fastrm.compute_gae_reference(rewards.double(), values.double(), mask, 0.99, 0.95)
    return max(_max_err(adv, ref_adv), _max_err(ret, ref_ret))


def check_pairwise_ranking_loss(backend, device):
    chosen, rejected = torch.randn(301, device=device), torch.randn(301, device=device)
    fn = lambda c, r: fastrm.pairwise_ranking_loss(c, r, margin=0.5, center_coef=0.01, backend=backend)  # noqa: E731
    ours, (gc, gr), w = _grads(fn, chosen, rejected)
    c64, r64 = chosen.double().requires_grad_(True), rejected.double().requires_grad_(True)
    ref = fastrm.pairwise_ranking_loss_reference(c64, r64, margin=0.5, center_coef=0.01)
    (ref * w.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(gc, c64.grad), _max_err(gr, r64.grad))


def check_ranking_loss(backend, device):
    rewards = torch.randn(9, 5, device=device)
    ranks = torch.randint(-1, 4, (9, 5), device=device)
    ranks[:, 0], ranks[:, 1] = 0, 1  # at least one valid pair per row
    ours, (g,), w = _grads(lambda r: fastrm.ranking_loss(r, ranks, backend=backend), rewards)
    r64 = rewards.double().requires_grad_(True)
    ref = fastrm.ranking_loss_reference(r64, ranks)
    (ref * w.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(g, r64.grad))


def check_linear_logprobs(backend, device):
    hidden, weight = torch.randn(29, 16, device=device), torch.randn(301, 16, device=device) * 0.5
    labels = torch.randint(0, 301, (29,), device=device)
    labels[::4] = -100
    fn = lambda h, w: fastrm.linear_logprobs(h, w, labels, chunk_size=8, backend=backend)  # noqa: E731
    ours, (gh, gw), w8 = _grads(fn, hidden, weight)
    h64, wt64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = fastrm.linear_logprobs_reference(h64, wt64, labels)
    (ref * w8.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(gh, h64.grad), _max_err(gw, wt64.grad))


def _ppo_batch(device):
    B, T = 5, 23
    logprobs = -torch.rand(B, T, device=device) * 2
    old = logprobs + torch.randn(B, T, device=device) * 0.3  # ratios on both sides of the clip range
    advantages = torch.randn(B, T, device=device)
    mask = torch.rand(B, T, device=device) > 0.25
    return logprobs, old, advantages, mask


def check_ppo_policy_loss(backend, device):
    logprobs, old, advantages, mask = _ppo_batch(device)
    fn = lambda lp: fastrm.ppo_policy_loss(lp, old, advantages, mask, dual_clip=3.0, backend=backend).loss  # noqa: E731
    ours, (g,), w = _grads(fn, logprobs)
    lp64 = logprobs.double().requires_grad_(True)
    ref = fastrm.ppo_policy_loss_reference(lp64, old.double(), advantages.double(), mask, dual_clip=3.0)[0]
    (ref * w.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(g, lp64.grad))


def check_value_loss(backend, device):
    values, old, returns, mask = _ppo_batch(device)
    fn = lambda v: fastrm.value_loss(v, old, returns, mask, clip=0.2, backend=backend).loss  # noqa: E731
    ours, (g,), w = _grads(fn, values)
    v64 = values.double().requires_grad_(True)
    ref = fastrm.value_loss_reference(v64, old.double(), returns.double(), mask, clip=0.2)[0]
    (ref * w.double()).sum().backward()
    return max(_max_err(ours, ref), _max_err(g, v64.grad))


def check_kl_penalty(backend, device):
    logprobs, ref_logprobs, _, _ = _ppo_batch(device)
    worst = 0.0
    for kind in ("k1", "k2", "k3", "abs"):
        fn = lambda lp: fastrm.kl_penalty(lp, ref_logprobs, kind, backend=backend)  # noqa: E731
        ours, (g,), w = _grads(fn, logprobs)
        lp64 = logprobs.double().requires_grad_(True)
        ref = fastrm.kl_penalty_reference(lp64, ref_logprobs.double(), kind)
        (ref * w.double()).sum().backward()
        worst = max(worst, _max_err(ours, ref), _max_err(g, lp64.grad))
    return worst


CHECKS = {
    "gather_logprobs": check_gather_logprobs,
    "linear_logprobs": check_linear_logprobs,
    "compute_gae": check_compute_gae,
    "pairwise_ranking_loss": check_pairwise_ranking_loss,
    "ranking_loss": check_ranking_loss,
    "ppo_policy_loss": check_ppo_policy_loss,
    "value_loss": check_value_loss,
    "kl_penalty": check_kl_penalty,
}
TOLERANCE = 1e-4


def _median_ms(fn, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def quick_benchmarks(device, repeats):
    """(name, size, baseline label, baseline fn, fastrm fn) — small enough for a laptop CPU."""
    N, V = (1024, 32000) if device == "cpu" else (8192, 128256)
    logits = torch.randn(N, V, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    B, T = 256, 1024
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, T // 2 + 100:] = False
    chosen, rejected = torch.randn(8192, device=device), torch.randn(8192, device=device)
    rk_rewards = torch.randn(512, 8, device=device)
    rk_ranks = torch.argsort(torch.randn(512, 8, device=device), dim=-1)
    return [
        ("gather_logprobs fwd", f"N={N} V={V}", "log_softmax+gather",
         lambda: fastrm.gather_logprobs_reference(logits, labels), lambda: fastrm.gather_logprobs(logits, labels)),
        ("compute_gae", f"B={B} T={T}", "python loop over T",
         lambda: fastrm.compute_gae_reference(rewards, values, mask, 0.99, 0.95),
         lambda: fastrm.compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)),
        ("pairwise_ranking_loss", "B=8192", "-logsigmoid(c-r).mean()",
         lambda: fastrm.pairwise_ranking_loss_reference(chosen, rejected),
         lambda: fastrm.pairwise_ranking_loss(chosen, rejected)),
        ("ranking_loss", "B=512 K=8", "[B,K,K] broadcast",
         lambda: fastrm.ranking_loss_reference(rk_rewards, rk_ranks), lambda: fastrm.ranking_loss(rk_rewards, rk_ranks)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastrm selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-bench", action="store_true", help="only the correctness checks")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = args.device
    backends = available_backends(device)
    print(f"fastrm {fastrm.__version__} | torch {torch.__version__} | device {device} | backends {backends}")
    if device == "cpu" and "triton" not in backends:
        print("note: set TRITON_INTERPRET=1 before running to also check the Triton kernels on CPU (interpreted)")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs on every run

    failed = 0
    print(f"\ncorrectness vs float64 (values and gradients, tolerance {TOLERANCE:g}):")
    for name, check in CHECKS.items():
        for backend in backends:
            err = check(backend, device)
            ok = err <= TOLERANCE
            failed += not ok
            print(f"  {'PASS' if ok else 'FAIL'}  {name:<22} backend={backend:<7} max abs err {err:.2e}")

    if not args.skip_bench:
        print(f"\nquick benchmark on {device} (median of {args.repeats}; auto backend):")
        print(f"  {'op':<22} {'size':<16} {'baseline':<26} {'baseline ms':>12} {'fastrm ms':>10} {'speedup':>8}")
        for name, size, label, baseline, ours in quick_benchmarks(device, args.repeats):
            with torch.no_grad():
                t_base, t_ours = _median_ms(baseline, args.repeats), _median_ms(ours, args.repeats)
            print(f"  {name:<22} {size:<16} {label:<26} {t_base:>12.2f} {t_ours:>10.2f} {t_base / t_ours:>7.1f}x")

    print("\nselfcheck " + ("PASSED" if not failed else f"FAILED ({failed} check(s))"))
    return 1 if failed else 0
