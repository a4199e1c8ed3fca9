"""What the learning loop costs serving, on the default model (SmolLM2-135M).

1. The tap: seconds spent in ``LearningLoop.observe`` per record, against the
   mean time of a serving step (the tap runs on the serving path).
2. The trainer, in a thread: serving time per step while it trains,
   against the same workload with the trainer stopped, run alternately
   (``--repeats`` pairs, medians), for the default CPU-share settings and for
   an unthrottled trainer (``nice=0, max_share=1``); plus the training steps
   per second each achieved.

Greedy, one request at a time, HumanEval prompts, a LearnedSpeculator with
the static head when ``atlas distill`` saved one (else a fresh head).

    python bench/bench_learning.py [--new-tokens 48] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48, help="new tokens per request (default 48)")
    ap.add_argument("--repeats", type=int, default=3, help="pairs of runs (trainer off / on) per setting")
    ap.add_argument("--threads", type=int, default=0, help="serving torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import atlas
    from atlas.demo import humaneval_prompts
    from atlas.learning import DraftHead, LearningLoop, choose_draft_vocab, static_head
    from atlas.learning.head import DEFAULT_DRAFT_VOCAB
    from atlas.speculators import LearnedSpeculator

    target = atlas.load(atlas.default_model())
    print(f"model: {target}  torch threads: {torch.get_num_threads()}")
    prompts = [target.tokenizer.encode(p) for p in humaneval_prompts(6)]
    head = static_head(target)
    if head is None:
        counts = np.bincount(np.concatenate(prompts), minlength=target.config.vocab_size)
        head = DraftHead.from_target(target, choose_draft_vocab(counts + 1e-3, DEFAULT_DRAFT_VOCAB))
        print("no static head saved: a fresh head (run `atlas distill` for the static one)")

    def serve(engine, prompt):
        """Seconds per target forward of one greedy request."""
        t0 = time.perf_counter()
        out = engine.generate([prompt], max_new_tokens=args.new_tokens)[0]
        return (time.perf_counter() - t0) / out.stats.steps

    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in (("default (threads=1, nice=10, max_share=0.25)", {}),
                          ("unthrottled (threads=1, nice=0, max_share=1)", dict(nice=0, max_share=1.0))):
            spec = LearnedSpeculator(head)
            # The trainer in a thread: this benchmark stops and restarts it
            # between runs on the same buffer, which a trainer process (whose
            # buffer goes with it) cannot do.
            loop = LearningLoop(target, spec, head=head, cache_dir=tmp, checkpoint=False, held_out=128,
                                batch_size=128, steps_per_round=20, process=False, **kw)
            engine = atlas.Engine(target, speculators=[spec], observers=[loop], max_batch=1)
            serve(engine, prompts[0])  # warm-up: the cost model, and data for the trainer
            serve(engine, prompts[1])
            loop.tap.seconds, loop.tap.records = 0.0, 0
            off, on, rates = [], [], []
            for r in range(args.repeats):
                p = prompts[2 + r % 4]
                off.append(serve(engine, p))
                loop.start()
                time.sleep(0.5)  # let it get going
                s0, t0 = loop.trainer.steps_done, time.perf_counter()
                on.append(serve(engine, p))
                rates.append((loop.trainer.steps_done - s0) / (time.perf_counter() - t0))
                loop.trainer.stop()
            tap_ms = 1e3 * loop.tap.seconds / max(loop.tap.records, 1)
            step_ms = 1e3 * statistics.median(off)
            print(f"\n[{label}]")
            print(f"tap: {tap_ms:.3f} ms per record, {100 * tap_ms / step_ms:.2f}% of a {step_ms:.1f} ms "
                  f"step ({loop.tap.records} records)")
            print(f"serving ms/step: trainer off {[round(1e3 * x, 1) for x in off]}, "
                  f"on {[round(1e3 * x, 1) for x in on]}")
            ratio = statistics.median(on) / statistics.median(off)
            print(f"slowdown with the trainer on (median ratio): {ratio:.3f}"
                  f"  trainer steps/s while serving: {[round(x, 2) for x in rates]}")
            print("loop:", {k: v for k, v in loop.stats().items() if k != "buffer"})


if __name__ == "__main__":
    main()
