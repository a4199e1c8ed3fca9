"""The learning loop: tap + replay buffer + trainer + checkpoints, for one
adaptive :class:`~atlas.speculators.LearnedSpeculator`.

Use::

    spec = atlas.learning.load_static(target)          # or any LearnedSpeculator
    loop = atlas.learning.LearningLoop(target, spec)   # restores its last checkpoint
    engine = atlas.Engine(target, speculators=[spec], observers=[loop])
    loop.start()
    ... serve ...
    loop.stop()                                         # and checkpoints

The loop is the engine's observer: every forward's record goes through the
tap into the buffer (on the serving thread, cheaply); the trainer works in a
background thread and pushes better weights to ``speculator`` between steps.

Where the candidate starts, in order: the loop's last checkpoint
(``adaptive.npz``, which is also pushed to the speculator at once), else
``head`` when given (the :class:`DraftHead` the speculator was built from),
else the static head (``static.npz`` of :func:`atlas.learning.distill`), else
a fresh head on the speculator's draft vocabulary. A checkpoint that cannot be
read is reported with a warning naming the file and ignored.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import ADAPTIVE, STATIC, Checkpoint, head_config, load_checkpoint, model_dir, save_checkpoint
from .head import DraftHead
from .replay import ReplayBuffer
from .tap import Tap
from .trainer import Trainer

log = logging.getLogger("atlas.learning")


class LearningLoop:
    """Learns ``speculator``'s weights from the traffic ``target`` serves.

    ``head``: the :class:`DraftHead` the speculator was built from (optional;
    see the module docstring). ``cache_dir``: the checkpoint root (default
    ``$ATLAS_CACHE_DIR`` or ``~/.cache/atlas``); ``checkpoint=False`` neither
    reads nor writes checkpoints. ``topk``: the target probabilities kept per
    example. ``max_bytes`` / ``capacity`` / ``held_out`` / ``half_life``: the
    :class:`ReplayBuffer`'s. Every other keyword goes to the
    :class:`Trainer` (``lr``, ``batch_size``, ``steps_per_round``,
    ``threads``, ``nice``, ``max_share``, ``min_gain``, ...).
    """

    def __init__(self, target, speculator, *, head: Optional[DraftHead] = None, cache_dir=None,
                 checkpoint: bool = True, topk: int = 16, max_bytes: Optional[int] = 64 << 20,
                 capacity: Optional[int] = None, held_out: int = 512, held_out_fraction: float = 0.25,
                 half_life: Optional[float] = None, **trainer_kwargs):
        self.target, self.speculator = target, speculator
        nat = speculator.native
        if nat.hidden != target.config.hidden_size or nat.vocab != target.config.vocab_size:
            raise ValueError(f"the speculator's head (hidden {nat.hidden}, vocab {nat.vocab}) does not fit "
                             f"the target (hidden {target.config.hidden_size}, "
                             f"vocab {target.config.vocab_size})")
        self.dir: Optional[Path] = model_dir(target, cache_dir) if checkpoint else None
        expect = dict(hidden=nat.hidden, intermediate=nat.intermediate, draft_vocab=nat.draft_vocab,
                      vocab=nat.vocab)
        self.history: list = []       # pushes of this loop and of earlier runs (from the checkpoint)
        self.errors = 0               # tap and checkpoint errors (the trainer counts its own)
        self.last_error: Optional[str] = None
        self.restored: Optional[str] = None   # which checkpoint the candidate started from

        cand = DraftHead.from_target(target, np.arange(nat.draft_vocab), intermediate=nat.intermediate,
                                     eps=float(nat.eps))
        adaptive = load_checkpoint(self.dir / ADAPTIVE, expect) if self.dir else None
        self._live_weights = None     # what the speculator serves, when the loop knows it
        self._live_metric = None
        if adaptive is not None:
            cand.load_export(adaptive.weights)
            self.history = list(adaptive.history)
            speculator.push(adaptive.weights, adaptive.metric)
            self._live_weights, self._live_metric = adaptive.weights, adaptive.metric
            self.restored = str(self.dir / ADAPTIVE)
        elif head is not None:
            if (head.hidden, head.intermediate, head.draft_vocab) != (nat.hidden, nat.intermediate,
                                                                      nat.draft_vocab):
                raise ValueError("head does not match the speculator's native head (hidden, intermediate, "
                                 "draft_vocab)")
            cand.load_export(head.export())
        else:
            static = load_checkpoint(self.dir / STATIC, expect) if self.dir else None
            if static is not None:
                cand.load_export(static.weights)
                self.restored = str(self.dir / STATIC)
            else:
                snap = nat.snapshot()
                ids = snap.draft_ids if snap is not None else np.arange(nat.draft_vocab, dtype=np.int32)
                fresh = DraftHead.from_target(target, ids, intermediate=nat.intermediate, eps=float(nat.eps))
                cand.load_export(fresh.export())

        self.buffer = ReplayBuffer(nat.hidden, topk, capacity=capacity, max_bytes=max_bytes,
                                   held_out=held_out, held_out_fraction=held_out_fraction,
                                   half_life=half_life)
        self.tap = Tap(nat.vocab, topk, sink=self.buffer.add)
        self.trainer = Trainer(cand, self.buffer, speculator, lm_head=target.model.lm_head,
                               counts=lambda: self.tap.counts, on_push=self._on_push, **trainer_kwargs)

    # ---- the engine's observer ----------------------------------------------------------

    def observe(self, record) -> None:
        """Taps one forward. A tap failure is logged and counted, never raised
        into the serving step."""
        try:
            self.tap.observe(record)
        except Exception as e:  # noqa: BLE001
            self._error(f"tap failed: {type(e).__name__}: {e}")

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts (or restarts) the background trainer."""
        self.trainer.start()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Stops the trainer and writes a checkpoint of the live weights."""
        self.trainer.stop(timeout)
        self.save()

    def save(self) -> Optional[Path]:
        """Writes the live weights (the last the loop pushed) to the loop's
        checkpoint; returns its path (None if there is nothing to write or
        checkpoints are off)."""
        if self.dir is None or self._live_weights is None:
            return None
        path = self.dir / ADAPTIVE
        try:
            save_checkpoint(path, Checkpoint(self._live_weights, head_config(self.trainer.head),
                                             self.history, self._live_metric,
                                             dict(saved=time.time())))
        except OSError as e:
            self._error(f"checkpoint {path} not written: {e}")
            return None
        return path

    def _on_push(self, version: int, weights: dict, metric: float) -> None:
        self._live_weights, self._live_metric = weights, metric
        self.history.append(dict(version=int(version), metric=float(metric), time=time.time()))
        self.save()

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        log.warning("atlas learning: %s", msg)

    def stats(self) -> dict:
        """Examples seen, buffer fill, trainer counters, pushes, refusals, the
        last metrics, errors."""
        t = self.trainer.stats()
        b = self.buffer.stats()
        return dict(
            examples_seen=self.tap.examples, records=self.tap.records,
            tap_seconds=self.tap.seconds, buffer=b, buffer_fill=b["size"] / b["capacity"],
            state=t["state"], train_steps=t["train_steps"], rounds=t["rounds"], pushes=t["pushes"],
            refused=t["refused"], push_errors=t["push_errors"], revocabs=t["revocabs"],
            last_loss=t["last_loss"], candidate_metric=t["candidate_metric"], live_metric=t["live_metric"],
            live_version=self.speculator.version, restored=self.restored,
            errors=t["errors"] + self.errors, last_error=self.last_error or t["last_error"],
        )

