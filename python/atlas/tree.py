"""Draft trees: the candidates that speculators propose, merged into a trie.

See ``cpp/include/atlas/tree.h`` for the vocabulary (root, node, depth,
confidence, proposers, multiplicity, committed_len). Node 0 is the root, the
last committed token; nodes are in topological order (parent < child).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import _native


@dataclass
class FlatTree:
    """The arrays the target forward takes for one tree of n nodes."""

    tokens: np.ndarray         # [n] int32
    positions: np.ndarray      # [n] int64, committed_len + depth
    parents: np.ndarray        # [n] int32, -1 at the root
    ancestor_mask: np.ndarray  # [n, n] bool, [i, j] = j is i or an ancestor of i


def _ids(x, name: str, dtype=np.int32) -> np.ndarray:
    """``x`` as a contiguous integer array of ``dtype`` (an empty one as
    int32), checked to hold integers that fit it; an array already of
    ``dtype`` skips the range check. (The verifier's arguments too.)"""
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int32)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype != dtype:
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise ValueError(f"{name} holds values outside the range of {np.dtype(dtype).name}")
    return np.ascontiguousarray(arr, dtype=dtype)


class DraftTree(_native.DraftTree):
    """A draft tree with a node budget (``max_nodes`` counts the root).

    ``add_path`` and ``add_child`` merge shared prefixes; once the budget is
    reached, further nodes are left out (``add_child`` returns -1,
    ``add_path`` reports how many tokens it placed). With ``vocab_size > 0``
    every token is checked against ``[0, vocab_size)``.

    ``min_path_prob``: the engine's hint (from its controller) that a node
    below depth 1 whose path probability, the product of its proposer's own
    confidences from the root, is below it would probably not be verified
    this step; a speculator that pays for each depth it drafts may leave
    those out.
    """

    def __init__(self, root_token: int, max_nodes: int = 64, vocab_size: int = 0, min_path_prob: float = 0.0):
        if isinstance(min_path_prob, bool) or not isinstance(min_path_prob, (int, float)) \
                or not 0.0 <= min_path_prob < 1.0:
            raise ValueError(f"min_path_prob must be in [0, 1), got {min_path_prob!r}")
        super().__init__(root_token, max_nodes, vocab_size)
        self.min_path_prob = float(min_path_prob)

    def add_path(self, tokens: Sequence[int], confidences: Optional[Sequence[float]] = None,
                 proposer: int = 0, parent: int = 0) -> tuple[int, int]:
        """Adds a chain below ``parent``; returns ``(placed, last_node)``."""
        conf = None if confidences is None else np.ascontiguousarray(confidences, dtype=np.float32)
        return super().add_path(_ids(tokens, "tokens"), conf, proposer, parent)

    @classmethod
    def from_arrays(cls, tokens: Sequence[int], parents: Sequence[int],
                    confidences: Optional[Sequence[float]] = None,
                    proposers: Optional[Sequence[int]] = None,
                    max_nodes: Optional[int] = None, vocab_size: int = 0) -> "DraftTree":
        """Builds a tree from explicit arrays: ``parents[0] == -1``, ``parents[i] < i``."""
        tok = _ids(tokens, "tokens")
        if tok.ndim != 1 or tok.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence (the root at least)")
        tree = cls(int(tok[0]), max_nodes or max(int(tok.size), 1), vocab_size)
        conf = None if confidences is None else np.ascontiguousarray(confidences, dtype=np.float32)
        prop = None if proposers is None else _ids(proposers, "proposers")
        tree.assign(tok, _ids(parents, "parents"), conf, prop, tree.max_nodes, vocab_size)
        return tree

    def flatten(self, committed_len: int) -> FlatTree:
        """Arrays for the verification forward; positions start at ``committed_len``."""
        n = self.size
        flat = FlatTree(np.empty(n, np.int32), np.empty(n, np.int64), np.empty(n, np.int32),
                        np.empty((n, n), np.bool_))
        self.flatten_into(committed_len, flat.tokens, flat.positions, flat.parents, flat.ancestor_mask)
        return flat
