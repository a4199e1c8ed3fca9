"""The learning loop's trainer in a process of its own (see
:mod:`atlas.learning.trainer` for why, and for *candidate*, *live*, *round*
and *metric*).

Vocabulary:

* **parent**: the serving process; it owns the speculator (the live native
  head), the tap and the checkpoints;
* **child**: the trainer process; it owns the replay buffer, the candidate
  (a :class:`~atlas.learning.trainer.Trainer` on a
  :class:`~atlas.learning.head.DraftHead`), and a *live twin*: a DraftHead
  holding the weights the parent last accepted, on which it measures the
  live version's metric (the twin's ``forward_native``, which rounds its
  matrices and their inputs to bfloat16 as the native head does, and the
  native forward compute the same function up to the order of float32
  sums: on SmolLM2's static head and 4,707 rows of real features, the last
  41 HumanEval requests' outputs, their logits differ by 0.06 at most
  (logits up to 36: an activation that lands on the other side of a
  bfloat16 rounding boundary moves what follows by about a bfloat16 ulp)
  and one argmax of the 4,707 differs);
* **pending**: examples the tap handed over that the child has not yet
  read: in the examples pipe, or in the *backlog* that did not fit in it;
  bounded by ``max_pending_bytes``. A batch that would exceed the bound is
  **dropped** and counted, so serving never waits.

Channels, three pipes: *control* (parent to child: the start-up data, push
verdicts, measurements of the live native head, stop and held-out
requests), *examples* (parent to child: tapped batches and token-count
snapshots, each a length and a pickle; a pipe of ``EXAMPLES_PIPE_BYTES``
where Linux allows it, its parent end non-blocking) and *results* (child to
parent: counters, push and measurement requests, held-out batches,
failures). Each pipe has one writer end, in one process, so a process that
dies closes its ends and the other side reads end-of-file instead of
waiting forever.

Parent threads: the serving thread writes each batch into the examples pipe
itself (``send``: a non-blocking write) while the pipe has room and no
backlog waits; what does not fit goes to the backlog, which a *sender*
thread writes as the child reads. (Handing every batch to the sender thread
woke it each step, and it then took the interpreter's lock from the serving
thread. Measured in full atlas with learning on, HumanEval requests 100-149
served by two engines in turn: 35.12 ms a step with every batch through the
sender thread, 34.02 written directly, and 184 trainer steps against 170; two
runs of a first version, 34.45 against 33.73 ms and 34.87 against 34.93,
with 176 against 164 and 201 against 174 steps.) A *service* thread sends
the start-up data, reads results, pushes winning candidates into the
speculator (which validates them), calls ``on_push`` (the loop's
checkpoint), answers with the verdict, and notices the child's end. Child
threads: the main thread trains (``Trainer.run_rounds``); an *inbox* thread
fills the buffer from the examples pipe, answers control messages and
reports counters every ``REPORT_SECONDS``.

Start-up data, once per child: the head's configuration, the candidate's
weights, the live weights when the parent knows them, the buffer and
trainer settings, and the target's token embedding and LM head as raw
float32 bytes read straight into the child's arrays (113 MB for SmolLM2's
49152 x 576; a tied LM head, the same table, is sent once).

The child is a fresh interpreter (``sys.executable`` with the parent's
``sys.path``), started by :mod:`subprocess`: forking a process whose torch
and OpenMP are initialised is unsafe, and multiprocessing's *spawn* would
re-run the user's ``__main__`` script in the child unless it is guarded,
which ``Engine(target)`` (learning on by default) must not require. It
raises its niceness and ignores SIGINT before importing anything (a Ctrl-C
in the terminal is the serving process's to handle), and stays in the
parent's session: Linux's autogroup scheduling
shares the CPU equally between sessions, so a child in a session of its own
would get half the machine whatever its niceness (measured, see
:mod:`atlas.learning.trainer`). It exits when the serving process does,
however that ends (end-of-file on the control pipe).

Faults, each reported in :meth:`TrainerProcess.stats` while serving goes on
with the last good weights: a trainer that raises (the child sends its
traceback; state ``"error"``); a child that dies (killed, out of memory, a
crash: the parent reads end-of-file and reports the exit code; state
``"error"``); a push the speculator refuses (``push_errors``; the child's
live twin stays as it was); a full channel (``dropped``). :meth:`start`
after a failure starts a new child from the live weights with an empty
buffer; after a clean :meth:`stop` a new child resumes from the candidate the
old one returned (its buffer and optimiser state are not kept).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .. import placement
from .head import DraftHead
from .replay import Batch, ReplayBuffer
from .tap import Examples
from .trainer import Trainer, check_head_fits, head_metric, native_metric_arrays

log = logging.getLogger("atlas.learning")

# Seconds between the child's counter reports while it runs (also sent after
# every round), and between the parent's token-count snapshots: loop.stats()
# is at most this old, and the vocabulary is re-chosen once a round anyway.
REPORT_SECONDS = 1.0
# How often the parent's threads look at a queue, a stop request or the
# child's exit: the latency of stop() and of noticing a dead child.
POLL_SECONDS = 0.1
# After stop()'s timeout, SIGTERM; after this many seconds more, SIGKILL.
KILL_SECONDS = 5.0
# Examples waiting for the child, at most: a few seconds of traffic at 8
# requests per step with 32-node trees on SmolLM2 (about 9 MB/s of examples),
# enough to cover the child's start-up (importing torch) on a busy machine.
MAX_PENDING_BYTES = 64 << 20
# The examples pipe's size where Linux lets an unprivileged process set it
# (its default limit, /proc/sys/fs/pipe-max-size): about 20 steps of one
# request's examples on SmolLM2 (50 KB a step), so that the serving thread's
# writes find room while the child trains between its reads.
EXAMPLES_PIPE_BYTES = 1 << 20
# A framed message's header: the pickle's length, little-endian.
_HEADER = struct.Struct("<Q")
# Bytes per os.write of the start-up tables.
_CHUNK = 1 << 20


def _write_all(fd: int, data: memoryview) -> None:
    pos = 0
    while pos < len(data):
        pos += os.write(fd, data[pos:pos + _CHUNK])


def _frame(msg) -> bytes:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def _unread_bytes(fd: int) -> int:
    """Bytes written into a pipe that its reader has not read yet."""
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


class _FrameReader:
    """The child's end of the examples pipe: blocking reads of framed
    messages (see :func:`_frame`); ``fileno`` for ``wait``."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self):
        head = bytearray(_HEADER.size)
        _read_into(self.fd, memoryview(head))
        (n,) = _HEADER.unpack(head)
        payload = bytearray(n)
        _read_into(self.fd, memoryview(payload))
        return pickle.loads(payload)


def _read_into(fd: int, out: memoryview) -> None:
    pos = 0
    while pos < len(out):
        n = os.readv(fd, [out[pos:]])
        if n == 0:
            raise EOFError("the serving process closed the channel")
        pos += n


def _batch_arrays(batch: Optional[Batch]):
    if batch is None:
        return None
    return tuple(getattr(batch, f).numpy() for f in Batch.__dataclass_fields__)


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "has not exited"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            return f"was killed by signal {-code} (exit code {code})"
    return f"exited with code {code}"


@dataclass
class _Child:
    """One trainer process and the parent's ends of its channels."""

    proc: subprocess.Popen
    ctrl: Connection                   # parent -> child; written by the service thread only
    examples: int                      # parent -> child, non-blocking (see TrainerProcess._deliver)
    results: Connection                # child -> parent; read by the service thread only
    init: dict                         # the start-up message, sent by the service thread
    tables: list                       # float32 tensors sent raw after it
    outbox: "queue.Queue" = field(default_factory=queue.Queue)     # the backlog: (framed bytes, examples)
    requests: "queue.Queue" = field(default_factory=queue.Queue)   # control messages from other threads
    pending_bytes: int = 0             # in the backlog (queued or being written by the sender thread)
    examples_closed: bool = False      # the examples pipe's end is closed (under TrainerProcess._lock)
    last_counts: float = float("-inf")  # when the latest token-count snapshot was queued
    broken: bool = False               # the examples channel failed: the child is gone
    closing: bool = False              # the parent stops feeding it
    stopping: bool = False             # stop() asked it to stop
    started: bool = False              # it received its start-up data
    ready: bool = False                # it sent its first report: its start-up is over
    final: Optional[str] = None        # "stopped" or "failed" when it said so before exiting
    stats: dict = field(default_factory=dict)   # its latest report
    waiting: dict = field(default_factory=dict)  # held-out request id -> [Event, reply]
    threads: list = field(default_factory=list)


class BufferView:
    """The serving process's view of the replay buffer that lives in the
    trainer process: sizes as of the child's latest report (at most
    ``REPORT_SECONDS`` old while it runs), and :meth:`held_out_batch` fetched
    from it."""

    def __init__(self, trainer: "TrainerProcess", capacity: int):
        self._trainer, self.capacity = trainer, capacity

    def stats(self) -> dict:
        b = self._trainer._buffer_stats()
        return b if b else dict(capacity=self.capacity, size=0, bytes=0, added=0, evicted=0, full=False,
                                held_out=0, train=0)

    @property
    def total(self) -> int:
        """Examples the child's buffer received (ever added)."""
        return self.stats()["added"]

    @property
    def size(self) -> int:
        return self.stats()["size"]

    @property
    def held_out_size(self) -> int:
        return self.stats()["held_out"]

    @property
    def train_size(self) -> int:
        return self.stats()["train"]

    def held_out_batch(self, timeout: float = 30.0) -> Optional[Batch]:
        """The child's held-out slice, oldest first (None while it is empty).
        Waits for the child (at most ``timeout`` seconds; a call for tests and
        benchmarks, not for the serving path). Raises RuntimeError when no
        child runs: the buffer lives and dies with it."""
        return self._trainer._held_out_batch(timeout)


class TrainerProcess:
    """Trains a copy of ``head`` (the candidate, a :class:`DraftHead`) in a
    child process and pushes the winners to ``speculator`` (a
    :class:`LearnedSpeculator`), with the in-process :class:`Trainer`'s
    rounds, settings and counters (see the module docstring).

    ``buffer``: the :class:`ReplayBuffer`'s keyword arguments (``topk`` and
    its sizes). ``live_weights``: what the speculator serves now, when the
    caller knows it (the child measures the live version on a twin of them;
    when None it asks the parent to measure the native head, once a round,
    until its first push). ``counts`` (a callable returning ``[vocab]`` token
    counts) enables re-choosing the draft vocabulary, as for
    :class:`Trainer`; the counts reach the child as snapshots, at most one
    per ``REPORT_SECONDS`` (cumulative, so a dropped snapshot loses
    nothing). ``on_push(version, weights, metric)`` runs in
    the parent after each accepted push. ``max_pending_bytes`` bounds the
    examples waiting for the child. Every other keyword is a :class:`Trainer`
    setting (``threads``: the child's torch threads; ``nice``: the child's
    niceness increment, process-wide there; ``max_share``: its duty cycle).
    """

    def __init__(self, head: DraftHead, speculator, *, buffer: Optional[dict] = None,
                 live_weights: Optional[Dict[str, np.ndarray]] = None,
                 counts: Optional[Callable[[], np.ndarray]] = None,
                 on_push: Optional[Callable[[int, dict, float], None]] = None,
                 max_pending_bytes: int = MAX_PENDING_BYTES, **settings):
        self.settings = Trainer.check_settings(**settings)
        check_head_fits(head, speculator)
        self.buffer_settings = dict(buffer or {})
        capacity, _ = ReplayBuffer.plan(head.hidden, **self.buffer_settings)
        if not isinstance(max_pending_bytes, int) or max_pending_bytes < 0:
            raise ValueError(f"max_pending_bytes must be an int >= 0, got {max_pending_bytes!r}")
        self.speculator, self.counts, self.on_push = speculator, counts, on_push
        self.max_pending_bytes = max_pending_bytes
        self.config = dict(hidden=head.hidden, intermediate=head.intermediate, draft_vocab=head.draft_vocab,
                           vocab=head.vocab, eps=head.eps)
        self.buffer = BufferView(self, capacity)
        # The tables the child needs, as the head holds them (float32 on the
        # host: the target's own memory when it is float32 there): the
        # embedding, and the LM head unless it is the same table.
        self._embed = head.embed
        self._tied = head.lm_head.data_ptr() == head.embed.data_ptr()
        self._lm_head: Optional[torch.Tensor] = None if self._tied else head.lm_head
        self._revocab = counts is not None
        self._start_weights = head.export()   # where the first child's candidate starts
        self._resume: Optional[dict] = None   # the candidate a cleanly stopped child returned
        self._live_weights = live_weights
        self._lock = threading.Lock()         # counters and the current child, across parent threads
        self._child: Optional[_Child] = None
        self._paused = False                  # the child is stopped by pause()
        self._cpus: set = set()               # where the child and this side's threads run (place)
        self._request_id = 0
        self.state = "idle"                   # idle | running | stopped | error
        self.pushes = 0
        self.push_errors = 0
        self.errors = 0                       # parent-side: failures, deaths, refused pushes, on_push errors
        self.last_error: Optional[str] = None
        self.dropped = 0                      # example batches not delivered (channel full, or no child)
        self.dropped_examples = 0
        self.sent = 0                         # example batches queued for a child
        self.restarts = 0                     # children started after the first
        self._done = dict(train_steps=0, skipped_steps=0, rounds=0, refused=0, revocabs=0, train_seconds=0.0,
                          errors=0)           # counters of children that ended
        self._last: dict = {}                 # the latest report of any child

    # ---- the serving side ---------------------------------------------------------------

    def send(self, ex: Examples) -> None:
        """Hands a tapped batch to the child (see the module docstring);
        drops it (counted) when no child runs or the pending bound would be
        exceeded. Never waits."""
        ch = self._child
        n = len(ex)
        if ch is None or ch.broken or ch.closing or not self._deliver(ch, ("examples", ex), n):
            self._drop(n)
            return
        self.sent += 1
        if self._revocab:
            now = time.monotonic()
            if now - ch.last_counts >= REPORT_SECONDS:
                ch.last_counts = now
                c = np.array(self.counts(), np.int64)
                self._deliver(ch, ("counts", c), 0)  # cumulative: a dropped snapshot loses nothing

    def _drop(self, examples: int) -> None:
        with self._lock:
            self.dropped += 1
            self.dropped_examples += examples

    def _deliver(self, ch: _Child, msg, examples: int) -> bool:
        """Writes ``msg`` into the examples pipe, as far as it fits when no
        backlog waits, and queues the rest for the sender thread; False
        (nothing written) when the pending bound would be exceeded or the
        pipe is gone."""
        data = _frame(msg)
        with self._lock:
            if ch.examples_closed or ch.broken:
                return False
            try:
                unread = _unread_bytes(ch.examples)
            except OSError:
                unread = 0
            if ch.pending_bytes + unread + len(data) > self.max_pending_bytes:
                return False
            written = 0
            if ch.pending_bytes == 0:   # nothing queued before it: it may go straight into the pipe
                try:
                    written = os.write(ch.examples, data)
                except BlockingIOError:
                    written = 0
                except OSError:
                    ch.broken = True   # the child is gone (the service thread reports it)
                    return False
                if written == len(data):
                    return True
            rest = memoryview(data)[written:]
            ch.pending_bytes += len(rest)
            ch.outbox.put((rest, examples))
        return True

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A child exists and has not ended (it may still be starting)."""
        ch = self._child
        return ch is not None and ch.final is None and ch.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        ch = self._child
        return ch.proc.pid if ch is not None else None

    @property
    def exitcode(self) -> Optional[int]:
        """The last child's exit code (negative: the signal that ended it);
        None while it runs or before the first start."""
        ch = self._child
        return ch.proc.poll() if ch is not None else None

    def pause(self, forward: bool = False) -> bool:
        """Stops the child (``SIGSTOP``) until :meth:`resume`: the learning
        loop pauses it while each target forward runs, so that on a machine
        whose cores the forward's threads all use, the trainer trains in the
        gaps between forwards instead of preempting them. Cheap (one signal);
        nothing when no child runs. Should the serving process die while the
        child is stopped, the child's process group is orphaned and the
        kernel sends it SIGHUP and SIGCONT, which end it.

        ``forward=True`` (the learning loop's pause around a forward) leaves a
        child that is still starting up running: paused at every forward, its
        few seconds of start-up (importing torch, reading the tables) took
        ten times as long in wall time, and the trainer began about 20 s into
        the demo's stream of 32 requests (measured: no step before the 17th
        request, none at all in the demo's run). Returns False in that case
        (a child left running), else True."""
        ch = self._child
        if forward and ch is not None and not ch.ready and ch.final is None and ch.proc.returncode is None:
            return False
        self._signal(signal.SIGSTOP, True)
        return True

    def resume(self) -> None:
        """Continues a child stopped by :meth:`pause`."""
        self._signal(signal.SIGCONT, False)

    def _signal(self, sig, paused: bool) -> None:
        ch = self._child
        if ch is None or ch.final is not None or ch.proc.returncode is not None or self._paused == paused:
            return
        try:
            os.kill(ch.proc.pid, sig)
        except ProcessLookupError:  # it ended; the service thread reports it
            return
        self._paused = paused

    def start(self) -> None:
        """Starts a child (or a new one, after an error or stop); returns at
        once: the child receives its start-up data from the service thread."""
        with self._lock:
            if self.running:
                return
            if self._child is not None:
                self.restarts += 1
            weights = self._resume or self._live_weights or self._start_weights
            self._resume = None
            live = self._live_weights
            same = live is not None and all(np.array_equal(live[k], weights[k]) for k in live)
            init = dict(config=self.config, weights=weights, live_weights=None if same else live,
                        live_is_start=same, buffer=self.buffer_settings, settings=self.settings,
                        tied=self._tied, revocab=self._revocab, shape=tuple(self._embed.shape),
                        own_lm_head=self._lm_head is not None)
            tables = [self._embed] + ([self._lm_head] if self._lm_head is not None else [])
            ch = self._spawn(init, tables)
            self._child = ch
            self._paused = False
            self.state = "running"
        for name, target in (("atlas-trainer-service", self._service), ("atlas-trainer-sender", self._sender)):
            t = threading.Thread(target=target, args=(ch,), name=name, daemon=True)
            ch.threads.append(t)
            t.start()
            if self._cpus:
                placement.set_thread_cpus(t.native_id, self._cpus)

    def place(self, cpus) -> None:
        """Runs the child (every thread it has, and its later ones) and this
        side's service and sender threads on ``cpus`` from now on (see
        :mod:`atlas.placement`; the learning loop passes what the engine hands
        it). A child still starting up, now or later, moves there once it is
        ready: its start-up (importing torch, seconds of CPU) is not paused
        during forwards, and the scheduler may spread it over every core
        meanwhile. (In runs P1-P3 of bench/results/CPU.md, placed at once
        or when ready, bench_atlas.py's stream ran its first requests slower
        than before placement; most of that was the first request-local fit
        importing torch._dynamo, gone since runs K1-K4.)"""
        self._cpus = set(cpus)
        ch = self._child
        if ch is None:
            return
        if ch.ready and ch.proc.poll() is None:
            placement.set_process_cpus(ch.proc.pid, self._cpus)
        for t in ch.threads:
            if t.native_id is not None and t.is_alive():
                placement.set_thread_cpus(t.native_id, self._cpus)

    def _spawn(self, init: dict, tables: list) -> _Child:
        ctrl_r, ctrl_w = Pipe(duplex=False)
        ex_r, ex_w = os.pipe()
        if hasattr(fcntl, "F_SETPIPE_SZ"):
            try:
                fcntl.fcntl(ex_w, fcntl.F_SETPIPE_SZ, EXAMPLES_PIPE_BYTES)
            except OSError:
                pass   # the system's default size: more of the batches wait in the backlog
        os.set_blocking(ex_w, False)
        res_r, res_w = Pipe(duplex=False)
        child_fds = (ctrl_r.fileno(), ex_r, res_w.fileno())
        env = dict(os.environ)
        threads = self.settings["threads"]
        if threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        # The child imports modules as this process would (the same atlas
        # included): it starts from this process's sys.path, as
        # multiprocessing's spawn does. It lowers its priority first: its
        # start-up (importing torch, seconds of CPU) must not compete with
        # serving either.
        code = ("import sys, json, os, signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "sys.path[:] = json.loads(sys.argv[4]); nice = int(sys.argv[5])\n"
                "if nice > 0:\n"
                "    try: os.nice(nice)\n"
                "    except OSError: pass\n"

                "from atlas.learning.process import child_main; sys.exit(child_main(sys.argv[1:4]))")
        argv = [sys.executable, "-c", code] + [str(fd) for fd in child_fds] + [json.dumps(sys.path),
                                                                                str(self.settings["nice"])]
        try:
            proc = subprocess.Popen(argv, pass_fds=child_fds, env=env, stdin=subprocess.DEVNULL)
        except BaseException:
            os.close(ex_w)
            raise
        finally:
            for c in (ctrl_r, res_w):  # the child's ends: only the child may hold them
                c.close()
            os.close(ex_r)
        return _Child(proc, ctrl_w, ex_w, res_r, init, tables)

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Asks the child to stop after its current step and waits for it
        (``timeout`` seconds, then SIGTERM, then SIGKILL after
        ``KILL_SECONDS``); the child is reaped, no process is left."""
        ch = self._child
        if ch is None:
            return
        self.resume()   # a stopped child could not stop
        ch.stopping = True
        ch.requests.put(("stop",))
        service = ch.threads[0] if ch.threads else None
        if service is not None:
            service.join(timeout)
        if ch.proc.poll() is None:
            log.warning("the trainer process (pid %d) did not stop within %s s: terminating it", ch.proc.pid,
                        timeout)
            ch.proc.terminate()
            try:
                ch.proc.wait(KILL_SECONDS)
            except subprocess.TimeoutExpired:
                ch.proc.kill()
                ch.proc.wait()
        for t in ch.threads:
            t.join(KILL_SECONDS)
        ch.closing = True
        if self.state == "running":
            self.state = "stopped"

    # ---- the service thread -----------------------------------------------------------------

    def _service(self, ch: _Child) -> None:
        try:
            ch.ctrl.send(ch.init)
            for t in ch.tables:
                _write_all(ch.ctrl.fileno(), memoryview(t.numpy()).cast("B"))
            ch.init, ch.tables = None, None
            ch.started = True
            while ch.final is None:
                while True:
                    try:
                        ch.ctrl.send(ch.requests.get_nowait())
                    except queue.Empty:
                        break
                if ch.results.poll(POLL_SECONDS):
                    self._handle(ch, ch.results.recv())
                elif ch.proc.poll() is not None and not ch.results.poll(0):
                    break
        except (EOFError, OSError):
            pass  # the child is gone: its exit code says how
        except Exception as e:  # noqa: BLE001 - a bug here must not pass silently, nor stop serving
            log.exception("the trainer process's service thread failed")
            self._error(f"the trainer process's service thread failed: {type(e).__name__}: {e}")
        finally:
            self._end(ch)

    def _handle(self, ch: _Child, msg) -> None:
        kind = msg[0]
        if kind == "stats":
            if not ch.ready:
                ch.ready = True
                if self._cpus:   # (see place)
                    placement.set_process_cpus(ch.proc.pid, self._cpus)
            self._report(ch, msg[1])
        elif kind == "push":
            self._push(ch, *msg[1:])
        elif kind == "measure":
            _, seq, feats, toks, top1 = msg
            ch.ctrl.send(("measured", seq, native_metric_arrays(self.speculator.native, feats, toks, top1)))
        elif kind == "live_metric":
            version = self.speculator.version
            if version > 0:
                try:
                    self.speculator.native.set_metric(version, msg[1])
                except ValueError:
                    pass  # a version pushed long ago may have left the history
        elif kind == "held_out":
            _, req, arrays = msg
            slot = ch.waiting.pop(req, None)
            if slot is not None:
                slot[1] = arrays
                slot[0].set()
        elif kind == "failed":
            _, text, stats = msg
            self._report(ch, stats)
            ch.final = "failed"
            last = text.strip().splitlines()[-1] if text.strip() else "unknown error"
            log.error("the learning loop's trainer process failed; serving goes on with version %s:\n%s",
                      self.speculator.version, text)
            self._error(f"trainer failed: {last}\n{text}")
        elif kind == "stopped":
            _, stats, candidate = msg
            self._report(ch, stats)
            self._resume = candidate
            ch.final = "stopped"
        else:
            raise ValueError(f"unknown message {kind!r} from the trainer process")

    def _push(self, ch: _Child, seq: int, weights: dict, metric: float) -> None:
        try:
            version = self.speculator.push(weights, metric)
        except (ValueError, TypeError, RuntimeError) as e:
            with self._lock:
                self.push_errors += 1
            self._error(f"push refused: {e}")
            ch.ctrl.send(("pushed", seq, None, str(e)))
            return
        with self._lock:
            self.pushes += 1
            self._live_weights = weights
        ch.ctrl.send(("pushed", seq, version, None))   # the child trains on while the checkpoint is written
        if self.on_push is not None:
            try:
                self.on_push(version, weights, metric)
            except Exception as e:  # noqa: BLE001 - the push stands; the callback's failure is reported
                self._error(f"on_push failed after version {version}: {type(e).__name__}: {e}")

    def _report(self, ch: _Child, stats: dict) -> None:
        with self._lock:
            before = ch.stats.get("errors", 0)
            ch.stats = stats
            self._last = stats
            if stats.get("errors", 0) > before and stats.get("last_error"):
                self.last_error = stats["last_error"]

    def _end(self, ch: _Child) -> None:
        """The child's end, whatever it was: reap it, fold its counters in,
        report how it ended, release waiters."""
        try:
            code = ch.proc.wait(KILL_SECONDS)
        except subprocess.TimeoutExpired:   # it closed its pipes but lingers: it is useless now
            ch.proc.kill()
            code = ch.proc.wait()
        ch.closing = True
        for c in (ch.ctrl, ch.results):
            c.close()
        with self._lock:
            for k in self._done:
                self._done[k] += ch.stats.get(k, 0)
            ch.stats = {}
            waiting, ch.waiting = ch.waiting, {}
        for ev, _ in waiting.values():
            ev.set()
        if ch.final == "stopped":
            state = "stopped"
        elif ch.final == "failed":
            state = "error"
        elif ch.stopping:
            state = "stopped"
            self._error(f"the trainer process (pid {ch.proc.pid}) {_exit_text(code)} while stopping")
        else:
            state = "error"
            when = "" if ch.started else " before it received its start-up data (its stderr says why)"
            log.error("the learning loop's trainer process (pid %d) %s%s; serving goes on with version %s",
                      ch.proc.pid, _exit_text(code), when, self.speculator.version)
            self._error(f"the trainer process (pid {ch.proc.pid}) {_exit_text(code)}{when}")
        if self._child is ch:
            self.state = state

    def _error(self, msg: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = msg
        log.warning("atlas learning: %s", msg.splitlines()[0])

    # ---- the sender thread ------------------------------------------------------------------

    def _sender(self, ch: _Child) -> None:
        """Writes the backlog as the child reads (see the module docstring)."""
        while True:
            try:
                data, examples = ch.outbox.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if ch.closing or ch.broken:
                    break
                continue
            size = len(data)
            try:
                while len(data) and not (ch.broken or ch.closing):
                    try:
                        data = data[os.write(ch.examples, data):]
                    except BlockingIOError:
                        select.select([], [ch.examples], [], POLL_SECONDS)
            except OSError:
                ch.broken = True   # the child is gone (the service thread reports it)
            finally:
                with self._lock:
                    ch.pending_bytes -= size
            if len(data) and examples:
                self._drop(examples)
        with self._lock:
            ch.examples_closed = True
            os.close(ch.examples)
        while True:   # whatever is still queued will not be delivered
            try:
                data, examples = ch.outbox.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                ch.pending_bytes -= len(data)
            if examples:
                self._drop(examples)

    # ---- requests and counters ---------------------------------------------------------------

    def _held_out_batch(self, timeout: float) -> Optional[Batch]:
        ch = self._child
        with self._lock:
            self._request_id += 1
            req = self._request_id
            slot = [threading.Event(), None]
            if ch is not None:
                ch.waiting[req] = slot
        if ch is None or not self.running:
            raise RuntimeError("no trainer process runs: the replay buffer lives in it (start() the loop)")
        ch.requests.put(("held_out", req))
        if not slot[0].wait(timeout):
            ch.waiting.pop(req, None)
            raise TimeoutError(f"the trainer process did not send its held-out slice within {timeout} s")
        if not self.running and slot[1] is None:
            raise RuntimeError(f"the trainer process ended before it answered: {self.last_error}")
        arrays = slot[1]
        if arrays is None:
            return None
        return Batch(*(torch.from_numpy(a) for a in arrays))

    def _buffer_stats(self) -> dict:
        return dict(self._last.get("buffer") or {})

    @property
    def rounds(self) -> int:
        return self.stats()["rounds"]

    @property
    def steps_done(self) -> int:
        return self.stats()["train_steps"]

    def stats(self) -> dict:
        """The :class:`Trainer`'s counters, summed over every child this
        object started (as of each child's latest report), plus ``dropped``
        and ``dropped_examples`` (not delivered), ``sent`` (batches queued),
        ``buffer`` (the child's buffer), ``restarts`` and ``pid``."""
        with self._lock:
            ch = self._child
            cur = ch.stats if ch is not None else {}
            last = self._last
            summed = {k: v + cur.get(k, 0) for k, v in self._done.items()}
            return dict(state=self.state, train_steps=summed["train_steps"],
                        skipped_steps=summed["skipped_steps"], rounds=summed["rounds"], pushes=self.pushes,
                        refused=summed["refused"], push_errors=self.push_errors, revocabs=summed["revocabs"],
                        errors=self.errors + summed["errors"], last_error=self.last_error,
                        last_loss=last.get("last_loss", float("nan")),
                        candidate_metric=last.get("candidate_metric"), live_metric=last.get("live_metric"),
                        train_seconds=summed["train_seconds"], dropped=self.dropped,
                        dropped_examples=self.dropped_examples, sent=self.sent,
                        buffer=dict(last.get("buffer") or {}), restarts=self.restarts,
                        pid=ch.proc.pid if ch is not None else None)


# ---- the child --------------------------------------------------------------------------------

class _ChildTrainer(Trainer):
    """The Trainer in the child: the live version is the twin of the weights
    the parent last accepted (or, while unknown, the parent's measurement of
    its native head), and a push is a request that the parent answers."""

    def __init__(self, link: "_Link", head: DraftHead, buffer: ReplayBuffer, live_head: Optional[DraftHead],
                 revocab: bool, **kwargs):
        super().__init__(head, buffer, None, counts=link.latest_counts if revocab else None, **kwargs)
        self.link, self.live_head = link, live_head
        # Batches with rows still to fill, from the inbox thread. The main
        # thread fills them (torch work), between steps: a daemon thread that
        # is inside torch when the child exits aborts it.
        self._unfilled: "queue.Queue" = queue.Queue()

    def receive(self, ex) -> None:
        """The inbox thread's entry: a complete batch goes to the buffer now,
        one with rows to fill waits for the main thread."""
        if ex.missing_targets().any():
            self._unfilled.put(ex)
        else:
            self.buffer.add(ex)

    def ingest(self) -> None:
        while True:
            try:
                ex = self._unfilled.get_nowait()
            except queue.Empty:
                return
            try:
                self.add_examples(ex)
            except ValueError as e:
                self.link.refused(e)

    def measure_live(self, batch: Batch) -> Optional[float]:
        if self.live_head is not None:
            return head_metric(self.live_head, batch)
        return self.link.measure(batch)

    def record_live(self, metric: float) -> None:
        self.link.send(("live_metric", metric))

    def push(self, weights: dict, metric: Optional[float]) -> Optional[int]:
        verdict = self.link.request(("push", weights, metric), "pushed")
        if verdict is None:        # stopping: the parent may still apply it, and counts it if so
            return None
        version, error = verdict
        if version is None:        # refused; the parent counts it among its errors
            self.push_errors += 1
            return None
        self.pushes += 1
        if self.live_head is None:
            self.live_head = self.head.twin()
        self.live_head.load_export(weights)
        return version

    def round(self, throttle: bool = False) -> dict:
        out = super().round(throttle)
        self.link.report()
        return out


class _Link:
    """The child's ends of the channels: one lock for writing results (the
    main and inbox threads both write), replies for the main thread."""

    def __init__(self, ctrl: Connection, examples: "_FrameReader", results: Connection):
        self.ctrl, self.examples, self.results = ctrl, examples, results
        self.send_lock = threading.Lock()
        self.replies: "queue.Queue" = queue.Queue()
        self.stop = threading.Event()
        self.counts: Optional[np.ndarray] = None
        self.vocab = 0
        self.trainer: Optional[_ChildTrainer] = None
        self.buffer: Optional[ReplayBuffer] = None
        self.received = 0               # example batches received
        self.rejected = 0               # batches the buffer refused
        self.inbox_error: Optional[str] = None
        self._seq = 0

    def send(self, msg) -> None:
        with self.send_lock:
            self.results.send(msg)

    def refused(self, e: ValueError) -> None:
        """Counts and reports a batch the replay buffer refused (the inbox's
        complete batches and the main thread's filled ones alike)."""
        self.rejected += 1
        self.trainer._record_error(f"examples refused by the replay buffer: {e}")

    def latest_counts(self) -> np.ndarray:
        return self.counts if self.counts is not None else np.zeros(self.vocab, np.int64)

    def request(self, msg, reply: str):
        """Sends a request and waits for its reply (None if asked to stop meanwhile)."""
        self._seq += 1
        seq = self._seq
        self.send((msg[0], seq) + tuple(msg[1:]))
        while not self.stop.is_set():
            try:
                got = self.replies.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if got[0] == reply and got[1] == seq:
                return got[2:] if len(got) > 3 else got[2]
        return None

    def measure(self, batch: Batch) -> Optional[float]:
        return self.request(("measure", batch.parent_feature.numpy(), batch.token.numpy(),
                             batch.topk_ids[:, 0].numpy()), "measured")

    def stats(self) -> dict:
        st = self.trainer.stats()
        st["buffer"] = self.buffer.stats()
        st["received"], st["rejected"] = self.received, self.rejected
        return st

    def report(self) -> None:
        self.send(("stats", self.stats()))

    def inbox(self) -> None:
        """Fills the buffer from the examples pipe, answers control messages,
        reports every REPORT_SECONDS; control first when both wait."""
        try:
            conns = [self.ctrl, self.examples]
            last = time.monotonic()
            while True:
                ready = wait(conns, timeout=REPORT_SECONDS)
                if self.ctrl in ready:
                    try:
                        msg = self.ctrl.recv()
                    except (EOFError, OSError):   # the serving process is gone: stop with it
                        self.stop.set()
                        self.trainer._stop.set()
                        return
                    if msg[0] == "stop":
                        self.stop.set()
                        self.trainer._stop.set()
                    elif msg[0] == "held_out":
                        self.send(("held_out", msg[1], _batch_arrays(self.buffer.held_out_batch())))
                    else:
                        self.replies.put(msg)
                elif self.examples in ready:
                    try:
                        msg = self.examples.recv()
                    except (EOFError, OSError):
                        conns.remove(self.examples)
                        continue
                    if msg[0] == "examples":
                        self.received += 1
                        try:
                            self.trainer.receive(msg[1])
                        except ValueError as e:
                            self.refused(e)
                    elif msg[0] == "counts":
                        self.counts = msg[1]
                now = time.monotonic()
                if now - last >= REPORT_SECONDS:
                    last = now
                    self.report()
        except Exception:  # noqa: BLE001 - reported by the main thread, which then exits
            self.inbox_error = traceback.format_exc()
            self.stop.set()
            self.trainer._stop.set()


def child_main(argv) -> int:
    """The trainer process: ``argv`` holds the file descriptors of its
    control, examples and results pipes. Returns the exit code."""
    ctrl = Connection(int(argv[0]), writable=False)
    examples = _FrameReader(int(argv[1]))
    results = Connection(int(argv[2]), readable=False)
    link = _Link(ctrl, examples, results)
    try:
        init = ctrl.recv()
        tables = []
        for _ in range(1 + int(init["own_lm_head"])):
            t = np.empty(init["shape"], np.float32)
            _read_into(ctrl.fileno(), memoryview(t).cast("B"))
            tables.append(torch.from_numpy(t))
    except (EOFError, OSError):
        return 1   # the serving process went away before we started
    trainer = None
    try:
        s = dict(init["settings"])
        if s["threads"]:
            torch.set_num_threads(s["threads"])
        cfg = init["config"]
        embed = tables[0]
        lm_head = tables[1] if init["own_lm_head"] else embed

        def twin(weights):
            h = DraftHead(embed, lm_head, weights["draft_ids"], intermediate=cfg["intermediate"], eps=cfg["eps"])
            h.load_export(weights)
            return h

        head = twin(init["weights"])
        live = twin(init["weights"] if init["live_is_start"] else init["live_weights"]) \
            if init["live_is_start"] or init["live_weights"] is not None else None
        link.vocab = cfg["vocab"]
        link.buffer = ReplayBuffer(cfg["hidden"], **init["buffer"])
        trainer = link.trainer = _ChildTrainer(link, head, link.buffer, live, init["revocab"], **s)
        trainer.state = "running"
        threading.Thread(target=link.inbox, name="atlas-trainer-inbox", daemon=True).start()
        trainer.run_rounds()
        if link.inbox_error is not None:
            raise RuntimeError(f"the trainer process's inbox failed:\n{link.inbox_error}")
    except Exception:  # noqa: BLE001 - sent to the parent, which reports it
        try:
            link.send(("failed", traceback.format_exc(), link.stats() if trainer is not None else {}))
        except (OSError, ValueError):
            pass
        return 1
    trainer.state = "stopped"
    try:
        link.send(("stopped", link.stats(), head.export()))
    except (OSError, ValueError):
        return 1
    return 0
