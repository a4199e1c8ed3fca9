"""Tree attention over the paged KV cache against a plain PyTorch reference.

The reference gathers each sequence's keys and values by position (committed
context, then the reserved tree nodes), builds the ancestor mask from the
parents and runs softmax attention in float64. Tolerances come from the same
reference run in the storage precision: the native float32 error must be at
most twice the error of a float32 PyTorch run (plus a tiny floor for problems
where that run happens to be exact), and with bfloat16 storage at most twice the
error of rounding the float64 result to bfloat16.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import atlas


def run_tree_attention(cache, layer, q, seqs, trees, scale=None, threads=1):
    """q: [total_q, num_q_heads, head_dim]; trees: one parents array per sequence."""
    offsets = np.zeros(len(trees) + 1, np.int64)
    offsets[1:] = np.cumsum([len(t) for t in trees])
    parents = np.concatenate([np.asarray(t, np.int32) for t in trees]) if trees else np.zeros(0, np.int32)
    out = torch.empty(q.shape, dtype=q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    atlas._native.tree_attention(cache, layer, q, out, np.asarray(seqs, np.int32), offsets, parents, scale,
                                 threads)
    return out


def ancestor_mask(parents):
    """[n, n] bool: row i is node i and its ancestors (parents[i] < i, so row i = row parents[i] + i)."""
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        if parents[i] >= 0:
            mask[i] = mask[parents[i]]
        mask[i, i] = True
    return torch.from_numpy(mask)


def reference(cache, layer, q, seqs, trees, dtype, scale=None):
    """Softmax attention over the gathered context + ancestors, computed in `dtype`."""
    outs, q0 = [], 0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // cache.num_kv_heads
    for seq, parents in zip(seqs, trees):
        n, ctx = len(parents), cache.length(seq)
        slots = torch.tensor([cache.slot_of(seq, p) for p in range(ctx + n)], dtype=torch.long)
        k = cache.keys(layer)[slots].to(dtype).repeat_interleave(group, dim=1)    # [ctx + n, heads, dim]
        v = cache.values(layer)[slots].to(dtype).repeat_interleave(group, dim=1)  # [ctx + n, heads, dim]
        mask = torch.cat([torch.ones(n, ctx, dtype=torch.bool), ancestor_mask(parents)], dim=1)
        qb = q[q0:q0 + n].to(dtype)
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v))
        q0 += n
    return torch.cat(outs)


def tree_of(kind, n, rng):
    if kind == "chain":
        return np.arange(-1, n - 1, dtype=np.int32)
    if kind == "fan":
        return np.array([-1] + [0] * (n - 1), np.int32)
    parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], np.int32)
    return parents


def fill(cache, seq, n, rng):
    """Reserves n slots of seq and writes random keys and values to every layer."""
    slots = torch.from_numpy(cache.reserve(seq, n))
    for layer in range(cache.num_layers):
        for t in (cache.keys(layer), cache.values(layer)):
            data = rng.standard_normal((n, cache.num_kv_heads, cache.head_dim)).astype(np.float32)
            t[slots] = torch.from_numpy(data).to(cache.dtype)
    return slots


def build_batch(cache, contexts, trees, rng):
    """One sequence per context length, pages interleaved and shuffled; then the trees reserved."""
    seqs = [cache.create() for _ in contexts]
    left = list(contexts)
    while any(left):
        cache.shuffle_free_blocks(int(rng.integers(1 << 30)))
        for i, s in enumerate(seqs):
            if left[i]:
                n = min(left[i], int(rng.integers(1, 300)))
                fill(cache, s, n, rng)
                cache.commit(s)
                left[i] -= n
    for s, t in zip(seqs, trees):
        fill(cache, s, len(t), rng)
    return seqs


def check_against_reference(cache, layer, q, seqs, trees, out):
    ref64 = reference(cache, layer, q, seqs, trees, torch.float64)
    err = (out.double() - ref64).abs().max().item()
    if cache.dtype == torch.float32:
        base = (reference(cache, layer, q, seqs, trees, torch.float32).double() - ref64).abs().max().item()
    else:
        base = (ref64.to(torch.bfloat16).double() - ref64).abs().max().item()
        # Element by element too: float32 math rounded once to bfloat16 is within half a
        # bfloat16 ulp (<= 2^-8 |x|) of the exact value, plus the float32 error.
        err32 = (reference(cache, layer, q, seqs, trees, torch.float32).double() - ref64).abs().max().item()
        excess = (out.double() - ref64).abs() - (2.0 ** -8 * ref64.abs() + 2 * err32)
        assert excess.max().item() <= 0, f"an element is off by more than half a bf16 ulp: {excess.max():.3g}"
    floor = 1e-6 * ref64.abs().max().item()
    assert err <= 2 * base + floor, f"error {err:.3g} > 2 x reference error {base:.3g} + {floor:.3g}"
    return 2 * base + floor


# 160 and 1025: long enough that each kv head's pass is split in two (merged
# by their softmax statistics, see kSplitContext in attention.cpp).
CONTEXTS = [0, 1, 3, 97, 160, 1025]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,kv_heads,group",
                         [(64, 3, 3), (64, 1, 1), (24, 2, 3), (24, 3, 2), (17, 1, 2)])
def test_matches_reference(dtype, head_dim, kv_heads, group):
    rng = np.random.default_rng(head_dim * 100 + kv_heads * 10 + group)
    bs = 16 if head_dim == 64 else 7
    cache = atlas.KVCache(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=220,
                          block_size=bs, max_seqs=8, dtype=dtype)
    trees = [tree_of("chain", 1, rng), tree_of("fan", 64, rng), tree_of("random", 17, rng),
             tree_of("chain", 33, rng), tree_of("random", 64, rng), tree_of("random", 9, rng)]
    order = rng.permutation(len(CONTEXTS))
    contexts = [CONTEXTS[i] for i in order]
    seqs = build_batch(cache, contexts, trees, rng)
    total = sum(map(len, trees))
    # Queries scaled up a little so that the softmax is not nearly uniform.
    q = 2 * rng.standard_normal((total, kv_heads * group, head_dim))
    q = torch.from_numpy(q.astype(np.float32)).to(dtype)
    for layer in range(2):
        out = run_tree_attention(cache, layer, q, seqs, trees)
        check_against_reference(cache, layer, q, seqs, trees, out)
        # The kv heads split over threads: the same bits whatever the split.
        for threads in (2, 3, 5):
            assert torch.equal(run_tree_attention(cache, layer, q, seqs, trees, threads=threads), out)


def test_strided_queries_and_in_place_output():
    rng = np.random.default_rng(1)
    cache = atlas.KVCache(num_layers=1, num_kv_heads=2, head_dim=24, num_blocks=40, block_size=5, max_seqs=2)
    trees = [tree_of("random", 9, rng), tree_of("chain", 4, rng)]
    seqs = build_batch(cache, [40, 13], trees, rng)
    base = torch.from_numpy(rng.standard_normal((4, 13, 24)).astype(np.float32))
    q = base.transpose(0, 1)  # [13, 4, 24], token stride 24, head stride 13 * 24
    out = run_tree_attention(cache, 0, q, seqs, trees)
    check_against_reference(cache, 0, q, seqs, trees, out)
    # q and out may be the same tensor: each query row is read before its output is written.
    qc = q.contiguous()
    atlas._native.tree_attention(cache, 0, qc, qc, np.array(seqs, np.int32), np.array([0, 9, 13]),
                                 np.concatenate(trees), 1 / math.sqrt(24))
    assert torch.equal(qc, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_branch_equals_its_chain(dtype):
    rng = np.random.default_rng(7)
    head_dim, kv_heads, group = 24, 2, 3
    cache = atlas.KVCache(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, num_blocks=200,
                          block_size=6, max_seqs=4, dtype=dtype)
    parents = tree_of("random", 23, rng)
    ctx_seq = cache.create()
    fill(cache, ctx_seq, 101, rng)
    cache.commit(ctx_seq)
    # The tree runs on a fork, so the context's last, partly filled block is shared.
    tree_seq = cache.fork(ctx_seq)
    slots = fill(cache, tree_seq, len(parents), rng)
    q = 2 * rng.standard_normal((len(parents), kv_heads * group, head_dim))
    q = torch.from_numpy(q.astype(np.float32)).to(dtype)
    out = run_tree_attention(cache, 0, q, [tree_seq], [parents])
    bound = check_against_reference(cache, 0, q, [tree_seq], [parents], out)
    leaves = sorted(set(range(len(parents))) - set(parents.tolist()))
    assert len(leaves) > 3
    for leaf in leaves:
        path = []
        j = leaf
        while j >= 0:
            path.append(j)
            j = int(parents[j])
        path = path[::-1]
        chain_seq = cache.fork(ctx_seq)
        chain_slots = torch.from_numpy(cache.reserve(chain_seq, len(path)))
        cache.keys(0)[chain_slots] = cache.keys(0)[slots[path]]
        cache.values(0)[chain_slots] = cache.values(0)[slots[path]]
        chain = run_tree_attention(cache, 0, q[path].contiguous(), [chain_seq],
                                   [tree_of("chain", len(path), rng)])
        diff = (chain.double() - out[path].double()).abs().max().item()
        assert diff <= 2 * bound, f"branch to leaf {leaf}: {diff:.3g} > {2 * bound:.3g}"
        cache.release(chain_seq)


def test_prefill_chain_over_a_forked_context():
    """A prompt of L tokens is a chain over the (forked) context."""
    rng = np.random.default_rng(2)
    cache = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=24, num_blocks=160, block_size=16,
                          max_seqs=3)
    base = cache.create()
    fill(cache, base, 250, rng)
    cache.commit(base)
    seq = cache.fork(base)
    chain = tree_of("chain", 1500, rng)
    fill(cache, seq, len(chain), rng)
    q = torch.from_numpy(rng.standard_normal((len(chain), 2, 24)).astype(np.float32))
    out = run_tree_attention(cache, 0, q, [seq], [chain])
    check_against_reference(cache, 0, q, [seq], [chain], out)


def test_empty_batch_and_empty_sequences():
    cache = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4, block_size=4, max_seqs=2)
    s = cache.create()
    q = torch.zeros(0, 2, 8)
    atlas._native.tree_attention(cache, 0, q, torch.empty_like(q), np.zeros(0, np.int32),
                                 np.zeros(1, np.int64), np.zeros(0, np.int32), 0.5)
    # A sequence with no queries and no reservation contributes nothing.
    atlas._native.tree_attention(cache, 0, q, torch.empty_like(q), np.array([s], np.int32),
                                 np.zeros(2, np.int64), np.zeros(0, np.int32), 0.5)


def bad_setup():
    cache = atlas.KVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=8, block_size=4, max_seqs=3)
    s = cache.create()
    cache.reserve(s, 3)
    dead = cache.create()
    cache.release(dead)
    q = torch.randn(3, 4, 8)
    good = dict(cache=cache, layer=0, q=q, out=torch.empty_like(q), seq_ids=np.array([s], np.int32),
                q_offsets=np.array([0, 3]), parents=np.array([-1, 0, 1], np.int32), scale=0.3)
    return cache, s, dead, good


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.randn(3, 4, 8, dtype=torch.float64)), "q must have dtype float32"),
    (dict(q=torch.randn(3, 4, 8).bfloat16()), "q must have dtype float32"),
    (dict(q=torch.randn(3, 4, 9)), "head_dim"),
    (dict(q=torch.randn(3, 3, 8), out=torch.empty(3, 3, 8)), "multiple of num_kv_heads"),
    (dict(out=torch.empty(3, 2, 8)), "out must have shape"),
    (dict(out=torch.empty(8, 4, 3).transpose(0, 2)), "out must be contiguous"),
    (dict(out=torch.empty(3, 4, 8).bfloat16()), "out must have dtype"),
    (dict(seq_ids=np.array([0], np.int64)), "seq_ids must have dtype int32"),
    (dict(seq_ids=np.array([1], np.int32)), "not a live sequence"),  # created, then released
    (dict(seq_ids=np.array([7], np.int32)), r"seq_ids\[0\]: seq must be in"),
    (dict(q_offsets=np.array([0, 3], np.int32)), "q_offsets must have dtype int64"),
    (dict(q_offsets=np.array([0, 2, 3])), "len\\(seq_ids\\) \\+ 1"),
    (dict(q_offsets=np.array([0, 4])), "q_offsets\\[-1\\] must equal q.shape\\[0\\]"),
    (dict(q_offsets=np.array([1, 3])), "q_offsets\\[0\\] must be 0"),
    (dict(parents=np.array([0, 0, 1], np.int32)), r"parents\[0\].*-1"),
    (dict(parents=np.array([-1, 1, 1], np.int32)), r"parents\[1\].*\[0, 1\)"),
    (dict(parents=np.array([-1, 0, -1], np.int32)), r"parents\[2\]"),
    (dict(parents=np.array([-1, 0, 5], np.int32)), r"parents\[2\]"),
    (dict(parents=np.array([-1, 0], np.int32)), "parents must have shape"),
    (dict(layer=2), "layer must be in"),
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("nan")), "scale"),
    (dict(threads=0), "threads must be in"),
    (dict(threads=65), "threads must be in"),
    (dict(threads=1.5), "threads"),
])
def test_bad_input_raises(change, match):
    cache, s, dead, good = bad_setup()
    args = dict(good)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        atlas._native.tree_attention(**args)
    out = run_tree_attention(cache, 0, good["q"], [s], [good["parents"]])  # the cache still works
    assert torch.isfinite(out).all()


def test_wrong_reservation_count_raises():
    cache, s, dead, good = bad_setup()
    q = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="has 3 reserved slots, but q_offsets gives it 2 queries"):
        atlas._native.tree_attention(cache, 0, q, torch.empty_like(q), np.array([s], np.int32),
                                     np.array([0, 2]), np.array([-1, 0], np.int32), 0.3)
    cache.commit(s, [0])
    with pytest.raises(ValueError, match="has 0 reserved slots"):
        run_tree_attention(cache, 0, torch.randn(1, 4, 8), [s], [[-1]])


def test_hostile_inputs_do_not_crash_the_interpreter():
    code = r"""
import numpy as np, torch, atlas
cache = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=4, block_size=2, max_seqs=2)
s = cache.create()
cache.reserve(s, 2)
q = torch.randn(2, 1, 4)
out = torch.empty_like(q)
ta = atlas._native.tree_attention
I32, I64 = np.int32, np.int64
cases = [
    (np.array([s], I32), np.array([0, 2**40]), np.array([-1, 0], I32)),
    (np.array([s], I32), np.array([0, -5]), np.array([-1, 0], I32)),
    (np.array([2**31 - 1], I32), np.array([0, 2]), np.array([-1, 0], I32)),
    (np.array([-2**31], I32), np.array([0, 2]), np.array([-1, 0], I32)),
    (np.array([s], I32), np.array([0, 2]), np.array([-1, 2**31 - 1], I32)),
    (np.array([s], I32), np.array([0, 2]), np.array([-2**31, 0], I32)),
    (np.array([s, s], I32), np.array([0, 2, 2]), np.array([-1, 0], I32)),
]
for seqs, offs, parents in cases:
    try:
        ta(cache, 0, q, out, seqs, offs, parents, 0.5)
        raise SystemExit("no error raised")
    except ValueError:
        pass
for bad in (lambda: ta(cache, 2**40, q, out, cases[0][0], np.array([0, 2]), cases[0][2], 0.5),
            lambda: ta(cache, 0, None, out, cases[0][0], np.array([0, 2]), cases[0][2], 0.5),
            lambda: ta(None, 0, q, out, cases[0][0], np.array([0, 2]), cases[0][2], 0.5),
            lambda: ta(cache, 0, q, q.numpy()[::-1], cases[0][0], np.array([0, 2]), cases[0][2], 0.5)):
    try:
        bad()
        raise SystemExit("no error raised")
    except (ValueError, TypeError):
        pass
# Non-finite queries and a read-only broadcast query (token stride 0) compute without crashing.
ta(cache, 0, torch.full((2, 1, 4), float("nan")), out, np.array([s], I32), np.array([0, 2]),
   np.array([-1, 0], I32), 0.5)
assert torch.isnan(out).all()
qb = np.broadcast_to(np.ones((1, 1, 4), np.float32), (2, 1, 4))
ta(cache, 0, qb, out, np.array([s], I32), np.array([0, 2]), np.array([-1, 0], I32), 0.5)
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "survived" in r.stdout, r.stderr


def test_baseline_simd_width_matches_reference():
    """The kernels exist for 4- and 8-float vectors (SSE, AVX2); the widest the CPU
    has runs in the tests above. ATLAS_SIMD_WIDTH=4 forces the baseline: the same
    reference checks must pass with it."""
    env = dict(os.environ, ATLAS_SIMD_WIDTH="4")
    pkg = os.path.dirname(os.path.dirname(atlas.__file__))
    env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "(matches_reference or branch_equals or strided or prefill_chain) and not baseline"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
