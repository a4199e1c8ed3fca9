"""The learning loop: the tap against a plain reference on hand-made step
records, the replay buffer's bounds, eviction, recency weighting and held-out
slice, checkpoints (round trip, damaged files, atomic writes), the trainer
(it learns and pushes, refuses worse candidates and bad pushes, survives its
own failure), the trainer process (its faults: a trainer that raises, a
killed child, a refused push, a full channel; stop and engine close reap it),
the static distillation, and the whole loop through the engine, in a thread
and in a process, against transformers' greedy generate."""
import ast
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import atlas
from atlas.controller import Controller
from atlas.engine import StepRecord
from atlas.learning import (DraftHead, LearningLoop, ReplayBuffer, Tap, Trainer, distill, load_static,
                            static_head)
from atlas.learning.checkpoint import (ADAPTIVE, STATIC, Checkpoint, atomic_write, head_config,
                                       load_checkpoint, model_dir, model_key, save_checkpoint)
from atlas.learning.distill import function_prompts, stdlib_sources
from atlas.learning.tap import Examples
from atlas.learning.trainer import head_metric, native_metric
from atlas.speculators import LearnedSpeculator, SuffixSpeculator
from atlas.tree import DraftTree
from oracle import assert_same_greedy, hf_greedy, tiny_llama


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own checkpoint root: nothing touches ~/.cache."""
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the tap ---------------------------------------------------------------------------

def record(prefill, rids, sizes, tokens, parents, hidden, logits, accepted, emitted):
    q = np.zeros(len(sizes) + 1, np.int64)
    q[1:] = np.cumsum(sizes)
    return StepRecord(prefill, list(rids), q, np.asarray(tokens, np.int32), np.asarray(parents, np.int32),
                      hidden, logits, [np.asarray(a, np.int32) for a in accepted], [list(e) for e in emitted])


def reference_examples(records, k):
    """What the tap must produce, node by node, in float64: per example
    (parent feature, token, top-k ids, top-k logits, feature, index of the
    parent's example in the list or None)."""
    out, state = [], {}
    for rec in records:
        H = rec.hidden.double().numpy()
        L = rec.logits.double().numpy()
        for b, rid in enumerate(rec.rids):
            lo, hi = int(rec.q_offsets[b]), int(rec.q_offsets[b + 1])

            def dist(row):
                ids = np.argsort(-L[row], kind="stable")[:k]
                return ids, L[row][ids]

            if rec.prefill:
                idx = None
                if hi - lo >= 2:
                    ids, p = dist(b)
                    out.append((H[hi - 2], rec.tokens[hi - 1], ids, p, H[hi - 1], None))
                    idx = len(out) - 1
                state[rid] = (H[hi - 1], idx)
                continue
            node_idx = {}
            for i in range(hi - lo):
                par = int(rec.parents[lo + i])
                if par < 0:
                    if rid not in state:
                        continue
                    pf, pidx = state[rid]
                else:
                    pf, pidx = H[lo + par], node_idx.get(par)
                ids, p = dist(lo + i)
                out.append((pf, rec.tokens[lo + i], ids, p, H[lo + i], pidx))
                node_idx[i] = len(out) - 1
            acc = rec.accepted[b]
            last = int(acc[-1]) if len(acc) else 0
            state[rid] = (H[lo + last], node_idx.get(last))
    return out


def concat(exs):
    return Examples(*(np.concatenate([getattr(e, f) for e in exs]) for f in
                      ("parent_feature", "token", "topk_ids", "topk_logits", "feature", "parent_back")))


def test_tap_examples_match_a_plain_reference():
    """Two requests through a prefill and two decode steps, with branching
    trees, rejected nodes, a step that accepts nothing and a one-token prompt
    (no prefill example, but its feature is tracked)."""
    rng = np.random.default_rng(3)
    H, V, k = 11, 37, 5

    def rnd(n, width):
        return torch.from_numpy(rng.standard_normal((n, width)).astype(np.float32) * 3)

    recs = [
        # prefill: rid 7 has a 5-token prompt, rid 9 a 1-token prompt
        record(True, [7, 9], [5, 1], [3, 4, 5, 6, 8, 2], [-1, 0, 1, 2, 3, -1], rnd(6, H), rnd(2, V),
               [[], []], [[10], [11]]),
        # decode: rid 7's tree 0 <- 1 <- 2 <- 4, 0 <- 3, accepted [1, 2]; rid 9's 0 <- 1, 0 <- 2, none
        record(False, [7, 9], [5, 3], [10, 12, 13, 14, 15, 11, 16, 17], [-1, 0, 1, 0, 2, -1, 0, 0],
               rnd(8, H), rnd(8, V), [[1, 2], []], [[12, 13, 20], [21]]),
        # decode: rid 9 first (batch order may change), chain accepted [1, 2]; rid 7's 0 <- 1, accepted [1]
        record(False, [9, 7], [3, 2], [21, 22, 23, 20, 24], [-1, 0, 1, -1, 0], rnd(5, H), rnd(5, V),
               [[1, 2], [1]], [[22, 23, 30], [24, 31]]),
    ]
    got = []
    tap = Tap(V, k, sink=got.append)
    for r in recs:
        tap.observe(r)
    want = reference_examples(recs, k)
    ex = concat(got)
    assert len(ex) == len(want) == tap.examples == 1 + (5 + 3) + (3 + 2)
    for i, (pf, tok, ids, p, feat, pidx) in enumerate(want):
        np.testing.assert_array_equal(ex.parent_feature[i], pf.astype(np.float32))
        assert ex.token[i] == tok
        np.testing.assert_array_equal(ex.topk_ids[i], ids)
        np.testing.assert_array_equal(ex.topk_logits[i], p.astype(np.float32))
        np.testing.assert_array_equal(ex.feature[i], feat.astype(np.float32))
        assert ex.parent_back[i] == (0 if pidx is None else i - pidx), i
    # The root of rid 7's second step reads the feature of its last accepted node (node 2 of step 2).
    H2 = recs[1].hidden.numpy()
    root7 = [i for i, w in enumerate(want) if w[1] == 20][0]
    np.testing.assert_array_equal(ex.parent_feature[root7], H2[2])
    # Nothing accepted: rid 9's next root reads its previous root's feature.
    root9 = [i for i, w in enumerate(want) if w[1] == 21 and i > 5][0]
    np.testing.assert_array_equal(ex.parent_feature[root9], H2[5])
    # Counts: prompts and emitted tokens.
    counted = [3, 4, 5, 6, 8, 2, 10, 11, 12, 13, 20, 21, 22, 23, 30, 24, 31]
    np.testing.assert_array_equal(tap.counts, np.bincount(counted, minlength=V))
    # A request the tap forgets starts over: its next root has no parent feature.
    tap.forget(7)
    ex2 = tap.examples_of(record(False, [7], [2], [31, 1], [-1, 0], rnd(2, H), rnd(2, V), [[]], [[1]]))
    assert len(ex2) == 1 and ex2.token[0] == 1
    # With flush_rows the sink gets the same examples in fewer, larger batches:
    # each as soon as at least that many wait, the rest at flush().
    batched = []
    tap = Tap(V, k, sink=batched.append, flush_rows=9)
    for r in recs:
        tap.observe(r)
    assert [len(b) for b in batched] == [1 + 8] and tap.waiting == 5
    tap.flush()
    assert [len(b) for b in batched] == [9, 5] and tap.waiting == 0
    tap.flush()
    assert len(batched) == 2
    joined = concat(batched)
    for f in ex.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(joined, f), getattr(ex, f))
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="flush_rows"):
            Tap(V, k, flush_rows=bad)


def test_tap_refuses_a_bad_vocabulary_or_topk():
    for vocab in (0, -3, True, 2.5, "19"):
        with pytest.raises(ValueError, match="vocab"):
            Tap(vocab, 4)
    for topk in (0, 20, True, 2.0):
        with pytest.raises(ValueError, match="topk"):
            Tap(19, topk)
    assert Tap(np.int64(19), 4).vocab == 19


def test_tap_reads_bfloat16_hidden_states():
    rng = np.random.default_rng(4)
    hidden = torch.from_numpy(rng.standard_normal((3, 8)).astype(np.float32)).to(torch.bfloat16)
    logits = torch.from_numpy(rng.standard_normal((1, 19)).astype(np.float32))
    ex = Tap(19, 4).examples_of(record(True, [0], [3], [1, 2, 3], [-1, 0, 1], hidden, logits, [[]], [[4]]))
    np.testing.assert_array_equal(ex.feature[0], hidden[2].float().numpy())
    np.testing.assert_array_equal(ex.parent_feature[0], hidden[1].float().numpy())


def test_tap_prompt_examples_cover_every_prompt_token_and_leave_their_targets_to_the_trainer():
    """With prompt_examples, a prefill gives an example for every prompt token
    after the first, each the parent of the next; only the last carries the
    target's top-k (the record has logits for it alone), the others -1 / -inf,
    and the next step's root links to the last one."""
    rng = np.random.default_rng(5)
    H, V, k = 6, 23, 4
    hidden = torch.from_numpy(rng.standard_normal((6, H)).astype(np.float32))
    logits = torch.from_numpy(rng.standard_normal((2, V)).astype(np.float32))
    # rid 3: a 4-token prompt; rid 4: a 2-token prompt
    pre = record(True, [3, 4], [4, 2], [5, 6, 7, 8, 9, 10], [-1, 0, 1, 2, -1, 0], hidden, logits, [[], []],
                 [[11], [12]])
    got = []
    tap = Tap(V, k, sink=got.append, prompt_examples=True)
    tap.observe(pre)
    ex = got[0]
    assert len(ex) == 3 + 1 == tap.examples
    np.testing.assert_array_equal(ex.token, [6, 7, 8, 10])
    np.testing.assert_array_equal(ex.feature, hidden[[1, 2, 3, 5]].numpy())
    np.testing.assert_array_equal(ex.parent_feature, hidden[[0, 1, 2, 4]].numpy())
    np.testing.assert_array_equal(ex.parent_back, [0, 1, 1, 0])
    np.testing.assert_array_equal(ex.missing_targets(), [True, True, False, False])
    assert (ex.topk_ids[:2] == -1).all() and np.isneginf(ex.topk_logits[:2]).all()
    for row, b in ((2, 0), (3, 1)):
        want = np.argsort(-logits[b].numpy(), kind="stable")[:k]
        np.testing.assert_array_equal(ex.topk_ids[row], want)
        np.testing.assert_array_equal(ex.topk_logits[row], logits[b].numpy()[want])
    # The next decode step's root (rid 3) reads the last prompt row and links to its example.
    dec = record(False, [3], [2], [11, 13], [-1, 0], torch.zeros(2, H), torch.zeros(2, V), [[]], [[13]])
    ex2 = tap.examples_of(dec)
    np.testing.assert_array_equal(ex2.parent_feature[0], hidden[3].numpy())
    assert ex2.parent_back[0] == 4 - 2   # the root is example 4; rid 3's last prompt row example 2
    # Without prompt_examples the same prefill gives one example per request, with targets.
    plain = Tap(V, k).examples_of(pre)
    assert len(plain) == 2 and not plain.missing_targets().any()
    with pytest.raises(ValueError, match="prompt_examples"):
        Tap(V, k, prompt_examples=1)


def test_tap_hands_each_prompt_to_the_prompt_sink():
    """With a prompt sink, a prefill's examples go there, one call per request
    with its own prompt's rows (what examples_of gives for them), after what
    waited went to the sink; decode steps still go to the sink."""
    rng = np.random.default_rng(6)
    H, V, k = 6, 23, 4
    hidden = torch.from_numpy(rng.standard_normal((7, H)).astype(np.float32))
    logits = torch.from_numpy(rng.standard_normal((3, V)).astype(np.float32))
    # rid 3: a 4-token prompt; rid 4: a 1-token prompt (no example); rid 5: 2 tokens
    pre = record(True, [3, 4, 5], [4, 1, 2], [5, 6, 7, 8, 9, 10, 11], [-1, 0, 1, 2, -1, -1, 0], hidden, logits,
                 [[], [], []], [[12], [13], [14]])
    want = Tap(V, k, prompt_examples=True).examples_of(pre)
    sunk, prompts = [], []
    tap = Tap(V, k, sink=sunk.append, prompt_examples=True, flush_rows=100,
              prompt_sink=lambda rid, ex: prompts.append((rid, ex)))
    dec = record(False, [9], [2], [11, 13], [-1, 0], torch.zeros(2, H), torch.zeros(2, V), [[]], [[13]])
    tap.observe(dec)          # waits (flush_rows)
    assert tap.waiting == 1 and not sunk
    tap.observe(pre)
    assert len(sunk) == 1 and len(sunk[0]) == 1   # the waiting step first
    assert [rid for rid, _ in prompts] == [3, 5]
    got = Examples.concat([ex for _, ex in prompts])
    for f in Examples.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert len(prompts[0][1]) == 3 and prompts[0][1].parent_back[0] == 0 and prompts[1][1].parent_back[0] == 0
    with pytest.raises(ValueError, match="prompt_sink needs prompt_examples"):
        Tap(V, k, prompt_sink=lambda rid, ex: None)


def test_fill_targets_computes_the_draft_vocabulary_top_k_of_rows_without_targets(tiny):
    from atlas.learning.trainer import fill_targets
    _, target, _, _ = tiny
    H, k = target.config.hidden_size, 5
    ids = np.arange(3, target.config.vocab_size, 7)[:40]
    head = DraftHead.from_target(target, ids)
    rng = np.random.default_rng(8)
    n = 6
    feats = rng.standard_normal((n, H)).astype(np.float32)
    top_ids = rng.integers(0, 50, (n, k)).astype(np.int32)
    top_l = np.sort(rng.standard_normal((n, k)).astype(np.float32))[:, ::-1].copy()
    top_ids[[1, 4]] = -1
    top_l[[1, 4]] = -np.inf
    ex = Examples(feats + 1, np.arange(n, dtype=np.int32), top_ids, top_l, feats, np.zeros(n, np.int64))
    cache = {}
    out = fill_targets(ex, head, cache)
    assert not out.missing_targets().any()
    lm = target.model.lm_head.detach().float().numpy()[ids]
    for r in range(n):
        if r in (1, 4):
            logits = lm.astype(np.float64) @ feats[r].astype(np.float64)
            want = np.argsort(-logits, kind="stable")[:k]
            np.testing.assert_array_equal(out.topk_ids[r], ids[want])
            np.testing.assert_allclose(out.topk_logits[r], logits[want], rtol=1e-5, atol=1e-5)
        else:   # rows with targets are left as they were
            np.testing.assert_array_equal(out.topk_ids[r], top_ids[r])
            np.testing.assert_array_equal(out.topk_logits[r], top_l[r])
    assert "rows" in cache and fill_targets(out, head, cache) is out
    # More top-k slots than draft tokens: the rest stay empty (-1, -inf).
    small = DraftHead.from_target(target, ids[:3])
    wide = fill_targets(ex, small)
    assert (wide.topk_ids[1, 3:] == -1).all() and np.isneginf(wide.topk_logits[1, 3:]).all()
    assert set(wide.topk_ids[1, :3]) == set(ids[:3])
    # A replay buffer refuses rows without targets; the trainer fills them first.
    buf = ReplayBuffer(H, k, capacity=100, max_bytes=None, held_out=0)
    with pytest.raises(ValueError, match="without targets"):
        buf.add(ex)
    assert buf.size == 0
    Trainer(head, buf).add_examples(ex)
    assert buf.size == n and (buf.topk_ids[:n] >= 0).all()


# ---- the replay buffer -----------------------------------------------------------------

def examples(tokens, hidden=5, k=3, back=None):
    n = len(tokens)
    t = np.asarray(tokens, np.int32)
    feat = np.repeat(t[:, None].astype(np.float32), hidden, 1)
    return Examples(feat + 0.5, t, np.repeat(t[:, None], k, 1), np.full((n, k), 0.25, np.float32), feat,
                    np.zeros(n, np.int64) if back is None else np.asarray(back, np.int64))


def test_replay_capacity_is_bounded_in_examples_and_bytes():
    per = ReplayBuffer.bytes_per_example(5, 3)
    assert per == 2 * 5 * 2 + 4 + 3 * 8 + 8
    b = ReplayBuffer(5, 3, max_bytes=per * 13 + per // 2)
    assert b.capacity == 13 and b.nbytes <= per * 13 + per // 2
    b = ReplayBuffer(5, 3, capacity=10, max_bytes=1 << 20)
    assert b.capacity == 10 and b.nbytes == 10 * per
    b = ReplayBuffer(5, 3, capacity=1000, max_bytes=per * 20)
    assert b.capacity == 20
    with pytest.raises(ValueError, match="at least 2"):
        ReplayBuffer(5, 3, max_bytes=per)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(5, 3, capacity=None, max_bytes=None)


def test_replay_evicts_the_oldest_and_reports_full(caplog):
    b = ReplayBuffer(5, 3, capacity=10, max_bytes=None, held_out=0)
    b.add(examples(range(7)))
    assert not b.full and b.size == 7 and b.evicted == 0
    with caplog.at_level("INFO", logger="atlas.learning"):
        b.add(examples(range(7, 25)))
    assert b.full and b.size == 10 and b.evicted == 15 and b.total == 25
    assert "replay buffer full" in caplog.text
    assert sorted(b.token.tolist()) == list(range(15, 25))
    # Stored features are the examples' (float16 holds these integers exactly).
    slot = 24 % 10
    assert b.token[slot] == 24 and np.all(b.feature[slot] == 24) and np.all(b.parent_feature[slot] == 24.5)
    # A batch larger than the ring keeps its newest rows.
    b.add(examples(range(100, 131)))
    assert sorted(b.token.tolist()) == list(range(121, 131)) and b.total == 56


def test_replay_sampling_favours_recent_traffic():
    """Empirical age frequencies against P(age a) ~ 2^(-a / half_life), each
    within 5 standard deviations of its binomial count."""
    n_train, half_life = 40, 8.0
    b = ReplayBuffer(5, 3, capacity=64, max_bytes=None, held_out=0, half_life=half_life)
    b.add(examples(range(n_train)))
    rng = np.random.default_rng(0)
    draws = 200_000
    toks = np.concatenate([b.sample(10_000, rng).token.numpy() for _ in range(draws // 10_000)])
    ages = n_train - 1 - toks
    w = 2.0 ** (-np.arange(n_train) / half_life)
    p = w / w.sum()
    counts = np.bincount(ages, minlength=n_train)
    sd = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(counts - draws * p) <= 5 * sd + 1), (counts, draws * p)
    # half_life = inf: uniform.
    u = ReplayBuffer(5, 3, capacity=64, max_bytes=None, held_out=0, half_life=math.inf)
    u.add(examples(range(n_train)))
    counts = np.bincount(n_train - 1 - u.sample(draws, rng).token.numpy(), minlength=n_train)
    p = 1 / n_train
    assert np.all(np.abs(counts - draws * p) <= 5 * np.sqrt(draws * p * (1 - p)) + 1)


def test_replay_holds_out_the_most_recent_slice():
    b = ReplayBuffer(5, 3, capacity=30, max_bytes=None, held_out=4, held_out_fraction=0.25)
    assert b.sample(8, np.random.default_rng(0)) is None and b.held_out_batch() is None
    b.add(examples(range(8)))                 # 25% of 8 = 2 held out
    assert b.held_out_size == 2 and b.train_size == 6
    assert b.held_out_batch().token.tolist() == [6, 7]
    b.add(examples(range(8, 50)))             # full: 30 held, the last 4 held out
    assert b.held_out_batch().token.tolist() == [46, 47, 48, 49]
    seen = b.sample(5000, np.random.default_rng(1)).token.numpy()
    assert seen.min() >= 20 and seen.max() <= 45 and len(np.unique(seen)) == 26


def test_replay_parent_links():
    b = ReplayBuffer(5, 3, capacity=6, max_bytes=None, held_out=0, half_life=math.inf)
    b.add(examples([10, 11, 12], back=[0, 1, 2]))   # 11 <- 10, 12 <- 10
    got = b.sample(400, np.random.default_rng(0))
    for i in range(len(got)):
        tok = int(got.token[i])
        if tok == 10:
            assert not got.has_parent[i] and got.parent_token[i] == 0
        else:
            assert got.has_parent[i] and got.parent_token[i] == 10
            assert torch.all(got.parent_parent_feature[i] == 10.5)
    b.add(examples([13, 14, 15, 16], back=[1, 0, 0, 0]))  # 10 evicted: 13's parent 12 stays, 11's link dies
    got = b.sample(400, np.random.default_rng(1))
    for i in range(len(got)):
        tok = int(got.token[i])
        assert bool(got.has_parent[i]) == (tok == 13), tok
        if tok == 13:
            assert got.parent_token[i] == 12 and torch.all(got.parent_parent_feature[i] == 12.5)


# ---- a tiny target and its tapped greedy traffic ----------------------------------------------

def greedy_records(model, prompt, cont, rid, depth):
    """The records an engine would hand over while decoding prompt -> cont
    greedily with chain drafts that are all accepted, computed with
    transformers on the whole sequence (a teacher-forced forward gives each
    tree node's hidden state and logits)."""
    seq = list(prompt) + list(cont)
    with torch.no_grad():
        h = model.model(torch.tensor([seq])).last_hidden_state[0]
        logits = model.lm_head(h).float()
    P = len(prompt)
    recs = [record(True, [rid], [P], prompt, np.arange(-1, P - 1), h[:P], logits[P - 1:P], [[]], [[cont[0]]])]
    s = P
    n = depth + 1
    while s + n < len(seq):
        recs.append(record(False, [rid], [n], seq[s:s + n], np.arange(-1, n - 1), h[s:s + n], logits[s:s + n],
                           [np.arange(1, n)], [seq[s + 1:s + n + 1]]))
        s += n  # the bonus token is the next root
    return recs


def peaked_llama(seed=0):
    """A tiny random Llama whose next-token distributions are peaked like a
    trained model's: a random model's are almost uniform (mean top-1
    probability 0.004 against 1/397), which leaves a draft head nothing to
    learn but noise. Scaling the output layer by 16 raises it to about 0.2
    and leaves every greedy choice as it was."""
    model = tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(16.0)
    return model


def batched_greedy(model, prompts, n):
    """Greedy continuations of equal-length prompts, all at once (training
    data only; the oracle comparisons use transformers' generate)."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, len(prompts[0]):].tolist()


@pytest.fixture(scope="module")
def tiny():
    """A peaked tiny target and a repetitive stream of traffic: 10 prompts,
    each served 4 times in a shuffled order, with 48 greedy tokens each."""
    model = peaked_llama()
    target = atlas.load(model)
    vocab = target.config.vocab_size
    rng = np.random.default_rng(22)
    base = [rng.integers(1, vocab, size=8).tolist() for _ in range(10)]
    prompts = [base[i] for i in rng.permutation(np.repeat(np.arange(10), 4))]
    conts = batched_greedy(model, prompts, 48)
    return model, target, prompts, conts


def tapped_buffer(tiny, held_out=256, capacity=20_000):
    model, target, prompts, conts = tiny
    buf = ReplayBuffer(target.config.hidden_size, 16, capacity=capacity, max_bytes=None, held_out=held_out,
                       held_out_fraction=0.3)
    tap = Tap(target.config.vocab_size, 16, sink=buf.add)
    for rid, (p, c) in enumerate(zip(prompts, conts)):
        for r in greedy_records(model, p, c, rid, depth=3):
            tap.observe(r)
    return buf, tap


def fresh_head(target, seed=1, draft_vocab=None):
    vocab = target.config.vocab_size
    return DraftHead.from_target(target, np.arange(draft_vocab or vocab), seed=seed)


# ---- the trainer -----------------------------------------------------------------------------

def test_trainer_improves_the_held_out_metric_and_pushes(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    assert buf.held_out_size == 256 and buf.train_size > 1000
    spec = LearnedSpeculator(fresh_head(target), max_depth=3)
    pushed = []
    tr = Trainer(fresh_head(target), buf, spec, lr=3e-3, steps_per_round=60, nice=0, max_share=1.0,
                 on_push=lambda v, w, m: pushed.append((v, m)))
    start_cand, start_live = tr.evaluate()
    assert start_cand == pytest.approx(start_live)  # same initial weights: twin and native agree
    results = [tr.round() for _ in range(4)]
    print("held-out metric by round:", [(r["candidate"], r["live"]) for r in results])
    # Measured: 0.04 untrained, 0.6 to 0.8 after 240 steps.
    assert results[-1]["candidate"] >= start_cand + 0.3
    assert tr.pushes >= 1 and spec.version == 1 + tr.pushes and pushed[-1][0] == spec.version
    # The version history holds the metric each version was pushed with.
    hist = dict(spec.history)
    assert hist[pushed[-1][0]] == pytest.approx(pushed[-1][1])
    # After a push the live version is the trainer's average: the native forward agrees with
    # the twin (up to a rare argmax flip where two logits are within rounding).
    held = buf.held_out_batch()
    if results[-1]["pushed"] is not None:
        assert native_metric(spec.native, held) == pytest.approx(head_metric(tr.average, held),
                                                                 abs=2 / len(held))
    assert tr.stats()["train_steps"] == 240 and tr.errors == 0


def test_the_self_fed_term_covers_the_asked_share_of_a_batch(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    batch = buf.sample(64, np.random.default_rng(0))
    assert int(batch.has_parent.sum()) > 32
    head = fresh_head(target)
    target_logits = batch.topk_logits

    def plain(rows):
        return head.loss(batch.parent_feature, batch.token, batch.feature, target_logits, batch.topk_ids)[0] \
            if rows is None else \
            head.loss(head(batch.parent_parent_feature[rows], batch.parent_token[rows])[0], batch.token[rows],
                      batch.feature[rows], target_logits[rows], batch.topk_ids[rows])[0]

    with torch.no_grad():
        base = plain(None)
        for share in (0.0, 0.25, 1.0):
            tr = Trainer(head, buf, None, self_feed=share, precision="float32")
            got, _ = tr.loss(batch)
            rows = batch.has_parent.clone()
            rows[int(round(share * len(rows))):] = False
            want = base + (plain(rows) if rows.any() else 0.0)
            assert float(got) == pytest.approx(float(want), rel=1e-5), share
    for bad in (-0.1, 1.5, "yes"):
        with pytest.raises(ValueError, match="self_feed"):
            Trainer(head, buf, None, self_feed=bad)
    # The learning loop's trainer leaves the term out by default (its CPU time is scarce).
    loop = LearningLoop(target, LearnedSpeculator(head), checkpoint=False, process=False)
    assert loop.trainer.self_feed == 0.0
    loop = LearningLoop(target, LearnedSpeculator(head), checkpoint=False, process=False, self_feed=1.0)
    assert loop.trainer.self_feed == 1.0


def test_a_frozen_output_layer_stays_as_it_was_while_the_rest_learns(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    head = fresh_head(target)
    before = head.export()
    tr = Trainer(head, buf, None, train_output=False, batch_size=32, min_train=32, min_held_out=1,
                 precision="float32")
    assert tr.train_steps(5) == 5 and tr.skipped_steps == 0
    after, avg = head.export(), tr.average.export()
    np.testing.assert_array_equal(after["w_out"], before["w_out"])
    np.testing.assert_array_equal(avg["w_out"], before["w_out"])
    for name in ("w_in", "w_gate", "w_up", "w_down"):
        assert not np.array_equal(after[name], before[name]), name
        assert not np.array_equal(avg[name], before[name]), name
    assert all(p is not head.w_out for g in tr.opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="train_output"):
        Trainer(head, buf, None, train_output="no")
    # The learning loop freezes it by default, and trains it when asked.
    loop = LearningLoop(target, LearnedSpeculator(head), checkpoint=False, process=False)
    assert loop.trainer.train_output is False and loop.trainer.head.w_out.requires_grad is False
    loop = LearningLoop(target, LearnedSpeculator(head), checkpoint=False, process=False, train_output=True)
    assert loop.trainer.head.w_out.requires_grad is True


def test_rounds_evaluate_and_push_the_moving_average_of_the_weights(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    spec = LearnedSpeculator(fresh_head(target), max_depth=3)
    tr = Trainer(fresh_head(target), buf, spec, ema=0.5, steps_per_round=1, lr=3e-3, precision="float32",
                 min_gain=-1.0)   # push whatever the round measures
    # The average shares the frozen embedding and starts as a copy of the weights.
    assert tr.average is not tr.head and tr.average.embed.data_ptr() == tr.head.embed.data_ptr()
    before = {k: v.detach().clone() for k, v in tr.head.named_parameters()}
    assert tr.train_steps(1) == 1
    for name, p in tr.average.named_parameters():
        want = 0.5 * before[name] + 0.5 * getattr(tr.head, name).detach()
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=1e-7), name
    assert not torch.equal(tr.average.w_out, tr.head.w_out)
    out = tr.round()
    assert out["pushed"] == spec.version == 2
    held = buf.held_out_batch()
    assert out["candidate"] == pytest.approx(head_metric(tr.average, held))
    pushed = spec.native.snapshot()
    assert np.array_equal(pushed.draft_ids, tr.average.draft_ids.numpy())
    assert native_metric(spec.native, held) == pytest.approx(head_metric(tr.average, held), abs=2 / len(held))
    # ema=0: no average, the rounds use the weights themselves.
    tr0 = Trainer(fresh_head(target), buf, None, ema=0)
    assert tr0.average is tr0.head
    for bad in (-0.1, 1.0, True, "0.9"):
        with pytest.raises(ValueError, match="ema"):
            Trainer(fresh_head(target), buf, None, ema=bad)


def test_trainer_precision(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    features = atlas._native.cpu_features()
    assert set(features) == {"avx2_fma", "avx512f", "avx512_bf16", "amx_bf16"}
    assert all(isinstance(v, bool) for v in features.values())
    native_bf16 = features["avx512_bf16"] or features["amx_bf16"]
    head = fresh_head(target)
    assert Trainer(head, buf, None).precision == ("bfloat16" if native_bf16 else "float32")
    batch = buf.sample(64, np.random.default_rng(0))
    with torch.no_grad():
        full, _ = Trainer(head, buf, None, precision="float32").loss(batch)
        half, _ = Trainer(head, buf, None, precision="bfloat16").loss(batch)
    # bfloat16 products: about 3 significant digits.
    assert float(half) == pytest.approx(float(full), rel=2e-2) and float(half) != float(full)
    with pytest.raises(ValueError, match="precision"):
        Trainer(head, buf, None, precision="float16")
    # bfloat16 steps learn: the held-out metric rises as in float32.
    tr = Trainer(fresh_head(target), buf, None, lr=3e-3, precision="bfloat16", ema=0)
    start, _ = tr.evaluate()
    tr.train_steps(120)
    assert tr.evaluate()[0] >= start + 0.2 and all(p.dtype == torch.float32 for p in tr.head.parameters())


def _prompt_of(tiny, i):
    """The tap's examples of fixture prompt i and its continuation's first
    tokens (targets left to fill), and the records of the whole request."""
    model, _, prompts, conts = tiny
    recs = greedy_records(model, prompts[i], conts[i], i, depth=3)
    got = []
    tap = Tap(model.config.vocab_size, 16, prompt_examples=True, prompt_sink=lambda rid, ex: got.append(ex))
    tap.observe(recs[0])
    return got[0], recs


def test_adapt_to_prompt_fits_the_mlp_from_the_given_weights(tiny):
    from atlas.learning.adapt import ADAPT_TENSORS, adapt_to_prompt
    from atlas.learning.head import distillation_loss
    from atlas.learning.trainer import fill_targets
    _, target, _, _ = tiny
    head = fresh_head(target, seed=4)
    before = {k: v.copy() for k, v in head.export().items()}
    raw, _ = _prompt_of(tiny, 0)
    ex = fill_targets(raw, head)
    # Targets missing: the fit computes those of the rows it samples, the
    # same as filled beforehand; the examples stay as they were.
    cache, unfilled = {}, raw.missing_targets()
    assert unfilled.sum() == len(raw) - 1   # (the last row's targets come from the prefill's logits)
    np.testing.assert_array_equal(adapt_to_prompt(head, raw, batch=3, cache=cache)["w_gate"],
                                  adapt_to_prompt(head, ex, batch=3)["w_gate"])
    np.testing.assert_array_equal(raw.missing_targets(), unfilled)
    assert "rows" in cache
    with pytest.raises(ValueError, match="steps must be a positive int"):
        adapt_to_prompt(head, ex, steps=0)
    with pytest.raises(ValueError, match="no examples"):
        adapt_to_prompt(head, ex.rows(0, 0))
    w = adapt_to_prompt(head, ex, steps=8, lr=3e-3)
    assert sorted(w) == sorted(ADAPT_TENSORS)
    for name, arr in head.export().items():   # the head itself is as it was
        np.testing.assert_array_equal(arr, before[name])

    def loss(weights):
        t = {k: torch.from_numpy(v) for k, v in weights.items()}
        with torch.no_grad():
            f_hat, logits = head.forward_with(torch.from_numpy(ex.parent_feature), torch.from_numpy(ex.token), t)
            return float(distillation_loss(logits, f_hat, torch.from_numpy(ex.feature),
                                           torch.from_numpy(ex.topk_logits), torch.from_numpy(ex.topk_ids),
                                           head.full_to_draft)[0])

    assert loss(w) < loss({k: before[k] for k in ADAPT_TENSORS}) - 0.05
    for name in ADAPT_TENSORS:
        assert w[name].dtype == np.float32 and w[name].shape == before[name].shape
        assert not np.array_equal(w[name], before[name])
    # Only the last max_rows rows count.
    np.testing.assert_array_equal(adapt_to_prompt(head, ex, max_rows=2)["w_up"],
                                  adapt_to_prompt(head, ex.rows(len(ex) - 2, len(ex)))["w_up"])
    with pytest.raises(ValueError, match="replaced names unknown tensors"):
        head.forward_with(torch.from_numpy(ex.parent_feature), torch.from_numpy(ex.token), {"embed": head.embed})


def test_the_loop_fits_each_prompt_for_its_own_request(tiny):
    """Right after a prefill the loop fits the live head to the prompt and
    the speculator drafts that request with the result, while the live
    version stays; the prompt's examples still reach the trainer's sink.
    A loop never started fits too. adapt_steps=0: no fits. A fit that fails
    is counted, and serving goes on."""
    model, target, prompts, conts = tiny
    head = fresh_head(target, seed=2)
    spec = LearnedSpeculator(head, max_depth=3)
    loop = LearningLoop(target, spec, head=head, checkpoint=False, process=False)
    sunk = []
    loop._sink = sunk.append
    recs = greedy_records(model, prompts[1], conts[1], 1, depth=3)
    spec.start(1, prompts[1])
    for r in recs[:2]:
        spec.observe(r)
        loop.observe(r)
    st = loop.stats()
    assert st["adaptations"] == 1 and st["adapt_seconds"] > 0 and st["errors"] == 0, st
    assert spec.adapted_requests == 1 and spec.version == 1
    # (their targets are the trainer's to compute: Trainer.add_examples)
    assert len(sunk) == 1 and len(sunk[0]) == len(prompts[1]) - 1
    assert sunk[0].missing_targets().sum() == len(sunk[0]) - 1
    # The request drafts with its own version: not what the live one drafts.
    local = spec._local[1]
    assert local.derived and local.version == 1
    assert not np.array_equal(local.tensor("w_up"), spec.native.snapshot().tensor("w_up"))
    # Off, and bad settings.
    off = LearningLoop(target, LearnedSpeculator(head, max_depth=3), head=head, checkpoint=False, process=False,
                       adapt_steps=0)
    off.observe(recs[0])
    assert off.stats()["adaptations"] == 0
    for bad, match in ((dict(adapt_steps=-1), "adapt_steps"), (dict(adapt_lr=0.0), "adapt_lr")):
        with pytest.raises(ValueError, match=match):
            LearningLoop(target, spec, head=head, checkpoint=False, process=False, **bad)
    # A failing fit: reported, the examples still go on, nothing raised.
    spec.start(2, prompts[2])
    def refuse(*args):
        raise RuntimeError("refused for the test")

    spec.adapt = refuse
    loop.observe(greedy_records(model, prompts[2], conts[2], 2, depth=3)[0])
    st = loop.stats()
    assert st["adaptations"] == 1 and st["errors"] == 1 and "request-local fit failed" in st["last_error"]
    assert len(sunk) == 2


def test_the_loop_fits_a_prompt_only_where_the_fit_pays(tiny):
    """With an engine attached, the loop fits a request when adapt_gain
    (default ADAPT_GAIN) of what the speculator's drafts save it (the
    engine's measure) is at least the median time of its latest fits (not
    its first, which starts up); while either is unknown it fits. A prompt
    not fitted still reaches the trainer's sink. adapt_gain must be > 0."""
    from atlas.learning.adapt import ADAPT_GAIN
    model, target, prompts, conts = tiny
    head = fresh_head(target, seed=2)
    spec = LearnedSpeculator(head, max_depth=3)
    loop = LearningLoop(target, spec, head=head, checkpoint=False, process=False)
    sunk, asked = [], []
    loop._sink = sunk.append

    class Measure:   # what the loop reads of its engine
        value = None

        def speculation_value(self, speculator, rid):
            assert speculator is spec
            asked.append(rid)
            return self.value

    measure = Measure()
    loop.attach(measure)

    def prefill(rid):
        spec.start(rid, prompts[rid])
        rec = greedy_records(model, prompts[rid], conts[rid], rid, depth=3)[0]
        spec.observe(rec)
        loop.observe(rec)

    prefill(1)                                   # nothing measured: it fits
    measure.value = 0.0
    prefill(2)                                   # its first fit's time does not count (start-up): fits again
    assert loop.adaptations == 2 and loop.adapt_skipped == 0 and len(loop._fit_seconds) == 1
    cost = loop._fit_seconds[0]
    assert 0 < cost < loop.adapt_seconds
    measure.value = 0.5 * cost / ADAPT_GAIN      # a fit would save half what it costs
    prefill(3)
    st = loop.stats()
    assert st["adaptations"] == 2 and st["adapt_skipped"] == 1 and 3 not in spec._local
    assert len(sunk) == 3 and len(sunk[2]) == len(prompts[3]) - 1
    measure.value = 2 * cost / ADAPT_GAIN        # twice
    prefill(4)
    assert loop.adaptations == 3 and loop.adapt_skipped == 1 and 4 in spec._local
    assert asked == [1, 2, 3, 4]
    # A larger expected gain: the same measure now pays.
    loop.adapt_gain = 4 * ADAPT_GAIN
    measure.value = 0.5 * float(np.median(loop._fit_seconds)) / ADAPT_GAIN
    prefill(5)
    assert loop.adaptations == 4 and loop.adapt_skipped == 1
    for bad in (0.0, -1.0, "0.1", True):
        with pytest.raises(ValueError, match="adapt_gain"):
            LearningLoop(target, spec, head=head, checkpoint=False, process=False, adapt_gain=bad)
    always = LearningLoop(target, spec, head=head, checkpoint=False, process=False, adapt_gain=float("inf"))
    assert always.adapt_gain == float("inf")


def test_the_engine_measures_what_a_speculators_drafts_save_a_request(tiny):
    """Engine.speculation_value: the tokens a request may still emit, times
    the share of emitted tokens only that speculator drafted, times what a
    token costs now; None before any step, for another engine's speculator
    and for a request not being served. Observers with attach() get the
    engine."""
    _, target, prompts, _ = tiny
    spec = SuffixSpeculator(vocab_size=target.config.vocab_size)   # the peaked target's text repeats
    seen = []

    class Probe:
        def attach(self, engine):
            self.engine = engine

        def observe(self, record):
            if record.prefill:
                rid = record.rids[0]
                e, ctl = self.engine, self.engine.controller
                want = None if ctl.share_only(0) is None else \
                    (40 - 1) * ctl.share_only(0) * ctl.seconds_per_token()   # one token emitted by the prefill
                seen.append((e.speculation_value(spec, rid), want, e.speculation_value(object(), rid),
                             e.speculation_value(spec, rid + 100)))

    probe = Probe()
    engine = atlas.Engine(target, speculators=[spec], observers=[probe], max_batch=1, max_tree_nodes=6)
    assert probe.engine is engine
    engine.generate(prompts[:2], max_new_tokens=40)
    (first, want0, *_), (second, want, other, unknown) = seen
    assert first is None and want0 is None
    assert second == pytest.approx(want) and second > 0
    assert other is None and unknown is None
    assert engine.speculation_value(spec, 1) is None   # served and gone


def test_trainer_does_not_push_a_worse_candidate(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    good = fresh_head(target)
    Trainer(good, buf, None, lr=3e-3, nice=0, max_share=1.0).train_steps(150)
    spec = LearnedSpeculator(good, max_depth=3)
    tr = Trainer(fresh_head(target, seed=5), buf, spec, lr=1e-6, steps_per_round=1, nice=0, max_share=1.0)
    res = tr.round()
    assert res["candidate"] < res["live"] and res["pushed"] is None
    assert tr.refused == 1 and tr.pushes == 0 and spec.version == 1
    # The live version's latest held-out measurement is in its history.
    assert spec.history[-1] == (1, pytest.approx(res["live"]))


def test_a_bad_push_is_refused_and_the_live_version_keeps_serving(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    head = fresh_head(target)
    spec = LearnedSpeculator(head, max_depth=2)
    tr = Trainer(fresh_head(target), buf, spec, nice=0)
    held = buf.held_out_batch()
    before = native_metric(spec.native, held)
    nan = head.export()
    nan["w_in"][3, 4] = np.nan
    wrong = head.export()
    wrong["w_out"] = wrong["w_out"][:, :-1].copy()
    for bad, msg in ((nan, "finite"), (wrong, "w_out")):
        assert tr.push(bad, 0.9) is None
        assert msg in tr.last_error
    assert tr.push_errors == 2 and tr.errors == 2 and tr.pushes == 0
    assert spec.version == 1 and native_metric(spec.native, held) == before
    _assert_proposes(spec, target)


def _assert_proposes(spec, target):
    spec.start(99, [1, 2, 3])
    spec._feature[99] = np.ones(target.config.hidden_size, np.float32)
    tree = DraftTree(3, 4, target.config.vocab_size)
    spec.propose([99], [[1, 2, 3]], [tree], 0)
    spec.finish(99)
    assert len(tree) > 1


def _wait(cond, timeout=30.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            return False
        time.sleep(0.02)
    return True


def test_a_failing_trainer_is_reported_and_can_be_restarted(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    spec = LearnedSpeculator(fresh_head(target), max_depth=2)
    tr = Trainer(fresh_head(target), buf, spec, steps_per_round=5, nice=0)
    real = tr.train_steps

    def boom(n, throttle=False):
        raise RuntimeError("boom in training")

    tr.train_steps = boom
    tr.start()
    assert _wait(lambda: tr.state == "error")
    assert not tr.running
    st = tr.stats()
    assert st["errors"] == 1 and "boom in training" in st["last_error"]
    assert spec.version == 1
    _assert_proposes(spec, target)  # serving goes on with the last good weights
    tr.train_steps = real
    tr.start()
    assert _wait(lambda: tr.rounds >= 1)
    tr.stop()
    assert tr.state == "stopped" and not tr.running and tr.errors == 1


def test_trainer_rechooses_the_draft_vocabulary_from_traffic(tiny):
    _, target, _, _ = tiny
    buf, _ = tapped_buffer(tiny)
    vocab = target.config.vocab_size
    head = fresh_head(target, draft_vocab=100)           # ids 0..99
    trained_row = head.w_out.detach()[50].clone() + 1.0
    with torch.no_grad():
        head.w_out[50] = trained_row
    counts = np.zeros(vocab, np.int64)
    counts[300:340] = 5                                   # traffic uses 40 tokens outside the vocabulary
    counts[50] = 9
    tr = Trainer(head, buf, None, counts=lambda: counts, nice=0)
    assert tr.maybe_revocab()
    ids = head.draft_ids.numpy()
    assert set(range(300, 340)) <= set(ids) and 50 in ids and len(ids) == 100
    # A kept token keeps its trained row; a new one starts from the target's LM head row.
    torch.testing.assert_close(head.w_out.detach()[head.full_to_draft[50]], trained_row)
    torch.testing.assert_close(head.w_out.detach()[head.full_to_draft[310]],
                               target.model.lm_head[310].float())
    # The average (a copy of the weights before any step) moved with them.
    avg = tr.average
    assert avg is not head and np.array_equal(avg.draft_ids.numpy(), ids)
    for name in ("w_out", "w_in", "norm2"):
        torch.testing.assert_close(getattr(avg, name), getattr(head, name))
    assert not tr.maybe_revocab()                         # stable once chosen
    assert tr.train_steps(3) == 3                         # the optimiser follows the new parameters
    # Re-chosen after training: Adam's moments stay with their parameters, and
    # the output layer's move with its rows (zero for the new ones).
    moments = {id(p): {k: v.clone() for k, v in tr.opt.state[p].items()} for p in tr._trained()}
    row50 = int(head.full_to_draft[50])
    counts[200:240] = 7
    assert tr.maybe_revocab()
    w_out = head.w_out
    for p in tr._trained():
        for k, v in tr.opt.state[p].items():
            if p is not w_out or k == "step":
                torch.testing.assert_close(v, moments[id(p)][k])
    for k in ("exp_avg", "exp_avg_sq"):
        assert moments[id(w_out)][k][row50].any()
        torch.testing.assert_close(tr.opt.state[w_out][k][head.full_to_draft[50]], moments[id(w_out)][k][row50])
        assert not tr.opt.state[w_out][k][head.full_to_draft[210]].any()
    assert tr.train_steps(2) == 2


# ---- checkpoints -----------------------------------------------------------------------------

def trained_checkpoint(target, seed=3):
    head = fresh_head(target, seed=seed, draft_vocab=211)
    return head, Checkpoint(head.export(), head_config(head), [dict(version=2, metric=0.5)], 0.5, dict(a=1))


def test_checkpoint_round_trip(tiny, tmp_path):
    _, target, _, _ = tiny
    head, ck = trained_checkpoint(target)
    path = tmp_path / "x" / "head.npz"
    save_checkpoint(path, ck)
    got = load_checkpoint(path, head_config(head))
    for name, w in ck.weights.items():
        np.testing.assert_array_equal(got.weights[name], w)
        assert got.weights[name].dtype == w.dtype
    assert got.history == ck.history and got.metric == 0.5 and got.notes == {"a": 1}
    assert got.config == head_config(head)
    assert load_checkpoint(tmp_path / "absent.npz") is None
    assert [p.name for p in path.parent.iterdir()] == ["head.npz"]  # no temporary file left


def test_damaged_checkpoints_are_reported_and_ignored(tiny, tmp_path):
    _, target, _, _ = tiny
    head, ck = trained_checkpoint(target)
    good = tmp_path / "good.npz"
    save_checkpoint(good, ck)
    raw = good.read_bytes()
    cases = {
        "short.npz": raw[: len(raw) // 2],
        "garbage.npz": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        "empty.npz": b"",
    }
    # One flipped byte inside the stored w_out data: the zip CRC or the checksum catches it.
    flipped = bytearray(raw)
    at = raw.find(b"w_out.npy")
    flipped[at + 2000] ^= 0xFF
    cases["flipped.npz"] = bytes(flipped)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.warns(RuntimeWarning, match=name):
            assert load_checkpoint(tmp_path / name, head_config(head)) is None
    other = dict(head_config(head), draft_vocab=212)
    with pytest.warns(RuntimeWarning, match="draft_vocab"):
        assert load_checkpoint(good, other) is None
    # Shapes that contradict the file's own config.
    bad = dict(ck.weights)
    bad["w_gate"] = bad["w_gate"][:-1]
    np.savez(tmp_path / "shapes.npz", meta=np.frombuffer(
        b'{"format": 1, "config": {"hidden": 64, "intermediate": 64, "draft_vocab": 211, "vocab": 397}}',
        np.uint8), **bad)
    with pytest.warns(RuntimeWarning, match="w_gate"):
        assert load_checkpoint(tmp_path / "shapes.npz") is None


def test_a_write_that_dies_midway_leaves_the_old_file(tiny, tmp_path, monkeypatch):
    _, target, _, _ = tiny
    head, ck = trained_checkpoint(target)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, ck)
    before = path.read_bytes()

    def dies(f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, dies)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]

    # The same through save_checkpoint, dying inside numpy's writer.
    def savez_dies(f, **arrays):
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_dies)
    _, ck2 = trained_checkpoint(target, seed=9)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ck2)
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]
    np.testing.assert_array_equal(load_checkpoint(path).weights["w_in"], ck.weights["w_in"])


def test_model_key_and_cache_folder(tiny, private_cache):
    model, target, _, _ = tiny
    assert model_key(atlas.load(model)) == model_key(target)
    assert model_key(atlas.load(tiny_llama(seed=5))) != model_key(target)  # same config, other weights
    assert model_dir(target) == private_cache / model_key(target)


def test_the_loop_restores_its_checkpoint_or_starts_from_static(tiny, private_cache):
    model, target, _, _ = tiny
    static, ck = trained_checkpoint(target, seed=3)
    folder = model_dir(target)
    save_checkpoint(folder / STATIC, ck)
    spec = LearnedSpeculator(fresh_head(target, seed=4, draft_vocab=211))
    # A torn adaptive checkpoint: reported by name, ignored; the candidate starts from static.
    (folder / ADAPTIVE).write_bytes(b"PK\x03\x04 torn")
    # The in-process trainer shows its candidate (a trainer process sends the
    # same starting weights to its child).
    with pytest.warns(RuntimeWarning, match=ADAPTIVE):
        loop = LearningLoop(target, spec, process=False)
    assert loop.restored == str(folder / STATIC) and spec.version == 1
    for name, w in static.export().items():
        np.testing.assert_array_equal(loop.trainer.head.export()[name], w)
    # A good adaptive checkpoint wins over static and is pushed at once.
    adaptive, ck2 = trained_checkpoint(target, seed=8)
    save_checkpoint(folder / ADAPTIVE, ck2)
    loop = LearningLoop(target, spec, process=False)
    assert loop.restored == str(folder / ADAPTIVE) and spec.version == 2 and loop.history == ck2.history
    np.testing.assert_array_equal(loop.trainer.head.export()["w_in"], adaptive.export()["w_in"])
    # A checkpoint of another head shape is ignored with a warning.
    spec_big = LearnedSpeculator(fresh_head(target, draft_vocab=300))
    with pytest.warns(RuntimeWarning, match="draft_vocab"):
        loop = LearningLoop(target, spec_big, process=False)
    assert loop.restored is None and spec_big.version == 1


# ---- the static speculator ----------------------------------------------------------------

def test_distill_beats_an_untrained_head_and_loads_as_the_static_speculator(tiny, private_cache):
    _, target, _, _ = tiny
    with pytest.raises(FileNotFoundError, match="atlas distill"):
        load_static(target)
    files = stdlib_sources()[:40]
    lines = []
    res = distill(target, tokens=5000, prompts=6, gen_tokens=16, steps=150, seq_len=200, draft_vocab=397,
                  lr=3e-3, files=files, encode=lambda s: list(s.encode()), progress=lines.append)
    print("\n".join(lines))
    assert any("generating 16 tokens for each of 6 function prompts" in x for x in lines)
    assert res.path == model_dir(target) / STATIC and res.path.is_file()
    assert res.metric >= res.untrained_metric + 0.2, (res.metric, res.untrained_metric)
    assert any("held-out metric" in x for x in lines)
    spec = load_static(target, max_depth=3)
    assert isinstance(spec, LearnedSpeculator) and spec.version == 1
    head = static_head(target)
    for name, w in res.head.export().items():
        np.testing.assert_array_equal(head.export()[name], w)
    # The CLI parses its options and has help text.
    from atlas.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    assert e.value.code == 0
    with pytest.raises(ValueError, match="tokenizer"):
        distill(target, tokens=100, steps=1, save=False)
    with pytest.raises(ValueError, match="nothing to distil"):
        distill(target, tokens=0, prompts=0, encode=lambda s: list(s.encode()), save=False)


def test_function_prompts_pose_library_functions_as_stubs():
    """Each prompt is a def line and its docstring, one per file, valid Python
    once a body follows, and nothing is imported."""
    files = stdlib_sources()[:200]
    prompts = function_prompts(files, 12)
    assert len(prompts) == 12 and len(set(prompts)) == 12
    for p in prompts:
        assert p.startswith(("def ", "async def ")) and '"""' in p and p.endswith('"""\n')
        ast.parse(p + "    pass\n")
    assert function_prompts(files, 0) == []
    assert function_prompts([Path(__file__).parent / "no-such-file.py"], 3) == []


# ---- the whole loop through the engine ---------------------------------------------------------

@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_the_loop_learns_while_serving_and_stays_lossless(tiny, process):
    """A repetitive stream (6 prompts, served again and again) through an
    engine whose only speculator starts untrained and learns from the loop,
    with the trainer in a thread and in a process of its own. Each round
    waits for the trainer to finish one more round of its own, so the test
    does not depend on how fast this machine trains. The controller keeps
    every candidate (``select="all"``): the throughput controller may switch
    off a speculator whose drafts do not pay on a tiny model, and this test is
    about what the loop learns, not about that choice."""
    model, target, _, _ = tiny
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, target.config.vocab_size, size=8).tolist() for _ in range(6)]
    truth = {tuple(p): hf_greedy(model, p, 40) for p in prompts}
    head = fresh_head(target)
    spec = LearnedSpeculator(head, max_depth=4, topk=2, width=2)
    loop = LearningLoop(target, spec, head=head, held_out=128, batch_size=128, steps_per_round=25, nice=0,
                        max_share=1.0, process=process)
    assert loop.process == process
    engine = atlas.Engine(target, speculators=[spec], observers=[loop], max_tree_nodes=6, max_batch=6,
                          controller=Controller(1, max_nodes=6, select="all"))
    loop.start()
    rates = []
    try:
        for _ in range(6):
            rounds = loop.trainer.rounds
            outs = engine.generate(prompts, max_new_tokens=40)
            for p, o in zip(prompts, outs):
                assert_same_greedy(model, p, truth[tuple(p)], o.token_ids)
            rates.append(sum(o.stats.accepted for o in outs) / sum(o.stats.steps for o in outs))
            assert _wait(lambda: loop.trainer.rounds > rounds or loop.trainer.state != "running", 60)
        # Every tapped example reached the buffer (a trainer process reports it within a second).
        loop.flush()
        assert _wait(lambda: loop.buffer.total == loop.tap.examples)
        held = loop.buffer.held_out_batch()   # a trainer process's buffer goes with it at stop()
        pid = loop.trainer.pid if process else None
    finally:
        loop.stop()
    st = loop.stats()
    print("accepted draft tokens per target forward, round by round:", rates, st)
    assert st["errors"] == 0 and st["state"] == "stopped", st
    assert st["pushes"] >= 1 and st["live_version"] == 1 + st["pushes"]
    assert st["adaptations"] >= 1, st   # prompts fitted for their requests (atlas.learning.adapt)
    assert st["examples_seen"] == loop.buffer.total > 0 and st["train_steps"] > 0 and st["dropped"] == 0
    if process:
        assert not loop.trainer.running and loop.trainer.exitcode == 0
        _assert_reaped(pid)
    # Measured: 0 in the first round, 1.2 to 1.9 in the last two.
    assert np.mean(rates[-2:]) >= np.mean(rates[:2]) + 0.5, rates
    # stop() checkpointed the live weights; a new loop restores and pushes them.
    spec2 = LearnedSpeculator(fresh_head(target, seed=7), max_depth=4, topk=2, width=2)
    loop2 = LearningLoop(target, spec2)
    assert loop2.restored == str(model_dir(target) / ADAPTIVE) and spec2.version == 2
    assert [h["version"] for h in loop2.history] == [h["version"] for h in loop.history]
    assert native_metric(spec2.native, held) == native_metric(spec.native, held)


# ---- the trainer process -------------------------------------------------------------------

def _assert_reaped(pid):
    """The process is gone and was waited for: no zombie is left."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _process_loop(tiny, spec=None, **kwargs):
    _, target, _, _ = tiny
    head = fresh_head(target)
    spec = spec or LearnedSpeculator(head, max_depth=3)
    settings = dict(checkpoint=False, held_out=128, batch_size=64, steps_per_round=10, lr=3e-3, nice=0,
                    max_share=1.0, process=True)
    settings.update(kwargs)
    return LearningLoop(target, spec, head=head, **settings), spec


def _feed(loop, tiny, n=40):
    """Greedy traffic of the tiny fixture's first n requests, through the loop's tap."""
    model, _, prompts, conts = tiny
    for rid, (p, c) in enumerate(zip(prompts[:n], conts[:n])):
        for r in greedy_records(model, p, c, 1000 * loop.tap.records + rid, depth=3):
            loop.observe(r)


def _proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
def test_the_trainer_process_is_paused_while_a_forward_runs(tiny):
    """On the CPU the loop stops its trainer process for each target forward
    and continues it after; the child keeps training across pauses, and
    stop() works on a paused child."""
    _, target, _, _ = tiny
    loop, _ = _process_loop(tiny)
    assert loop.pause_during_forward
    assert not _process_loop(tiny, pause_during_forward=False)[0].pause_during_forward
    thread_loop, _ = _process_loop(tiny, process=False)
    assert not thread_loop.pause_during_forward
    thread_loop.forward_begins()
    thread_loop.forward_ends()                    # nothing to pause
    thread_loop.measurement_begins()
    thread_loop.measurement_ends()
    assert loop.forward_begins() is True          # before start(): no child, nothing to do
    loop.forward_ends()
    loop.measurement_begins()
    loop.measurement_ends()
    loop.start()
    try:
        pid = loop.trainer.pid
        # While the child starts up (it imports torch: seconds), a forward
        # leaves it running; an explicit pause() stops it all the same.
        if not loop.trainer._child.ready:
            assert loop.forward_begins() is False   # the engine leaves this forward's time out
            time.sleep(0.2)
            assert _proc_state(pid) != "T"
            loop.forward_ends()
        # The engine's start-up measurement of forward times stops it even
        # then (ready or not by now).
        loop.measurement_begins()
        assert _wait(lambda: _proc_state(pid) == "T", 10)
        loop.measurement_ends()
        assert _wait(lambda: _proc_state(pid) != "T", 10)
        loop.trainer.pause()
        assert _wait(lambda: _proc_state(pid) == "T", 10)
        loop.trainer.resume()
        assert _wait(lambda: _proc_state(pid) != "T", 10)
        _feed(loop, tiny)
        assert _wait(lambda: loop.trainer.rounds >= 1, 60)
        assert loop.trainer._child.ready
        assert loop.forward_begins() is True
        assert _wait(lambda: _proc_state(pid) == "T", 10)
        rounds = loop.trainer.rounds
        time.sleep(0.5)
        assert _proc_state(pid) == "T" and loop.trainer.rounds == rounds
        loop.forward_ends()
        assert _wait(lambda: _proc_state(pid) != "T", 10)
        assert _wait(lambda: loop.trainer.rounds > rounds, 60)
        loop.forward_begins()                     # stopped when stop() comes
    finally:
        loop.stop()
    assert loop.stats()["state"] == "stopped" and loop.stats()["errors"] == 0
    _assert_reaped(pid)


@pytest.mark.skipif(not atlas.placement.SUPPORTED or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least two CPUs this process may use")
def test_the_trainer_runs_on_the_cpus_the_engine_hands_the_loop(tiny):
    """place_threads (the engine's call at each serve): the trainer process,
    every thread it has, and this side's service threads move to the given
    CPUs, and a child started later moves there once it is ready; a
    trainer thread too."""
    helper = {max(os.sched_getaffinity(0))}

    def cpus(pid):
        return [os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")]

    loop, _ = _process_loop(tiny)
    loop.start()
    try:
        assert _wait(lambda: loop.trainer._child.ready, 60)   # its torch threads are up
        pid = loop.trainer.pid
        loop.place_threads(helper)
        assert set(map(frozenset, cpus(pid))) == {frozenset(helper)}
        assert all(os.sched_getaffinity(t.native_id) == helper for t in loop.trainer._child.threads)
        loop.trainer.stop()
        loop.trainer.start()                                  # a new child starts on them
        pid2 = loop.trainer.pid
        assert pid2 != pid
        assert _wait(lambda: loop.trainer._child.ready, 60)   # placed once ready (see place)
        assert _wait(lambda: set(map(frozenset, cpus(pid2))) == {frozenset(helper)}, 10)
        assert all(os.sched_getaffinity(t.native_id) == helper for t in loop.trainer._child.threads)
    finally:
        loop.stop()
    assert loop.stats()["errors"] == 0

    thread_loop, _ = _process_loop(tiny, process=False)
    thread_loop.place_threads(helper)                        # before start: it starts there
    thread_loop.start()
    try:
        assert _wait(lambda: thread_loop.trainer._thread is not None and
                     os.sched_getaffinity(thread_loop.trainer._thread.native_id) == helper, 10)
    finally:
        thread_loop.stop()


def test_trainer_process_settings_are_checked_in_the_serving_process(tiny):
    with pytest.raises(TypeError, match="unknown trainer settings"):
        _process_loop(tiny, bach_size=64)
    with pytest.raises(ValueError, match="max_share"):
        _process_loop(tiny, max_share=2.0)
    with pytest.raises(ValueError, match="at least 2 examples"):
        _process_loop(tiny, capacity=1)
    loop, _ = _process_loop(tiny)
    assert not loop.trainer.running and loop.trainer.pid is None
    _feed(loop, tiny, 1)   # before start() there is no child: the batches are dropped, and counted
    loop.flush()
    st = loop.stats()
    assert st["dropped"] > 0 and st["dropped_examples"] == st["examples_seen"] > 0 and st["state"] == "idle"


def test_a_trainer_process_that_raises_is_reported_and_can_be_restarted(tiny):
    _, target, _, _ = tiny
    loop, spec = _process_loop(tiny)
    loop.start()
    try:
        _feed(loop, tiny)
        assert _wait(lambda: loop.trainer.rounds >= 1, 60)
        rounds = loop.trainer.rounds
        first = loop.trainer.pid
        # Tokens outside the vocabulary (the tap never makes them) reach the
        # child, whose embedding lookup raises when it trains or evaluates on them.
        vocab, H = target.config.vocab_size, target.config.hidden_size
        loop.tap.sink(examples([vocab + 3] * 400, hidden=H, k=16))
        assert _wait(lambda: loop.trainer.state == "error", 60)
        # (a round that was ending when the bad batch came may still have
        # pushed: the last good weights are those live at the failure)
        version = spec.version
        st = loop.stats()
        assert st["errors"] == 1 and "IndexError" in st["last_error"] and "Traceback" in st["last_error"], st
        assert not loop.trainer.running and loop.trainer.exitcode == 1
        _assert_reaped(first)
        # Serving goes on with the last good weights; the tap's batches are dropped, not queued.
        _assert_proposes(spec, target)
        _feed(loop, tiny, 2)
        assert loop.stats()["dropped"] > st["dropped"]
        assert spec.version == version
        # A new child starts from the live weights, with an empty buffer.
        loop.start()
        assert loop.trainer.pid != first and loop.trainer.state == "running"
        _feed(loop, tiny)
        assert _wait(lambda: loop.trainer.rounds > rounds, 60)
        assert loop.trainer.stats()["restarts"] == 1
    finally:
        loop.stop()
    st = loop.stats()
    assert st["state"] == "stopped" and st["errors"] == 1 and not loop.trainer.running


def test_a_killed_trainer_process_is_reported(tiny):
    _, target, _, _ = tiny
    loop, spec = _process_loop(tiny)
    loop.start()
    try:
        _feed(loop, tiny)
        assert _wait(lambda: loop.trainer.rounds >= 1, 60)
        version, pid = spec.version, loop.trainer.pid
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: loop.trainer.state == "error", 30)
        st = loop.stats()
        assert st["errors"] == 1 and "SIGKILL" in st["last_error"] and str(pid) in st["last_error"], st
        assert loop.trainer.exitcode == -signal.SIGKILL
        _assert_reaped(pid)
        assert spec.version == version
        _assert_proposes(spec, target)
        _feed(loop, tiny, 2)
        assert loop.stats()["dropped"] > st["dropped"]
    finally:
        loop.stop()
    assert loop.stats()["state"] == "error" and not loop.trainer.running   # stop() does not hide the failure


def test_a_push_the_speculator_refuses_is_counted_and_the_live_version_keeps_serving(tiny, monkeypatch):
    _, target, _, _ = tiny
    loop, spec = _process_loop(tiny)

    def refuse(weights, metric=None):
        raise ValueError("refused for the test")

    monkeypatch.setattr(spec, "push", refuse)
    loop.start()
    try:
        _feed(loop, tiny)
        assert _wait(lambda: loop.stats()["push_errors"] >= 1 or loop.trainer.state != "running", 60)
        st = loop.stats()
        assert st["state"] == "running" and st["pushes"] == 0 and st["errors"] >= st["push_errors"] >= 1
        assert "push refused: refused for the test" in st["last_error"]
        assert spec.version == 1
        _assert_proposes(spec, target)
    finally:
        loop.stop()
    assert loop.stats()["state"] == "stopped"


def test_a_trainer_process_rechooses_the_draft_vocabulary_from_traffic_counts(tiny):
    """The tap's counts reach the child as snapshots: a head on token ids
    0..99 serving traffic drawn from the whole vocabulary re-chooses its
    draft vocabulary in the child."""
    _, target, _, _ = tiny
    head = fresh_head(target, draft_vocab=100)
    spec = LearnedSpeculator(head, max_depth=3)
    loop = LearningLoop(target, spec, head=head, checkpoint=False, held_out=128, batch_size=64,
                        steps_per_round=5, nice=0, max_share=1.0, process=True)
    loop.start()
    try:
        _feed(loop, tiny)
        assert _wait(lambda: loop.stats()["revocabs"] >= 1 or loop.trainer.state != "running", 60)
        assert loop.stats()["errors"] == 0
    finally:
        loop.stop()


def test_batches_that_do_not_fit_in_the_pipe_wait_and_arrive_in_order(tiny):
    """The serving thread writes each batch into the examples pipe itself;
    while the child reads nothing (stopped here), what no longer fits waits
    in the backlog for the sender thread, and once the child reads again
    every batch arrives: none dropped, none cut."""
    loop, _ = _process_loop(tiny)
    loop.start()
    try:
        assert _wait(lambda: loop.trainer._child is not None and loop.trainer._child.ready, 60)
        loop.trainer.pause()
        rounds = 0
        while loop.trainer._child.pending_bytes == 0 and rounds < 20:   # past the pipe's size
            _feed(loop, tiny, 40)
            rounds += 1
        assert loop.trainer._child.pending_bytes > 0, "the pipe never filled"
        loop.trainer.resume()
        loop.flush()
        assert _wait(lambda: loop.buffer.total == loop.tap.examples, 120)
        st = loop.stats()
        assert st["dropped"] == 0 and st["errors"] == 0, st
        assert loop.trainer._child.pending_bytes == 0
    finally:
        loop.stop()


def test_a_full_channel_drops_batches(tiny):
    """A bound smaller than one example (652 bytes here): every batch is
    dropped at once (the serving thread never waits for the child)."""
    loop, _ = _process_loop(tiny, max_pending_bytes=100)
    loop.start()
    try:
        _feed(loop, tiny, 4)
        loop.flush()
        st = loop.stats()
        assert st["dropped"] > 0 and st["dropped_examples"] == st["examples_seen"] > 0
    finally:
        loop.stop()
    assert loop.buffer.total == 0 and loop.stats()["state"] == "stopped"


def test_a_trainer_process_measures_an_unknown_live_version_natively(tiny, private_cache):
    """The speculator serves weights the loop does not know (the candidate
    starts from the static checkpoint, the speculator from another head): the
    child asks the serving process to measure the native head."""
    _, target, _, _ = tiny
    _, ck = trained_checkpoint(target, seed=3)
    save_checkpoint(model_dir(target) / STATIC, ck)
    spec = LearnedSpeculator(fresh_head(target, seed=4, draft_vocab=211), max_depth=3)
    loop = LearningLoop(target, spec, process=True, held_out=128, batch_size=64, steps_per_round=5, nice=0,
                        max_share=1.0, min_gain=1.0)   # min_gain 1: never pushes
    assert loop.restored == str(model_dir(target) / STATIC)
    loop.start()
    try:
        _feed(loop, tiny)
        loop.flush()
        assert _wait(lambda: loop.buffer.total == loop.tap.examples, 60)
        rounds = loop.trainer.rounds
        # The round after the next one began after all the data had arrived.
        assert _wait(lambda: loop.trainer.rounds > rounds + 1, 60)
        held = loop.buffer.held_out_batch()
        st = loop.stats()
        assert st["live_metric"] == native_metric(spec.native, held)
        assert st["refused"] >= 1 and st["pushes"] == 0 and spec.version == 1
        # The measurement is in the live version's history.
        assert spec.history[-1] == (1, pytest.approx(st["live_metric"]))
    finally:
        loop.stop()


def test_engine_close_stops_its_trainer_process(tiny):
    _, target, _, _ = tiny
    with pytest.warns(UserWarning, match="tokenizer"):
        engine = atlas.Engine(target, max_batch=2, max_tree_nodes=6)
    loop = engine.observers[0]
    assert loop.process and loop.trainer.running
    pid = loop.trainer.pid
    engine.generate([[1, 2, 3, 4]], max_new_tokens=8)
    engine.close()
    assert not loop.trainer.running and loop.trainer.exitcode == 0 and loop.stats()["state"] == "stopped"
    _assert_reaped(pid)


def test_engine_learning_options_reach_the_default_loop_and_bad_ones_are_clear_errors(tiny):
    _, target, _, _ = tiny
    with pytest.raises(TypeError, match="must be a dict"):
        atlas.Engine(target, learning_options=[("lr", 1e-3)])
    with pytest.raises(ValueError, match="speculators='auto' and learning=True"):
        atlas.Engine(target, speculators=None, learning_options=dict(lr=1e-3))
    with pytest.raises(ValueError, match="speculators='auto' and learning=True"):
        atlas.Engine(target, learning=False, learning_options=dict(lr=1e-3))
    with pytest.raises(ValueError, match=r"cannot set \['cache_dir', 'head'\]"):
        atlas.Engine(target, learning_options=dict(head=None, cache_dir="x"))
    with pytest.warns(UserWarning, match="tokenizer"), pytest.raises(TypeError, match="unknown trainer settings"):
        atlas.Engine(target, learning_options=dict(bach_size=64))
    with pytest.warns(UserWarning, match="tokenizer"):
        engine = atlas.Engine(target, max_batch=2, max_tree_nodes=6,
                              learning_options=dict(pause_during_forward=False, max_share=1.0, lr=5e-4))
    try:
        loop = engine.observers[0]
        assert not loop.pause_during_forward
        assert loop.trainer.settings["lr"] == 5e-4 and loop.trainer.settings["max_share"] == 1.0
        assert len(engine.generate([[1, 2, 3, 4]], max_new_tokens=8)[0].token_ids) == 8
    finally:
        engine.close()


def test_fused_adam_takes_torchs_fused_steps_bit_for_bit():
    from atlas.learning.trainer import FusedAdam, adam
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(30, 20, generator=g), torch.randn(7, generator=g)]
    ours = [t.clone().requires_grad_(True) for t in start]
    theirs = [t.clone().requires_grad_(True) for t in start]
    opt, ref = adam(ours, 1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    assert isinstance(opt, FusedAdam)
    for i in range(6):
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if i == 2:   # a parameter without a gradient keeps its value and its step count
            ours[1].grad = theirs[1].grad = None
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref.state[q][key])
    assert float(opt.state[ours[1]]["step"]) == 5


def test_a_fit_does_not_import_torch_dynamo():
    # torch.optim's first optimizer imports torch._dynamo: 2 s of the serving
    # thread in the stream's first request, when the fit made one.
    code = ("import sys, numpy as np, torch\n"
            "from atlas.learning.head import DraftHead\n"
            "from atlas.learning.tap import Examples\n"
            "from atlas.learning.adapt import adapt_to_prompt\n"
            "embed = torch.randn(50, 16)\n"
            "head = DraftHead(embed, embed, torch.arange(20), intermediate=32)\n"
            "rng = np.random.default_rng(0); n = 12\n"
            "ex = Examples(rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 50, n).astype(np.int32),\n"
            "              np.full((n, 4), -1, np.int32), np.full((n, 4), -np.inf, np.float32),\n"
            "              rng.standard_normal((n, 16)).astype(np.float32), np.zeros(n, np.int64))\n"
            "adapt_to_prompt(head, ex, batch=4)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
