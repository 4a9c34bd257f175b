"""Padding-free execution (fastrm.layout, fastrm.packing): length buckets, variable-length attention against per-sequence
float64 attention, packed == padded == bucketed scores, log-probs, values and gradients, no [S, S] anywhere,
the load-time probe on several transformers families, the trainers' packed setting, and the benchmark script."""

import importlib.util
import itertools
import json
import logging
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: F401 - _eager_function finds it

from fastrm import layout, packing
from fastrm.config import ConfigError, load_config
from fastrm.layout import varlen
from fastrm.models import backbone_hidden, reward_scores, token_logprobs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))
from benchmarks import bench_packing  # noqa: E402

PAD, BOS, EOS, VOCAB = 0, 1, 2, 48


# ---- length buckets ----------------------------------------------------------------------------------------------

def _cost(buckets, lengths, overhead, power):
    return sum(len(b) * max(lengths[i] for i in b) ** power + overhead for b in buckets)


@pytest.mark.parametrize("power", [1, 2])
def test_length_buckets_are_the_cheapest_partition(power):
    rng = random.Random(power)
    for _ in range(30):
        lengths = [rng.choice([3, 5, 8, 9, 20, 40]) for _ in range(rng.randint(1, 7))]
        overhead = rng.choice([0, 10, 200, 5000])
        buckets = layout.length_buckets(lengths, overhead, power)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))  # each index once
        tops = [lengths[b[0]] for b in buckets]
        assert tops == sorted(tops, reverse=True)  # longest bucket first...
        assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in buckets)  # ...its longest sequence first
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        best = min(_cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead, power)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert _cost(buckets, lengths, overhead, power) == best


def test_equal_lengths_make_one_bucket_and_no_overhead_makes_one_per_length():
    assert layout.length_buckets([7] * 5, overhead=0) == [[0, 1, 2, 3, 4]]
    assert sorted(map(sorted, layout.length_buckets([3, 9, 3, 9, 5], overhead=0))) == [[0, 2], [1, 3], [4]]
    assert len(layout.length_buckets([3, 9, 3, 9, 5], overhead=1e9)) == 1


# ---- variable-length attention against float64 per-sequence attention -------------------------------------------

class Attention(nn.Module):
    """What transformers' attention functions read from their module (this test file holds an eager function)."""

    def __init__(self, heads, kv_heads, causal):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.head_dim = heads // kv_heads, causal, 8


def _reference_attention(q, k, v, lengths, causal, window, scaling, softcap=None):
    """float64 attention of each sequence alone: q [S, h, d], k/v [S, hkv, d] -> [S, h, d]."""
    outs, start = [], 0
    rep = q.shape[1] // k.shape[1]
    for n in lengths:
        qs, ks, vs = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        scores = qs @ ks.transpose(1, 2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(n)
        allowed = torch.ones(n, n, dtype=torch.bool)
        if causal:
            allowed &= pos[None] <= pos[:, None]
        if window is not None:
            allowed &= pos[None] > pos[:, None] - window
        outs.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _packed_plan(lengths, bucket_overhead=varlen.ATTENTION_BUCKET_OVERHEAD):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    plan = varlen.VarlenPlan.from_cu_seq_lens(cu)
    plan.bucket_overhead = bucket_overhead
    return plan


@pytest.mark.parametrize("overhead", [0, varlen.ATTENTION_BUCKET_OVERHEAD], ids=["per-length", "default"])
@pytest.mark.parametrize("base,causal,window,kv_heads,lengths", [
    ("sdpa", True, None, 4, [5, 17, 3, 17, 11]),
    ("sdpa", True, None, 2, [9, 9, 9]),               # equal lengths (the row viewed as [n, L]), GQA
    ("sdpa", True, 4, 4, [12, 3, 20]),                # sliding window
    ("sdpa", False, None, 4, [6, 14, 1, 9]),          # bidirectional (encoders): keys masked per row
    ("eager", True, None, 2, [7, 2, 15, 15]),         # the model file's eager function, additive masks
    ("eager", True, 5, 4, [11, 4, 16]),
])
def test_varlen_attention_equals_each_sequence_alone(base, causal, window, kv_heads, lengths, overhead):
    """Overhead 0 puts every length in its own bucket (the gather / scatter path); the default one bucket here."""
    heads, d, S = 4, 8, sum(lengths)
    q = torch.randn(1, heads, S, d, requires_grad=True)
    k = torch.randn(1, kv_heads, S, d, requires_grad=True)
    v = torch.randn(1, kv_heads, S, d, requires_grad=True)
    attention = varlen._make_attention(base)
    plan = _packed_plan(lengths, overhead)
    kwargs = {varlen.PLAN_KWARG: plan, "scaling": d ** -0.5, "dropout": 0.0}
    if window is not None:
        kwargs["sliding_window"] = window
    out, _ = attention(Attention(heads, kv_heads, causal), q, k, v, None, **kwargs)
    assert out.shape == (1, S, heads, d)
    assert len(plan.buckets()[0]) == (len(set(lengths)) if overhead == 0 else 1)
    want = _reference_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lengths, causal,
                                window, d ** -0.5)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    weight = torch.randn_like(want)
    got = torch.autograd.grad((out[0].double() * weight).sum(), (q, k, v))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference_attention(*(x[0].transpose(0, 1) for x in leaves), lengths, causal, window, d ** -0.5)
    expected = torch.autograd.grad((ref * weight).sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5)


def test_grouped_sdpa_on_cpu_equals_transformers_sdpa_bitwise_without_repeating_keys(monkeypatch):
    """A bucket's masked SDPA call of a grouped-query model reads the key/value heads directly (enable_gqa) instead
    of transformers' repeat_kv copies: bitwise the same output and gradients. A keyword it does not reproduce sends
    the call to transformers' own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = ALL_ATTENTION_FUNCTIONS["sdpa"]
    grouped = varlen._grouped_sdpa(base)
    module = Attention(6, 2, True)
    q = torch.randn(3, 6, 7, 8, requires_grad=True)
    k, v = (torch.randn(3, 2, 11, 8, requires_grad=True) for _ in range(2))
    mask = torch.rand(3, 1, 7, 11) > 0.4
    mask[..., 0] = True
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("enable_gqa", False))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    got, _ = grouped(module, q, k, v, mask, scaling=0.3, dropout=0.0, is_causal=True)
    want, _ = base(module, q, k, v, mask, scaling=0.3, dropout=0.0, is_causal=True)
    assert seen == [True, False]
    assert torch.equal(got, want)
    g = torch.randn_like(got)
    got_grads, want_grads = torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)
    assert torch.equal(got_grads[0], want_grads[0])
    # d key / d value sum the 3 query heads' terms of each group in another order: within 3 roundings of their
    # magnitudes (the per-head terms are the gradients of the repeated copies)
    copies = [x.detach().repeat_interleave(3, 1).requires_grad_() for x in (k, v)]
    per_head = torch.autograd.grad(real_sdpa(q.detach(), *copies, attn_mask=mask, scale=0.3), copies, g.transpose(1, 2))
    for a, b, terms in zip(got_grads[1:], want_grads[1:], per_head):
        bound = 3 * torch.finfo(torch.float32).eps * terms.abs().view(3, 2, 3, 11, 8).sum(2)
        assert bool(((a - b).abs() <= bound).all())
    seen.clear()
    grouped(module, q, k, v, mask, scaling=0.3, s_aux=torch.zeros(6))  # (a keyword it does not know: transformers')
    assert seen == [False]


def test_varlen_attention_passes_padded_calls_through_unchanged():
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    out, _ = varlen._make_attention("sdpa")(Attention(4, 4, True), q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, want)


def _fake_torch_varlen(calls):
    """torch's varlen_attn as its docstring specifies it, on the CPU, recording its arguments."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append({"window_size": window_size, "enable_gqa": enable_gqa, "scale": scale, "max": (max_q, max_k),
                      "shape": tuple(q.shape)})
        lengths = (cu_q[1:] - cu_q[:-1]).tolist()
        left, right = window_size
        causal = right == 0
        return _reference_attention(q, k, v, lengths, causal, left + 1 if left >= 0 else None, scale).to(q.dtype)
    return varlen_attn


@pytest.mark.parametrize("window,kv_heads", [(None, 4), (3, 2)])
def test_torch_varlen_dispatch_passes_the_window_scale_and_gqa(monkeypatch, window, kv_heads):
    """The CUDA path cannot run here: check what it hands torch.nn.attention.varlen.varlen_attn."""
    calls = []
    monkeypatch.setattr(varlen, "_torch_varlen_attn", lambda: _fake_torch_varlen(calls))
    monkeypatch.setattr(varlen, "_use_torch_varlen", lambda *args: True)
    lengths, d = [4, 9, 6], 8
    q, k, v = torch.randn(1, 4, 19, d), torch.randn(1, kv_heads, 19, d), torch.randn(1, kv_heads, 19, d)
    kwargs = {varlen.PLAN_KWARG: _packed_plan(lengths), "scaling": 0.25, "dropout": 0.0, "sliding_window": window}
    out, _ = varlen._make_attention("sdpa")(Attention(4, kv_heads, True), q, k, v, None, **kwargs)
    (call,) = calls
    assert call == {"window_size": (-1, 0) if window is None else (window - 1, 0), "enable_gqa": kv_heads != 4,
                    "scale": 0.25, "max": (9, 9), "shape": (19, 4, d)}
    want = _reference_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), lengths, True,
                                window, 0.25)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)


def test_torch_varlen_is_chosen_only_where_it_is_exact(monkeypatch):
    monkeypatch.setattr(varlen, "_torch_varlen_attn", lambda: object())

    def tensor(device="cuda", dtype=torch.bfloat16, d=64):
        return SimpleNamespace(is_cuda=device == "cuda", dtype=dtype, shape=(1, 4, 10, d))

    q = tensor()
    assert varlen._use_torch_varlen(q, q, q, {}, 0.0, True)
    assert not varlen._use_torch_varlen(tensor("cpu"), q, q, {}, 0.0, True)
    assert not varlen._use_torch_varlen(tensor(dtype=torch.float32), q, q, {}, 0.0, True)  # flash: half only
    assert not varlen._use_torch_varlen(q, q, q, {}, 0.1, True)  # attention dropout
    assert not varlen._use_torch_varlen(q, q, q, {"softcap": 50.0}, 0.0, True)
    assert not varlen._use_torch_varlen(q, q, q, {"s_aux": torch.zeros(4)}, 0.0, True)  # attention sinks
    assert not varlen._use_torch_varlen(tensor(d=512), tensor(d=512), tensor(d=512), {}, 0.0, True)
    monkeypatch.setattr(varlen, "_torch_varlen_attn", lambda: None)  # a torch without it
    assert not varlen._use_torch_varlen(q, q, q, {}, 0.0, True)


# ---- models: packed == padded == bucketed -------------------------------------------------------------------------

def _llama(kind, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS, num_labels=1, attn_implementation="sdpa", **extra)
    return (LlamaForSequenceClassification if kind == "reward" else LlamaForCausalLM)(config)


def _sequences(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist() + [EOS] for n in lengths]


def _grads(model, out, weight):
    return torch.autograd.grad((out * weight).sum(), [p for p in model.parameters() if p.requires_grad])


def _assert_same(got, want, grads_got, grads_want):
    """fp32 through two layers: results agree to a few float32 ulps of their scale (the sums are reordered)."""
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    for g, w in zip(grads_got, grads_want):
        torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max().item() + 1e-9, rtol=1e-4)


def test_reward_scores_packed_and_bucketed_equal_the_padded_forward():
    model = _llama("reward")
    layout.enable_varlen(model)
    seqs = _sequences([9, 30, 4, 30, 17, 6, 22, 5])
    examples = [{"chosen_ids": c, "rejected_ids": r} for c, r in zip(seqs[:4], seqs[4:])]
    padded = layout.collate_preference(examples, PAD).sequences
    weight = torch.randn(8)
    want = reward_scores(model, padded)
    assert want.std() > 0  # a constant would make equality meaningless
    grads_want = _grads(model, want, weight)
    for batch in (layout.collate_preference(examples, PAD, "packed").sequences, layout.bucket(padded, overhead=0)):
        got = reward_scores(model, batch)
        _assert_same(got, want, _grads(model, got, weight), grads_want)
    assert len(layout.bucket(padded, overhead=0).buckets) > 2


def test_kway_batches_packed_and_padded_score_the_same_including_missing_responses():
    model = _llama("reward")
    layout.enable_varlen(model)
    seqs = _sequences([6, 13, 9, 21, 4])
    examples = [{"response_ids": seqs[:3], "ranks": [0, 2, 1]}, {"response_ids": seqs[3:], "ranks": [1, 0]}]
    packed = layout.collate_ranking(examples, PAD, "packed")
    padded = layout.collate_ranking(examples, PAD)
    assert torch.equal(packed.ranks, padded.ranks) and packed.sequences.cu_seq_lens.numel() == 7  # 2 x 3, one dummy
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(model, packed.sequences), reward_scores(model, padded.sequences),
                                   atol=1e-6, rtol=1e-5)


def test_packed_scores_read_the_token_the_hugging_face_head_reads():
    """With pad == EOS (tokenizers without a pad token) the HF head reads the token before the final EOS."""
    model = _llama("reward")
    model.config.pad_token_id = EOS
    layout.enable_varlen(model)
    seqs = _sequences([6, 11, 3])
    padded = layout.collate_preference([{"chosen_ids": s, "rejected_ids": s} for s in seqs], EOS).sequences
    torch.testing.assert_close(reward_scores(model, layout.collate_preference(
        [{"chosen_ids": s, "rejected_ids": s} for s in seqs], EOS, "packed").sequences), reward_scores(model, padded))


def test_token_logprobs_packed_and_bucketed_equal_padded_also_with_gradient_checkpointing():
    model = _llama("causal_lm")
    layout.enable_varlen(model)
    examples = [{"input_ids": s, "labels": [-100] * 3 + s[3:]} for s in _sequences([7, 25, 12, 25, 5])]
    padded = layout.collate_sft(examples, PAD)
    packed = layout.collate_sft(examples, PAD, "packed")
    want = token_logprobs(model, padded, backend="torch")
    grads_want = _grads(model, want.sum(1), torch.ones(5))
    got = token_logprobs(model, packed, backend="torch")
    torch.testing.assert_close(got.sum(), want.sum(), rtol=1e-5, atol=1e-4)
    bucketed = token_logprobs(model, layout.bucket(padded, overhead=0), backend="torch")
    _assert_same(bucketed, want, _grads(model, bucketed.sum(1), torch.ones(5)), grads_want)
    model.gradient_checkpointing_enable()
    model.train()  # dropout is 0: train mode only switches checkpointing on (its recompute must see the boundaries)
    got = token_logprobs(model, packed, backend="torch")
    _assert_same(got.sum().view(1), want.sum().view(1), _grads(model, got.sum(), torch.ones(())), grads_want)


def test_packed_rows_never_attend_over_the_whole_row(monkeypatch):
    """No [S, S] mask and no attention longer than the longest sequence: every SDPA call is one length bucket."""
    model = _llama("causal_lm")
    layout.enable_varlen(model)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lengths = [40, 3, 17, 33, 8, 40, 25]
    packed = layout.collate_sft([{"input_ids": s, "labels": s} for s in _sequences(lengths)], PAD, "packed")
    token_logprobs(model, packed, backend="torch").sum().backward()
    assert seen and all(q <= max(lengths) and k <= max(lengths) for q, k, _ in seen)
    assert all(mask is None or mask[-1] <= max(lengths) for _, _, mask in seen)


def test_rollout_layout_left_padded_prompts_pack_and_bucket_exactly():
    """RL rows: left-padded prompt + right-padded completion, position ids counting real tokens."""
    model = _llama("causal_lm")
    layout.enable_varlen(model)
    model.eval()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0]])
    ids = torch.randint(3, VOCAB, mask.shape).masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    batch = layout.PaddedBatch(ids, mask, labels, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
    with torch.no_grad():
        want, want_entropy = token_logprobs(model, batch, return_entropy=True)
        hidden = backbone_hidden(model.model, batch)
        packed = layout.pack(batch)  # outputs of every layout come back in the padded layout
        got, got_entropy = token_logprobs(model, packed, return_entropy=True)
        got_hidden = backbone_hidden(model.model, packed)
        bucketed = layout.bucket(batch, overhead=0)
        b_lp, b_entropy = token_logprobs(model, bucketed, return_entropy=True)
        b_hidden = backbone_hidden(model.model, bucketed)
    real = mask.bool()
    for lp, ent in ((got, got_entropy), (b_lp, b_entropy)):
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent * (labels[:, 1:] != -100), want_entropy * (labels[:, 1:] != -100),
                                   atol=1e-5, rtol=1e-5)
    for h in (got_hidden, b_hidden):
        torch.testing.assert_close(h[real], hidden[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        layout.pack(layout.PaddedBatch(ids, torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1]] * 3)))


def test_generation_is_unchanged_by_the_varlen_attention():
    model = _llama("causal_lm").eval()
    prompt = {"input_ids": torch.tensor([[PAD, 5, 6, 7], [4, 9, 9, 3]]), "attention_mask": torch.tensor([[0, 1, 1, 1],
                                                                                                        [1, 1, 1, 1]])}
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
    want = model.generate(**prompt, **kwargs)
    layout.enable_varlen(model)
    assert model.config._attn_implementation == "fastrm_varlen_sdpa"
    assert torch.equal(model.generate(**prompt, **kwargs), want)


# ---- the load-time probe on transformers families -------------------------------------------------------------------

FAMILIES = {  # a few of benchmarks/bench_packing.py's: exact for packed reward scoring? the reason when not
    "llama": (True, None),
    "mistral": (True, None),  # probed past its sliding window
    "gemma2": (True, None),  # eager attention, soft-capped, sliding window
    "gpt2": (True, None),  # learned absolute positions
    "opt": (True, None),  # its mask builder ignores position ids: the old packed path leaked across sequences
    "bloom": (False, "attention interface"),  # ALiBi, its own attention
    "stablelm": (False, "attention interface"),  # its decoder layers drop the attention keywords
    "bert": (False, "no last-token `score` head"),  # pooled [CLS]
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_probe_packs_the_families_where_it_is_exact_and_says_why_not(family):
    from transformers import AutoModelForSequenceClassification

    exact, reason = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(bench_packing.family_config(family))
    impl = model.config._attn_implementation
    ok, why = packing.verify_packing(model, "reward")
    assert ok == exact, why
    if exact:
        assert why.startswith("probe: packed equals padded")
        assert model.config._attn_implementation in (varlen.PREFIX + impl, impl)
    else:
        assert reason in why
        assert model.config._attn_implementation == impl  # its own attention back


def test_the_probe_catches_a_model_whose_packed_forward_differs():
    """RoBERTa counts positions from padding_idx + 1: a packed row's 0-based positions are wrong for it."""
    from transformers import RobertaConfig, RobertaForCausalLM

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    ok, why = packing.verify_packing(RobertaForCausalLM(config), "causal_lm")
    assert not ok and "differ from padded" in why


def test_choose_packing_auto_falls_back_true_refuses_and_one_line_is_logged(caplog):
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=1))
    with caplog.at_level(logging.INFO, logger="fastrm"):
        decision = packing.choose_packing(bert, "auto", "reward", name="reward model")
    assert decision.mode == "bucketed" and "not exact for BertForSequenceClassification" in decision.reason
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("packing")] == [
        f"packing (reward model BertForSequenceClassification): {decision.describe()}"]
    with pytest.raises(ConfigError, match="setting packed=true: packing is not exact for .*score"):
        packing.choose_packing(bert, "true", "reward")
    assert packing.choose_packing(bert, "false", "reward").mode == "padded"
    assert packing.choose_packing(bert, "bucketed", "reward").mode == "bucketed"
    decision = packing.choose_packing(_llama("reward"), "auto", "reward")
    assert decision.mode == "shared" and decision.attention == "sdpa per length bucket"


# ---- trainers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("true", "true"), ("True", "true"), ("no", "false"),
                                            ("bucketed", "bucketed")])
def test_packed_setting_values(value, expected):
    from fastrm.trainers.reward_model import RewardConfig

    assert load_config(RewardConfig, None, [f"packed={value}"]).packed == expected


def test_packed_setting_rejects_other_values():
    from fastrm.trainers.sft import SFTConfig

    with pytest.raises(ConfigError, match="setting packed='sometimes': must be auto, true, unshared, false, bucketed"):
        load_config(SFTConfig, None, ["packed=sometimes"])


def test_reward_trainer_bucketed_steps_equal_packed_steps(tmp_path):
    from fastrm.trainers.reward_model import RewardConfig, RewardTrainer

    losses = {}
    for mode in ("true", "bucketed"):
        args = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
                "tensorboard=false", "progress=false", "device=cpu", "num_train_pairs=32", "num_eval_pairs=8",
                "batch_size=8", "max_steps=2", "log_steps=1", "save_steps=100", "eval_steps=100", "optimizer=adamw",
                "backend=torch",
                f"output_dir={tmp_path / mode}", f"packed={mode}"]
        trainer = RewardTrainer(load_config(RewardConfig, None, args)).setup()
        assert trainer.packing.mode == {"true": "shared", "bucketed": "bucketed"}[mode]
        trainer.train()
        losses[mode] = [json.loads(line)["loss"] for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
                        if "loss" in json.loads(line)]
    assert len(losses["true"]) == 2
    assert losses["true"] == pytest.approx(losses["bucketed"], rel=1e-4)


def test_rl_rollout_forwards_are_the_same_packed_bucketed_and_padded(tmp_path):
    """Old / reference log-probs, critic values and reward-model scores of one rollout, in every layout."""
    from fastrm.generation import generate
    from fastrm.models import ModelConfig, load_reward_model
    from fastrm.tokenization import load_tokenizer
    from fastrm.trainers.rl import RLConfig, RLTrainer

    tokenizer = load_tokenizer("embedded")
    load_reward_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tokenizer,
                      torch.device("cpu")).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    args = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
            "tensorboard=false", "progress=false", "device=cpu", "batch_size=3", "num_samples=2", "max_new_tokens=5",
            "num_train_prompts=6", "num_eval_prompts=0", "backend=torch", "advantage=gae", "reward=model",
            f"reward_model_path={tmp_path / 'rm'}", "value_model=reward", f"output_dir={tmp_path / 'run'}"]
    trainer = RLTrainer(load_config(RLConfig, None, args)).setup()
    assert trainer.policy_packing.mode == trainer.reward_packing.mode == trainer.value_packing.mode == "shared"
    prompts = ["1+2=", "13+4=", "7+7="]
    for seed in range(20):  # the first seed whose samples end at different lengths
        torch.manual_seed(seed)
        gen = trainer.policy_p(generate, trainer.tokenizer, prompts, max_new_tokens=5, do_sample=True,
                               num_return_sequences=2)
        if (gen["completion_mask"] == 0).any():
            break
    batch, prompt_len = trainer._sequences(gen), gen["prompt_ids"].shape[1]
    assert (gen["prompt_mask"] == 0).any() and (gen["completion_mask"] == 0).any()  # both paddings present
    mask = gen["completion_mask"].bool()
    results = {}
    for mode in ("shared", "packed", "bucketed", "padded"):
        decision = packing.Packing(mode, "test")
        trainer.policy_packing = trainer.value_packing = trainer.reward_packing = decision
        with torch.no_grad():
            results[mode] = (trainer._logprobs(trainer.policy_p, batch, prompt_len)[mask],
                             trainer._values(batch, prompt_len)[mask],
                             trainer.model_scores([{"prompt": p} for p in prompts for _ in range(2)], gen, [""] * 6))
    for mode in ("shared", "packed", "bucketed"):
        for got, want in zip(results[mode], results["padded"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert results["padded"][2].std() > 0


# ---- the benchmark script -----------------------------------------------------------------------------------------------

def test_bench_packing_runs_and_writes_its_results(tmp_path):
    argv = ["--batch", "2", "--long", "16", "--hidden", "16", "--layers", "1", "--heads", "2", "--rounds", "1",
            "--lengths", "longtail", "--copy-buffer-mib", "16", "--out", str(tmp_path), "--no-plots"]
    assert bench_packing.main(argv) == 0
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    result = json.loads((tmp_path / f"packing_{kind}.json").read_text())
    rows = result["rows"]
    assert {r["task"] for r in rows} == {"reward", "sft"}
    trl = importlib.util.find_spec("trl") is not None  # a dev dependency: TRL's padding-free SFT collator
    for task in ("reward", "sft"):
        got = {r["provider"] for r in rows if r["task"] == task and r["status"] == "ok"}
        assert {"padded", "packed", "bucketed", "packed-sdpa-mask"} | ({"trl-padding-free"} if trl and task == "sft"
                                                                       else set()) == got
    for r in rows:
        assert r["mode"] == "fwd+bwd" and r["n_samples"] == 1 and r["err_grad"] <= r["tol"]
        assert r["paired_ratio"] > 0 and r["tokens"] < r["padded_tokens"]
    assert "| packed |" in (tmp_path / f"packing_{kind}.md").read_text()


# ---- CUDA (a GPU session: python -m pytest tests/test_packing.py -k cuda) ------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("path", ["torch-varlen", "sdpa-buckets"])
@pytest.mark.parametrize("window,kv_heads", [(None, 8), (16, 2)])
def test_cuda_varlen_attention_in_bf16_equals_each_sequence_alone(monkeypatch, path, window, kv_heads):
    if path == "torch-varlen" and varlen._torch_varlen_attn() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    if path == "sdpa-buckets":
        monkeypatch.setattr(varlen, "_use_torch_varlen", lambda *args: False)
    lengths, d = [37, 5, 128, 64, 64, 1, 90], 64
    S = sum(lengths)
    q = torch.randn(1, 8, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.tensor(lengths, device="cuda").cumsum(0)
    kwargs = {varlen.PLAN_KWARG: varlen.VarlenPlan.from_cu_seq_lens(cu), "scaling": d ** -0.5,
              "dropout": 0.0, "sliding_window": window}
    out, _ = varlen._make_attention("sdpa")(Attention(8, kv_heads, True), q, k, v, None, **kwargs)
    want = _reference_attention(*(x[0].transpose(0, 1).float() for x in (q, k, v)), lengths, True, window, d ** -0.5)
    scale = want.abs().max().item()
    assert (out[0].double() - want).abs().max().item() <= 2e-2 * scale  # bf16 inputs and output: a few ulps
    weight = torch.randn_like(want)
    grads = torch.autograd.grad((out[0].double() * weight).sum(), (q, k, v))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference_attention(*(x[0].transpose(0, 1) for x in leaves), lengths, True, window, d ** -0.5)
    for got, expected in zip(grads, torch.autograd.grad((ref * weight).sum(), leaves)):
        assert (got.double() - expected).abs().max().item() <= 3e-2 * expected.abs().max().item()


@requires_cuda
def test_cuda_probe_under_bf16_autocast_packs_a_llama():
    model = _llama("reward").cuda()
    decision = packing.choose_packing(model, "auto", "reward", autocast_dtype=torch.bfloat16)
    assert decision.mode == "shared" and "bfloat16 autocast" in decision.reason
    if varlen._torch_varlen_attn() is not None:
        assert decision.attention.startswith("torch varlen_attn")


@requires_cuda
def test_cuda_flash_attention_2_packs_through_transformers():
    pytest.importorskip("flash_attn")
    model = _llama("causal_lm", head_dim=64).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "flash_attention_2"
    decision = packing.choose_packing(model, "auto", "causal_lm")
    assert decision.mode == "packed" and decision.attention == "flash-attn varlen", decision
