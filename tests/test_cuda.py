"""The CUDA kernels against the CPU path and plain numpy/PyTorch references.

Runs only where atlas was built with CUDA and a GPU is present; skipped
otherwise. Sizes are odd on purpose (vocabularies that are not powers of two,
rows that are not 16-byte aligned, block sizes of 5, contexts that cross the
kernels' tiles and slices).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import atlas
import atlas.cuda as ac
from atlas import _native

pytestmark = pytest.mark.skipif(not ac.available(), reason="needs atlas built with CUDA and a CUDA device")

DEV = "cuda"


# ---- helpers ----------------------------------------------------------------------------------


def random_tree(rng, n: int, vocab: int, argmax_of=None, p_follow=0.7):
    """A trie of n nodes in topological order (parent < child, distinct tokens
    among siblings). With argmax_of(node), a child copies its parent's argmax
    with probability p_follow, so that greedy walks go deep."""
    parents = np.full(n, -1, np.int32)
    tokens = np.zeros(n, np.int32)
    tokens[0] = rng.integers(vocab)
    used = {0: set()}
    for c in range(1, n):
        for _ in range(100):
            p = int(rng.integers(c))
            if len(used[p]) < vocab:
                break
        else:
            p = 0
        if argmax_of is not None and rng.random() < p_follow and argmax_of(p) not in used[p]:
            t = argmax_of(p)
        else:
            free = [t for t in rng.permutation(min(vocab, 64)).tolist() if t not in used[p]]
            t = free[0] if free else next(t for t in range(vocab) if t not in used[p])
        parents[c], tokens[c] = p, t
        used[p].add(t)
        used[c] = set()
    return tokens, parents


def depth_of(parents):
    d = np.zeros(len(parents), np.int64)
    for c in range(1, len(parents)):
        d[c] = d[parents[c]] + 1
    return d


def ref_greedy(logits64: np.ndarray, tokens, parents, offsets):
    """Greedy walk in numpy: argmax (first maximum) at each node."""
    acc, emi = [], []
    for b in range(len(offsets) - 1):
        t0, t1 = int(offsets[b]), int(offsets[b + 1])
        node, path = 0, []
        while True:
            a = int(np.argmax(logits64[t0 + node]))
            nxt = next((c for c in range(node + 1, t1 - t0)
                        if parents[t0 + c] == node and tokens[t0 + c] == a), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        acc.append(np.array(path, np.int32))
        emi.append(np.array([tokens[t0 + c] for c in path] + [a], np.int32))
    return acc, emi


def as_lists(out: ac.VerifyOutput):
    r = out.to_result()
    return r.accepted, r.emitted


def assert_same(res_a, res_b, what=""):
    for b, (x, y) in enumerate(zip(res_a[0], res_b[0])):
        np.testing.assert_array_equal(x, y, err_msg=f"{what} accepted, tree {b}")
    for b, (x, y) in enumerate(zip(res_a[1], res_b[1])):
        np.testing.assert_array_equal(x, y, err_msg=f"{what} emitted, tree {b}")


def make_batch(rng, sizes, vocab, logits_fn):
    """Concatenated trees; logits_fn(total) -> float64 [total, vocab]."""
    total = int(sum(sizes))
    logits64 = logits_fn(total)
    toks, pars = [], []
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    for b, n in enumerate(sizes):
        base = offsets[b]
        t, p = random_tree(rng, n, vocab, argmax_of=lambda node: int(np.argmax(logits64[base + node])))
        toks.append(t)
        pars.append(p)
    return logits64, np.concatenate(toks), np.concatenate(pars), offsets


def target_probs(row: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The plain sampler's distribution in float64 (verify.h's transforms)."""
    x = row.astype(np.float64) / temperature
    v = x.shape[0]
    if 0 < top_k < v:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1:
        order = np.lexsort((np.arange(v), -x))  # decreasing x, lower id first
        cum = np.cumsum(p[order])
        k = int(np.searchsorted(cum, top_p)) + 1
        keep = np.zeros(v, bool)
        keep[order[:k]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy.stats import chisquare

    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_m = np.append(counts[big], counts[~big].sum())
    exp_m = np.append(exp[big], exp[~big].sum())
    keep = exp_m > 0
    return float(chisquare(obs_m[keep], exp_m[keep]).pvalue)


# ---- Philox ---------------------------------------------------------------------------------


def test_philox_bit_identical_to_cpu():
    rng = np.random.default_rng(1)
    streams = np.concatenate([rng.integers(0, 2**32, 997), [0, 1, 2**31, 2**32 - 1]]).astype(np.int64)
    js = np.concatenate([rng.integers(0, 64, 997), [0x80000000, 0, 7, 2**32 - 1]]).astype(np.int64)
    for seed, position in [(0, 0), (12345, 6789), (2**64 - 1, 2**63 + 5)]:
        gpu = ac.philox_uniform(seed, position, streams, js).cpu().numpy()
        assert gpu.dtype == np.float64
        cpu = np.array([_native.philox_uniform(seed, position, int(s), int(j)) for s, j in zip(streams, js)])
        np.testing.assert_array_equal(gpu, cpu)
        assert (gpu >= 0).all() and (gpu < 1).all()
        # 53-bit uniforms on a 2^-53 grid, the low bits in use
        np.testing.assert_array_equal(gpu * 2**53, np.floor(gpu * 2**53))
        assert (np.floor(gpu * 2**53) % 2**29 != 0).mean() > 0.99


# ---- greedy verification --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 3, 97, 1025, 151936])
@pytest.mark.parametrize("prepass", [False, True])
def test_greedy_matches_reference_and_cpu(dtype, vocab, prepass):
    rng = np.random.default_rng(vocab)
    sizes = [1, 3, 17, 64, 5] if vocab > 1 else [1, 1, 1]

    def logits_fn(total):
        # Small integers: many exact ties, which must go to the lowest id.
        return rng.integers(-4, 5, size=(total, vocab)).astype(np.float64) + (
            rng.random((total, vocab)) < 0.5) * 0.5

    logits64, tokens, parents, offsets = make_batch(rng, sizes, vocab, logits_fn)
    logits = torch.from_numpy(logits64).to(dtype)
    ref = ref_greedy(logits.double().numpy(), tokens, parents, offsets)
    gpu = ac.verify(logits.to(DEV), tokens, parents, offsets, greedy_prepass=prepass)
    assert (gpu.status.cpu().numpy() == 0).all()
    assert_same(as_lists(gpu), ref, "gpu vs reference")
    cpu = atlas.verify(logits, tokens, parents, offsets)
    assert_same(as_lists(gpu), (cpu.accepted, cpu.emitted), "gpu vs cpu")
    # padding of the device outputs
    acc, emi, num = (t.cpu().numpy() for t in gpu[:3])
    for b in range(len(sizes)):
        assert (acc[b, num[b]:] == -1).all() and (emi[b, num[b] + 1:] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_strided_and_unaligned_rows(dtype):
    """Rows with a stride > vocab and rows that start off 16-byte boundaries
    (scalar path) give the same result as contiguous aligned rows."""
    rng = np.random.default_rng(7)
    vocab = 1001
    logits64, tokens, parents, offsets = make_batch(rng, [9, 4, 33], vocab,
                                                    lambda t: rng.standard_normal((t, vocab)))
    base = torch.from_numpy(logits64).to(dtype)
    ref = ref_greedy(base.double().numpy(), tokens, parents, offsets)
    # vocab + 15 columns: rows 16-byte aligned in both dtypes (vector path)
    aligned = torch.zeros((base.shape[0], vocab + 15), dtype=dtype, device=DEV)
    aligned[:, :vocab] = base.to(DEV)
    shifted = torch.zeros((base.shape[0], vocab + 15), dtype=dtype, device=DEV)
    shifted[:, 1:vocab + 1] = base.to(DEV)
    for view in (aligned[:, :vocab], shifted[:, 1:vocab + 1]):
        for prepass in (False, True):
            out = ac.verify(view, tokens, parents, offsets, greedy_prepass=prepass)
            assert_same(as_lists(out), ref, f"stride {view.stride()} prepass {prepass}")


def test_greedy_deep_chain_and_max_accept():
    """A chain that the target accepts to the end: every row is visited."""
    vocab, n = 50, 40
    rng = np.random.default_rng(3)
    logits64 = rng.standard_normal((n, vocab))
    tokens = np.zeros(n, np.int32)
    parents = np.arange(-1, n - 1, dtype=np.int32)
    for c in range(1, n):
        tokens[c] = int(np.argmax(logits64[c - 1]))
    logits = torch.from_numpy(logits64).float()
    out = ac.verify(logits.to(DEV), tokens, parents, max_accept=n - 1)
    acc, emi = as_lists(out)
    np.testing.assert_array_equal(acc[0], np.arange(1, n))
    np.testing.assert_array_equal(emi[0], np.append(tokens[1:], np.argmax(logits64[-1])))
    with pytest.raises(ValueError, match="deeper than max_accept"):
        ac.verify(logits.to(DEV), tokens, parents, max_accept=n - 2)


# ---- sampling verification ------------------------------------------------------------------


def exact_sampling_batch(rng, batch, vocab, with_draft):
    """Trees whose probabilities are exact in float32 on any device: logits
    are 0 or -inf (p uniform on a support of 2^a tokens) and draft
    probabilities are multiples of 1/64 (at least 1/64 each, so that every
    child could have been drafted; siblings are distinct), so the CPU and the
    GPU must take the same decisions from the same Philox draws."""
    sizes = rng.integers(1, 12, size=batch)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    logits = np.full((total, vocab), -np.inf, np.float32)
    draft = np.zeros((total, vocab), np.float32)
    toks, pars = [], []
    for b in range(batch):
        n = int(sizes[b])
        for i in range(n):
            support = rng.choice(vocab, size=2 ** int(rng.integers(0, 5)), replace=False)
            logits[offsets[b] + i, support] = 0.0
            q = (1 + rng.multinomial(64 - vocab, np.ones(vocab) / vocab)) / 64.0
            draft[offsets[b] + i] = q
        t, p = random_tree(rng, n, min(vocab, 16))
        # children drawn from the support half of the time, so that some are accepted
        for c in range(1, n):
            row = logits[offsets[b] + p[c]]
            sup = np.flatnonzero(row == 0)
            siblings = t[(p == p[c]) & (np.arange(n) != c)]
            if rng.random() < 0.5:
                cand = [s for s in sup if s not in siblings]
                if cand:
                    t[c] = cand[0]
        toks.append(t)
        pars.append(p)
    tokens, parents = np.concatenate(toks), np.concatenate(pars)
    return logits, tokens, parents, offsets, draft if with_draft else None


@pytest.mark.parametrize("with_draft", [False, True])
def test_sampling_decisions_bit_identical_to_cpu(with_draft):
    rng = np.random.default_rng(11 + with_draft)
    batch, vocab = 301, 37
    logits, tokens, parents, offsets, draft = exact_sampling_batch(rng, batch, vocab, with_draft)
    seeds = rng.integers(0, 2**63, size=batch).astype(np.uint64)
    temps = np.where(rng.random(batch) < 0.2, 0.0, 1.0)  # a few greedy trees in the same batch
    kw = dict(temperature=temps, top_k=0, top_p=1.0, seed=seeds, offset=5)
    cpu = atlas.verify(logits, tokens, parents, offsets, draft_probs=draft, **kw)
    gpu = ac.verify(torch.from_numpy(logits).to(DEV), tokens, parents, offsets,
                    draft_probs=None if draft is None else torch.from_numpy(draft).to(DEV), **kw)
    assert_same(as_lists(gpu), (cpu.accepted, cpu.emitted), "gpu vs cpu")
    # replay: same seeds, same result; another offset, another result somewhere
    again = ac.verify(torch.from_numpy(logits).to(DEV), tokens, parents, offsets,
                      draft_probs=None if draft is None else torch.from_numpy(draft).to(DEV), **kw)
    assert_same(as_lists(gpu), as_lists(again), "replay")
    kw["offset"] = 6
    other = ac.verify(torch.from_numpy(logits).to(DEV), tokens, parents, offsets,
                      draft_probs=None if draft is None else torch.from_numpy(draft).to(DEV), **kw)
    assert any(not np.array_equal(a, b) for a, b in zip(as_lists(gpu)[1], as_lists(other)[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.9, 7, 0.6)])
def test_sampling_distribution_is_the_targets(dtype, temperature, top_k, top_p):
    """Lossless: with a deterministic draft chain root -> a, the first emitted
    token is distributed as the target at the root, and the second, given that
    a was accepted, as the target at a. Every emitted token has p > 0."""
    rng = np.random.default_rng(5)
    vocab, n_trees = 23, 20000
    rows = torch.from_numpy(rng.standard_normal((3, vocab)) * 2).to(dtype)
    p_root = target_probs(rows[0].double().numpy(), temperature, top_k, top_p)
    p_a = target_probs(rows[1].double().numpy(), temperature, top_k, top_p)
    a = int(np.argmax(p_root))  # kept by every top-k / top-p, so accepted often
    logits = rows[:2].repeat(n_trees, 1).to(DEV)
    tokens = np.tile(np.array([0, a], np.int32), n_trees)
    parents = np.tile(np.array([-1, 0], np.int32), n_trees)
    offsets = np.arange(0, 2 * n_trees + 1, 2, dtype=np.int64)
    out = ac.verify(logits, tokens, parents, offsets, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=np.arange(n_trees, dtype=np.uint64) * 7919, offset=3)
    emi = out.emitted.cpu().numpy()
    num = out.num_accepted.cpu().numpy()
    first = emi[:, 0]
    assert (p_root[first] > 0).all()
    assert ((num == 1) == (first == a)).all()
    assert chi2_pvalue(np.bincount(first, minlength=vocab), p_root) > 1e-4
    second = emi[num == 1, 1]
    assert (p_a[second] > 0).all()
    assert chi2_pvalue(np.bincount(second, minlength=vocab), p_a) > 1e-4


def exact_rule(p, q, children):
    """The distribution of the first emitted token under verify.h's rule for
    draft distributions, in float64: children (distinct tokens) tried in order,
    child x accepted with probability min(1, p(x) / q(x)); after a rejection
    p <- normalise(max(p - q, 0)) and q <- normalise(q without x); the bonus
    from the final p."""
    out, cur, q, reach = np.zeros_like(p), p / p.sum(), q / q.sum(), 1.0
    for x in children:
        acc = min(1.0, cur[x] / q[x])
        out[x] += reach * acc
        reach *= 1 - acc
        r = np.maximum(cur - q, 0)
        r[x] = 0.0
        if r.sum() == 0:
            break
        cur = r / r.sum()
        q = q.copy()
        q[x] = 0.0
        q /= q.sum()
    return out + reach * cur


def test_sampling_with_one_draft_sample_is_lossless():
    """One child drawn from a draft q: the emitted token is distributed as the
    target p, whatever q is."""
    rng = np.random.default_rng(9)
    vocab, n_trees = 13, 20000
    p_logits = rng.standard_normal(vocab)
    p = np.exp(p_logits - p_logits.max())
    p /= p.sum()
    q = rng.dirichlet(np.ones(vocab) * 0.7).astype(np.float32)
    draws = rng.choice(vocab, size=n_trees, p=q.astype(np.float64) / q.astype(np.float64).sum())
    tokens = np.stack([np.zeros(n_trees, np.int64), draws], axis=1).ravel().astype(np.int32)
    parents = np.tile(np.array([-1, 0], np.int32), n_trees)
    offsets = np.arange(0, 2 * n_trees + 1, 2, dtype=np.int64)
    logits = torch.from_numpy(np.tile(p_logits, (2 * n_trees, 1))).float().to(DEV)
    draft = torch.from_numpy(np.tile(q, (2 * n_trees, 1))).to(DEV)
    out = ac.verify(logits, tokens, parents, offsets, temperature=1.0, draft_probs=draft,
                    seed=np.arange(n_trees, dtype=np.uint64), offset=1)
    first = out.emitted.cpu().numpy()[:, 0]
    assert chi2_pvalue(np.bincount(first, minlength=vocab), p) > 1e-4


def test_sampling_two_draft_samples_are_lossless():
    """Two children drawn from q without replacement: the emitted token is
    distributed as the target p (the rule's exact distribution, enumerated
    over the draws, is p to rounding; the counts are checked against it)."""
    rng = np.random.default_rng(21)
    vocab, n_trees = 7, 30000
    p_logits = rng.standard_normal(vocab) * 1.5
    p = np.exp(p_logits.astype(np.float32).astype(np.float64) - p_logits.max())
    p /= p.sum()
    q = rng.dirichlet(np.ones(vocab)).astype(np.float32)
    qd = q.astype(np.float64) / q.astype(np.float64).sum()
    draws = np.stack([rng.choice(vocab, size=2, replace=False, p=qd) for _ in range(n_trees)])
    roots = np.zeros(n_trees, np.int64)
    tokens = np.stack([roots, draws[:, 0], draws[:, 1]], axis=1).ravel().astype(np.int32)
    parents = np.tile(np.array([-1, 0, 0], np.int32), n_trees)
    offsets = np.arange(0, 3 * n_trees + 1, 3, dtype=np.int64)
    logits = torch.from_numpy(np.tile(p_logits, (3 * n_trees, 1))).float().to(DEV)
    draft = torch.from_numpy(np.tile(q, (3 * n_trees, 1))).to(DEV)
    out = ac.verify(logits, tokens, parents, offsets, temperature=1.0, draft_probs=draft,
                    seed=np.arange(n_trees, dtype=np.uint64) + 99, offset=0)
    first = out.emitted.cpu().numpy()[:, 0]
    expect = np.zeros(vocab)
    for x1 in range(vocab):
        for x2 in range(vocab):
            if x1 != x2:
                expect += qd[x1] * qd[x2] / (1 - qd[x1]) * exact_rule(p, qd, [x1, x2])
    np.testing.assert_allclose(expect, p, atol=1e-12)
    assert chi2_pvalue(np.bincount(first, minlength=vocab), p) > 1e-4


def test_draft_siblings_must_be_distinct():
    """A sibling repeating a rejected token has probability 0 under q: an error
    (as on the CPU), not a second try."""
    logits = torch.tensor([[0.0, -float("inf"), 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=DEV)
    q = torch.full((3, 3), 1 / 3, device=DEV)
    tokens, parents = np.array([0, 1, 1], np.int32), np.array([-1, 0, 0], np.int32)
    with pytest.raises(ValueError, match="draft_probs"):
        ac.verify(logits, tokens, parents, temperature=1.0, draft_probs=q)
    with pytest.raises(ValueError, match="repeats an earlier sibling"):
        atlas.verify(logits.cpu().numpy(), tokens, parents, temperature=1.0, draft_probs=q.cpu().numpy())
    # One-hot drafts may repeat a token: the first child holding the draw wins.
    p0 = torch.tensor([[-float("inf"), 0.0, -float("inf")], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=DEV)
    out = ac.verify(p0, tokens, parents, temperature=1.0)
    assert as_lists(out)[0][0].tolist() == [1]


def test_top_p_ties_keep_lowest_ids():
    """Uniform logits: top-p keeps the fewest tokens in id order."""
    vocab, n_trees = 10, 4000
    logits = torch.zeros((n_trees, vocab), device=DEV)
    out = ac.verify(logits, np.zeros(n_trees, np.int32), np.full(n_trees, -1, np.int32),
                    np.arange(n_trees + 1, dtype=np.int64), temperature=1.0, top_p=0.35,
                    seed=np.arange(n_trees, dtype=np.uint64))
    first = out.emitted.cpu().numpy()[:, 0]
    # mass 0.1 each: the prefix reaching 0.35 holds ids 0..3
    assert set(np.unique(first).tolist()) == {0, 1, 2, 3}
    assert chi2_pvalue(np.bincount(first, minlength=vocab), np.r_[np.full(4, 0.25), np.zeros(6)]) > 1e-4


def test_sampling_large_vocab_matches_cpu_mostly():
    """Random bf16 logits at the real vocabulary size with top-k and top-p: the
    CPU and the GPU sum in different orders, so a decision may flip only where
    a uniform falls within rounding of a threshold; nearly all agree."""
    rng = np.random.default_rng(17)
    vocab, batch = 151936, 24
    logits64, tokens, parents, offsets = make_batch(rng, [6] * batch, vocab,
                                                    lambda t: rng.standard_normal((t, vocab)) * 3)
    logits = torch.from_numpy(logits64).to(torch.bfloat16)
    kw = dict(temperature=0.8, top_k=50, top_p=0.9, seed=np.arange(batch, dtype=np.uint64) + 1, offset=2)
    gpu = as_lists(ac.verify(logits.to(DEV), tokens, parents, offsets, **kw))
    cpu = atlas.verify(logits, tokens, parents, offsets, **kw)
    same = sum(np.array_equal(a, b) for a, b in zip(gpu[1], cpu.emitted))
    assert same >= batch - 1


# ---- verification errors --------------------------------------------------------------------


def small_problem(vocab=20, n=5):
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((n, vocab))).float()
    tokens = np.array([0, 1, 2, 3, 4], np.int32)[:n]
    parents = np.array([-1, 0, 0, 1, 1], np.int32)[:n]
    return logits, tokens, parents


def test_nan_in_visited_row_is_an_error_not_in_unvisited():
    logits, tokens, parents = small_problem()
    for prepass in (False, True):
        bad = logits.clone()
        bad[0, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            ac.verify(bad.to(DEV), tokens, parents, greedy_prepass=prepass)
        out = ac.verify(bad.to(DEV), tokens, parents, greedy_prepass=prepass, check=False)
        torch.cuda.synchronize()
        assert out.status.cpu().tolist() == [8]
        assert out.num_accepted.cpu().tolist() == [0]
        # the last node (a leaf of a rejected branch) is never visited
        ok = logits.clone()
        tokens2 = tokens.copy()
        tokens2[1] = int(torch.argmax(logits[0]))  # node 1 accepted, node 2 not
        tokens2[2] = (tokens2[1] + 1) % 20
        a1 = int(torch.argmax(logits[1]))
        tokens2[3], tokens2[4] = (a1 + 1) % 20, (a1 + 2) % 20  # neither child of node 1 accepted
        ok[2, 0] = float("nan")
        ok[4, 1] = float("inf")
        res = ac.verify(ok.to(DEV), tokens2, parents, greedy_prepass=prepass)
        assert res.status.cpu().tolist() == [0]
    inf_row = logits.clone()
    inf_row[0] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        ac.verify(inf_row.to(DEV), tokens, parents)


@pytest.mark.parametrize("case,match", [
    ("token", "token id"), ("parent", "parents"), ("forward_parent", "parents"), ("offsets", "tree_offsets"),
])
def test_bad_tree_is_reported(case, match):
    logits, _, _ = small_problem()
    tokens = np.array([0, 1, 0, 2, 3], np.int32)
    parents = np.array([-1, 0, -1, 0, 0], np.int32)  # trees [0, 2) and [2, 5)
    offsets = np.array([0, 2, 5], np.int64)
    if case == "token":
        tokens[3] = 20
    elif case == "parent":
        parents[3] = -1
    elif case == "forward_parent":
        parents[4] = 2  # tree-local node 2 naming itself
    elif case == "offsets":
        offsets = np.array([0, 2, 6], np.int64)  # past the last node
    with pytest.raises(ValueError, match=match):
        ac.verify(logits.to(DEV), tokens, parents, offsets, max_accept=4, temperature=0.5)


def test_bad_params_and_arguments():
    logits, tokens, parents = small_problem()
    with pytest.raises(ValueError, match="top_p"):
        ac.verify(logits.to(DEV), tokens, parents, temperature=1.0, top_p=0.0)
    # a hand-made params row that bypasses the Python checks is caught on the device
    params = ac.sampling_params(1, temperature=1.0, device=DEV)
    params[0, :4] = torch.tensor(np.array([-1.0], np.float32).view(np.uint8), device=DEV)
    out = [torch.empty((1, 3), dtype=torch.int32, device=DEV), torch.empty((1, 4), dtype=torch.int32, device=DEV),
           torch.empty(1, dtype=torch.int32, device=DEV), torch.empty(1, dtype=torch.int32, device=DEV)]
    ws = torch.empty(_native.verify_cuda_workspace_bytes(20, 1, 5), dtype=torch.uint8, device=DEV)
    args = [logits.to(DEV), torch.from_numpy(tokens).to(DEV), torch.from_numpy(parents).to(DEV),
            torch.tensor([0, 5], dtype=torch.int64, device=DEV), params, None, *out, ws,
            torch.cuda.current_stream().cuda_stream]
    with pytest.raises(ValueError, match="sampling parameters"):
        _native.verify_cuda(*args)
    # host-side checks name the argument
    with pytest.raises(ValueError, match="tokens must have shape"):
        _native.verify_cuda(args[0], args[1][:4], *args[2:])
    with pytest.raises(ValueError, match="CUDA tensor"):
        _native.verify_cuda(args[0], args[1].cpu(), *args[2:])
    with pytest.raises(ValueError, match="workspace"):
        _native.verify_cuda(*args[:10], ws[:16], args[11])
    with pytest.raises(ValueError, match="dtype"):
        _native.verify_cuda(args[0].double(), *args[1:])


# ---- KV row copies --------------------------------------------------------------------------


def ref_copies(storage: np.ndarray, copies) -> np.ndarray:
    s = storage.copy()
    L, _, nb, bs = s.shape[:4]
    flat = s.reshape(L, 2, nb * bs, -1)
    for src, dst in copies:
        flat[:, :, dst] = flat[:, :, src]
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(3, 5), (1, 8), (2, 7), (4, 16)])
@pytest.mark.parametrize("n_copies", [1, 7, 8, 9, 37])
def test_kv_copy_slots_in_order(dtype, heads, head_dim, n_copies):
    rng = np.random.default_rng(n_copies * 100 + heads)
    layers, nb, bs = 3, 6, 5
    cache = atlas.KVCache(layers, heads, head_dim, nb, bs, 4, dtype=dtype, device=DEV)
    init = torch.randn(cache.storage.shape).to(dtype)
    cache.storage.copy_(init.to(DEV))
    slots = nb * bs
    # chains and overwrites of rows read earlier: the order matters
    copies = []
    for i in range(n_copies):
        if copies and rng.random() < 0.5:
            src = copies[-1][1] if rng.random() < 0.5 else copies[int(rng.integers(len(copies)))][0]
        else:
            src = int(rng.integers(slots))
        dst = int(rng.integers(slots))
        while dst == src:
            dst = int(rng.integers(slots))
        copies.append((src, dst))
    expect = ref_copies(init.float().numpy(), copies)
    ac.kv_copy_slots(cache, torch.tensor(copies, dtype=torch.int64))
    np.testing.assert_array_equal(cache.storage.float().cpu().numpy(), expect)


def test_kv_copy_bad_slot_is_reported_and_skipped():
    cache = atlas.KVCache(2, 2, 8, 4, 4, 2, device=DEV)
    cache.storage.copy_(torch.randn(cache.storage.shape, device=DEV))
    before = cache.storage.cpu().numpy()
    with pytest.raises(ValueError, match="slot"):
        ac.kv_copy_slots(cache, torch.tensor([[0, 1], [16, 2], [3, -1], [2, 5]]))
    np.testing.assert_array_equal(cache.storage.cpu().numpy(), ref_copies(before, [(0, 1), (2, 5)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_contents_match_cpu_cache(dtype):
    """The same reserve / commit (with gaps) / fork (copy on write) sequence on
    a host-storage cache and on a device-storage cache whose pending copies the
    kernel applies: every committed position holds the same key and value."""
    layers, heads, dim, nb, bs = 2, 3, 8, 80, 5
    caches = [atlas.KVCache(layers, heads, dim, nb, bs, 8, dtype=dtype, device=d) for d in ("cpu", DEV)]
    for c in caches:
        c.shuffle_free_blocks(42)
    rng = np.random.default_rng(4)
    seqs = [[c.create() for c in caches] for _ in range(3)]

    def write(seq_pair, n):
        vals = torch.randn((layers, 2, n, heads, dim)).to(dtype)
        for c, s in zip(caches, seq_pair):
            slots = torch.from_numpy(c.reserve(s, n)).to(c.storage.device)
            for layer in range(layers):
                c.keys(layer).index_copy_(0, slots, vals[layer, 0].to(c.storage.device))
                c.values(layer).index_copy_(0, slots, vals[layer, 1].to(c.storage.device))

    for step in range(6):
        for pair in seqs:
            n = int(rng.integers(1, 9))
            write(pair, n)
            keep = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)).astype(np.int32)
            for c, s in zip(caches, pair):
                c.commit(s, keep)
            ac.apply_pending_copies(caches[1])
        if step == 2:
            seqs.append([c.fork(s) for c, s in zip(caches, seqs[0])])
    for pair in seqs:
        assert caches[0].length(pair[0]) == caches[1].length(pair[1])
        for pos in range(caches[0].length(pair[0])):
            a = caches[0].slot_of(pair[0], pos)
            b = caches[1].slot_of(pair[1], pos)
            for layer in range(layers):
                torch.testing.assert_close(caches[1].keys(layer)[b].cpu(), caches[0].keys(layer)[a], rtol=0, atol=0)
                torch.testing.assert_close(caches[1].values(layer)[b].cpu(), caches[0].values(layer)[a],
                                           rtol=0, atol=0)


# ---- tree attention ------------------------------------------------------------------------------


def ref_attention(keys, values, q, lengths, q_offsets, parents, group, scale, dtype=torch.float64):
    """Per sequence: keys/values [len + n, kv_heads, dim] (committed then tree
    nodes), queries [n, q_heads, dim]; the mask lets node i see the context and
    its ancestors. Computed in `dtype` on the tensors' device."""
    outs = []
    for b in range(len(lengths)):
        k, v = keys[b].to(dtype), values[b].to(dtype)
        qb = q[q_offsets[b]:q_offsets[b + 1]].to(dtype)
        n, L = qb.shape[0], lengths[b]
        anc = np.eye(n, dtype=bool)  # anc[i, j]: j is i or an ancestor of i
        for i in range(1, n):
            anc[i] |= anc[parents[q_offsets[b] + i]]
        mask = torch.from_numpy(np.concatenate([np.ones((n, L), bool), anc], axis=1)).to(q.device)
        kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [q_heads, L+n, dim]
        vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
        s = torch.einsum("nhd,hkd->hnk", qb, kk) * scale
        s = s.masked_fill(~mask[None], float("-inf"))
        outs.append(torch.einsum("hnk,hkd->nhd", torch.softmax(s, dim=-1), vv))
    return torch.cat(outs)


def tree_parents(rng, n):
    p = np.full(n, -1, np.int32)
    for c in range(1, n):
        p[c] = int(rng.integers(c))
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [(1, 1, 8, 5), (2, 3, 40, 16),
                                                               (1, 4, 128, 7), (2, 1, 256, 16)])
def test_tree_attention_matches_cpu_and_reference(dtype, kv_heads, group, head_dim, block_size):
    rng = np.random.default_rng(head_dim + block_size)
    torch.manual_seed(head_dim)
    lengths = [0, 1, 37, 300, 1025]
    sizes = [3, 1, 17, 5, 9]
    layers, q_heads = 2, kv_heads * group
    nb = sum(-(-(length + n) // block_size) for length, n in zip(lengths, sizes)) + 3
    caches = [atlas.KVCache(layers, kv_heads, head_dim, nb, block_size, 8, dtype=dtype, device=d)
              for d in ("cpu", DEV)]
    for c in caches:
        c.shuffle_free_blocks(7)  # scattered page tables
    seqs = [[c.create() for c in caches] for _ in lengths]
    keys, values = [], []
    for pair, length, n in zip(seqs, lengths, sizes):
        kv = torch.randn((layers, 2, length + n, kv_heads, head_dim)).to(dtype)
        keys.append(kv[1, 0])
        values.append(kv[1, 1])
        for c, s in zip(caches, pair):
            for start, cnt, commit in ((0, length, True), (length, n, False)):
                if cnt == 0:
                    continue
                slots = torch.from_numpy(c.reserve(s, cnt)).to(c.storage.device)
                for layer in range(layers):
                    c.keys(layer).index_copy_(0, slots, kv[layer, 0, start:start + cnt].to(c.storage.device))
                    c.values(layer).index_copy_(0, slots, kv[layer, 1, start:start + cnt].to(c.storage.device))
                if commit:
                    c.commit(s)
        ac.apply_pending_copies(caches[1])
    parents = np.concatenate([tree_parents(rng, n) for n in sizes])
    q_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    q = torch.randn((int(q_offsets[-1]), q_heads, head_dim)).to(dtype)
    scale = 1.0 / math.sqrt(head_dim)

    tables, lens = ac.paged_inputs(caches[1], [p[1] for p in seqs])
    gpu = ac.tree_attention(caches[1], 1, q.to(DEV), tables, lens, q_offsets, parents, scale=scale)
    cpu = torch.empty_like(q)
    _native.tree_attention(caches[0], 1, q, cpu, np.array([p[0] for p in seqs], np.int32), q_offsets, parents,
                           scale)
    ref64 = ref_attention([k.to(DEV) for k in keys], [v.to(DEV) for v in values], q.to(DEV), lengths, q_offsets,
                          parents, group, scale)
    ref_low = ref_attention([k.to(DEV) for k in keys], [v.to(DEV) for v in values], q.to(DEV), lengths,
                            q_offsets, parents, group, scale, dtype=dtype).to(torch.float64)
    # flash-attention's rule: at most twice the error of the reference computed
    # in the same precision, plus the kernel's own exp2 error (<= 2 ulp) and
    # the folds of scale and log2(e) into q (1 ulp each): 4 eps of the output.
    eps = torch.finfo(dtype).eps
    bound = 2 * (ref_low - ref64).abs().max().item() + 4 * eps * ref64.abs().max().item()
    err_gpu = (gpu.to(torch.float64) - ref64).abs().max().item()
    assert err_gpu <= bound, (err_gpu, bound)
    err_cpu = (cpu.to(DEV).to(torch.float64) - ref64).abs().max().item()
    assert (gpu.to(torch.float64) - cpu.to(DEV).to(torch.float64)).abs().max().item() <= bound + err_cpu
    # bounds given explicitly (no host read) give the same bits
    again = ac.tree_attention(caches[1], 1, q.to(DEV), tables, lens, q_offsets, parents, scale=scale,
                              max_context=max(lengths) + 100, max_q_per_seq=max(sizes) + 2)
    assert (again.to(torch.float64) - ref64).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_long_chain_prompt(dtype):
    """A prompt of more than MAX_TREE_NODES tokens as one chain of queries."""
    kv_heads, group, dim, bs, n, length = 2, 2, 64, 16, 1100, 33
    cache = atlas.KVCache(1, kv_heads, dim, (length + n) // bs + 2, bs, 2, dtype=dtype, device=DEV)
    s = cache.create()
    kv = torch.randn((2, length + n, kv_heads, dim)).to(dtype)
    for start, cnt, commit in ((0, length, True), (length, n, False)):
        slots = torch.from_numpy(cache.reserve(s, cnt)).to(DEV)
        cache.keys(0).index_copy_(0, slots, kv[0, start:start + cnt].to(DEV))
        cache.values(0).index_copy_(0, slots, kv[1, start:start + cnt].to(DEV))
        if commit:
            cache.commit(s)
    parents = np.arange(-1, n - 1, dtype=np.int32)
    q = torch.randn((n, kv_heads * group, dim)).to(dtype).to(DEV)
    tables, lens = ac.paged_inputs(cache, [s])
    out = ac.tree_attention(cache, 0, q, tables, lens, [0, n], parents)
    ref64 = ref_attention([kv[0].to(DEV)], [kv[1].to(DEV)], q, [length], [0, n], parents, group, dim ** -0.5)
    ref_low = ref_attention([kv[0].to(DEV)], [kv[1].to(DEV)], q, [length], [0, n], parents, group, dim ** -0.5,
                            dtype=dtype).to(torch.float64)
    eps = torch.finfo(dtype).eps
    bound = 2 * (ref_low - ref64).abs().max().item() + 4 * eps * ref64.abs().max().item()
    assert (out.to(torch.float64) - ref64).abs().max().item() <= bound
    # the same queries, not a chain: refused (too many for the ancestor bit sets)
    bad = parents.copy()
    bad[5] = 2
    with pytest.raises(ValueError, match="chain"):
        ac.tree_attention(cache, 0, q, tables, lens, [0, n], bad)


def test_tree_attention_device_errors():
    cache = atlas.KVCache(1, 1, 8, 4, 4, 2, device=DEV)
    s = cache.create()
    cache.reserve(s, 3)
    q = torch.randn((3, 1, 8), device=DEV)
    tables, lens = ac.paged_inputs(cache, [s])
    parents = np.array([-1, 0, 0], np.int32)
    ac.tree_attention(cache, 0, q, tables, lens, [0, 3], parents)
    with pytest.raises(ValueError, match="block table entry"):
        ac.tree_attention(cache, 0, q, torch.full_like(tables, 9), lens, [0, 3], parents)
    with pytest.raises(ValueError, match="context length"):
        ac.tree_attention(cache, 0, q, tables, lens + 20, [0, 3], parents, max_context=30)
    with pytest.raises(ValueError, match="context length"):
        ac.tree_attention(cache, 0, q, tables, lens + 2, [0, 3], parents, max_context=0)
    with pytest.raises(ValueError, match="q_offsets"):
        ac.tree_attention(cache, 0, q, tables, lens, [0, 2], parents)
    with pytest.raises(ValueError, match="parents"):
        ac.tree_attention(cache, 0, q, tables, lens, [0, 3], np.array([-1, 1, 0], np.int32))
    with pytest.raises(TypeError, match="head_dim"):
        odd = atlas.KVCache(1, 1, 6, 4, 4, 2, device=DEV)
        t = odd.create()
        odd.reserve(t, 1)
        ac.tree_attention(odd, 0, torch.randn((1, 1, 6), device=DEV), *ac.paged_inputs(odd, [t]), [0, 1],
                          np.array([-1], np.int32))


def test_device_count_and_build_info():
    assert _native.cuda_device_count() == torch.cuda.device_count()
    assert atlas.build_info()["cuda"] is True


# ---- the engine on the GPU ---------------------------------------------------------------------


def test_engine_on_cuda_matches_transformers_greedy():
    """The engine's greedy oracle test on the GPU: transformers' generate (on
    the CPU, float32) against atlas's target forward, KV cache, tree attention
    and verifier on CUDA, plain and speculative, alone and batched."""
    from oracle import OracleDrafts, assert_same_greedy, hf_greedy, tiny_llama

    model = tiny_llama()
    target = atlas.load(model)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(1, 397, size=int(rng.integers(3, 30))).tolist() for _ in range(4)]
    truth = {tuple(p): hf_greedy(model, p, 120) for p in prompts}
    plain = atlas.Engine(target, speculators=None, device=DEV)
    assert target.model.device.type == "cuda" and plain.cache.storage.device.type == "cuda"
    for p in prompts[:2]:
        assert_same_greedy(model, p, truth[tuple(p)], plain.generate([p], max_new_tokens=120)[0].token_ids)
    spec = atlas.Engine(target, speculators=[OracleDrafts(truth, depth=4, seed=2)], max_tree_nodes=10,
                        max_batch=3, device=DEV)
    for p, out in zip(prompts, spec.generate(prompts, max_new_tokens=120)):
        assert_same_greedy(model, p, truth[tuple(p)], out.token_ids)
        assert out.stats.steps < 120


def test_engine_on_cuda_full_atlas_runs_and_is_lossless():
    """Full atlas (suffix and learned speculators, learning on) with the
    target on the GPU: the speculators draft on the host from copies."""
    from oracle import assert_same_greedy, hf_greedy, tiny_llama

    model = tiny_llama()
    target = atlas.load(model)
    p = (list(range(5, 25)) * 3)[:50]
    want = hf_greedy(model, p, 80)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, \
            atlas.Engine(target, max_batch=2, cache_dir=tmp, device=DEV) as engine:
        for _ in range(2):
            assert_same_greedy(model, p, want, engine.generate([p], max_new_tokens=80)[0].token_ids)
