"""The shared layout (fastrm.layout.shared): a group's common prefix computed once, its members attending to it.

Checked against the unshared computation in float64 (values and gradients, to float64 rounding), on the attention
alone and on whole models of several families, with windows, GQA, eager and SDPA; the probe must refuse a shared
row that is wrong; and the row itself (which tokens are shared, where each token's output comes from)."""

import pytest
import torch

from fastrm import packing
from fastrm.layout import (
    IGNORE_INDEX,
    PackedBatch,
    PaddedBatch,
    SharedPrefixBatch,
    arrange,
    collate_preference,
    collate_ranking,
    collate_sequences,
    share,
    varlen,
)
from fastrm.models import reward_scores, token_logprobs
from helpers import TINY_FAMILIES, tiny_model

PAD, EOS, BOS, VOCAB = 0, 1, 2, 97
F64_EPS = torch.finfo(torch.float64).eps


def _padded(seqs, groups, left=False):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[r, cols], mask[r, cols] = torch.tensor(s), 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return PaddedBatch(ids, mask, labels, group_ids=torch.tensor(groups))


# ---- the row ----------------------------------------------------------------------------------------------------------

def test_share_computes_each_groups_common_prefix_once():
    prompt = [BOS, 5, 6, 7]
    seqs = [prompt + [8, 9, EOS], prompt + [8, EOS], [BOS, 3, EOS], prompt + [11, 12, 13, EOS]]
    batch = _padded(seqs, [0, 0, -1, 0])
    row = share(batch)
    assert isinstance(row, SharedPrefixBatch)
    # the group's common prefix is the prompt (two members also share the token 8; the third does not)
    assert row.input_ids[0].tolist() == prompt + [8, 9, EOS] + [8, EOS] + [11, 12, 13, EOS] + [BOS, 3, EOS]
    assert row.position_ids[0].tolist() == [0, 1, 2, 3] + [4, 5, 6] + [4, 5] + [4, 5, 6, 7] + [0, 1, 2]
    assert (row.num_tokens, row.computed_tokens, row.shared_tokens) == (24, 16, 8)
    assert (row.prefix_lengths, row.lengths) == ([0, 4, 4, 4, 0], [4, 3, 2, 4, 3])
    # every token of the padded batch reads the row position that computed it
    flat = row.source.view(batch.input_ids.shape)
    real = batch.attention_mask != 0
    assert torch.equal(row.input_ids[0][flat[real]], batch.input_ids[real])
    assert (flat[~real] == -1).all()
    assert row.predicted_tokens == batch.predicted_tokens


def test_share_keeps_one_token_of_each_member_its_own_and_packs_when_nothing_is_shared():
    same = [BOS, 5, 6, EOS]
    row = share(_padded([same, same, same[:3]], [0, 0, 0]))  # identical members, one a prefix of the others
    assert row.prefix_lengths[1:] == [2, 2, 2] and row.lengths == [2, 2, 2, 1]
    assert isinstance(share(_padded([[5, 6, EOS], [7, EOS]], [0, 0])), PackedBatch)  # no common token
    assert isinstance(share(_padded([same, same], [-1, -1])), PackedBatch)  # negative ids: alone
    no_groups = PaddedBatch(torch.tensor([same, same]), torch.ones(2, 4, dtype=torch.long))
    assert isinstance(arrange(no_groups, "shared"), PackedBatch)
    with pytest.raises(ValueError, match="group_ids: expected one id per row"):
        share(PaddedBatch(torch.tensor([same]), torch.ones(1, 4, dtype=torch.long), group_ids=torch.tensor([0, 0])))


def test_left_padded_rows_share_as_right_padded_ones():
    prompt = [BOS, 5, 6, 7]
    seqs = [prompt + [8, 9, EOS], prompt + [10, EOS]]
    left, right = share(_padded(seqs, [0, 0], left=True)), share(_padded(seqs, [0, 0]))
    assert torch.equal(left.input_ids, right.input_ids) and torch.equal(left.position_ids, right.position_ids)


def test_collators_group_a_pairs_and_a_ranking_examples_responses():
    pairs = [{"chosen_ids": [BOS, 5, 6, 7, EOS], "rejected_ids": [BOS, 5, 8, EOS]},
             {"chosen_ids": [BOS, 9, 7, EOS], "rejected_ids": [BOS, 9, 7, 7, EOS]}]
    batch = collate_preference(pairs, PAD, "shared").sequences
    assert isinstance(batch, SharedPrefixBatch) and batch.padded.group_ids.tolist() == [0, 1, 0, 1]
    assert (batch.num_tokens, batch.computed_tokens) == (18, 18 - 2 - 3)
    ranking = collate_ranking([{"response_ids": [[BOS, 4, 5, EOS], [BOS, 4, 6, EOS]], "ranks": [0, 1]},
                               {"response_ids": [[BOS, 7, EOS]], "ranks": [0]}], PAD, "shared")
    assert ranking.sequences.padded.group_ids.tolist() == [0, 0, 1, -1]  # the missing response's dummy is alone
    scored = collate_sequences([[BOS, 4, 5, EOS], [BOS, 4, 6, EOS], [BOS, 7, EOS]], PAD, "shared", group_ids=[0, 0, 1])
    assert isinstance(scored, SharedPrefixBatch) and scored.shared_tokens == 2
    with pytest.raises(ValueError, match="2 group ids for 3 sequences"):
        collate_sequences([[BOS, EOS]] * 3, PAD, "shared", group_ids=[0, 0])


# ---- the attention ----------------------------------------------------------------------------------------------------

from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402,F401 - the eager base


class Attention(torch.nn.Module):
    def __init__(self, heads, kv_heads):
        super().__init__()
        self.num_key_value_groups, self.is_causal = heads // kv_heads, True
        self.training = False


def _reference(q, k, v, sequences, window, scale):
    """Each sequence alone, in float64: ``sequences`` lists each one's row positions, in order."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    reps = q.shape[1] // k.shape[1]
    for pos in sequences:
        idx = torch.tensor(pos)
        qq, kk, vv = q[idx].double(), k[idx].double().repeat_interleave(reps, 1), v[idx].double().repeat_interleave(reps, 1)
        n = len(pos)
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        if window is not None:
            allowed &= torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1) < window
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[idx[-n:]] = torch.einsum("hqk,khd->qhd", attn, vv)  # later rows of a shared prefix: written alike
    return out


@pytest.mark.parametrize("overhead", [0, varlen.ATTENTION_BUCKET_OVERHEAD], ids=["per-length", "default"])
@pytest.mark.parametrize("base,window,kv_heads", [("sdpa", None, 4), ("sdpa", None, 2), ("sdpa", 5, 4),
                                                  ("eager", None, 2), ("eager", 4, 4)])
def test_shared_attention_equals_each_sequence_alone(base, window, kv_heads, overhead):
    # row: prefix A (6) | a1 (4) | a2 (9) | lone (7) | prefix B (3) | b1 (1) | b2 (5)
    starts, lengths = [0, 6, 10, 19, 26, 29, 30], [6, 4, 9, 7, 3, 1, 5]
    prefix_starts, prefix_lengths = [0, 0, 0, 0, 0, 26, 26], [0, 6, 6, 0, 0, 3, 3]
    span = lambda s: list(range(starts[s], starts[s] + lengths[s]))  # noqa: E731
    sequences = [span(0), span(0) + span(1), span(0) + span(2), span(3), span(4), span(4) + span(5),
                 span(4) + span(6)]
    heads, d, S = 4, 8, 35
    q = torch.randn(1, heads, S, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, S, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, S, d, dtype=torch.float64, requires_grad=True)
    plan = varlen.SharedPlan(starts, lengths, prefix_starts, prefix_lengths, bucket_overhead=overhead)
    kwargs = {varlen.PLAN_KWARG: plan, "scaling": d ** -0.5, "dropout": 0.0, "sliding_window": window}
    out, _ = varlen._make_attention(base)(Attention(heads, kv_heads), q, k, v, None, **kwargs)
    want = _reference(*(x[0].transpose(0, 1) for x in (q, k, v)), sequences, window, d ** -0.5)
    # transformers' eager attention takes its softmax in float32 whatever the dtype: float32 roundings there
    tol = 64 * (F64_EPS if base == "sdpa" else torch.finfo(torch.float32).eps)
    torch.testing.assert_close(out[0], want, atol=tol, rtol=tol)
    weight = torch.randn_like(want)
    got = torch.autograd.grad((out[0] * weight).sum(), (q, k, v))
    # the reference's gradient: each sequence's outputs weighted as the row's (a prefix's outputs counted once)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = _reference(*(x[0].transpose(0, 1) for x in leaves), sequences, window, d ** -0.5)
    expected = torch.autograd.grad((ref * weight).sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=tol * 16, rtol=tol * 16)


def test_bidirectional_attention_cannot_share():
    plan = varlen.SharedPlan([0, 2], [2, 2], [0, 0], [0, 2])
    module = Attention(2, 2)
    module.is_causal = False
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(varlen.PackingUnsupported, match="shared prefix needs causal attention"):
        varlen._make_attention("sdpa")(module, q, q, q, None, **{varlen.PLAN_KWARG: plan, "is_causal": False})


# ---- whole models, several families -----------------------------------------------------------------------------------

def _family(name, kind):
    return tiny_model(name, kind, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                      num_labels=1).double().eval()


FAMILIES = list(TINY_FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", ["reward", "causal_lm"])
def test_shared_forward_and_gradients_equal_each_sequence_alone_across_families(name, kind):
    """float64 models: the shared row's outputs and every parameter's gradient are those of each sequence run alone
    (no padding: Gemma-2's padded eager forward in float64 turns short rows into NaN by itself)."""
    torch.manual_seed(0)
    model = _family(name, kind)
    varlen.enable_varlen(model)
    gen = torch.Generator().manual_seed(1)
    prompts = [[BOS] + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (7, 3)]
    seqs = [p + torch.randint(3, VOCAB, (n,), generator=gen).tolist() + [EOS]
            for p, ns in zip(prompts, [(9, 2, 5), (12, 1)]) for n in ns]  # up to 20 tokens: past the window of 6
    batch = _padded(seqs, [0, 0, 0, 1, 1])
    fn = reward_scores if kind == "reward" else token_logprobs
    params = list(model.parameters())
    shared = arrange(batch, "shared")
    assert isinstance(shared, SharedPrefixBatch) and shared.shared_tokens == 2 * 8 + 4
    out = fn(model, shared)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    want, want_grads = torch.zeros_like(out), [torch.zeros_like(p) for p in params]
    for r, s in enumerate(seqs):
        alone = PaddedBatch(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long),
                            torch.tensor([s]))
        one = fn(model, alone)[0]
        at = (r,) if kind == "reward" else (r, slice(0, one.shape[0]))
        want[at] = one.detach()
        for acc, g in zip(want_grads, torch.autograd.grad((one * weight[at]).sum(), params, allow_unused=True)):
            if g is not None:
                acc += g
    # The models run in float64; the heads hand back float32 (reward scores, fused log-probs), so both ways agree
    # to a few float32 roundings of the outputs' scale, and the gradients below them likewise.
    tol = 16 * torch.finfo(torch.float32).eps
    assert (out.detach() - want).abs().max() <= tol * want.abs().max()
    for g, w in zip(grads, want_grads):
        g = torch.zeros_like(w) if g is None else g
        assert (g - w).abs().max() <= tol * max(w.abs().max(), 1e-3)


def test_the_probe_refuses_a_shared_row_whose_responses_do_not_continue_the_prompts_positions(monkeypatch):
    from fastrm.layout import shared as shared_module

    model = _family("llama", "causal_lm").float()
    assert packing.verify_sharing(model, "causal_lm")[0]
    real_share = shared_module.share

    def restart_positions(batch):
        row = real_share(batch)
        if isinstance(row, SharedPrefixBatch):
            for start, length, p in zip(row.starts, row.lengths, row.prefix_lengths):
                row.position_ids[0, start:start + length] -= p
        return row

    monkeypatch.setattr("fastrm.layout.modes.share", restart_positions)
    ok, why = packing.verify_sharing(model, "causal_lm")
    assert not ok and why.startswith("shared-prefix") and "differ from unshared" in why
    decision = packing.choose_packing(model, "auto", "causal_lm")
    assert decision.mode == "packed" and "no shared prompts" in decision.reason


def test_the_probe_refuses_a_shared_row_whose_responses_do_not_see_the_prompt(monkeypatch):
    model = _family("qwen2", "reward").float()
    real_plan = SharedPrefixBatch.plan
    monkeypatch.setattr(SharedPrefixBatch, "plan", lambda self: varlen.SharedPlan(
        self.starts, self.lengths, self.prefix_starts, [0] * len(self.lengths)))
    ok, why = packing.verify_sharing(model, "reward")
    assert not ok and "differ from unshared" in why
    monkeypatch.setattr(SharedPrefixBatch, "plan", real_plan)
    assert packing.verify_sharing(model, "reward")[0]


def test_unshared_setting_packs_without_sharing():
    model = _family("llama", "reward").float()
    assert packing.choose_packing(model, "unshared", "reward").mode == "packed"
    assert packing.choose_packing(model, "auto", "reward").mode == "shared"


# ---- rollouts: each prompt prefilled once ----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fastrm", "hf"])
@pytest.mark.parametrize("name", ["llama", "mistral", "gpt2"])
def test_generate_prefills_each_prompt_once_and_samples_as_before(name, engine, monkeypatch):
    """Same seed, same samples and sampler log-probs as a prefill of every sample's own copy of its prompt (left
    padding present): fastrm's loop against its per-row prefill, generate against its own."""
    from fastrm import generation
    from fastrm.tokenization import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    torch.manual_seed(0)
    model = _family(name, "causal_lm").float()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.generation_config.pad_token_id = model.generation_config.eos_token_id = None
    prompts = ["1+2=", "13+4*7=", "7+7="]
    prefills = []
    real = generation.shared_prefill
    monkeypatch.setattr(generation, "shared_prefill", lambda *a: prefills.append(a[1]["input_ids"].shape) or real(*a))
    torch.manual_seed(1)
    got = generation.generate(model, tokenizer, prompts, max_new_tokens=7, num_return_sequences=3,
                              return_logprobs=True, engine=engine)
    assert prefills == [(3, got["prompt_ids"].shape[1])]  # the three prompts, once each
    per_row = (lambda m, enc, copies: real(m, {k: v.repeat_interleave(copies, 0) for k, v in enc.items()}, 1))
    monkeypatch.setattr(generation, "shared_prefill", per_row if engine == "fastrm" else lambda *a: None)
    torch.manual_seed(1)
    want = generation.generate(model, tokenizer, prompts, max_new_tokens=7, num_return_sequences=3,
                               return_logprobs=True, engine=engine)
    assert (want["prompt_mask"] == 0).any()
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(got["sampler_logprobs"], want["sampler_logprobs"], rtol=0,
                               atol=64 * torch.finfo(torch.float32).eps)
