"""Draft tree: trie merging, budget, flattening, validation."""
import subprocess
import sys

import numpy as np
import pytest

import atlas


def reference_mask(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


def test_hand_worked_trie():
    t = atlas.DraftTree(root_token=7, max_nodes=8, vocab_size=100)
    assert t.add_path([1, 2, 3], [0.9, 0.8, 0.7], proposer=0) == (3, 3)
    # Shares the prefix 1, 2 with the first path: only 4 is new.
    assert t.add_path([1, 2, 4], [0.5, 0.95, 0.6], proposer=2) == (3, 4)
    assert t.add_child(0, 5, 0.3, proposer=1) == 5
    assert t.tokens.tolist() == [7, 1, 2, 3, 4, 5]
    assert t.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    assert t.depths.tolist() == [0, 1, 2, 3, 3, 1]
    np.testing.assert_allclose(t.confidences, [1.0, 0.9, 0.95, 0.7, 0.6, 0.3], rtol=0, atol=1e-7)
    assert t.proposers.tolist() == [0, 0b101, 0b101, 0b1, 0b100, 0b10]
    assert t.multiplicity.tolist() == [1, 2, 2, 1, 1, 1]
    assert t.max_depth == 3

    flat = t.flatten(committed_len=10)
    assert flat.tokens.tolist() == [7, 1, 2, 3, 4, 5]
    assert flat.positions.tolist() == [10, 11, 12, 13, 13, 11]
    assert flat.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],
        [1, 0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(flat.ancestor_mask, expected)


def test_budget_caps_and_merges_still_count():
    t = atlas.DraftTree(0, max_nodes=4)
    assert t.add_path([1, 2, 3, 4, 5]) == (3, 3)   # root + 3 nodes = budget
    assert t.add_child(0, 9) == -1                  # full: left out
    assert t.add_path([1, 2]) == (2, 2)             # merging needs no budget
    assert len(t) == 4
    assert t.multiplicity.tolist() == [1, 2, 2, 1]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1024])
def test_random_trees_flatten_like_reference(n):
    rng = np.random.default_rng(n)
    tokens = [int(rng.integers(0, 50))]
    parents = [-1]
    children = {0: set()}
    while len(tokens) < n:
        p = int(rng.integers(0, len(tokens)))
        tok = int(rng.integers(0, 50))
        if tok in children[p]:
            continue
        children[p].add(tok)
        children[len(tokens)] = set()
        tokens.append(tok)
        parents.append(p)
    t = atlas.DraftTree.from_arrays(tokens, parents)
    flat = t.flatten(committed_len=3)
    assert flat.tokens.tolist() == tokens
    assert flat.parents.tolist() == parents
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    assert flat.positions.tolist() == [3 + d for d in depth]
    np.testing.assert_array_equal(flat.ancestor_mask, reference_mask(parents))

    # Re-adding every root-to-node path to a fresh tree rebuilds the same trie.
    t2 = atlas.DraftTree(tokens[0], max_nodes=n)
    for i in range(1, n):
        path = []
        j = i
        while j > 0:
            path.append(tokens[j])
            j = parents[j]
        t2.add_path(path[::-1])
    rebuilt = {(int(a), int(b)) for a, b in zip(t2.parents, t2.tokens)}
    original = {(a, b) for a, b in zip(parents, tokens)}
    assert rebuilt == original


@pytest.mark.parametrize("tokens,parents,match", [
    ([1, 2], [0, 0], "parents\\[0\\] must be -1"),
    ([1, 2, 3], [-1, 2, 1], "cycle"),
    ([1, 2, 3], [-1, 2, 0], "topological"),
    ([1, 2], [-1, 5], "not a node"),
    ([1, 2], [-1, -1], "not a node"),
    ([1, 2, 2], [-1, 0, 0], "trie"),
    ([], [], "non-empty"),
])
def test_bad_arrays(tokens, parents, match):
    with pytest.raises(ValueError, match=match):
        atlas.DraftTree.from_arrays(tokens, parents)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_nodes"):
        atlas.DraftTree(0, max_nodes=0)
    with pytest.raises(ValueError, match="max_nodes"):
        atlas.DraftTree(0, max_nodes=atlas._native.MAX_TREE_NODES + 1)
    with pytest.raises(ValueError, match="root_token"):
        atlas.DraftTree(100, max_nodes=4, vocab_size=100)
    t = atlas.DraftTree(0, max_nodes=8, vocab_size=10)
    with pytest.raises(ValueError, match="vocabulary"):
        t.add_path([1, 10])
    assert len(t) == 1  # a bad path leaves the tree unchanged
    with pytest.raises(ValueError, match="parent"):
        t.add_child(3, 1)
    with pytest.raises(ValueError, match="confidence"):
        t.add_child(0, 1, confidence=float("nan"))
    with pytest.raises(ValueError, match="proposer"):
        t.add_child(0, 1, proposer=32)
    with pytest.raises(ValueError, match="committed_len"):
        t.flatten(-1)
    with pytest.raises(ValueError, match="integers"):
        t.add_path([1.5])
    with pytest.raises(ValueError, match="more than max_nodes"):
        atlas.DraftTree.from_arrays([0, 1, 2], [-1, 0, 0], max_nodes=2)
    out = np.empty(3, np.int32)
    with pytest.raises(ValueError, match="tokens_out"):
        t.flatten_into(0, out)


def test_bad_input_never_crashes_the_interpreter():
    code = """
import numpy as np, atlas
from atlas import _native
t = _native.DraftTree(1, 4, 0)
for bad in (lambda: t.add_path(np.zeros((2, 2), np.int32), None, 0, 0),
            lambda: t.add_path(np.zeros(3, np.int64), None, 0, 0),
            lambda: t.add_path(np.zeros(3, np.int32)[::2], None, 0, 0),
            lambda: t.add_path("abc", None, 0, 0),
            lambda: t.assign(np.zeros(2, np.int32), np.array([-1, 7], np.int32), None, None, 4, 0),
            lambda: t.flatten_into(0, np.empty(2, np.int32)),
            lambda: t.flatten_into(0, None, None, None, np.empty((1, 1), np.float32)),
            lambda: t.add_child(2**40, 1, 1.0, 0),
            lambda: t.add_child(0, 1, 1.0, -1)):
    try:
        bad()
    except (ValueError, TypeError):
        pass
    else:
        raise SystemExit("no error raised")
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stdout
