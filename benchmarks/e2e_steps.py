"""End-to-end training steps on a random-init, Qwen2-0.5B-shaped model: fastrm's ops vs the plain PyTorch.

    python -m benchmarks.e2e_steps                  # CUDA: Qwen2-0.5B shape, bf16; CPU: a tiny model
    python -m benchmarks.e2e_steps --tiny           # the tiny model anywhere (the suite's dry run)

No download: the model is built from a ``Qwen2Config`` (24 layers, hidden 896, 14 heads / 2 KV heads,
intermediate 4864, vocabulary 151936, tied embeddings: ~494M parameters) with random weights, in bf16 on CUDA.

* **Reward-model step**: ``Qwen2ForSequenceClassification`` scores B chosen and B rejected sequences of T
  tokens; Bradley-Terry loss; backward; AdamW step. ``fastrm`` = ``pairwise_ranking_loss`` (Triton on
  CUDA), ``eager`` = TRL's ``-logsigmoid(c - r).mean()``. The loss is a sliver of the step: this measures
  that fastrm costs nothing there, not a speed-up.
* **PPO step** (no generation): under no_grad, per-token log-probs of the rollout (policy and reference),
  values, a k3 KL penalty, the score on the last token, GAE and whitening; then the update: log-probs with
  entropy and gradient, clipped policy loss + clipped value loss - entropy bonus, backward, AdamW step.
  ``fastrm`` = ``linear_logprobs`` from the last hidden states (no ``[B, T, V]`` logits), ``compute_gae``,
  ``ppo_policy_loss``, ``value_loss``, ``kl_penalty``; ``eager`` = the LM head's full logits, float32
  ``log_softmax`` + ``gather``, the reversed Python GAE loop, the losses written out in torch (as TRL/verl).

Each variant runs ``--warmup`` untimed steps then ``--steps`` timed ones (CUDA events around each); the peak
memory of the timed steps is the caching allocator's. Results: a dict (printed as JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastrm  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def build(kind: str, config: dict, device, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

    cfg = Qwen2Config(**config, pad_token_id=0, num_labels=1)
    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype=dtype)


def _timed(step, steps: int, warmup: int, device) -> dict:
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "steps": steps}
    if cuda:
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


# ------------------------------------------------------------------------------------------------------
# reward model
# ------------------------------------------------------------------------------------------------------


def reward_step(model, optimizer, chosen, rejected, variant: str):
    def step():
        scores = model(input_ids=torch.cat([chosen, rejected]), use_cache=False).logits.squeeze(-1).float()
        c, r = scores.chunk(2)
        loss = fastrm.pairwise_ranking_loss(c, r) if variant == "fastrm" else -F.logsigmoid(c - r).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


# ------------------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------------------


def _eager_logprobs(model, input_ids, labels, with_entropy=False):
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    safe = labels.clamp_min(0)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (labels != -100)
    if not with_entropy:
        return lp
    return lp, -(logp.exp() * logp).sum(-1)


def _fastrm_logprobs(model, input_ids, labels, with_entropy=False):
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    return fastrm.linear_logprobs(hidden, head.weight, labels, bias=head.bias, return_entropy=with_entropy,
                                  skip_ignored=True)


def _eager_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    return fastrm.compute_gae_reference(rewards, values, mask, gamma, lam)  # the reversed Python loop


def ppo_step(model, value_head, optimizer, input_ids, response_mask, variant: str):
    labels = torch.where(response_mask, input_ids[:, 1:], -100)
    mask = response_mask
    logprobs_fn = _fastrm_logprobs if variant == "fastrm" else _eager_logprobs

    def values_of(hidden):
        return value_head(hidden[:, :-1]).squeeze(-1).float()

    def step():
        with torch.no_grad():  # the rollout side (generation itself is not timed)
            old = logprobs_fn(model, input_ids, labels)
            ref = logprobs_fn(model, input_ids, labels)  # a reference model would be a second forward
            values = values_of(model.model(input_ids=input_ids, use_cache=False).last_hidden_state)
            if variant == "fastrm":
                kl = fastrm.kl_penalty(old, ref, "k3")
            else:
                x = (ref - old).clamp(-20, 20)
                kl = (x.exp() - x - 1).clamp(-10, 10)
            rewards = torch.where(mask, -0.05 * kl, 0.0)
            last = mask.float().cumsum(1).argmax(1)
            rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += 1.0
            if variant == "fastrm":
                adv, ret = fastrm.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
                adv = fastrm.whiten(adv, mask)
            else:
                adv, ret = _eager_gae(rewards, values, mask)
                m = mask.float()
                mean = (adv * m).sum() / m.sum()
                var = ((adv - mean) ** 2 * m).sum() / (m.sum() - 1)
                adv = (adv - mean) * torch.rsqrt(var + 1e-8) * m
        # the update
        out = model.model(input_ids=input_ids, use_cache=False)
        hidden = out.last_hidden_state
        if variant == "fastrm":
            head = model.get_output_embeddings()
            logp, entropy = fastrm.linear_logprobs(hidden[:, :-1], head.weight, labels, bias=head.bias,
                                                   return_entropy=True, skip_ignored=True)
            pol = fastrm.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, dual_clip=3.0).loss
            vl = fastrm.value_loss(values_of(hidden), values, ret, mask, clip=0.2).loss
        else:
            logits = model.lm_head(hidden[:, :-1]).float()
            logp_all = torch.log_softmax(logits, dim=-1)
            logp = logp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            m = mask.float()
            ratio = torch.exp((logp - old).clamp(-20, 20))
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
            pol = (pg * m).sum() / m.sum()
            v = values_of(hidden)
            v_clip = torch.clamp(v, values - 0.2, values + 0.2)
            vl = 0.5 * (torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2) * m).sum() / m.sum()
        ent = (entropy * mask).sum() / mask.sum()
        loss = pol + 0.5 * vl - 0.01 * ent
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def run(tiny: bool = False, steps: int = 5, warmup: int = 2, batch: int | None = None, seq: int | None = None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = tiny or device.type != "cuda"
    config = TINY if tiny else QWEN2_05B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B = batch or (2 if tiny else 8)
    T = seq or (64 if tiny else 1024)
    prompt = T // 4
    gen = torch.Generator(device="cpu").manual_seed(0)
    result = {"model": "tiny Qwen2" if tiny else "Qwen2-0.5B shape (random init)", "config": config,
              "dtype": str(dtype).replace("torch.", ""), "device": str(device), "batch": B, "seq": T}

    model = build("reward", config, device, dtype)
    result["reward_params"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, config["vocab_size"], (2 * B, T), generator=gen).to(device)
    reward = {}
    for variant in ("fastrm", "eager"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        reward[variant] = _timed(reward_step(model, optimizer, ids[:B], ids[B:], variant), steps, warmup, device)
        reward[variant]["tokens_per_s"] = 2 * B * T / (reward[variant]["median_ms"] / 1e3)
        del optimizer
    result["reward_step"] = reward
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model = build("policy", config, device, dtype)
    value_head = torch.nn.Linear(config["hidden_size"], 1, device=device, dtype=dtype)
    result["policy_params"] = sum(p.numel() for p in model.parameters())
    ids = torch.randint(1, config["vocab_size"], (B, T), generator=gen).to(device)
    lengths = torch.randint(T // 2, T - prompt, (B,), generator=gen).to(device)
    pos = torch.arange(T - 1, device=device)
    response_mask = (pos[None] >= prompt - 1) & (pos[None] < prompt - 1 + lengths[:, None])
    ppo = {}
    for variant in ("fastrm", "eager"):
        optimizer = torch.optim.AdamW(list(model.parameters()) + list(value_head.parameters()), lr=1e-6)
        try:
            ppo[variant] = _timed(ppo_step(model, value_head, optimizer, ids, response_mask, variant), steps, warmup,
                                  device)
            ppo[variant]["tokens_per_s"] = B * T / (ppo[variant]["median_ms"] / 1e3)
        except torch.cuda.OutOfMemoryError as exc:
            ppo[variant] = {"error": f"out of memory: {str(exc)[:200]}"}
        del optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["ppo_step"] = ppo
    for name in ("reward_step", "ppo_step"):
        f, e = result[name].get("fastrm", {}), result[name].get("eager", {})
        if "median_ms" in f and "median_ms" in e:
            result[name]["speedup"] = e["median_ms"] / f["median_ms"]
            if f.get("peak_mb") and e.get("peak_mb"):
                result[name]["memory_ratio"] = f["peak_mb"] / e["peak_mb"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny Qwen2 (the default without CUDA)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.tiny, args.steps, args.warmup, args.batch, args.seq)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
