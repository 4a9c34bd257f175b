"""LoRA / QLoRA (peft) in every trainer, on checkpoints of transformers families (tests/families.py).

What is checked: only the adapters (and a reward model's head, whole) train; what fastrm computes equals what the
saved adapter computes when loaded with peft's Auto classes, and what the merged checkpoint of ``fastrm export``
computes when loaded with transformers alone; in RL the reference is the policy with its adapters disabled and a
critic from the policy shares its frozen weights (no copy of either); resume is bitwise; quantized base weights
(bitsandbytes, CUDA only for users) are refused on CPU and their plumbing runs on CPU here with the check lifted;
DDP on two gloo processes equals one process."""

import json

import pytest
import torch
from families import build_checkpoints
from test_distributed import use_sgd  # noqa: F401 (a fixture: SGD in this process, as the torchrun workers use)
from test_families import one_thread, scores_one_by_one  # noqa: F401 (one_thread: an autouse fixture)
from test_rl import answer_length

from fastrm import lora
from fastrm.cli import run_command
from fastrm.config import ConfigError, load_config
from fastrm.models import reward_scores, token_logprobs
from fastrm.trainers.reward_model import RewardConfig, RewardTrainer
from fastrm.trainers.rl import RLConfig, RLTrainer
from fastrm.trainers.sft import SFTConfig, SFTTrainer

peft = pytest.importorskip("peft")

COMMON = ["tensorboard=false", "progress=false", "device=cpu", "log_steps=1", "backend=torch", "max_length=40",
          "max_steps=2", "eval_steps=2", "save_steps=2", "batch_size=4", "lr=1e-2", "warmup_ratio=0", "lora.r=4"]
RL = ["tensorboard=false", "progress=false", "device=cpu", "backend=torch", "batch_size=2", "num_samples=2",
      "max_new_tokens=4", "num_train_prompts=8", "num_eval_prompts=0", "ppo_epochs=1", "lr=1e-2", "temperature=2.0",
      "lora.r=4", "save_steps=1000"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return build_checkpoints(tmp_path_factory.mktemp("families"), ["llama", "gpt2", "bert"])


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_only_trained_changed(before, model):
    """Frozen parameters bitwise as they were; every trained one registered, and some of them moved."""
    trained = set(lora.trained_names(model))
    assert trained and all(("lora_" in n) or ("modules_to_save" in n) or n.startswith("head.") for n in trained)
    for name, p in model.named_parameters():
        if name not in trained:
            assert torch.equal(before[name], p), name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in trained)


@pytest.fixture(scope="module")
def reward_runs(checkpoints, tmp_path_factory):
    """``get(name)``: a LoRA reward trainer of that family after 2 steps, and its parameters before them."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"rm-{name}")
            trainer = RewardTrainer(load_config(RewardConfig, None, COMMON + [
                f"model.name_or_path={checkpoints[name]}", f"output_dir={out}", "num_train_pairs=16",
                "num_eval_pairs=6"])).setup()
            before = snapshot(trainer.model)
            runs[name] = trainer.train(), before
        return runs[name]

    return get


# ---- reward models --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,heads", [("llama", {"score"}), ("bert", {"classifier", "bert.pooler.dense"})])
def test_reward_lora_saves_an_adapter_that_peft_and_the_merged_export_score_alike(reward_runs, tmp_path, name, heads):
    from transformers import AutoModelForSequenceClassification

    trainer, before = reward_runs(name)
    assert lora.is_peft(trainer.model) and trainer.packing.mode == ("shared" if name == "llama" else "bucketed")
    assert_only_trained_changed(before, trainer.model)
    trained_heads = {n.split(".modules_to_save")[0] for n in lora.trained_names(trainer.model)
                     if "modules_to_save" in n}
    assert trained_heads == {f"base_model.model.{h}" for h in heads}  # the new head, whole; no adapters in it
    final = trainer.final_model
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    examples = trainer.eval_examples
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    trainer.model.eval()
    with torch.no_grad():
        ours = reward_scores(trainer.model, trainer.collate(examples).sequences)
    pad = trainer.tokenizer.pad_token_id
    adapter = peft.AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1,
                                                                          pad_token_id=pad).eval()
    torch.testing.assert_close(ours, scores_one_by_one(adapter, seqs), atol=1e-5, rtol=1e-5)
    assert ours.std() > 0

    assert run_command(["export", str(final), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(lora.unwrap(trainer.model)) and merged.config.pad_token_id == pad
    torch.testing.assert_close(ours, scores_one_by_one(merged, seqs), atol=1e-5, rtol=1e-5)


# ---- SFT -----------------------------------------------------------------------------------------------------------

def logprobs_one_by_one(model, examples):
    out = []
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].double(), -1)
            labels = torch.tensor(e["labels"][1:])
            out.append(torch.where(labels != -100, logp.gather(-1, labels.clamp_min(0)[:, None])[:, 0], 0.0))
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])  # rotary + nn.Linear; learned positions + Conv1D projections
def test_sft_lora_logprobs_equal_the_peft_reload_and_the_merged_export(checkpoints, tmp_path, name):
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(load_config(SFTConfig, None, COMMON + [
        f"model.name_or_path={checkpoints[name]}", f"output_dir={tmp_path / 'run'}", "num_train_examples=16",
        "num_eval_examples=3", "eval_generate=0"]))
    trainer.setup()
    before = snapshot(trainer.model)
    trainer.train()
    assert_only_trained_changed(before, trainer.model)
    examples = trainer.eval_examples
    trainer.model.eval()
    with torch.no_grad():
        ours = token_logprobs(trainer.model, trainer.collate(examples))
    mine = []
    for i, e in enumerate(examples):
        n = len(e["input_ids"]) - 1
        mine.append(ours[i, :n].double())  # every layout's log-probs come back padded (right-padded rows)

    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(trainer.final_model).eval()
    assert run_command(["export", str(trainer.final_model), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for reloaded in (adapter, merged):
        for got, want in zip(mine, logprobs_one_by_one(reloaded, examples)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- RL ------------------------------------------------------------------------------------------------------------

def test_rl_reference_is_the_policy_without_adapters_and_the_critic_shares_its_weights(checkpoints, reward_runs,
                                                                                      tmp_path):
    """A Llama policy with LoRA and a critic (PPO, GAE), scored by the BERT reward model's LoRA adapter folder (its
    base loaded, the adapter merged in, re-tokenized with BERT's own tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rm, _ = reward_runs("bert")
    trainer = RLTrainer(load_config(RLConfig, None, RL + [
        f"output_dir={tmp_path}", f"model.name_or_path={checkpoints['llama']}", "reward=model",
        f"reward_model_path={rm.final_model}", "advantage=gae", "max_steps=1"])).setup()
    assert trainer.ref is None and lora.is_peft(trainer.policy)
    # the critic's frozen tensors are the policy's own; it adds only its adapters and head
    policy = {p.data_ptr() for p in trainer.policy.parameters() if not p.requires_grad}
    critic = [p for p in trainer.value.parameters() if not p.requires_grad]
    assert critic and all(p.data_ptr() in policy for p in critic)
    trained = sum(p.numel() * p.element_size() for p in trainer.value.parameters() if p.requires_grad)
    assert trainer.model_bytes() == lora.memory_bytes(trainer.policy) + trained + \
        lora.memory_bytes(trainer.reward_model)
    before = snapshot(trainer.policy)
    trainer.train()
    assert_only_trained_changed(before, trainer.policy)

    # the reference log-probs are the initial model's, the policy's have moved away from them
    ro = trainer.rollout(trainer.train_rows[:2])
    base = AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).eval()
    with torch.no_grad():
        ref = token_logprobs(base, ro.batch, temperature=2.0)[:, ro.prompt_len - 1:]
    mask = ro.mask.bool()
    torch.testing.assert_close(ro.ref_logprobs[mask], ref[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ro.old_logprobs[mask], ref[mask], atol=1e-3)
    # the rollouts' scores are the BERT adapter's, loaded with peft on its base
    adapter = peft.AutoPeftModelForSequenceClassification.from_pretrained(
        rm.final_model, num_labels=1, pad_token_id=trainer.reward_tokenizer.pad_token_id).eval()
    rows = [{"prompt": p} for p in ro.prompts]
    seqs = trainer._reward_inputs(ro.prompts, _gen_of(ro), ro.completions)
    torch.testing.assert_close(trainer.model_scores(rows, _gen_of(ro), ro.completions),
                               scores_one_by_one(adapter, seqs), atol=1e-5, rtol=1e-5)


def _gen_of(ro):
    """The generate() output a rollout came from."""
    p = ro.prompt_len
    return {"prompt_ids": ro.batch.input_ids[:, :p], "prompt_mask": ro.batch.attention_mask[:, :p],
            "completion_ids": ro.batch.input_ids[:, p:], "completion_mask": ro.mask}


# ---- resume --------------------------------------------------------------------------------------------------------

def _reward(checkpoints, out, *extra):
    return RewardTrainer(load_config(RewardConfig, None, COMMON + [
        f"model.name_or_path={checkpoints['llama']}", f"output_dir={out}", "num_train_pairs=16", "num_eval_pairs=4",
        "save_steps=1", *extra])).setup()


def _rl(checkpoints, out, *extra):
    return RLTrainer(load_config(RLConfig, None, RL + [
        f"output_dir={out}", f"model.name_or_path={checkpoints['llama']}", "reward=rule", "advantage=gae",
        "save_steps=1", "seed=3", *extra]), reward_fn=answer_length).setup()


@pytest.mark.parametrize("make", [_reward, _rl], ids=["train-rm", "ppo"])
def test_lora_resume_is_bitwise(checkpoints, tmp_path, make):
    """2 steps straight equal 1 step, then a resumed run's second step, bit for bit: adapters, trained head, critic
    (its adapters and head), optimizer states, and the LoRA dropout's random stream."""
    straight = make(checkpoints, tmp_path / "a", "max_steps=2").train()
    make(checkpoints, tmp_path / "b", "max_steps=1").train()
    resumed = make(checkpoints, tmp_path / "b", "max_steps=2", "resume=true")
    assert resumed.step == 1
    resumed.train()
    models = ["model"] if make is _reward else ["policy", "value"]
    for attr in models:
        a, b = snapshot(getattr(straight, attr)), snapshot(getattr(resumed, attr))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    checkpoint = tmp_path / "b" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="cannot change within a run .*lora.r 4 -> 8"):
        make(checkpoints, tmp_path / "b", "max_steps=3", "resume=true", "lora.r=8")


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(checkpoints):
    """Frozen weights, checkpointed blocks: the adapters still get their gradients (the inputs of the checkpointed
    blocks require grad), equal to those without checkpointing."""
    from fastrm.layout import PaddedBatch
    from fastrm.models import ModelConfig, load_causal_lm
    from fastrm.tokenization import load_tokenizer

    tokenizer = load_tokenizer("auto", str(checkpoints["llama"]))
    settings = load_config(SFTConfig, None, [f"model.name_or_path={checkpoints['llama']}", "lora.r=4",
                                             "lora.dropout=0"]).lora
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = PaddedBatch(ids, torch.ones_like(ids), ids)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation
        model = load_causal_lm(ModelConfig(name_or_path=str(checkpoints["llama"]),
                                           gradient_checkpointing=checkpointing), tokenizer, torch.device("cpu"))
        model = lora.add_adapters(model, settings, "causal")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would leave A without gradient
        model.train()
        token_logprobs(model, batch).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- quantized base weights (QLoRA) --------------------------------------------------------------------------------

@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_quantized_base_is_refused_on_cpu_naming_the_setting(checkpoints, tmp_path, quantize):
    with pytest.raises(ConfigError, match=f"setting lora.quantize='{quantize}': quantized .* need a CUDA device"):
        SFTTrainer(load_config(SFTConfig, None, COMMON + [
            f"model.name_or_path={checkpoints['llama']}", f"output_dir={tmp_path}", f"lora.quantize={quantize}",
            "num_train_examples=4", "num_eval_examples=2"])).setup()


def skip_unless_bnb_cpu_4bit_works(checkpoint):
    """bitsandbytes' CPU 4-bit path is its own fallback, not fastrm's, and changes between releases (0.50.2 fails
    inside it on AVX512-BF16 CPUs: "shape '[32, 0]' is invalid"): try it alone on the model's own layer shapes, as
    QLoRA sets it up (NF4, double quantization, bf16 compute; one token as in generate, and a batch), and skip
    with its error when it fails there."""
    import bitsandbytes as bnb
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    try:
        for n_in, n_out in sorted(shapes):
            layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                      compress_statistics=True).to("cpu")
            for shape in [(1, 1, n_in), (2, 5, n_in)]:
                x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
                layer(x).float().sum().backward()
        # and the whole checkpoint loaded in 4 bits, one inference forward (on AVX512-BF16 CPUs bitsandbytes 0.50.2
        # passes the lone layers above but fails inside the model's forward, with kernels' hub layers in place)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint, **lora.quantization_kwargs("4bit", torch.device("cpu")))
        with torch.no_grad():
            quantized(input_ids=torch.tensor([[1, 2, 3, 4]]))
    except Exception as err:  # noqa: BLE001 (whatever the library raises is the reason to skip)
        pytest.skip(f"bitsandbytes {bnb.__version__}'s CPU 4-bit path fails on its own ({type(err).__name__}: "
                    f"{(str(err).splitlines() or [''])[0]}); lora.quantize=4bit runs on CUDA only")


def test_qlora_plumbing_runs_with_the_cuda_check_lifted(checkpoints, reward_runs, tmp_path, monkeypatch):
    """What lora.quantize=4bit does on CUDA, run here on bitsandbytes' CPU kernels: NF4 base weights, adapters on
    them, the reference by disabling them, the critic over the same quantized tensors, an adapter saved."""
    import bitsandbytes as bnb

    monkeypatch.setattr(lora, "check_quantization_device", lambda quantize, device: None)
    skip_unless_bnb_cpu_4bit_works(checkpoints["llama"])
    trainer = RLTrainer(load_config(RLConfig, None, RL + [
        f"output_dir={tmp_path}", f"model.name_or_path={checkpoints['llama']}", "reward=rule", "advantage=gae",
        "lora.quantize=4bit", "max_steps=1"]), reward_fn=answer_length).setup()
    quantized = [m for m in trainer.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized)
    policy = {p.data_ptr() for p in trainer.policy.parameters() if not p.requires_grad}
    assert all(p.data_ptr() in policy for p in trainer.value.parameters() if not p.requires_grad)
    before = snapshot(trainer.policy)
    trainer.train()
    assert_only_trained_changed(before, trainer.policy)
    assert (trainer.final_model / "adapter_model.safetensors").is_file()
    # an adapter folder cannot be merged into quantized weights: the message says to export it first
    with pytest.raises(ConfigError, match="fastrm export"):
        RLTrainer(load_config(RLConfig, None, RL + [
            f"output_dir={tmp_path / 'again'}", f"model.name_or_path={trainer.final_model}", "reward=rule",
            "advantage=rloo", "lora.quantize=4bit"]), reward_fn=answer_length).setup()


@pytest.mark.parametrize("overrides,match", [
    (["lora.r=4", "model.name_or_path=tiny"], "setting lora.r=4: LoRA adapts a pretrained checkpoint"),
    (["lora.quantize=4bit"], r"setting lora.quantize='4bit': needs lora.r > 0"),
    (["lora.r=4", "lora.quantize=4bit", "distributed=fsdp"], "setting lora.quantize='4bit': .* cannot be sharded"),
    (["lora.r=4", "ref_8bit=true"], "setting ref_8bit=True: with lora.r > 0 the reference is the policy"),
    (["lora.r=4", "lora.target_modules=[]"], "setting lora.target_modules=\\[\\]"),
    (["lora.r=4", "lora.dropout=1.5"], "setting lora.dropout=1.5"),
])
def test_bad_lora_settings_name_the_setting(checkpoints, overrides, match):
    args = ["reward=rule", f"model.name_or_path={checkpoints['llama']}", *overrides]
    with pytest.raises(ConfigError, match=match):
        load_config(RLConfig, None, args)


def test_target_modules_that_match_nothing_name_the_setting(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="setting lora.target_modules=\\['nonexistent_proj'\\]"):
        SFTTrainer(load_config(SFTConfig, None, COMMON + [
            f"model.name_or_path={checkpoints['llama']}", f"output_dir={tmp_path}",
            "lora.target_modules=[nonexistent_proj]",
            "num_train_examples=4", "num_eval_examples=2"])).setup()


def test_export_refuses_a_folder_without_an_adapter(checkpoints, tmp_path, capsys):
    assert run_command(["export", str(checkpoints["llama"]), str(tmp_path / "out")]) == 2
    assert "holds no LoRA adapter (adapter_config.json)" in capsys.readouterr().err


# ---- torchrun: DDP and FSDP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_update_with_lora_on_two_ranks_equals_one_process(checkpoints, tmp_path, use_sgd, mode):
    """One PPO update of a saved rollout (LoRA policy, LoRA critic, the reference by disabling the adapters), each of
    2 gloo ranks holding half its rows: adapters and critic end where one process updating on all rows ends (SGD on
    both sides, compared as tests/test_distributed.py compares updates)."""
    from safetensors.torch import load_file
    from test_distributed import TESTS, assert_same_update, save_rollout, torchrun

    from fastrm.checkpoint import load_trainer_state

    args = [a for a in RL if not a.startswith("lora.")] + [
        f"model.name_or_path={checkpoints['llama']}", "advantage=gae", "reward=rule",
        "reward_fn=rl_update_worker:answer_length", "ppo_epochs=2", "mixed_precision=no",
        "kl_in=loss", "kl_coef=0.1", "seed=3", "lora.r=4", "lora.dropout=0"]  # no dropout: ranks draw apart
    one = RLTrainer(load_config(RLConfig, None, args + [f"output_dir={tmp_path / 'one'}"]),
                    reward_fn=answer_length).setup()
    ro = one.rollout(one.train_rows[:2])  # 4 rows: 2 per rank
    save_rollout(ro, tmp_path / "rollout.pt")

    def adapters():
        return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(one.policy).items()}

    def critic():
        return {k: v.detach().clone() for k, v in one.value.named_parameters() if v.requires_grad}

    start_adapters, start_critic = adapters(), critic()
    one.update(ro)

    torchrun(str(TESTS / "rl_update_worker.py"), [str(tmp_path / "rollout.pt"), *args, f"distributed={mode}",
                                                   f"output_dir={tmp_path / 'two'}"])
    checkpoint = tmp_path / "two" / "checkpoint-1"
    assert_same_update(load_file(str(checkpoint / "adapter_model.safetensors")), adapters(), start_adapters, steps=2)
    assert_same_update(load_trainer_state(checkpoint)["value_model"], critic(), start_critic, steps=2)
