"""Adaptive speculation end to end: plain decoding vs each speculator alone vs
full atlas, on a stream of HumanEval prompts served in order with learning on.

Full atlas (suffix + adaptive head + static head under the controller) serves
the whole stream; plain decoding, the suffix speculator alone and the static
head alone serve its first and last quarter. All greedy on the default model
(SmolLM2-135M-Instruct). Prints tokens per second and tau for each, as ratios
to plain decoding, and writes the learning curve as a PNG.

    python bench/bench_atlas.py [--prompts 164] [--new-tokens 128] [--out bench_atlas.png]

With ``--shift N``: a domain shift instead. Full atlas serves N code prompts,
then N prose prompts (made from the standard library's module docstrings),
and the tau of each block of requests is printed beside the static head's.
"""
from __future__ import annotations

import argparse
import pydoc
import sys
import tempfile

import atlas
from atlas.demo import humaneval_prompts, plot_learning_curve, quarter_stats, serve
from atlas.learning.distill import static_head
from atlas.speculators import LearnedSpeculator, SuffixSpeculator


def prose_prompts(n):
    """Prose requests built from the docstrings of standard-library modules."""
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or len(out) >= n:
            continue
        try:
            mod = __import__(name)
        except Exception:
            continue
        doc = pydoc.getdoc(mod).strip()
        if len(doc) > 200:
            out.append(f"Explain in plain English what this documentation says:\n\n{doc[:600]}\n\nExplanation:")
    return out[:n]


def run(engine, prompts, new_tokens, label):
    served = serve(engine, prompts, new_tokens,
                   lambda s, o: print(f"  {label} {s.index + 1:>3}/{len(prompts)}: {s.tokens_per_second:6.1f} "
                                      f"tokens/s, tau {s.tau:4.2f}", flush=True))
    return served


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=164, help="HumanEval prompts in the stream (default 164)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--shift", type=int, default=0, help="domain-shift run with N code then N prose prompts")
    ap.add_argument("--out", default="bench_atlas.png", help="learning-curve picture")
    args = ap.parse_args()

    target = atlas.load(atlas.default_model())
    cache = tempfile.mkdtemp(prefix="atlas-bench-")  # a fresh adaptive head; the static one is shared
    head = static_head(target, None)
    if head is None:
        from atlas.learning.distill import distill
        distill(target, progress=print)
        head = static_head(target, None)

    if args.shift:
        code = humaneval_prompts(args.shift)
        prose = prose_prompts(args.shift)
        static_engine = atlas.Engine(target, speculators=[LearnedSpeculator(head)], max_batch=1)
        with atlas.Engine(target, max_batch=1) as engine:
            served = run(engine, code + prose, args.new_tokens, "atlas")
        ref = run(static_engine, code[-len(code) // 4:] + prose[:len(prose) // 4] + prose[-len(prose) // 4:],
                  args.new_tokens, "static")
        block = max(1, args.shift // 4)
        print("\n| requests | atlas tau | atlas tokens/s |")
        print("|---|---|---|")
        for i in range(0, len(served), block):
            part = served[i:i + block]
            tok = sum(s.tokens for s in part)
            print(f"| {i + 1}-{i + len(part)}{' (prose)' if i >= args.shift else ' (code)'} | "
                  f"{tok / sum(s.steps for s in part):.2f} | {tok / sum(s.seconds for s in part):.1f} |")
        q = len(ref) // 3
        for name, part in (("code, last quarter", ref[:q]), ("prose, first quarter", ref[q:2 * q]),
                           ("prose, last quarter", ref[2 * q:])):
            tok = sum(s.tokens for s in part)
            print(f"static head alone, {name}: tau {tok / sum(s.steps for s in part):.2f}")
        return

    prompts = humaneval_prompts(args.prompts)
    q = max(1, len(prompts) // 4)
    ends = prompts[:q] + prompts[-q:]
    rows = {}
    for name, specs in (("plain", None), ("suffix alone", [SuffixSpeculator(vocab_size=target.config.vocab_size)]),
                        ("static head alone", [LearnedSpeculator(head)])):
        print(f"\n{name}: first and last quarter ({2 * q} requests)", flush=True)
        served = run(atlas.Engine(target, speculators=specs, max_batch=1), ends, args.new_tokens, name)
        rows[name] = (quarter_stats(served[:q], "first"), quarter_stats(served[q:], "first"))
    print(f"\nfull atlas: the whole stream ({len(prompts)} requests, learning on)", flush=True)
    with atlas.Engine(target, max_batch=1, cache_dir=cache) as engine:
        served = run(engine, prompts, args.new_tokens, "atlas")
        summary = engine.controller.summary()
        loop = engine.observers[0]
        learn = loop.stats()
    rows["full atlas"] = (quarter_stats(served, "first"), quarter_stats(served, "last"))

    base_first, base_last = rows["plain"][0][0], rows["plain"][1][0]
    print("\n| decoder | first quarter tokens/s | tau | vs plain | last quarter tokens/s | tau | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, ((f_tps, f_tau), (l_tps, l_tau)) in rows.items():
        print(f"| {name} | {f_tps:.1f} | {f_tau:.2f} | {f_tps / base_first:.2f}x | {l_tps:.1f} | {l_tau:.2f} | "
              f"{l_tps / base_last:.2f}x |")
    print(f"\ncontroller: {summary}\nlearning: {learn}")
    plot_learning_curve(served, (base_first + base_last) / 2, args.out,
                        f"atlas on SmolLM2-135M, {len(prompts)} HumanEval requests, learning on")
    print(f"learning curve: {args.out}")


if __name__ == "__main__":
    main()
