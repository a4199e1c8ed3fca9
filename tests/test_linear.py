"""The native small-batch linear layer (``_native.PackedLinear``,
cpp/include/atlas/linear.h) that the target's CPU forward uses for a few
rows: its results against a float64 reference, the independence of a row's
bits from the other rows and the thread count, and its argument checks."""
import numpy as np
import pytest
import torch

from atlas import _native


def reference(x, w, bias=None):
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("simd", ["auto", "baseline"])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 5), (40, 33), (300, 64), (70, 300)])
def test_matches_a_float64_product(simd, n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    lin = _native.PackedLinear(w, simd=simd)
    assert (lin.out_features, lin.in_features) == (n, k)
    if simd == "baseline":
        assert not lin.wide
    for rows in (1, 2, 5, 6, 7, 12, 13, 25, 49):
        x = torch.randn(rows, k, generator=g)
        for bias in (None, b):
            out = torch.full((rows, n), float("nan"))
            lin.forward(x, out, bias, 2)
            torch.testing.assert_close(out.double(), reference(x, w, bias), rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_a_rows_bits_do_not_depend_on_the_batch_or_the_threads():
    g = torch.Generator().manual_seed(1)
    # K = 300: rows of several groups run in blocks of k (128, 128, 44);
    # up to 48 rows blocked, 49 one group after another.
    w = torch.randn(200, 300, generator=g)
    lin = _native.PackedLinear(w)
    x = torch.randn(49, 300, generator=g)
    alone = torch.empty(49, 200)
    for r in range(49):
        lin.forward(x[r:r + 1], alone[r:r + 1], None, 1)
    for rows in (2, 3, 8, 12, 13, 25, 32, 48, 49):     # 13 rows run as two groups of 7 and 6
        for threads in (1, 2, 3, 7):
            out = torch.empty(rows, 200)
            lin.forward(x[:rows], out, None, threads)
            assert torch.equal(out, alone[:rows])


@pytest.mark.skipif(not _native.cpu_features()["avx512f"], reason="the CPU has no AVX-512")
def test_avx512_gives_the_avx2_bits():
    # With AVX-512 the kernel runs up to four panels at once (their
    # accumulators share each broadcast of x); AVX2 runs one at a time. Every
    # output is the same chain of fused multiply-adds in both, so the bits
    # must agree: for any rows (one group, several groups in blocks of k),
    # threads (panel ranges that leave 1-3 panels over) and last panels cut
    # short (N not a multiple of 16).
    g = torch.Generator().manual_seed(3)
    for n, k in [(17, 5), (70, 300), (200, 300), (16 * 13 + 3, 40)]:
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g)
        wide, avx2 = _native.PackedLinear(w), _native.PackedLinear(w, simd="avx2")
        assert wide.wide and avx2.wide
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17, 24, 25, 32, 48):
            x = torch.randn(rows, k, generator=g)
            for threads in (1, 2, 3):
                for bias in (None, b):
                    got, want = torch.empty(rows, n), torch.empty(rows, n)
                    wide.forward(x, got, bias, threads)
                    avx2.forward(x, want, bias, threads)
                    assert torch.equal(got, want), (n, k, rows, threads, bias is None)


def test_strided_rows_and_numpy_arrays():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((50, 20)).astype(np.float32)
    lin = _native.PackedLinear(np.ascontiguousarray(w))
    big = rng.standard_normal((6, 32)).astype(np.float32)
    x = big[:, :20]                                   # rows 32 floats apart
    out_big = np.zeros((6, 64), np.float32)
    lin.forward(x, out_big[:, 3:53], None, 2)
    np.testing.assert_allclose(out_big[:, 3:53], x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5)
    assert not out_big[:, :3].any() and not out_big[:, 53:].any()
    lin.forward(np.zeros((0, 20), np.float32), np.zeros((0, 50), np.float32), None, 2)


def test_bad_arguments_raise_clearly():
    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="weight must have dtype float32"):
        _native.PackedLinear(w.double())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        _native.PackedLinear(torch.randn(8))
    with pytest.raises(ValueError, match="weight"):
        _native.PackedLinear(torch.randn(8, 4)[:, ::2])
    with pytest.raises(ValueError, match="N, K >= 1"):
        _native.PackedLinear(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="simd"):
        _native.PackedLinear(w, simd="avx9")
    lin = _native.PackedLinear(w)
    x, out = torch.randn(3, 4), torch.empty(3, 8)
    with pytest.raises(ValueError, match="in_features"):
        lin.forward(torch.randn(3, 5), out)
    with pytest.raises(ValueError, match="out must have shape"):
        lin.forward(x, torch.empty(2, 8))
    with pytest.raises(ValueError, match="out must have shape"):
        lin.forward(x, torch.empty(3, 9))
    with pytest.raises(ValueError, match="x must have dtype float32"):
        lin.forward(x.double(), out)
    with pytest.raises(ValueError, match="bias"):
        lin.forward(x, out, torch.randn(7))
    for threads in (0, 65, -1):
        with pytest.raises(ValueError, match="threads"):
            lin.forward(x, out, None, threads)
    with pytest.raises(ValueError, match="threads must be an int"):
        lin.forward(x, out, None, 2.0)
    with pytest.raises(ValueError, match="overlap"):
        buf = torch.empty(3, 8)
        lin.forward(buf[:, :4], buf)
    ro = np.empty((3, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        lin.forward(x.numpy(), ro)
    lin.forward(x, out)            # still usable after the errors
    torch.testing.assert_close(out.double(), reference(x, w), rtol=1e-5, atol=1e-5)


def test_alternating_thread_counts_stay_correct():
    """The worker pool serves calls with different thread counts one after
    the other (workers that a call does not need never read its job)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(333, 40, generator=g)
    lin = _native.PackedLinear(w)
    x = torch.randn(5, 40, generator=g)
    want = torch.empty(5, 333)
    lin.forward(x, want, None, 1)
    for i in range(300):
        threads = (7, 2, 5, 1, 3)[i % 5]
        out = torch.empty(5, 333)
        lin.forward(x, out, None, threads)
        assert torch.equal(out, want), (i, threads)
