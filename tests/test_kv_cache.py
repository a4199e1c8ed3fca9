"""Paged KV cache: reserve / commit / fork / release against a plain Python model.

The model keeps, per live sequence, the list of token ids at its committed
positions, and per token id the key/value rows written for it
(``[num_layers, 2, num_kv_heads, head_dim]``). Every check reads the cache's
storage through ``slot_of`` and ``block_table`` and compares it with the model.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import atlas

DTYPES = [torch.float32, torch.bfloat16]


class Model:
    """The plain reference: committed token ids per sequence and their rows."""

    def __init__(self, cache: atlas.KVCache, rng: np.random.Generator):
        self.cache = cache
        self.rng = rng
        self.seqs = {}  # seq id -> list of token ids at positions 0..length-1
        self.rows = {}  # token id -> [num_layers, 2, num_kv_heads, head_dim]
        self.next_token = 0

    def flat(self):
        c = self.cache
        return c.storage.view(c.num_layers, 2, c.num_blocks * c.block_size, c.num_kv_heads, c.head_dim)

    def write(self, slots):
        """Writes fresh random rows to the given slots (all layers, K and V); returns their token ids."""
        c = self.cache
        ids = list(range(self.next_token, self.next_token + len(slots)))
        self.next_token += len(slots)
        shape = (len(slots), c.num_layers, 2, c.num_kv_heads, c.head_dim)
        data = torch.from_numpy(self.rng.standard_normal(shape).astype(np.float32)).to(c.dtype)
        idx = torch.from_numpy(np.asarray(slots, dtype=np.int64))
        for layer in range(c.num_layers):
            c.keys(layer).index_copy_(0, idx, data[:, layer, 0])
            c.values(layer).index_copy_(0, idx, data[:, layer, 1])
        for t, d in zip(ids, data):
            self.rows[t] = d
        return ids

    def check_contents(self):
        c, bs = self.cache, self.cache.block_size
        flat = self.flat()
        for seq, toks in self.seqs.items():
            assert c.length(seq) == len(toks)
            assert c.reserved(seq) == 0
            table = c.block_table(seq)
            assert len(table) == math.ceil(len(toks) / bs)
            if not toks:
                continue
            slots = [c.slot_of(seq, p) for p in range(len(toks))]
            assert slots == [int(table[p // bs]) * bs + p % bs for p in range(len(toks))]
            got = flat[:, :, torch.tensor(slots)].permute(2, 0, 1, 3, 4)  # [len, layers, 2, heads, dim]
            want = torch.stack([self.rows[t] for t in toks])
            assert torch.equal(got, want), f"seq {seq}: contents differ from the chain model"

    def check_ref_counts(self):
        c = self.cache
        counts = np.zeros(c.num_blocks, np.int64)
        for seq in self.seqs:
            table = c.block_table(seq)
            assert len(set(table.tolist())) == len(table), "a block appears twice in one table"
            counts[table] += 1
        got = np.array([c.ref_count(b) for b in range(c.num_blocks)])
        np.testing.assert_array_equal(got, counts)
        assert c.num_free_blocks == int((counts == 0).sum())
        assert c.num_live_seqs == len(self.seqs)


def random_keep(rng, n):
    """A random accepted subset of a reservation of n slots: None (all), [] or a sorted subset."""
    r = rng.random()
    if r < 0.1:
        return None
    if r < 0.2:
        return []
    if r < 0.5:
        # An accepted path of a draft tree: increasing node indices.
        return sorted(rng.choice(n, size=rng.integers(1, n + 1), replace=False).tolist())
    k = int(rng.integers(0, n + 1))
    return list(range(k))


def step(model: Model, rng, seq, max_n=20):
    """reserve -> write every reserved slot -> commit a random subset; updates the model."""
    c = model.cache
    n = int(rng.integers(1, max_n + 1))
    slots = c.reserve(seq, n)
    assert slots.dtype == np.int64 and slots.shape == (n,)
    assert c.reserved(seq) == n
    assert len(set(slots.tolist())) == n
    # Reserved slots are private: no other live sequence maps a position to them.
    for other, toks in model.seqs.items():
        if other != seq and toks:
            theirs = {c.slot_of(other, p) for p in range(len(toks))}
            assert not theirs & set(slots.tolist())
    ids = model.write(slots)
    keep = random_keep(rng, n)
    c.commit(seq, keep)
    model.seqs[seq] += ids if keep is None else [ids[k] for k in keep]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_commit_equals_chain_of_accepted(dtype, block_size):
    rng = np.random.default_rng(11 + block_size)
    c = atlas.KVCache(num_layers=3, num_kv_heads=2, head_dim=5, num_blocks=97, block_size=block_size,
                      max_seqs=7, dtype=dtype)
    model = Model(c, rng)
    for _ in range(4):
        model.seqs[c.create()] = []
    max_n = 20 if block_size > 1 else 6
    # Four sequences below the limit plus their reservations always fit.
    limit = 97 * block_size // 8 - max_n
    for it in range(120):
        seq = int(rng.choice(list(model.seqs)))
        if c.length(seq) > limit:
            c.release(seq)
            del model.seqs[seq]
            model.seqs[c.create()] = []
            continue
        step(model, rng, seq, max_n=max_n)
        model.check_contents()
        model.check_ref_counts()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fork_release_ref_counts_and_copy_on_write(dtype):
    rng = np.random.default_rng(5)
    bs = 4
    c = atlas.KVCache(num_layers=2, num_kv_heads=1, head_dim=3, num_blocks=200, block_size=bs, max_seqs=12,
                      dtype=dtype)
    model = Model(c, rng)
    root = c.create()
    model.seqs[root] = []
    step(model, rng, root)
    for it in range(300):
        op = rng.random()
        seq = int(rng.choice(list(model.seqs)))
        if op < 0.25 and len(model.seqs) < 12:
            child = c.fork(seq)
            assert child not in model.seqs
            model.seqs[child] = list(model.seqs[seq])
            # Forking moves no data and shares every block.
            np.testing.assert_array_equal(c.block_table(child), c.block_table(seq))
        elif op < 0.4 and len(model.seqs) > 1:
            c.release(seq)
            del model.seqs[seq]
        elif c.num_free_blocks > 12:
            step(model, rng, seq, max_n=9)
        model.check_ref_counts()
        model.check_contents()
    for seq in list(model.seqs):
        c.release(seq)
        del model.seqs[seq]
        model.check_ref_counts()
    assert c.num_free_blocks == c.num_blocks and c.num_live_seqs == 0


def test_copy_on_write_hand_worked():
    c = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=6, block_size=4)
    a = c.create()
    np.testing.assert_array_equal(c.reserve(a, 6), [0, 1, 2, 3, 4, 5])
    c.keys(0)[:6] = torch.arange(6.0)[:, None, None]
    c.commit(a)
    b = c.fork(a)
    assert [c.ref_count(i) for i in range(6)] == [2, 2, 0, 0, 0, 0]
    # b's last block (positions 4, 5) is shared and partly filled: b gets a copy.
    np.testing.assert_array_equal(c.reserve(b, 1), [2 * 4 + 2])
    assert c.block_table(b).tolist() == [0, 2] and [c.ref_count(i) for i in range(3)] == [2, 1, 1]
    assert c.keys(0)[8:10, 0, 0].tolist() == [4.0, 5.0]
    c.keys(0)[10] = -1.0
    c.commit(b)
    # a still reads its own rows, and reserves in place: its last block is no longer shared.
    assert c.keys(0)[4:6, 0, 0].tolist() == [4.0, 5.0]
    np.testing.assert_array_equal(c.reserve(a, 3), [6, 7, 12])
    c.commit(a, [1])  # position 6 takes the row at position 7
    assert c.length(a) == 7 and c.block_table(a).tolist() == [0, 1]
    assert c.num_free_blocks == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_full_changes_nothing(dtype):
    rng = np.random.default_rng(3)
    bs = 4
    c = atlas.KVCache(num_layers=2, num_kv_heads=2, head_dim=3, num_blocks=10, block_size=bs, max_seqs=3,
                      dtype=dtype)
    model = Model(c, rng)
    a = c.create()
    model.seqs[a] = []
    slots = c.reserve(a, 26)  # 7 blocks, the last one partly filled
    model.seqs[a] = model.write(slots)
    c.commit(a)
    b = c.fork(a)
    model.seqs[b] = list(model.seqs[a])

    def snapshot():
        return (c.num_free_blocks, c.num_live_seqs,
                {s: (c.length(s), c.reserved(s), c.block_table(s).tolist()) for s in model.seqs},
                [c.ref_count(i) for i in range(c.num_blocks)], c.storage.clone())

    def same(x, y):
        assert x[:4] == y[:4]
        assert torch.equal(x[4], y[4])

    before = snapshot()
    # 3 free blocks. n = 11: 2 new blocks + 1 copy-on-write block would fit (3); n = 12 needs 4.
    with pytest.raises(atlas.CacheFullError):
        c.reserve(b, 11 + 4 - 2)
    same(before, snapshot())
    with pytest.raises(atlas.CacheFullError):
        c.reserve(a, 10 ** 6)  # larger than the whole pool
    same(before, snapshot())
    # Exactly enough: copy-on-write + 2 new blocks.
    slots = c.reserve(b, 10)
    assert c.num_free_blocks == 0
    ids = model.write(slots)
    c.commit(b, [0, 2, 9])
    model.seqs[b] += [ids[0], ids[2], ids[9]]
    model.check_contents()
    model.check_ref_counts()
    before = snapshot()
    # 1 free block; a's last block is private again (b copied it) and has room for 2.
    with pytest.raises(atlas.CacheFullError):
        c.reserve(a, 7)
    same(before, snapshot())
    c.reserve(a, 2)
    c.commit(a, [])
    # Sequences are a bounded resource too.
    c.create()
    with pytest.raises(atlas.CacheFullError):
        c.create()
    with pytest.raises(atlas.CacheFullError):
        c.fork(a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shuffled_free_blocks_same_contents_and_attention(dtype):
    from test_attention import run_tree_attention

    def drive(shuffle_seed):
        rng = np.random.default_rng(21)  # the same script for both caches
        c = atlas.KVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=120, block_size=5, max_seqs=4,
                          dtype=dtype)
        if shuffle_seed is not None:
            c.shuffle_free_blocks(shuffle_seed)
        model = Model(c, rng)
        seqs = [c.create() for _ in range(3)]
        for s in seqs:
            model.seqs[s] = []
        for it in range(40):
            if shuffle_seed is not None and it % 7 == 0:
                c.shuffle_free_blocks(shuffle_seed + it)
            step(model, rng, seqs[it % 3], max_n=12)
        model.check_contents()
        # A tree on every sequence, attended over the shuffled pages.
        trees = [np.array([-1, 0, 0, 1, 3, 3], np.int32), np.array([-1], np.int32),
                 np.arange(-1, 8, dtype=np.int32)]
        q = torch.from_numpy(rng.standard_normal((sum(map(len, trees)), 4, 8)).astype(np.float32)).to(dtype)
        for s, t in zip(seqs, trees):
            model.write(c.reserve(s, len(t)))
        out = run_tree_attention(c, 1, q, seqs, trees)
        logical = [[model.seqs[s], c.length(s)] for s in seqs]
        tables = [c.block_table(s).tolist() for s in seqs]
        return logical, tables, out

    plain = drive(None)
    shuffled = drive(1234)
    assert plain[0] == shuffled[0]
    assert plain[1] != shuffled[1], "the shuffle did not change the block layout"
    # Chunks follow positions, not block ids: the outputs are bit-identical.
    assert torch.equal(plain[2], shuffled[2])


def test_bad_arguments_raise():
    c = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=4, block_size=2, max_seqs=2)
    s = c.create()
    with pytest.raises(ValueError, match="n must be"):
        c.reserve(s, 0)
    with pytest.raises(ValueError, match="seq"):
        c.reserve(5, 1)
    with pytest.raises(ValueError, match="not a live"):
        c.length(1)
    with pytest.raises(ValueError, match="seq"):
        c.fork(-1)
    c.reserve(s, 3)
    with pytest.raises(ValueError, match="already holds a reservation"):
        c.reserve(s, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        c.commit(s, [1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        c.commit(s, [2, 0])
    with pytest.raises(ValueError, match=r"keep\[1\] must be in \[0, reserved = 3\)"):
        c.commit(s, [0, 3])
    with pytest.raises(ValueError, match="keep"):
        c.commit(s, [-1])
    with pytest.raises(ValueError, match="keep must have dtype int32"):
        atlas._native.PagedKVCache.commit(c, s, np.array([0], np.int64))
    with pytest.raises(ValueError, match="integer"):
        c.commit(s, [0.5])
    with pytest.raises(ValueError, match="indices into the reservation"):
        c.commit(s, torch.tensor([2**32 + 1]))  # would wrap to 1 as int32
    with pytest.raises(ValueError, match="pos must be in"):
        c.slot_of(s, 3)
    with pytest.raises(ValueError, match="pos"):
        c.slot_of(s, -1)
    with pytest.raises(ValueError, match="block must be in"):
        c.ref_count(4)
    assert c.reserved(s) == 3 and c.length(s) == 0  # the failed commits changed nothing
    c.commit(s, [0, 2])
    assert c.length(s) == 2
    c.release(s)
    with pytest.raises(ValueError, match="not a live"):
        c.release(s)
    with pytest.raises(ValueError, match="not a live"):
        c.commit(s)
    storage = torch.zeros(1, 2, 4, 2, 1, 4)
    with pytest.raises(ValueError, match="head_dim"):
        atlas._native.PagedKVCache(1, 1, 5, 4, 2, 2, storage)
    with pytest.raises(ValueError, match="dtype"):
        atlas._native.PagedKVCache(1, 1, 4, 4, 2, 2, storage.double())
    with pytest.raises(ValueError, match="contiguous"):
        atlas._native.PagedKVCache(1, 1, 4, 4, 2, 2, torch.zeros(1, 2, 4, 2, 1, 8)[..., ::2])
    with pytest.raises(ValueError, match="num_blocks"):
        atlas.KVCache(1, 1, 4, 0)
    with pytest.raises(ValueError, match="dtype"):
        atlas.KVCache(1, 1, 4, 4, dtype=torch.float16)


def test_hostile_arguments_do_not_crash_the_interpreter():
    code = r"""
import numpy as np, torch, atlas
c = atlas.KVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=4, block_size=2, max_seqs=2)
s = c.create()
for call in (lambda: c.reserve(s, 2**31 - 1), lambda: c.reserve(2**31 - 1, 1), lambda: c.reserve(s, 2**40),
             lambda: c.slot_of(s, 2**62), lambda: c.ref_count(2**31 - 1), lambda: c.commit(s, [2**31 - 1]),
             lambda: c.reserve(s, 1, np.zeros(2, np.int64)), lambda: c.reserve(s, 2, np.zeros(2, np.int32)),
             lambda: atlas._native.PagedKVCache(1, 1, 4, 2**31 - 1, 4096, 1, torch.zeros(1))):
    try:
        call()
        raise SystemExit("no error raised")
    except (ValueError, TypeError, atlas.CacheFullError, OverflowError):
        pass
# Empty keep: nothing kept, whatever the array's data pointer.
c.reserve(s, 2)
c.commit(s, torch.empty(0, dtype=torch.int32).numpy())
assert c.length(s) == 0 and c.num_free_blocks == 4
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "survived" in r.stdout, r.stderr


def apply_pending(c, flat):
    for src, dst in c.pending_copies().tolist():
        flat[:, :, dst] = flat[:, :, src]
    c.clear_pending_copies()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_device_storage_leaves_pending_copies():
    """Device storage: the same script on a CPU cache and a CUDA cache whose
    pending copies are applied by torch in order gives the same contents."""
    rng_cpu, rng_gpu = np.random.default_rng(8), np.random.default_rng(8)
    cpu = atlas.KVCache(2, 2, 4, num_blocks=40, block_size=4, max_seqs=4)
    gpu = atlas.KVCache(2, 2, 4, num_blocks=40, block_size=4, max_seqs=4, device="cuda")
    assert gpu.on_device and not cpu.on_device
    for c, rng in ((cpu, rng_cpu), (gpu, rng_gpu)):
        flat = c.storage.view(2, 2, 160, 2, 4)
        a = c.create()
        for it in range(12):
            seq = a if it != 6 else c.fork(a)
            slots = c.reserve(seq, int(rng.integers(1, 7)))
            apply_pending(c, flat)  # copy-on-write rows, before the forward reads the block
            flat[:, :, torch.from_numpy(slots).to(c.storage.device)] = torch.from_numpy(
                rng.standard_normal((2, 2, len(slots), 2, 4)).astype(np.float32)).to(c.storage.device)
            size = int(rng.integers(0, len(slots) + 1))
            keep = sorted(rng.choice(len(slots), size=size, replace=False).tolist())
            c.commit(seq, keep)
            apply_pending(c, flat)
        assert c.pending_copies().shape == (0, 2)
    assert torch.equal(cpu.storage, gpu.storage.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_truncate_then_continue_equals_chain(dtype):
    """truncate forgets the tail (e.g. a draft model's rejected drafts); later
    steps continue from the cut, shared blocks keep their other owners' data."""
    rng = np.random.default_rng(5)
    c = atlas.KVCache(num_layers=2, num_kv_heads=1, head_dim=3, num_blocks=64, block_size=4, max_seqs=4,
                      dtype=dtype)
    model = Model(c, rng)
    a = c.create()
    model.seqs[a] = []
    for _ in range(30):
        step(model, rng, a, max_n=7)
        cut = int(rng.integers(0, len(model.seqs[a]) + 1))
        if rng.random() < 0.3 and model.seqs[a]:
            b = c.fork(a)
            model.seqs[b] = list(model.seqs[a])
            c.truncate(b, cut)
            model.seqs[b] = model.seqs[b][:cut]
            step(model, rng, b, max_n=7)
            model.check_contents()
            model.check_ref_counts()
            c.release(b)
            del model.seqs[b]
        c.truncate(a, cut)
        model.seqs[a] = model.seqs[a][:cut]
        model.check_contents()
        model.check_ref_counts()
    c.reserve(a, 2)
    with pytest.raises(ValueError, match="reservation"):
        c.truncate(a, 0)
    c.commit(a)
    with pytest.raises(ValueError, match="new_length"):
        c.truncate(a, c.length(a) + 1)
    with pytest.raises(ValueError, match="new_length"):
        c.truncate(a, -1)
