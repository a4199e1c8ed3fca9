"""The replay buffer: a bounded, preallocated store of tapped examples.

Memory: every array is allocated once, at construction, for ``capacity``
examples; :meth:`ReplayBuffer.bytes_per_example` says what one costs (features
in float16: ``4H + 8k + 20`` bytes, about 2.4 KB for SmolLM2's H = 576 and
k = 16). The capacity is the smaller of ``capacity`` and what fits in
``max_bytes``.

Vocabulary:

* **sequence number**: the i-th example ever added has number i; it lives in
  slot ``i % capacity`` until example ``i + capacity`` overwrites it (the ring
  evicts the oldest first);
* **held-out slice**: the most recent ``min(held_out, held_out_fraction *
  size)`` examples, never sampled for training, so that the trainer evaluates
  on recent traffic it has not fitted. The slice moves forward as traffic
  arrives: an example leaves it only to become training data, so nothing in
  the slice was ever trained on;
* **age** of a training example: how many training examples are newer.
  Sampling favours recent traffic: P(age a) is proportional to
  ``2 ** (-a / half_life)`` (default half-life: a quarter of the capacity, so
  the oldest examples of a full buffer are drawn 16 times less often than the
  newest; ``half_life=inf`` samples uniformly).

Thread safety: :meth:`add` (whichever thread receives examples: the serving
thread through the tap when the trainer is a thread, the trainer process's
receiving thread otherwise) and :meth:`sample` / :meth:`held_out_batch` (the
trainer) take one lock, each for a bounded copy of the rows it touches, never
for training work.

Features are stored in float16 (clamped to its range): half the memory, and the
head trains as well on them (a final-norm hidden state needs about three
significant digits).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .tap import Examples

log = logging.getLogger("atlas.learning")

_F16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Batch:
    """Examples as float32 / int64 torch tensors, ready for the head's loss.
    ``has_parent`` marks rows whose parent's example is still in the buffer;
    for those, ``parent_parent_feature`` and ``parent_token`` are the parent
    example's inputs (zeros elsewhere)."""

    parent_feature: torch.Tensor         # [n, H]
    token: torch.Tensor                  # [n]
    topk_ids: torch.Tensor               # [n, k]
    topk_logits: torch.Tensor            # [n, k]
    feature: torch.Tensor                # [n, H]
    has_parent: torch.Tensor             # [n] bool
    parent_parent_feature: torch.Tensor  # [n, H]
    parent_token: torch.Tensor           # [n]

    def __len__(self) -> int:
        return int(self.token.shape[0])


class ReplayBuffer:
    """Bounded ring of examples with recency-weighted sampling and a held-out
    slice of the newest traffic (see the module docstring)."""

    def __init__(self, hidden: int, topk: int, capacity: Optional[int] = None,
                 max_bytes: Optional[int] = 64 << 20, held_out: int = 512, held_out_fraction: float = 0.25,
                 half_life: Optional[float] = None):
        cap, half_life = self.plan(hidden, topk, capacity, max_bytes, held_out, held_out_fraction, half_life)
        self.hidden, self.topk, self.capacity = hidden, topk, cap
        self.held_out, self.held_out_fraction, self.half_life = held_out, held_out_fraction, half_life
        self.parent_feature = np.zeros((cap, hidden), np.float16)   # [C, H]
        self.feature = np.zeros((cap, hidden), np.float16)          # [C, H]
        self.token = np.zeros(cap, np.int32)                         # [C]
        self.topk_ids = np.zeros((cap, topk), np.int32)              # [C, k]
        self.topk_logits = np.zeros((cap, topk), np.float32)         # [C, k]
        self.parent = np.full(cap, -1, np.int64)                     # [C] the parent example's number
        self.total = 0        # examples ever added (the next sequence number)
        self._lock = threading.Lock()
        self._warned_full = False

    @classmethod
    def plan(cls, hidden: int, topk: int, capacity: Optional[int] = None, max_bytes: Optional[int] = 64 << 20,
             held_out: int = 512, held_out_fraction: float = 0.25, half_life: Optional[float] = None):
        """Checks the constructor's arguments without allocating anything;
        returns (capacity in examples, half-life in examples). Raises
        ValueError naming the argument that is wrong."""
        for name, v in (("hidden", hidden), ("topk", topk)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if capacity is None and max_bytes is None:
            raise ValueError("give capacity (examples) or max_bytes (or both)")
        per = cls.bytes_per_example(hidden, topk)
        cap = capacity if capacity is not None else max_bytes // per
        if max_bytes is not None:
            cap = min(cap, max_bytes // per)
        if not isinstance(cap, (int, np.integer)) or cap < 2:
            raise ValueError(f"the buffer must hold at least 2 examples: capacity {capacity!r}, max_bytes "
                             f"{max_bytes!r} at {per} bytes per example")
        if not isinstance(held_out, int) or held_out < 0:
            raise ValueError(f"held_out must be an int >= 0, got {held_out!r}")
        if not 0.0 <= held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        cap = int(cap)
        half_life = cap / 4 if half_life is None else float(half_life)
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        return cap, half_life

    @staticmethod
    def bytes_per_example(hidden: int, topk: int) -> int:
        return 2 * hidden * 2 + 4 + topk * (4 + 4) + 8

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.parent_feature, self.feature, self.token, self.topk_ids,
                                      self.topk_logits, self.parent))

    # ---- sizes -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Examples held."""
        return min(self.total, self.capacity)

    @property
    def full(self) -> bool:
        return self.total >= self.capacity

    @property
    def evicted(self) -> int:
        """Examples overwritten so far."""
        return max(0, self.total - self.capacity)

    def _split(self, total: int):
        """(training region [first, end), held-out size) for a total."""
        size = min(total, self.capacity)
        h = min(self.held_out, int(size * self.held_out_fraction))
        return total - size, total - h, h

    @property
    def held_out_size(self) -> int:
        return self._split(self.total)[2]

    @property
    def train_size(self) -> int:
        first, end, _ = self._split(self.total)
        return end - first

    def stats(self) -> dict:
        return dict(capacity=self.capacity, size=self.size, bytes=self.nbytes, added=self.total,
                    evicted=self.evicted, full=self.full, held_out=self.held_out_size, train=self.train_size)

    # ---- writing -------------------------------------------------------------------

    def add(self, ex: Examples) -> None:
        """Appends a batch; the oldest examples are overwritten when full."""
        n = len(ex)
        if n == 0:
            return
        if ex.parent_feature.shape != (n, self.hidden) or ex.feature.shape != (n, self.hidden):
            raise ValueError(f"features must have shape ({n}, {self.hidden})")
        if ex.topk_ids.shape != (n, self.topk) or ex.topk_logits.shape != (n, self.topk):
            raise ValueError(f"topk_ids and topk_logits must have shape ({n}, {self.topk})")
        if ex.missing_targets().any():
            raise ValueError("examples without targets (the prompt rows of Tap(prompt_examples=True)): pass "
                             "them through Trainer.add_examples, which computes them")
        skip = max(0, n - self.capacity)  # a batch larger than the ring keeps its newest rows
        with self._lock:
            seq = self.total + np.arange(skip, n, dtype=np.int64)
            slots = seq % self.capacity
            back = np.asarray(ex.parent_back[skip:], np.int64)
            self.parent_feature[slots] = np.clip(ex.parent_feature[skip:], -_F16_MAX, _F16_MAX)
            self.feature[slots] = np.clip(ex.feature[skip:], -_F16_MAX, _F16_MAX)
            self.token[slots] = ex.token[skip:]
            self.topk_ids[slots] = ex.topk_ids[skip:]
            self.topk_logits[slots] = ex.topk_logits[skip:]
            self.parent[slots] = np.where(back > 0, seq - back, -1)
            self.total += n
            full_now = self.total >= self.capacity and not self._warned_full
            if full_now:
                self._warned_full = True
        if full_now:
            log.info("replay buffer full at %d examples (%.1f MiB): evicting the oldest from now on",
                     self.capacity, self.nbytes / 2**20)

    # ---- reading -------------------------------------------------------------------

    def _gather(self, seq: np.ndarray, first: int) -> Batch:
        """Rows of the given sequence numbers (all held); lock held by the caller."""
        slots = seq % self.capacity
        par = self.parent[slots]
        has = (par >= first) & (par >= 0)
        pslots = np.where(has, par, 0) % self.capacity
        pf = self.parent_feature[pslots].astype(np.float32)
        pf[~has] = 0.0
        pt = np.where(has, self.token[pslots], 0)
        return Batch(torch.from_numpy(self.parent_feature[slots].astype(np.float32)),
                     torch.from_numpy(self.token[slots].astype(np.int64)),
                     torch.from_numpy(self.topk_ids[slots].astype(np.int64)),
                     torch.from_numpy(self.topk_logits[slots].copy()),
                     torch.from_numpy(self.feature[slots].astype(np.float32)),
                     torch.from_numpy(has), torch.from_numpy(pf), torch.from_numpy(pt.astype(np.int64)))

    def sample_ages(self, n: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` ages in [0, n) with P(a) proportional to 2^(-a / half_life):
        the inverse CDF of the exponential truncated to [0, n), floored."""
        if math.isinf(self.half_life):
            return rng.integers(0, n, count)
        lam = math.log(2.0) / self.half_life
        u = rng.random(count)
        ages = -np.log1p(-u * -np.expm1(-lam * n)) / lam
        return np.minimum(ages.astype(np.int64), n - 1)

    def sample(self, count: int, rng: np.random.Generator) -> Optional[Batch]:
        """``count`` training examples (with replacement), recency-weighted;
        None while the training region is empty."""
        with self._lock:
            first, end, _ = self._split(self.total)
            n = end - first
            if n <= 0:
                return None
            seq = end - 1 - self.sample_ages(n, count, rng)
            return self._gather(seq, first)

    def held_out_batch(self) -> Optional[Batch]:
        """The held-out slice, oldest first; None while it is empty."""
        with self._lock:
            first, end, h = self._split(self.total)
            if h == 0:
                return None
            return self._gather(np.arange(end, self.total, dtype=np.int64), first)
