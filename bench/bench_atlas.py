"""Adaptive speculation end to end: plain decoding vs each speculator alone vs
full atlas, on a stream of HumanEval prompts served in order with learning on.

Full atlas (suffix + adaptive head + static head under the controller) serves
the whole stream; plain decoding, the suffix speculator alone and the static
head alone serve its first and last quarter, each of those requests right
after full atlas has served it (its trainer process paused meanwhile, so that
it trains only in full atlas's own gaps; the suffix speculator alone gets the
outputs of the requests it does not serve added to its corpus, so that it
indexes the same traffic as full atlas's): the machine's speed drifts by 10%
and more over a run, and interleaving exposes every decoder to the same
drift (they are warmed up with one short request first; full atlas is not,
so its first quarter includes its start-up). All greedy on the default model
(SmolLM2-135M-Instruct). Prints tokens per second and tau for each, as ratios
to plain decoding; for the last quarter, full atlas against each single
decoder request by request (the mean ratio of their tokens per second and
its standard error: the served-in-turn pairs see the same machine); and
writes the learning curve as a PNG.

It also measures what learning bought, on requests the learner had not seen:
the adaptive head's weights live when the first three quarters of the stream
had been served are frozen, and

* the static head alone (learning off), that frozen head alone, and that
  frozen head fitted to each request's prompt as the learning loop fits it
  (request-local adaptation, atlas.learning.adapt: learning on, with a loop
  that trains nothing else, so the head stays frozen across requests) serve
  each request of the last quarter, each in a new engine of its own made at
  the freeze (so their controllers start alike): their draft tokens accepted
  per step (tau - 1) and tokens per second;
* after the stream the three are scored teacher-forced on the last quarter's
  requests (prompt and greedy output through the target; the fitted one
  fitted to each prompt first): the share of output positions where the
  head's greedy draft equals the target's next token (depth-1 acceptance),
  and the mean number of tokens of the head's greedy chain (each depth
  reading the head's own predicted feature, up to 8) that the target
  accepts from each position.

    python bench/bench_atlas.py [--prompts 164] [--new-tokens 128] [--out bench_atlas.png]

``--trainer-beside-forwards`` lets the trainer process run during the target
forwards too (``LearningLoop(pause_during_forward=False, max_share=1.0)``):
on a 2-core CPU it trains many times more steps and slows serving badly,
which shows what the learner reaches when CPU is not what limits it.

With ``--shift N``: a domain shift instead. Full atlas serves N code prompts,
then N prose prompts (``bench/data/prose_prompts.txt``, at most 48); the tau
and tokens per second of each block of requests are printed, and beside them
the static head alone's and plain decoding's on the last quarter of the code
and the first and last quarters of the prose.
"""
from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np

import atlas
from atlas.demo import humaneval_prompts, plot_learning_curve, serve, totals
from atlas.learning.adapt import adapt_to_prompt
from atlas.learning.checkpoint import STATIC, model_dir
from atlas.learning.distill import static_head, teacher_forced
from atlas.learning.loop import LearningLoop
from atlas.learning.tap import Examples
from atlas.learning.trainer import resolve_precision
from atlas.speculators import LearnedSpeculator, SuffixSpeculator


PROSE = Path(__file__).parent / "data" / "prose_prompts.txt"


def prose_prompts(n):
    """Up to n prose requests: open questions and writing tasks (one per line
    of ``bench/data/prose_prompts.txt``, written for this benchmark), whose
    answers, unlike code completions, cannot copy much of their prompt."""
    lines = [x.strip() for x in PROSE.read_text(encoding="utf-8").splitlines() if x.strip()]
    if n > len(lines):
        raise SystemExit(f"--shift {n}: {PROSE} holds {len(lines)} prose prompts")
    return [x + "\n" for x in lines[:n]]


def run(engine, prompts, new_tokens, label, after=None):
    def report(s, o):
        print(f"  {label} {s.index + 1:>3}/{len(prompts)}: {s.tokens_per_second:6.1f} tokens/s, tau {s.tau:4.2f}",
              flush=True)
        if after is not None:
            after(s, o)
    return serve(engine, prompts, new_tokens, report)


def fresh_cache_with(target, head_path):
    """A fresh checkpoint folder (no adaptive head yet) holding the static
    head, removed when the process exits."""
    cache = tempfile.mkdtemp(prefix="atlas-bench-")
    atexit.register(shutil.rmtree, cache, True)
    dest = model_dir(target, cache)
    dest.mkdir(parents=True)
    shutil.copy(head_path, dest / STATIC)
    return cache


CHAIN_DEPTH = 8


def prompt_examples(toks, hidden, n_prompt):
    """The tap's examples of a prompt (every prompt token but the first, each
    reading its predecessor's feature), targets left to adapt_to_prompt."""
    t = np.arange(1, n_prompt)
    feats = hidden.float().numpy()
    n, k = len(t), 16
    return Examples(np.ascontiguousarray(feats[t - 1]), toks[t].astype(np.int32), np.full((n, k), -1, np.int32),
                    np.full((n, k), -np.inf, np.float32), np.ascontiguousarray(feats[t]), np.zeros(n, np.int64))


def head_acceptance(target, snapshot, sequences, twin=None):
    """Teacher-forced acceptance of a native head version over (prompt ids,
    output ids) pairs, from every output position: (depth-1 greedy acceptance:
    the share of positions where the head's argmax is the target's next token;
    greedy chain length: the mean number of consecutive tokens of the head's
    argmax chain, up to CHAIN_DEPTH, that equal the target's greedy output).
    ``twin``: a DraftHead holding the snapshot's weights; then each request is
    scored with the snapshot fitted to its prompt first, as the learning
    loop's request-local adaptation fits it (atlas.learning.adapt)."""
    hits = total = 0
    chain = 0.0
    cache = target.new_cache(-(-max(len(p) + len(o) for p, o in sequences) // 16) + 1, block_size=16, max_seqs=1)
    ids = snapshot.draft_ids.astype(np.int64)
    base, rows = snapshot, {}
    for prompt, out in sequences:
        toks = np.asarray(prompt + out, np.int64)
        L = len(toks)
        logits, hidden = teacher_forced(target, cache, toks)
        if twin is not None:
            ex = prompt_examples(toks, hidden, len(prompt))
            snapshot = base.derive(adapt_to_prompt(twin, ex, bfloat16=resolve_precision("auto") == "bfloat16",
                                                   cache=rows))
        # Drafting token t + 1 (an output token) reads the feature at t - 1 and token t.
        first = len(prompt) - 1
        feats = np.ascontiguousarray(hidden[first - 1:L - 2].float().numpy())
        tok = np.ascontiguousarray(toks[first:L - 1].astype(np.int32))
        want = logits[first:L - 1].argmax(-1).numpy()
        f_hat = np.empty_like(feats)
        d_logits = np.empty((len(tok), len(ids)), np.float32)
        snapshot.forward(feats, tok, f_hat, d_logits)
        drafted = ids[d_logits.argmax(-1)]
        # The chain: depth d drafts from (its parent's predicted feature, the
        # token drafted at depth d - 1); the target's output is greedy, so a
        # drafted token is accepted when it equals the output token there.
        alive = drafted == want
        hits += int(alive.sum())
        total += len(tok)
        chain += float(alive.sum())
        pos = np.arange(first + 1, L)   # where each position's depth-1 token sits in toks
        for d in range(1, CHAIN_DEPTH):
            if not alive.any():
                break
            feats, tok = f_hat, drafted.astype(np.int32)
            f_hat = np.empty_like(feats)
            snapshot.forward(feats, tok, f_hat, d_logits)
            drafted = ids[d_logits.argmax(-1)]
            at = pos + d
            ok = np.zeros_like(alive)
            inside = at < L
            ok[inside] = drafted[inside] == toks[at[inside]]
            alive &= ok
            chain += float(alive.sum())
    return hits / max(total, 1), chain / max(total, 1)


def frozen_copy(head, snapshot):
    """A DraftHead (sharing ``head``'s frozen tables) holding the weights a
    native snapshot serves."""
    copy = head.twin()
    copy.load_snapshot(snapshot)
    return copy


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=164, help="HumanEval prompts in the stream (default 164)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--shift", type=int, default=0, help="domain-shift run with N code then N prose prompts")
    ap.add_argument("--out", default="bench_atlas.png", help="learning-curve picture")
    ap.add_argument("--trainer-beside-forwards", action="store_true",
                    help="never pause the trainer process during target forwards (on a CPU it then competes "
                         "with them: more training, slower serving); default: paused, it trains in the gaps")
    args = ap.parse_args()
    if args.prompts < 2 and not args.shift:
        ap.error("--prompts must be at least 2: the last quarter is served by a head frozen before it")
    # (and no duty cycle: the whole of a core when it gets one)
    learning_options = dict(pause_during_forward=False, max_share=1.0) if args.trainer_beside_forwards else None

    target = atlas.load(atlas.default_model())
    head = static_head(target, None)
    if head is None:
        from atlas.learning.distill import distill
        distill(target, progress=print)
        head = static_head(target, None)
    # Full atlas starts from a fresh adaptive head and the same static head.
    cache = fresh_cache_with(target, model_dir(target, None) / STATIC)

    if args.shift:
        code = humaneval_prompts(args.shift)
        prose = prose_prompts(args.shift)
        static_engine = atlas.Engine(target, speculators=[LearnedSpeculator(head)], max_batch=1)
        with atlas.Engine(target, max_batch=1, cache_dir=cache, learning_options=learning_options) as engine:
            loop = engine.observers[0]
            fitted = []   # request-local fits made so far, after each request
            served = run(engine, code + prose, args.new_tokens, "atlas",
                         lambda s, o: fitted.append(loop.adaptations))
        # A quarter of each block (prose has at most 48 prompts; one request at least).
        kc, kp = max(1, len(code) // 4), max(1, len(prose) // 4)
        ref_prompts = code[-kc:] + prose[:kp] + prose[-kp:]
        ref = run(static_engine, ref_prompts, args.new_tokens, "static")
        plain = run(atlas.Engine(target, speculators=None, max_batch=1), ref_prompts, args.new_tokens, "plain")
        print("\n| requests | atlas tau | atlas tokens/s |")
        print("|---|---|---|")
        for i in range(0, len(served), kc):
            part = served[i:i + kc]
            tok = sum(s.tokens for s in part)
            print(f"| {i + 1}-{i + len(part)}{' (prose)' if i >= len(code) else ' (code)'} | "
                  f"{tok / sum(s.steps for s in part):.2f} | {tok / sum(s.seconds for s in part):.1f} |")
        for name, lo, hi in (("code, last quarter", 0, kc), ("prose, first quarter", kc, kc + kp),
                             ("prose, last quarter", kc + kp, kc + 2 * kp)):
            (s_tps, s_tau), (p_tps, _) = totals(ref[lo:hi]), totals(plain[lo:hi])
            print(f"{name}: static head alone tau {s_tau:.2f}, {s_tps:.1f} tokens/s; "
                  f"plain decoding {p_tps:.1f} tokens/s")
        nc = len(code)
        print(f"request-local fits in full atlas: {fitted[nc - 1]} of {nc} code requests, "
              f"{fitted[-1] - fitted[nc - 1]} of {len(prose)} prose requests")
        return

    prompts = humaneval_prompts(args.prompts)
    q = max(1, len(prompts) // 4)
    ends = set(range(q)) | set(range(len(prompts) - q, len(prompts)))
    suffix_alone = SuffixSpeculator(vocab_size=target.config.vocab_size)
    baselines = {"plain": atlas.Engine(target, speculators=None, max_batch=1),
                 "suffix alone": atlas.Engine(target, speculators=[suffix_alone], max_batch=1),
                 "static head alone": atlas.Engine(target, speculators=[LearnedSpeculator(head)], max_batch=1)}
    for base in baselines.values():   # their first request's start-up (the controller's timings) left out
        base.generate(["def warm_up():\n"], max_new_tokens=8)
    side = {name: [] for name in baselines}
    print(f"\nfull atlas: the whole stream ({len(prompts)} requests, learning on); plain decoding and each "
          f"speculator alone: the first and last {q}, each right after full atlas", flush=True)
    frozen, outputs = {}, []
    heads_alone, learn_side = {}, {}   # learning off / on: the static head / the frozen adaptive head alone
    with atlas.Engine(target, max_batch=1, cache_dir=cache, learning_options=learning_options) as engine:
        adaptive = engine.speculators[1].native
        trainer = engine.observers[0].trainer

        def keep(s, o):
            outputs.append(o.token_ids)
            if s.index not in ends:   # what the suffix speculator alone would have indexed had it served it
                suffix_alone.add_document(o.token_ids)
            freeze = s.index + 1 == len(prompts) - q   # three quarters served: freeze the adaptive head
            if s.index not in ends and not freeze:
                return
            pausable = hasattr(trainer, "pause")   # a trainer process; a thread cannot be paused
            if pausable:
                trainer.pause()
            try:
                if freeze:
                    frozen["adaptive"] = snap = adaptive.snapshot()
                    frozen["version"] = snap.version
                    # Learning off and on, each head alone in an engine of its
                    # own, all new and warmed up alike here, so that their
                    # controllers start from the same state: the static head;
                    # the frozen adaptive head; the frozen adaptive head with
                    # request-local adaptation (a learning loop that is never
                    # started: it fits each prompt and trains nothing).
                    for name, h in (("off", head), ("on, no request-local fits", frozen_copy(head, snap)),
                                    ("on", frozen_copy(head, snap))):
                        spec = LearnedSpeculator(h)
                        observers = []
                        if name == "on":
                            observers = [LearningLoop(target, spec, head=h, checkpoint=False)]
                        heads_alone[name] = atlas.Engine(target, speculators=[spec], max_batch=1,
                                                         observers=observers)
                        heads_alone[name].generate(["def warm_up():\n"], max_new_tokens=8)
                        learn_side[name] = []
                if s.index not in ends:
                    return
                runs = [(name, base, side[name]) for name, base in baselines.items()]
                if s.index >= len(prompts) - q:   # (a stream of 2 requests freezes at its first quarter)
                    runs += [(f"head alone, learning {name}", e, learn_side[name]) for name, e in heads_alone.items()]
                for name, base, sink in runs:
                    got = serve(base, [prompts[s.index]], args.new_tokens)[0]
                    sink.append(got)
                    print(f"      {name}: {got.tokens_per_second:6.1f} tokens/s, tau {got.tau:4.2f}", flush=True)
            finally:
                if pausable:
                    trainer.resume()
        served = run(engine, prompts, args.new_tokens, "atlas", keep)
        fit_stats = heads_alone["on"].observers[0].stats()
        summary = engine.controller.summary()
        loop = engine.observers[0]
        learn = loop.stats()
    rows = {name: (totals(got[:q]), totals(got[-q:])) for name, got in side.items()}
    rows["full atlas"] = (totals(served[:q]), totals(served[-q:]))
    unseen = [(target.tokenizer.encode(p), out) for p, out in zip(prompts[-q:], outputs[-q:])]
    static_acc, static_chain = head_acceptance(target, LearnedSpeculator(head).native.snapshot(), unseen)
    adaptive_acc, adaptive_chain = head_acceptance(target, frozen["adaptive"], unseen)
    fitted_acc, fitted_chain = head_acceptance(target, frozen["adaptive"], unseen,
                                               twin=frozen_copy(head, frozen["adaptive"]))

    base_first, base_last = rows["plain"][0][0], rows["plain"][1][0]
    print("\n| decoder | first quarter tokens/s | tau | vs plain | last quarter tokens/s | tau | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for name, ((f_tps, f_tau), (l_tps, l_tau)) in rows.items():
        print(f"| {name} | {f_tps:.1f} | {f_tau:.2f} | {f_tps / base_first:.2f}x | {l_tps:.1f} | {l_tau:.2f} | "
              f"{l_tps / base_last:.2f}x |")
    # The quarter's totals weigh long and slow requests most, and the machine's
    # speed drifts; each request served by full atlas and then by a single
    # decoder in turn is a pair under the same conditions.
    print(f"\nfull atlas against each decoder, request by request in the last quarter ({q} pairs): "
          f"the mean of full atlas's tokens/s over the decoder's, +- its standard error")
    print("| decoder | mean ratio | standard error | requests full atlas served faster |\n|---|---|---|---|")
    for name, got in side.items():
        ratio = np.array([a.tokens_per_second / b.tokens_per_second for a, b in zip(served[-q:], got[-q:])])
        se = ratio.std(ddof=1) / np.sqrt(len(ratio)) if len(ratio) > 1 else float("nan")
        print(f"| {name} | {ratio.mean():.3f} | {se:.3f} | {int((ratio > 1).sum())} of {len(ratio)} |")
    (s_tps, s_tau), (a_tps, a_tau), (f_tps, f_tau) = (totals(learn_side[k]) for k in
                                                      ("off", "on, no request-local fits", "on"))
    print(f"\nlearning on vs off, on the last {q} requests (unseen by the adaptive head frozen after "
          f"{len(prompts) - q}, version {frozen['version']}); learning on: the frozen head fitted to each "
          f"request's prompt (request-local adaptation), and beside it the frozen head alone")
    print("| | static head (learning off) | adaptive head, frozen | ratio | adaptive head, frozen, fitted to "
          "each prompt (learning on) | ratio |\n|---|---|---|---|---|---|")
    for label, st, ad, fi in (
            ("serving alone: draft tokens accepted per step (tau - 1)", s_tau - 1, a_tau - 1, f_tau - 1),
            ("serving alone: tokens/s", s_tps, a_tps, f_tps),
            ("teacher-forced: depth-1 greedy acceptance", static_acc, adaptive_acc, fitted_acc),
            (f"teacher-forced: greedy chain tokens accepted (depth <= {CHAIN_DEPTH})", static_chain,
             adaptive_chain, fitted_chain)):
        print(f"| {label} | {st:.3f} | {ad:.3f} | {ad / max(st, 1e-9):.2f}x | {fi:.3f} | {fi / max(st, 1e-9):.2f}x |")
    for where, st in (("while serving alone", fit_stats), ("in full atlas", learn)):
        print(f"request-local fits {where}: {st['adaptations']} requests, "
              f"{1e3 * st['adapt_seconds'] / max(st['adaptations'], 1):.1f} ms each; skipped (not paying) "
              f"{st['adapt_skipped']}; errors {st['errors']}")
    print(f"\ncontroller: {summary}\nlearning: {learn}")
    plot_learning_curve(served, (base_first + base_last) / 2, args.out,
                        f"atlas on SmolLM2-135M, {len(prompts)} HumanEval requests, learning on")
    print(f"learning curve: {args.out}")


if __name__ == "__main__":
    main()
