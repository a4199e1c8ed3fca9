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

    p = sub.add_parser("demo", help="run the demo on the bundled default model")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
