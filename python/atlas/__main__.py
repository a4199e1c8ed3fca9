"""The ``atlas`` command line: ``atlas info``, ``atlas demo``."""
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


def main(argv=None) -> int:
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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
