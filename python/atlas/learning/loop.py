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
tap (on the serving thread, cheaply) to the trainer, which pushes better
weights to ``speculator`` between steps. By default the trainer and its
replay buffer live in a process of their own (:mod:`atlas.learning.process`;
the tap's batches reach it through a bounded queue, and a batch that does not
fit is dropped and counted, never waited for); ``process=False`` keeps both
in this process, the trainer in a background thread (see
:mod:`atlas.learning.trainer` for what each costs serving). The trainer
process starts at :meth:`LearningLoop.start`: examples tapped before it are
dropped (counted).

Where the candidate starts, in order: the loop's last checkpoint
(``adaptive.npz``, which is also pushed to the speculator at once), else
``head`` when given (the :class:`DraftHead` the speculator was built from),
else the static head (``static.npz`` of :func:`atlas.learning.distill`), else
a fresh head on the speculator's draft vocabulary. A checkpoint that cannot be
read is reported with a warning naming the file and ignored.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np

from .adapt import ADAPT_GAIN, ADAPT_LR, ADAPT_STEPS, adapt_to_prompt
from .checkpoint import ADAPTIVE, STATIC, Checkpoint, head_config, load_checkpoint, model_dir, save_checkpoint
from .head import DraftHead
from .process import MAX_PENDING_BYTES, TrainerProcess
from .replay import ReplayBuffer
from .tap import Tap
from .trainer import Trainer, check_head_fits, resolve_precision

log = logging.getLogger("atlas.learning")

# The trainer process's default niceness increment (a thread's is Trainer's,
# 10). Measured on the 2-core machine (full atlas, 16-24 HumanEval requests;
# learning off served about 53 tokens/s): not paused during forwards, at 10 the
# child trained 0 steps and serving ran at 45 tokens/s, at 5 about 10 steps a
# minute at 44; paused during forwards (the default on the CPU), at 5 it
# trained 0 steps, at 0 about 20 a minute at 44 tokens/s: the forward kept its
# speed, and drafting and the tap, which it now competes with, slowed.
PROCESS_NICE = 0
# The trainer's self-fed share in the loop, where its CPU time is scarce (the
# gaps between forwards on a 2-core machine, about 15% of a core): none. The
# term doubles a step's cost (batch 256 on one thread, float32: 212 ms with
# it, 83 without). Measured on SmolLM2-135M, the static head trained on the
# outputs of 123 HumanEval requests and scored on the other 41, per second of
# one core's CPU: depth-1 greedy acceptance 0.37 (static) -> 0.449 / 0.467 /
# 0.481 after 5 / 10 / 40 s without it, 0.429 / 0.442 / 0.459 with it; at
# depth 2 (the head reading its own predicted feature) 0.35 without and 0.39
# with, about the same expected accepted length for a chain of two.
LOOP_SELF_FEED = 0.0
# The trainer's output layer and batch in the loop. The trainer process runs
# on the core that serving's gaps leave, so what a step costs serving is the
# cache and memory traffic of its weights, gradients, Adam moments and average
# (about 250 MB a step for SmolLM2's head), which evicts the target's and the
# draft heads' working sets between forwards: with learning on, forwards
# took 1.3 ms and drafting 0.4 ms a step longer than with it off (HumanEval
# requests 100-130, interleaved). Freezing the output layer (40% of the head's
# parameters) and taking steps of 512 examples cut that traffic per example
# learnt to about a third, and learn as fast: in a simulation of the stream
# (the tapped records of 123 HumanEval requests, from the static head, depth-1
# greedy acceptance on the other 41) 0.491 after 390 steps of 256 with
# everything trained (20 s of CPU), 0.493 with W_out frozen (17 s), 0.491
# after 195 steps of 512 with W_out frozen (16 s). Served (the same A/B) with
# these defaults: forwards 0.9 ms and drafting 0.5 ms a step longer than with
# learning off, and 3.7% fewer tokens a second, against 6.4% before.
#
# Since then the loop takes steps of 128 at a learning rate of 1e-3 (and 40
# steps a round, the same examples between evaluations as 10 of 512): in a
# simulation of the stream (the teacher-forced prompts and outputs of
# HumanEval requests 0-122 fed in order, from the static head, depth-1
# greedy acceptance on the outputs of the other 41), with the same examples
# trained on (76,800: about what the trainer reaches in bench_atlas.py's
# stream) 0.483 in 150 steps of 512 at 2e-3, 0.497 in 300 of 256 at 1.5e-3,
# 0.502 in 600 of 128 at 1e-3 (0.498 at 2e-3, 0.494 at 7e-4; 1,200 of 64:
# 0.497), for about 7% more CPU (a step of 128 costs 19-20 ms of one core
# to compute its gradients and 1.2 ms to apply them and update the average,
# a step of 512 about 76 and 1.2). The trainer's time is what limits
# learning in the stream: 1,500 steps of 512 reached 0.510 there.
LOOP_TRAIN_OUTPUT = False
LOOP_BATCH_SIZE = 128
LOOP_LR = 1e-3
LOOP_STEPS_PER_ROUND = 40
# Examples the tap gathers before it hands them over as one batch (see Tap's
# flush_rows): a decode step's tree gives about ten, a prompt a hundred or
# more. Each hand-over to the trainer process costs the serving thread a
# pickle and a pipe write, mostly per hand-over rather than per byte (between
# forwards, whose weights have just swept the caches: 0.21 ms for 25 KB,
# 0.25 ms for 48 KB, measured in full atlas on HumanEval; the tap's time per
# record over bench_atlas.py's stream went from 0.64 to 0.45-0.49 ms with 32
# rows; 32 -> 128 took the hand-overs from 0.14 to 0.08 ms a decode step,
# HumanEval requests 60-79 of full atlas under cProfile).
LOOP_TAP_FLUSH_ROWS = 128
# Whether the tap also turns every prompt token into an example (see
# atlas.learning.tap; 0.482 -> 0.502 in the simulation above).
LOOP_PROMPT_EXAMPLES = True
# The fits whose median time fit_pays weighs against what a fit saves.
FIT_MEMORY = 8


class LearningLoop:
    """Learns ``speculator``'s weights from the traffic ``target`` serves.

    ``head``: the :class:`DraftHead` the speculator was built from (optional;
    see the module docstring). ``cache_dir``: the checkpoint root (default
    ``$ATLAS_CACHE_DIR`` or ``~/.cache/atlas``); ``checkpoint=False`` neither
    reads nor writes checkpoints. ``topk``: the target logits kept per
    example. ``max_bytes`` / ``capacity`` / ``held_out`` / ``half_life``: the
    :class:`ReplayBuffer`'s. ``process``: train in a child process (the
    default on POSIX systems) or in a thread of this one (``False``);
    ``max_pending_bytes``: the examples that may wait for the trainer
    process; its niceness increment defaults to ``PROCESS_NICE``;
    ``pause_during_forward`` (default: when the target runs on the CPU) stops
    the trainer process, once it has started up, while each target forward runs (see
    :meth:`forward_begins`), so that it trains in the gaps between forwards
    instead of slowing them. ``prompt_examples`` (default ``LOOP_PROMPT_EXAMPLES``):
    the tap also learns from every prompt token (see :mod:`atlas.learning.tap`).
    ``adapt_steps`` (default ``ADAPT_STEPS``; 0: off) and ``adapt_lr``:
    request-local adaptation (:mod:`atlas.learning.adapt`): right after each
    prefill, on the serving thread, the loop fits the live head to the
    request's prompt and the speculator drafts that request with the result
    (it needs ``prompt_examples``, and no trainer: a loop that was never
    started fits prompts too, a frozen head that adapts to each request),
    unless the engine it observes measures that the fit would cost more
    than it saves (:meth:`fit_pays`; the suffix speculator drafting most of
    the accepted tokens, as in full atlas on HumanEval): ``adapt_gain``
    (default ``ADAPT_GAIN``) is the relative rise of the head's acceptance
    a fit is expected to bring, ``float("inf")`` fits every request.
    The tap hands its examples over once ``LOOP_TAP_FLUSH_ROWS`` wait (a few
    decode steps); :meth:`flush` and :meth:`stop` hand over the rest.
    Every other keyword goes to the :class:`Trainer` (``lr``,
    ``batch_size``, ``steps_per_round``, ``threads``, ``nice``,
    ``max_share``, ``min_gain``, ...); the loop's own defaults: ``self_feed``
    ``LOOP_SELF_FEED``, ``train_output`` ``LOOP_TRAIN_OUTPUT``, ``batch_size``
    ``LOOP_BATCH_SIZE``, ``lr`` ``LOOP_LR``, ``steps_per_round`` ``LOOP_STEPS_PER_ROUND``, and for
    a paused process ``max_share`` 1.

    ``trainer`` is the :class:`Trainer` or the
    :class:`~atlas.learning.process.TrainerProcess`; ``buffer`` the
    :class:`ReplayBuffer`, or in process mode a
    :class:`~atlas.learning.process.BufferView` of the child's (sizes as of its
    latest report, and ``held_out_batch()``).
    """

    def __init__(self, target, speculator, *, head: Optional[DraftHead] = None, cache_dir=None,
                 checkpoint: bool = True, topk: int = 16, max_bytes: Optional[int] = 64 << 20,
                 capacity: Optional[int] = None, held_out: int = 512, held_out_fraction: float = 0.25,
                 half_life: Optional[float] = None, process: Optional[bool] = None,
                 max_pending_bytes: int = MAX_PENDING_BYTES, pause_during_forward: Optional[bool] = None,
                 prompt_examples: bool = LOOP_PROMPT_EXAMPLES, adapt_steps: int = ADAPT_STEPS,
                 adapt_lr: float = ADAPT_LR, adapt_gain: float = ADAPT_GAIN, **trainer_kwargs):
        self.target, self.speculator = target, speculator
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"adapt_steps must be an int >= 0 (0: no request-local adaptation), got {adapt_steps!r}")
        if not isinstance(adapt_lr, (int, float)) or isinstance(adapt_lr, bool) or not float(adapt_lr) > 0:
            raise ValueError(f"adapt_lr must be > 0, got {adapt_lr!r}")
        if not isinstance(adapt_gain, (int, float)) or isinstance(adapt_gain, bool) or not float(adapt_gain) > 0:
            raise ValueError(f"adapt_gain must be > 0 (inf: fit every request), got {adapt_gain!r}")
        self.adapt_steps, self.adapt_lr, self.adapt_gain = adapt_steps, float(adapt_lr), float(adapt_gain)
        self._twin: Optional[DraftHead] = None   # the live version's weights, for the fits
        self._twin_version = 0
        self._twin_rows: dict = {}                 # the fits' LM head rows (fill_targets' cache)
        self._rng = np.random.default_rng(0)
        self.adaptations = 0                       # requests fitted
        self.adapt_seconds = 0.0                   # serving-thread time in the fits
        self.adapt_skipped = 0                     # requests not fitted: a fit would not have paid
        # The latest fits' times, for fit_pays; not the loop's first, which
        # also builds the twin from the target and runs torch's first
        # backward (measured in full atlas: 995 ms, against 30-40 after).
        self._fit_seconds: deque = deque(maxlen=FIT_MEMORY)
        self._fitted_once = False
        self._engine = None                        # weakref to the engine serving (attach)
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
        self._live_weights = None     # what the loop last pushed (its checkpoint)
        self._live_metric = None
        known_live = None             # what the speculator serves, when the loop knows it
        if adaptive is not None:
            cand.load_export(adaptive.weights)
            self.history = list(adaptive.history)
            speculator.push(adaptive.weights, adaptive.metric)
            self._live_weights, self._live_metric = adaptive.weights, adaptive.metric
            known_live = adaptive.weights
            self.restored = str(self.dir / ADAPTIVE)
        elif head is not None:
            check_head_fits(head, speculator)
            cand.load_export(head.export())
            if speculator.version == 1:   # built from head and not pushed to since
                known_live = cand.export()
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

        self.config = head_config(cand)
        trainer_kwargs.setdefault("self_feed", LOOP_SELF_FEED)
        trainer_kwargs.setdefault("train_output", LOOP_TRAIN_OUTPUT)
        trainer_kwargs.setdefault("batch_size", LOOP_BATCH_SIZE)
        trainer_kwargs.setdefault("lr", LOOP_LR)
        trainer_kwargs.setdefault("steps_per_round", LOOP_STEPS_PER_ROUND)
        self.process = os.name == "posix" if process is None else bool(process)
        # The fits' arithmetic, as the trainer's (Trainer.check_settings checks the setting).
        self._bfloat16 = resolve_precision(trainer_kwargs.get("precision", "auto")) == "bfloat16"
        # On the CPU the forward's threads use every core: a trainer that runs
        # beside them stalls the forward at each of its barriers (measured:
        # forward 30 -> 37 ms with the trainer at nice 5 or 10), while between
        # forwards serving runs one Python thread and leaves a core idle.
        self.pause_during_forward = self.process and (
            target.model.device.type == "cpu" if pause_during_forward is None else bool(pause_during_forward))
        buffer = dict(capacity=capacity, max_bytes=max_bytes, held_out=held_out,
                      held_out_fraction=held_out_fraction, half_life=half_life)
        if self.process:
            # Paused during forwards, the process competes with serving only in
            # the gaps between them (see PROCESS_NICE).
            trainer_kwargs.setdefault("nice", PROCESS_NICE)
            if self.pause_during_forward:
                # Paused while forwards run, the process already trains only
                # in the gaps between them; a duty cycle on top would sleep
                # through some (measured over 30 HumanEval requests: the child
                # had 14% of a core at max_share 0.25, 15% at 1).
                trainer_kwargs.setdefault("max_share", 1.0)
            self.trainer = TrainerProcess(cand, speculator, buffer=dict(buffer, topk=topk), live_weights=known_live,
                                          counts=lambda: self.tap.counts,
                                          on_push=self._on_push, max_pending_bytes=max_pending_bytes,
                                          **trainer_kwargs)
            self.buffer = self.trainer.buffer
            self._sink = self.trainer.send
        else:
            self.buffer = ReplayBuffer(nat.hidden, topk, **buffer)
            self.trainer = Trainer(cand, self.buffer, speculator, counts=lambda: self.tap.counts,
                                   on_push=self._on_push, **trainer_kwargs)
            # (prompt rows' targets are then computed on the serving thread)
            self._sink = self.trainer.add_examples
        self.tap = Tap(nat.vocab, topk, sink=self._sink, prompt_examples=prompt_examples,
                       flush_rows=LOOP_TAP_FLUSH_ROWS,
                       prompt_sink=self._prompt if prompt_examples and adapt_steps else None)

    # ---- the engine's observer ----------------------------------------------------------

    def observe(self, record) -> None:
        """Taps one forward. A tap failure is logged and counted, never raised
        into the serving step."""
        try:
            self.tap.observe(record)
        except Exception as e:  # noqa: BLE001
            self._error(f"tap failed: {type(e).__name__}: {e}")

    def attach(self, engine) -> None:
        """The engine calls this when the loop becomes one of its observers:
        the loop then asks it what the speculator's drafts save a request
        (:meth:`atlas.Engine.speculation_value`) before fitting one."""
        self._engine = weakref.ref(engine)

    def fit_pays(self, rid) -> bool:
        """Whether a request-local fit is expected to save request ``rid``
        more time than it costs: ``adapt_gain`` of what the speculator's
        drafts save it (its engine's measure) against the median time of
        the latest ``FIT_MEMORY`` fits (the loop's first left out). Yes
        while either is unknown (no engine attached, nothing measured yet,
        fewer than two fits made)."""
        engine = self._engine() if self._engine is not None else None
        value = engine.speculation_value(self.speculator, rid) if engine is not None else None
        if value is None or not self._fit_seconds:
            return True
        return self.adapt_gain * value >= float(np.median(self._fit_seconds))

    def _prompt(self, rid, ex) -> None:
        """The tap's prompt sink: fits the live head to a request's prompt
        for that request (see the class docstring) when that pays
        (:meth:`fit_pays`), then hands the examples to the trainer, which
        computes their targets (the fit computes those of the rows it
        samples only). A fit that fails is logged and counted, never raised
        into the serving step."""
        if not self.fit_pays(rid):
            self.adapt_skipped += 1
            self._sink(ex)
            return
        try:
            t0 = time.perf_counter()
            twin, version = self._live_twin()
            weights = adapt_to_prompt(twin, ex, steps=self.adapt_steps, lr=self.adapt_lr, rng=self._rng,
                                      bfloat16=self._bfloat16, cache=self._twin_rows)
            if self.speculator.adapt(rid, weights, version):
                self.adaptations += 1
            dt = time.perf_counter() - t0
            self.adapt_seconds += dt
            if self._fitted_once:
                self._fit_seconds.append(dt)
            self._fitted_once = True
        except Exception as e:  # noqa: BLE001
            self._error(f"request-local fit failed: {type(e).__name__}: {e}")
        self._sink(ex)

    def _live_twin(self):
        """A DraftHead holding the speculator's live version (as the native
        head stores it), rebuilt when the version changes; and its number."""
        snap = self.speculator.native.snapshot()
        if self._twin is None or self._twin_version != snap.version:
            if self._twin is None:
                nat = self.speculator.native
                self._twin = DraftHead.from_target(self.target, snap.draft_ids, intermediate=nat.intermediate,
                                                   eps=float(nat.eps))
            self._twin.load_snapshot(snap)
            self._twin_version = snap.version
        return self._twin, self._twin_version

    def place_threads(self, cpus) -> None:
        """The engine calls this at the start of each serve with the CPUs
        its helpers may use (``atlas.Engine(pin_threads=)``): the trainer
        (process or thread) runs there, off the serving thread's CPU."""
        self.trainer.place(cpus)

    def forward_begins(self) -> bool:
        """The engine calls this before each target forward: with
        ``pause_during_forward`` the trainer process is stopped until
        :meth:`forward_ends`. Returns False when the forward runs beside a
        trainer process that is still starting up (which is left running,
        see :meth:`TrainerProcess.pause`): the engine leaves that forward's
        time out of its controller's cost model."""
        if self.pause_during_forward:
            return self.trainer.pause(forward=True)
        return True

    def forward_ends(self) -> None:
        if self.pause_during_forward:
            self.trainer.resume()

    def measurement_begins(self) -> None:
        """The engine calls this before it times the target forward at its
        first serve (:meth:`atlas.Engine.measure_forward_cost`, about a
        second on the CPU): with ``pause_during_forward`` the trainer process
        is stopped until :meth:`measurement_ends`, even while it is still
        starting up. Its start-up (importing torch, seconds of CPU) is not
        paused at every forward (see :meth:`TrainerProcess.pause`), but beside
        this measurement it doubled what the controller's first figures
        said forwards of 8 to 32 nodes cost."""
        if self.pause_during_forward:
            self.trainer.pause()

    def measurement_ends(self) -> None:
        if self.pause_during_forward:
            self.trainer.resume()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Starts (or restarts) the background trainer (in process mode a new
        trainer process, which takes a few seconds to import torch and begin;
        this call does not wait for it)."""
        self.trainer.start()

    def flush(self) -> None:
        """Hands the examples the tap is still gathering (at most
        ``LOOP_TAP_FLUSH_ROWS``) to the trainer now."""
        try:
            self.tap.flush()
        except Exception as e:  # noqa: BLE001
            self._error(f"tap failed: {type(e).__name__}: {e}")

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Stops the trainer (in process mode: waits for the child to finish
        its step and exit, terminating it after ``timeout`` seconds) and writes
        a checkpoint of the live weights."""
        self.flush()
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
            save_checkpoint(path, Checkpoint(self._live_weights, self.config,
                                             self.history, self._live_metric,
                                             dict(saved=time.time())))
        except OSError as e:
            self._error(f"checkpoint {path} not written: {e}")
            return None
        return path

    def _on_push(self, version: int, weights: dict, metric: float) -> None:
        # The trainer's thread, or in process mode the service thread.
        self._live_weights, self._live_metric = weights, metric
        self.history.append(dict(version=int(version), metric=float(metric), time=time.time()))
        self.save()

    def _error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        log.warning("atlas learning: %s", msg)

    def stats(self) -> dict:
        """Examples seen, buffer fill, trainer counters, pushes, refusals, the
        last metrics, errors, examples dropped on the way to a trainer process
        (``dropped`` batches, ``dropped_examples``; always 0 for a thread),
        and request-local fits (``adaptations``: requests fitted;
        ``adapt_seconds``: the serving thread's time in them;
        ``adapt_skipped``: requests not fitted because a fit would not have
        paid, see :meth:`fit_pays`). In process mode
        the trainer's counters and the buffer are as of the child's latest
        report (at most a second old while it runs)."""
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
            dropped=t.get("dropped", 0), dropped_examples=t.get("dropped_examples", 0),
            adaptations=self.adaptations, adapt_seconds=self.adapt_seconds, adapt_skipped=self.adapt_skipped,
        )

