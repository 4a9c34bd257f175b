"""fastrm's ops inside ``torch.compile(fullgraph=True)``: no graph break, same values and gradients as eager.

The Triton launches are torch.library custom ops (``fastrm::*``, with fake implementations for tracing), so
dynamo keeps each as one node; the autograd.Functions around them and the PyTorch paths trace as plain torch
code (value checks become ``torch._assert_async`` while tracing). On CPU the ``aot_eager`` backend runs
dynamo and AOTAutograd without inductor's slow C++ compile: the Triton path's custom ops then run the
kernels under the interpreter. On CUDA, inductor compiles the graph around the Triton kernels.
"""

import pytest
import torch
from helpers import BACKENDS, DEVICE, requires_cuda

import fastrm
from fastrm.kernels import gae as gae_kernels


def make_inputs(device, dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    B, T, V, H = 3, 21, 37, 8
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[:, 0] = True
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100
    ranks = torch.argsort(torch.rand(5, 4, generator=gen), dim=-1)
    ranks[0, 0] = -1
    leaves = {"logits": rand(B, T, V), "hidden": rand(B, T, H), "weight": rand(V, H), "bias": rand(V),
              "rewards": rand(B, T), "values": rand(B, T), "logprobs": rand(B, T, scale=0.3) - 1,
              "chosen": rand(17), "rejected": rand(17), "scores": rand(5, 4)}
    data = {"labels": labels.to(device), "mask": mask.to(device), "old": rand(B, T, scale=0.3) - 1,
            "ref": rand(B, T, scale=0.3) - 1, "adv": rand(B, T), "ranks": ranks.to(device)}
    return leaves, data


def every_op(leaves, data, backend):
    """One training-step-like graph through every op; returns one scalar per op."""
    out = {}
    lp, ent = fastrm.gather_logprobs(leaves["logits"] * 1.0, data["labels"], temperature=0.8, return_entropy=True,
                                     backend=backend)
    candidates = torch.stack([data["labels"].clamp_min(0), data["labels"].flip(-1).clamp_min(0)], dim=-1)
    lp_k = fastrm.gather_logprobs(leaves["logits"] * 1.0, candidates, softcap=30.0, backend=backend)
    out["gather_logprobs"] = (lp * 1.5).sum() + ent.mean() + lp_k.mean()
    lp, ent = fastrm.linear_logprobs(leaves["hidden"], leaves["weight"], data["labels"], bias=leaves["bias"],
                                     return_entropy=True, chunk_size=16, backend=backend)
    out["linear_logprobs"] = lp.sum() - ent.sum()
    adv, ret = fastrm.compute_gae(leaves["rewards"], leaves["values"], data["mask"], gamma=0.99, lam=0.95,
                                  backend=backend)
    out["compute_gae"] = (adv * adv).sum() + ret.sum()
    out["whiten"] = (fastrm.whiten(leaves["rewards"], data["mask"]) ** 2).sum()
    policy = fastrm.ppo_policy_loss(leaves["logprobs"], data["old"], data["adv"], data["mask"], dual_clip=3.0,
                                    agg="seq-mean-token-mean", backend=backend)
    gspo = fastrm.ppo_policy_loss(leaves["logprobs"], data["old"], data["adv"], data["mask"], ratio_level="sequence",
                                  backend=backend)
    out["ppo_policy_loss"] = policy.loss + 0 * policy.clipfrac + gspo.loss
    out["value_loss"] = fastrm.value_loss(leaves["values"], data["old"], data["adv"], data["mask"], clip=0.2,
                                          backend=backend).loss
    out["kl_penalty"] = sum(fastrm.kl_penalty(leaves["logprobs"], data["ref"], kind, backend=backend).mean()
                            for kind in ("k1", "k3", "k3+"))
    out["pairwise_ranking_loss"] = fastrm.pairwise_ranking_loss(leaves["chosen"], leaves["rejected"], margin=0.1,
                                                                center_coef=0.01, backend=backend)
    out["ranking_loss"] = fastrm.ranking_loss(leaves["scores"], data["ranks"], backend=backend)
    return out


def run(fn, leaves, data, backend):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    out = fn(leaves, data, backend)
    sum(out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, {k: v.grad for k, v in leaves.items()}


def compare(compiled, eager, tol):
    for name in eager[0]:
        torch.testing.assert_close(compiled[0][name], eager[0][name], **tol, msg=f"{name} value")
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], **tol, msg=f"{name} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_in_one_fullgraph_compile(backend):
    torch._dynamo.reset()
    leaves, data = make_inputs(DEVICE)
    eager = run(every_op, leaves, data, backend)
    compiled_fn = torch.compile(every_op, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    compiled = run(compiled_fn, leaves, data, backend)
    compare(compiled, eager, dict(atol=1e-5, rtol=1e-5))


def test_custom_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = [name for name in dir(torch.ops.fastrm) if not name.startswith("_")]
    for expected in ("logprob_fwd", "logprob_bwd", "gae_fwd", "gae_bwd", "ppo_policy_fwd", "value_loss_fwd",
                     "kl_penalty_fwd", "kl_penalty_bwd", "pairwise_ranking_fwd", "ranking_fwd"):
        assert expected in ops
    with FakeTensorMode():  # shapes and dtypes without running anything
        r = torch.empty(4, 9, dtype=torch.bfloat16)
        adv, ret = gae_kernels.gae_fwd.op(r, r, torch.empty(4, 9, dtype=torch.bool), None, 0.9, 0.9)
        assert adv.shape == (4, 9) and adv.dtype == torch.float32
        d_r, d_v, d_boot = gae_kernels.gae_bwd.op(adv, ret, torch.empty(4, 9, dtype=torch.bool), 0.9, 0.9,
                                                  rewards_dtype=torch.bfloat16, values_dtype=torch.float16)
        assert d_r.dtype == torch.bfloat16 and d_v.dtype == torch.float16 and d_boot.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS[1:])  # the triton entry, with its skip mark
def test_differentiable_kernel_ops_carry_their_autograd(backend):
    # torch.ops.fastrm.{gae_fwd, kl_penalty_fwd, logprob_fwd} are differentiable on their own (autograd
    # registered with torch.library, the ops' own backward kernels): same gradients as the public ops.
    def grads(fn, *inputs):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        outs = fn(*leaves)
        weights = [torch.randn_like(o, generator=torch.Generator(o.device).manual_seed(i)) for i, o in enumerate(outs)]
        return torch.autograd.grad(outs, leaves, weights)

    r, v = torch.randn(3, 11, device=DEVICE), torch.randn(3, 11, device=DEVICE)
    mask = torch.rand(3, 11, device=DEVICE) > 0.3
    got = grads(lambda r, v: torch.ops.fastrm.gae_fwd(r, v, mask, None, 0.9, 0.8), r, v)
    want = grads(lambda r, v: fastrm.compute_gae(r, v, mask, gamma=0.9, lam=0.8, backend="torch"), r, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    lp, ref = torch.randn(3, 11, device=DEVICE), torch.randn(3, 11, device=DEVICE)
    got = grads(lambda a, b: (torch.ops.fastrm.kl_penalty_fwd(a, b, "k3"),), lp, ref)
    want = grads(lambda a, b: (fastrm.kl_penalty(a, b, "k3", backend="torch"),), lp, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    logits, labels = torch.randn(5, 13, device=DEVICE), torch.randint(0, 13, (5,), device=DEVICE)
    got = grads(lambda x: torch.ops.fastrm.logprob_fwd(x, [5, 5, 0, 13], labels, 0.7, -100, True)[:2], logits)
    want = grads(lambda x: fastrm.gather_logprobs(x, labels, temperature=0.7, return_entropy=True, backend="torch"),
                 logits)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_value_checks_under_compile_are_device_asserts():
    # Traced, a check cannot raise from Python: it becomes torch._assert_async, which on CPU still raises.
    torch._dynamo.reset()

    def loss(logits, labels):
        return fastrm.gather_logprobs(logits, labels, backend="torch").sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    logits = torch.randn(2, 3, 5)
    assert torch.isfinite(compiled(logits, torch.randint(0, 5, (2, 3))))
    with pytest.raises(RuntimeError, match="labels must lie in"):
        compiled(logits, torch.full((2, 3), 7))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_path_under_inductor(dtype):
    torch._dynamo.reset()
    leaves, data = make_inputs("cuda", dtype)
    eager = run(every_op, leaves, data, "triton")
    compiled = run(torch.compile(every_op, fullgraph=True), leaves, data, "triton")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    compare(compiled, eager, tol)
