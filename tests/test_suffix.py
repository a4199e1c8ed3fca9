"""The suffix speculator against a plain-Python restatement of its rule
(cpp/include/atlas/suffix.h): hand-worked trees with exact confidences, exact
equality with the reference on random token streams over small vocabularies
(long matches, ties, eviction), the corpus bound and its eviction order, the
memory bound over many requests, and bad input."""
import heapq
import subprocess
import sys
import textwrap
from collections import deque

import numpy as np
import pytest

import atlas
from atlas.speculators import SuffixSpeculator
from oracle import assert_same_greedy, hf_greedy, tiny_llama

TRUSTED = 4  # kTrustedMatch: the long anchor, and a match trusted alone
MATCH_PRIOR = 1.5  # kMatchPrior: a confidence is a frequency times Ls / (Ls + MATCH_PRIOR)


# ---- the reference --------------------------------------------------------------------

class RefSuffix:
    """The matching and counting rule of atlas/suffix.h, written plainly: the
    corpus is a deque of token lists, occurrences are found by slicing."""

    def __init__(self, max_match=32, max_depth=16, max_occurrences=64, min_support=2,
                 max_corpus_tokens=1 << 17, index_prompts=False, min_prob=0.0):
        self.max_match, self.max_depth, self.k = max_match, max_depth, max_occurrences
        self.min_support, self.cap, self.index_prompts = min_support, max_corpus_tokens, index_prompts
        self.min_prob = min_prob
        self.docs = deque()
        self.live = {}

    def start(self, rid, prompt):
        self.live[rid] = (list(prompt), len(prompt))

    def extend(self, rid, tokens):
        self.live[rid][0].extend(tokens)

    def finish(self, rid):
        x, plen = self.live.pop(rid)
        self.add_document(x if self.index_prompts else x[plen:])

    def add_document(self, tokens):
        if self.cap == 0 or not tokens:
            return
        keep = min(len(tokens), self.cap - 1)
        tokens = list(tokens[len(tokens) - keep:])
        while sum(len(d) + 1 for d in self.docs) + keep + 1 > self.cap:
            self.docs.popleft()
        self.docs.append(tokens)

    def corpus_tokens(self):
        return sum(len(d) for d in self.docs)

    def _collect(self, x, a):
        n, anchor, depth = len(x), x[len(x) - a:], self.max_depth

        def match(text, e):
            m = 0
            while m < self.max_match and m <= e and m < n and text[e - m] == x[n - 1 - m]:
                m += 1
            return m

        visited, occ = 0, []
        for e in range(n - 2, a - 2, -1):               # the request itself, newest first
            if x[e - a + 1:e + 1] == anchor:
                if visited == self.k:
                    return occ
                visited += 1
                m, tail = match(x, e), x[e + 1:]
                if m >= len(tail):                      # periodic: the tail repeats
                    tail = tail * (depth // len(tail) + 1)
                occ.append((m, tail[:depth]))
        for d in reversed(self.docs):                   # then the corpus, newest first
            for e in range(len(d) - 1, a - 2, -1):
                if d[e - a + 1:e + 1] == anchor:
                    if visited == self.k:
                        return occ
                    visited += 1
                    if e + 1 < len(d):                  # a document's last token: nothing follows
                        occ.append((match(d, e), d[e + 1:e + 1 + depth]))
        return occ

    def propose(self, rid, max_nodes):
        """The tree as (token, parent, confidence) per node, the root first."""
        x = self.live[rid][0]
        nodes = [(x[-1], -1, np.float32(1.0))]
        occ = []
        if self.max_match >= TRUSTED and len(x) >= TRUSTED:
            occ = self._collect(x, TRUSTED)
        if not occ:
            occ = self._collect(x, 1)
        if not occ or max_nodes <= 1:
            return nodes
        longest = max(m for m, _ in occ)
        chosen = longest
        if longest < TRUSTED:
            for length in range(longest, 0, -1):
                if sum(m >= length for m, _ in occ) >= self.min_support:
                    chosen = length
                    break
        root = {"count": 0, "kids": {}}                 # dicts keep first-seen order
        for m, cont in occ:
            if m < chosen:
                continue
            node = root
            root["count"] += 1
            for t in cont:
                node = node["kids"].setdefault(t, {"count": 0, "kids": {}})
                node["count"] += 1
        heap, seq = [], 0
        weight = chosen / (chosen + MATCH_PRIOR)   # a long match's frequencies are worth more

        def push(node, prob, parent):
            nonlocal seq
            kids = sorted(node["kids"].items(), key=lambda kv: -kv[1]["count"])  # stable
            total = sum(k["count"] for _, k in kids)
            for tok, k in kids:
                freq = k["count"] / total
                heapq.heappush(heap, (-(prob * freq), seq, tok, k, np.float32(freq * weight), parent))
                seq += 1

        push(root, 1.0, 0)
        while heap and len(nodes) < max_nodes:
            neg, _, tok, kid, conf, parent = heapq.heappop(heap)
            if -neg < self.min_prob:
                break
            nodes.append((tok, parent, conf))
            push(kid, -neg, len(nodes) - 1)
        return nodes


def native_tree(spec, rid, root, max_nodes, proposer=0):
    tree = atlas.DraftTree(root, max_nodes)
    added = spec.native.propose(rid, tree, proposer)
    assert added == len(tree) - 1
    return tree


def as_nodes(tree):
    return list(zip(tree.tokens.tolist(), tree.parents.tolist(), tree.confidences.tolist()))


def assert_tree(tree, expected, match, proposer=0):
    """expected: [(token, parent, frequency)] without the root; ``match``: the
    proposal's match length Ls, whose weight scales every confidence."""
    assert tree.tokens[1:].tolist() == [t for t, _, _ in expected]
    assert tree.parents[1:].tolist() == [p for _, p, _ in expected]
    weight = match / (match + MATCH_PRIOR)
    np.testing.assert_array_equal(tree.confidences[1:], np.array([f * weight for _, _, f in expected], np.float32))
    assert (tree.proposers[1:] == (1 << proposer)).all()


# ---- hand-worked trees ------------------------------------------------------------------

def test_repeated_phrase_in_the_prompt():
    s = SuffixSpeculator(max_depth=4)
    # [10 11 12 13] occurs at 0..3 and ends the prompt: the 4-token anchor finds
    # it, m = 4 (trusted alone), continuation 14 15 3 10 (max_depth 4).
    s.start(7, [10, 11, 12, 13, 14, 15, 3, 10, 11, 12, 13])
    tree = native_tree(s, 7, 13, 8, proposer=2)
    assert_tree(tree, [(14, 0, 1.0), (15, 1, 1.0), (3, 2, 1.0), (10, 3, 1.0)], 4, proposer=2)
    # The budget caps the chain (the root counts).
    assert_tree(native_tree(s, 7, 13, 3), [(14, 0, 1.0), (15, 1, 1.0)], 4)
    # After committing 14 the own match continues from the same place, one
    # token longer (m = 5: the whole text up to 14 at 4).
    s.update(7, [14])
    assert_tree(native_tree(s, 7, 14, 8), [(15, 0, 1.0), (3, 1, 1.0), (10, 2, 1.0), (11, 3, 1.0)], 5)


def test_short_repeat_in_the_prompt_uses_the_one_token_anchor():
    s = SuffixSpeculator(max_depth=5)
    # No earlier [2 5 6 7]; the 1-token anchor 7 occurs at 2 with m = 3, alone:
    # no length has min_support = 2 occurrences, so the longest (3) is used.
    s.start(1, [5, 6, 7, 8, 9, 1, 2, 5, 6, 7])
    assert_tree(native_tree(s, 1, 7, 10), [(8, 0, 1.0), (9, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (5, 4, 1.0)], 3)


def test_a_loop_is_drafted_to_full_depth():
    s = SuffixSpeculator(max_depth=7)
    # [3 1 2 3] occurs at 3..6 with m = 6 >= its distance p = 3 to the end:
    # the request repeats with period 3, so the continuation [1 2 3] repeats.
    s.start(1, [5, 1, 2, 3, 1, 2, 3, 1, 2, 3])
    assert_tree(native_tree(s, 1, 3, 16), [(t, i, 1.0) for i, t in enumerate([1, 2, 3, 1, 2, 3, 1])], 6)
    # A run: anchor [7] at e = 2 (m = 2, p = 1: periodic) and e = 1 (m = 1,
    # p = 2: not, so its continuation stops at the end: [7 7]). m >= 2 has one
    # occurrence, m >= 1 two (min_support): both, and only the periodic one
    # goes on past depth 2 (Ls = 1).
    s.start(2, [9, 7, 7, 7])
    assert_tree(native_tree(s, 2, 7, 16), [(7, i, 1.0) for i in range(7)], 1)
    # Without periodicity the continuation ends at the request's last token.
    s.start(3, [4, 5, 6, 9, 4, 5])
    assert_tree(native_tree(s, 3, 5, 16), [(6, 0, 1.0), (9, 1, 1.0), (4, 2, 1.0), (5, 3, 1.0)], 2)


def test_continuation_seen_in_an_earlier_finished_request():
    s = SuffixSpeculator()
    s.start(1, [1, 2, 3])
    s.update(1, [20, 21, 22, 23, 24])
    s.finish(1)
    assert s.corpus_tokens() == 5  # the output only: prompts are not indexed by default
    s.start(2, [7, 21, 22])
    assert_tree(native_tree(s, 2, 22, 8), [(23, 0, 1.0), (24, 1, 1.0)], 2)  # m = 2, the document ends
    s.start(3, [9, 1, 2])
    assert len(native_tree(s, 3, 2, 8)) == 1  # request 1's prompt is not in the corpus
    # With index_prompts the prompt is part of the document.
    s2 = SuffixSpeculator(index_prompts=True)
    s2.start(1, [1, 2, 3])
    s2.update(1, [20, 21])
    s2.finish(1)
    s2.start(3, [9, 1, 2])
    assert_tree(native_tree(s2, 3, 2, 8), [(3, 0, 1.0), (20, 1, 1.0), (21, 2, 1.0)], 2)


def test_most_frequent_continuation_first():
    s = SuffixSpeculator()
    for d in ([1, 2, 3, 9], [1, 2, 4], [1, 2, 3, 8], [1, 2, 3, 9]):
        s.add_document(d)
    s.start(5, [5, 1, 2])
    # Four occurrences of [1 2] (m = 2 each), continuations newest first:
    # [3 9], [3 8], [4], [3 9]. Root: 3 (3/4), 4 (1/4); below 3: 9 (2/3), 8 (1/3).
    # Best first: 3 (p .75), 9 (p .5), then 4 and 8 tie at p .25: 4 was queued first.
    assert_tree(native_tree(s, 5, 2, 16), [(3, 0, 0.75), (9, 1, 2 / 3), (4, 0, 0.25), (8, 1, 1 / 3)], 2)
    assert_tree(native_tree(s, 5, 2, 3), [(3, 0, 0.75), (9, 1, 2 / 3)], 2)


def test_short_match_falls_back_to_a_supported_one():
    docs = ([7, 1, 2, 5], [1, 2, 6], [3, 2, 6])
    # The request ends [7 1 2]: matches m = 3 (doc 0, then 5), m = 2 (doc 1,
    # then 6), m = 1 (doc 2, then 6). m >= 3 has one occurrence, m >= 2 two:
    # with min_support 2 the draft uses doc 1 and doc 0 (newest first).
    s = SuffixSpeculator(min_support=2)
    for d in docs:
        s.add_document(d)
    s.start(1, [7, 1, 2])
    assert_tree(native_tree(s, 1, 2, 8), [(6, 0, 0.5), (5, 0, 0.5)], 2)
    # min_support 1 keeps the longest; min_support 3 falls back to m >= 1.
    s1 = SuffixSpeculator(min_support=1)
    s3 = SuffixSpeculator(min_support=3)
    for sp in (s1, s3):
        for d in docs:
            sp.add_document(d)
        sp.start(1, [7, 1, 2])
    assert_tree(native_tree(s1, 1, 2, 8), [(5, 0, 1.0)], 3)
    assert_tree(native_tree(s3, 1, 2, 8), [(6, 0, 2 / 3), (5, 0, 1 / 3)], 1)


def test_a_long_match_is_trusted_alone_and_the_own_request_comes_first():
    s = SuffixSpeculator(max_depth=2, min_support=5)
    s.add_document([1, 2, 3, 4, 8, 8])
    s.add_document([1, 2, 3, 4, 9, 9])
    s.start(1, [0, 2, 3, 4, 7, 1, 2, 3, 4])
    # 4-token anchor [1 2 3 4]: the request's own earlier [2 3 4] is no 4-token
    # match; the corpus has two (m = 4, trusted although min_support is 5).
    # The newest document comes first: 9 before 8 at equal counts.
    assert_tree(native_tree(s, 1, 4, 8), [(9, 0, 0.5), (8, 0, 0.5), (9, 1, 1.0), (8, 2, 1.0)], 4)
    # max_occurrences 1 visits the newest only.
    s1 = SuffixSpeculator(max_depth=2, max_occurrences=1)
    s1.add_document([1, 2, 3, 4, 8, 8])
    s1.add_document([1, 2, 3, 4, 9, 9])
    s1.start(1, [1, 2, 3, 4, 5, 1, 2, 3, 4])
    assert_tree(native_tree(s1, 1, 4, 8), [(5, 0, 1.0), (1, 1, 1.0)], 4)  # its own, m = 4


def test_min_prob_cuts_unlikely_paths_and_trees_merge():
    s = SuffixSpeculator(min_prob=0.3)
    for d in ([1, 2, 3, 9], [1, 2, 4], [1, 2, 3, 8], [1, 2, 3, 9]):
        s.add_document(d)
    s.start(5, [5, 1, 2])
    assert_tree(native_tree(s, 5, 2, 16), [(3, 0, 0.75), (9, 1, 2 / 3)], 2)
    # Into a tree another speculator already filled: shared nodes merge
    # (confidence max, proposer bits or-ed), new ones take the budget left.
    tree = atlas.DraftTree(2, 4)
    tree.add_child(0, 3, 0.9, 1)
    tree.add_child(0, 7, 0.5, 1)
    assert s.native.propose(5, tree, 0) == 1
    assert tree.tokens.tolist() == [2, 3, 7, 9]
    np.testing.assert_array_equal(tree.confidences, np.float32([1, 0.9, 0.5, 2 / 3 * 2 / (2 + MATCH_PRIOR)]))
    assert tree.proposers.tolist() == [0, 3, 2, 1]


def test_no_occurrence_no_nodes_and_stats():
    s = SuffixSpeculator()
    s.start(1, [1, 2, 3])
    assert len(native_tree(s, 1, 3, 8)) == 1
    s.update(1, [1, 2])
    assert_tree(native_tree(s, 1, 2, 8), [(3, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)], 2)
    st = s.stats()
    assert (st["proposals"], st["matched"], st["match_length_sum"], st["proposed_nodes"]) == (2, 1, 2, 3)
    assert st["live_requests"] == 1 and s.native.length(1) == 5


# ---- the reference on random streams ------------------------------------------------------

def random_case(seed):
    rng = np.random.default_rng(seed)
    cfg = dict(max_match=int(rng.choice([1, 2, 3, 4, 5, 8, 32])), max_depth=int(rng.integers(1, 7)),
               max_occurrences=int(rng.choice([1, 2, 3, 7, 64])), min_support=int(rng.integers(1, 4)),
               max_corpus_tokens=int(rng.choice([0, 2, 5, 23, 60, 200, 5000])),
               index_prompts=bool(rng.integers(0, 2)), min_prob=float(rng.choice([0.0, 0.0, 0.05, 0.3])))
    vocab = int(rng.choice([2, 3, 5, 11]))
    # A template that text copies from most of the time, so matches grow long.
    template = rng.integers(0, vocab, size=int(rng.integers(5, 40))).tolist()
    return rng, cfg, vocab, template


def next_tokens(rng, vocab, template, count, cursor):
    out = []
    for _ in range(count):
        if rng.random() < 0.7:
            cursor[0] = (cursor[0] + 1) % len(template)
            out.append(template[cursor[0]])
        else:
            cursor[0] = int(rng.integers(0, len(template)))
            out.append(int(rng.integers(0, vocab)))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_matches_the_reference_on_random_streams(seed):
    rng, cfg, vocab, template = random_case(seed)
    spec, ref = SuffixSpeculator(**cfg), RefSuffix(**cfg)
    live, cursors, next_rid = [], {}, 0
    for step in range(150):
        action = rng.random()
        if not live or (action < 0.12 and len(live) < 4):
            cursors[next_rid] = [int(rng.integers(0, len(template)))]
            prompt = next_tokens(rng, vocab, template, int(rng.integers(1, 12)), cursors[next_rid])
            spec.start(next_rid, prompt)
            ref.start(next_rid, prompt)
            live.append(next_rid)
            next_rid += 1
        elif action < 0.2:
            rid = live.pop(int(rng.integers(0, len(live))))
            spec.finish(rid)
            ref.finish(rid)
        elif action < 0.24:
            doc = next_tokens(rng, vocab, template, int(rng.integers(0, 30)), [int(rng.integers(0, 40))])
            spec.add_document(doc)
            ref.add_document(doc)
        else:
            rid = live[int(rng.integers(0, len(live)))]
            max_nodes = int(rng.choice([1, 2, 3, 5, 9, 17, 40]))
            x = ref.live[rid][0]
            tree = atlas.DraftTree(x[-1], max_nodes)
            spec.propose([rid], [x], [tree], 3)
            want = ref.propose(rid, max_nodes)
            assert as_nodes(tree) == [(t, p, float(c)) for t, p, c in want], (seed, step, cfg)
            assert (tree.proposers[1:] == 8).all()
            new = next_tokens(rng, vocab, template, int(rng.integers(0, 4)), cursors[rid])
            spec.update(rid, new)
            ref.extend(rid, new)
        assert spec.corpus_tokens() == ref.corpus_tokens()
    assert spec.stats()["corpus_docs"] == len(ref.docs)


# ---- the corpus bound ----------------------------------------------------------------------

def test_eviction_is_oldest_first_and_exact():
    s = SuffixSpeculator(max_corpus_tokens=12)
    for d in ([1, 2, 3], [4, 5, 6], [7, 8]):  # 4 + 4 + 3 = 11 slots of 12
        s.add_document(d)
    assert s.corpus_tokens() == 8 and s.stats()["evicted_docs"] == 0
    s.add_document([9, 10])  # 11 + 3 > 12: the oldest goes
    st = s.stats()
    assert (st["corpus_docs"], st["corpus_tokens"], st["evicted_docs"], st["evicted_tokens"]) == (3, 7, 1, 3)

    def drafts(last):
        s.start(99, [last])
        tree = native_tree(s, 99, last, 16)
        s.finish(99)  # its (empty) output adds nothing
        return tree.tokens[1:].tolist()

    assert drafts(1) == [] and drafts(2) == []
    assert drafts(4) == [5, 6] and drafts(7) == [8] and drafts(9) == [10]
    # A document longer than the ring keeps its last 11 tokens and evicts all else.
    s.add_document(list(range(20, 35)))
    st = s.stats()
    assert (st["corpus_docs"], st["corpus_tokens"]) == (1, 11)
    assert drafts(23) == [] and drafts(24) == list(range(25, 35)) and drafts(4) == []


def test_no_corpus():
    s = SuffixSpeculator(max_corpus_tokens=0)
    s.add_document([1, 2, 3])
    s.start(1, [1, 2, 1])
    s.update(1, [2])
    s.finish(1)
    assert s.corpus_tokens() == 0
    s.start(2, [5, 1])
    assert len(native_tree(s, 2, 1, 8)) == 1


def test_memory_stays_under_the_bound_over_many_requests():
    cap, k, depth, max_match = 4099, 64, 16, 32
    s = SuffixSpeculator(max_match=max_match, max_depth=depth, max_occurrences=k, max_corpus_tokens=cap)
    bound = 12 * cap + 8 * 2 ** int(np.ceil(np.log2(2 * cap))) + 48 * (1 + k * depth) + 32 * k + \
        4 * max_match + 4096
    rng = np.random.default_rng(0)
    phrases = [rng.integers(0, 1000, size=int(rng.integers(3, 12))).tolist() for _ in range(50)]
    rid = 0

    def serve(count):
        nonlocal rid
        live = []
        for _ in range(count):
            prompt = sum((phrases[i] for i in rng.integers(0, 50, size=3)), [])
            s.start(rid, prompt)
            live.append(rid)
            for _ in range(3):
                out = phrases[int(rng.integers(0, 50))] + [int(rng.integers(0, 1000))]
                s.update(rid, out)
                tree = atlas.DraftTree(out[-1], 9)
                s.native.propose(rid, tree, 0)
            if len(live) == 4:  # four requests in flight
                s.finish(live.pop(0))
            assert s.corpus_tokens() <= cap
            rid += 1
        for r in live:
            s.finish(r)
        return s.memory_bytes()

    first = serve(300)
    later = serve(1200)
    st = s.stats()
    assert st["evicted_docs"] > 1000 and st["live_requests"] == 0 and st["matched"] > 0
    # The corpus is allocated once, at its final size: nothing grows with the
    # traffic served, and the whole stays under the bound stated in suffix.h.
    assert later == first <= bound


def test_acceptance_on_a_repetitive_stream():
    """Model-free but not useless: on text that repeats phrases, most drafts of
    the best-first path are right (a property of the rule, not a timing)."""
    rng = np.random.default_rng(1)
    phrases = [rng.integers(0, 5000, size=8).tolist() for _ in range(20)]
    text = sum((phrases[i] for i in rng.integers(0, 20, size=300)), [])
    s = SuffixSpeculator(max_depth=4)
    s.start(0, text[:1])
    hits = 0
    for i in range(1, len(text) - 1):
        tree = native_tree(s, 0, text[i - 1], 2)
        hits += len(tree) == 2 and int(tree.tokens[1]) == text[i]
        s.update(0, [text[i]])
    # Inside a phrase the next token is determined (7 of 8 positions); the
    # first phrases and the phrase boundaries are the misses.
    assert hits > 0.75 * len(text)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(max_match=0), ValueError, "max_match"),
    (dict(max_match=2000), ValueError, "max_match"),
    (dict(max_depth=0), ValueError, "max_depth"),
    (dict(max_occurrences=0), ValueError, "max_occurrences"),
    (dict(max_occurrences=4096, max_depth=1000), ValueError, "max_occurrences \\* max_depth"),
    (dict(min_support=0), ValueError, "min_support"),
    (dict(max_corpus_tokens=1), ValueError, "max_corpus_tokens"),
    (dict(max_corpus_tokens=-5), ValueError, "max_corpus_tokens"),
    (dict(max_corpus_tokens=2 ** 40), ValueError, "max_corpus_tokens"),
    (dict(vocab_size=-1), ValueError, "vocab_size"),
    (dict(min_prob=1.5), ValueError, "min_prob"),
    (dict(min_prob=float("nan")), ValueError, "min_prob"),
    (dict(max_match="3"), ValueError, "max_match must be an int"),
    (dict(index_prompts="yes"), TypeError, "index_prompts"),
])
def test_bad_config_raises(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SuffixSpeculator(**kwargs)


def test_bad_calls_raise_and_leave_the_state_intact():
    s = SuffixSpeculator(vocab_size=50)
    n = s.native
    s.start(1, [1, 2, 3, 1, 2])
    cases = [
        (lambda: n.start(1, [4]), ValueError, "already a live request"),
        (lambda: n.start(2, []), ValueError, "empty"),
        (lambda: n.start(2, [1, -1]), ValueError, r"prompt_tokens\[1\] = -1"),
        (lambda: n.start(2, [1, 50]), ValueError, r"prompt_tokens\[1\] = 50 is not a token id in \[0, 50\)"),
        (lambda: n.start(2, [1.5]), ValueError, r"prompt_tokens\[0\] must be an int"),
        (lambda: n.start(2, [True]), ValueError, r"prompt_tokens\[0\] must be an int"),
        (lambda: n.start(2, "abc"), ValueError, "sequence of token ids"),
        (lambda: n.start(2, None), ValueError, "sequence of token ids"),
        (lambda: n.start(2, 5), ValueError, "sequence of token ids"),
        (lambda: n.start(2, np.array([1.0, 2.0])), ValueError, "integers"),
        (lambda: n.start(2, np.array([[1, 2]])), ValueError, "1-D"),
        (lambda: n.start(2, [2 ** 40]), ValueError, "int32"),
        (lambda: n.start(2, np.array([2 ** 63], np.uint64)), ValueError, "int32"),
        (lambda: n.start("2", [1]), ValueError, "rid must be an int"),
        (lambda: n.start(2 ** 70, [1]), ValueError, "rid"),
        (lambda: n.extend(9, [1]), ValueError, "rid 9 is not a live request"),
        (lambda: n.extend(1, [1, 99]), ValueError, r"tokens\[1\] = 99"),
        (lambda: n.finish(9), ValueError, "rid 9 is not a live request"),
        (lambda: n.add_document([3, -2]), ValueError, r"tokens\[1\] = -2"),
        (lambda: n.propose(9, atlas.DraftTree(2, 4), 0), ValueError, "not a live request"),
        (lambda: n.propose(1, atlas.DraftTree(3, 4), 0), ValueError, "root token 3 is not the last token 2"),
        (lambda: n.propose(1, atlas.DraftTree(2, 4), 0, 4), ValueError, "has 5 tokens .* context has 4"),
        (lambda: n.propose(1, atlas.DraftTree(2, 4), 32), ValueError, "proposer"),
        (lambda: n.propose(1, atlas.DraftTree(2, 4), -1), ValueError, "proposer"),
        (lambda: n.propose(1, None, 0), TypeError, "tree must be an atlas DraftTree"),
        (lambda: n.propose(1, [2, 3], 0), TypeError, "tree must be an atlas DraftTree"),
        (lambda: n.propose(1, atlas.DraftTree(2, 4), 0, -3), ValueError, "context_len"),
        (lambda: n.propose(1, atlas.DraftTree(2, 4, vocab_size=3), 0), ValueError, "vocabulary"),
        (lambda: n.length(9), ValueError, "not a live request"),
        (lambda: s.propose([1], [[1], [2]], [atlas.DraftTree(2, 4)], 0), ValueError, "one entry per request"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    assert not n.is_live(2) and n.length(1) == 5 and s.corpus_tokens() == 0
    assert_tree(native_tree(s, 1, 2, 8), [(3, 0, 1.0), (1, 1, 1.0), (2, 2, 1.0)], 2)
    s.finish(12345)  # the wrapper's finish of a request it never saw is a no-op (the engine's cleanup)
    # Token ids from numpy arrays of any integer dtype and from tuples.
    n.extend(1, np.array([3], np.uint8))
    n.extend(1, (1,))
    assert n.length(1) == 7


def test_nasty_input_does_not_kill_the_interpreter():
    script = textwrap.dedent("""
        import numpy as np
        import atlas
        from atlas import _native

        class BadIndex:
            def __index__(self):
                raise RuntimeError("boom")

        def gen():
            yield 1
            raise KeyError("mid-iteration")

        s = _native.SuffixSpeculator(max_corpus_tokens=16)
        s.start(0, [1, 2, 3])
        calls = [
            lambda: s.start(1, [BadIndex()]),
            lambda: s.start(1, gen()),
            lambda: s.extend(0, [2 ** 31]),
            lambda: s.extend(0, [-2 ** 31 - 1]),
            lambda: s.extend(0, np.array([-1], np.int8)),
            lambda: s.extend(0, np.zeros((0, 3), np.int32)),
            lambda: s.propose(0, object(), 0),
            lambda: s.propose(0, _native.DraftTree(3, 4), 2 ** 64),
            lambda: s.propose(2 ** 63, _native.DraftTree(3, 4), 0),
            lambda: s.add_document(list(range(-3, 3))),
            lambda: s.finish(-1),
            lambda: _native.SuffixSpeculator(max_occurrences=2 ** 62),
            lambda: _native.SuffixSpeculator(min_prob=float("inf")),
        ]
        failed = 0
        for c in calls:
            try:
                c()
            except Exception:
                failed += 1
        # A generator that ends cleanly and a huge document are fine.
        s.extend(0, (t for t in [1, 2]))
        s.add_document(list(range(10 ** 5)))
        t = _native.DraftTree(2, 8)
        s.propose(0, t, 0)
        s.finish(0)  # its output [1 2] evicts the 15-token document
        print("alive", failed, len(calls), s.corpus_tokens())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["alive", "13", "13", "2"]



# ---- end to end: the engine with the suffix speculator ------------------------------------

def test_engine_with_suffix_drafts_is_lossless_and_accepts(one_torch_thread):
    """Greedy output with suffix drafts equals transformers' generate, for a
    repetitive prompt and for batched random ones; drafts from the prompt's
    repeats, the output's loops and, for a request seen before, the corpus are
    accepted. The controller keeps every candidate (select="all") so that
    acceptance measures the drafts, not the controller's choices; the default
    controller is lossless too."""
    model = tiny_llama(vocab=211, layers=2, seed=11)
    target = atlas.load(model)
    rng = np.random.default_rng(3)
    phrase = rng.integers(1, 211, size=9).tolist()
    repetitive = phrase * 4 + phrase[:3]
    prompts = [repetitive] + [rng.integers(1, 211, size=int(n)).tolist() for n in (5, 17, 30)]
    truth = {tuple(p): hf_greedy(model, p, 48) for p in prompts}
    spec = SuffixSpeculator(max_depth=6)
    engine = atlas.Engine(target, speculators=[spec], max_tree_nodes=7, max_batch=3,
                          controller=atlas.Controller(1, max_nodes=7, select="all"))
    outs = engine.generate(prompts, max_new_tokens=48)
    for p, o in zip(prompts, outs):
        assert_same_greedy(model, p, truth[tuple(p)], o.token_ids)
    assert outs[0].stats.accepted > 0
    assert spec.stats()["live_requests"] == 0 and spec.corpus_tokens() == 4 * 48
    # The same prompt again: its whole output is in the corpus, so after the
    # first token nearly every draft is right (up to 7 tokens per forward).
    again = engine.generate([prompts[2]], max_new_tokens=48)[0]
    assert_same_greedy(model, prompts[2], truth[tuple(prompts[2])], again.token_ids)
    assert again.stats.accepted > 0.8 * 47 and again.stats.steps <= 12
    # The default controller chooses among the drafts; the output is the same.
    engine = atlas.Engine(target, speculators=[SuffixSpeculator()], max_tree_nodes=7, max_batch=2)
    out = engine.generate([prompts[0]], max_new_tokens=48)[0]
    assert_same_greedy(model, prompts[0], truth[tuple(prompts[0])], out.token_ids)
