"""End-to-end decoding speed: transformers' generate vs atlas, side by side.

On the default model (SmolLM2-135M-Instruct), greedy, one request at a time,
over real HumanEval prompts: tokens per second of transformers'
``generate(do_sample=False)`` and of atlas's plain decoding (no speculator,
the same executor every speculative run uses), median of repeated runs, and
their ratio; then atlas's per-step time split (target forward vs everything
else the engine does: its overhead).

    python bench/bench_generate.py [--prompts 4] [--new-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="HumanEval prompts per run (default 4)")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side; the median is reported")
    args = ap.parse_args()

    import transformers

    import atlas
    from atlas.demo import humaneval_prompts

    path = atlas.default_model()
    print(f"model: {os.path.basename(path)}  threads: {torch.get_num_threads()}")
    target = atlas.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    prompts = [target.tokenizer.encode(p) for p in humaneval_prompts(args.prompts)]
    engine = atlas.Engine(target, speculators=None, max_batch=1)

    def run_hf():
        n = 0
        t0 = time.perf_counter()
        for p in prompts:
            with torch.inference_mode():
                out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=target.tokenizer.eos_token_ids and min(target.tokenizer.eos_token_ids))
            n += out.shape[1] - len(p)
        return n / (time.perf_counter() - t0)

    step_stats = []

    def run_atlas():
        n = 0
        t0 = time.perf_counter()
        for p in prompts:
            out = engine.generate([p], max_new_tokens=args.new_tokens)[0]
            n += len(out.token_ids)
            step_stats.append(out.stats)
        return n / (time.perf_counter() - t0)

    run_hf(), run_atlas()  # warm-up
    step_stats.clear()
    hf_tps, atlas_tps = [], []
    for _ in range(args.repeats):
        hf_tps.append(run_hf())
        atlas_tps.append(run_atlas())
    h, a = statistics.median(hf_tps), statistics.median(atlas_tps)
    print(f"\n{'decoder':<28}{'tokens/s (median)':>20}{'ratio':>10}")
    print(f"{'transformers generate':<28}{h:>20.2f}{1.0:>10.2f}")
    print(f"{'atlas plain':<28}{a:>20.2f}{a / h:>10.2f}")

    steps = sum(s.steps - 1 for s in step_stats)
    fwd = sum(s.time_verify for s in step_stats)
    other = sum(s.time_other for s in step_stats)
    print(f"\natlas decode steps: {steps}, per step: forward {1e3 * fwd / steps:.2f} ms, "
          f"engine overhead {1e3 * other / steps:.3f} ms ({100 * other / (fwd + other):.2f}% of the step)")


if __name__ == "__main__":
    main()
