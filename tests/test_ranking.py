"""pairwise_ranking_loss / ranking_loss: values and gradients against a float64 reference, both backends."""

import pytest
import torch
import torch.nn.functional as F
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

from fastrm import kernels
from fastrm.kernels.ranking import pairwise_ranking_loss_reference, ranking_loss_reference
from fastrm.ops.ranking import PairwiseRankingLoss, RankingLoss, pairwise_ranking_loss, ranking_loss

REDUCTIONS = ["mean", "sum", "none"]
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
# The loss is accumulated in float32 whatever the input dtype, so it is float32-accurate even for
# bf16/fp16 inputs; the gradients come back rounded to the input dtype.
LOSS_TOL = TOL[torch.float32]


def _leaf(x: torch.Tensor, requires_grad=True) -> torch.Tensor:
    return x.detach().clone().requires_grad_(requires_grad)


def _grads(out, inputs, grad_out):
    """Gradients of ``out`` weighted by ``grad_out`` w.r.t. the inputs that require grad."""
    need = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, need, grad_out)


def _grad_output(loss: torch.Tensor) -> torch.Tensor:
    # Not 1: the backward must scale the saved gradient by grad_output (per element for "none").
    return torch.randn_like(loss, dtype=torch.float64).to(loss.dtype) + 0.5


def _check_pairwise(backend, chosen, rejected, margin=None, center_coef=0.0, reduction="mean", grad_tol=None):
    """Run fastrm and the float64 reference on the same values; compare loss, accuracy and grads."""
    loss, acc = pairwise_ranking_loss(
        chosen, rejected, margin=margin, center_coef=center_coef, reduction=reduction,
        return_accuracy=True, backend=backend,
    )
    expected_dtype = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype
    assert acc.dtype == torch.float32 and not acc.requires_grad
    assert loss.shape == (chosen.shape if reduction == "none" else ())

    c64, r64 = _leaf(chosen.double(), chosen.requires_grad), _leaf(rejected.double(), rejected.requires_grad)
    m64 = _leaf(margin.double(), margin.requires_grad) if isinstance(margin, torch.Tensor) else margin
    ref = pairwise_ranking_loss_reference(c64, r64, m64, center_coef, reduction)
    tol = TOL[torch.float64] if chosen.dtype == torch.float64 else LOSS_TOL
    torch.testing.assert_close(loss.double(), ref, **tol)

    correct = (chosen > rejected).float()
    torch.testing.assert_close(acc, correct if reduction == "none" else correct.mean())

    g_out = _grad_output(loss)
    got = _grads(loss, (chosen, rejected, margin if isinstance(margin, torch.Tensor) else None), g_out)
    want = _grads(ref, (c64, r64, m64 if isinstance(m64, torch.Tensor) else None), g_out.double())
    assert len(got) == len(want) > 0
    for g, w, x in zip(got, want, [t for t in (chosen, rejected, margin) if isinstance(t, torch.Tensor) and t.requires_grad]):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, **(grad_tol or TOL[x.dtype]))
    return loss, acc


# ----------------------------------------------------------------------------------------------
# pairwise_ranking_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", [1, 7, 131, 1000, 2500])  # 2500: several Triton programs
def test_pairwise_matches_reference(backend, reduction, batch):
    chosen = torch.randn(batch, device=DEVICE, requires_grad=True)
    rejected = torch.randn(batch, device=DEVICE, requires_grad=True)
    margin = _leaf(torch.rand(batch, device=DEVICE))
    _check_pairwise(backend, chosen, rejected, margin, center_coef=0.05, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor_no_grad", "tensor_grad"])
@pytest.mark.parametrize("center_coef", [0.0, 0.3])
def test_pairwise_margin_and_center(backend, reduction, margin_kind, center_coef):
    batch = 131
    chosen = torch.randn(batch, device=DEVICE, requires_grad=True)
    rejected = torch.randn(batch, device=DEVICE, requires_grad=True)
    margin = {
        "none": None,
        "float": 0.75,
        "tensor_no_grad": torch.rand(batch, device=DEVICE),
        "tensor_grad": _leaf(torch.rand(batch, device=DEVICE)),
    }[margin_kind]
    _check_pairwise(backend, chosen, rejected, margin, center_coef=center_coef, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_pairwise_dtypes(backend, dtype):
    batch = 257
    chosen = _leaf(torch.randn(batch, device=DEVICE).to(dtype))
    rejected = _leaf(torch.randn(batch, device=DEVICE).to(dtype))
    margin = _leaf(torch.rand(batch, device=DEVICE).to(dtype))
    for reduction in REDUCTIONS:
        _check_pairwise(backend, chosen, rejected, margin, center_coef=0.1, reduction=reduction)


def test_pairwise_float64_torch_and_auto():
    chosen = _leaf(torch.randn(65, device=DEVICE, dtype=torch.float64))
    rejected = _leaf(torch.randn(65, device=DEVICE, dtype=torch.float64))
    for backend in ("torch", "auto"):  # auto on CUDA: the float32 kernels step aside for float64
        _check_pairwise(backend, chosen, rejected, 0.25, center_coef=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_extreme_rewards_stay_finite(backend):
    # |chosen - rejected| up to 2e4: a naive log(1 + exp(-x)) overflows to inf.
    batch = 64
    sign = torch.where(torch.rand(batch, device=DEVICE) < 0.5, -1.0, 1.0)
    chosen = _leaf(sign * (5e3 + 5e3 * torch.rand(batch, device=DEVICE)))
    rejected = _leaf(-chosen.detach() * torch.rand(batch, device=DEVICE))
    for reduction in REDUCTIONS:
        loss, _ = _check_pairwise(backend, chosen, rejected, reduction=reduction)
        assert torch.isfinite(loss).all()
    # Confident-correct pairs: tiny but positive losses, not rounded to 0 relative to the truth.
    c, r = _leaf(torch.full((8,), 20.0, device=DEVICE)), _leaf(torch.zeros(8, device=DEVICE) + torch.rand(8, device=DEVICE))
    loss = pairwise_ranking_loss(c, r, reduction="none", backend=backend)
    torch.testing.assert_close(loss.double(), -F.logsigmoid(c.double() - r.double()), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_non_contiguous(backend):
    # The common layout: rewards of a [B, 2] (chosen, rejected) head, sliced by column.
    batch = 100
    pairs = torch.randn(batch, 2, device=DEVICE, requires_grad=True)
    margins = torch.rand(batch, 3, device=DEVICE)[:, 1]
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    assert not chosen.is_contiguous() and not margins.is_contiguous()
    loss = pairwise_ranking_loss(chosen, rejected, margin=margins, center_coef=0.1, backend=backend)
    (grad,) = torch.autograd.grad(loss, pairs)
    p64 = _leaf(pairs.detach().double())
    ref = pairwise_ranking_loss_reference(p64[:, 0], p64[:, 1], margins.double(), 0.1)
    (ref_grad,) = torch.autograd.grad(ref, p64)
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.float32])
    # N-D inputs with a stride gap, every reduction (the "none" loss keeps the input shape).
    chosen = _leaf(non_contiguous(torch.randn(4, 33, device=DEVICE)))
    rejected = _leaf(non_contiguous(torch.randn(4, 33, device=DEVICE)))
    margin = _leaf(non_contiguous(torch.rand(4, 33, device=DEVICE)))
    for reduction in REDUCTIONS:
        _check_pairwise(backend, chosen, rejected, margin, center_coef=0.2, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_accuracy_ties_are_wrong(backend):
    chosen = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5], device=DEVICE)
    rejected = torch.tensor([0.0, 2.0, 4.0, -2.0, 0.5], device=DEVICE)  # ties at 1 and 4
    _, acc = pairwise_ranking_loss(chosen, rejected, return_accuracy=True, backend=backend)
    assert acc.item() == pytest.approx(2 / 5)
    _, acc = pairwise_ranking_loss(chosen, rejected, reduction="none", return_accuracy=True, backend=backend)
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_is_drop_in_for_trl_formula(backend):
    chosen = _leaf(torch.randn(33, device=DEVICE))
    rejected = _leaf(torch.randn(33, device=DEVICE))
    loss = pairwise_ranking_loss(chosen, rejected, backend=backend)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # no tuple without return_accuracy
    trl = -F.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(loss, trl)
    loss.backward()
    g_c = chosen.grad.clone()
    chosen.grad = None
    trl.backward()
    torch.testing.assert_close(g_c, chosen.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_backward_twice_and_no_grad(backend):
    chosen = _leaf(torch.randn(50, device=DEVICE))
    rejected = _leaf(torch.randn(50, device=DEVICE))
    loss = pairwise_ranking_loss(chosen, rejected, center_coef=0.1, backend=backend)
    (g1,) = torch.autograd.grad(2.0 * loss, chosen, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, chosen)
    torch.testing.assert_close(g1, 2.0 * g2)  # the saved gradient was not scaled in place
    with torch.no_grad():
        loss_ng = pairwise_ranking_loss(chosen, rejected, center_coef=0.1, backend=backend)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach())
    # Deterministic: no atomics, the same bits twice.
    again = pairwise_ranking_loss(chosen, rejected, center_coef=0.1, backend=backend)
    assert torch.equal(again, loss)


def test_pairwise_gradcheck_float64_torch():
    chosen = _leaf(torch.randn(6, device=DEVICE, dtype=torch.float64))
    rejected = _leaf(torch.randn(6, device=DEVICE, dtype=torch.float64))
    margin = _leaf(torch.rand(6, device=DEVICE, dtype=torch.float64))
    for reduction in REDUCTIONS:
        def f(c, r, m):
            return pairwise_ranking_loss(c, r, margin=m, center_coef=0.2, reduction=reduction, backend="torch")

        assert torch.autograd.gradcheck(f, (chosen, rejected, margin))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_module(backend):
    chosen = _leaf(torch.randn(20, device=DEVICE))
    rejected = _leaf(torch.randn(20, device=DEVICE))
    module = PairwiseRankingLoss(margin=0.5, center_coef=0.01, reduction="sum", backend=backend)
    assert "center_coef=0.01" in repr(module)
    loss, acc = module(chosen, rejected, return_accuracy=True)
    ref = pairwise_ranking_loss_reference(chosen.double(), rejected.double(), 0.5, 0.01, "sum")
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)
    torch.testing.assert_close(acc, (chosen > rejected).float().mean())
    # A per-call margin replaces the module's default.
    margin = torch.rand(20, device=DEVICE)
    loss = module(chosen, rejected, margin=margin)
    ref = pairwise_ranking_loss_reference(chosen.double(), rejected.double(), margin.double(), 0.01, "sum")
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)


# ----------------------------------------------------------------------------------------------
# ranking_loss
# ----------------------------------------------------------------------------------------------


def _random_ranks(batch, k, kind, dtype=torch.int64):
    if kind == "perm":  # a strict order of the K responses
        ranks = torch.rand(batch, k, device=DEVICE).argsort(dim=1).argsort(dim=1)
    else:  # ties and missing (-1) responses
        ranks = torch.randint(-1, max(2, k // 2 + 1), (batch, k), device=DEVICE)
        ranks[0, :2] = torch.tensor([1, 0], device=DEVICE)  # at least one valid pair in the batch
    return ranks.to(dtype)


def _ranking_accuracy(rewards, ranks):
    ri, rj = ranks[:, :, None].long(), ranks[:, None, :].long()
    valid = (ri >= 0) & (rj >= 0) & (ri < rj)
    diff = rewards.double()[:, :, None] - rewards.double()[:, None, :]
    return (diff[valid] > 0).double().mean().float()


def _check_ranking(backend, rewards, ranks, grad_tol=None):
    loss, acc = ranking_loss(rewards, ranks, return_accuracy=True, backend=backend)
    assert loss.shape == () and loss.dtype == (torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    assert acc.dtype == torch.float32 and not acc.requires_grad
    r64 = _leaf(rewards.detach().double())
    ref = ranking_loss_reference(r64, ranks)
    torch.testing.assert_close(loss.double(), ref, **(TOL[torch.float64] if rewards.dtype == torch.float64 else LOSS_TOL))
    torch.testing.assert_close(acc, _ranking_accuracy(rewards.detach(), ranks))
    g_out = _grad_output(loss)
    (grad,) = torch.autograd.grad(loss, rewards, g_out)
    (ref_grad,) = torch.autograd.grad(ref, r64, g_out.double())
    assert grad.dtype == rewards.dtype and grad.shape == rewards.shape
    torch.testing.assert_close(grad.double(), ref_grad, **(grad_tol or TOL[rewards.dtype]))
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [2, 3, 5, 16])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("kind", ["perm", "ties_missing"])
def test_ranking_matches_reference(backend, k, batch, kind):
    rewards = torch.randn(batch, k, device=DEVICE, requires_grad=True)
    ranks = _random_ranks(batch, k, kind)
    _, grad = _check_ranking(backend, rewards, ranks)
    # Missing responses get exactly zero gradient.
    assert (grad[ranks < 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_ranking_dtypes(backend, dtype):
    rewards = _leaf(torch.randn(9, 5, device=DEVICE).to(dtype))
    _check_ranking(backend, rewards, _random_ranks(9, 5, "ties_missing"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_ranking_rank_dtypes(backend, rank_dtype):
    rewards = _leaf(torch.randn(9, 6, device=DEVICE))
    kind = "perm" if rank_dtype == torch.uint8 else "ties_missing"  # uint8 cannot say "missing"
    _check_ranking(backend, rewards, _random_ranks(9, 6, kind, rank_dtype))


def test_ranking_float64_torch_and_gradcheck():
    rewards = _leaf(torch.randn(4, 5, device=DEVICE, dtype=torch.float64))
    ranks = _random_ranks(4, 5, "ties_missing")
    for backend in ("torch", "auto"):
        _check_ranking(backend, rewards, ranks)
    assert torch.autograd.gradcheck(lambda r: ranking_loss(r, ranks, backend="torch"), (rewards,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_non_contiguous(backend):
    wide = torch.randn(9, 10, device=DEVICE, requires_grad=True)
    rewards = wide[:, ::2]  # stride gap between responses
    ranks = _random_ranks(5, 9, "ties_missing").t()  # transposed view: column-major ranks
    assert not rewards.is_contiguous() and not ranks.is_contiguous()
    loss = ranking_loss(rewards, ranks, backend=backend)
    (grad,) = torch.autograd.grad(loss, wide)
    w64 = _leaf(wide.detach().double())
    ref = ranking_loss_reference(w64[:, ::2], ranks)
    (ref_grad,) = torch.autograd.grad(ref, w64)
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.float32])
    assert (grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_k2_equals_pairwise(backend):
    batch = 33
    rewards = torch.randn(batch, 2, device=DEVICE, requires_grad=True)
    ranks = torch.randint(0, 2, (batch,), device=DEVICE)
    ranks = torch.stack([ranks, 1 - ranks], dim=1)  # a strict winner in every row
    loss, acc = ranking_loss(rewards, ranks, return_accuracy=True, backend=backend)
    (grad,) = torch.autograd.grad(loss, rewards)

    rewards2 = _leaf(rewards.detach())
    best = ranks.argmin(dim=1, keepdim=True)
    chosen = rewards2.gather(1, best).squeeze(1)
    rejected = rewards2.gather(1, 1 - best).squeeze(1)
    p_loss, p_acc = pairwise_ranking_loss(chosen, rejected, return_accuracy=True, backend=backend)
    (p_grad,) = torch.autograd.grad(p_loss, rewards2)
    torch.testing.assert_close(loss, p_loss)
    torch.testing.assert_close(acc, p_acc)
    torch.testing.assert_close(grad, p_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_missing_rewards_are_ignored(backend):
    rewards = torch.randn(3, 4, device=DEVICE)
    ranks = torch.tensor([[0, 1, -1, 2], [2, -1, 0, 0], [-1, -1, 1, 0]], device=DEVICE)
    rewards[ranks < 0] = float("nan")  # padding slots may hold anything
    rewards.requires_grad_(True)
    loss = ranking_loss(rewards, ranks, backend=backend)
    (grad,) = torch.autograd.grad(loss, rewards)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[ranks < 0] == 0).all()
    clean = torch.where(ranks < 0, 0.0, rewards.detach()).double()
    torch.testing.assert_close(loss.double(), ranking_loss_reference(clean, ranks), **LOSS_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_extreme_rewards_stay_finite(backend):
    rewards = _leaf(1e4 * torch.randn(9, 5, device=DEVICE).sign() * (1 + torch.rand(9, 5, device=DEVICE)))
    loss, grad = _check_ranking(backend, rewards, _random_ranks(9, 5, "perm"))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_never_builds_pair_matrix(backend):
    batch, k = 9, 16
    rewards = torch.randn(batch, k, device=DEVICE, requires_grad=True)
    ranks = _random_ranks(batch, k, "ties_missing")
    sizes = []

    class RecordSizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel() * t.element_size())
            return out

    saved = []
    with RecordSizes(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = ranking_loss(rewards, ranks, backend=backend)
        loss.backward()
    # In bytes (torch also makes raw byte views of storages): the largest tensor is a [B, K] int64
    # one; a [B, K, K] tensor of any dtype, even bool, would be at least twice that.
    assert sizes and max(sizes) <= batch * k * 8
    assert sum(saved) <= batch * k + 1  # autograd keeps one [B, K] gradient, not K intermediates
    assert torch.isfinite(rewards.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_no_valid_pair(backend, monkeypatch):
    rewards = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    ranks = torch.tensor([[0, 0, -1, 0], [-1, -1, 2, -1], [1, 1, 1, 1]], device=DEVICE)
    with pytest.raises(ValueError, match="ranks has no valid pair"):
        ranking_loss(rewards, ranks, backend=backend)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")  # unchecked: loss 0 and zero grads, never NaN
    loss = ranking_loss(rewards, ranks, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (rewards.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranking_module(backend):
    rewards = _leaf(torch.randn(9, 4, device=DEVICE))
    ranks = _random_ranks(9, 4, "perm")
    module = RankingLoss(backend=backend)
    assert repr(backend) in repr(module)
    loss, acc = module(rewards, ranks, return_accuracy=True)
    torch.testing.assert_close(loss.double(), ranking_loss_reference(rewards.double(), ranks), **LOSS_TOL)
    torch.testing.assert_close(acc, _ranking_accuracy(rewards.detach(), ranks))
    loss.backward()
    assert rewards.grad is not None and torch.isfinite(rewards.grad).all()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

_C = torch.randn(4)
_R = torch.randn(4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(chosen_rewards=[1.0, 2.0, 3.0, 4.0]), TypeError, "chosen_rewards must be a torch.Tensor"),
        (dict(rejected_rewards=None), TypeError, "rejected_rewards must be a torch.Tensor"),
        (dict(chosen_rewards=torch.arange(4)), TypeError, "chosen_rewards must have dtype"),
        (dict(rejected_rewards=_R.half()), TypeError, "rejected_rewards must have the same dtype"),
        (dict(rejected_rewards=torch.randn(5)), ValueError, "rejected_rewards must have the same shape"),
        (dict(rejected_rewards=torch.randn(4, 1)), ValueError, "rejected_rewards must have the same shape"),
        (dict(chosen_rewards=torch.tensor(1.0), rejected_rewards=torch.tensor(0.0)), ValueError, "chosen_rewards must have at least 1"),
        (dict(chosen_rewards=torch.randn(0), rejected_rewards=torch.randn(0)), ValueError, "chosen_rewards is empty"),
        (dict(margin=torch.rand(3)), ValueError, "margin must have the same shape"),
        (dict(margin=torch.tensor(0.5)), ValueError, "margin must have the same shape"),
        (dict(margin="0.5"), TypeError, "margin must be None, a real number"),
        (dict(margin=float("inf")), ValueError, "margin must be finite"),
        (dict(margin=torch.tensor([0.1, float("nan"), 0.2, 0.3])), ValueError, "margin contains NaN"),
        (dict(margin=torch.ones(4, dtype=torch.int64)), TypeError, "margin must have dtype"),
        (dict(margin=torch.rand(4, device="meta")), ValueError, "margin is on meta"),
        (dict(rejected_rewards=torch.randn(4, device="meta")), ValueError, "rejected_rewards is on meta"),
        (dict(center_coef=-0.1), ValueError, "center_coef must be a finite number >= 0"),
        (dict(center_coef=float("nan")), ValueError, "center_coef must be a finite number >= 0"),
        (dict(center_coef="0.1"), TypeError, "center_coef must be a real number"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(chosen_rewards=torch.tensor([1.0, float("nan"), 0.0, 1.0])), ValueError, "chosen_rewards contains NaN"),
        (dict(rejected_rewards=torch.tensor([1.0, float("inf"), 0.0, 1.0])), ValueError, "rejected_rewards contains NaN or inf"),
    ],
)
def test_pairwise_bad_input(kwargs, exc, match):
    args = dict(chosen_rewards=_C, rejected_rewards=_R)
    args.update(kwargs)
    c, r = args.pop("chosen_rewards"), args.pop("rejected_rewards")
    with pytest.raises(exc, match=match):
        pairwise_ranking_loss(c, r, **args)


_REWARDS = torch.randn(3, 4)
_RANKS = torch.tensor([[0, 1, 2, 3], [1, 0, -1, 2], [0, 0, 1, 1]])


@pytest.mark.parametrize(
    "rewards, ranks, exc, match",
    [
        ("x", _RANKS, TypeError, "rewards must be a torch.Tensor"),
        (_REWARDS, _RANKS.tolist(), TypeError, "ranks must be a torch.Tensor"),
        (_REWARDS[0], _RANKS[0], ValueError, "rewards must be 2-D"),
        (_REWARDS[None], _RANKS[None], ValueError, "rewards must be 2-D"),
        (_REWARDS.long(), _RANKS, TypeError, "rewards must have dtype"),
        (_REWARDS, _RANKS.float(), TypeError, "ranks must have dtype"),
        (_REWARDS, _RANKS >= 0, TypeError, "ranks must have dtype"),
        (_REWARDS, _RANKS[:, :3], ValueError, "ranks must have the same shape"),
        (_REWARDS, _RANKS.t(), ValueError, "ranks must have the same shape"),
        (torch.randn(0, 4), torch.zeros(0, 4, dtype=torch.long), ValueError, "rewards is empty"),
        (_REWARDS, _RANKS.to("meta"), ValueError, "ranks is on meta"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), torch.tensor([[0, 1], [0, 1]]), ValueError, "rewards contains NaN or inf"),
        (torch.randn(2, 3), torch.tensor([[0, 0, -1], [-1, 5, -1]]), ValueError, "ranks has no valid pair"),
        (torch.randn(2, 1), torch.tensor([[0], [0]]), ValueError, "ranks has no valid pair"),
    ],
)
def test_ranking_bad_input(rewards, ranks, exc, match):
    with pytest.raises(exc, match=match):
        ranking_loss(rewards, ranks)


def test_value_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")
    nan = torch.tensor([1.0, float("nan")])
    loss = pairwise_ranking_loss(nan, torch.zeros(2), backend="torch")  # no device sync, no error
    assert torch.isnan(loss)
    loss = ranking_loss(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[0, 1]]), backend="torch")
    assert torch.isnan(loss)


@pytest.mark.skipif(not kernels.HAS_TRITON or (DEVICE == "cpu" and not kernels.INTERPRET), reason="needs triton")
def test_triton_rejects_float64():
    x = torch.randn(4, device=DEVICE, dtype=torch.float64)
    with pytest.raises(TypeError, match="needs chosen_rewards of dtype .*got torch.float64"):
        pairwise_ranking_loss(x, x.flip(0), backend="triton")
    with pytest.raises(TypeError, match="needs rewards of dtype .*got torch.float64"):
        ranking_loss(x.view(2, 2), torch.tensor([[0, 1], [1, 0]], device=DEVICE), backend="triton")


@requires_cuda
def test_device_mismatch_cuda():
    c = torch.randn(4, device="cuda")
    with pytest.raises(ValueError, match="rejected_rewards is on cpu"):
        pairwise_ranking_loss(c, torch.randn(4))
    with pytest.raises(ValueError, match="ranks is on cpu"):
        ranking_loss(c.view(2, 2), torch.tensor([[0, 1], [1, 0]]))


@requires_cuda
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_large_batch_triton_matches_torch(dtype):
    # Sizes too slow for the interpreter: 64k pairs (64 programs) and B=512 x K=16 rankings.
    chosen = _leaf(torch.randn(65536, device="cuda").to(dtype))
    rejected = _leaf(torch.randn(65536, device="cuda").to(dtype))
    _check_pairwise("triton", chosen, rejected, 0.1, center_coef=0.01, reduction="sum")
    rewards = _leaf(torch.randn(512, 16, device="cuda").to(dtype))
    _check_ranking("triton", rewards, _random_ranks(512, 16, "ties_missing"))
