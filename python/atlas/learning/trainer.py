"""The trainer: distils the target into a copy of the draft head and pushes
better weights to the live speculator.

Vocabulary:

* **candidate**: the trainer's own PyTorch :class:`~atlas.learning.head.DraftHead`,
  trained continuously with Adam on :func:`~atlas.learning.head.distillation_loss`
  over replay-buffer samples;
* **average**: an exponential moving average of the candidate's weights
  (decay ``ema`` per step), what rounds evaluate and push (``ema=0``: the
  candidate itself);
* **live**: the weight version the :class:`~atlas.speculators.LearnedSpeculator`
  serves with (its native head);
* **round**: ``steps_per_round`` training steps, then an evaluation of the
  average and live on the held-out slice of the buffer, then a push of the
  average if it beats the live version by more than ``min_gain``;
* **metric** (expected greedy acceptance at depth 1): the share of held-out
  nodes at which the head's argmax token, given the true parent feature and
  token, is the target's greedy choice (top-1 of the tapped distribution).
  That is the probability that greedy verification accepts the head's first
  draft token. The live version is evaluated through its native
  forward (what serves), the average through the twin with its matrices
  rounded to bfloat16 as a push rounds them
  (:meth:`~atlas.learning.head.DraftHead.forward_native`), so that both
  numbers measure the function that serves or would serve.

A training step can add a second, *self-fed* term for the rows whose parent
example is still in the buffer: the head's input feature is its own
prediction at the parent node (from the parent example's inputs) instead of
the target's, as drafting does below depth 1 (EAGLE's remedy for compounding
feature error). ``self_feed`` is the share of a batch's rows that get it (1:
all, the default, what ``atlas distill`` trains with; 0: none, the learning
loop's default, see ``atlas.learning.loop.LOOP_SELF_FEED``): it costs
a second forward and backward over those rows.

``train_output=False`` freezes the head's output layer ``W_out`` (the
target's LM head rows of the draft tokens, as the static head left them;
rows that a new draft vocabulary brings in start from the target's LM head
as always): the learning loop's default (``LOOP_TRAIN_OUTPUT``), where
a step's cost includes what it does to serving (see there).

Why an average: Adam at a constant learning rate (a continual learner has
no schedule to anneal) leaves the weights wandering around the optimum, and
the held-out metric of the latest weights jumps by a point or two from one
round to the next; the average of the last few dozen steps sits nearer the
optimum. Measured on SmolLM2-135M (the tapped records of 123 HumanEval
requests arriving in order, 200 steps spread over them, depth-1 greedy
acceptance on the other 41 requests' outputs): 0.458 for the latest weights,
0.486 for their average at decay 0.95 and 0.489 at 0.98 (350 steps: 0.453,
0.485 and 0.492). An update costs an ``lerp`` over the weights, about 2 ms.

Arithmetic: ``precision`` ``"bfloat16"`` runs the step's matrix products in
bfloat16 under ``torch.autocast`` (weights, gradients and Adam's moments stay
float32), ``"float32"`` in float32; ``"auto"`` (the default) picks bfloat16
where the CPU has bfloat16 dot products (``atlas._native.cpu_features()``:
AVX-512 BF16 or AMX), where it is the faster, and float32 elsewhere. Adam is
torch's fused implementation where torch has one for the CPU (2.4 and
later). Measured on this project's 2-core AMD EPYC (AVX-512 BF16), one
thread, batch 256 without the self-fed term: 96 ms a step in float32 with
the for-loop Adam, 78 with the fused one, 55 in bfloat16 with the fused one;
per second of CPU the bfloat16 steps learn faster (the static head trained
on the outputs of 123 HumanEval requests, scored on the other 41: 0.493
after 40 s against 0.462), per step as fast (0.458 against 0.458 after the
200 steps above).

Where it runs: :class:`Trainer` is the training logic and a background
thread to run it in; :class:`~atlas.learning.process.TrainerProcess` runs the
same rounds in a child process, which the learning loop uses by default
(``LearningLoop(..., process=False)`` keeps the thread). Why a process: a
thread trains only while it holds the GIL, which the serving thread wants
for every step, so it trains in the gaps serving leaves even with a core of
its own (measured earlier: serving on one torch thread, ``Engine(threads=1)``,
left the thread a core; it ran 20 steps a minute, serving at 22.6 tokens/s);
in a process its share of the CPU is the operating system's to give, and
``nice`` sets it. The price is a second copy of the target's embedding (113
MB for SmolLM2) in the child, a few seconds of start-up (importing torch),
and examples that travel through a pipe (bounded: a batch that does not fit
is dropped, and counted). Either way these settings bound the trainer's
share:

* ``threads``: the trainer's torch intra-op thread count (default 1). In a
  thread, ``torch.set_num_threads`` sets that thread's OpenMP team size and
  threads torch already initialised (the serving thread) keep theirs
  (measured); threads that first use torch while the trainer runs start
  from its value, and the trainer sets the process's value back when it
  stops. In a process it is the child's own;
* ``nice`` (Linux): niceness raised by this much (a thread's default 10,
  about a tenth of a core's weight when serving competes; a process's 5, see
  ``atlas.learning.loop.PROCESS_NICE``): the trainer thread's own (Linux
  applies ``setpriority`` to one thread given its id), or the whole child's,
  from before it imports torch;
* ``max_share``: duty cycle; after a step that took t seconds of the
  trainer thread's CPU time, it sleeps ``t * (1 - max_share) / max_share``
  (default 0.25), which bounds its share of a core even on an otherwise idle
  machine where niceness does nothing (CPU time, not wall time: a step that
  was starved or paused does not buy a longer sleep);
* ``pause_during_forward`` (process mode, see
  :class:`~atlas.learning.loop.LearningLoop`): the child is stopped
  (``SIGSTOP``) while each target forward runs and continued after it.

On two cores there is no share that is free for serving: serving's two
OpenMP threads keep both busy, and a forward whose thread is preempted waits
for it at every barrier. Measured on this 2-core machine (full atlas,
``Engine(target, max_batch=1)``, SmolLM2-135M, 12 HumanEval requests x 64
tokens served in a row, about 20 s; serving on two torch threads; two runs
of each setting, alternating; learning off served 44.2 tokens/s, and runs of
one setting spread by up to 10% over the day):

=============================================  ===================  ======================
trainer                                        tokens/s (mean)      steps in the stream
=============================================  ===================  ======================
thread (threads=1, nice=10, max_share=0.25)    40.9                 2, 1
process, the same settings                     38.4                 0, 0
process, nice=5                                36.0                 4, 3
process, nice=0                                29.8                 14, 12
=============================================  ===================  ======================

So the GIL is not what starves the trainer on a machine that serving keeps
busy: the CPU share is. At the thread's settings the process trains no more
than the thread did (its first 3.5 s go to starting up: importing torch,
reading the tables, building its heads), for about the same cost to
serving; lowering ``nice`` buys steps, at about a third of serving
throughput for 30 steps a minute. The learning loop therefore pauses
the process during each target forward on the CPU, where a trainer beside
the forward stalls it at every barrier, and gives it niceness 0 (see
``atlas.learning.loop.PROCESS_NICE``): it trains in the gaps between
forwards (then about 20 steps of 256 a minute, for about a sixth of serving
throughput; with the engine's and the kernels' later changes, and the loop's
steps of 512 with the output layer frozen, about 50 steps a minute in
``bench/bench_atlas.py``'s stream, for 4% of serving throughput, see
``atlas.learning.loop.LOOP_TRAIN_OUTPUT``; the loop's steps are now of 128
examples, about 100 a minute there, and about 140 since the draft
vocabulary's default went from 4,096 to 2,048 tokens, about 150 since the
serving thread writes the examples into the child's pipe itself, and about
135 since serving's gaps got shorter again, the tap handing its examples
over a few steps at a time: 534-573 steps in the stream against 617-628).
The child stays in the serving process's session: Linux shares the CPU
equally between sessions (autogroups), and a child in a session of its own
got half the machine whatever its niceness (about 48 steps a minute,
serving at 32 tokens/s).
Not measured yet: a machine where serving leaves cores idle (more cores
than its threads, or serving on a GPU), where the process should train on a
core of its own at the duty cycle's rate without slowing serving (a thread
there still waits for the GIL); and how much acceptance a long stream gains
from the extra steps.

Serving never waits on training. In a thread: the buffer lock covers only
row copies, the candidate is a separate module, and the live version is
evaluated natively in chunks of ``EVAL_CHUNK`` rows (the native head's
workspace lock is held for one chunk at a time: a drafting step waits 0.65 ms
at most on SmolLM2, and only while an evaluation runs, once a round). In a
process: the tap's batches are queued without waiting, and the live version
is evaluated on a twin in the child (through its forward_native, the
native head's function). A trainer that raises is logged, counted in
:meth:`Trainer.stats`, and stops; serving goes on with the last good weights
and :meth:`Trainer.start` restarts it. A push the native head refuses (wrong
shapes, non-finite values, matrix values beyond bfloat16's range) is counted
as an error too, and the live version keeps serving. :mod:`atlas.learning.process` lists what a
trainer process adds (a child that dies, a full channel).
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .. import placement
from .head import DraftHead, choose_draft_vocab
from .replay import Batch, ReplayBuffer
from .tap import Examples

log = logging.getLogger("atlas.learning")

PRECISIONS = ("auto", "float32", "bfloat16")

# Rows per native forward when evaluating the live version: a drafting step
# that needs the head's workspace lock meanwhile waits for one chunk at most,
# for SmolLM2's head with 4096 draft tokens 0.35 ms with its weights in the
# caches, 0.65 ms with them evicted (16 rows: 1.6 and 1.7 ms).
EVAL_CHUNK = 4
# Seconds between checks for enough data or a stop request while idle.
POLL_SECONDS = 0.05


def head_metric(head: DraftHead, batch: Batch) -> float:
    """Expected greedy acceptance at depth 1 of a twin on a batch (see the
    module docstring), as the native head would compute it from the twin's
    weights (matrices rounded to bfloat16)."""
    with torch.no_grad():
        _, logits = head.forward_native(batch.parent_feature, batch.token)
        pred = head.draft_ids[logits.argmax(-1)]
        return float((pred == batch.topk_ids[:, 0]).float().mean())


def native_metric(native, batch: Batch) -> float:
    """The same metric for the live version of a native ``DraftHead``."""
    return native_metric_arrays(native, batch.parent_feature.numpy(), batch.token.numpy(),
                                batch.topk_ids[:, 0].numpy())


def native_metric_arrays(native, features: np.ndarray, tokens: np.ndarray, top1: np.ndarray) -> float:
    """:func:`native_metric` on the arrays it reads: parent features ``[n, H]``,
    tokens ``[n]`` and the target's greedy choices ``[n]`` (what a trainer
    process sends to the serving process, which owns the native head)."""
    snap = native.snapshot()
    if snap is None:
        return 0.0
    ids = snap.draft_ids.astype(np.int64)
    feats = np.asarray(features, np.float32)
    toks = np.asarray(tokens).astype(np.int32)
    top1 = np.asarray(top1)
    hits = 0
    for lo in range(0, len(toks), EVAL_CHUNK):
        hi = min(lo + EVAL_CHUNK, len(toks))
        f_hat = np.empty((hi - lo, native.hidden), np.float32)
        logits = np.empty((hi - lo, native.draft_vocab), np.float32)
        snap.forward(np.ascontiguousarray(feats[lo:hi]), np.ascontiguousarray(toks[lo:hi]), f_hat, logits)
        hits += int((ids[logits.argmax(-1)] == top1[lo:hi]).sum())
    return hits / max(len(toks), 1)


def fill_targets(ex: Examples, head: DraftHead, cache: Optional[dict] = None) -> Examples:
    """``ex`` with targets for its rows that have none (:meth:`Examples.missing_targets`,
    the prompt rows of ``Tap(prompt_examples=True)``): the target's k largest
    logits among ``head``'s draft vocabulary and their token ids, computed
    from each row's feature (the target's final-norm hidden state there) and
    the target's LM head rows of those tokens (``head.lm_head``), in float32.
    Only the draft vocabulary, not the whole one: the loss renormalises the
    target's distribution over the tokens the head can draft anyway, and the
    rows cost ``draft_vocab * H`` multiply-adds each, not ``vocab * H`` (for
    SmolLM2's head 4096 of 49152 tokens: about 10 ms of one core for a
    150-token prompt, against a trainer step's 20). So a prompt row's greedy choice in the held-out metric
    is the best draft token's, which the head can always draft. ``cache``
    (a dict the caller keeps) holds the gathered LM head rows between calls
    with the same draft vocabulary. Returns ``ex`` itself when nothing is
    missing."""
    missing = ex.missing_targets()
    if not missing.any():
        return ex
    # One copy of the ids, used for the rows and the token ids alike: a
    # re-chosen vocabulary (another thread's) changes which tokens score, not
    # whether a logit belongs to its token.
    ids = head.draft_ids.numpy().astype(np.int64)
    cache = {} if cache is None else cache
    if cache.get("ids") is None or not np.array_equal(cache["ids"], ids):
        cache["ids"] = ids
        cache["rows"] = head.lm_head[torch.from_numpy(ids)].to(torch.float32).contiguous()
    k = ex.topk_ids.shape[1]
    top_ids, top_l = ex.topk_ids.copy(), ex.topk_logits.copy()
    with torch.no_grad():
        logits = torch.from_numpy(np.ascontiguousarray(ex.feature[missing], np.float32)) @ cache["rows"].T
        kk = min(k, logits.shape[1])
        vals, cols = torch.topk(logits, kk, dim=-1)
    rows = np.flatnonzero(missing)
    top_ids[rows, :kk] = ids[cols.numpy()].astype(np.int32)
    top_l[rows, :kk] = vals.numpy()
    top_ids[rows, kk:] = -1
    top_l[rows, kk:] = -np.inf
    return Examples(ex.parent_feature, ex.token, top_ids, top_l, ex.feature, ex.parent_back)


def bf16_dot_products() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16
    or AMX-BF16), where torch's bfloat16 products beat float32's."""
    from .. import _native
    features = _native.cpu_features()
    return bool(features["avx512_bf16"] or features["amx_bf16"])


def resolve_precision(precision: str) -> str:
    """``"float32"`` or ``"bfloat16"`` for a ``precision`` setting (see the
    module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if bf16_dot_products() else "float32"
    return precision


class FusedAdam:
    """Adam with torch's defaults (betas 0.9 and 0.999, eps 1e-8, no weight
    decay) over float32 tensors, each step one call of the kernel that
    ``torch.optim.Adam(fused=True)`` runs (``torch._fused_adam_``), with the
    same state: the same updates, bit for bit (a test compares them). Why not
    ``torch.optim.Adam`` itself: the first optimizer torch.optim makes in a
    process imports ``torch._dynamo``, 2.0 s of the serving thread measured
    there (the learning loop's first request-local fit, in the stream's
    first request). The subset of an optimizer that atlas uses:
    ``zero_grad``, ``step`` (parameters without a gradient are left as they
    are), ``state`` (per parameter, created at its first step: ``step``,
    ``exp_avg``, ``exp_avg_sq``) and ``param_groups`` (one group)."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.lr = float(lr)
        self.state: Dict[torch.Tensor, Dict[str, torch.Tensor]] = {}

    @property
    def param_groups(self) -> list:
        return [{"params": self.params, "lr": self.lr}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        ps = [p for p in self.params if p.grad is not None]
        if not ps:
            return
        for p in ps:
            if p not in self.state:
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                 "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        st = [self.state[p] for p in ps]
        steps = [s["step"] for s in st]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(ps, [p.grad for p in ps], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                           [], steps, lr=self.lr, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                           amsgrad=False, maximize=False)


def adam(params, lr: float):
    """Adam over ``params``: :class:`FusedAdam` on the CPU where this torch
    has the fused kernel, else ``torch.optim.Adam``."""
    params = list(params)
    if hasattr(torch, "_fused_adam_") and all(p.device.type == "cpu" and p.dtype == torch.float32
                                              for p in params):
        return FusedAdam(params, lr)
    return torch.optim.Adam(params, lr=lr)


def _lower_thread_priority(nice: int) -> None:
    if nice <= 0 or not sys.platform.startswith("linux") or not hasattr(threading, "get_native_id"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as e:  # a sandbox may forbid it; the duty cycle still bounds the share
        log.debug("could not raise the trainer thread's niceness: %s", e)


def check_head_fits(head: DraftHead, speculator) -> None:
    """Raises ValueError unless ``head``'s shapes are those of the
    speculator's native head (what a trainer pushes to)."""
    nat = speculator.native
    if (nat.hidden, nat.intermediate, nat.draft_vocab) != (head.hidden, head.intermediate, head.draft_vocab):
        raise ValueError(
            f"head (hidden {head.hidden}, intermediate {head.intermediate}, draft_vocab {head.draft_vocab}) "
            f"does not match the speculator's native head (hidden {nat.hidden}, intermediate "
            f"{nat.intermediate}, draft_vocab {nat.draft_vocab})")


def _check_settings(*, lr, batch_size, steps_per_round, min_held_out, threads, max_share, self_feed=1.0,
                    train_output=True, ema=0.0, precision="auto", **_) -> None:
    for name, v in (("batch_size", batch_size), ("steps_per_round", steps_per_round),
                    ("min_held_out", min_held_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0: leave torch's setting), got {threads!r}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not isinstance(self_feed, (int, float)) or not 0.0 <= float(self_feed) <= 1.0:
        raise ValueError(f"self_feed must be a share in [0, 1] (True: 1, False: 0), got {self_feed!r}")
    if not isinstance(train_output, (bool, np.bool_)):
        raise ValueError(f"train_output must be a bool, got {train_output!r}")
    if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0.0 <= float(ema) < 1.0:
        raise ValueError(f"ema must be a decay in [0, 1) (0: no average), got {ema!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


class Trainer:
    """Trains ``head`` (the candidate, a :class:`DraftHead`) on ``buffer`` and
    pushes to ``speculator`` (a :class:`LearnedSpeculator`; None: train and
    evaluate only, as :func:`atlas.learning.distill` does).

    ``counts`` (a callable returning ``[vocab]`` token counts of traffic)
    enables re-choosing the draft vocabulary before each round: when the most
    frequent tokens of traffic differ from the candidate's draft vocabulary
    in at least ``revocab_min_change`` of its entries, new tokens replace the
    least used (their output rows start from the target's LM head, which the
    head keeps; kept tokens keep their trained rows). ``on_push(version,
    weights, metric)`` is called after each push (the learning loop writes
    its checkpoint there).
    """

    # The keyword settings (everything but the objects the trainer is wired to).
    SETTINGS = ("lr", "batch_size", "steps_per_round", "feature_weight", "self_feed", "train_output", "ema",
                "precision", "min_gain", "min_train", "min_held_out", "threads", "nice", "max_share",
                "revocab_min_change", "seed")

    @classmethod
    def check_settings(cls, **settings) -> dict:
        """Checks keyword settings as the constructor would, without building a
        trainer (a trainer process checks them in the serving process, where
        the caller sees the error); returns every setting, defaults filled in."""
        unknown = sorted(set(settings) - set(cls.SETTINGS))
        if unknown:
            raise TypeError(f"unknown trainer settings {unknown}; the settings are {list(cls.SETTINGS)}")
        params = inspect.signature(cls.__init__).parameters
        full = {name: settings.get(name, params[name].default) for name in cls.SETTINGS}
        _check_settings(**full)
        return full

    def __init__(self, head: DraftHead, buffer: ReplayBuffer, speculator=None, *,
                 counts: Optional[Callable[[], np.ndarray]] = None,
                 lr: float = 2e-3, batch_size: int = 256, steps_per_round: int = 20,
                 feature_weight: float = 1.0, self_feed: float = 1.0, train_output: bool = True,
                 ema: float = 0.98, precision: str = "auto", min_gain: float = 0.0,
                 min_train: Optional[int] = None, min_held_out: int = 32, threads: int = 1, nice: int = 10,
                 max_share: float = 0.25, revocab_min_change: float = 0.02,
                 on_push: Optional[Callable[[int, dict, float], None]] = None, seed: int = 0):
        if head.hidden != buffer.hidden:
            raise ValueError(f"head hidden size {head.hidden} != buffer hidden size {buffer.hidden}")
        if speculator is not None:
            check_head_fits(head, speculator)
        _check_settings(lr=lr, batch_size=batch_size, steps_per_round=steps_per_round,
                        min_held_out=min_held_out, threads=threads, max_share=max_share, self_feed=self_feed,
                        train_output=train_output, ema=ema, precision=precision)
        self.head, self.buffer, self.speculator = head, buffer, speculator
        self.counts = counts
        self.lr, self.batch_size, self.steps_per_round = float(lr), batch_size, steps_per_round
        self.feature_weight, self.self_feed, self.min_gain = float(feature_weight), float(self_feed), float(min_gain)
        self.min_train = batch_size if min_train is None else int(min_train)
        self.min_held_out = min_held_out
        self.threads, self.nice, self.max_share = threads, int(nice), float(max_share)
        self.revocab_min_change = float(revocab_min_change)
        self.on_push = on_push
        self.rng = np.random.default_rng(seed)
        self.ema, self.precision = float(ema), resolve_precision(precision)
        # What rounds evaluate and push: the average of the candidate's weights.
        self.average = head.twin() if self.ema > 0 else head
        self.train_output = bool(train_output)
        head.w_out.requires_grad_(self.train_output)
        self.opt = adam(self._trained(), self.lr)
        # Counters (read by stats(); written by the one thread that trains).
        self.steps_done = 0
        self.skipped_steps = 0        # non-finite losses, not applied
        self.rounds = 0
        self.pushes = 0
        self.refused = 0              # candidates that did not beat the live version
        self.push_errors = 0          # pushes the native head refused
        self.revocabs = 0
        self.errors = 0               # every error, push refusals and trainer failures alike
        self.last_error: Optional[str] = None
        self.last_loss = float("nan")
        self.candidate_metric: Optional[float] = None
        self.live_metric: Optional[float] = None
        self.seconds = 0.0            # wall time inside training steps
        self.state = "idle"           # idle | running | stopped | error
        self._thread: Optional[threading.Thread] = None
        self._cpus: set = set()         # where the worker runs (place); empty: anywhere
        self._stop = threading.Event()
        self._target_rows: dict = {}   # fill_targets' cache of LM head rows

    # ---- training --------------------------------------------------------------------

    def loss(self, batch: Batch):
        """Distillation loss of the candidate on a batch, plus the self-fed term."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            return self._loss(batch)

    def _loss(self, batch: Batch):
        head = self.head
        loss, info = head.loss(batch.parent_feature, batch.token, batch.feature, batch.topk_logits,
                               batch.topk_ids, feature_weight=self.feature_weight)
        m = batch.has_parent
        if self.self_feed < 1.0:
            # The self-fed term for the first self_feed share of the batch's
            # rows (samples come in random order).
            m = m.clone()
            m[int(round(self.self_feed * len(m))):] = False
        if bool(m.any()):
            f_prev, _ = head(batch.parent_parent_feature[m], batch.parent_token[m])
            loss2, _ = head.loss(f_prev, batch.token[m], batch.feature[m], batch.topk_logits[m],
                                 batch.topk_ids[m], feature_weight=self.feature_weight)
            loss = loss + loss2
        return loss, info

    def train_steps(self, n: int, throttle: bool = False) -> int:
        """Up to n Adam steps on buffer samples (fewer if stopped or the buffer
        has no training data); returns how many ran. ``throttle`` applies the
        duty cycle."""
        done = 0
        for _ in range(n):
            if throttle and self._stop.is_set():
                break
            self.ingest()
            batch = self.buffer.sample(self.batch_size, self.rng)
            if batch is None:
                break
            t0, c0 = time.perf_counter(), time.thread_time()
            loss, _ = self.loss(batch)
            if torch.isfinite(loss):
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self._update_average()
                self.last_loss = float(loss.detach())
            else:
                self.skipped_steps += 1
            self.seconds += time.perf_counter() - t0
            cpu = time.thread_time() - c0
            self.steps_done += 1
            done += 1
            if throttle and self.max_share < 1.0:
                self._stop.wait(cpu * (1.0 - self.max_share) / self.max_share)
        return done

    def _trained(self):
        """The candidate's parameters that training updates (all but a frozen
        output layer)."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def _update_average(self) -> None:
        if self.average is self.head:
            return
        with torch.no_grad():
            for avg, p in zip(self.average.parameters(), self.head.parameters()):
                if p.requires_grad:   # a frozen one equals its average
                    avg.lerp_(p, 1.0 - self.ema)

    def add_examples(self, ex: Examples) -> None:
        """Adds tapped examples to the buffer, first computing the targets of
        rows that have none (:func:`fill_targets`, with the candidate's draft
        vocabulary): what the learning loop's tap feeds."""
        self.buffer.add(fill_targets(ex, self.head, self._target_rows))

    def ingest(self) -> None:
        """Called by the training thread before each step and while it waits
        for data: a trainer process adds the batches that arrived meanwhile
        (here nothing: examples were added when they came)."""

    def ready(self) -> bool:
        """Enough data for a round: a training region of min_train examples and
        a held-out slice of min_held_out."""
        return self.buffer.train_size >= self.min_train and self.buffer.held_out_size >= self.min_held_out

    # ---- the vocabulary -----------------------------------------------------------------

    def maybe_revocab(self) -> bool:
        """Re-chooses the candidate's draft vocabulary from traffic counts (see
        the class docstring); True when it changed."""
        if self.counts is None:
            return False
        head = self.head
        counts = np.asarray(self.counts(), np.float64)
        if counts.sum() == 0 or head.draft_vocab >= head.vocab:
            return False
        current = head.draft_ids.numpy()
        # Half a count of credit to the current tokens: an unseen token never
        # displaces one, and equal counts keep the current vocabulary.
        score = counts.copy()
        score[current] += 0.5
        new = choose_draft_vocab(score, head.draft_vocab)
        changed = head.draft_vocab - len(np.intersect1d(new, current, assume_unique=True))
        if changed < max(1, self.revocab_min_change * head.draft_vocab):
            return False
        old_col = head.full_to_draft.numpy()[new]               # [Vd], -1 for new tokens
        fresh = head.lm_head[torch.from_numpy(new.astype(np.int64))].numpy()
        kept = old_col >= 0
        for h in [head] if self.average is head else [head, self.average]:
            weights = h.export()
            w_out = fresh.copy()
            w_out[kept] = weights["w_out"][old_col[kept]]
            weights["w_out"], weights["draft_ids"] = w_out, new
            h.load_export(weights)
        # The parameters keep their identity (loaded in place), and Adam's
        # moments with them: only a trained output layer's rows moved, and its
        # moments move with them (zero for the new rows). Restarting Adam
        # instead, at each of the 7 or 8 re-choices of a HumanEval stream,
        # threw away what it had learnt of every matrix's gradient scale
        # (measured in the simulated stream of atlas.learning.loop, 600 steps
        # with a re-choice every 10 requests: 0.499 restarting, 0.498 not;
        # without re-choices 0.502: no effect beyond noise there).
        st = self.opt.state.get(head.w_out) if self.train_output else None
        if st:
            src = torch.from_numpy(old_col[kept].astype(np.int64))
            dst = torch.from_numpy(np.flatnonzero(kept))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    moved = torch.zeros_like(st[key])
                    moved[dst] = st[key][src]
                    st[key].copy_(moved)
        self.revocabs += 1
        log.info("draft vocabulary: %d of %d tokens replaced by frequent traffic tokens", changed,
                 head.draft_vocab)
        return True

    # ---- evaluation and pushes -------------------------------------------------------------

    def evaluate(self, batch: Optional[Batch] = None):
        """(the average's metric, live metric or None) on the held-out slice."""
        batch = self.buffer.held_out_batch() if batch is None else batch
        if batch is None:
            return None, None
        return head_metric(self.average, batch), self.measure_live(batch)

    def measure_live(self, batch: Batch) -> Optional[float]:
        """The live version's metric on a batch, through its native forward
        (what serves); None without a speculator."""
        return native_metric(self.speculator.native, batch) if self.speculator is not None else None

    def record_live(self, metric: float) -> None:
        """Records the latest held-out measurement of the version serving now
        in the speculator's history (a version pushed long ago may have left
        the history: nothing to record)."""
        live_version = self.speculator.version
        if live_version > 0:
            try:
                self.speculator.native.set_metric(live_version, metric)
            except ValueError:
                pass

    def push(self, weights: dict, metric: Optional[float]) -> Optional[int]:
        """Pushes weights to the speculator; a refused push is counted and
        logged, and returns None (the live version keeps serving)."""
        try:
            version = self.speculator.push(weights, metric)
        except (ValueError, TypeError, RuntimeError) as e:
            self.push_errors += 1
            self._record_error(f"push refused: {e}")
            return None
        self.pushes += 1
        if self.on_push is not None:
            self.on_push(version, weights, metric)
        return version

    def round(self, throttle: bool = False) -> dict:
        """One round: maybe re-choose the vocabulary, train, evaluate, push if
        better. Returns what happened."""
        self.maybe_revocab()
        steps = self.train_steps(self.steps_per_round, throttle)
        out = dict(steps=steps, candidate=None, live=None, pushed=None)
        if throttle and self._stop.is_set():
            return out
        cand, live = self.evaluate()
        self.rounds += 1
        self.candidate_metric, self.live_metric = cand, live
        out.update(candidate=cand, live=live)
        if cand is None or live is None:  # nothing to push to (or no held-out data)
            return out
        self.record_live(live)
        if cand > live + self.min_gain:
            out["pushed"] = self.push(self.average.export(), cand)
        else:
            self.refused += 1
        return out

    # ---- the background worker --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts (or restarts, after an error or stop) the background worker."""
        if self.running:
            return
        self._stop.clear()
        self.state = "running"
        self._thread = threading.Thread(target=self._run, name="atlas-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: Optional[float] = 30.0) -> None:
        """Asks the worker to stop after its current step and waits for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the trainer did not stop within %s s", timeout)
            else:
                self._thread = None
        if self.state == "running":
            self.state = "stopped"

    def run_rounds(self) -> None:
        """Rounds (throttled) until stopped, waiting while the buffer has too
        little data; what the worker runs, in a thread or in a process."""
        while not self._stop.is_set():
            self.ingest()
            if not self.ready():
                self._stop.wait(POLL_SECONDS)
                continue
            self.round(throttle=True)

    def place(self, cpus) -> None:
        """Runs the background worker on ``cpus`` from now on (see
        :mod:`atlas.placement`; the learning loop passes what the engine
        hands it)."""
        self._cpus = set(cpus)
        t = self._thread
        if t is not None and t.native_id is not None:
            placement.set_thread_cpus(t.native_id, self._cpus)

    def _run(self) -> None:
        if self._cpus and placement.SUPPORTED:
            placement.set_thread_cpus(threading.get_native_id(), self._cpus)
        process_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        _lower_thread_priority(self.nice)
        try:
            self.run_rounds()
        except Exception as e:  # noqa: BLE001 - any failure is reported; serving keeps its weights
            log.exception("the learning loop's trainer failed; serving goes on with version %s",
                          self.speculator.version if self.speculator is not None else None)
            self._record_error(f"trainer failed: {type(e).__name__}: {e}")
            self.state = "error"
            return
        finally:
            if self.threads:
                # Threads that first use torch later start from the last value set:
                # give them the process's value back (this thread is ending).
                torch.set_num_threads(process_threads)
        self.state = "stopped"

    def _record_error(self, msg: str) -> None:
        self.errors += 1
        self.last_error = msg
        log.warning("atlas learning: %s", msg)

    def stats(self) -> dict:
        return dict(state=self.state, train_steps=self.steps_done, skipped_steps=self.skipped_steps,
                    rounds=self.rounds, pushes=self.pushes, refused=self.refused,
                    push_errors=self.push_errors,
                    revocabs=self.revocabs, errors=self.errors, last_error=self.last_error,
                    last_loss=self.last_loss, candidate_metric=self.candidate_metric,
                    live_metric=self.live_metric, train_seconds=self.seconds, precision=self.precision)
