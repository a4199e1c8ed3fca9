"""A draft-model speculator: a smaller causal LM with the target's tokenizer,
run through the same executor and a KV cache of its own.

Each step it drafts ``depth`` tokens greedily (deterministic drafts, so the
verifier's one-hot rule keeps sampling lossless) and, with ``branch > 1``, adds
the next most likely tokens at every depth as leaf alternatives: a top-k tree
for the cost of a chain. A node's confidence is the draft model's probability
of its token.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from . import Speculator


class DraftModelSpeculator(Speculator):
    name = "draft"

    def __init__(self, draft, depth: int = 4, branch: int = 1, max_batch: int = 8,
                 kv_cache_tokens: int | None = None, block_size: int = 16):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if not isinstance(branch, int) or branch < 1:
            raise ValueError(f"branch must be a positive int, got {branch!r}")
        self.draft = draft
        self.depth = depth
        self.branch = branch
        self.max_ctx = draft.config.max_position_embeddings
        if kv_cache_tokens is None:
            kv_cache_tokens = max_batch * min(self.max_ctx, 4096)
        self.cache = draft.new_cache(-(-kv_cache_tokens // block_size), block_size=block_size,
                                     max_seqs=max_batch)
        self._seq: Dict[int, int] = {}
        self._cached: Dict[int, List[int]] = {}  # tokens whose K/V the draft cache holds

    def start(self, rid, prompt):
        self._seq[rid] = self.cache.create()
        self._cached[rid] = []

    def finish(self, rid):
        seq = self._seq.pop(rid, None)
        if seq is not None:
            self.cache.release(seq)
        self._cached.pop(rid, None)

    def _forward(self, rids, feeds):
        """Feeds each request's new tokens as a chain; returns the draft's
        next-token probabilities after each feed's last token."""
        seqs = [self._seq[r] for r in rids]
        lens = [len(f) for f in feeds]
        slots = [self.cache.reserve(s, n) for s, n in zip(seqs, lens)]
        q_offsets = np.zeros(len(rids) + 1, np.int64)
        q_offsets[1:] = np.cumsum(lens)
        positions = np.concatenate([np.arange(len(self._cached[r]), len(self._cached[r]) + n, dtype=np.int64)
                                    for r, n in zip(rids, lens)])
        logits, _ = self.draft.forward(
            self.cache, np.array(seqs, np.int32), torch.tensor(np.concatenate(feeds), dtype=torch.long),
            torch.from_numpy(positions), np.concatenate([np.arange(-1, n - 1, dtype=np.int32) for n in lens]),
            q_offsets, torch.from_numpy(np.concatenate(slots)), logit_rows=torch.from_numpy(q_offsets[1:] - 1))
        for s, r, f in zip(seqs, rids, feeds):
            self.cache.commit(s)
            self._cached[r].extend(int(t) for t in f)
        return torch.softmax(logits.float(), dim=-1)

    def propose(self, rids, contexts, trees, proposer):
        # Bring each draft sequence in line with the request: keep the longest
        # common prefix (at most all but the root, whose logits we need), drop
        # the rest (rejected drafts of the last step), feed what is new.
        feeds = []
        for rid, ctx in zip(rids, contexts):
            cached = self._cached[rid]
            n = min(len(cached), len(ctx) - 1)
            common = 0
            while common < n and cached[common] == ctx[common]:
                common += 1
            if common < len(cached):
                self.cache.truncate(self._seq[rid], common)
                del cached[common:]
            feeds.append(ctx[common:])
        probs = self._forward(rids, feeds)
        nodes = [0] * len(rids)
        live = list(range(len(rids)))
        for d in range(self.depth):
            top_p, top_i = torch.topk(probs, min(self.branch, probs.shape[-1]), dim=-1)
            top_p, top_i = top_p.tolist(), top_i.tolist()
            next_live = []
            for row, b in enumerate(live):
                tree = trees[b]
                main = tree.add_child(nodes[b], top_i[row][0], min(top_p[row][0], 1.0), proposer)
                for alt in range(1, len(top_i[row])):
                    tree.add_child(nodes[b], top_i[row][alt], min(top_p[row][alt], 1.0), proposer)
                room = len(contexts[b]) + d + 1 < self.max_ctx
                if main >= 0 and room and d + 1 < self.depth:
                    nodes[b] = main
                    next_live.append(b)
            live = next_live
            if not live:
                break
            probs = self._forward([rids[b] for b in live], [[int(trees[b].tokens[nodes[b]])] for b in live])
