"""compute_gae / GAE / whiten: both backends against the float64 Python-loop reference and verl's loop."""

import pytest
import torch
from helpers import BACKENDS, DEVICE, TOL, non_contiguous, requires_cuda, row_strided

from fastrm import kernels
from fastrm.kernels.gae import compute_gae_reference
from fastrm.ops import gae as gae_ops
from fastrm.ops.gae import GAE, compute_gae, whiten

GAMMA, LAM = 0.97, 0.9
LAYOUTS = ["full", "right_pad", "left_pad", "holes"]


def make_mask(B, T, layout, device=DEVICE):
    """A [B, T] bool mask with at least one valid position per row."""
    pos = torch.arange(T, device=device)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    lengths[0] = T  # one full row: the last position is valid, so the bootstrap path is hit
    if layout == "full":
        return torch.ones(B, T, dtype=torch.bool, device=device)
    if layout == "right_pad":
        return pos[None, :] < lengths[:, None]
    if layout == "left_pad":
        return pos[None, :] >= (T - lengths)[:, None]
    if layout == "holes":  # multi-turn: observation tokens masked out in the middle of the response
        m = torch.rand(B, T, device=device) < 0.6
        m[:, 0] = True
        return m
    raise ValueError(layout)


def make_inputs(B, T, layout="holes", dtype=torch.float32, bootstrap=True, device=DEVICE):
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    mask = make_mask(B, T, layout, device)
    boot = torch.randn(B, device=device).to(dtype) if bootstrap else None
    return rewards, values, mask, boot


def reference(rewards, values, mask, gamma, lam, boot=None):
    """The float64 Python loop on exactly the (possibly rounded) inputs the op saw."""
    return compute_gae_reference(
        rewards.double(), values.double(), mask, gamma, lam, None if boot is None else boot.double()
    )


def assert_close_to_reference(out, ref, tol=TOL[torch.float32]):
    for got, want in zip(out, ref):
        assert not torch.isnan(got).any()  # catches an element the kernel never wrote (poisoned buffers)
        # An advantage is a long sum; its rounding error scales with the size of the terms, not of the
        # (possibly cancelled) result, so the absolute tolerance scales with the largest magnitude around.
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny chunks in both backends, so T=300 crosses many chunk boundaries (carries, recursion)."""
    import fastrm.kernels

    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T", 16)  # the shared row-scan chunk sizes
    monkeypatch.setattr(fastrm.kernels, "ROW_BLOCK_T_INTERPRET", 16)
    monkeypatch.setattr(gae_ops, "_CUMSUM_CHUNK", 4)


# ----------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------


def test_hand_computed_example():
    # Positions 0 and 2 valid, 1 masked: W_0 = v_2 = 0.5, W_2 = 0 (episode ended).
    # delta_2 = 2 - 0.5 = 1.5 = A_2;  delta_0 = 1 - 0.5 + 0.9*0.5 = 0.95, A_0 = 0.95 + 0.9*0.8*1.5 = 2.03.
    r = torch.tensor([[1.0, 7.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 3.0, 0.5]], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1]])
    adv, ret = compute_gae_reference(r, v, m, 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[2.03, 0.0, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[2.53, 0.0, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_example_ops(backend):
    r = torch.tensor([[1.0, 7.0, 2.0]], device=DEVICE)
    v = torch.tensor([[0.5, 3.0, 0.5]], device=DEVICE)
    m = torch.tensor([[1, 0, 1]], device=DEVICE)
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.8, backend=backend)
    torch.testing.assert_close(adv.cpu(), torch.tensor([[2.03, 0.0, 1.5]]))
    torch.testing.assert_close(ret.cpu(), torch.tensor([[2.53, 0.0, 2.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (1, 37), (5, 37), (4, 300)])
def test_matches_reference(backend, B, T, layout, bootstrap):
    r, v, m, boot = make_inputs(B, T, layout, bootstrap=bootstrap)
    out = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert out[0].shape == out[1].shape == (B, T) and out[0].dtype == torch.float32
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_chunk_carries(backend, layout, bootstrap, small_blocks):
    r, v, m, boot = make_inputs(3, 300, layout, bootstrap=bootstrap)
    out = compute_gae(r, v, m, gamma=0.995, lam=0.99, bootstrap_value=boot, backend=backend)
    assert_close_to_reference(out, reference(r, v, m, 0.995, 0.99, boot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.95), (0.99, 0.0), (1.0, 0.0), (0.0, 0.0), (0.9, 1.0)])
def test_gamma_lam_edges(backend, gamma, lam, small_blocks):
    r, v, m, boot = make_inputs(3, 37, "holes")
    out = compute_gae(r, v, m, gamma=gamma, lam=lam, bootstrap_value=boot, backend=backend)
    assert_close_to_reference(out, reference(r, v, m, gamma, lam, boot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_all_masked_row_is_zero(backend, bootstrap):
    r, v, m, boot = make_inputs(4, 37, "holes", bootstrap=bootstrap)
    m[1] = False
    adv, ret = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert torch.equal(adv[1], torch.zeros_like(adv[1])) and torch.equal(ret[1], torch.zeros_like(ret[1]))
    assert_close_to_reference((adv, ret), reference(r, v, m, GAMMA, LAM, boot))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_are_zero_and_ignored(backend):
    r, v, m, boot = make_inputs(5, 37, "holes")
    adv, ret = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    assert (adv[m] != 0).all()  # fresh random inputs: a zero on a valid position would be a bug
    # Whatever sits at masked positions must not matter.
    r2, v2 = r.clone(), v.clone()
    r2[~m] = torch.randn(int((~m).sum()), device=DEVICE) * 100
    v2[~m] = torch.randn(int((~m).sum()), device=DEVICE) * 100
    adv2, ret2 = compute_gae(r2, v2, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["right_pad", "holes"])
def test_non_finite_at_masked_positions_never_leaks(backend, layout, monkeypatch):
    # With value checks off nothing stops NaN/inf at masked positions; they must still not be read.
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")
    r, v, m, boot = make_inputs(4, 37, layout)
    m[1] = False
    r_bad, v_bad = r.clone(), v.clone()
    r_bad[~m] = float("nan")
    v_bad[~m] = float("inf")
    leaves = [r_bad.requires_grad_(True), v_bad.requires_grad_(True)]
    adv, ret = compute_gae(*leaves, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert_close_to_reference((adv, ret), reference(r, v, m, GAMMA, LAM, boot))
    (adv.sum() + ret.sum()).backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and (leaf.grad[~m] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8, torch.bfloat16])
def test_mask_dtypes(backend, mask_dtype):
    r, v, m, boot = make_inputs(3, 37, "holes")
    out = compute_gae(r, v, m.to(mask_dtype), gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout_fn", ["non_contiguous", "row_strided", "transposed"])
def test_non_contiguous_inputs(backend, layout_fn):
    r, v, m, boot = make_inputs(5, 37, "holes")
    if layout_fn == "non_contiguous":
        r2, v2, m2, boot2 = non_contiguous(r), non_contiguous(v), non_contiguous(m.float()), non_contiguous(boot)
    elif layout_fn == "row_strided":
        r2, v2, m2, boot2 = row_strided(r), row_strided(v), row_strided(m.float()), boot
    else:  # last-dim stride B, row stride 1
        r2, v2, m2, boot2 = r.t().contiguous().t(), v.t().contiguous().t(), m.t().contiguous().t(), boot
    assert not r2.is_contiguous()
    out = compute_gae(r2, v2, m2, gamma=GAMMA, lam=LAM, bootstrap_value=boot2, backend=backend)
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(backend, dtype):
    r, v, m, boot = make_inputs(5, 37, "holes", dtype=dtype)
    out = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    assert out[0].dtype == out[1].dtype == torch.float32
    # The reference sees the same rounded inputs and the op computes in fp32: fp32 tolerance holds.
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot))


def test_float64_torch_path_is_exact():
    r, v, m, boot = make_inputs(5, 300, "holes", dtype=torch.float64)
    out = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend="torch")
    assert out[0].dtype == out[1].dtype == torch.float64
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot), tol=TOL[torch.float64])


def test_float64_auto_takes_torch_path(monkeypatch):
    # Even where 'auto' would pick the kernels (CUDA), float64 goes to the exact PyTorch path.
    import fastrm._dispatch as dispatch

    monkeypatch.setattr(dispatch, "_resolve_device", lambda backend, device, op: "triton")

    def no_kernel(*args):
        raise AssertionError("the Triton path must not run for float64")

    monkeypatch.setattr(gae_ops._GAEFunction, "apply", no_kernel)
    r, v, m, boot = make_inputs(2, 9, "holes", dtype=torch.float64)
    out = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot)
    assert out[0].dtype == torch.float64
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot), tol=TOL[torch.float64])


@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 300])
@pytest.mark.parametrize("f", [0.0, 0.5, 0.999, 1.0])
def test_discounted_reverse_cumsum(T, f):
    x = torch.randn(3, T, dtype=torch.float64)
    want = torch.zeros_like(x)
    acc = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(T)):
        acc = x[:, t] + f * acc
        want[:, t] = acc
    torch.testing.assert_close(gae_ops._discounted_reverse_cumsum(x, f), want, **TOL[torch.float64])


# ----------------------------------------------------------------------------------------------------
# equality with verl's loop, whitening
# ----------------------------------------------------------------------------------------------------


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """verl's compute_gae_advantage_return loop, before whitening (mask-aware, multi-turn safe)."""
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def verl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def verl_masked_whiten(values, mask, shift_mean=True):
    mean = verl_masked_mean(values, mask)
    var = verl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    var = var * mask_sum / (mask_sum - 1)  # unbiased, as theirs
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["right_pad", "left_pad", "holes"])
def test_equals_verl_loop_and_whitening(backend, layout):
    r, v, m, _ = make_inputs(5, 37, layout, dtype=torch.float32, bootstrap=False)
    mf = m.double()
    adv_verl, ret_verl = verl_gae(r.double(), v.double(), mf, GAMMA, LAM)
    adv, ret = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend=backend)
    tol = TOL[torch.float32]
    torch.testing.assert_close(adv[m].double(), adv_verl[m], **tol)
    torch.testing.assert_close(ret[m].double(), ret_verl[m], **tol)
    for shift_mean in (True, False):
        ours = whiten(adv.double(), m, shift_mean=shift_mean)
        theirs = verl_masked_whiten(adv_verl, mf, shift_mean=shift_mean)
        torch.testing.assert_close(ours[m], theirs[m], **tol)
        assert (ours[~m] == 0).all()


def test_whiten_properties_and_masked_garbage():
    x = torch.randn(4, 30, dtype=torch.float64) * 3 + 2
    m = make_mask(4, 30, "holes")
    x[~m] = float("nan")  # garbage at masked positions must stay out of values and gradients
    x.requires_grad_(True)
    w = whiten(x, m)
    valid = w[m]
    torch.testing.assert_close(valid.mean(), torch.zeros((), dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(valid.std(), torch.ones((), dtype=torch.float64), atol=1e-6, rtol=0)
    assert (w[~m] == 0).all()
    w.pow(2).mul(torch.randn_like(w)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~m] == 0).all()


def test_whiten_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="mask"):
        whiten(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask.*at least 2"):
        one_valid = torch.zeros(2, 5, dtype=torch.bool)
        one_valid[1, 3] = True
        whiten(x, one_valid)
    with pytest.raises(TypeError, match="x"):
        whiten(x.long(), torch.ones(2, 5))


# ----------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["right_pad", "holes"])
def test_torch_path_gradcheck(layout):
    r, v, m, boot = make_inputs(3, 7, layout, dtype=torch.float64)
    m[2] = False  # an all-masked row too
    r.requires_grad_(True), v.requires_grad_(True), boot.requires_grad_(True)

    def fn(r, v, boot):
        return compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend="torch")

    assert torch.autograd.gradcheck(fn, (r, v, boot))


def _grads_vs_reference(backend, r, v, m, boot, gamma, lam, loss_kind="random"):
    leaves = [r.detach().clone().requires_grad_(True), v.detach().clone().requires_grad_(True)]
    if boot is not None:
        leaves.append(boot.detach().clone().requires_grad_(True))
    adv, ret = compute_gae(leaves[0], leaves[1], m, gamma=gamma, lam=lam,
                           bootstrap_value=leaves[2] if boot is not None else None, backend=backend)
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref_adv, ref_ret = compute_gae_reference(ref_leaves[0], ref_leaves[1], m, gamma, lam,
                                             ref_leaves[2] if boot is not None else None)
    if loss_kind == "random":
        w_adv, w_ret = torch.randn_like(ref_adv), torch.randn_like(ref_ret)
        (adv * w_adv.float()).sum().add((ret * w_ret.float()).sum()).backward()
        (ref_adv * w_adv).sum().add((ref_ret * w_ret).sum()).backward()
    elif loss_kind == "adv_sum":  # upstream gradient of stride 0, no gradient for returns at all
        adv.sum().backward()
        ref_adv.sum().backward()
    else:  # "ret_only"
        ret.pow(2).sum().backward()
        ref_ret.pow(2).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert got.grad is not None and got.grad.dtype == got.dtype
        assert not torch.isnan(got.grad).any()
        tol = TOL[torch.float32] if got.dtype == torch.float32 else TOL[got.dtype]
        torch.testing.assert_close(got.grad.double(), want.grad.to(got.dtype).double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bootstrap", [False, True])
def test_gradients_vs_reference(backend, layout, bootstrap):
    r, v, m, boot = make_inputs(4, 37, layout, bootstrap=bootstrap)
    if layout != "full":
        m[3] = False  # an all-masked row too
    _grads_vs_reference(backend, r, v, m, boot, GAMMA, LAM)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_kind", ["adv_sum", "ret_only"])
def test_gradients_partial_outputs(backend, loss_kind):
    r, v, m, boot = make_inputs(3, 37, "holes")
    _grads_vs_reference(backend, r, v, m, boot, GAMMA, LAM, loss_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.0, 0.0), (0.99, 0.0), (0.0, 0.95)])
def test_gradients_chunked_and_edges(backend, gamma, lam, small_blocks):
    r, v, m, boot = make_inputs(2, 300, "holes")
    _grads_vs_reference(backend, r, v, m, boot, gamma, lam)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_low_precision(backend):
    r, v, m, boot = make_inputs(3, 37, "left_pad", dtype=torch.bfloat16)
    _grads_vs_reference(backend, r, v, m, boot, GAMMA, LAM)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_for_values(backend):
    r, v, m, boot = make_inputs(3, 37, "holes")
    v.requires_grad_(True)
    _, ret = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, bootstrap_value=boot, backend=backend)
    ret.sum().backward()
    vd = v.detach().double().requires_grad_(True)
    reference(r, vd, m, GAMMA, LAM, boot)[1].sum().backward()
    torch.testing.assert_close(v.grad.double(), vd.grad, **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------------
# module form, backends, errors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_form(backend):
    r, v, m, boot = make_inputs(3, 37, "right_pad")
    mod = GAE(gamma=GAMMA, lam=LAM, backend=backend)
    assert "gamma=0.97" in repr(mod)
    out = mod(r, v, m, boot)
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM, boot))
    out_noboot = mod(r, v, m)
    assert_close_to_reference(out_noboot, reference(r, v, m, GAMMA, LAM))
    with pytest.raises(ValueError, match="lam"):
        GAE(gamma=0.9, lam=1.5)


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    r, v, m, _ = make_inputs(2, 5, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="triton")
    # 'auto' on CPU still works (PyTorch path).
    out = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="auto")
    assert_close_to_reference(out, reference(r, v, m, GAMMA, LAM))


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="needs triton")
def test_triton_rejects_float64():
    r, v, m, _ = make_inputs(2, 5, dtype=torch.float64)
    if DEVICE == "cpu" and not kernels.INTERPRET:
        pytest.skip("triton backend unavailable on CPU without the interpreter")
    with pytest.raises(TypeError, match="float64"):
        compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="triton")


def test_bad_backend():
    r, v, m, _ = make_inputs(2, 5)
    with pytest.raises(ValueError, match="backend"):
        compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="cuda")


def _bad_cases():
    def inputs():
        r, v, m, boot = make_inputs(3, 6, "holes")
        return dict(rewards=r, values=v, mask=m, bootstrap_value=boot, gamma=GAMMA, lam=LAM)

    def with_value(x, value):  # one element replaced, at a valid position in every mask layout (column 0)
        x = x.clone()
        x.view(-1)[0] = value
        return x

    def case(exc, match, **changes):
        kw = inputs()
        kw.update({k: (f(kw) if callable(f) else f) for k, f in changes.items()})
        return pytest.param(exc, match, kw, id=match + "-" + "-".join(changes))

    return [
        case(TypeError, "rewards", rewards=lambda kw: kw["rewards"].tolist()),
        case(TypeError, "values", values=3.0),
        case(TypeError, "mask", mask=None),
        case(ValueError, "rewards", rewards=lambda kw: kw["rewards"][0]),
        case(ValueError, "rewards", rewards=lambda kw: kw["rewards"][None]),
        case(ValueError, "values", values=lambda kw: kw["values"][:, :5]),
        case(ValueError, "mask", mask=lambda kw: kw["mask"][:1]),  # would broadcast; we never do
        case(ValueError, "mask", mask=lambda kw: kw["mask"][:, :, None]),
        case(TypeError, "rewards", rewards=lambda kw: kw["rewards"].long()),
        case(TypeError, "values", values=lambda kw: kw["values"].half()),
        case(TypeError, "mask", mask=lambda kw: kw["mask"].to(torch.complex64)),
        case(ValueError, "rewards", rewards=torch.empty(0, 6), values=torch.empty(0, 6),
             mask=torch.empty(0, 6), bootstrap_value=None),
        case(ValueError, "rewards", rewards=torch.empty(3, 0), values=torch.empty(3, 0),
             mask=torch.empty(3, 0), bootstrap_value=None),
        case(ValueError, "gamma", gamma=1.01),
        case(ValueError, "gamma", gamma=-0.1),
        case(ValueError, "lam", lam=2.0),
        case(ValueError, "lam", lam=float("nan")),
        case(ValueError, "mask", mask=lambda kw: kw["mask"].float() * 0.5),
        case(ValueError, "mask", mask=lambda kw: kw["mask"].long() * 2),
        case(ValueError, "bootstrap_value", bootstrap_value=lambda kw: torch.randn(4)),
        case(ValueError, "bootstrap_value", bootstrap_value=lambda kw: torch.randn(3, 1)),
        case(TypeError, "bootstrap_value", bootstrap_value=lambda kw: torch.ones(3, dtype=torch.long)),
        case(TypeError, "bootstrap_value", bootstrap_value=[1.0, 2.0, 3.0]),
        case(ValueError, "rewards", rewards=lambda kw: with_value(kw["rewards"], float("nan"))),
        case(ValueError, "values", values=lambda kw: with_value(kw["values"], float("inf"))),
        case(ValueError, "values", values=lambda kw: with_value(kw["values"], float("-inf"))),
        case(ValueError, "bootstrap_value", bootstrap_value=lambda kw: with_value(kw["bootstrap_value"], float("nan"))),
        case(ValueError, "mask is on meta", mask=lambda kw: kw["mask"].to("meta")),
        case(ValueError, "bootstrap_value is on meta", bootstrap_value=lambda kw: kw["bootstrap_value"].to("meta")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exc,match,kwargs", _bad_cases())
def test_bad_inputs(backend, exc, match, kwargs):
    kwargs = {k: (x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type != "meta" else x)
              for k, x in kwargs.items()}
    r, v, m = kwargs.pop("rewards"), kwargs.pop("values"), kwargs.pop("mask")
    with pytest.raises(exc, match=match):
        compute_gae(r, v, m, backend=backend, **kwargs)


def test_value_checks_can_be_switched_off(monkeypatch):
    r, v, m, _ = make_inputs(2, 6, "full")
    r[0, 3] = float("nan")
    with pytest.raises(ValueError, match="rewards"):
        compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="torch")
    monkeypatch.setenv("FASTRM_CHECK_VALUES", "0")
    adv, _ = compute_gae(r, v, m, gamma=GAMMA, lam=LAM, backend="torch")
    assert torch.isnan(adv[0, :4]).all() and torch.isfinite(adv[1]).all()


# ----------------------------------------------------------------------------------------------------
# compiled kernels on a GPU
# ----------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_long_rows(layout):
    # Several default-size chunks per row, compiled.
    r, v, m, boot = make_inputs(64, 5000, layout, device="cuda")
    out = compute_gae(r, v, m, gamma=0.999, lam=0.95, bootstrap_value=boot, backend="triton")
    assert_close_to_reference(out, tuple(x.cuda() for x in reference(r.cpu(), v.cpu(), m.cpu(), 0.999, 0.95,
                                                                       boot.cpu())), tol=dict(atol=1e-4, rtol=1e-4))
    torch_out = compute_gae(r, v, m, gamma=0.999, lam=0.95, bootstrap_value=boot, backend="torch")
    for a, b in zip(out, torch_out):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@requires_cuda
def test_cuda_gradients_long_rows():
    r, v, m, boot = make_inputs(8, 3000, "holes", device="cuda")
    _grads_vs_reference("triton", r, v, m, boot, 0.99, 0.95)
