"""Padding-free batches: one reward-model or SFT training step (forward + backward), padded vs packed vs bucketed.

    python benchmarks/bench_packing.py --quick                  # CPU: tiny Llama, 64 pairs / 64 examples
    python benchmarks/bench_packing.py --task reward --lengths longtail --rounds 20
    python benchmarks/bench_packing.py --full                   # CUDA: a wider Llama, 512-token sequences
    python benchmarks/bench_packing.py --families               # which transformers families pack, and why not

The same tiny Llama (fastrm's ``tiny`` shape by default: hidden 64, 2 layers, 4 heads), the same sequences, five
ways to run them:

``padded`` (the baseline)
    one right-padded batch through the Hugging Face forward (reward: the sequence-classification head;
    SFT: backbone + ``fastrm.linear_logprobs``).
``packed``
    fastrm's packed row (``fastrm.layout.collate_*(..., "packed")``) with variable-length attention
    (``fastrm.layout.varlen``: flash-attn / torch varlen on CUDA, the model's SDPA per length bucket otherwise).
``bucketed``
    the padded batch run as length-bucketed padded micro-batches (``fastrm.layout.bucket``).
``packed-sdpa-mask``
    the same packed row through plain SDPA: transformers builds a ``[S, S]`` block-diagonal mask from the
    position ids. This is what ``DataCollatorWithFlattening`` / TRL's ``padding_free`` give without flash-attn,
    and what fastrm did before ``fastrm.packing``; run only where the mask fits (``--max-mask-tokens``).
``trl-padding-free`` (SFT, when TRL is installed)
    TRL's ``DataCollatorForLanguageModeling(padding_free=True)`` batch on the same model and SDPA.

Lengths (``L`` = ``--long``, 128 by default): ``short`` uniform in [L/8, L/4]; ``long`` all L; ``longtail`` 95 %
uniform in [L/8, L/2] and 5 % in [3.75 L, 4 L] (most short, a few near 500 for L = 128). A reward batch is
``--batch`` pairs (2 x batch sequences), an SFT batch ``--batch`` examples with the loss on the second half.

Every provider's scores (per-sequence log-prob sums for SFT) and its gradients with respect to every parameter
must agree with the padded forward in float64 before it is timed. Weights are float32; ``--dtype bfloat16`` (the
CUDA default) runs every provider under bf16 autocast, as the trainers do on CUDA. On a shared CPU, wall-clock times drift
with other processes' load, so the providers of a size are timed **interleaved**: ``--rounds`` rounds, each
provider once per round in a shuffled order; each round gives one paired ratio to ``padded`` and the JSON
keeps every sample, the median paired ratio (``paired_ratio``) and the load; ``--threads 1 --clock cpu`` times
each step by the process's CPU time instead of the wall clock, which other processes' load leaves out. Peak
memory: the harness's one-call RSS high-water mark (CPU) or allocator peak (CUDA).
"""

from __future__ import annotations

import copy
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from benchmarks.common import Case, Provider  # noqa: E402

from fastrm import layout, packing  # noqa: E402
from fastrm.layout import IGNORE_INDEX  # noqa: E402
from fastrm.models import backbone_hidden, reward_scores, token_logprobs  # noqa: E402

LENGTHS = ("short", "long", "longtail")
QUICK = {"task": ["reward", "sft"], "lengths": list(LENGTHS), "batch": [64]}
FULL = {"task": ["reward", "sft"], "lengths": list(LENGTHS), "batch": [64]}
MODEL = {"quick": {"hidden": 64, "layers": 2, "heads": 4, "long": 128},
         "full": {"hidden": 512, "layers": 4, "heads": 8, "long": 512}}
VOCAB, PAD, EOS = 64, 0, 2
PADDED = "padded"


def sequence_lengths(kind: str, n: int, long: int, seed: int) -> list[int]:
    rng = random.Random(f"bench_packing:{kind}:{n}:{long}:{seed}")
    if kind == "short":
        return [rng.randint(long // 8, long // 4) for _ in range(n)]
    if kind == "long":
        return [long] * n
    if kind == "longtail":
        return [rng.randint(long * 15 // 4, long * 4) if rng.random() < 0.05 else rng.randint(long // 8, long // 2)
                for _ in range(n)]
    raise ValueError(f"unknown lengths {kind!r}: choose from {', '.join(LENGTHS)}")


def build_model(task: str, shape: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=4 * shape["long"] + 8,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, num_labels=1, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = (LlamaForSequenceClassification if task == "reward" else LlamaForCausalLM)(config).to(device)
    return model.train()  # dropout is 0 in this config: train mode only switches on what training would


class Step(nn.Module):
    """``fn(model, batch)`` as a module, so ``torch.func.functional_call`` can run it on any parameters."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def _sequence_sums(per_token: torch.Tensor, cu_seq_lens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of a packed row's next-token values ``[1, S-1]``."""
    values = torch.cat([per_token[0], per_token.new_zeros(1)])
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    sequence = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    return values.new_zeros(len(lengths)).index_add(0, sequence, values)


def reward_step(model, batch):
    return reward_scores(model, batch)


def packed_reward_sdpa_mask(model, batch):
    """Today's padding-free recipe without flash-attn: the packed row through plain SDPA (a [S, S] mask)."""
    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    return model.score(hidden.last_hidden_state[0, batch.seq_ends]).squeeze(-1).float()


def sft_step(model, batch):
    return token_logprobs(model, batch, backend="torch").sum(1)  # every layout's log-probs come back padded


def packed_sft_sdpa_mask(model, batch):
    import fastrm

    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    head = model.get_output_embeddings()
    logprobs = fastrm.linear_logprobs(hidden.last_hidden_state[:, :-1], head.weight, batch.labels[:, 1:],
                                      backend="torch")
    return _sequence_sums(logprobs, batch.cu_seq_lens)


def padded_reference(task: str):
    """The float64 truth: the padded Hugging Face forward, log-softmax in full for SFT."""
    def reward(model, batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1)

    def sft(model, batch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        labels = batch.labels[:, 1:]
        logprobs = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (logprobs * (labels != IGNORE_INDEX)).sum(1)

    return reward if task == "reward" else sft


def _trl_collator():
    """TRL's padding-free SFT collator, or None (TRL not installed, or an API this script does not know)."""
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    except ImportError:
        return None
    try:
        return DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    except TypeError:
        return None


def make_examples(task: str, lengths: list[int], seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist() + [EOS] for n in lengths]
    if task == "reward":
        half = len(seqs) // 2
        return [{"chosen_ids": c, "rejected_ids": r, "prompt_len": 1} for c, r in zip(seqs[:half], seqs[half:])]
    return [{"input_ids": s, "labels": [IGNORE_INDEX] * (len(s) // 2) + s[len(s) // 2:], "prompt_len": len(s) // 2}
            for s in seqs]


class Bench:
    """One size: the model, its batches in every layout, and the providers."""

    def __init__(self, size: dict, shape: dict, device: str, max_mask_tokens: int, run: common.Run):
        self.autocast = run.dtype if run.dtype != torch.float32 else None  # bf16 / fp16: autocast, as training
        task, n = size["task"], size["batch"] * (2 if size["task"] == "reward" else 1)
        self.lengths = sequence_lengths(size["lengths"], n, shape["long"], seed=0)
        examples = make_examples(task, self.lengths, seed=1)
        self.model = build_model(task, shape, device)
        self.plain = copy.deepcopy(self.model)  # keeps plain SDPA for the [S, S]-mask providers
        exact, why = packing.verify_packing(self.model, "reward" if task == "reward" else "causal_lm",
                                            autocast_dtype=self.autocast)
        if not exact:
            raise RuntimeError(f"packing is not exact for the benchmark model: {why}")
        if task == "reward":
            collate = lambda mode: layout.collate_preference(examples, PAD, mode, device).sequences  # noqa: E731
        else:
            collate = lambda mode: layout.collate_sft(examples, PAD, mode, device)  # noqa: E731
        padded, packed = collate(PADDED), collate("packed")
        self.batches = {PADDED: padded, "packed": packed, "bucketed": layout.bucket(padded)}
        tokens = padded.num_tokens
        self.extra = {"tokens": tokens, "padded_tokens": int(padded.attention_mask.numel()),
                      "buckets": len(self.batches["bucketed"].buckets)}
        step = reward_step if task == "reward" else sft_step
        sdpa_mask = packed_reward_sdpa_mask if task == "reward" else packed_sft_sdpa_mask
        self.names = [n for n, _ in self.model.named_parameters()]
        self.providers = [self._provider(name, self.model, step, self.batches[name])
                          for name in (PADDED, "packed", "bucketed")]
        if tokens <= max_mask_tokens:
            self.providers.append(self._provider("packed-sdpa-mask", self.plain, sdpa_mask, packed))
        else:
            run.note(f"packed-sdpa-mask skipped where the packed row has more than {max_mask_tokens} tokens "
                     f"(--max-mask-tokens): its [S, S] attention scores alone are 4 S^2 bytes per head and layer")
        collator = _trl_collator() if task == "sft" else None
        if collator is not None and tokens <= max_mask_tokens:
            trl_batch = collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
            trl_batch = SimpleNamespace(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                           for k, v in trl_batch.items()}, cu_seq_lens=packed.cu_seq_lens)
            self.providers.append(self._provider("trl-padding-free", self.plain, packed_sft_sdpa_mask, trl_batch))
        elif task == "sft" and collator is None:
            run.note("trl-padding-free skipped: TRL is not installed (pip install trl)")
        self.reference = Step(copy.deepcopy(self.plain), padded_reference(task))
        self.reference_batch = padded

    def _provider(self, name, model, fn, batch) -> Provider:
        step = Step(model, fn)

        def run(*params):
            with torch.autocast(params[0].device.type, dtype=self.autocast, enabled=self.autocast is not None):
                return torch.func.functional_call(step, {f"model.{k}": p for k, p in zip(self.names, params)},
                                                  (batch,))

        return Provider(name, run, modes=("fwd+bwd",))

    def case(self, size: dict) -> Case:
        params = tuple(p.detach() for p in self.model.parameters())

        def reference(*params64):
            return torch.func.functional_call(self.reference, {f"model.{k}": p for k, p in zip(self.names, params64)},
                                              (self.reference_batch,))

        gen = torch.Generator().manual_seed(2)
        weights = torch.randn(len(self.lengths), generator=gen).to(params[0].device)
        grad_inputs = tuple(range(len(params)))
        if params[0].device.type == "cpu":
            self.reference.double()
            return common.autograd_case(size, reference, params, grad_inputs=grad_inputs, grad_outputs=(weights,),
                                        extra=self.extra)
        # On a GPU the float64 padded forward of a long-tailed batch (math attention, [N, heads, T, T] scores)
        # does not fit: the truth is the float32 padded forward there (bf16 runs are judged at bf16 tolerance).
        truth = {}

        def check(outs, grads):
            if not truth:
                leaves = [p.detach().clone().requires_grad_(True) for p in params]
                out = reference(*leaves)
                truth["out"], truth["grad"] = [out.detach()], list(torch.autograd.grad(out, leaves, weights))
            err = {"out": common.relative_error(zip(outs, truth["out"]))}
            if grads is not None:
                err["grad"] = common.relative_error(zip(grads, truth["grad"]))
            return err

        return Case(size=size, inputs=params, grad_inputs=grad_inputs, grad_outputs=(weights,), check=check,
                    extra=self.extra)


class InterleavedRun(common.Run):
    """The harness's run, with the providers of a size timed interleaved (see the module docstring)."""

    def bench(self, case: Case, providers: list[Provider]):
        print(f"  {common._size_text(case.size)}  tokens={case.extra['tokens']} "
              f"padded={case.extra['padded_tokens']} buckets={case.extra['buckets']}")
        tol = common.TOLERANCE[self.dtype]
        calls, errors = {}, {}
        for provider in self.select(providers):
            try:
                err = self.check(case, provider, need_grad=True)
            except Exception as exc:  # noqa: BLE001 - one provider failing must not stop the others
                self._failed(case, provider, ["fwd+bwd"], exc)
                continue
            worst = max(v for v in err.values() if v is not None)
            if not worst <= tol:
                self._row(case, provider, "fwd+bwd", "wrong", err_out=err["out"], err_grad=err.get("grad"), tol=tol,
                          note="disagrees with float64: refused, not timed")
                print(f"    {provider.name:<20} REFUSED: disagrees with float64 by {worst:.3g} (tolerance {tol:g})")
                continue
            calls[provider.name], errors[provider.name] = self._mode_call(case, provider, "fwd+bwd")[0], err
        samples = {name: [] for name in calls}
        rng = random.Random(0)
        for name in calls:  # warm-up
            calls[name]()
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        for _ in range(self.args.rounds):
            order = list(calls)
            rng.shuffle(order)
            for name in order:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = clock()
                calls[name]()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                samples[name].append((clock() - start) * 1e3)
        base = samples.get(PADDED)
        by_name = {p.name: p for p in providers}
        for name, call in calls.items():
            peak = common.peak_memory_mb(call)
            paired = (sorted(s / b for s, b in zip(samples[name], base))[len(base) // 2] if base else None)
            row = self._row(case, by_name[name], "fwd+bwd", "ok", **common.summarize(samples[name]), peak_mb=peak,
                            err_out=errors[name]["out"], err_grad=errors[name].get("grad"), tol=tol,
                            paired_ratio=paired)
            print(f"    {name:<20} {row['median_ms']:>10.1f} ms  [{row['p20_ms']:.1f}, {row['p80_ms']:.1f}]  "
                  f"peak {common._fmt(peak)} MiB" + (f"  paired ratio to padded {paired:.3f}" if paired else ""))
        common._free_memory()

    def finish(self) -> int:
        for r in self.rows:
            if r.get("paired_ratio") is not None and r["provider"] != PADDED:
                self.note(f"{r['task']} {r['lengths']}: {r['provider']} / padded time, median of "
                          f"{self.args.rounds} paired rounds = {r['paired_ratio']:.2f}")
        return super().finish()


# Tiny random-init configs of transformers families (every family's own config class); vocab, special ids and
# one label are added in families_report.
_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_GQA = {**_DECODER, "num_key_value_heads": 2}
FAMILIES = {
    "llama": _GQA,
    "mistral": {**_GQA, "sliding_window": 8},
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 8},
    "gemma": {**_GQA, "head_dim": 8},
    "gemma2": {**_GQA, "head_dim": 8, "sliding_window": 8},  # eager, soft-capped
    "gemma3_text": {**_GQA, "head_dim": 8, "sliding_window": 8},
    "phi": _DECODER,
    "phi3": _GQA,
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4},  # learned absolute positions
    "gpt_neox": _DECODER,
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 32},
    "olmo2": _GQA,
    "starcoder2": {**_GQA, "sliding_window": 8},
    "stablelm": _GQA,
    "falcon": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4},  # ALiBi
    "mpt": {"d_model": 32, "n_layers": 2, "n_heads": 4},  # ALiBi
    "bert": _DECODER,
    "roberta": {**_DECODER, "pad_token_id": 1, "bos_token_id": 0},
    "distilbert": {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4},
    "deberta-v2": _DECODER,
    "electra": {**_DECODER, "embedding_size": 32},
}


def family_config(family: str):
    """A tiny random-init config of one of FAMILIES, with vocab 128 and pad / BOS / EOS ids 0 / 1 / 2."""
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{"vocab_size": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                                           "num_labels": 1, **FAMILIES[family]})


def families_report(out_dir: Path, save: bool) -> int:
    """``fastrm.packing.verify_packing`` on a tiny random-init model of every family in FAMILIES: the reward
    head (sequence classification) and, where the family has one, the causal LM (SFT / RL policy)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    lines = ["| family | attention | reward model (`train-rm`) | causal LM (`sft`, `ppo`) |", "|---|---|---|---|"]
    for family in FAMILIES:
        config = family_config(family)
        cells = []
        for kind, auto in (("reward", AutoModelForSequenceClassification), ("causal_lm", AutoModelForCausalLM)):
            torch.manual_seed(0)
            try:
                model = auto.from_config(config)
            except ValueError:
                cells.append("(no such head)")
                continue
            impl = model.config._attn_implementation
            exact, why = packing.verify_packing(model, kind)
            cells.append(("**packed** " if exact else "bucketed: ") + why.replace("|", "/"))
        lines.append(f"| {family} | {impl} | {cells[0]} | {cells[1]} |")
    text = (f"### Which transformers families pack (transformers {transformers.__version__}, torch {torch.__version__})"
            "\n\nTiny random-init models, probed by `fastrm.packing.verify_packing` as the trainers do at load time "
            "(`python benchmarks/bench_packing.py --families`). *packed*: one padding-free row with attention per "
            "sequence, proven equal to the padded forward; *bucketed*: length-bucketed padded micro-batches "
            "(exact for every model).\n\n" + "\n".join(lines) + "\n")
    print(text)
    if save:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "packing_families.md").write_text(text)
        print("wrote", out_dir / "packing_families.md")
    return 0


def main(argv=None) -> int:
    parser = common.base_parser(__doc__)
    parser.add_argument("--task", type=common._str_list, default=None, help="comma-separated: reward, sft")
    parser.add_argument("--lengths", type=common._str_list, default=None, help=f"comma-separated: {', '.join(LENGTHS)}")
    common.add_size_options(parser, batch="batch sizes (pairs for reward, examples for SFT)")
    for key in ("hidden", "layers", "heads", "long"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"model / length shape (default: the sweep's {key})")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per size")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time each step by this process's CPU time (with --threads 1 on a CPU shared with "
                             "other work: their load then does not enter the figures)")
    parser.add_argument("--max-mask-tokens", type=int, default=8192,
                        help="run packed-sdpa-mask only for packed rows up to this many tokens")
    parser.add_argument("--families", action="store_true",
                        help="instead of timing: probe a tiny model of every family in FAMILIES, write packing_families.md")
    parser.set_defaults(modes=["fwd+bwd"])
    args = parser.parse_args(argv)
    if args.families:
        return families_report(args.out, not args.no_save)
    run = InterleavedRun("packing", "training step", args, baseline=PADDED,
                         plot_x="tokens", plot_panel="task", default_dtype="float32")
    if args.clock == "cpu":
        if torch.cuda.is_available() or torch.get_num_threads() != 1:
            parser.error("--clock cpu measures one CPU thread: use it with --threads 1 and no GPU")
        run.note("times are this process's CPU time (1 torch thread, time.process_time): the load of other processes "
                 "does not enter them")
    shape = dict(MODEL["full" if args.full else "quick"])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    run.note(f"model: Llama, hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads, vocab {VOCAB}; "
             f"L = {shape['long']}")
    for size in common.sweep(args, QUICK, FULL):
        bench = Bench(size, shape, run.device, args.max_mask_tokens, run)
        run.bench(bench.case(size), bench.providers)
        del bench
    return run.finish()


if __name__ == "__main__":
    common.run_script(main)
