"""fastrm inside TRL's own trainers (TRL is a test dependency).

The trainers themselves run: GRPOTrainer, RLOOTrainer and RewardTrainer on a tiny saved Llama (built on
the spot), once as TRL ships them and once after ``fastrm.integrations.trl.patch()``. With plain SGD both runs
end at the same parameters up to float32 rounding, the parameters did move, and fastrm's op was really called
(the patch report counts every call it served). The call sites are also checked one by one against TRL's own
functions: values and gradients, K candidate indices, row masks, soft-capping, logit scale.
"""

import math

import pytest
import torch

trl = pytest.importorskip("trl")

import fastrm  # noqa: E402
import fastrm.integrations.trl as fastrm_trl  # noqa: E402
from fastrm.tasks.arithmetic import build_tokenizer  # noqa: E402

# SGD steps of lr ~0.5 on float32 parameters: the patched and unpatched runs differ by float32 rounding of
# the log-probs (~1e-7 relative) carried through a few steps; a wrong gradient moves parameters by ~lr * grad.
PARAM_TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _unpatched():
    yield
    fastrm_trl.unpatch()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama causal LM and a one-label sequence classifier of the same shape, saved with the embedded
    character tokenizer (47 tokens, chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    paths = {}
    for name, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        model = cls(config.__class__(**{**config.to_dict(), "num_labels": 1})) if name == "reward" else cls(config)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return tokenizer, paths


def digit_reward(completions, **kwargs):
    """A rule reward with spread across a random tiny policy's samples."""
    return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]


def train_twice(make_trainer):
    """Train once unpatched, once patched; return (initial params, unpatched end, patched end, report)."""
    runs, report = [], None
    for patched in (False, True):
        trainer = make_trainer()
        init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        if patched:
            report = fastrm_trl.patch()
        try:
            trainer.train()
        finally:
            if report is not None:
                report.undo()
        runs.append((init, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
    (init_a, end_a), (init_b, end_b) = runs
    for k in init_a:
        torch.testing.assert_close(init_a[k], init_b[k], rtol=0, atol=0)
    return init_a, end_a, end_b, report


def assert_same_training(init, unpatched, patched):
    moved = max((unpatched[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, "the parameters did not move: the comparison would prove nothing"
    for k in init:
        torch.testing.assert_close(patched[k], unpatched[k], **PARAM_TOL, msg=lambda m: f"{k}: {m}")


def common_args(tmp_path):
    return dict(output_dir=str(tmp_path), max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, seed=0,
                disable_tqdm=True)


# ---------------------------------------------------------------------------------------------------------------
# the trainers themselves
# ---------------------------------------------------------------------------------------------------------------


def test_grpo_trainer_runs_on_fastrm(tiny, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, paths = tiny
    prompts = Dataset.from_list([{"prompt": f"{i}+{i}="} for i in range(4)])

    def make():
        args = GRPOConfig(**common_args(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, beta=0.04)  # beta > 0: the reference model's head too
        return GRPOTrainer(model=paths["policy"], reward_funcs=digit_reward, args=args, train_dataset=prompts,
                           processing_class=tokenizer)

    init, unpatched, patched, report = train_twice(make)
    assert_same_training(init, unpatched, patched)
    # per step: the policy's log-probs + entropies, and the reference's log-probs
    assert report.calls["fused_lm_head"] == 4 and report.fallbacks["fused_lm_head"] == 0


def test_rloo_trainer_runs_on_fastrm(tiny, tmp_path):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tokenizer, paths = tiny
    prompts = Dataset.from_list([{"prompt": f"{i}*{i}="} for i in range(4)])

    def make():
        args = RLOOConfig(**common_args(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, beta=0.05)
        return RLOOTrainer(model=paths["policy"], reward_funcs=digit_reward, args=args, train_dataset=prompts,
                           processing_class=tokenizer)

    init, unpatched, patched, report = train_twice(make)
    assert_same_training(init, unpatched, patched)
    assert report.calls["fused_lm_head"] >= 2 and report.fallbacks["fused_lm_head"] == 0


def test_reward_trainer_runs_on_fastrm(tiny, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tokenizer, paths = tiny
    pairs = Dataset.from_list([{"chosen": f"{i}+1={i + 1}", "rejected": f"{i}+1={i + 3}", "margin": 0.5 * i}
                               for i in range(8)])

    def make():
        args = RewardConfig(**common_args(tmp_path), per_device_train_batch_size=4, max_length=32,
                            center_rewards_coefficient=0.01)
        return RewardTrainer(model=paths["reward"], args=args, train_dataset=pairs, processing_class=tokenizer)

    init, unpatched, patched, report = train_twice(make)
    assert_same_training(init, unpatched, patched)
    assert report.calls["reward_loss"] == 2 and report.fallbacks["reward_loss"] == 0


# ---------------------------------------------------------------------------------------------------------------
# each call site against TRL's own function
# ---------------------------------------------------------------------------------------------------------------


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point() else t
              for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * torch.linspace(0.5, 1.5, o.numel()).view(o.shape)).sum() for o in outs if o is not None)
    total.backward()
    return outs, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("softcap,scale,bias", [(None, 1.0, False), (5.0, 1.0, True), (4.0, 0.5, False)])
def test_fused_head_site_matches_trl(softcap, scale, bias):
    """The patched call site and TRL's ChunkedLogProbFunction both agree with float64 (log-probs, entropies,
    d hidden / d weight / d bias), soft-capping and logit scale included."""
    from trl.kernels import ChunkedLogProbFunction

    N, H, V = 23, 16, 70
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) * 2
    b = torch.randn(V) if bias else None
    targets = torch.randint(0, V, (N,))
    outputs = ("log_probs", "entropy")

    def float64(h, w, bb):
        logits = (h @ w.t() + (0 if bb is None else bb)) * scale
        return fastrm.gather_logprobs_reference(logits, targets, temperature=0.7, softcap=softcap,
                                                return_entropy=True)

    report = fastrm_trl.patch()
    shim = __import__("trl.trainer.utils", fromlist=["x"])._ChunkedLogProbFunction
    assert shim is not ChunkedLogProbFunction

    def ours(h, w, bb):
        out = shim.apply(h, w, bb, targets, 0.7, 32, softcap, scale, outputs)
        assert len(out) == 5 and all(x is None for x in out[2:])
        return out[:2]

    def theirs(h, w, bb):
        return ChunkedLogProbFunction.apply(h, w, bb, targets, 0.7, 32, softcap, scale, outputs)[:2]

    want, want_grads = _grads(float64, hidden.double(), weight.double(), None if b is None else b.double())
    for fn in (ours, theirs):
        got, grads = _grads(fn, hidden, weight, b)
        for x, ref in zip(got + tuple(grads), want + tuple(want_grads)):
            # float32 matmuls: error relative to the largest value (as tests/test_linear_logprobs.py)
            torch.testing.assert_close(x.double(), ref, rtol=0, atol=256 * 2.0**-24 * ref.abs().max().item())
    assert report.calls["fused_lm_head"] == 1
    # An output fastrm does not compute goes back to TRL, counted.
    out = shim.apply(hidden, weight, b, targets, 0.7, 32, softcap, scale, ("log_probs", "is_top1"))
    assert out[4] is not None and report.fallbacks["fused_lm_head"] == 1


def test_logprob_function_sites_match_trl():
    from trl.trainer import utils

    originals = {name: getattr(utils, name) for name in fastrm_trl.LOGPROB_FUNCTIONS}
    logits = torch.randn(3, 5, 40) * 3
    index = torch.randint(0, 40, (3, 5))
    index_k = torch.randint(0, 40, (3, 5, 4))  # K candidate indices per position
    row_mask = torch.rand(3, 5) > 0.3
    cases = [
        ("selective_log_softmax", (index,), {}),
        ("selective_log_softmax", (index_k,), {"temperature": 0.8}),
        ("selective_log_softmax", (index,), {"row_mask": row_mask}),
        ("entropy_from_logits", (), {}),
        ("selective_log_softmax_and_entropy", (index,), {"temperature": 1.3, "row_mask": row_mask}),
    ]
    # TRL's own results first: its functions call each other through module globals the patch replaces.
    theirs = [_grads(lambda x, n=n, a=a, k=k: getattr(utils, n)(x, *a, **k), logits) for n, a, k in cases]
    with fastrm_trl.patch() as report:
        assert all(getattr(utils, n) is not originals[n] for n in originals)
        ours = [_grads(lambda x, n=n, a=a, k=k: getattr(utils, n)(x, *a, **k), logits) for n, a, k in cases]
        assert sum(report.calls[n] for n in originals) == len(cases)
    assert all(getattr(utils, n) is originals[n] for n in originals)  # undone on exit
    for (outs, grads), (outs_t, grads_t) in zip(ours, theirs):
        for a, b in zip(outs, outs_t):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], grads_t[0], rtol=1e-5, atol=1e-6)


def test_patch_report_and_undo():
    from trl.trainer import reward_trainer, utils

    fused, loss = utils._ChunkedLogProbFunction, reward_trainer.RewardTrainer.compute_loss
    report = fastrm_trl.patch()
    assert report.active and set(report.patched) >= {"fused_lm_head", "selective_log_softmax", "reward_loss"}
    assert "ppo" in report.not_patched and "no PPOTrainer" in report.not_patched["ppo"]
    text = str(report)
    assert "fastrm.linear_logprobs" in text and "fastrm.pairwise_ranking_loss" in text and trl.__version__ in text
    again = fastrm_trl.patch()  # a second patch replaces the first, never stacks
    assert not report.active and again.active
    assert utils._ChunkedLogProbFunction.original is fused
    again.undo()
    again.undo()  # idempotent
    assert utils._ChunkedLogProbFunction is fused and reward_trainer.RewardTrainer.compute_loss is loss
    assert math.isfinite(0.0)
