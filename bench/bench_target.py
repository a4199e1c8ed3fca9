"""One-token decode step of atlas's target forward against transformers.

Loads SmolLM2-135M-Instruct (the default model) in both, prefills the same
prompt, then times single-token greedy decode steps three ways: atlas's forward
over the paged KV cache, transformers' forward with its own cache, and
transformers' ``generate`` (per-token times taken by a logits processor). The
three run in alternating rounds so that a busy machine slows them alike.
Prints medians after a warm-up, and the ratios.

    PYTHONPATH=python python bench/bench_target.py [--rounds 4] [--steps 8] [--prompt-tokens 64]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import atlas


class AtlasDecoder:
    def __init__(self, target, prompt, capacity):
        self.target = target
        self.cache = target.new_cache(num_blocks=capacity // 16 + 2, block_size=16, max_seqs=1)
        self.seq = self.cache.create()
        self.seq_ids = np.array([self.seq], np.int32)
        self.chain1, self.offs1 = np.array([-1], np.int32), np.array([0, 1], np.int64)
        n = len(prompt)
        logits = self._forward(torch.tensor(prompt), np.arange(-1, n - 1, dtype=np.int32),
                               np.array([0, n], np.int64), torch.tensor([n - 1]))
        self.next = int(logits[-1].argmax())

    def _forward(self, tokens, parents, offsets, rows=None):
        n = tokens.shape[0]
        pos = self.cache.length(self.seq)
        slots = torch.from_numpy(self.cache.reserve(self.seq, n))
        logits, _ = self.target.forward(self.cache, self.seq_ids, tokens, torch.arange(pos, pos + n), parents,
                                        offsets, slots, rows)
        self.cache.commit(self.seq)
        return logits

    def step(self) -> int:
        tok = self.next
        self.next = int(self._forward(torch.tensor([tok]), self.chain1, self.offs1)[0].argmax())
        return tok


class HFDecoder:
    def __init__(self, model, prompt):
        from transformers import DynamicCache
        self.model = model
        with torch.inference_mode():
            out = model(torch.tensor([prompt]), cache=DynamicCache(), use_cache=True)
        self.past, self.next = out.past_key_values, int(out.logits[0, -1].argmax())

    def step(self) -> int:
        tok = self.next
        with torch.inference_mode():
            out = self.model(torch.tensor([[tok]]), cache=self.past, use_cache=True)
        self.past, self.next = out.past_key_values, int(out.logits[0, -1].argmax())
        return tok


def generate_step_times(model, prompt, n):
    """Per-token times of greedy generate: the gaps between logits-processor calls."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    out = model.generate(torch.tensor([prompt]), max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False,
                         logits_processor=LogitsProcessorList([Stamp()]))
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="decode steps per round and way")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = Path(atlas.default_model())
    target = atlas.load(path)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = target.tokenizer.apply_chat_template("def fibonacci(n):\n    " * 64)[: args.prompt_tokens]
    total = args.warmup + args.rounds * args.steps

    ours, theirs = AtlasDecoder(target, prompt, len(prompt) + total), HFDecoder(hf, prompt)
    for _ in range(args.warmup):
        ours.step(), theirs.step()
    generate_step_times(hf, prompt, args.warmup)
    times = {"atlas": [], "hf": [], "generate": []}
    toks = {"atlas": [], "hf": []}
    for _ in range(args.rounds):
        for name, dec in (("atlas", ours), ("hf", theirs)):
            for _ in range(args.steps):
                t0 = time.perf_counter()
                toks[name].append(dec.step())
                times[name].append((time.perf_counter() - t0) * 1e3)
        times["generate"] += generate_step_times(hf, prompt, args.steps)[0]

    a, h, g = (statistics.median(times[k]) for k in ("atlas", "hf", "generate"))
    print(f"SmolLM2-135M fp32, prompt {len(prompt)} tokens, {args.rounds} rounds x {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  atlas forward (paged KV cache)  median {a:7.2f} ms/token")
    print(f"  transformers forward (cache)    median {h:7.2f} ms/token   ratio hf/atlas {h / a:.2f}")
    print(f"  transformers generate           median {g:7.2f} ms/token   ratio generate/atlas {g / a:.2f}")
    print(f"  greedy tokens equal atlas vs transformers: {toks['atlas'] == toks['hf']}")


if __name__ == "__main__":
    main()
