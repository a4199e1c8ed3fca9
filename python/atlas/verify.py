"""Lossless verification of draft trees against target logits.

Vocabulary (see ``cpp/include/atlas/verify.h`` for the exact rules):

* **accepted** nodes: the draft nodes on the path the target keeps;
* **bonus** token: what the target emits after the accepted path (its argmax,
  or a sample of what remains of its distribution);
* **emitted** tokens: the accepted tokens followed by the bonus.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from . import _native


@dataclass
class VerifyResult:
    """Per sequence of the batch: accepted node indices and emitted tokens."""

    accepted: List[np.ndarray]  # [num_accepted] tree-local node indices, path order
    emitted: List[np.ndarray]   # [num_accepted + 1] token ids


def _ids(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int32)


class Verifier:
    """Reusable verifier for one vocabulary: it owns its workspace and output
    buffers, so calls allocate nothing beyond the small result arrays.

    ``logits`` (``[total_nodes, vocab]``, float32 or bfloat16, numpy or torch
    CPU) is read in place. ``tree_offsets`` (``[batch + 1]``) splits the nodes
    into trees; omitted, all nodes form one tree. Sampling parameters are
    numbers or per-sequence arrays; ``temperature=0`` is greedy.
    """

    def __init__(self, vocab: int, max_batch: int = 64, max_accept: int = 64):
        self.vocab = int(vocab)
        self._workspace = np.empty(_native.verify_workspace_bytes(self.vocab), np.uint8)
        self._accepted = np.empty((max_batch, max_accept), np.int32)
        self._emitted = np.empty((max_batch, max_accept + 1), np.int32)
        self._num = np.empty(max_batch, np.int32)

    def _buffers(self, batch: int, depth: int):
        if batch > self._accepted.shape[0] or depth > self._accepted.shape[1]:
            b = max(batch, self._accepted.shape[0])
            d = max(depth, self._accepted.shape[1])
            self._accepted = np.empty((b, d), np.int32)
            self._emitted = np.empty((b, d + 1), np.int32)
            self._num = np.empty(b, np.int32)
        d = self._accepted.shape[1]
        return self._accepted[:batch], self._emitted[:batch, : d + 1], self._num[:batch]

    def __call__(self, logits, tokens, parents, tree_offsets=None, *, temperature=0.0, top_k=0,
                 top_p=1.0, seed=0, offset=0, draft_probs=None,
                 multiplicity=None) -> VerifyResult:
        tok = _ids(tokens, "tokens")
        par = _ids(parents, "parents")
        if tree_offsets is None:
            offsets = np.array([0, tok.shape[0] if tok.ndim == 1 else 0], np.int64)
        else:
            offsets = np.ascontiguousarray(tree_offsets, dtype=np.int64)
        batch = max(int(offsets.shape[0]) - 1, 1) if offsets.ndim == 1 else 1
        max_tree = int(np.diff(offsets).max()) if offsets.ndim == 1 and offsets.shape[0] > 1 else 1
        accepted, emitted, num = self._buffers(batch, max(max_tree, 1))
        mult = None if multiplicity is None else _ids(multiplicity, "multiplicity")
        _native.verify(logits, tok, par, offsets, temperature, top_k, top_p, seed, offset,
                       draft_probs, mult, accepted, emitted, num, self._workspace)
        return VerifyResult([accepted[b, : num[b]].copy() for b in range(batch)],
                            [emitted[b, : num[b] + 1].copy() for b in range(batch)])


def verify(logits, tokens, parents, tree_offsets=None, **params) -> VerifyResult:
    """One-shot :class:`Verifier` call (allocates its workspace each time)."""
    vocab = int(logits.shape[-1]) if hasattr(logits, "shape") and len(logits.shape) == 2 else 1
    return Verifier(vocab)(logits, tokens, parents, tree_offsets, **params)
