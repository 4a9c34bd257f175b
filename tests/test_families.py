"""Every trainer on checkpoints of ten transformers model families (tests/families.py), each with its own tokenizer.

Per family: ``train-rm`` packed and padded, ``sft`` and one RL iteration, all through ``tokenizer=auto`` and
``attn_implementation=auto``. What is checked: the family's own special-token conventions in the tokenized data,
the attention implementation picked, whether batches are packed, and that what fastrm computed is what the saved
``output_dir/final`` computes when reloaded with the Auto classes, one sequence at a time (no padding): reward
scores, per-token log-probs, and the reward model's scores of RL rollouts."""

import json
import math
import re

import pytest
import torch
from families import BY_NAME, DECODERS, ENCODERS, FAMILIES, build_checkpoint, build_checkpoints

from fastrm import packing, tokenization
from fastrm.config import ConfigError, load_config
from fastrm.generation import decode_completions, generate
from fastrm.layout import PaddedBatch, collate_preference
from fastrm.models import reward_scores, token_logprobs
from fastrm.trainers.reward_model import RewardConfig, RewardTrainer
from fastrm.trainers.rl import RLConfig, RLTrainer
from fastrm.trainers.sft import SFTConfig, SFTTrainer

COMMON = ["tensorboard=false", "progress=false", "device=cpu", "log_steps=1", "backend=torch", "max_length=40",
          "max_steps=2", "eval_steps=2", "save_steps=2", "batch_size=4"]
# The first and last token of a reward-model sequence, and the last of an SFT sequence, in each family's convention.
EXPECTED_ENDS = {
    "llama": ("<s>", "</s>", "</s>"),
    "qwen2": (None, None, "<|endoftext|>"),  # no BOS; pad = EOS, so reward sequences end on their last text token
    "mistral": ("<s>", "</s>", "</s>"),
    "gpt_neox": (None, "<|endoftext|>", "<|endoftext|>"),
    "gpt2": (None, None, "<|endoftext|>"),
    "opt": ("</s>", "</s>", "</s>"),
    "gemma2": ("<bos>", "<eos>", "<eos>"),
    "bert": ("[CLS]", "[SEP]", None),
    "roberta": ("<s>", "</s>", None),
    "deberta_v2": ("[CLS]", "[SEP]", None),
}
SPECIAL = {"<s>", "</s>", "<|endoftext|>", "<bos>", "<eos>", "[CLS]", "[SEP]"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add synchronisation, and stall on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return build_checkpoints(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def reward_models(checkpoints, tmp_path_factory):
    """``get(name, packed)``: a reward trainer of that family after training (``packed=auto``, or ``false``: one
    padded batch), trained once per module."""
    trained = {}

    def get(name, packed=True):
        if (name, packed) not in trained:
            out = tmp_path_factory.mktemp(f"rm-{name}-{packed}")
            config = load_config(RewardConfig, None, COMMON + [
                f"model.name_or_path={checkpoints[name]}", f"output_dir={out}", f"packed={'auto' if packed else 'false'}",
                "num_train_pairs=16", "num_eval_pairs=6", "lr=1e-3"])
            trained[name, packed] = RewardTrainer(config).setup().train()
        return trained[name, packed]

    return get


def auto_reward_model(folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def scores_one_by_one(model, seqs):
    """The Hugging Face model's own score of each sequence alone: no padding, no mask, nothing of fastrm's."""
    return torch.stack([model(input_ids=torch.tensor([s])).logits[0, 0].float() for s in seqs])


def first_last(tokenizer, ids):
    first, last = tokenizer.convert_ids_to_tokens([ids[0], ids[-1]])
    return (first if first in SPECIAL else None), (last if last in SPECIAL else None)


# ---- reward models ------------------------------------------------------------------------------------------------

def auto_attention(model) -> str:
    """What attn_implementation=auto picks on a CPU: SDPA where the class supports it (Gemma-2 does in some
    transformers versions, not in others), else eager."""
    return "sdpa" if getattr(type(model), "_supports_sdpa", False) else "eager"


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_reward_model_scores_as_the_reloaded_auto_model(reward_models, name, packed):
    family = BY_NAME[name]
    trainer = reward_models(name, packed)
    # packed rows only where the probe proves them exact; else length buckets (logged); packed=false: padded
    assert trainer.packing.mode == ("padded" if not packed else "shared" if family.packs else "bucketed")
    assert packing.base_attention(trainer.model) == auto_attention(trainer.model)  # packed: fastrm's varlen over it
    assert type(trainer.model).__name__.endswith("ForSequenceClassification")
    rows = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r) and any("loss" in r for r in rows)

    model, tokenizer = auto_reward_model(trainer.final_model)
    assert type(model) is type(trainer.model) and model.config.pad_token_id == tokenizer.pad_token_id
    examples = trainer.eval_examples
    # the reloaded tokenizer reproduces the training data, laid out in the family's own convention
    again, _ = tokenization.tokenize_preference(trainer._load_rows()[1], tokenizer, trainer.config.max_length)
    assert again == examples
    first, last, _ = EXPECTED_ENDS[name]
    for ex in examples:
        assert first_last(tokenizer, ex["chosen_ids"]) == (first, last)
        assert first_last(tokenizer, ex["rejected_ids"]) == (first, last)

    trainer.model.eval()
    with torch.no_grad():
        ours = reward_scores(trainer.model, trainer.collate(examples).sequences)
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    theirs = scores_one_by_one(model, seqs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert theirs.std() > 0  # not a constant function, or equality would prove nothing


# ---- SFT -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DECODERS)
def test_sft_logprobs_are_the_reloaded_models(checkpoints, tmp_path, name):
    from transformers import AutoModelForCausalLM

    family = BY_NAME[name]
    trainer = SFTTrainer(load_config(SFTConfig, None, COMMON + [
        f"model.name_or_path={checkpoints[name]}", f"output_dir={tmp_path}", "num_train_examples=16",
        "num_eval_examples=4", "eval_generate=0", "lr=1e-3"])).setup().train()
    assert trainer.packing.mode == ("shared" if family.packs else "bucketed")
    assert packing.base_attention(trainer.model) == auto_attention(trainer.model)  # packed: fastrm's varlen over it
    assert trainer.model.fastrm_logits_from_head  # every family's log-probs fused from the hidden states
    assert trainer.model.fastrm_logit_softcap == (30.0 if name == "gemma2" else None)  # Gemma-2's cap, fused too
    eos = trainer.tokenizer.eos_token_id
    assert all(e["input_ids"][-1] == eos for e in trainer.eval_examples)  # SFT learns to stop, in every family

    model = AutoModelForCausalLM.from_pretrained(trainer.final_model).eval()
    examples = trainer.eval_examples
    trainer.model.eval()
    with torch.no_grad():
        batch = trainer.collate(examples)
        ours = token_logprobs(trainer.model, batch)
        for i, e in enumerate(examples):
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            labels = torch.tensor(e["labels"][1:])
            ref = torch.where(labels != -100, logp.gather(-1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
            mine = ours[i, :len(ids[0]) - 1]  # every layout's log-probs come back padded (right-padded rows)
            torch.testing.assert_close(mine.double(), ref, atol=1e-5, rtol=1e-5)


# ---- one RL iteration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_one_rl_iteration_scores_rollouts_as_the_reward_model(checkpoints, reward_models, tmp_path, name):
    """A decoder family is the policy (PPO with a critic copied from it) and its own reward model scores it; an
    encoder reward model scores a Llama policy (RLOO), re-tokenizing prompt and completion with its own tokenizer."""
    rm = reward_models(name, BY_NAME[name].packs)
    policy = name if name in DECODERS else "llama"
    trainer = RLTrainer(load_config(RLConfig, None, [
        "tensorboard=false", "progress=false", "device=cpu", "backend=torch", f"output_dir={tmp_path}",
        f"model.name_or_path={checkpoints[policy]}", f"reward_model_path={rm.final_model}", "reward=model",
        f"advantage={'gae' if name in DECODERS else 'rloo'}", "batch_size=2", "num_samples=2", "max_new_tokens=4", "num_train_prompts=4",
        "num_eval_prompts=0", "max_steps=1", "ppo_epochs=1", "lr=1e-3", "temperature=2.0"])).setup()
    assert trainer.reward_same_tokens == (name in DECODERS)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    assert (trainer.final_model / "config.json").is_file()

    rows = trainer.train_rows[:3]
    prompts = [r["prompt"] for r in rows]
    gen = generate(trainer.policy, trainer.tokenizer, prompts, max_new_tokens=4, temperature=2.0)
    completions = decode_completions(trainer.tokenizer, gen["completion_ids"], gen["completion_mask"])
    ours, _ = trainer.score(rows, gen, completions)
    model, tokenizer = auto_reward_model(rm.final_model)
    seqs = trainer._reward_inputs(prompts, gen, completions)
    first, last, _ = EXPECTED_ENDS[name]
    ended = (gen["completion_ids"] == trainer.tokenizer.eos_token_id).any(1).tolist()
    for seq, has_eos in zip(seqs, ended):
        assert first_last(tokenizer, seq)[0] == first
        if has_eos or name in ENCODERS:
            assert first_last(tokenizer, seq)[1] == last
    torch.testing.assert_close(ours, scores_one_by_one(model, seqs), atol=1e-5, rtol=1e-5)


# ---- settings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_ppo_past_a_learned_position_table_stops_at_start_naming_both_numbers(checkpoints, tmp_path, name):
    """128 learned positions, the default max_new_tokens=256: one line at setup, not an IndexError mid-run."""
    args = ["tensorboard=false", "progress=false", "device=cpu", "backend=torch", f"model.name_or_path={checkpoints[name]}",
            "reward=rule", "advantage=rloo", "num_train_prompts=4", "num_eval_prompts=2"]
    with pytest.raises(ConfigError, match=r"setting max_new_tokens=256: the longest prompt \((\d+) tokens\) \+ "
                                          r"max_new_tokens is \d+ tokens, .* learned positions for 128 tokens only") as err:
        RLTrainer(load_config(RLConfig, None, args + [f"output_dir={tmp_path / 'a'}"])).setup()
    assert "\n" not in str(err.value)
    longest = int(re.search(r"longest prompt \((\d+)", str(err.value)).group(1))
    # exactly at the table's end it runs
    RLTrainer(load_config(RLConfig, None, args + [f"output_dir={tmp_path / 'b'}", f"max_new_tokens={128 - longest}",
                                                  "max_steps=1", "batch_size=2", "num_samples=2"])).setup().train()


@pytest.mark.parametrize("name,config_class,trainer_class,size", [("gpt2", SFTConfig, SFTTrainer, "num_train_examples"),
                                                                  ("bert", RewardConfig, RewardTrainer, "num_train_pairs")])
def test_max_length_past_a_learned_position_table_stops_at_start(checkpoints, tmp_path, name, config_class,
                                                                  trainer_class, size):
    args = [f"output_dir={tmp_path}", f"model.name_or_path={checkpoints[name]}", "device=cpu", f"{size}=8"]
    with pytest.raises(ConfigError, match=r"setting max_length=1024: .* learned positions for 128 tokens only; "
                                          r"lower max_length \(at most 128\)"):
        trainer_class(load_config(config_class, None, args)).setup()



def test_a_tokenizer_larger_than_the_embedding_is_an_error_naming_both_sizes(checkpoints, tmp_path):
    import transformers as T

    small = tmp_path / "small"
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(small)
    with pytest.raises(ConfigError, match=r"has 303 token ids but the model model.name_or_path=.* has only 40 "
                                          r"embedding rows"):
        RewardTrainer(load_config(RewardConfig, None, COMMON + [
            f"model.name_or_path={small}", f"tokenizer={checkpoints['llama']}", f"output_dir={tmp_path / 'out'}",
            "num_train_pairs=8", "num_eval_pairs=2"])).setup()


def test_a_checkpoint_without_a_tokenizer_is_an_error_not_the_embedded_one(tmp_path):
    folder = build_checkpoint("gpt2", tmp_path / "gpt2")
    for f in folder.glob("*.json"):
        if f.name != "config.json":
            f.unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        tokenization.load_tokenizer("auto", str(folder))
    assert len(tokenization.load_tokenizer("auto", "tiny")) == 47  # the embedded one is the tiny model's alone


def test_requested_sdpa_on_a_family_without_it_names_the_class(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="DebertaV2ForSequenceClassification does not support PyTorch SDPA"):
        RewardTrainer(load_config(RewardConfig, None, COMMON + [
            f"model.name_or_path={checkpoints['deberta_v2']}", "model.attn_implementation=sdpa",
            f"output_dir={tmp_path}", "num_train_pairs=8", "num_eval_pairs=2"])).setup()


@pytest.mark.parametrize("name,match", [("bert", "no eos_token: a policy could never learn to end its answer"),
                                        ("roberta", "attends to later tokens .*SFT and RL need a causal decoder")])
def test_sft_on_an_encoder_says_why(checkpoints, tmp_path, name, match):
    with pytest.raises(ValueError, match=match):
        SFTTrainer(load_config(SFTConfig, None, COMMON + [
            f"model.name_or_path={checkpoints[name]}", f"output_dir={tmp_path}", "num_train_examples=4",
            "num_eval_examples=2"])).setup()


def test_packing_without_fastrm_attention_is_wrong_for_opt_and_the_probe_packs_it_exactly(checkpoints):
    """OPT builds its attention mask without the position ids: a packed row through its own forward (what
    transformers' padding-free collators give on SDPA) attends across sequences and changes the scores. fastrm's
    varlen attention does not rely on the model's mask: the probe finds OPT exact, and its packed scores are the
    padded ones."""
    from transformers import AutoModelForSequenceClassification

    rows = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)} for a, b in [(1, 2), (3, 4)]]
    for name in ("opt", "gpt2"):
        tokenizer = tokenization.load_tokenizer("auto", str(checkpoints[name]))
        model = AutoModelForSequenceClassification.from_pretrained(checkpoints[name], num_labels=1).eval()
        model.config.pad_token_id = tokenizer.pad_token_id
        examples, _ = tokenization.tokenize_preference(rows, tokenizer)
        packed_batch = collate_preference(examples, tokenizer.pad_token_id, "packed").sequences
        with torch.no_grad():
            padded = reward_scores(model, collate_preference(examples, tokenizer.pad_token_id).sequences)
            hidden = model.base_model(input_ids=packed_batch.input_ids, position_ids=packed_batch.position_ids,
                                      use_cache=False)
            own_packing = model.score(hidden.last_hidden_state[0, packed_batch.seq_ends]).squeeze(-1)
        assert torch.allclose(own_packing, padded, atol=1e-5, rtol=1e-5) == (name != "opt")
        assert packing.verify_packing(model, "reward")[0]
        with torch.no_grad():
            torch.testing.assert_close(reward_scores(model, packed_batch), padded, atol=1e-5, rtol=1e-5)


def test_the_head_probe_fuses_soft_capped_logits_and_refuses_scaled_ones():
    """Fused log-probs need logits = head output (or Gemma's cap of it): a model that scales its head output
    (Granite's logits_scaling) must take its log-probs from its logits, and a Gemma-2 without a cap needs none."""
    import transformers as T

    from fastrm.models import head_logits

    sizes = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    torch.manual_seed(0)
    assert head_logits(T.GraniteForCausalLM(T.GraniteConfig(logits_scaling=2.0, **sizes))) == (False, None)
    assert head_logits(T.GraniteForCausalLM(T.GraniteConfig(logits_scaling=1.0, **sizes))) == (True, None)
    assert head_logits(T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, **sizes))) == (True, 30.0)
    assert head_logits(T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, final_logit_softcapping=None,
                                                          **sizes))) == (True, None)
    gemma = T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **sizes))
    with torch.no_grad():
        gemma.lm_head.weight.mul_(100)  # logits of several caps, where the cap matters (random init: ~0.01)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        logits = gemma(input_ids=ids).logits
        ours = token_logprobs(gemma, PaddedBatch(ids, torch.ones_like(ids), ids))
        gemma.fastrm_logits_from_head, gemma.fastrm_logit_softcap = head_logits(gemma)
        fused = token_logprobs(gemma, PaddedBatch(ids, torch.ones_like(ids), ids))
    truth = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert gemma.fastrm_logit_softcap == 5.0
    torch.testing.assert_close(fused.double(), truth, rtol=0, atol=1e-5)
    assert (ours.double() - truth).abs().max() > 1e-3  # without the cap the fused log-probs would be wrong
