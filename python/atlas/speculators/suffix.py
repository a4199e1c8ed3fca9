"""The suffix speculator: model-free drafts from what followed earlier
occurrences of a request's latest tokens, in the request itself and in the
outputs of finished requests (a corpus bounded in tokens, oldest evicted
first). The index lives natively (``cpp/include/atlas/suffix.h`` states the
matching and counting rule): it keeps each request's tokens from ``start`` and
``update``, so a proposal never converts the request's context; it costs
microseconds per request.

A node's confidence is the empirical conditional frequency of its token after
its parent path among the matched occurrences, times the weight of the match
they share, Ls / (Ls + 1.5) for a match of Ls tokens (``kMatchPrior``,
atlas/suffix.h): a continuation seen after a 16-token match is accepted far
more often than one seen after a 4-token match (0.95 against 0.75 on
HumanEval), and the controller, which calibrates acceptance per confidence,
can only tell them apart this way.
"""
from __future__ import annotations

from typing import List, Sequence

from .. import _native
from ..tree import DraftTree
from . import Speculator


class SuffixSpeculator(Speculator):
    """``max_match``: longest suffix compared; ``max_depth``: deepest draft
    node; ``max_occurrences``: positions visited per proposal (newest first);
    ``min_support``: occurrences a match shorter than 4 tokens needs before it
    is preferred to a shorter, better supported one; ``max_corpus_tokens``:
    corpus size in token slots (a document takes its length + 1; 0 = no
    corpus); ``index_prompts``: finished requests add their prompt to the
    corpus too; ``min_prob``: path probability below which nothing is
    drafted; ``vocab_size`` (0 = unchecked) checks every token given."""

    name = "suffix"

    def __init__(self, max_match: int = 32, max_depth: int = 16, max_occurrences: int = 64,
                 min_support: int = 2, max_corpus_tokens: int = 1 << 17, index_prompts: bool = False,
                 min_prob: float = 0.0, vocab_size: int = 0):
        self.native = _native.SuffixSpeculator(max_match, max_depth, max_occurrences, min_support,
                                               max_corpus_tokens, index_prompts, vocab_size, float(min_prob))

    def start(self, rid: int, prompt: Sequence[int]) -> None:
        self.native.start(rid, prompt)

    def update(self, rid: int, tokens: Sequence[int]) -> None:
        self.native.extend(rid, tokens)

    def propose(self, rids: List[int], contexts: List[List[int]], trees: List[DraftTree],
                proposer: int) -> None:
        if not len(rids) == len(contexts) == len(trees):
            raise ValueError(f"rids, contexts and trees must have one entry per request, got lengths "
                             f"{len(rids)}, {len(contexts)}, {len(trees)}")
        for rid, ctx, tree in zip(rids, contexts, trees):
            # Only the context's length crosses: a check that no update was missed.
            self.native.propose(rid, tree, proposer, len(ctx))

    def finish(self, rid: int) -> None:
        # The engine also finishes requests that failed before start(): nothing to drop.
        if self.native.is_live(rid):
            self.native.finish(rid)

    def add_document(self, tokens: Sequence[int]) -> None:
        """Adds a text (token ids) to the corpus, e.g. earlier traffic."""
        self.native.add_document(tokens)

    def memory_bytes(self) -> int:
        return self.native.memory_bytes()

    def corpus_tokens(self) -> int:
        return self.native.corpus_tokens()

    def stats(self) -> dict:
        return self.native.stats()
