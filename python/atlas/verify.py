"""Lossless verification of draft trees against target logits, and the plain
sampler that shares its transforms.

Vocabulary (see ``cpp/include/atlas/verify.h`` for the exact rules):

* **accepted** nodes: the draft nodes on the path the target keeps;
* **bonus** token: what the target emits after the accepted path (its argmax,
  or a sample of its distribution there);
* **emitted** tokens: the accepted tokens followed by the bonus.

Sampling parameters (``temperature``, ``top_k``, ``top_p``, ``seed``,
``offset``) are numbers or per-tree arrays of length ``batch``;
``temperature=0`` is greedy. ``offset`` is the position of the tree's root in
its sequence (the engine passes the position of the last committed token);
a node at depth ``d`` draws its uniforms from ``(seed, offset + d)``.
Randomness is counter based: the same inputs with the same ``(seed, offset)``
give the same tokens, bit for bit. With deterministic (one-hot) drafts each
position's token is the one plain sampling (:meth:`Verifier.sample` with
``offset`` = that position) would draw, whatever the tree, so a seeded run
replays however its trees were chosen. Trees (or rows, for
:meth:`Verifier.sample`) that share a ``(seed, offset)`` share their uniforms,
so give each sequence its own seed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List

import numpy as np

from . import _native
from .tree import _ids


@dataclass
class VerifyResult:
    """Per sequence of the batch: accepted node indices and emitted tokens."""

    accepted: List[np.ndarray]  # [num_accepted] tree-local node indices, path order
    emitted: List[np.ndarray]   # [num_accepted + 1] token ids


def _param(x):
    """A number stays a Python number (numpy and 0-d torch scalars included); an
    array goes to the binding as is, which checks its length."""
    if np.ndim(x) == 0:
        value = x.item() if hasattr(x, "item") else x
        return value
    return np.asarray(x)


class Verifier:
    """Reusable verifier for one vocabulary: it owns its workspace and output
    buffers, so calls allocate nothing beyond the small result arrays.

    ``logits`` (``[total_nodes, vocab]``, float32 or bfloat16, numpy or torch
    CPU) is read in place; only the rows on the accepted path are read.
    ``tokens`` and ``parents`` (``[total_nodes]``) describe the flattened trees,
    ``tree_offsets`` (``[batch + 1]``) splits the nodes into trees; omitted, all
    nodes form one tree. ``draft_probs`` (``[total_nodes, vocab]`` float32,
    optional) is the distribution each node's children were drawn from,
    without replacement (siblings hold distinct tokens); without it drafts are
    deterministic (one-hot).
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

    def _check_vocab(self, logits) -> None:
        shape = getattr(logits, "shape", None)
        if shape is not None and len(shape) == 2 and int(shape[1]) != self.vocab:
            raise ValueError(f"logits must have shape[1] == the Verifier's vocab = {self.vocab}, "
                             f"got shape {tuple(shape)}")

    def __call__(self, logits, tokens, parents, tree_offsets=None, *, temperature=0.0, top_k=0,
                 top_p=1.0, seed=0, offset=0, draft_probs=None) -> VerifyResult:
        self._check_vocab(logits)
        tok = _ids(tokens, "tokens")
        par = _ids(parents, "parents")
        if tree_offsets is None:
            offsets = np.array([0, tok.shape[0] if tok.ndim == 1 else 0], np.int64)
        else:
            offsets = _ids(tree_offsets, "tree_offsets", np.int64)
        batch = max(int(offsets.shape[0]) - 1, 1) if offsets.ndim == 1 else 1
        # The deepest tree is at most as deep as it is large.
        max_tree = int(np.diff(offsets).max()) if offsets.ndim == 1 and offsets.shape[0] > 1 else 1
        accepted, emitted, num = self._buffers(batch, max(max_tree, 1))
        _native.verify(logits, tok, par, offsets, _param(temperature), _param(top_k), _param(top_p),
                       _param(seed), _param(offset), draft_probs, accepted, emitted, num, self._workspace)
        return VerifyResult([accepted[b, : num[b]].copy() for b in range(batch)],
                            [emitted[b, : num[b] + 1].copy() for b in range(batch)])

    def sample(self, logits, *, temperature=1.0, top_k=0, top_p=1.0, seed=0,
               offset=0) -> np.ndarray:
        """Plain (non-speculative) sampling of one token per row.

        ``logits``: ``[batch, vocab]``; returns ``[batch]`` int32 tokens. Each row
        is verified as a tree of one node, so the token is the draw with exactly
        the transforms (temperature, top_k, top_p) and the uniforms that
        speculative verification uses: row ``b`` is the token that follows
        position ``offset[b]``, and speculative decoding with one-hot drafts
        emits the same token there. ``temperature=0`` is the argmax.
        """
        self._check_vocab(logits)
        shape = getattr(logits, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"logits must be 2-D [batch, vocab], got shape {shape}")
        batch = int(shape[0])
        if batch < 1:
            raise ValueError("logits must hold at least one row")
        tokens = np.zeros(batch, np.int32)
        parents = np.full(batch, -1, np.int32)
        offsets = np.arange(batch + 1, dtype=np.int64)
        accepted, emitted, num = self._buffers(batch, 1)
        _native.verify(logits, tokens, parents, offsets, _param(temperature), _param(top_k),
                       _param(top_p), _param(seed), _param(offset), None, accepted, emitted, num,
                       self._workspace)
        return emitted[:, 0].copy()


def verify(logits, tokens, parents, tree_offsets=None, **params) -> VerifyResult:
    """One-shot :class:`Verifier` call (allocates its workspace each time)."""
    vocab = int(logits.shape[-1]) if hasattr(logits, "shape") and len(logits.shape) == 2 else 1
    return Verifier(vocab)(logits, tokens, parents, tree_offsets, **params)


_workspaces = threading.local()


def top_k_probs(logits, k: int):
    """Per row of ``logits`` (CPU float32 or bfloat16 ``[n, V]``, a numpy
    array or a torch tensor, rows contiguous): the k most probable tokens at
    temperature 1 (descending; equal logits in ascending id) and their softmax
    probabilities over the whole row, as (ids ``[n, k]`` int32, probs
    ``[n, k]`` float32). The native ``top_k_probs``: one single-threaded pass
    per row with the verifier's numerics, allocation-free but for the outputs
    (each thread keeps one workspace, grown to the largest vocabulary seen).
    A row holding NaN or +inf, or only -inf, raises ValueError."""
    return _top_k(_native.top_k_probs, logits, k)


def top_k_logits(logits, k: int):
    """:func:`top_k_probs` with the k largest logits themselves instead of
    probabilities, as (ids ``[n, k]`` int32, logits ``[n, k]`` float32): no
    exponentials (7 rows of SmolLM2's 49,152 logits in the caches, k = 16,
    one thread: 0.05 ms against 0.17)."""
    return _top_k(_native.top_k_logits, logits, k)


def _top_k(fn, logits, k: int):
    n, vocab = logits.shape
    need = _native.verify_workspace_bytes(int(vocab))
    ws = getattr(_workspaces, "ws", None)
    if ws is None or ws.shape[0] < need:
        ws = _workspaces.ws = np.empty(need, np.uint8)
    ids = np.empty((n, k), np.int32)
    values = np.empty((n, k), np.float32)
    fn(logits, k, ids, values, ws)
    return ids, values
