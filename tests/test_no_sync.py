"""No host-device sync in any op, forward or backward, on a GPU (by default).

On CPU the ops run their GPU code paths with ``fastrm._checks._is_host`` patched to say the tensors live on
a device: then every value check must go to the device instead of reading values, and nothing may read a
value on the host. A TorchDispatchMode sees every ATen call and counts those that read device memory from
the host (``item()`` / ``bool()`` / ``int()`` / ``float()`` all reach ``_local_scalar_dense``; ``nonzero``,
``masked_select``, boolean-mask indexing and ``unique`` have data-dependent shapes); ``Tensor.tolist`` and
``Tensor.numpy``, which read CPU memory without dispatching, are counted by a wrapper. The Triton
interpreter's own reads (it runs the kernels on the host) are not counted: a compiled launch reads nothing.

On CUDA the same calls run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from helpers import BACKENDS, DEVICE, requires_cuda
from torch.utils._python_dispatch import TorchDispatchMode

import fastrm
from fastrm import _checks
from fastrm.guard import DivergenceGuard

aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
               aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave}


class HostReads(TorchDispatchMode):
    """Records every op that would read device memory from the host (a sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func.overloadpacket in SYNCING_OPS:
                self.reads.append(str(func))
            elif func.overloadpacket is aten.index and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.reads.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_host_reads(monkeypatch):
    """Count host reads; Tensor.tolist / numpy count too; launches into the interpreter are not looked into."""
    mode = HostReads()

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, **k):
            if not mode.paused:
                mode.reads.append(f"Tensor.{name}")
            return original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("tolist", "numpy"):
        wrap(name)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def uncounted_run(self, *a, **k):
            mode.paused += 1
            try:
                return run(self, *a, **k)
            finally:
                mode.paused -= 1
        monkeypatch.setattr(InterpretedFunction, "run", uncounted_run)
    except ImportError:
        pass
    with mode:
        yield mode


def op_calls(device, backend, dtype=torch.float32):
    """(name, fn) pairs; fn() runs one op's forward and returns what to backpropagate (or None)."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)

    B, T, V, H = 3, 19, 50, 8
    mask = torch.rand(B, T, device=device) > 0.3
    mask[:, 0] = True
    mask_long = mask.long()  # a numeric mask takes the 0/1 check too
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, :3] = -100

    def logprobs():
        lp, ent = fastrm.gather_logprobs(leaf(B, T, V), labels, return_entropy=True, backend=backend)
        candidates = torch.randint(0, V, (B, T, 3), device=device)  # K candidate labels, Gemma's softcap
        lp_k = fastrm.gather_logprobs(leaf(B, T, V), candidates, softcap=30.0, backend=backend)
        return lp.sum() + ent.sum() + lp_k.sum()

    def linear():
        lp, ent = fastrm.linear_logprobs(leaf(B, T, H), leaf(V, H), labels, bias=leaf(V), return_entropy=True,
                                         chunk_size=16, backend=backend)
        return lp.sum() + ent.sum()

    def gae():
        adv, ret = fastrm.compute_gae(leaf(B, T), leaf(B, T), mask_long, gamma=0.99, lam=0.95,
                                      bootstrap_value=leaf(B), backend=backend)
        return (adv * ret).sum()

    def whiten():
        return fastrm.whiten(leaf(B, T), mask_long).sum()

    def policy():
        out = fastrm.ppo_policy_loss(leaf(B, T), leaf(B, T, scale=0.1), leaf(B, T), mask_long, dual_clip=3.0,
                                     agg="seq-mean-token-mean", backend=backend)
        gspo = fastrm.ppo_policy_loss(leaf(B, T), leaf(B, T, scale=0.1), leaf(B, T), mask, ratio_level="sequence",
                                      agg="seq-mean-token-sum-norm", backend=backend)
        return out.loss + out.clipfrac + gspo.loss  # metrics are computed too, without being read

    def value():
        return fastrm.value_loss(leaf(B, T), leaf(B, T), leaf(B, T), mask, clip=0.2, backend=backend).loss

    def kl():
        return sum(fastrm.kl_penalty(leaf(B, T), leaf(B, T), kind, backend=backend).sum()
                   for kind in ("k1", "abs", "k2", "k3", "k3+"))

    def pairwise():
        loss, acc = fastrm.pairwise_ranking_loss(leaf(33), leaf(33), margin=leaf(33), center_coef=0.01,
                                                 return_accuracy=True, backend=backend)
        return loss

    def ranking():
        ranks = torch.argsort(torch.rand(5, 4, device=device), dim=-1)
        ranks[0, 0] = -1
        return fastrm.ranking_loss(leaf(5, 4), ranks, backend=backend)

    return [("gather_logprobs", logprobs), ("linear_logprobs", linear), ("compute_gae", gae), ("whiten", whiten),
            ("ppo_policy_loss", policy), ("value_loss", value), ("kl_penalty", kl),
            ("pairwise_ranking_loss", pairwise), ("ranking_loss", ranking)]


@pytest.fixture
def believes_on_gpu(monkeypatch):
    """The ops take their GPU paths (value checks kept on the device) for these CPU tensors."""
    monkeypatch.setattr(_checks, "_is_host", lambda device: False)
    monkeypatch.delenv("FASTRM_CHECK_VALUES", raising=False)
    yield
    _checks._deferred.clear()


def test_host_read_counter_catches_syncs(monkeypatch):
    # The counter itself: each of these reads device memory on a GPU.
    x = torch.randn(4)
    reads = [lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: int(x.argmax()), lambda: x.tolist(),
             lambda: x.nonzero(), lambda: x[x > 0], lambda: float(x[0]), lambda: x.unique()]
    for read in reads:
        with counting_host_reads(monkeypatch) as counter:
            read()
        assert counter.reads, read


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_reads_on_the_gpu_paths(backend, believes_on_gpu, monkeypatch):
    for name, call in op_calls(DEVICE, backend):
        with counting_host_reads(monkeypatch) as counter:
            out = call()
            out.backward()
        assert counter.reads == [], f"{name} ({backend}) reads device values on the host: {counter.reads}"
    assert not any(bool(flag) for flag in _checks._deferred.values())  # good input: nothing pending


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_paths_report_bad_input_later_with_its_name(backend, believes_on_gpu):
    # Nothing raises where the op runs; raise_deferred_errors (which trainers call when they read the loss)
    # raises every failure with the argument's name, once.
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 2] = 11  # out of range
    lp = fastrm.gather_logprobs(logits, labels, backend=backend)
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[0]).all()  # an out-of-range label reads nothing
    mask = torch.zeros(3, 7)
    fastrm.ppo_policy_loss(torch.randn(3, 7), torch.randn(3, 7), torch.randn(3, 7), mask, backend=backend)
    rewards = torch.randn(3, 7)
    rewards[0, 1] = float("nan")
    fastrm.compute_gae(rewards, torch.randn(3, 7), torch.ones(3, 7) * 2, gamma=0.9, lam=0.9, backend=backend)
    with pytest.raises(ValueError) as err:
        fastrm.raise_deferred_errors()
    text = str(err.value)
    for expected in ("gather_logprobs: labels must lie in [0, 11)", "ppo_policy_loss: mask has no valid position",
                     "compute_gae: rewards contains NaN or inf", "compute_gae: mask must contain only 0 and 1"):
        assert expected in text
    fastrm.raise_deferred_errors()  # reported once, then forgotten


def test_trainer_step_check_raises_the_deferred_error(believes_on_gpu):
    # The divergence guard's once-per-step read (before the optimizer step) also reads the pending checks.
    trainer = SimpleNamespace(step=3, device=torch.device(DEVICE), last_checkpoint=None, checkpoint_verified=True,
                              run_id=None)
    guard = DivergenceGuard(trainer, models=[])
    fastrm.gather_logprobs(torch.randn(2, 3, 4), torch.full((2, 3), 5))  # labels >= V = 4
    step = ([torch.tensor(1.5)], {"gradient norm": torch.tensor(0.3)})
    with pytest.raises(ValueError, match="gather_logprobs: labels must lie in"):
        guard.check_step(*step)
    assert guard.check_step(*step) == [pytest.approx(0.3)]  # nothing pending any more


def test_sync_and_assert_modes(believes_on_gpu, monkeypatch):
    labels = torch.full((2, 3), 5)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "sync")  # checks read values at once, on every device
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) or equal ignore_index=-100, found 5"):
        fastrm.gather_logprobs(torch.randn(2, 3, 4), labels)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "assert")  # torch._assert_async (raises at once on CPU tensors)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        fastrm.gather_logprobs(torch.randn(2, 3, 4), labels)
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "maybe")
    with pytest.raises(ValueError, match="FASTRM_CHECK_VALUES must be one of"):
        fastrm.gather_logprobs(torch.randn(2, 3, 4), labels)


def test_linear_logprobs_skips_ignored_rows_only_where_that_is_free(believes_on_gpu, monkeypatch):
    # Dropping the ignore_index rows sizes the chunk loop from the data: a sync on a GPU. By default the GPU
    # path computes every row (ignored ones come out 0); skip_ignored=True opts into the one sync.
    hidden, weight = torch.randn(2, 6, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 6))
    labels[:, :3] = -100
    with counting_host_reads(monkeypatch) as counter:
        default = fastrm.linear_logprobs(hidden, weight, labels, backend="torch")
    assert counter.reads == []
    with counting_host_reads(monkeypatch) as counter:
        skipped = fastrm.linear_logprobs(hidden, weight, labels, backend="torch", skip_ignored=True)
    assert any("nonzero" in r for r in counter.reads)
    torch.testing.assert_close(default, skipped)
    assert (default[:, :3] == 0).all()


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_no_sync_in_any_op(backend):
    for name, call in op_calls("cuda", backend):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = call()
            out.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    fastrm.raise_deferred_errors()  # and the inputs were good
