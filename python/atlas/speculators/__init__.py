"""Speculators: what proposes draft tokens.

A speculator sees every request's token sequence and adds candidate nodes to
that request's :class:`atlas.DraftTree` (whose root is the last emitted token),
each with a confidence in [0, 1] and the speculator's proposer id. The tree's
node budget caps what it may add. Its lifecycle per request (``rid`` is the
engine's request id): ``start`` -> (``propose`` -> ``update`` -> ``observe``)* -> ``finish``;
the prefill is followed by ``update`` and ``observe`` too. ``after_forward``
comes once per engine step (all requests together), right after the
target's forward.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Sequence

from ..tree import DraftTree


class Speculator(ABC):
    """Base class; a speculator implements ``propose`` and whatever else it needs."""

    name = "speculator"

    def start(self, rid: int, prompt: Sequence[int]) -> None:
        """A request begins with this prompt."""

    @abstractmethod
    def propose(self, rids: List[int], contexts: List[List[int]], trees: List[DraftTree],
                proposer: int) -> None:
        """Adds draft nodes to trees[i] for the request rids[i] whose tokens
        so far (prompt + generated, the root last) are contexts[i]."""

    def after_forward(self) -> None:
        """The target's forward of a serving step has just returned (before
        verification): a speculator may start preparing its next proposal in
        the background here (the learned one warms the CPU caches with its
        weights). It must return at once."""

    def update(self, rid: int, tokens: Sequence[int]) -> None:
        """Tokens just emitted for the request (it may learn from them)."""

    def observe(self, record) -> None:
        """What the target computed in the last forward (an
        :class:`atlas.engine.StepRecord`): hidden states, logits, accepted paths."""

    def finish(self, rid: int) -> None:
        """The request is over: drop its state."""


from .draft_model import DraftModelSpeculator  # noqa: E402
from .learned import LearnedSpeculator  # noqa: E402
from .suffix import SuffixSpeculator  # noqa: E402

__all__ = ["Speculator", "DraftModelSpeculator", "LearnedSpeculator", "SuffixSpeculator"]
