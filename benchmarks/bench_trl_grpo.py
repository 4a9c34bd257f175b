"""TRL's GRPOTrainer as TRL ships it vs the same trainer after ``fastrm.integrations.trl.patch()``.

    python benchmarks/bench_trl_grpo.py --quick             # CPU-sized: 8 completions x 32 tokens, V 32000
    python benchmarks/bench_trl_grpo.py --completion 256 --vocab 32000 --hidden 512

A Llama of ``--hidden`` width, 2 layers and a ``--vocab`` vocabulary (random weights, saved and loaded by TRL),
8 completions per step (4 prompts x 2 generations), SGD. Two parts per size:

* ``part=loss``: ``trainer.compute_loss`` on one fixed batch of completions, forward (``fwd``: the policy's and
  the reference's per-token log-probs and entropies through the fused LM head, the GRPO loss) and forward +
  backward (``fwd+bwd``), time and peak memory. This is what the patch changes.
* ``part=train_step``: one whole ``trainer.train()`` step (``fwd+bwd``): generation, rewards, the loss, its
  backward and the optimizer step, timed per step by a callback after a warm-up step.

Providers: ``trl`` (TRL's ``ChunkedLogProbFunction``; on CPU its torch fold over vocabulary tiles) and
``fastrm-<backend>`` (``fastrm.linear_logprobs``). Both are checked against float64 before they are timed: the
per-token log-probs of the batch and the gradients of the loss with respect to every parameter, against the
same trainer step computed in float64 with an eager ``log_softmax`` head. Providers are timed interleaved in
one process (loss calls alternate; one trainer's steps alternate, the patch switched between steps), so a
change of machine load hits them alike and their ratio holds on a shared machine. Needs TRL.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402

QUICK = {"completion": [32], "vocab": [32000]}
FULL = {"completion": [128, 512, 1024], "vocab": [32000, 128256]}
PROMPTS, GENERATIONS, LAYERS = 4, 2, 2
STEP_REPEATS = 3  # timed training steps per provider, after one warm-up step


def _has_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def save_model(path: Path, vocab: int, hidden: int, completion: int):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    # A word-level tokenizer over the whole vocabulary: any sampled id decodes, prompts encode.
    words = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", padding_side="left")
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=completion + 64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def make_trainer(path: Path, tokenizer, completion: int, out_dir: str, max_steps: int):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_list([{"prompt": " ".join(f"w{7 * i + j}" for j in range(8))} for i in range(PROMPTS)])
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=PROMPTS * GENERATIONS,
                      num_generations=GENERATIONS, max_completion_length=completion, max_steps=max_steps,
                      learning_rate=1e-3, optim="sgd", lr_scheduler_type="constant", beta=0.04, report_to=[],
                      logging_strategy="no", save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False,
                      seed=0, disable_tqdm=True)
    # No EOS in the completions: every sequence runs to max_completion_length, the same work in every step.
    args.generation_kwargs = {"min_new_tokens": completion}
    return GRPOTrainer(model=str(path), reward_funcs=length_reward, args=args, train_dataset=prompts,
                       processing_class=tokenizer)


class _StepTimer:
    """A TrainerCallback timing each optimizer step (generation included)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.samples_ms, self.cpu_ms, self._start, self.before_step = [], [], None, None

            def on_step_begin(self, args, state, control, **kwargs):
                if self.before_step is not None:
                    self.before_step(len(self.samples_ms))
                self._start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                self.samples_ms.append((time.perf_counter() - self._start[0]) * 1e3)
                self.cpu_ms.append((time.process_time() - self._start[1]) * 1e3)

        return Timer()


def capture_batch(trainer):
    """Run one training step and keep the inputs its compute_loss received (generated and scored by TRL)."""
    seen = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        if not seen:
            seen.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    trainer.compute_loss = original
    return seen[0]


class _EagerHead:
    """The fused head's call site computed the eager way (full logits, log_softmax): the float64 reference."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
        import fastrm

        lp, ent = fastrm.linear_logprobs_reference(hidden, weight * logit_scale, targets,
                                                   bias=None if bias is None else bias * logit_scale,
                                                   temperature=temperature, softcap=softcap, return_entropy=True)
        return lp, (ent if "entropy" in outputs else None), None, None, None


def loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def policy_logprobs(trainer, model, batch):
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, batch["completion_ids"].shape[1])
    return logps


def float64_reference(trainer, batch):
    """Per-token log-probs and parameter gradients of the batch's loss, in float64 with an eager head."""
    from trl.trainer import utils

    model64 = copy.deepcopy(trainer.model).double()
    batch64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    saved, utils._ChunkedLogProbFunction = utils._ChunkedLogProbFunction, _EagerHead
    refs = [trainer.ref_model]
    try:
        if trainer.ref_model is not None:
            trainer.ref_model = copy.deepcopy(trainer.ref_model).double()
        logps = policy_logprobs(trainer, model64, batch64)
        _, grads = loss_and_grads(trainer, model64, batch64)
    finally:
        utils._ChunkedLogProbFunction = saved
        trainer.ref_model = refs[0]
    return logps, grads


class _Providers:
    """Switch TRL between providers in one process: ``trl`` (unpatched) or ``fastrm-<backend>`` (patched)."""

    def __init__(self):
        import fastrm.integrations.trl as fastrm_trl

        self.trl, self.calls = fastrm_trl, {}

    def use(self, name: str):
        self.trl.unpatch()
        if name.startswith("fastrm"):
            report = self.trl.patch(backend=name.split("-", 1)[1])
            self.calls.setdefault(name, []).append(report)

    def served(self, name: str) -> tuple[int, int]:
        reports = self.calls.get(name, [])
        return (sum(r.calls["fused_lm_head"] for r in reports), sum(r.fallbacks["fused_lm_head"] for r in reports))


def _median(values):
    return common.percentile(sorted(values), 0.5) if values else None


def cpu_time_note(run):
    """The process CPU time (all threads) of each timed row, against trl's: on a CPU shared with other work,
    wall-clock medians swing with the load while CPU time measures the work itself."""
    base = {(r["completion"], r["vocab"], r["part"], r["mode"]): r["cpu_ms"] for r in run.rows
            if r["provider"] == "trl" and r.get("cpu_ms")}
    parts = []
    for r in run.rows:
        ref = base.get((r["completion"], r["vocab"], r["part"], r["mode"]))
        if r["provider"] != "trl" and r.get("cpu_ms") and ref:
            parts.append(f"{r['part']} {r['mode']} (completion {r['completion']}, V {r['vocab']}): {r['provider']} "
                         f"{r['cpu_ms']:.0f} ms vs trl {ref:.0f} ms, {ref / r['cpu_ms']:.2f}x")
    if parts:
        run.note("process CPU time, median: " + "; ".join(parts))


def bench_size(run, size: dict, providers: list[str], workdir: Path):
    """Check every provider against float64, then time them interleaved: the loss calls alternate between
    providers, and so do the training steps of one trainer, so a change of machine load hits all alike."""
    completion, vocab = size["completion"], size["vocab"]
    path = workdir / f"model_{completion}_{vocab}"
    tokenizer = save_model(path, vocab, run.args.hidden, completion)
    print(f"  completion={completion} vocab={vocab} hidden={run.args.hidden}")
    switch = _Providers()
    switch.use("trl")
    # One training step generates and scores a batch; its compute_loss inputs are kept and timed.
    trainer = make_trainer(path, tokenizer, completion, str(workdir / "out"), max_steps=1)
    batch = capture_batch(trainer)
    reference = float64_reference(trainer, batch)
    tol = common.TOLERANCE[torch.float32]
    base = {}
    for name in list(providers):
        switch.use(name)
        logps = policy_logprobs(trainer, trainer.model, batch)
        _, grads = loss_and_grads(trainer, trainer.model, batch)
        err = {"out": common.relative_error([(logps, reference[0])]),
               "grad": common.relative_error(zip(grads, reference[1]))}
        base[name] = {**size, "part": "loss", "dtype": "float32", "provider": name, "err_out": err["out"],
                      "err_grad": err["grad"], "tol": tol}
        if max(err.values()) > tol:
            for mode in run.args.modes:
                run.rows.append({**base[name], "mode": mode, "status": "wrong", "note": "disagrees with float64"})
            print(f"    {name:<16} REFUSED: disagrees with float64 ({err})")
            providers.remove(name)

    def setup():
        trainer.model.zero_grad(set_to_none=True)

    for mode in [m for m in run.args.modes if m in ("fwd", "fwd+bwd")]:
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    trainer.compute_loss(trainer.model, batch)
        else:
            def call():
                trainer.compute_loss(trainer.model, batch).backward()
        samples = {name: [] for name in providers}
        cpu = {name: [] for name in providers}
        for rep in range(1 + run.args.repeats):  # the first round warms up
            for name in providers[rep % len(providers):] + providers[:rep % len(providers)]:
                switch.use(name)
                setup()
                start, start_cpu = time.perf_counter(), time.process_time()
                call()
                if rep:
                    samples[name].append((time.perf_counter() - start) * 1e3)
                    cpu[name].append((time.process_time() - start_cpu) * 1e3)
        for name in providers:
            switch.use(name)
            t = common.summarize(samples[name])
            peak = common.peak_memory_mb(call, setup)
            run.rows.append({**base[name], "mode": mode, "status": "ok", **t, "peak_mb": peak,
                             "cpu_ms": _median(cpu[name])})
            print(f"    {name:<16} loss {mode:<8} {t['median_ms']:>10.1f} ms  peak {peak:.0f} MiB")

    # Whole training steps of one trainer, the provider switched before each step (untimed).
    timer = _StepTimer()
    steps = STEP_REPEATS * len(providers)
    stepper = make_trainer(path, tokenizer, completion, str(workdir / "out"), max_steps=1 + steps)
    order = [providers[0]] + [providers[i % len(providers)] for i in range(steps)]  # step 0 warms up
    timer.before_step = lambda step: switch.use(order[step])
    stepper.add_callback(timer)
    stepper.train()
    for name in providers:
        t = common.summarize([ms for ms, who in zip(timer.samples_ms[1:], order[1:]) if who == name])
        cpu_ms = _median([ms for ms, who in zip(timer.cpu_ms[1:], order[1:]) if who == name])
        run.rows.append({**base[name], "part": "train_step", "mode": "fwd+bwd", "status": "ok", **t, "peak_mb": None,
                         "cpu_ms": cpu_ms})
        print(f"    {name:<16} train step         {t['median_ms']:>10.1f} ms  ({t['n_samples']} steps)")
    switch.use("trl")
    for name in providers:
        if name != "trl":
            calls, fallbacks = switch.served(name)
            print(f"    {name}: fastrm served {calls} fused-head calls, {fallbacks} fallbacks")


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    common.add_size_options(parser, completion="completion lengths (tokens)", vocab="vocabulary sizes")
    parser.add_argument("--hidden", type=int, default=128, help="the model's hidden size (default 128)")
    args = parser.parse_args(argv)
    if not _has_trl():
        print("bench_trl_grpo: TRL is not installed (pip install trl): nothing to run")
        return 0
    args.modes = [m for m in args.modes if m != "bwd"] or ["fwd+bwd"]  # a loss step has no backward-only mode
    run = common.Run("trl_grpo", "TRL GRPOTrainer", args, baseline="trl", plot_x="completion", plot_panel="part",
                     default_dtype="float32")
    run.note("GRPOTrainer of TRL " + __import__("trl").__version__ + f": {PROMPTS} prompts x {GENERATIONS} "
             f"generations per step, a {LAYERS}-layer Llama of hidden {args.hidden}, SGD, beta 0.04; part=loss "
             "times compute_loss on one fixed batch, part=train_step whole training steps (generation included)")
    providers = ["trl"] + [f"fastrm-{b}" for b in common.fastrm_backends(run.device)]
    if args.providers:
        providers = [p for p in providers if any(w in p for w in args.providers)]
    with tempfile.TemporaryDirectory() as workdir:
        for size in common.sweep(args, QUICK, FULL):
            bench_size(run, size, providers, Path(workdir))
    cpu_time_note(run)
    return run.finish()


if __name__ == "__main__":
    common.run_script(main)
