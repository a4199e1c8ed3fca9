"""The native per-layer operations of the target's CPU forward
(cpp/include/atlas/layer_ops.h): ``_native.rms_norm`` against a numpy
reference of its stated numerics and the model's ``rms_norm`` against the
torch chain it replaces; ``_native.rope_store`` against the torch expression
it replaces, bit for bit; the argument checks of both; and with them the
binding's fast path for plain CPU torch tensors (and what still takes the
slow one)."""
import numpy as np
import pytest
import torch

from atlas import _native
from atlas.kv_cache import KVCache
from atlas.models.llama import rms_norm


def reference(x, w, eps):
    """The numerics of atlas/layer_ops.h's rms_norm in numpy: squares summed in float64,
    eight partial sums of the columns j = l mod 8 (each in column order) up to
    the last multiple of 8, combined pairwise, then the other columns one at a
    time; the mean rounded once to float32, the scale and the products in
    float32."""
    x = np.asarray(x, np.float32)
    sq = np.square(x.astype(np.float64))
    n8 = x.shape[-1] - x.shape[-1] % 8
    part = np.zeros((x.shape[0], 8))
    for j in range(0, n8, 8):
        part += sq[:, j:j + 8]
    p = [part[:, i] for i in range(8)]
    total = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))
    for j in range(n8, x.shape[-1]):
        total += sq[:, j]
    mean = (total / x.shape[-1]).astype(np.float32)
    s = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return np.asarray(w, np.float32) * (x * s[:, None])


@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (2, 8), (5, 19), (16, 576), (130, 64)])
def test_bits_match_the_stated_numerics(rows, n):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, n, generator=g) * 3
    w = torch.randn(n, generator=g)
    out = torch.full((rows, n), float("nan"))
    _native.rms_norm(x, w, 1e-5, out)
    np.testing.assert_array_equal(out.numpy(), reference(x.numpy(), w.numpy(), 1e-5))
    # In place, and from numpy arrays with strided rows.
    wide = torch.randn(rows, n + 5, generator=g)
    xs = wide[:, :n]
    want = reference(xs.numpy(), w.numpy(), 1e-6)
    _native.rms_norm(xs, w, 1e-6, xs)
    np.testing.assert_array_equal(xs.numpy(), want)
    xa = np.ascontiguousarray(x.numpy())
    oa = np.empty_like(xa)
    _native.rms_norm(xa, w.numpy(), 1e-5, oa)
    np.testing.assert_array_equal(oa, reference(xa, w.numpy(), 1e-5))


def test_the_models_norm_matches_the_torch_chain_and_falls_back():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 576, generator=g) * 2
    w = torch.randn(576, generator=g)
    xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), w * xf, rtol=2e-6, atol=1e-6)
    # What the native path does not take still gives the torch chain's result.
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(rms_norm(xb, w.to(torch.bfloat16), 1e-5).float(), w * xf, rtol=2e-2, atol=2e-2)
    xg = x.clone().requires_grad_(True)
    y = rms_norm(xg, w, 1e-5)
    y.sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(rms_norm(x.t().contiguous().t(), w, 1e-5), w * xf, rtol=2e-6, atol=1e-6)


def test_bad_arguments_raise_clearly():
    x, w, out = torch.randn(4, 8), torch.randn(8), torch.empty(4, 8)
    cases = [
        ((x.double(), w, 1e-5, out), "x must have dtype float32"),
        ((x[0], w, 1e-5, out), "x must be 2-D"),
        ((x, w[:7], 1e-5, out), "weight must have shape"),
        ((x, w, 1e-5, torch.empty(3, 8)), "out must have shape"),
        ((x, w, 1e-5, torch.empty(4, 8, dtype=torch.int32)), "out must have dtype"),
        ((x, w, 0.0, out), "eps must be"),
        ((x, w, float("nan"), out), "eps must be"),
        ((x, w, True, out), "eps must be a float"),
        ((x, w, "1e-5", out), "eps must be a float"),
        ((x, None, 1e-5, out), "weight must be an array"),
        ((x, w, 1e-5, [[0.0] * 8] * 4), "out must be a numpy array or a torch tensor"),
        ((x.t(), w[:4], 1e-5, torch.empty(8, 4)), "x must be contiguous in its last dimension"),
        ((x.clone().requires_grad_(True), w, 1e-5, out), "cannot be shared without a copy"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _native.rms_norm(*args)
    buf = torch.randn(5, 8)
    with pytest.raises(ValueError, match="out must be x itself or not overlap it"):
        _native.rms_norm(buf[:4], w, 1e-5, buf[1:])
    with pytest.raises(ValueError, match="out must not overlap weight"):
        _native.rms_norm(buf[:1], buf[1], 1e-5, buf[1:2])
    ro = np.zeros((4, 8), np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out is an output and must be writeable"):
        _native.rms_norm(x.numpy(), w.numpy(), 1e-5, ro)


def test_tensor_subclasses_and_views_still_share_their_memory():
    """A tensor subclass (here a Parameter) takes __dlpack__ as before; views
    with offsets and strides take the fast path and read the right memory."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 12, generator=g)
    w = torch.nn.Parameter(torch.randn(8, generator=g), requires_grad=False)
    x = base[1:5, 2:10]              # offset and row stride 12
    out = torch.empty(6, 12)[1:5, 3:11]
    _native.rms_norm(x, w, 1e-5, out)
    np.testing.assert_array_equal(out.numpy(), reference(x.numpy(), w.detach().numpy(), 1e-5))
    w.requires_grad_(True)
    with pytest.raises(ValueError, match="cannot be shared without a copy"):
        _native.rms_norm(x, w, 1e-5, out)


# ---- rotary embedding and the KV store ---------------------------------------------------

def rope_case(seed, total, hq=4, hk=2, d=8, num_blocks=6, block_size=4):
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(3, hk, d, num_blocks, block_size)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g))
    qkv = torch.randn(total, hq + 2 * hk, d, generator=g)
    cos = torch.randn(total, d, generator=g)
    sin = torch.randn(total, d, generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:total]
    return cache, qkv, cos, sin, slots


def torch_rope(qkv, cos, sin, hq, hk):
    """The model's torch expression (atlas/models/llama.py's fallback)."""
    total, _, d = qkv.shape
    qk = qkv[:, : hq + hk]
    qk = qk * cos[:, None] + qk.reshape(total, hq + hk, 2, d // 2).flip(2).reshape(total, hq + hk, d) * sin[:, None]
    return qk[:, :hq], qk[:, hq:], qkv[:, hq + hk:]


@pytest.mark.parametrize("total", [1, 5, 13])
def test_rope_store_gives_the_bits_of_the_torch_expression(total):
    cache, qkv, cos, sin, slots = rope_case(total, total)
    before = cache.storage.clone()
    q = torch.full((total, 4, 8), float("nan"))
    _native.rope_store(cache, 1, qkv, cos, sin, slots, q)
    want_q, want_k, want_v = torch_rope(qkv, cos, sin, 4, 2)
    np.testing.assert_array_equal(q.numpy(), want_q.numpy())
    np.testing.assert_array_equal(cache.keys(1)[slots].numpy(), want_k.numpy())
    np.testing.assert_array_equal(cache.values(1)[slots].numpy(), want_v.numpy())
    # Nothing else moved: other layers, other slots.
    changed = (cache.storage != before).nonzero()
    assert set(changed[:, 0].tolist()) <= {1}
    flat = changed[:, 2] * 4 + changed[:, 3]
    assert set(flat.tolist()) <= set(slots.tolist())


def test_rope_store_reads_strided_rows_and_numpy_arrays():
    cache, qkv, cos, sin, slots = rope_case(7, 5)
    wide = torch.zeros(5, 9, 8)
    wide[:, :8] = qkv
    q = torch.empty(5, 4, 8)
    _native.rope_store(cache, 0, wide[:, :8], cos.numpy(), sin.numpy(), slots.numpy(), q.numpy())
    want_q, want_k, _ = torch_rope(qkv, cos, sin, 4, 2)
    np.testing.assert_array_equal(q.numpy(), want_q.numpy())
    np.testing.assert_array_equal(cache.keys(0)[slots].numpy(), want_k.numpy())


def test_rope_store_bad_arguments_raise_clearly_and_write_nothing():
    cache, qkv, cos, sin, slots = rope_case(3, 4)
    q = torch.empty(4, 4, 8)
    before = cache.storage.clone()
    bad_slots = slots.clone()
    bad_slots[2] = 24
    cases = [
        ((cache, 3, qkv, cos, sin, slots, q), "layer"),
        ((cache, True, qkv, cos, sin, slots, q), "layer must be an int"),
        ((cache, 0, qkv[:, :, :6], cos[:, :6], sin[:, :6], slots, q[:, :, :6]), "head_dim"),
        ((cache, 0, qkv[:, :4], cos, sin, slots, q), "query heads"),
        ((cache, 0, qkv.double(), cos, sin, slots, q), "qkv must have dtype float32"),
        ((cache, 0, qkv, cos[:3], sin, slots, q), "cos must have shape"),
        ((cache, 0, qkv, cos, sin.t(), slots, q), "sin must"),
        ((cache, 0, qkv, cos, sin, slots.int(), q), "slots must have dtype int64"),
        ((cache, 0, qkv, cos, sin, slots[:3], q), "slots must have shape"),
        ((cache, 0, qkv, cos, sin, bad_slots, q), "slot 24 of row 2 is outside"),
        ((cache, 0, qkv, cos, sin, slots, torch.empty(4, 3, 8)), "q_out must have shape"),
        ((cache, 0, qkv, cos, sin, slots, qkv[:, :4]), "q_out must be contiguous"),
        ((cache, 0, qkv.transpose(1, 2), cos, sin, slots, q), "qkv"),
        ((cache, 0, qkv, cos, sin, slots, None), "q_out must be an array"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _native.rope_store(*args)
    flat = torch.zeros(4 * 8 * 8)
    with pytest.raises(ValueError, match="q_out must not overlap"):
        _native.rope_store(cache, 0, flat.view(4, 8, 8), cos, sin, slots, flat[8:8 + 128].view(4, 4, 8))
    inside = cache.storage[0, 0].reshape(-1)[: 4 * 4 * 8].view(4, 4, 8)
    with pytest.raises(ValueError, match="must not lie in the cache's storage"):
        _native.rope_store(cache, 0, qkv, cos, sin, slots, inside)
    assert torch.equal(cache.storage, before)
    bf16 = KVCache(3, 2, 8, 6, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 cache"):
        _native.rope_store(bf16, 0, qkv, cos, sin, slots, q)
