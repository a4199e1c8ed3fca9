"""Where threads run (atlas.placement): the native helper-CPU setting and its
checks, the pool's workers following it, and the engine pinning its serving
thread to one CPU for a serve while its helpers get the others."""
import os
import threading
import time

import numpy as np
import pytest
import torch

import atlas
from atlas import _native, placement
from oracle import OracleDrafts, assert_same_greedy, hf_greedy, tiny_llama

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
needs_two_cpus = pytest.mark.skipif(not placement.SUPPORTED or len(CPUS) < 2,
                                    reason="needs Linux and at least two CPUs this process may use")


@pytest.fixture(autouse=True)
def no_helper_cpus():
    # (the setting is process-wide: any engine that served before, in
    # another test file, has set it)
    _native.set_helper_cpus([])
    yield
    _native.set_helper_cpus([])


def thread_cpus():
    """{thread id: its CPUs} for this process's threads now."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:
            pass   # it ended meanwhile
    return out


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_helper_cpus_are_checked():
    for bad, match in (([-1], "outside"), ([1024], "outside"), ([0, 0], "twice"), (["1"], "ints"),
                       ([True], "ints"), ([1.0], "ints"), ("01", "iterable"), (3, "iterable")):
        with pytest.raises(ValueError, match=match):
            _native.set_helper_cpus(bad)
    assert _native.helper_cpus() == []
    if placement.SUPPORTED:
        _native.set_helper_cpus({3, 1})
        assert _native.helper_cpus() == [1, 3]
        _native.set_helper_cpus(())
        assert _native.helper_cpus() == []


def test_each_serve_claims_a_cpu_of_its_own_and_helpers_get_the_rest():
    assert placement.claim([3]) is None and placement.claim([]) is None
    first = placement.claim({5, 2, 9})
    assert first == (2, {5, 9})
    second = placement.claim({5, 2, 9})             # another serve at the same time
    assert second == (5, {9})
    assert placement.claim({5, 2, 9}) is None        # nothing left for helpers: unpinned
    placement.release(5)
    placement.release(2)
    assert placement.claim({5, 2, 9}) == (2, {5, 9})
    placement.release(2)


@needs_two_cpus
def test_the_pools_workers_move_to_the_helper_cpus_and_back():
    lin = _native.PackedLinear(torch.randn(64, 32))
    x, out = torch.randn(4, 32), torch.empty(4, 64)
    lin.forward(x, out, None, 2)                     # the pool has its worker
    before = thread_cpus()
    me = threading.get_native_id()
    helper = CPUS[-1]
    _native.set_helper_cpus([helper])
    lin.forward(x, out, None, 2)                     # a worker applies the set when it wakes
    assert wait_for(lambda: any(c == {helper} for t, c in thread_cpus().items() if t != me))
    moved = [t for t, c in thread_cpus().items() if t != me and c == {helper} and before.get(t) != {helper}]
    assert moved, "no pool worker moved"
    assert os.sched_getaffinity(0) == before[me]     # the caller is not a helper
    _native.set_helper_cpus([])
    lin.forward(x, out, None, 2)
    assert wait_for(lambda: all(os.sched_getaffinity(t) == before[t] for t in moved if t in thread_cpus()))


class CpuWatcher:
    """An observer that records where the serving thread runs and the CPUs
    the engine hands its helpers."""

    def __init__(self):
        self.serving, self.placed = set(), []

    def observe(self, record):
        self.serving.add(frozenset(os.sched_getaffinity(0)))

    def place_threads(self, cpus):
        self.placed.append(set(cpus))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    return model, atlas.load(model)


@needs_two_cpus
def test_the_engine_pins_its_serving_thread_for_a_serve_and_hands_the_rest_to_helpers(tiny):
    model, target = tiny
    p = np.random.default_rng(5).integers(1, target.config.vocab_size, size=9).tolist()
    truth = {tuple(p): hf_greedy(model, p, 10)}
    mine = os.sched_getaffinity(0)
    serve, helpers = min(mine), mine - {min(mine)}
    watcher = CpuWatcher()
    engine = atlas.Engine(target, speculators=[OracleDrafts(truth, depth=3)], observers=[watcher], threads=2)
    assert engine.pin_threads                         # the default on the CPU, on Linux
    out = engine.generate([p], max_new_tokens=10)[0]
    assert_same_greedy(model, p, truth[tuple(p)], out.token_ids)
    assert watcher.serving == {frozenset({serve})}
    assert watcher.placed == [helpers]
    assert _native.helper_cpus() == sorted(helpers)
    assert os.sched_getaffinity(0) == mine            # given back when the serve ends
    # A stream that is left unfinished gives them back when it is closed.
    it = engine.stream(p, max_new_tokens=10)
    next(it)
    assert os.sched_getaffinity(0) == {serve}
    it.close()
    assert os.sched_getaffinity(0) == mine

    off = CpuWatcher()
    engine = atlas.Engine(target, speculators=[OracleDrafts(truth, depth=3)], observers=[off], pin_threads=False)
    assert engine.generate([p], max_new_tokens=10)[0].token_ids == out.token_ids
    assert off.serving == {frozenset(mine)} and off.placed == []


def test_pin_threads_is_checked(tiny):
    _, target = tiny
    with pytest.raises(ValueError, match="pin_threads"):
        atlas.Engine(target, speculators=None, pin_threads="yes")
    if not placement.SUPPORTED:
        with pytest.raises(ValueError, match="Linux"):
            atlas.Engine(target, speculators=None, pin_threads=True)
