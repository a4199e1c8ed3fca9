"""The learned speculator: an EAGLE-style draft head on the target's features.

The head (``cpp/include/atlas/head.h``; its PyTorch twin, for training, is
:class:`atlas.learning.head.DraftHead`) reads the *feature* of a node's
parent position and the node's token, and returns the predicted feature of
the node's position and the distribution of its children over the draft
vocabulary. Per request the speculator keeps one feature: that of the root's
parent position, read from the target's hidden states in ``observe`` (after a
prefill: the last prompt token; after a decode step: the last accepted node,
or the root when nothing was accepted, since the bonus token becomes the next
root).

``propose`` grows every tree best-first on *path probability* (the product of
the head's conditional probabilities from the root): at each depth it expands
the ``width`` most probable nodes of the previous depth, each into its ``topk``
most probable children, all requests in one forward of the head per depth;
then it keeps the ``max_nodes - len(tree)`` most probable candidates. The
loop is native (``DraftHeadSnapshot.draft``, cpp/include/atlas/head.h:
measured on SmolLM2's static head, 12 to 26 nodes, it cost 0.7 to 0.9 ms a
call in Python beside 2.3 to 2.8 ms of forwards). A
frontier node is expanded only while its path probability could still put a
child among those kept and is at least the larger of the tree's
``min_path_prob`` (the engine's hint of what its controller would not
verify) and the speculator's own; below depth 1, candidates under that floor
are left out. So trees stop growing as soon as no deeper node can compete:
each depth costs a forward of the head. A node's confidence is the head's conditional probability of its
token. Drafts are deterministic, so sampling stays lossless under the
verifier's one-hot rule.

Every ``propose`` takes one snapshot of the native weights: pushes during a
step take effect at the next one.

Request-local versions (:meth:`LearnedSpeculator.adapt`): the learning loop
fits the head to each request's prompt (:mod:`atlas.learning.adapt`) and
hands the result here; from the next step on, that request drafts with the
live version's weights so changed (``DraftHeadSnapshot.derive``), alone in
its own native call, while the others draft together with the live version.
It keeps that version until it ends, pushes notwithstanding. When the last
proposal drafted for one request alone, with its own version, the cache
warm-up below reads that version instead of the live one.

Cache warm-up: on the CPU the target's forward evicts the head's weights
from the caches, so a step's first depth waits on memory. While the head
has drafted in at least ``PREFETCH_MIN_DRAFTS`` of the last
``PREFETCH_RECENT`` steps (this one included), ``after_forward`` asks the
native head to read its live weights on a thread of its own
(``DraftHead.prefetch``, atlas/head.h), which overlaps with the verification
and bookkeeping that come before the next proposal (measured there: about
0.1 to 0.25 ms less a drafting call in full atlas). The engine calls
``after_forward`` before the learning loop's trainer process resumes, so
that the warm-up thread is woken before the trainer competes with it.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Optional

import numpy as np
import torch

from .. import _native
from . import Speculator

log = logging.getLogger("atlas.speculators")

# The speculator warms the caches after a forward when it drafted in at least
# PREFETCH_MIN_DRAFTS of the last PREFETCH_RECENT steps: the controller skips
# a head in some steps (where other speculators have drafted enough), and one
# it runs only now and then (the fallback's untrusted one, tried every tenth
# step) is left cold. (Warming for the PREFETCH_RECENT forwards after any
# proposal warmed that one four times in ten steps, for nothing.)
PREFETCH_RECENT = 4
PREFETCH_MIN_DRAFTS = 2
# Versions kept for request-local fits that arrive after a push (adapt()):
# the learning loop pushes every few requests, a fit comes within a second.
RECENT_VERSIONS = 2


class LearnedSpeculator(Speculator):
    """Drafts with a learned head. ``head`` is an
    :class:`atlas.learning.head.DraftHead`: its configuration and frozen
    embedding define the native head, and its current weights become version 1.
    ``max_depth`` caps a draft's length; ``topk`` children are considered per
    expanded node and ``width`` nodes are expanded per depth; candidates whose
    path probability is below ``min_path_prob`` are not drafted.
    ``prefetch``: warm the CPU caches with the weights after each target
    forward while the head is in use (see the module docstring)."""

    name = "learned"

    def __init__(self, head, *, max_depth: int = 6, topk: int = 4, width: int = 4,
                 min_path_prob: float = 0.0, prefetch: bool = True):
        for arg, v in (("max_depth", max_depth), ("topk", topk), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if not 0.0 <= float(min_path_prob) < 1.0:
            raise ValueError(f"min_path_prob must be in [0, 1), got {min_path_prob}")
        if not isinstance(prefetch, bool):
            raise ValueError(f"prefetch must be a bool, got {prefetch!r}")
        self.max_depth, self.topk, self.width = max_depth, topk, width
        self.prefetch = prefetch
        self._drafted = 0        # bit i: the head drafted in the step i forwards ago
        self._drafting = False   # it drafted in this step
        self.min_path_prob = float(min_path_prob)
        # The native head reads this float32 table in place and keeps it alive
        # (no copy when the head's table is already float32 in CPU memory).
        embed = head.embed.detach().to("cpu", torch.float32).contiguous().numpy()
        self.native = _native.DraftHead(embed, head.hidden, head.intermediate, head.draft_vocab, head.eps)
        self.native.push(head.export())
        self._feature: Dict[int, Optional[np.ndarray]] = {}  # rid -> [H] float32, None until observed
        self._local: Dict[int, object] = {}   # rid -> its request-local DraftHeadSnapshot
        self._local_lock = threading.Lock()   # adapt() runs on the learning loop's thread
        self._last_local = None   # the request-local version the last proposal used alone, if one
        self._recent: Dict[int, object] = {}  # version -> snapshot, the last RECENT_VERSIONS drafted with

    # ---- weights ----------------------------------------------------------------

    def push(self, weights: Dict[str, np.ndarray], metric: Optional[float] = None) -> int:
        """Pushes a new weight version (see :meth:`DraftHead.export`); returns
        its number. A bad push raises and the live version keeps serving."""
        return self.native.push(weights, metric)

    @property
    def version(self) -> int:
        return self.native.version

    @property
    def history(self) -> list:
        return self.native.history

    def adapt(self, rid, weights: Dict[str, np.ndarray], base_version: int) -> bool:
        """Drafts request ``rid``, from its next step on, with version
        ``base_version`` with the tensors that ``weights`` names replaced
        (float32 arrays by name, e.g.
        :func:`atlas.learning.adapt.adapt_to_prompt`'s), when ``rid`` is
        being served and that version (the one the weights were fitted from)
        is the live one or one of the ``RECENT_VERSIONS`` it drafted with
        last; returns whether it did. Any thread. Bad weights raise
        ValueError and change nothing."""
        if not isinstance(base_version, (int, np.integer)) or isinstance(base_version, bool):
            raise TypeError(f"base_version must be an int, got {base_version!r}")
        snap = self.native.snapshot()
        if snap is None:
            return False
        if snap.version != base_version:
            snap = self._recent.get(int(base_version))
            if snap is None:
                return False
        local = snap.derive(weights)
        with self._local_lock:
            if rid not in self._feature:
                return False
            self._local[rid] = local
        return True

    @property
    def adapted_requests(self) -> int:
        """Requests being served with a request-local version."""
        return len(self._local)

    # ---- request lifecycle -----------------------------------------------------------

    def start(self, rid, prompt):
        self._feature[rid] = None

    def finish(self, rid):
        with self._local_lock:
            self._feature.pop(rid, None)
            self._local.pop(rid, None)

    def after_forward(self) -> None:
        self._drafted = ((self._drafted << 1) | self._drafting) & ((1 << PREFETCH_RECENT) - 1)
        self._drafting = False
        if self.prefetch and bin(self._drafted).count("1") >= PREFETCH_MIN_DRAFTS:
            try:
                # The version the last proposal drafted with alone when it
                # was a request's own, else the live one.
                warm = self._last_local
                warm.prefetch() if warm is not None else self.native.prefetch()
            except RuntimeError as e:   # no thread to be had: drafting goes on, from memory
                log.warning("cache warm-up of the draft head turned off: %s", e)
                self.prefetch = False

    def observe(self, record) -> None:
        rows, rids = [], []
        for b, rid in enumerate(record.rids):
            if rid not in self._feature:
                continue
            if record.prefill:
                rows.append(int(record.q_offsets[b + 1]) - 1)
            else:
                acc = record.accepted[b]
                rows.append(int(record.q_offsets[b]) + (int(acc[-1]) if len(acc) else 0))
            rids.append(rid)
        if not rows:
            return
        feats = record.hidden_rows(rows)
        for i, rid in enumerate(rids):
            self._feature[rid] = feats[i]

    # ---- drafting ------------------------------------------------------------------------

    def propose(self, rids, contexts, trees, proposer):
        snap = self.native.snapshot()
        if snap is None:
            return
        if snap.version not in self._recent:   # (a fit from it may still arrive after a push)
            recent = dict(self._recent)
            recent[snap.version] = snap
            while len(recent) > RECENT_VERSIONS:
                del recent[min(recent)]
            self._recent = recent   # replaced whole: adapt() reads it from another thread
        jobs, budgets = [], []
        for b, rid in enumerate(rids):
            budget = trees[b].max_nodes - len(trees[b])
            if self._feature.get(rid) is not None and budget > 0:
                jobs.append(b)
                # (the native loop takes budgets up to 2^16 nodes, far past any verified tree)
                budgets.append(min(budget, 1 << 16))
        if not jobs:
            return
        self._drafting = True
        # The native loop (atlas/head.h: HeadDraftJob): one head forward per
        # depth for every request, best-first on path probability; a request
        # with a version of its own (adapt) drafts in a call of its own.
        local = dict(self._local) if self._local else {}   # adapt() may add one meanwhile
        shared = [i for i, b in enumerate(jobs) if rids[b] not in local]
        self._last_local = local[rids[jobs[0]]] if not shared and len(jobs) == 1 else None
        if shared:
            self._draft(snap, [jobs[i] for i in shared], [budgets[i] for i in shared], rids, contexts, trees,
                        proposer)
        for i, b in enumerate(jobs):
            if rids[b] in local:
                self._draft(local[rids[b]], [b], [budgets[i]], rids, contexts, trees, proposer)

    def _draft(self, snap, jobs, budgets, rids, contexts, trees, proposer):
        feats = np.stack([self._feature[rids[b]] for b in jobs]).astype(np.float32, copy=False)
        toks = np.array([int(contexts[b][-1]) for b in jobs], np.int32)
        budgets = np.array(budgets, np.int32)
        floors = np.array([max(self.min_path_prob, float(getattr(trees[b], "min_path_prob", 0.0))) for b in jobs])
        offsets, parents, tokens, probs = snap.draft(feats, toks, budgets, floors, self.topk, self.width,
                                                     self.max_depth)
        parents, tokens, probs = parents.tolist(), tokens.tolist(), probs.tolist()
        for i, b in enumerate(jobs):
            tree = trees[b]
            node = []   # tree index of each kept candidate (-1: not placed)
            for c in range(int(offsets[i]), int(offsets[i + 1])):
                par = parents[c]
                at = 0 if par < 0 else node[par]
                node.append(tree.add_child(at, tokens[c], probs[c], proposer) if at >= 0 else -1)
