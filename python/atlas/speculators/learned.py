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
most probable children, all requests in one native forward call per depth;
then it keeps the ``max_nodes - len(tree)`` most probable candidates. A
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
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .. import _native
from ..verify import top_k_probs
from . import Speculator


def _top_probs(logits: np.ndarray, k: int):
    """Per row of ``logits`` ``[n, V]``: the k largest softmax probabilities,
    descending, and their columns, as lists (:func:`atlas.verify.top_k_probs`).
    Not torch: this runs on the serving thread between target forwards, while
    a trainer process may hold the other cores, and torch's multi-threaded
    reductions wait on preempted threads there (measured with the float32
    head: drafting 5.0 -> 9.7 ms per step beside a busy child process,
    unchanged single-threaded)."""
    cols, probs = top_k_probs(logits, k)
    return probs.tolist(), cols.tolist()


class LearnedSpeculator(Speculator):
    """Drafts with a learned head. ``head`` is an
    :class:`atlas.learning.head.DraftHead`: its configuration and frozen
    embedding define the native head, and its current weights become version 1.
    ``max_depth`` caps a draft's length; ``topk`` children are considered per
    expanded node and ``width`` nodes are expanded per depth; candidates whose
    path probability is below ``min_path_prob`` are not drafted."""

    name = "learned"

    def __init__(self, head, *, max_depth: int = 6, topk: int = 4, width: int = 4,
                 min_path_prob: float = 0.0):
        for arg, v in (("max_depth", max_depth), ("topk", topk), ("width", width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if not 0.0 <= float(min_path_prob) < 1.0:
            raise ValueError(f"min_path_prob must be in [0, 1), got {min_path_prob}")
        self.max_depth, self.topk, self.width = max_depth, topk, width
        self.min_path_prob = float(min_path_prob)
        self.hidden = int(head.hidden)
        # The native head reads this float32 table in place and keeps it alive
        # (no copy when the head's table is already float32 in CPU memory).
        embed = head.embed.detach().to("cpu", torch.float32).contiguous().numpy()
        self.native = _native.DraftHead(embed, head.hidden, head.intermediate, head.draft_vocab, head.eps)
        self.native.push(head.export())
        self._feature: Dict[int, Optional[np.ndarray]] = {}  # rid -> [H] float32, None until observed
        self._ids_version = -1
        self._ids = np.zeros(0, np.int64)

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

    # ---- request lifecycle -----------------------------------------------------------

    def start(self, rid, prompt):
        self._feature[rid] = None

    def finish(self, rid):
        self._feature.pop(rid, None)

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
        rows = torch.as_tensor(rows, dtype=torch.long)
        feats = record.hidden[rows].detach().to(torch.float32).cpu().numpy()
        for i, rid in enumerate(rids):
            self._feature[rid] = feats[i].copy()

    # ---- drafting ------------------------------------------------------------------------

    def _draft_ids(self, snap) -> np.ndarray:
        if snap.version != self._ids_version:
            self._ids = snap.draft_ids.astype(np.int64)
            self._ids_version = snap.version
        return self._ids

    def propose(self, rids, contexts, trees, proposer):
        snap = self.native.snapshot()
        if snap is None:
            return
        ids = self._draft_ids(snap)
        # Per tree: candidates as parallel lists (path prob, conditional prob,
        # token, parent candidate or -1 for the root), and its budget.
        jobs = []
        for b, rid in enumerate(rids):
            feat = self._feature.get(rid)
            budget = trees[b].max_nodes - len(trees[b])
            if feat is not None and budget > 0:
                jobs.append(dict(b=b, budget=budget, path=[], cond=[], token=[], parent=[],
                                 floor=max(self.min_path_prob, float(getattr(trees[b], "min_path_prob", 0.0)))))
        if not jobs:
            return
        # The frontier: (job, candidate or -1 for the root, its path prob), and the
        # inputs of its forward rows.
        frontier = [(j, -1, 1.0) for j in range(len(jobs))]
        feats = np.stack([self._feature[rids[job["b"]]] for job in jobs]).astype(np.float32, copy=False)
        toks = np.array([int(contexts[job["b"]][-1]) for job in jobs], np.int32)
        for depth in range(self.max_depth):
            n = len(frontier)
            f_hat = np.empty((n, self.hidden), np.float32)
            logits = np.empty((n, len(ids)), np.float32)
            snap.forward(np.ascontiguousarray(feats), toks, f_hat, logits)
            top_p, top_j = _top_probs(logits, min(self.topk, len(ids)))
            new = {}  # job -> [(candidate, row of its parent's f_hat)]
            for row, (j, cand, pp) in enumerate(frontier):
                job = jobs[j]
                for p, col in zip(top_p[row][:job["budget"]], top_j[row][:job["budget"]]):
                    path = pp * p
                    if path <= 0.0 or (depth and path < job["floor"]):
                        break   # top_p is descending
                    job["path"].append(path)
                    job["cond"].append(min(max(p, 0.0), 1.0))
                    job["token"].append(int(ids[col]))
                    job["parent"].append(cand)
                    new.setdefault(j, []).append((len(job["path"]) - 1, row))
            if depth + 1 == self.max_depth:
                break
            frontier, rows = [], []
            for j, cands in new.items():
                job = jobs[j]
                paths = job["path"]
                # A child of a node with path prob P has path prob <= P: expand
                # only nodes above the budget-th best candidate so far.
                cut = sorted(paths, reverse=True)[job["budget"] - 1] if len(paths) >= job["budget"] else -1.0
                best = sorted(cands, key=lambda c: -paths[c[0]])[:min(self.width, job["budget"])]
                for c, row in best:
                    if paths[c] > cut and paths[c] >= job["floor"]:
                        frontier.append((j, c, paths[c]))
                        rows.append(row)
            if not frontier:
                break
            feats = f_hat[rows]
            toks = np.array([jobs[j]["token"][c] for j, c, _ in frontier], np.int32)
        for job in jobs:
            self._place(trees[job["b"]], job, proposer)

    @staticmethod
    def _place(tree, job, proposer) -> None:
        """Adds the budget most probable candidates. Sorting by (-path prob,
        creation order) puts every parent before its children (a child is never
        more probable and is created later), so the kept set is closed under
        parents and can be added in creation order."""
        paths = job["path"]
        keep = sorted(range(len(paths)), key=lambda c: (-paths[c], c))[:job["budget"]]
        node = {-1: 0}
        for c in sorted(keep):
            parent = node.get(job["parent"][c])
            if parent is None:
                continue
            idx = tree.add_child(parent, job["token"][c], job["cond"][c], proposer)
            if idx >= 0:
                node[c] = idx
