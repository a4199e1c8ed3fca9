"""The ``atlas`` command line: ``atlas info``, ``atlas demo``, ``atlas distill``."""
from __future__ import annotations

import argparse
import json
import sys


def _info(_args) -> int:
    import atlas

    print(json.dumps(atlas.build_info(), indent=2))
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _distill(args) -> int:
    import torch

    from .learning import distill

    if args.threads:
        torch.set_num_threads(args.threads)
    res = distill(model=args.model, tokens=args.tokens, prompts=args.prompts, gen_tokens=args.gen_tokens,
                  steps=args.steps, out=args.out,
                  draft_vocab=args.draft_vocab, seq_len=args.seq_len, seed=args.seed,
                  progress=lambda msg: print(msg, flush=True))
    print(f"static head: held-out metric {res.metric:.4f} (untrained {res.untrained_metric:.4f}), "
          f"{res.examples} examples, forwards {res.collect_seconds:.0f} s, "
          f"training {res.train_seconds:.0f} s")
    return 0


def main(argv=None) -> int:
    from .learning.head import DEFAULT_DRAFT_VOCAB

    parser = argparse.ArgumentParser(prog="atlas", description="atlas: adaptive-learning speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print what the native extension was built with")
    p.set_defaults(func=_info)

    p = sub.add_parser("demo", help="full atlas serving HumanEval prompts on the default model (SmolLM2-135M)",
                       description="Serves a stream of HumanEval prompts with full atlas (learning on) after a "
                                   "plain-decoding baseline; prints a table and writes a learning-curve PNG. "
                                   "About 10 minutes on 2 CPU cores, the first run distilling the static head.")
    p.add_argument("--requests", type=int, default=32, help="HumanEval prompts served (default 32)")
    p.add_argument("--new-tokens", type=int, default=96, help="tokens generated per request (default 96)")
    p.add_argument("--plain-requests", type=int, default=3,
                   help="requests for the plain-decoding baseline (default 3)")
    p.add_argument("--long", action="store_true", help="all 164 prompts, 128 tokens each (about an hour on 2 cores)")
    p.add_argument("--cache-dir", default=None,
                   help="where draft heads and checkpoints live (default $ATLAS_CACHE_DIR or ~/.cache/atlas)")
    p.add_argument("--out", default="atlas_demo.png", help="learning-curve picture (default atlas_demo.png)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "distill", help="distil the static draft head of a model from the Python standard library's sources",
        description="Runs the target teacher-forced over the Python standard library's .py sources and over "
                    "its own greedy completions of function stubs made from them (no network), trains a "
                    "draft head on its hidden states and next-token distributions, prints the held-out "
                    "metric (the share of held-out positions where the head's top token is the target's "
                    "greedy token) and saves the head as static.npz in the model's checkpoint folder, "
                    "where atlas.Engine, atlas.learning.load_static and the learning loop find it. About "
                    "10 minutes with the defaults on 2 CPU cores for SmolLM2-135M.")
    p.add_argument("--model", default=None,
                   help="a .gguf file or a model directory (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=16384,
                   help="tokens of source text to run through the target (default 16384; 0: none)")
    p.add_argument("--prompts", type=int, default=256,
                   help="function stubs (signature and docstring) the target completes (default 256; 0: none)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens per completion (default 128)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of 256 examples (default 2000)")
    p.add_argument("--out", default=None, help="checkpoint root; the head goes to OUT/<model key>/static.npz "
                   "(default: $ATLAS_CACHE_DIR or ~/.cache/atlas)")
    p.add_argument("--draft-vocab", type=int, default=DEFAULT_DRAFT_VOCAB,
                   help=f"tokens the head scores: the corpus's most frequent (default {DEFAULT_DRAFT_VOCAB})")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per teacher-forced forward (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_distill)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
