"""Tests of the CPU verifier: ``atlas.Verifier`` / ``atlas.verify`` over
``cpp/src/verify.cpp``.

* a float64 numpy reference verifier, written here from the rules in
  ``cpp/include/atlas/verify.h``, against the native one on random trees and
  logits of odd sizes (greedy exactly; sampling exactly up to decisions that sit
  on a probability boundary, see ``TOL``);
* hand-worked tiny trees with exact expected outputs;
* the exact distribution of recursive rejection sampling without replacement
  (draft_probs), by enumerating every draw of the children on tiny
  vocabularies;
* tree independence: with one-hot drafts the emitted tokens are those of plain
  sampling with the same seed, whatever the trees;
* statistical losslessness: the emitted tokens follow the target distribution
  (chi-square, alpha = 1e-4 per test on a fixed seed set, so deterministic);
* replay, agreement of every SIMD width, the plain sampler, and bad inputs.
"""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import atlas
from atlas import _native

# The streams of verify.h's uniforms (the third Philox counter word).
ONE_HOT, DRAFT, DRAFT_BONUS = 0, 1, 2

# ---- the reference ---------------------------------------------------------------
#
# The native verifier computes p in float, so a sampling decision can only differ
# from this float64 reference when the reference sits on a boundary; the reference
# carries an error bound per probability and flags such decisions ("near").
# The bound, derived from cpp/src/verify.cpp: a weight 2^t (t = (x - max) log2(e)
# / T <= 0) comes from a polynomial with relative error < 2e-7; t itself is
# rounded three times in float, an absolute error <= 3 * 2^-24 |t|, so a
# relative error <= 2e-7 |t| in 2^t; lanes add eight weights in float (<= 2e-7
# relative) and totals are double. So each probability is within
#     err_j = p_j (4e-7 + 2e-7 |t_j|)
# of the exact value, a cumulative probability within the sum of its err_j, and
# residuals max(p - q, 0) renormalised by the mass Z left carry err / Z. A
# decision is flagged when its margin is below MARGIN = 10 times its bound (a
# factor 10 of headroom). Greedy involves no arithmetic: it must match exactly.
MARGIN = 10.0


def philox(seed, position, stream, j):
    return float(_native.philox_uniform(int(seed), int(position) % 2**64, int(stream), int(j)))


def residual(p, err, r):
    """Renormalise r (p with some mass taken away: max(p - q, 0), or top_p's cut) and
    carry the error bound; None if no mass is left. The errors of a normalised p sum
    to zero, so the normaliser's error is at most the error mass of what was taken
    away, not a new error: the bound grows by 1 / Z (and one float rounding)."""
    z = r.sum()
    if not z > 0:
        return None
    kept = r > 0
    pn = r / z
    return pn, (np.where(kept, err, 0.0) + pn * err[~kept].sum()) / z + 6e-8 * pn


def ref_transform(row, temperature, top_k, top_p):
    """p after temperature, top_k (ties kept), softmax, top_p (ties by id), renormalise.
    Returns (p, err, near): err bounds the native error of each p_j; near says the top_p
    cut was within MARGIN * err of a boundary."""
    x = np.asarray(row, np.float64)
    v = x.shape[0]
    keep = np.ones(v, bool)
    if 0 < top_k < v:
        kth = np.sort(x)[::-1][top_k - 1]
        keep = x >= kth
    z = np.where(keep, x / temperature, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    with np.errstate(invalid="ignore"):
        t = np.where(p > 0, (z - z.max()) * np.log2(np.e), 0.0)
    err = p * (4e-7 + 2e-7 * np.abs(t))
    err += p * err.sum()  # the total's own error
    near = False
    if top_p < 1.0:
        order = np.lexsort((np.arange(v), -p))  # descending probability, then ascending id
        cum = np.cumsum(p[order])
        cum_err = np.cumsum(err[order])
        tp = np.float64(np.float32(top_p))
        cut = min(int(np.searchsorted(cum, tp, side="left")), v - 1)
        if abs(cum[cut] - tp) < MARGIN * cum_err[cut] or (
                cut > 0 and abs(cum[cut - 1] - tp) < MARGIN * cum_err[cut - 1]):
            near = True
        kept = np.zeros(v, bool)
        kept[order[: cut + 1]] = True
        p, err = residual(p, err, np.where(kept, p, 0.0))
    return p, err, near


def children(parents, node):
    return [c for c in range(node + 1, len(parents)) if parents[c] == node]


def ref_draw(p, err, u):
    """The inverse-CDF draw from p at u: (token, near)."""
    cdf = np.cumsum(p)
    cerr = np.cumsum(err)
    i = int(np.searchsorted(cdf, u, side="right"))
    if i >= len(p):
        i = int(np.nonzero(p > 0)[0][-1])
    lo = cdf[i - 1] if i > 0 else 0.0
    return i, min(u - lo, cdf[i] - u) < MARGIN * cerr[i]


def draft_step(p, q, x):
    """One attempt of recursive rejection sampling without replacement
    (verify.h): child x against p and the normalised draft distribution q.
    Returns (acceptance probability, p after a rejection (unnormalised, None if
    no mass is left), q after a rejection (normalised))."""
    accept = min(1.0, p[x] / q[x])
    r = np.maximum(p - q, 0.0)
    r[x] = 0.0
    q_next = q.copy()
    q_next[x] = 0.0
    return accept, (r if r.sum() > 0 else None), q_next / q_next.sum() if q_next.sum() > 0 else q_next


def ref_verify_tree(logits, tokens, parents, temperature, top_k, top_p, seed, offset, draft=None):
    """One tree, float64. Returns (accepted, emitted, near)."""
    node, path, near = 0, [], False
    while True:
        row = logits[node]
        kids = children(parents, node)
        position = int(offset) + len(path)  # the node's position: the root's plus its depth
        if temperature == 0:
            best = int(np.argmax(row))
            nxt = next((c for c in kids if tokens[c] == best), None)
            if nxt is None:
                return path, [int(tokens[c]) for c in path] + [best], near
            path.append(nxt)
            node = nxt
            continue
        p, err, near_cut = ref_transform(row, temperature, top_k, top_p)
        near |= near_cut
        nxt = None
        if draft is None:
            y, near_draw = ref_draw(p, err, philox(seed, position, ONE_HOT, 0))
            near |= near_draw
            nxt = next((c for c in kids if tokens[c] == y), None)
            if nxt is None:
                return path, [int(tokens[c]) for c in path] + [y], near
        else:
            q = np.asarray(draft[node], np.float64)
            q = q / q.sum()
            for j, c in enumerate(kids):
                x = int(tokens[c])
                u = philox(seed, position, DRAFT, j)
                if p[x] > 0 and abs(u * q[x] - p[x]) < MARGIN * err[x]:  # p(x) = 0 is exact in both
                    near = True
                if u * q[x] < p[x]:
                    nxt = c
                    break
                _, r, q = draft_step(p, q, x)
                if r is not None:
                    p, err = residual(p, err, r)
            if nxt is None:
                y, near_draw = ref_draw(p, err, philox(seed, position, DRAFT_BONUS, 0))
                return path, [int(tokens[c]) for c in path] + [y], near or near_draw
        path.append(nxt)
        node = nxt


# ---- random problems ---------------------------------------------------------------

def softmax64(x, t=1.0):
    z = np.asarray(x, np.float64) / t
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def make_problem(rng, vocab, sizes, shape, dtype="float32", temperature=1.0, draft=False,
                 scale=2.5, masked=0.0):
    """Random trees (sizes[i] nodes each, 'chain', 'fan' or 'random' parents) whose
    child tokens are often what the target would pick, so that paths get long.
    With draft=True, siblings are draws without replacement from their parent's
    draft row (a node whose row has nothing left to draw takes the newest node,
    which has no children yet, as its parent)."""
    total = int(sum(sizes))
    base = rng.standard_normal((total, vocab)).astype(np.float32) * np.float32(scale)
    if masked:
        base[rng.random((total, vocab)) < masked] = -np.inf
        base[np.arange(total), rng.integers(0, vocab, total)] = 1.0  # never a row of all -inf
    if vocab > 4:
        base[:, : vocab // 3] = np.round(base[:, : vocab // 3])  # plenty of ties
    if dtype == "bfloat16":
        logits = torch.from_numpy(base).bfloat16()
        values = logits.float().numpy().astype(np.float64)
    else:
        logits = base
        values = base.astype(np.float64)
    tokens = np.zeros(total, np.int32)
    parents = np.zeros(total, np.int32)
    offsets = np.zeros(len(sizes) + 1, np.int64)
    q = None
    if draft:
        # Draft rows: a blurred version of the target (float32, each row sums to 1).
        noisy = values * 0.6 + rng.standard_normal(values.shape)
        noisy[~np.isfinite(values)] = -np.inf
        q = np.stack([softmax64(r) for r in noisy]).astype(np.float32)
        q /= q.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    start = 0
    for b, n in enumerate(sizes):
        offsets[b + 1] = start + n
        parents[start] = -1
        drawn = [set() for _ in range(n)]  # tokens each node's children hold
        for i in range(1, n):
            if shape == "chain":
                par = i - 1
            elif shape == "fan":
                par = 0
            else:
                par = int(rng.integers(0, i))
            if q is not None:
                left = q[start + par].astype(np.float64)
                left[list(drawn[par])] = 0.0
                if not left.sum() > 0:
                    par = i - 1
                    left = q[start + par].astype(np.float64)
            parents[start + i] = par
            row = values[start + par]
            pick = rng.random() * (0.45 if shape == "chain" else 1.0)  # chains: mostly the target's pick
            if q is not None:
                tokens[start + i] = rng.choice(vocab, p=left / left.sum())
                drawn[par].add(int(tokens[start + i]))
            elif pick < 0.4:
                tokens[start + i] = int(np.argmax(row))
            elif pick < 0.8 and temperature > 0:
                tokens[start + i] = rng.choice(vocab, p=softmax64(row, temperature))
            else:
                tokens[start + i] = int(rng.integers(0, vocab))
        start += n
    return dict(logits=logits, values=values, tokens=tokens, parents=parents, offsets=offsets, draft=q)


def run_native(prob, **params):
    ver = atlas.Verifier(prob["values"].shape[1])
    return ver(prob["logits"], prob["tokens"], prob["parents"], prob["offsets"],
               draft_probs=prob["draft"], **params)


def per_tree(value, b):
    return value[b] if np.ndim(value) else value


def compare(prob, temperature, top_k, top_p, seed, offset):
    """Native against reference on every tree; returns (trees, near mismatches, near
    decisions) and fails on any mismatch that no boundary explains."""
    res = run_native(prob, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     offset=offset)
    offs = prob["offsets"]
    near_mismatch = near_total = 0
    for b in range(len(offs) - 1):
        lo, hi = int(offs[b]), int(offs[b + 1])
        acc, emit, near = ref_verify_tree(
            prob["values"][lo:hi], prob["tokens"][lo:hi], prob["parents"][lo:hi],
            float(np.float32(per_tree(temperature, b))), int(per_tree(top_k, b)),
            float(per_tree(top_p, b)), per_tree(seed, b), per_tree(offset, b),
            None if prob["draft"] is None else prob["draft"][lo:hi])
        near_total += near
        same = (list(res.accepted[b]) == acc and list(res.emitted[b]) == emit)
        if not same:
            assert near, (f"tree {b}: native accepted {list(res.accepted[b])} emitted "
                          f"{list(res.emitted[b])}, reference {acc} {emit}, no decision near a boundary")
            near_mismatch += 1
        # Invariants on every output.
        path = list(res.accepted[b])
        par = prob["parents"][lo:hi]
        assert all(par[c] == (path[i - 1] if i else 0) for i, c in enumerate(path))
        assert len(res.emitted[b]) == len(path) + 1
    return len(offs) - 1, near_mismatch, near_total


# ---- exact comparison with the reference -------------------------------------------------

VOCABS = [1, 3, 97, 1025, 49152]


def scale_for(vocab):
    # Large vocabularies get a heavier head, as real logits have: over a flat
    # distribution of 49152 tokens neighbouring cumulative sums differ by ~1e-5 and
    # almost every top_p cut would be within the error bound of a boundary.
    return 6.0 if vocab >= 1025 else 2.5


def sizes_for(rng, vocab, shape):
    if vocab >= 49152:
        return [1, 5, 17] if shape != "chain" else [64, 9]
    return [int(s) for s in rng.integers(1, 65, 8)] + [1, 64]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["chain", "fan", "random"])
@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_matches_reference(vocab, shape, dtype):
    rng = np.random.default_rng(vocab * 7 + len(shape) + (dtype == "bfloat16"))
    prob = make_problem(rng, vocab, sizes_for(rng, vocab, shape), shape, dtype, temperature=0.0,
                        masked=0.2 if vocab == 97 else 0.0)
    trees, near_mismatch, _ = compare(prob, 0.0, 0, 1.0, 0, 0)
    assert near_mismatch == 0  # greedy decisions involve no arithmetic
    # The chains are built to be accepted often: the comparison covered deep paths.
    if shape == "chain" and vocab > 1:
        res = run_native(prob, temperature=0.0)
        assert max(len(a) for a in res.accepted) >= 5


SAMPLING = [  # temperature, top_k, top_p
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (0.8, 50, 0.9),
    (1.3, 0, 0.8),
    (0.5, 3, 1.0),
    (1.0, 1, 1.0),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("params", SAMPLING)
@pytest.mark.parametrize("vocab", VOCABS)
def test_sampling_matches_reference(vocab, params, draft, dtype):
    temperature, top_k, top_p = params
    rng = np.random.default_rng(vocab + int(temperature * 100) + top_k + int(draft) * 1000 +
                                (dtype == "bfloat16") * 7)
    shape = ["chain", "fan", "random"][int(rng.integers(0, 3))]
    prob = make_problem(rng, vocab, sizes_for(rng, vocab, shape), shape, dtype, temperature,
                        draft=draft, masked=0.1 if vocab == 1025 else 0.0, scale=scale_for(vocab))
    nb = len(prob["offsets"]) - 1
    seeds = rng.integers(0, 2**63, nb, dtype=np.uint64)
    offs = rng.integers(0, 2**40, nb, dtype=np.uint64)
    trees, near_mismatch, near_total = compare(prob, temperature, top_k, top_p, seeds, offs)
    # Decisions within the error bound of a boundary are not rare with top_p over flat
    # distributions of many tokens (neighbouring cumulative sums differ by ~1 / vocab),
    # but a reference that flagged most trees would test nothing.
    assert near_total <= max(2, trees // 3)
    assert near_mismatch <= near_total


def test_sampling_many_small_trees_match_reference():
    """Many trees, small vocabularies, per-tree parameters: the exact-match rate."""
    rng = np.random.default_rng(11)
    total = mismatched = 0
    for vocab in (2, 3, 5, 17):
        for draft in (False, True):
            sizes = [int(s) for s in rng.integers(1, 12, 150)]
            prob = make_problem(rng, vocab, sizes, "random", "float32", 1.0, draft=draft, scale=1.5)
            nb = len(sizes)
            temps = rng.choice([0.0, 0.6, 1.0, 1.7], nb).astype(np.float32)
            ks = rng.choice([0, 1, 2, 4], nb)
            ps = rng.choice([1.0, 0.95, 0.6], nb).astype(np.float32)
            seeds = rng.integers(0, 2**63, nb, dtype=np.uint64)
            offs = rng.integers(0, 2**63, nb, dtype=np.uint64)
            trees, near_mismatch, _ = compare(prob, temps, ks, ps, seeds, offs)
            total += trees
            mismatched += near_mismatch
    assert mismatched <= total // 200  # "the vast majority" match exactly (here: >= 99.5%)


def test_strided_logits_rows():
    """A row stride larger than the vocabulary (a slice of a wider buffer)."""
    rng = np.random.default_rng(5)
    prob = make_problem(rng, 97, [9, 30], "random", temperature=0.9)
    wide = np.zeros((prob["values"].shape[0], 97 + 13), np.float32)
    wide[:, :97] = prob["logits"]
    prob["logits"] = wide[:, :97]
    assert prob["logits"].strides[0] == 110 * 4
    compare(prob, 0.9, 0, 1.0, np.uint64(3), np.uint64(4))
    compare(prob, 0.0, 0, 1.0, 0, 0)


# ---- hand-worked trees -------------------------------------------------------------

NEG = -np.inf


def test_hand_greedy_tree():
    # root: argmax 1 -> node 2 (token 1) accepted, node 1 (token 2) not;
    # node 2: argmax 0 -> node 3 (token 0) accepted; node 3: argmax 3 = bonus.
    logits = np.array([[0, 3, 1, 2],
                       [9, 0, 0, 0],
                       [5, 0, 0, 0],
                       [0, 0, 0, 7]], np.float32)
    res = atlas.verify(logits, [0, 2, 1, 0], [-1, 0, 0, 2])
    assert res.accepted[0].tolist() == [2, 3]
    assert res.emitted[0].tolist() == [1, 0, 3]


def test_hand_greedy_batch_and_bonus_only():
    logits = np.array([[0, 1, 0], [4, 0, 0], [0, 0, 2]], np.float32)
    # tree 0: root + a wrong child -> bonus only; tree 1: a lone root.
    res = atlas.verify(logits, [7, 0, 5], [-1, 0, -1], tree_offsets=[0, 2, 3])
    assert [a.tolist() for a in res.accepted] == [[], []]
    assert [e.tolist() for e in res.emitted] == [[1], [2]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_ties_go_to_lowest_index(dtype):
    rng = np.random.default_rng(3)
    for vocab in (2, 7, 16, 17, 33, 1025, 49152):
        for _ in range(8):
            row = np.round(rng.standard_normal(vocab)).astype(np.float32)
            top = rng.choice(vocab, size=min(vocab, 3), replace=False)
            row[top] = 50.0  # several equal maxima, anywhere (SIMD lanes, the tail)
            logits = torch.from_numpy(row[None]) if dtype == "float32" else torch.from_numpy(row[None]).bfloat16()
            res = atlas.verify(logits, [0], [-1])
            assert res.emitted[0].tolist() == [int(top.min())]
            assert int(torch.argmax(logits[0].float())) == int(top.min())
    # all equal, and all -inf but one
    assert atlas.verify(np.zeros((1, 100), np.float32), [0], [-1]).emitted[0].tolist() == [0]
    row = np.full((1, 100), NEG, np.float32)
    row[0, 99] = -1e30
    assert atlas.verify(row, [0], [-1]).emitted[0].tolist() == [99]


def test_hand_sampling_forced():
    # root: p = one-hot on token 0 (others -inf). Child 1 (token 1, p = 0) is
    # rejected for every u; child 2 (token 0, p = 1) accepted for every u < 1.
    # Node 2's row leaves token 2 only: the bonus is 2.
    logits = np.array([[0, NEG, NEG],
                       [0, 0, 0],
                       [NEG, NEG, 3]], np.float32)
    for seed in range(20):
        res = atlas.verify(logits, [5, 1, 0], [-1, 0, 0], temperature=0.8, seed=seed, offset=seed * 3)
        assert res.accepted[0].tolist() == [2]
        assert res.emitted[0].tolist() == [0, 2]
    # top_k = 1 makes the sampler greedy when the maximum is unique.
    res = atlas.verify(np.array([[1, 4, 2, 3]], np.float32), [0], [-1], temperature=2.0, top_k=1)
    assert res.emitted[0].tolist() == [1]
    # top_p small keeps only the most likely token.
    res = atlas.verify(np.array([[1, 4, 2, 3.9]], np.float32), [0], [-1], temperature=1.0, top_p=0.01)
    assert res.emitted[0].tolist() == [1]


def test_hand_sampling_one_coin():
    # p = [1/2, 1/2] at the root; one deterministic draft of token 1. The root's
    # draw y is token 0 if u < 1/2, else token 1 (inverse CDF), u the uniform
    # of the root's position. y = 1 accepts the draft, and node 1's row (one-hot
    # on token 1) gives the bonus 1; y = 0 is the bonus itself.
    logits = np.array([[0, 0], [NEG, 0]], np.float32)
    seen = set()
    for seed in range(40):
        u = philox(seed, 9, ONE_HOT, 0)
        res = atlas.verify(logits, [0, 1], [-1, 0], temperature=1.0, seed=seed, offset=9)
        assert res.emitted[0].tolist() == ([0] if u < 0.5 else [1, 1])
        # The plain sampler draws the same token at that position.
        assert atlas.Verifier(2).sample(logits[:1], seed=seed, offset=9).tolist() == [int(u >= 0.5)]
        seen.add(u < 0.5)
    assert seen == {True, False}


def test_hand_sampling_one_hot_uses_one_uniform_per_position():
    # p = [0.2, 0.3, 0.5]: y = 0 for u < 0.2, 1 for u < 0.5, else 2. Two drafts,
    # tokens 2 and 1, in either order: the accepted child is the one holding y,
    # so order does not matter, and node 1's row (one-hot on 0) gives bonus 0.
    p = np.array([0.2, 0.3, 0.5])
    logits = np.log(p).astype(np.float32)[None].repeat(3, 0)
    logits[1:] = [0, NEG, NEG]
    for seed in range(30):
        u = philox(seed, 4, ONE_HOT, 0)
        y = 0 if u < 0.2 else 1 if u < 0.5 else 2
        for toks in ([0, 2, 1], [0, 1, 2]):
            res = atlas.verify(logits, toks, [-1, 0, 0], temperature=1.0, seed=seed, offset=4)
            want = [y] if y == 0 else [y, 0]
            assert res.emitted[0].tolist() == want
            assert res.accepted[0].tolist() == ([] if y == 0 else [toks.index(y)])


def test_hand_sampling_draft_probs():
    # p = [1/2, 1/2], q = [1/4, 3/4]; child token 1 is accepted iff u * 3/4 < 1/2,
    # i.e. u < 2/3; otherwise the residual max(p - q, 0) = [1/4, 0] is one-hot on 0.
    logits = np.array([[0, 0], [0, NEG]], np.float32)
    q = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    for seed in range(40):
        u = philox(seed, 0, DRAFT, 0)
        res = atlas.verify(logits, [0, 1], [-1, 0], temperature=1.0, seed=seed, draft_probs=q)
        assert res.emitted[0].tolist() == ([1, 0] if u < 2 / 3 else [0])
    # Three tokens, p = [0.5, 0.3, 0.2], q = [0.2, 0.2, 0.6]; children token 2,
    # then token 1 (drawn without replacement). Token 2: accepted iff
    # u1 * 0.6 < 0.2. Rejected: p2 = max(p - q, 0) = [0.3, 0.1, 0] -> [3/4, 1/4, 0],
    # q2 = [0.2, 0.2, 0] -> [1/2, 1/2, 0]. Token 1: accepted iff u2 * 1/2 < 1/4.
    # Rejected: p3 = max(p2 - q2, 0) = [1/4, 0, 0] -> the bonus is 0.
    p = np.array([0.5, 0.3, 0.2])
    logits = np.log(p).astype(np.float32)[None].repeat(3, 0)
    logits[1:] = [NEG, NEG, 0]  # after either child: bonus 2
    q = np.tile(np.array([0.2, 0.2, 0.6], np.float32), (3, 1))
    outcomes = set()
    for seed in range(60):
        u1, u2 = philox(seed, 7, DRAFT, 0), philox(seed, 7, DRAFT, 1)
        res = atlas.verify(logits, [0, 2, 1], [-1, 0, 0], temperature=1.0, seed=seed, offset=7,
                           draft_probs=q)
        want = [2, 2] if u1 * 0.6 < 0.2 else [1, 2] if u2 * 0.5 < 0.25 else [0]
        assert res.emitted[0].tolist() == want
        outcomes.add(len(want) * 10 + want[0])
    assert outcomes == {22, 21, 10}


def test_rejecting_the_dominant_token():
    """A draft distribution that puts 99.999% of its mass on the token that holds
    99.94% of the target's, rejected (u >= p(x) / q(x)): what is left of p and
    of q are tiny differences of large sums, which the verifier must not lose
    to cancellation. The second child and the bonus then follow the rest."""
    vocab = 5000  # three exp blocks; the dominant token sits in the last one
    rng = np.random.default_rng(2)
    row = rng.standard_normal(vocab).astype(np.float32)
    row[4500] = 16.0
    logits = np.stack([row, row, row])
    p = ref_transform(row, 1.0, 0, 1.0)[0]
    assert p[4500] > 0.999
    q = np.full(vocab, 1e-5 / (vocab - 1))
    q[4500] = 1 - 1e-5
    q = np.tile(q.astype(np.float32), (3, 1))
    toks, pars = [0, 4500, 17], [-1, 0, 0]
    offsets = [o for o in range(100000) if philox(5, o, DRAFT, 0) * q[0, 4500] >= p[4500]][:8]
    assert len(offsets) >= 3
    for off in offsets:
        res = atlas.verify(logits, toks, pars, temperature=1.0, seed=5, offset=off, draft_probs=q)
        acc, emit, near = ref_verify_tree(logits.astype(np.float64), toks, pars, 1.0, 0, 1.0, 5, off, q)
        assert acc != [1] and emit[0] != 4500
        assert near or (res.emitted[0].tolist() == emit and res.accepted[0].tolist() == acc)


# ---- the rule with draft distributions, exactly -------------------------------------

def exact_first_token(p, q, xs, step=None):
    """The distribution of the first emitted token when the children hold the
    tokens xs (in index order), integrated exactly over the uniforms: child j is
    reached with the probability that every earlier one was rejected, and then
    accepted with draft_step's acceptance probability; the bonus takes the rest."""
    step = step or draft_step
    out = np.zeros_like(p)
    reach = 1.0
    p, q = p / p.sum(), q / q.sum()
    for x in xs:
        accept, r, q = step(p, q, x)
        out[x] += reach * accept
        reach *= 1.0 - accept
        if r is None:  # p == q: the child was accepted for sure
            break
        p = r / r.sum()
    return out + reach * p


def without_replacement(q, k):
    """Every ordered draw of k distinct tokens from q, with its probability."""
    for xs in itertools.permutations(np.flatnonzero(q > 0).tolist(), k):
        prob, left = 1.0, 1.0
        for x in xs:
            prob *= q[x] / left
            left -= q[x]
        yield xs, prob


def emitted_first_token(p, q, k, step=None):
    out = np.zeros_like(p)
    for xs, prob in without_replacement(q, k):
        out += prob * exact_first_token(p, q, xs, step)
    return out


def test_rule_without_replacement_is_exactly_lossless():
    """Every ordered draw of k = 1..3 distinct children from q on vocabularies of
    2 to 5 tokens, weighted by its probability: the first emitted token is
    distributed exactly as p (to 1e-12), for p and q with zeros, equal p and q,
    and q concentrated where p is not. draft_step is the step the reference
    verifier above takes, which the native one matches decision for decision."""
    rng = np.random.default_rng(31)
    cases = []
    for vocab in (2, 3, 4, 5):
        for _ in range(12):
            p, q = rng.dirichlet(np.ones(vocab) * 0.8), rng.dirichlet(np.ones(vocab) * 0.8)
            cases.append((p, q))
        p = rng.dirichlet(np.ones(vocab))
        cases.append((p, p.copy()))
        p0 = p.copy()
        p0[0] = 0.0
        cases.append((p0 / p0.sum(), rng.dirichlet(np.ones(vocab))))
        q0 = rng.dirichlet(np.ones(vocab))
        q0[-1] = 0.0
        cases.append((p, q0 / q0.sum()))
        qc = np.full(vocab, 1e-3)
        qc[int(np.argmin(p))] = 1.0
        cases.append((p, qc / qc.sum()))
    worst = 0.0
    for p, q in cases:
        for k in range(1, min(3, int((q > 0).sum())) + 1):
            worst = max(worst, float(np.abs(emitted_first_token(p, q, k) - p).max()))
    assert worst < 1e-12

    # The test has teeth: the same draws verified with replacement (q kept
    # whole after a rejection) are biased.
    def with_replacement(p, q, x):
        accept, r, _ = draft_step(p, q, x)
        return accept, (None if r is None else np.maximum(p - q, 0.0)), q
    biased = max(float(np.abs(emitted_first_token(p, q, 3, with_replacement) - p).max())
                 for p, q in cases if (q > 0).sum() >= 3)
    assert biased > 1e-3


# ---- tree independence of one-hot sampling ------------------------------------------

def context_logits(context, vocab, scale=2.0):
    """A stand-in for a model: logits that are a fixed function of the whole
    token sequence, the same whichever forward (a tree's or a plain step's)
    asks for them."""
    rng = np.random.default_rng([vocab] + [int(t) for t in context])
    x = (rng.standard_normal(vocab) * scale).astype(np.float32)
    x[rng.integers(0, vocab)] += 3.0  # a likely token, so that drafts get accepted
    return x


def as_dtype(rows, dtype):
    rows = np.asarray(rows, np.float32)
    return torch.from_numpy(rows).bfloat16() if dtype == "bfloat16" else rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.8)])
def test_one_hot_sampling_is_plain_sampling_whatever_the_trees(params, dtype):
    """Several sequences decoded twice with the same seeds: plainly (a one-node
    tree per token, offset = the position of the last token) and through random
    trees of up to 16 nodes whose node logits are context_logits of the node's
    whole path (offset = the root's position). The tokens are the same, one for
    one: the tree decides only how many of them one verification emits."""
    temperature, top_k, top_p = params
    vocab, steps, batch = 53, 40, 4
    rng = np.random.default_rng(int(temperature * 10) + top_k + (dtype == "bfloat16"))
    prompts = [rng.integers(0, vocab, int(rng.integers(1, 6))).tolist() for _ in range(batch)]
    seeds = rng.integers(0, 2**64, batch, dtype=np.uint64)
    ver = atlas.Verifier(vocab, max_batch=batch)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds)

    plain = [list(p) for p in prompts]
    for _ in range(steps):
        rows = as_dtype([context_logits(c, vocab) for c in plain], dtype)
        got = ver.sample(rows, offset=np.array([len(c) - 1 for c in plain], np.uint64), **kw)
        for c, t in zip(plain, got):
            c.append(int(t))

    spec = [list(p) for p in prompts]
    accepted = verifications = 0
    while min(len(c) - len(p) for c, p in zip(spec, prompts)) < steps:
        toks, pars, rows, offs = [], [], [], [0]
        for c, want in zip(spec, plain):
            # A trie: the true continuation (known from the plain run) with one
            # token perhaps flipped, and random branches anywhere.
            truth = want[len(c):len(c) + int(rng.integers(0, 6))]
            if truth and rng.random() < 0.5:
                truth[int(rng.integers(0, len(truth)))] = int(rng.integers(0, vocab))
            paths = [[]]
            kids = {(): set()}
            for d in range(1, len(truth) + 1):
                paths.append(truth[:d])
                kids.setdefault(tuple(truth[:d - 1]), set()).add(truth[d - 1])
                kids.setdefault(tuple(truth[:d]), set())
            size = int(rng.integers(1, 17))
            while len(paths) < size:
                parent = paths[int(rng.integers(0, len(paths)))]
                t = int(rng.integers(0, vocab))
                if t not in kids[tuple(parent)]:
                    kids[tuple(parent)].add(t)
                    kids[tuple(parent + [t])] = set()
                    paths.append(parent + [t])
            paths.sort(key=len)  # parents before children
            index = {tuple(q): i for i, q in enumerate(paths)}
            for q in paths:
                toks.append(q[-1] if q else c[-1])
                pars.append(index[tuple(q[:-1])] if q else -1)
                rows.append(context_logits(c + q, vocab))
            offs.append(len(toks))
        roots = np.array([len(c) - 1 for c in spec], np.uint64)  # the position of each tree's root
        res = ver(as_dtype(rows, dtype), toks, pars, offs, offset=roots, **kw)
        for c, e, a in zip(spec, res.emitted, res.accepted):
            c.extend(e.tolist())
            accepted += len(a)
        verifications += 1
    for s, p in zip(spec, plain):
        n = len(p)
        assert s[:n] == p
    assert accepted > steps  # the trees were used: many verifications emitted several tokens
    assert verifications < steps


# ---- replay and randomness ---------------------------------------------------------

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(ctr, key):
    """Philox-4x32-10 (Salmon et al., SC'11) in plain Python integers."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = PHILOX_M[0] * c0, PHILOX_M[1] * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF)
        k0, k1 = (k0 + PHILOX_W[0]) & 0xFFFFFFFF, (k1 + PHILOX_W[1]) & 0xFFFFFFFF
    return c0, c1, c2, c3


def uniform53(seed, position, stream, j):
    """verify.h's uniform from the reference generator, exactly."""
    w = philox4x32_10((position & 0xFFFFFFFF, position >> 32, stream, j), (seed & 0xFFFFFFFF, seed >> 32))
    return ((w[0] << 21) | (w[1] >> 11)) / 2.0**53


def test_philox_known_answers():
    # Random123's published Philox-4x32-10 vectors (tests/kat_vectors).
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, words in cases:
        assert philox4x32_10(ctr, key) == words
        seed = key[0] | (key[1] << 32)
        position = ctr[0] | (ctr[1] << 32)
        u = _native.philox_uniform(seed, position, ctr[2], ctr[3])
        assert u == ((words[0] << 21) | (words[1] >> 11)) / 2.0**53
    # Random inputs over the whole range of every word: 53 bits, bit for bit.
    rng = np.random.default_rng(0)
    for _ in range(300):
        seed, position = (int(x) for x in rng.integers(0, 2**64, 2, dtype=np.uint64))
        stream, j = (int(x) for x in rng.integers(0, 2**32, 2, dtype=np.uint64))
        assert _native.philox_uniform(seed, position, stream, j) == uniform53(seed, position, stream, j)


def test_philox_uniforms_look_uniform():
    us = np.array([philox(7, pos, stream, j) for pos in range(40) for stream in range(10) for j in range(10)])
    assert 0.0 <= us.min() and us.max() < 1.0
    assert stats.kstest(us, "uniform").pvalue > 1e-4
    assert len(np.unique(us)) > 3990


def test_replay_bit_identical_and_offsets_differ():
    rng = np.random.default_rng(8)
    prob = make_problem(rng, 97, [12] * 60, "random", temperature=1.0, draft=True)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    a = run_native(prob, offset=5, **kw)
    b = run_native(prob, offset=5, **kw)
    c = run_native(prob, offset=6, **kw)
    same = [np.array_equal(x, y) for x, y in zip(a.emitted, b.emitted)]
    assert all(same) and all(np.array_equal(x, y) for x, y in zip(a.accepted, b.accepted))
    diff = sum(not np.array_equal(x, y) for x, y in zip(a.emitted, c.emitted))
    assert diff > 10
    assert philox(1234, 5, 0, 0) != philox(1234, 6, 0, 0)


_WIDTH_SCRIPT = r"""
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import atlas
rng = np.random.default_rng(21)
out = []
for vocab, dt, t, k, p, draft in [(1025, "float32", 1.0, 0, 1.0, False), (1025, "bfloat16", 0.7, 0, 0.9, True),
                                  (49152, "float32", 0.8, 50, 0.9, False), (4099, "float32", 1.2, 0, 1.0, True),
                                  (333, "bfloat16", 0.0, 0, 1.0, False)]:
    x = rng.standard_normal((40, vocab)).astype(np.float32) * 3
    x[:, 5] = 20  # deep accepted chains
    logits = torch.from_numpy(x).bfloat16() if dt == "bfloat16" else x
    q = None
    if draft:
        q = np.exp(x - x.max(1, keepdims=True)); q = (q / q.sum(1, keepdims=True)).astype(np.float32)
    tok = np.full(40, 5, np.int32); par = np.tile(np.arange(-1, 19, dtype=np.int32), 2)
    res = atlas.Verifier(vocab)(logits, tok, par, [0, 20, 40], temperature=t, top_k=k, top_p=p,
                                seed=[3, 4], offset=[10, 11], draft_probs=q)
    out.append([e.tolist() for e in res.emitted])
    out.append(atlas.Verifier(vocab).sample(logits, temperature=max(t, 0.5), top_k=k, top_p=p,
                                            seed=np.arange(40), offset=2).tolist())
print(json.dumps(out))
"""


def test_every_simd_width_gives_the_same_tokens():
    """The kernels exist for 4-, 8- and 16-float vectors; the environment variable
    ATLAS_SIMD_WIDTH caps the width. All must agree (and the widest the CPU has
    runs in the other tests, against the reference)."""
    pkg = os.path.dirname(os.path.dirname(atlas.__file__))
    outs = {}
    for width in ("4", "8", "16"):
        env = dict(os.environ, ATLAS_SIMD_WIDTH=width)
        run = subprocess.run([sys.executable, "-c", _WIDTH_SCRIPT, pkg], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outs[width] = json.loads(run.stdout)
    assert outs["4"] == outs["8"] == outs["16"]


# ---- the plain sampler ---------------------------------------------------------------

def test_sample_equals_one_node_trees():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 211)).astype(np.float32) * 2
    seeds = rng.integers(0, 2**63, 30, dtype=np.uint64)
    ver = atlas.Verifier(211)
    got = ver.sample(x, temperature=0.9, top_k=40, top_p=0.9, seed=seeds, offset=3)
    res = ver(x, np.zeros(30, np.int32), np.full(30, -1, np.int32), np.arange(31), temperature=0.9,
              top_k=40, top_p=0.9, seed=seeds, offset=3)
    assert got.tolist() == [int(e[0]) for e in res.emitted]
    for b in range(30):
        _, emit, near = ref_verify_tree(x[b:b + 1].astype(np.float64), [0], [-1], 0.9, 40, 0.9,
                                        seeds[b], 3)
        assert near or emit == [int(got[b])]
    assert ver.sample(x, temperature=0).tolist() == np.argmax(x, 1).tolist()


def test_sample_distribution():
    # 20000 draws of one row at temperature 0.7, top_k 5, top_p 0.9.
    rng = np.random.default_rng(12)
    row = rng.standard_normal(8).astype(np.float32)
    n = 20000
    got = atlas.Verifier(8, max_batch=n).sample(np.repeat(row[None], n, 0), temperature=0.7,
                                                top_k=5, top_p=0.9, seed=np.arange(n), offset=77)
    p = ref_transform(row, 0.7, 5, 0.9)[0]
    assert_distribution(np.bincount(got, minlength=8), p)


# ---- statistical losslessness ----------------------------------------------------------

ALPHA = 1e-4  # false alarm rate per test; the seeds are fixed, so each test is deterministic


def assert_distribution(counts, probs, alpha=ALPHA):
    """Chi-square goodness of fit; cells expected below 5 are pooled."""
    counts = np.asarray(counts, np.float64).ravel()
    probs = np.asarray(probs, np.float64).ravel()
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 came out"
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & (probs > 0)].sum()] if (~big & (probs > 0)).any() else [])
    exp = list(expected[big]) + ([expected[~big & (probs > 0)].sum()] if (~big & (probs > 0)).any() else [])
    obs, exp = np.array(obs), np.array(exp)
    if len(obs) < 2:
        return
    pvalue = stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
    assert pvalue > alpha, f"chi-square p = {pvalue:.2e}: observed {obs}, expected {np.round(exp, 1)}"


V_STAT = 5


def target_tables(seed):
    """A toy target over V_STAT tokens: first-token logits L0, second-token logits
    L1[a] after a, third L2[a, b]. Spread so that no token is negligible."""
    rng = np.random.default_rng(seed)
    l0 = rng.standard_normal(V_STAT) * 1.2
    l1 = rng.standard_normal((V_STAT, V_STAT)) * 1.2
    l2 = rng.standard_normal((V_STAT, V_STAT, V_STAT)) * 1.2
    return l0.astype(np.float32), l1.astype(np.float32), l2.astype(np.float32)


def exact_pair_distribution(l0, l1, t, k, p):
    p0 = ref_transform(l0, t, k, p)[0]
    return np.stack([p0[a] * ref_transform(l1[a], t, k, p)[0] for a in range(V_STAT)])


def draft_dist(logits_row, kind):
    """The draft's distribution at a node: good = close to the target, bad = far."""
    if kind == "good":
        return softmax64(logits_row * 0.9 + 0.1)
    return softmax64(-1.5 * logits_row)


def draws_without_replacement(rng, q, k):
    """k distinct tokens drawn one after the other from q, each draw from what
    is left of q renormalised (numpy's choice(replace=False) is exactly that)."""
    return rng.choice(len(q), k, replace=False, p=q)


def build_trials(n, l0, l1, l2, draft, rng):
    """n independent trees. One-hot drafts: 3 children at depth 1 (fixed tokens) and
    2 below each. Sampled drafts: 3 draws without replacement from q at the root
    and 2 below each of them."""
    toks, pars, rows, qs, offs = [], [], [], [], [0]
    for _ in range(n):
        t_tok, t_par, t_rows = [0], [-1], [l0]
        if draft in ("good", "bad"):
            q0 = draft_dist(l0, draft)
            t_q = [q0]
            for a in draws_without_replacement(rng, q0, 3):
                node = len(t_tok)
                qa = draft_dist(l1[a], draft)
                t_tok.append(int(a)); t_par.append(0); t_rows.append(l1[a]); t_q.append(qa)
                for y in draws_without_replacement(rng, qa, 2):
                    t_tok.append(int(y)); t_par.append(node); t_rows.append(l2[a, y])
                    t_q.append(np.full(V_STAT, 1 / V_STAT))  # leaves: rows never read
            qs.extend(t_q)
        else:
            order = np.argsort(-l0) if draft == "onehot_good" else np.argsort(l0)
            for a in order[:3]:
                node = len(t_tok)
                t_tok.append(int(a)); t_par.append(0); t_rows.append(l1[a])
                sub = np.argsort(-l1[a]) if draft == "onehot_good" else np.argsort(l1[a])
                for y in sub[:2]:
                    t_tok.append(int(y)); t_par.append(node); t_rows.append(l2[a, y])
        toks += t_tok; pars += t_par; rows += t_rows
        offs.append(offs[-1] + len(t_tok))
    q = None
    if qs:
        q = np.asarray(qs, np.float32)
        q /= q.sum(1, keepdims=True)
    return (np.asarray(rows, np.float32), np.asarray(toks, np.int32), np.asarray(pars, np.int32),
            np.asarray(offs, np.int64), q)


def pair_counts(n, t, k, p, draft, seed):
    l0, l1, l2 = target_tables(seed)
    rng = np.random.default_rng(seed + 1)
    rows, toks, pars, offs, q = build_trials(n, l0, l1, l2, draft, rng)
    ver = atlas.Verifier(V_STAT, max_batch=n)
    res = ver(rows, toks, pars, offs, temperature=t, top_k=k, top_p=p,
              seed=np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 32), offset=seed,
              draft_probs=q)
    counts = np.zeros((V_STAT, V_STAT))
    second = rng.random(n)
    for b in range(n):
        e = res.emitted[b]
        if len(e) >= 2:
            counts[e[0], e[1]] += 1
        else:
            # One token this step: the next step samples from the target after it;
            # draw that plainly so that the pair is the model's pair.
            p1 = ref_transform(l1[e[0]], t, k, p)[0]
            counts[e[0], min(int(np.searchsorted(np.cumsum(p1), second[b], "right")), V_STAT - 1)] += 1
    return counts, exact_pair_distribution(l0, l1, t, k, p)


STAT_CASES = [  # temperature, top_k, top_p, drafts
    (1.0, 0, 1.0, "onehot_good"),
    (1.0, 0, 1.0, "onehot_bad"),
    (0.7, 0, 1.0, "good"),
    (0.7, 0, 1.0, "bad"),
    (1.0, 3, 1.0, "bad"),
    (1.0, 0, 0.8, "good"),
    (0.7, 4, 0.9, "onehot_good"),
    (0.7, 4, 0.9, "bad"),
]


@pytest.mark.parametrize("case", STAT_CASES)
def test_lossless_first_two_tokens(case):
    t, k, p, draft = case
    counts, exact = pair_counts(12000, t, k, p, draft, seed=STAT_CASES.index(case) + 100)
    assert_distribution(counts, exact)


# ---- bad inputs ---------------------------------------------------------------------------

def call(logits=None, tokens=None, parents=None, offsets=None, accepted=None, emitted=None, num=None,
         workspace=None, draft=None, t=0.0, k=0, p=1.0, seed=0, offset=0):
    logits = np.zeros((3, 5), np.float32) if logits is None else logits
    n = logits.shape[0]
    tokens = np.array([0, 1, 2], np.int32) if tokens is None else tokens
    parents = np.array([-1, 0, 1], np.int32) if parents is None else parents
    offsets = np.array([0, n], np.int64) if offsets is None else offsets
    batch = len(offsets) - 1
    accepted = np.full((batch, 4), 77, np.int32) if accepted is None else accepted
    emitted = np.full((batch, accepted.shape[1] + 1), 77, np.int32) if emitted is None else emitted
    num = np.full(batch, 77, np.int32) if num is None else num
    ws = np.empty(_native.verify_workspace_bytes(logits.shape[1]), np.uint8) if workspace is None else workspace
    _native.verify(logits, tokens, parents, offsets, t, k, p, seed, offset, draft, accepted, emitted, num, ws)
    return accepted, emitted, num


BAD_CASES = [
    (dict(logits=np.zeros((3, 5), np.float64)), "logits"),
    (dict(logits=np.zeros((3, 5, 1), np.float32)), "logits"),
    (dict(logits=np.zeros((3, 0), np.float32), workspace=np.zeros(64, np.uint8)), "logits"),
    (dict(tokens=np.array([0, 1], np.int32)), "tokens"),
    (dict(tokens=np.array([0, 1, 2], np.int64)), "tokens"),
    (dict(tokens=np.array([0, 1, 5], np.int32)), "tokens"),
    (dict(tokens=np.array([0, -1, 2], np.int32)), "tokens"),
    (dict(parents=np.array([0, 0, 1], np.int32)), "parents"),
    (dict(parents=np.array([-1, 2, 1], np.int32)), "parents"),
    (dict(parents=np.array([-1, 0, -1], np.int32)), "parents"),
    (dict(parents=np.array([-1, 0, 7], np.int32)), "parents"),
    (dict(offsets=np.array([0, 2], np.int64)), "tree_offsets"),
    (dict(offsets=np.array([0, 0, 3], np.int64)), "empty"),
    (dict(offsets=np.array([1, 3], np.int64)), "tree_offsets"),
    (dict(offsets=np.array([0], np.int64)), "tree_offsets"),
    (dict(offsets=np.array([0, 3], np.int32)), "tree_offsets"),
    (dict(accepted=np.zeros((1, 1), np.int32)), "max_accept"),
    (dict(accepted=np.zeros((1, 4), np.int32), emitted=np.zeros((1, 4), np.int32)), "emitted_out"),
    (dict(num=np.zeros(2, np.int32)), "num_accepted_out"),
    (dict(workspace=np.zeros(10, np.uint8)), "workspace"),
    (dict(t=-1.0), "temperature"),
    (dict(t=float("nan")), "temperature"),
    (dict(t=float("inf")), "temperature"),
    (dict(k=-2), "top_k"),
    (dict(p=0.0), "top_p"),
    (dict(p=1.5), "top_p"),
    (dict(p=float("nan")), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(t=np.array([1.0, 1.0])), "temperature"),
    (dict(offset=-1), "offset"),
    (dict(draft=np.zeros((3, 4), np.float32), t=1.0), "draft_probs"),
    (dict(draft=np.zeros((3, 5), np.float64), t=1.0), "draft_probs"),
]


@pytest.mark.parametrize("kwargs,word", BAD_CASES)
def test_bad_input_raises_and_writes_nothing(kwargs, word):
    batch = max(len(kwargs.get("offsets", [0, 3])) - 1, 1)
    accepted = np.full((batch, 4), 77, np.int32)
    emitted = np.full((batch, 5), 77, np.int32)
    num = np.full(batch, 77, np.int32)
    kwargs = dict(kwargs)
    kwargs.setdefault("accepted", accepted)
    kwargs.setdefault("emitted", emitted)
    kwargs.setdefault("num", num)
    with pytest.raises((ValueError, TypeError)) as err:
        call(**kwargs)
    assert word in str(err.value)
    assert (accepted == 77).all() and (emitted == 77).all() and (num == 77).all()


def test_bad_rows_on_the_walk():
    logits = np.zeros((3, 5), np.float32)
    logits[0, 0] = 1.0  # argmax 0 = token of node 1: node 1's row is read
    logits[2, 1] = np.nan  # node 2 is never visited (its parent's argmax is 0, not 1)
    tokens = np.array([0, 0, 1], np.int32)
    parents = np.array([-1, 0, 1], np.int32)
    res = atlas.verify(logits, tokens, parents)
    assert res.accepted[0].tolist() == [1]
    for bad in (np.nan, np.inf):
        x = logits.copy()
        x[1, 3] = bad
        with pytest.raises(ValueError, match=r"logits row 1 \(node 1 of tree 0\).*NaN or \+inf"):
            atlas.verify(x, tokens, parents)
        with pytest.raises(ValueError, match="NaN or"):
            atlas.verify(x, tokens, parents, temperature=1.0, top_k=2)
    x = logits.copy()
    x[1] = -np.inf
    for kw in (dict(), dict(temperature=1.0), dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.5)):
        with pytest.raises(ValueError, match="all -inf"):
            atlas.verify(x, tokens, parents, **kw)
    # -inf entries are fine: they just can never come out.
    x = np.zeros((3, 5), np.float32)
    x[:, 2:] = -np.inf
    for seed in range(10):
        res = atlas.verify(x, tokens, parents, temperature=1.0, seed=seed)
        assert all(t < 2 for t in res.emitted[0])


def bf16_from_bits(bits):
    return torch.tensor(np.asarray(bits, np.uint16).view(np.int16)).view(torch.bfloat16)


@pytest.mark.parametrize("vocab", [7, 64, 300, 2000])
def test_bfloat16_special_values(vocab):
    """The bfloat16 greedy scan works on the raw bits: check its corner cases."""
    rng = np.random.default_rng(vocab)
    base = torch.from_numpy(rng.standard_normal(vocab).astype(np.float32) - 5).bfloat16()
    bits = base.view(torch.int16).numpy().view(np.uint16).copy()
    where = rng.choice(vocab, 3, replace=False)
    # -0 before +0 at the maximum: equal values, the lower index wins (as torch.argmax).
    row = bits.copy()
    row[min(where[:2])], row[max(where[:2])] = 0x8000, 0x0000
    t = bf16_from_bits(row)[None]
    assert atlas.verify(t, [0], [-1]).emitted[0].tolist() == [int(torch.argmax(t[0].float()))]
    row[min(where[:2])], row[max(where[:2])] = 0x0000, 0x8000
    assert atlas.verify(bf16_from_bits(row)[None], [0], [-1]).emitted[0].tolist() == [int(min(where[:2]))]
    # -inf entries are allowed; the largest finite value wins, even the most negative one.
    row = np.full(vocab, 0xFF80, np.uint16)
    row[where[2]] = 0xFF7F  # the lowest finite bfloat16
    assert atlas.verify(bf16_from_bits(row)[None], [0], [-1]).emitted[0].tolist() == [int(where[2])]
    row[where[2]] = 0xFF80
    with pytest.raises(ValueError, match="all -inf"):
        atlas.verify(bf16_from_bits(row)[None], [0], [-1])
    # NaN of either sign and +inf are refused wherever they sit.
    for bad in (0x7F80, 0x7FC0, 0x7F81, 0xFFC0, 0xFF81, 0xFFFF):
        row = bits.copy()
        row[where[2]] = bad
        for kw in (dict(), dict(temperature=1.0), dict(temperature=1.0, top_k=3)):
            with pytest.raises(ValueError, match=r"NaN or \+inf"):
                atlas.verify(bf16_from_bits(row)[None], [0], [-1], **kw)


def test_bad_draft_rows():
    logits = np.zeros((2, 3), np.float32)
    tokens, parents = np.array([0, 1], np.int32), np.array([-1, 0], np.int32)
    good = np.full((2, 3), 1 / 3, np.float32)
    atlas.verify(logits, tokens, parents, temperature=1.0, draft_probs=good)
    for row, msg in ([np.nan, 0.5, 0.5], "finite"), ([-0.1, 0.6, 0.5], "non-negative"), \
                    ([0.2, 0.2, 0.2], "sum to 1"), ([0.5, 0.0, 0.5], "probability 0"):
        q = good.copy()
        q[0] = row
        with pytest.raises(ValueError, match=msg):
            atlas.verify(logits, tokens, parents, temperature=1.0, draft_probs=q)
    # Greedy never reads draft rows.
    q = good.copy()
    q[0] = np.nan
    atlas.verify(logits, tokens, parents, draft_probs=q)
    # Siblings drawn without replacement are distinct: the second token 1 would
    # have probability 0 after the first's rejection (p(1) = 0 rejects it always).
    logits = np.array([[0, NEG, 0], [0, 0, 0], [0, 0, 0]], np.float32)
    q = np.full((3, 3), 1 / 3, np.float32)
    for seed in range(5):
        with pytest.raises(ValueError, match="repeats an earlier sibling"):
            atlas.verify(logits, [0, 1, 1], [-1, 0, 0], temperature=1.0, draft_probs=q, seed=seed)
    # One-hot drafts may repeat a token: the first such child is the one accepted.
    res = atlas.verify(np.array([[NEG, 0, NEG], [0, 0, 0], [0, 0, 0]], np.float32), [0, 1, 1], [-1, 0, 0],
                       temperature=1.0)
    assert res.accepted[0].tolist() == [1]


def test_depth_over_max_accept_and_tree_size():
    logits = np.zeros((5, 3), np.float32)
    chain = np.arange(-1, 4, dtype=np.int32)
    with pytest.raises(ValueError, match="depth 4, more than max_accept = 2"):
        call(logits=logits, tokens=np.zeros(5, np.int32), parents=chain,
             accepted=np.zeros((1, 2), np.int32), emitted=np.zeros((1, 3), np.int32), num=np.zeros(1, np.int32))
    n = _native.MAX_TREE_NODES + 1
    with pytest.raises(ValueError, match="more than 1024"):
        atlas.verify(np.zeros((n, 2), np.float32), np.zeros(n, np.int32), np.r_[-1, np.zeros(n - 1, np.int32)])
    # The Python wrapper sizes its outputs for the deepest possible tree.
    res = atlas.verify(np.zeros((70, 2), np.float32), np.zeros(70, np.int32), np.arange(-1, 69, dtype=np.int32))
    assert len(res.accepted[0]) == 69


def test_wrapper_errors():
    ver = atlas.Verifier(5)
    with pytest.raises(ValueError, match="vocab = 5"):
        ver(np.zeros((1, 6), np.float32), [0], [-1])
    with pytest.raises(ValueError, match="tokens"):
        ver(np.zeros((1, 5), np.float32), [0.5], [-1])
    with pytest.raises(ValueError, match="tokens"):
        ver(np.zeros((1, 5), np.float32), [2**40], [-1])
    with pytest.raises(ValueError, match="logits"):
        ver.sample(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="vocab"):
        atlas.Verifier(0)
    # numpy and torch scalars are numbers
    ver(np.zeros((1, 5), np.float32), [0], [-1], temperature=np.float32(0.5), top_k=np.int64(2),
        top_p=torch.tensor(0.9), seed=np.uint64(3))


_NASTY = r"""
import sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from atlas import _native
import atlas
ws = np.empty(_native.verify_workspace_bytes(5), np.uint8)
def go(logits, tokens, parents, offsets, acc, emi, num, draft=None, t=1.0, workspace=ws, offset=0):
    try:
        _native.verify(logits, tokens, parents, offsets, t, 0, 1.0, 0, offset, draft, acc, emi, num, workspace)
    except (ValueError, TypeError, RuntimeError) as e:
        print("raised:", type(e).__name__, str(e)[:80])
i32 = lambda *v: np.array(v, np.int32)
acc, emi, num = np.zeros((1, 4), np.int32), np.zeros((1, 5), np.int32), np.zeros(1, np.int32)
x = np.zeros((3, 5), np.float32)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 2**62], np.int64), acc, emi, num)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, -5, 3], np.int64), np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32), np.zeros(2, np.int32))
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 2**40, 3], np.int64), np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32), np.zeros(2, np.int32))
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 1000, 3], np.int64), np.zeros((2, 4), np.int32), np.zeros((2, 5), np.int32), np.zeros(2, np.int32))
go(x[::-1], i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(torch.zeros(1, 5).expand(3, 5), i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(x[:, ::2], i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num, draft=torch.zeros(1, 5).expand(3, 5), t=1.0)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num, workspace=np.zeros(3, np.uint8))
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc[:, ::2], emi, num)
ro = np.zeros((1, 5), np.int32); ro.setflags(write=False)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, ro, num)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num, t=1e-45)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num, t=1e38)
go(np.full((3, 5), np.finfo(np.float32).max, np.float32), i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
big = np.full((3, 5), -np.finfo(np.float32).max, np.float32); big[:, 0] = np.finfo(np.float32).max
go(big, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(x, "abc", i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(None, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num)
go(x, i32(0, 1, 2), i32(-1, 0, 1), np.array([0, 3], np.int64), acc, emi, num, draft=np.full((3, 5), 0.2, np.float32), offset=2**64 - 1)
go(x, i32(0, 1, 1), i32(-1, 0, 0), np.array([0, 3], np.int64), acc, emi, num, draft=np.full((3, 5), 0.2, np.float32))
for v in (1, 2, 3, 1000, 49152, 151936):
    atlas.Verifier(v).sample(np.random.randn(3, v).astype(np.float32), temperature=1e-30, seed=[1, 2, 3])
    atlas.Verifier(v).sample(np.random.randn(3, v).astype(np.float32), temperature=0.5, top_k=v + 5, top_p=1e-9, seed=[1, 2, 3])
print("survived")
"""


def test_nasty_inputs_do_not_crash_the_interpreter():
    pkg = os.path.dirname(os.path.dirname(atlas.__file__))
    run = subprocess.run([sys.executable, "-c", _NASTY, pkg], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("survived")
    lines = run.stdout.splitlines()
    # Everything malformed was refused with an exception; the extreme but valid ones ran.
    assert sum(line.startswith("raised") for line in lines) >= 10, run.stdout


# ---- top_k_probs and top_k_logits: a distribution's most probable tokens -------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_probs_matches_a_float64_softmax(dtype):
    from atlas.verify import top_k_probs
    g = torch.Generator().manual_seed(3)
    vocab = 5000
    logits = (torch.randn(7, vocab, generator=g) * 4).to(dtype)
    logits[1, 100:140] = 40.0                     # ties: kept in ascending id
    logits[2, ::3] = -float("inf")                # masked tokens have probability 0
    logits[3] = -30.0
    logits[3, 4999] = 30.0                        # one certain token
    for k in (1, 16, 64, vocab):
        ids, probs = top_k_probs(logits, k)
        assert ids.shape == probs.shape == (7, k) and ids.dtype == np.int32 and probs.dtype == np.float32
        x = logits.double()
        p = torch.softmax(x, -1)
        for r in range(7):
            order = sorted(range(vocab), key=lambda j: (-float(x[r, j]), j))[:k]
            assert ids[r].tolist() == order
            # verify.h: relative error below 4e-7 + 2e-7 t for a token 2^-t times the top one.
            want = p[r, order].numpy()
            zero = want == 0                       # masked tokens
            assert np.all(probs[r][zero] == 0)
            t = np.log2(want[0] / want[~zero])
            assert np.all(np.abs(probs[r][~zero] / want[~zero] - 1) <= 4e-7 + 2e-7 * t + 1e-7)
    assert ids[1, :40].tolist() == list(range(100, 140))
    assert probs[3, 0] == pytest.approx(1.0)


def test_top_k_probs_rejects_bad_input_clearly():
    ws = np.empty(_native.verify_workspace_bytes(50), np.uint8)
    good = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    ids, probs = np.empty((3, 4), np.int32), np.empty((3, 4), np.float32)
    _native.top_k_probs(good, 4, ids, probs, ws)
    bad_row = good.copy()
    bad_row[1, 7] = np.nan
    with pytest.raises(ValueError, match="row 1 holds NaN or \\+inf"):
        _native.top_k_probs(bad_row, 4, ids, probs, ws)
    masked = good.copy()
    masked[2] = -np.inf
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        _native.top_k_probs(masked, 4, ids, probs, ws)
    for k in (0, 51, -1):
        with pytest.raises(ValueError, match="k"):
            _native.top_k_probs(good, k, ids, probs, ws)
    with pytest.raises(ValueError, match="ids_out"):
        _native.top_k_probs(good, 4, np.empty((3, 5), np.int32), probs, ws)
    with pytest.raises(ValueError, match="probs_out"):
        _native.top_k_probs(good, 4, ids, np.empty((3, 4), np.float64), ws)
    with pytest.raises(ValueError, match="workspace"):
        _native.top_k_probs(good, 4, ids, probs, np.empty(16, np.uint8))
    with pytest.raises(ValueError, match="logits"):
        _native.top_k_probs(good.astype(np.float64), 4, ids, probs, ws)
    with pytest.raises(ValueError, match="logits"):
        _native.top_k_probs(good[:, ::2], 4, ids, probs, ws)
    from atlas.learning.tap import topk_logits
    with pytest.raises(ValueError, match="NaN"):
        topk_logits(torch.from_numpy(bad_row).half(), 4)   # the torch path checks too
    with pytest.raises(ValueError, match="row 1 holds NaN or \\+inf"):
        _native.top_k_logits(bad_row, 4, ids, probs, ws)
    with pytest.raises(ValueError, match="row 2 is all -inf"):
        _native.top_k_logits(masked, 4, ids, probs, ws)
    with pytest.raises(ValueError, match="logits_out"):
        _native.top_k_logits(good, 4, ids, np.empty((3, 5), np.float32), ws)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_logits_are_the_largest_logits_in_order(dtype):
    """The tap's view of the target: the k largest logits, descending, equal
    ones in ascending id (so the first is the verifier's greedy token), the
    same tokens as top_k_probs; the CPU and torch paths agree."""
    from atlas.learning.tap import topk_logits
    from atlas.verify import top_k_logits, top_k_probs
    g = torch.Generator().manual_seed(4)
    vocab = 5000
    logits = (torch.randn(6, vocab, generator=g) * 4).to(dtype)
    logits[1, 100:140] = 40.0                     # ties
    logits[2, ::3] = -float("inf")
    logits[3] = -float("inf")
    logits[3, 7] = 1.0                             # one finite token: the rest of its top k is -inf
    for k in (1, 16, 64):
        ids, vals = top_k_logits(logits, k)
        assert ids.shape == vals.shape == (6, k) and ids.dtype == np.int32 and vals.dtype == np.float32
        x = logits.float()
        for r in range(6):
            order = sorted(range(vocab), key=lambda j: (-float(x[r, j]), j))[:k]
            assert ids[r].tolist() == order
            np.testing.assert_array_equal(vals[r], x[r, order].numpy())
        np.testing.assert_array_equal(ids, top_k_probs(logits, k)[0])
        assert ids[:, 0].tolist() == [int(torch.argmax(x[r])) for r in range(6)]
    ids, vals = topk_logits(logits, 16)
    assert ids[1].tolist() == list(range(100, 116))
    np.testing.assert_array_equal(topk_logits(logits.t().contiguous().t(), 16)[0], ids)   # rows copied first
    t_ids, t_vals = topk_logits(logits.double(), 16)    # other dtypes and devices: torch (its order of ties)
    np.testing.assert_array_equal(t_vals, vals)
