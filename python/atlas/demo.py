"""``atlas demo``: the native core at work on one draft tree.

It builds a draft tree from three candidate continuations (two share a
prefix), flattens it for a target forward, and verifies it greedily and by
lossless sampling against logits that favour one branch, printing what each
step produced.
"""
from __future__ import annotations

import numpy as np

import atlas


def run_demo(args) -> int:
    rng = np.random.default_rng(args.seed)
    vocab = 49_152
    print("atlas", atlas.__version__, "| build:", atlas.build_info())

    tree = atlas.DraftTree(root_token=11, max_nodes=16, vocab_size=vocab)
    tree.add_path([101, 102, 103], [0.9, 0.8, 0.6], proposer=0)
    tree.add_path([101, 102, 204], [0.9, 0.7, 0.5], proposer=1)
    tree.add_path([301, 302], [0.4, 0.3], proposer=1)
    flat = tree.flatten(committed_len=40)
    print(f"\ndraft tree: {len(tree)} nodes, depth {tree.max_depth}")
    for i in range(len(tree)):
        print(f"  node {i}: token {flat.tokens[i]:>5}  parent {flat.parents[i]:>2}  "
              f"position {flat.positions[i]}  proposers {tree.proposers[i]:#04b}")

    # Target logits: noise, with the path 101 -> 102 -> 204 made the target's choice.
    logits = rng.standard_normal((len(tree), vocab)).astype(np.float32)
    favour = {0: 101, 1: 102, 2: 204, 4: 7}  # node -> token the target prefers after it
    for node, tok in favour.items():
        logits[node, tok] += 12.0

    verifier = atlas.Verifier(vocab)
    greedy = verifier(logits, flat.tokens, flat.parents)
    print(f"\ngreedy:   accepted nodes {greedy.accepted[0].tolist()}  emitted {greedy.emitted[0].tolist()}")
    sampled = verifier(logits, flat.tokens, flat.parents, temperature=0.8, top_k=50, top_p=0.9,
                       seed=args.seed, offset=40)  # offset: the root's position, committed_len
    print(f"sampling: accepted nodes {sampled.accepted[0].tolist()}  emitted {sampled.emitted[0].tolist()}")
    print(f"\n{len(greedy.emitted[0])} tokens from one target forward instead of 1.")
    return 0
