"""dpo_loss: each loss type against a float64 transcription of its published formula (values, gradients, metrics),
across dtypes, odd sizes and non-contiguous inputs; against TRL 1.16's own DPOTrainer / CPOTrainer loss code on the
same tensors; bad input."""

import math
import types

import pytest
import torch
from helpers import DEVICE, non_contiguous

import fastrm
from fastrm.ops.dpo import DPO_LOSS_TYPES, DPOLoss, DPOLossOutput, dpo_loss

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 33]
EPS32 = torch.finfo(torch.float32).eps


def log_sigmoid64(x):
    """log(1 / (1 + exp(-x))) in float64, written out (not softplus) so the reference shares no code path."""
    return torch.where(x >= 0, -torch.log1p(torch.exp(-x)), x - torch.log1p(torch.exp(x)))


def reference(c, r, rc, rr, lc, lr, *, beta, loss_type, eps=0.0, gamma=0.0):
    """Per-pair losses and rewards in float64, each formula as its paper writes it."""
    c, r = c.double(), r.double()
    if loss_type == "simpo":  # SimPO eq. 6: -log s(beta/|y_w| log p(y_w) - beta/|y_l| log p(y_l) - gamma)
        rw, rl = beta * c / lc.double(), beta * r / lr.double()
        m = rw - rl - gamma
        return -(1 - eps) * log_sigmoid64(m) - eps * log_sigmoid64(-m), rw, rl
    hw, hl = c - rc.double(), r - rr.double()  # the log-ratios log pi/pi_ref
    rw, rl = beta * hw, beta * hl
    h = hw - hl
    if loss_type == "sigmoid":  # DPO eq. 7; cDPO: the label flipped with probability eps
        loss = -(1 - eps) * log_sigmoid64(beta * h) - eps * log_sigmoid64(-beta * h)
    elif loss_type == "robust":  # rDPO eq. 8
        loss = (-(1 - eps) * log_sigmoid64(beta * h) + eps * log_sigmoid64(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":  # SLiC-HF, delta = 1 / beta
        loss = torch.clamp(1 - beta * h, min=0)
    else:  # IPO eq. 17 with tau = beta, on per-token log-ratios
        loss = (hw / lc.double() - hl / lr.double() - 1 / (2 * beta)) ** 2
    return loss, rw, rl


def make_inputs(B, dtype, loss_type, *, contiguous=True):
    """Sums over 3..40-token completions of log-probs in [-3, 0]; the reference near the policy, as in training."""
    lc = torch.randint(3, 41, (B,), device=DEVICE)
    lr = torch.randint(3, 41, (B,), device=DEVICE)
    c = -torch.rand(B, device=DEVICE, dtype=torch.float64) * 3 * lc
    r = -torch.rand(B, device=DEVICE, dtype=torch.float64) * 3 * lr
    rc = c + torch.randn(B, device=DEVICE, dtype=torch.float64) * 2
    rr = r + torch.randn(B, device=DEVICE, dtype=torch.float64) * 2
    t = [x.to(dtype) for x in (c, r, rc, rr)]
    if not contiguous:
        t = [non_contiguous(x) for x in t]
    free = loss_type == "simpo"
    lengths = loss_type in ("ipo", "simpo")
    return dict(chosen_logps=t[0], rejected_logps=t[1], ref_chosen_logps=None if free else t[2],
                ref_rejected_logps=None if free else t[3], chosen_lengths=lc if lengths else None,
                rejected_lengths=lr if lengths else None), (t, lc, lr)


SETTINGS = {"sigmoid": dict(label_smoothing=0.0), "robust": dict(label_smoothing=0.2), "hinge": {},
            "ipo": {}, "simpo": dict(label_smoothing=0.1, gamma=0.5)}
BETAS = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.5, "simpo": 2.0}


def tolerance(inputs, beta, dtype):
    """float32 arithmetic on the (rounded) inputs: each log-ratio is off by <= 2 eps32 |logp|, a difference of two
    by twice that; scaled by beta, through losses of slope <= 1 (IPO: 2 |delta - 1/(2 beta)|, at most a few units
    here, on per-token ratios that are smaller still). float64 inputs: computed in float64."""
    eps = torch.finfo(torch.float64).eps if dtype == torch.float64 else EPS32
    scale = max(x.detach().abs().max().item() for x in inputs if x is not None)
    return 8 * eps * scale * max(beta, 1.0) * 8


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", SIZES)
def test_against_float64_formula(loss_type, dtype, B):
    kwargs, (t, lc, lr) = make_inputs(B, dtype, loss_type, contiguous=B != 7)
    for name in ("chosen_logps", "rejected_logps"):
        kwargs[name] = kwargs[name].detach().requires_grad_(True)
    beta = BETAS[loss_type]
    out = dpo_loss(**kwargs, beta=beta, loss_type=loss_type, **SETTINGS[loss_type])
    assert isinstance(out, DPOLossOutput)
    assert out.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    out.loss.backward()

    # the reference on the same rounded inputs, in float64
    c64, r64 = (kwargs[n].detach().double().requires_grad_(True) for n in ("chosen_logps", "rejected_logps"))
    s = SETTINGS[loss_type]
    losses, rw, rl = reference(c64, r64, t[2], t[3], lc, lr, beta=beta, loss_type=loss_type,
                               eps=s.get("label_smoothing", 0.0), gamma=s.get("gamma", 0.0))
    losses.mean().backward()
    tol = tolerance(t, beta, dtype)
    torch.testing.assert_close(out.loss.double(), losses.mean(), atol=tol, rtol=0)
    torch.testing.assert_close(out.chosen_rewards.double(), rw.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(out.rejected_rewards.double(), rl.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(out.margin.double(), (rw - rl).mean().detach(), atol=2 * tol, rtol=0)
    # accuracy: pairs whose reward gap is further than the tolerance from 0 decide it
    gap = (rw - rl).detach()
    clear = gap.abs() > 2 * tol
    got = (out.chosen_rewards > out.rejected_rewards)
    assert torch.equal(got[clear], (gap > 0)[clear])
    # gradients come back in the input dtype: float32 accuracy, then one rounding to it
    eps_in = torch.finfo(dtype).eps
    for got_grad, want in ((kwargs["chosen_logps"].grad, c64.grad), (kwargs["rejected_logps"].grad, r64.grad)):
        assert got_grad.dtype == dtype
        grad_tol = tol + eps_in * want.abs().max().item()
        torch.testing.assert_close(got_grad.double(), want, atol=grad_tol, rtol=0)


def test_reduction_none_and_module_form():
    kwargs, _ = make_inputs(9, torch.float32, "ipo")
    per_pair = dpo_loss(**kwargs, beta=0.3, loss_type="ipo", reduction="none")
    assert per_pair.loss.shape == (9,)
    module = DPOLoss(beta=0.3, loss_type="ipo")
    torch.testing.assert_close(module(**kwargs).loss, per_pair.loss.mean())
    assert "ipo" in repr(module)
    metrics = per_pair.metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}


def test_no_gradient_into_the_reference():
    kwargs, _ = make_inputs(5, torch.float32, "sigmoid")
    for name in ("chosen_logps", "ref_chosen_logps"):
        kwargs[name] = kwargs[name].detach().requires_grad_(True)
    dpo_loss(**kwargs).loss.backward()
    assert kwargs["ref_chosen_logps"].grad is None and kwargs["chosen_logps"].grad is not None


def test_at_the_reference_dpo_is_log_two():
    """policy == reference: every DPO reward is 0, the sigmoid loss log 2 and accuracy 0 (no strict win)."""
    x = torch.randn(6, device=DEVICE) - 10
    y = torch.randn(6, device=DEVICE) - 10
    out = dpo_loss(x, y, x.clone(), y.clone(), beta=0.7)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.accuracy.item() == 0.0 and out.margin.item() == 0.0


# ---- against TRL 1.16's own code ------------------------------------------------------------------------------------

class _Accelerator:
    device = torch.device(DEVICE)

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_dpo_loss(loss_type, beta, label_smoothing, per_token, completion_mask, ref_c, ref_r):
    """TRL's DPOTrainer._compute_loss on tensors: a stand-in model returns the given per-token log-probs; the
    reference log-probs are TRL's precomputed ones."""
    from collections import defaultdict

    from trl import DPOTrainer

    T1 = per_token.shape[1]

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    model.training = True
    host = types.SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(per_token.shape[0], T1 + 1, dtype=torch.long, device=DEVICE),
              "attention_mask": torch.ones(per_token.shape[0], T1 + 1, dtype=torch.long, device=DEVICE),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = DPOTrainer._compute_loss(host, model, inputs, False)
    return loss, {k: v[-1] for k, v in host._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("robust", 0.1, 0.2), ("hinge", 0.2, 0.0),
                                                ("ipo", 0.5, 0.0)])
def test_equals_trl_dpo_trainer(loss_type, beta, eps):
    pytest.importorskip("trl")
    B, T = 5, 13
    lengths = torch.randint(2, T, (2 * B,), device=DEVICE)
    pos = torch.arange(T, device=DEVICE)
    completion_mask = ((pos >= T - lengths[:, None]) & (pos > 0)).long()  # completions end the row; never token 0
    per_token = -torch.rand(2 * B, T - 1, device=DEVICE, dtype=torch.float64) * 3 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * B, device=DEVICE, dtype=torch.float64)
    trl_loss, trl_metrics = _trl_dpo_loss(loss_type, beta, eps, per_token, completion_mask, *ref.chunk(2))
    logps, counts = per_token.sum(1), completion_mask.sum(1)
    lens = counts.chunk(2) if loss_type == "ipo" else (None, None)
    ours = dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=beta, loss_type=loss_type, label_smoothing=eps,
                    chosen_lengths=lens[0], rejected_lengths=lens[1])
    torch.testing.assert_close(ours.loss, trl_loss, atol=1e-12, rtol=1e-12)
    for name, value in ours.metrics().items():  # (TRL takes the accuracy's mean in float32)
        tol = EPS32 if name == "rewards/accuracies" else 1e-12
        assert value.item() == pytest.approx(trl_metrics[name], abs=tol), name


def test_simpo_equals_trl_cpo_trainer():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    B, beta, gamma, eps = 8, 2.0, 0.6, 0.1
    lc, lr = torch.randint(1, 30, (B,), device=DEVICE), torch.randint(1, 30, (B,), device=DEVICE)
    c = -torch.rand(B, device=DEVICE, dtype=torch.float64) * lc
    r = -torch.rand(B, device=DEVICE, dtype=torch.float64) * lr
    host = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
                                 accelerator=_Accelerator())
    # CPOTrainer averages the log-probs over the completion tokens for simpo (average_log_prob) before its loss
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(host, c / lc, r / lr)
    ours = dpo_loss(c, r, beta=beta, loss_type="simpo", label_smoothing=eps, gamma=gamma, chosen_lengths=lc,
                    rejected_lengths=lr)
    torch.testing.assert_close(ours.loss, losses.mean(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, atol=1e-12, rtol=1e-12)


# ---- bad input -----------------------------------------------------------------------------------------------------

def _good(loss_type="sigmoid"):
    return make_inputs(4, torch.float32, loss_type)[0]


BAD = [
    (dict(loss_type="dpo"), ValueError, "loss_type"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta="0.1"), TypeError, "beta"),
    (dict(label_smoothing=0.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(gamma=0.5), ValueError, "gamma"),
    (dict(reduction="sum"), ValueError, "reduction"),
    (dict(ref_chosen_logps=None), ValueError, "ref_chosen_logps"),
    (dict(chosen_lengths=torch.ones(4, dtype=torch.long)), ValueError, "chosen_lengths"),
    (dict(rejected_logps=torch.zeros(5)), ValueError, "rejected_logps"),
    (dict(rejected_logps=torch.zeros(4, 2)), ValueError, "rejected_logps"),
    (dict(chosen_logps=torch.zeros(4, dtype=torch.long)), TypeError, "chosen_logps"),
    (dict(ref_rejected_logps=torch.zeros(4, dtype=torch.float64)), TypeError, "ref_rejected_logps"),
    (dict(chosen_logps=torch.tensor([0.0, float("nan"), 0.0, 0.0])), ValueError, "chosen_logps"),
    (dict(ref_chosen_logps=torch.tensor([0.0, float("inf"), 0.0, 0.0])), ValueError, "ref_chosen_logps"),
    (dict(chosen_logps=torch.zeros(0), rejected_logps=torch.zeros(0), ref_chosen_logps=torch.zeros(0),
          ref_rejected_logps=torch.zeros(0)), ValueError, "empty"),
    (dict(chosen_logps=[0.0] * 4), TypeError, "chosen_logps"),
]


@pytest.mark.parametrize("change,error,needle", BAD)
def test_bad_input_names_the_argument(change, error, needle):
    kwargs = {**_good(), **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}}
    with pytest.raises(error, match=needle):
        dpo_loss(**kwargs)


@pytest.mark.parametrize("loss_type", ["ipo", "simpo"])
def test_length_normalised_types_need_positive_lengths(loss_type):
    kwargs = _good(loss_type)
    with pytest.raises(ValueError, match="rejected_lengths"):
        dpo_loss(**{**kwargs, "rejected_lengths": None}, loss_type=loss_type)
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        dpo_loss(**{**kwargs, "chosen_lengths": torch.tensor([3, 0, 2, 1], device=DEVICE)}, loss_type=loss_type)
    with pytest.raises(ValueError, match="chosen_lengths must have the same shape"):
        dpo_loss(**{**kwargs, "chosen_lengths": torch.ones(3, device=DEVICE)}, loss_type=loss_type)


def test_simpo_refuses_a_reference_and_hinge_refuses_smoothing():
    with pytest.raises(ValueError, match="ref_chosen_logps must be None"):
        dpo_loss(**{**_good("simpo"), "ref_chosen_logps": torch.zeros(4, device=DEVICE)}, loss_type="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**_good("hinge"), loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLoss(loss_type="ipo", label_smoothing=0.1)


def test_exported():
    assert fastrm.dpo_loss is dpo_loss and "dpo_loss" in fastrm.__all__ and "DPOLoss" in fastrm.__all__
