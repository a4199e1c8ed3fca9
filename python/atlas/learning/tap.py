"""The learning tap: training examples from what the target computed.

The tap is an engine observer (``Engine(..., observers=[...])``): after every
target forward it turns the :class:`atlas.engine.StepRecord` into examples for
the draft head, accepted and rejected tree nodes alike (the target computed a
correct distribution at every node it verified, whichever branch won).
(Measured once in bench_atlas.py's stream: with the accepted paths' nodes
alone the adaptive head reached 0.477 depth-1 acceptance on the unseen
requests in 480 steps, against 0.491 in 574 with every node.)

Vocabulary (see :mod:`atlas.learning.head` for *feature*):

* **example**: one verified node i, as the head would have drafted it. Inputs:
  the *parent feature* ``[H]`` and the node's token. Targets: the target's
  next-token distribution at i, kept as its k largest logits and their token
  ids (the trainer needs the distribution only up to a constant factor: it
  renormalises it over the tokens the head can draft), and the node's own
  feature ``[H]`` (what the head's ``f_hat`` predicts).
* **parent feature**: the feature at the position of i's parent. Inside a tree
  it is the parent node's row. For a tree root it is the feature of the
  previous step's last accepted node of that request (that step's root when
  nothing was accepted: the bonus token, which becomes the new root, follows
  it), and after a prefill the last prompt token's; the tap tracks it per
  request.
* **parent link** (``parent_back``): how many examples earlier the tap emitted
  the example of i's parent node, 0 when there is none (a root after a
  prefill, or a root whose parent's example was not emitted). The trainer uses
  it to feed the head its own prediction of the parent feature, as drafting
  does below depth 1.

A prefill's record holds logits for each prompt's last row only, so by
default a prefill gives one example per request (its last prompt token, when
the prompt has two tokens or more). With ``prompt_examples=True`` (the
learning loop's choice) every prompt token after the first becomes an
example, and the rows other than the last carry no targets yet: their
``topk_ids`` are -1 and their ``topk_logits`` -inf, and
:meth:`atlas.learning.trainer.Trainer.add_examples` computes them, on the
trainer's side, from the node's feature and the target's LM head rows of the
draft vocabulary (:func:`atlas.learning.trainer.fill_targets`). Why: prompts
are text of the served domain that the target has already run through, so
their examples cost serving only a gather of hidden rows. Measured in a
simulation of the stream (teacher-forced outputs of HumanEval requests 0-122
fed in order, 600 steps of 128 examples, depth-1 greedy acceptance on the
other 41 requests' outputs): 0.482 from the outputs' examples alone, 0.502
with the prompts' too (the static head: 0.392). The tap also counts the
tokens of committed traffic (prompts and emitted tokens) for the choice of
the draft vocabulary.

Cost: one native top-k pass over the step's logits rows
(:func:`atlas.verify.top_k_logits`: logits, no exponentials), one gather of
hidden rows, and a few numpy operations per request. Measured on SmolLM2-135M's
records of HumanEval requests (7.3 rows each, one thread, in isolation):
0.25 ms a record, against 0.53 when the tap kept probabilities (a pass of
exponentials more, over a copy of the rows). In full atlas (HumanEval
requests 123-140, 2 cores, the engine's work between forwards on one
thread), the learning loop's ``observe`` took 0.43 ms a step with the trainer
process stopped and 0.90 ms while it trained beside it, against 0.91 and 1.76
ms with the probabilities. The gather reads a float32 CPU tensor through
numpy (:meth:`atlas.engine.StepRecord.hidden_rows`): in full atlas with
learning on (HumanEval requests 124-139), ``Tap.observe`` took 0.39 ms a
step, against 0.52 through torch's indexing. Handing a batch to the trainer
process costs mostly per hand-over, not per byte (see ``flush_rows``; the
learning loop gathers a few steps' examples per batch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..verify import top_k_logits

# A request the tap has not seen for this many records is over (observers get
# no finish call); its tracked feature is dropped. An active request takes part
# in every decode step, so it is never idle for more than a step or two.
MAX_IDLE_RECORDS = 256


@dataclass
class Examples:
    """A batch of n examples (see the module docstring)."""

    parent_feature: np.ndarray  # [n, H] float32
    token: np.ndarray           # [n] int32, the node's token
    topk_ids: np.ndarray        # [n, k] int32, the target's k most probable next tokens at the node
    topk_logits: np.ndarray     # [n, k] float32, their logits (descending)
    feature: np.ndarray         # [n, H] float32, the node's own feature
    parent_back: np.ndarray     # [n] int64, examples back to the parent node's example, 0 = none

    def __len__(self) -> int:
        return int(self.token.shape[0])

    def missing_targets(self) -> np.ndarray:
        """[n] bool: the rows whose targets are still to be computed (a prompt
        row of ``Tap(prompt_examples=True)``: ``topk_ids`` all -1)."""
        return (self.topk_ids < 0).all(axis=1) if self.topk_ids.size else np.zeros(len(self), bool)

    def rows(self, lo: int, hi: int) -> "Examples":
        """Examples lo to hi - 1 (views; parent links that point before lo
        are for the caller to mind)."""
        return Examples(*(getattr(self, f)[lo:hi] for f in Examples.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> "Examples":
        """The examples at the given indices (copies; parent links are for the
        caller to mind)."""
        return Examples(*(getattr(self, f)[idx] for f in Examples.__dataclass_fields__))

    @staticmethod
    def concat(batches: List["Examples"]) -> "Examples":
        """One batch of the given batches' examples, in order (their parent
        links count examples back, so they hold across the joins)."""
        if len(batches) == 1:
            return batches[0]
        return Examples(*(np.concatenate([getattr(b, f) for b in batches]) for f in Examples.__dataclass_fields__))

    @staticmethod
    def empty(hidden: int, k: int) -> "Examples":
        return Examples(np.zeros((0, hidden), np.float32), np.zeros(0, np.int32), np.zeros((0, k), np.int32),
                        np.zeros((0, k), np.float32), np.zeros((0, hidden), np.float32),
                        np.zeros(0, np.int64))


def topk_logits(logits: torch.Tensor, k: int):
    """logits ``[n, vocab]`` -> (ids ``[n, k]`` int32, logits ``[n, k]``
    float32): the k largest logits of each row, descending, and their token
    ids. On the CPU equal logits come in ascending id, so ``ids[:, 0]`` is the
    token greedy verification takes; torch's order of ties elsewhere.

    CPU float32 and bfloat16 rows go through :func:`atlas.verify.top_k_logits`
    (one thread, no exponentials); other rows through torch, on their device.
    A row holding NaN or +inf, or only -inf, raises ValueError."""
    k = min(int(k), logits.shape[-1])
    logits = logits.detach()
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() == 2:
        return top_k_logits(logits if logits.stride(-1) == 1 else logits.contiguous(), k)
    logits = logits.float()
    if not bool(torch.isfinite(logits.max(dim=-1).values).all()):   # NaN and +inf propagate to the max
        raise ValueError("logits hold NaN or +inf, or a row is all -inf")
    vals, ids = torch.topk(logits, k, dim=-1)
    return ids.to(torch.int32).cpu().numpy(), vals.cpu().numpy()


@dataclass
class _RequestState:
    feature: np.ndarray      # [H] float32: the next root's parent feature
    example: int             # id of that node's example, -1 if none was emitted
    seen: int                # the record counter when last seen


class Tap:
    """Turns StepRecords into :class:`Examples` and hands each batch to
    ``sink`` (e.g. :meth:`atlas.learning.replay.ReplayBuffer.add`).

    ``vocab`` sizes the token counts; ``topk`` is how many of the target's most
    probable next tokens each example keeps (16 to 32 covers nearly all of the
    probability mass of a confident target at a few hundred bytes).
    ``prompt_examples``: also emit every prompt token of a prefill, without
    targets (see the module docstring); their consumer must compute them
    (:meth:`atlas.learning.trainer.Trainer.add_examples`), and a
    :class:`~atlas.learning.replay.ReplayBuffer` refuses them.
    ``flush_rows``: hand the sink the examples of several records at once,
    as soon as at least this many wait (0: each record's at once);
    :meth:`flush` hands over what waits.
    ``prompt_sink(rid, examples)``: with ``prompt_examples``, a prefill's
    examples go there instead, one call per request with its prompt's
    examples (for request-local adaptation, :mod:`atlas.learning.adapt`),
    after what waited was handed to ``sink``.
    """

    def __init__(self, vocab: int, topk: int = 16, sink: Optional[Callable[[Examples], None]] = None,
                 prompt_examples: bool = False, flush_rows: int = 0,
                 prompt_sink: Optional[Callable[[int, Examples], None]] = None):
        if not isinstance(vocab, (int, np.integer)) or isinstance(vocab, bool) or vocab < 1:
            raise ValueError(f"vocab must be a positive int, got {vocab!r}")
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= vocab:
            raise ValueError(f"topk must be an int in [1, vocab], got {topk!r}")
        if not isinstance(prompt_examples, bool):
            raise ValueError(f"prompt_examples must be a bool, got {prompt_examples!r}")
        if not isinstance(flush_rows, int) or isinstance(flush_rows, bool) or flush_rows < 0:
            raise ValueError(f"flush_rows must be an int >= 0, got {flush_rows!r}")
        self.flush_rows = flush_rows
        self._waiting: List[Examples] = []   # batches not yet handed to the sink (flush_rows)
        self._waiting_rows = 0
        self.vocab, self.topk, self.sink = int(vocab), topk, sink
        self.prompt_examples = prompt_examples
        if prompt_sink is not None and not prompt_examples:
            raise ValueError("prompt_sink needs prompt_examples=True (a prefill gives one example per request "
                             "without them)")
        self.prompt_sink = prompt_sink
        self.counts = np.zeros(vocab, np.int64)   # [vocab] tokens of committed traffic
        self.examples = 0                         # examples emitted so far (the next example's id)
        self.records = 0                          # records observed
        self.seconds = 0.0                        # wall time spent in observe
        self._state: Dict[int, _RequestState] = {}

    def observe(self, record) -> None:
        t0 = time.perf_counter()
        ex = self.examples_of(record)
        if self.prompt_sink is not None and record.prefill:
            self.flush()
            q = np.asarray(record.q_offsets, np.int64)
            at = 0
            for b, rid in enumerate(record.rids):
                n = max(int(q[b + 1] - q[b]) - 1, 0)   # every prompt token but the first (examples_of)
                if n:
                    self.prompt_sink(rid, ex.rows(at, at + n))
                at += n
        elif self.sink is not None and len(ex):
            self._waiting.append(ex)
            self._waiting_rows += len(ex)
            if self._waiting_rows >= self.flush_rows:
                self.flush()
        self.seconds += time.perf_counter() - t0

    @property
    def waiting(self) -> int:
        """Examples emitted but not yet handed to the sink (``flush_rows``)."""
        return self._waiting_rows

    def flush(self) -> None:
        """Hands the waiting examples to the sink, as one batch."""
        if not self._waiting:
            return
        batch = Examples.concat(self._waiting)
        self._waiting, self._waiting_rows = [], 0
        self.sink(batch)

    def forget(self, rid: int) -> None:
        """Drops a request's tracked feature (it is over)."""
        self._state.pop(rid, None)

    # ---- the work ------------------------------------------------------------------

    def examples_of(self, record) -> Examples:
        """The examples of one record; updates the tracked features and the
        token counts."""
        self.records += 1
        q = np.asarray(record.q_offsets, np.int64)
        tokens = np.asarray(record.tokens)
        parents = np.asarray(record.parents)
        # Per example: the hidden row of the node, of its parent (-1: the parent
        # feature comes from ``external``), the logits row, the link.
        node_rows: List[np.ndarray] = []
        parent_rows: List[np.ndarray] = []
        logit_rows: List[np.ndarray] = []
        ids: List[np.ndarray] = []          # example id of each example
        parent_ids: List[np.ndarray] = []   # example id of its parent's example, -1 none
        external: List[np.ndarray] = []     # parent features of roots, in order of the -1 rows
        tracked = []                        # (rid, hidden row, example id) to track after this record
        next_id = self.examples
        counts, vocab = self.counts, self.vocab
        for b, rid in enumerate(record.rids):
            lo, hi = int(q[b]), int(q[b + 1])
            if record.prefill:
                np.add.at(self.counts, tokens[lo:hi].astype(np.int64) % self.vocab, 1)
                ex_id = -1
                if hi - lo >= 2:
                    # The prompt's last token (its logits row is b), and with
                    # prompt_examples every earlier one but the first (no
                    # logits row: -1), each the parent of the next.
                    first = lo + 1 if self.prompt_examples else hi - 1
                    rows = np.arange(first, hi)
                    node_rows.append(rows)
                    parent_rows.append(rows - 1)
                    lrows = np.full(len(rows), -1, np.int64)
                    lrows[-1] = b
                    logit_rows.append(lrows)
                    ids.append(next_id + np.arange(len(rows)))
                    parent_ids.append(np.concatenate([[-1], next_id + np.arange(len(rows) - 1)]))
                    next_id += len(rows)
                    ex_id = next_id - 1
                tracked.append((rid, hi - 1, ex_id))
            else:
                n = hi - lo
                state = self._state.get(rid)
                # Example ids of the nodes of this tree (-1: not emitted).
                node_id = np.full(n, -1, np.int64)
                if state is not None:
                    node_id[0] = next_id
                    external.append(state.feature)
                    next_id += 1
                node_id[1:] = next_id + np.arange(n - 1)
                next_id += n - 1
                first = 0 if state is not None else 1
                rows = np.arange(lo + first, hi)
                node_rows.append(rows)
                local_par = parents[lo + first:hi].astype(np.int64)
                par_rows = lo + local_par
                par_rows[local_par < 0] = -1  # the root: external feature
                parent_rows.append(par_rows)
                logit_rows.append(rows)
                ids.append(node_id[first:])
                par_ids = np.where(local_par >= 0, node_id[np.maximum(local_par, 0)], -1)
                if state is not None:
                    par_ids[0] = state.example
                parent_ids.append(par_ids)
                acc = record.accepted[b]
                last = int(acc[-1]) if len(acc) else 0
                tracked.append((rid, lo + last, int(node_id[last])))
            for t in record.emitted[b]:   # a few tokens: faster one by one than through np.add.at
                counts[int(t) % vocab] += 1

        hidden = record.hidden
        k = self.topk
        if node_rows:
            node_rows_a = np.concatenate(node_rows)
            parent_rows_a = np.concatenate(parent_rows)
            logit_rows_a = np.concatenate(logit_rows)
        else:
            node_rows_a = parent_rows_a = logit_rows_a = np.zeros(0, np.int64)
        n_ex = len(node_rows_a)
        # One gather of every hidden row the examples and the tracking need.
        want = np.concatenate([node_rows_a, np.maximum(parent_rows_a, 0),
                               np.array([r for _, r, _ in tracked], np.int64)])
        gathered = record.hidden_rows(want)
        feats = gathered[:n_ex]
        par_feats = gathered[n_ex:2 * n_ex].copy()
        if external:
            par_feats[parent_rows_a < 0] = np.stack(external)
        track_feats = gathered[2 * n_ex:]

        if n_ex:
            top_ids, top_l = topk_logits(record.logits, k)   # every row: no copy of the selected ones
            rows_l = np.maximum(logit_rows_a, 0)
            top_ids, top_l = top_ids[rows_l], top_l[rows_l]
            if self.prompt_examples:
                missing = logit_rows_a < 0   # prompt rows: targets computed by the trainer
                top_ids[missing] = -1
                top_l[missing] = -np.inf
            ids_a = np.concatenate(ids)
            par_ids_a = np.concatenate(parent_ids)
            back = np.where(par_ids_a >= 0, ids_a - par_ids_a, 0).astype(np.int64)
            out = Examples(par_feats, tokens[node_rows_a].astype(np.int32), top_ids, top_l, feats, back)
        else:
            out = Examples.empty(hidden.shape[1], k)
        self.examples = next_id

        for i, (rid, _, ex_id) in enumerate(tracked):
            self._state[rid] = _RequestState(track_feats[i].copy(), ex_id, self.records)
        if self.records % 64 == 0:
            stale = [rid for rid, s in self._state.items() if self.records - s.seen > MAX_IDLE_RECORDS]
            for rid in stale:
                del self._state[rid]
        return out
