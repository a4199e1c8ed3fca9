"""End-to-end generation, plain decoding vs atlas, on Llama-family models built
from configs with random weights (no model file needed: meant for a bare GPU
machine, and runs on the CPU too).

Two sizes, about 135M (SmolLM2-135M's shapes) and 1B parameters (Llama 3.2 1B's
shapes, vocabulary cut to 32,000). The workload is repetitive so that the
suffix speculator has something to accept: each prompt repeats a random
phrase, and a random-weight model's greedy continuation falls into loops of
its own. Plain decoding (``speculators=None``) and atlas with the suffix
speculator under the controller serve the same prompts, greedy, in
alternating rounds; both must emit the same tokens (checked). Prints tokens
per second, tau and the ratio.

    python bench/bench_engine.py [--device cuda] [--sizes 135m,1b] [--prompts 4] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import atlas
from atlas.models.config import ModelConfig
from atlas.models.llama import LlamaModel
from atlas.models.target import Target
from atlas.speculators import SuffixSpeculator

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "135m": (576, 1536, 30, 9, 3, 49152),
    "1b": (2048, 8192, 16, 32, 8, 32000),
}


def random_target(size: str, dtype: torch.dtype, seed: int = 0) -> Target:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    cfg = ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    hd = hidden // heads
    state = {"embed_tokens.weight": w(vocab, hidden), "norm.weight": torch.ones(hidden, dtype=dtype)}
    for i in range(layers):
        p = f"layers.{i}."
        state.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
                      p + "self_attn.q_proj.weight": w(heads * hd, hidden),
                      p + "self_attn.k_proj.weight": w(kv * hd, hidden),
                      p + "self_attn.v_proj.weight": w(kv * hd, hidden),
                      p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                      p + "mlp.gate_proj.weight": w(inter, hidden),
                      p + "mlp.up_proj.weight": w(inter, hidden),
                      p + "mlp.down_proj.weight": w(hidden, inter)})
    return Target(cfg, LlamaModel.from_state_dict(cfg, state, dtype), None)


def prompts_for(vocab: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        phrase = rng.integers(1, vocab, size=int(rng.integers(8, 24))).tolist()
        out.append((phrase * 6)[:120])
    return out


def timed(engine, prompts, new_tokens, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, max_new_tokens=new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    steps = sum(o.stats.steps for o in outs)
    return outs, tokens / dt, tokens / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--sizes", default="135m,1b", help="comma-separated model sizes: 135m, 1b")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weights and cache dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    ap.add_argument("--prompts", type=int, default=4, help="requests per round, served one at a time")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of plain and atlas")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    rows = []
    for size in args.sizes.split(","):
        t0 = time.perf_counter()
        target = random_target(size, dtype)
        plain = atlas.Engine(target, speculators=None, max_batch=1, device=device)
        fast = atlas.Engine(target, speculators=[SuffixSpeculator(vocab_size=target.config.vocab_size)],
                            max_batch=1, device=device)
        prompts = prompts_for(target.config.vocab_size, args.prompts, seed=1)
        params = sum(t.numel() for t in [target.model.embed] +
                     [getattr(L, n) for L in target.model.layers for n in ("qkv", "o", "gate_up", "down")])
        print(f"{size}: {params / 1e6:.0f}M parameters, {dtype}, on {device} "
              f"(built in {time.perf_counter() - t0:.0f} s)", flush=True)
        timed(plain, prompts[:1], 8, device)   # warm-up (and the cost measurement)
        timed(fast, prompts[:1], 8, device)
        p_tps, a_tps, a_tau = [], [], []
        for r in range(args.rounds):
            want = []
            for p in prompts:
                outs, tps, _ = timed(plain, [p], args.new_tokens, device)
                want.append(outs[0].token_ids)
                p_tps.append(tps)
            for p, w in zip(prompts, want):
                outs, tps, tau = timed(fast, [p], args.new_tokens, device)
                if outs[0].token_ids != w:
                    raise SystemExit(f"{size}: atlas's output differs from plain decoding's")
                a_tps.append(tps)
                a_tau.append(tau)
            print(f"  round {r + 1}: plain {statistics.median(p_tps):.1f} tokens/s, atlas "
                  f"{statistics.median(a_tps):.1f} tokens/s, tau {statistics.median(a_tau):.2f}", flush=True)
        rows.append((size, statistics.median(p_tps), statistics.median(a_tps), statistics.median(a_tau)))

    print("\n| model | plain tokens/s | atlas tokens/s | tau | atlas / plain |")
    print("|---|---|---|---|---|")
    for size, p, a, tau in rows:
        print(f"| {size} | {p:.1f} | {a:.1f} | {tau:.2f} | {a / p:.2f}x |")


if __name__ == "__main__":
    main()
