"""The speculative decoding engine: the step loop of DESIGN.md.

One *step* is one target forward. For every active request the speculators
propose a draft tree whose root is the request's last emitted token; all
trees go through the target in one forward; the verifier keeps the accepted
path and a bonus token per request; the KV cache commits the accepted path.
With no speculator every tree is the root alone: plain decoding through the
same executor, the baseline every benchmark compares with.

Vocabulary: *accepted* tokens are draft tokens the target kept; the *bonus*
token is the one the target adds after them; *emitted* tokens are both; *tau*
is emitted tokens per target forward (the prefill forward counts: it emits the
first token).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from . import _native, placement
from ._native import CacheFullError
from .controller import Controller
from .tree import DraftTree
from .verify import Verifier

Prompt = Union[str, Sequence[int]]


@dataclass
class RequestStats:
    """Per-request statistics. Times are wall seconds of the steps the request
    took part in (a batched step counts fully for every request in it)."""

    prompt_tokens: int = 0
    steps: int = 0                    # target forwards, the prefill included
    drafted: int = 0                  # draft nodes verified (roots excluded)
    accepted: int = 0                 # draft tokens kept
    emitted: int = 0                  # tokens generated
    drafted_per_depth: List[int] = field(default_factory=list)   # steps that drafted depth d+1
    accepted_per_depth: List[int] = field(default_factory=list)  # steps that accepted depth d+1
    time_prefill: float = 0.0
    time_draft: float = 0.0           # speculators proposing
    time_verify: float = 0.0          # the target forward of decode steps
    time_other: float = 0.0           # everything else in decode steps: the engine's overhead

    @property
    def tau(self) -> float:
        """Tokens emitted per target forward."""
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance_per_depth(self) -> List[float]:
        """Fraction of the steps that drafted depth d+1 in which it was accepted."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_depth, self.drafted_per_depth)]

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["tau"] = self.tau
        d["acceptance_per_depth"] = self.acceptance_per_depth
        return d


@dataclass
class Output:
    """One generated completion."""

    token_ids: List[int]
    text: Optional[str]
    finish_reason: str               # "stop" (EOS or a stop string) or "length"
    stats: RequestStats


@dataclass
class StepRecord:
    """What the target computed in one forward, handed to every speculator's
    ``observe`` (the learned speculator reads its features from it; the
    learning tap records it). Rows are the forward's nodes, request after
    request: rows ``q_offsets[b]:q_offsets[b+1]`` belong to ``rids[b]``, in
    tree order (node 0 = root). For a prefill the nodes are the prompt (a
    chain) and ``logits`` holds only each prompt's last row."""

    prefill: bool
    rids: List[int]
    q_offsets: np.ndarray         # [B + 1] int64
    tokens: np.ndarray            # [total] int32
    parents: np.ndarray           # [total] int32, tree-local, -1 at each root
    hidden: torch.Tensor          # [total, hidden_size] final-norm hidden states (what the LM head reads)
    logits: torch.Tensor          # [total, vocab] (decode) or [B, vocab] (prefill) float32
    accepted: List[np.ndarray]    # per request: accepted node ids (tree-local), path order
    emitted: List[List[int]]      # per request: tokens emitted by this step (after EOS / budget cuts)

    def hidden_rows(self, rows) -> np.ndarray:
        """Rows of ``hidden`` (int indices) as a new float32 ``[len(rows),
        hidden_size]`` array on the host. A float32 CPU tensor is read
        through numpy: torch's indexing and conversions cost 20-40 us each
        between target forwards on the CPU (measured in full atlas, against
        about 2 us apiece in a loop of their own), a few times a step."""
        h = self.hidden.detach()
        if h.device.type == "cpu" and h.dtype == torch.float32:
            return h.numpy()[np.asarray(rows, np.int64)]
        idx = torch.as_tensor(np.asarray(rows, np.int64), device=h.device)
        return h[idx].to(torch.float32).cpu().numpy()


@dataclass
class _Request:
    index: int
    prompt: List[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: List[str]
    rid: int = 0                      # engine-wide request id, what speculators key their state on
    seq: int = -1
    generated: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    blocks_needed: int = 0
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def tokens(self) -> List[int]:
        return self.prompt + self.generated


def full_atlas(target, *, learning: bool = True, cache_dir=None, learning_options: Optional[dict] = None):
    """What ``Engine(target)`` runs by default: the suffix speculator, the
    adaptive learned speculator (learning from the traffic when ``learning``)
    and the static learned speculator (frozen: the speed floor and the
    adaptive one's starting point), with the controller falling back from the
    adaptive to the static one when it drifts below it. The static head is
    distilled on first use (``atlas distill``; minutes on a CPU) and kept,
    like the adaptive checkpoints, in the model's cache folder
    (``cache_dir``, default ``$ATLAS_CACHE_DIR`` or ``~/.cache/atlas``).
    ``learning_options``: keywords for the
    :class:`~atlas.learning.LearningLoop` (its own, such as
    ``pause_during_forward``, and its trainer's, such as ``lr`` or ``nice``).
    Returns (speculators, fallback, observers)."""
    from .learning import LearningLoop
    from .learning.distill import distill, static_head
    from .speculators import LearnedSpeculator, SuffixSpeculator

    head = static_head(target, cache_dir)
    if head is None and target.tokenizer is None:
        # No tokenizer, no text to distil from: both heads start untrained
        # (over the whole vocabulary, or its first DEFAULT_DRAFT_VOCAB ids)
        # and the adaptive one learns from traffic.
        import warnings

        import numpy as np

        from .learning.head import DEFAULT_DRAFT_VOCAB, DraftHead

        warnings.warn("atlas: this target has no tokenizer, so no static draft head can be distilled; "
                      "the learned speculators start untrained", stacklevel=3)
        head = DraftHead.from_target(target, np.arange(min(target.config.vocab_size, DEFAULT_DRAFT_VOCAB)))
    if head is None:
        print("atlas: no static draft head for this model yet: distilling one (once; `atlas distill`)", flush=True)
        # Lighter than `atlas distill`'s defaults so that a first run stays
        # within minutes on a CPU; `atlas distill` makes a better one.
        distill(target, out=cache_dir, tokens=4096, prompts=64, steps=600,
                progress=lambda msg: print("  " + msg, flush=True))
        head = static_head(target, cache_dir)
        if head is None:
            raise RuntimeError("distillation wrote no usable static draft head")
    static = LearnedSpeculator(head)
    adaptive = LearnedSpeculator(head)
    observers = []
    if learning:
        loop = LearningLoop(target, adaptive, head=head, cache_dir=cache_dir, **(learning_options or {}))
        loop.start()
        observers.append(loop)
    suffix = SuffixSpeculator(vocab_size=target.config.vocab_size)
    return [suffix, adaptive, static], (1, 2), observers


class Engine:
    """Serves generation requests for one target with optional speculators.

    ``target`` is what :func:`atlas.load` returns. ``speculators``: ``"auto"``
    (the default) is full atlas, see :func:`full_atlas` (``learning``,
    ``cache_dir`` and ``learning_options``, the learning loop's settings, go
    to it); a list of speculators (see
    :mod:`atlas.speculators`); or None for plain decoding.
    ``max_tree_nodes`` bounds each request's draft tree (root included); within
    it the :class:`~atlas.controller.Controller` picks each step's trees from
    the speculators' candidates (``fallback`` = (adaptive, static) speculator
    indices makes it fall back to the static one when the adaptive one drifts);
    ``observers`` see every forward's :class:`StepRecord` (the learning tap),
    and one with an ``attach(engine)`` method is handed the engine as it is
    made (the learning loop reads :meth:`speculation_value` through it);
    ``max_batch`` caps how many requests share a step; ``kv_cache_tokens`` sizes
    the paged KV cache (tokens of all requests together). Requests that do not
    fit wait for earlier ones to finish; one that cannot fit even alone raises
    :class:`atlas.CacheFullError`. ``threads``: torch threads of the target
    forwards (set for the duration of each ``generate`` / ``stream``; default:
    torch's count when the engine is made); when an observer trains between
    forwards on the CPU (the learning loop), the engine's own work there runs
    on one thread (see :meth:`_gap_threads`). The learning loop's trainer
    runs in a child process, stopped during each target forward on the CPU
    (see :mod:`atlas.learning.trainer`; an observer's ``forward_begins`` and
    ``forward_ends`` bracket each forward, its ``measurement_begins`` and
    ``measurement_ends`` the timing of forwards at the first serve, see
    :meth:`measure_forward_cost`); :meth:`close` stops it. ``device`` (e.g.
    ``"cuda"``) moves the target's weights there (in place) and runs its
    forward, the KV cache, tree attention and verification on that device;
    speculators draft on the host from host copies of what they read.
    ``pin_threads`` (default: on when the target runs on the CPU, on Linux):
    for each ``generate`` / ``stream`` the serving thread runs on one CPU of
    its own and atlas's helper threads (the native pool's workers, the draft
    heads' cache warm-up, the learning loop's trainer, handed the CPUs
    through an observer's ``place_threads(cpus)``) on the others, so that
    none is woken onto the serving thread's core (see
    :mod:`atlas.placement`); nothing happens with fewer than two CPUs.
    """

    def __init__(self, target, speculators="auto", *, max_tree_nodes: int = 32, max_batch: int = 8,
                 kv_cache_tokens: Optional[int] = None, block_size: int = 16,
                 controller: Optional[Controller] = None, fallback: Optional[tuple] = None,
                 observers: Sequence = (), learning: bool = True, cache_dir=None,
                 learning_options: Optional[dict] = None, threads: Optional[int] = None, device=None,
                 pin_threads: Optional[bool] = None):
        self._owned_observers = []
        if pin_threads is not None and not isinstance(pin_threads, bool):
            raise ValueError(f"pin_threads must be None, True or False, got {pin_threads!r}")
        if pin_threads and not placement.SUPPORTED:
            raise ValueError("pin_threads=True needs Linux (threads' CPUs set one by one); "
                             f"this is {sys.platform}")
        if learning_options is not None:
            # Checked before anything is built (a first run distils for minutes).
            if not isinstance(learning_options, dict):
                raise TypeError(f"learning_options must be a dict, got {type(learning_options).__name__}")
            if not (isinstance(speculators, str) and speculators == "auto") or not learning:
                raise ValueError("learning_options configure the default learning loop: they need "
                                 "speculators='auto' and learning=True")
            taken = sorted(set(learning_options) & {"target", "speculator", "head", "cache_dir"})
            if taken:
                raise ValueError(f"learning_options cannot set {taken}: the engine sets them "
                                 "(cache_dir is the engine's own argument)")
        if device is not None:
            device = torch.device(device)
            if target.model.device != device:
                target.model.to(device)   # raises when the device cannot run atlas
        self.device = target.model.device
        if isinstance(speculators, str):
            if speculators != "auto":
                raise ValueError(f"speculators must be 'auto', None or a list of speculators, got {speculators!r}")
            speculators, fallback, auto_observers = full_atlas(target, learning=learning, cache_dir=cache_dir,
                                                               learning_options=learning_options)
            observers = list(observers) + auto_observers
            self._owned_observers = auto_observers
        if speculators is not None and not isinstance(speculators, (list, tuple)):
            speculators = [speculators]
        self.target = target
        self.config = target.config
        self.speculators = list(speculators or [])
        if not isinstance(max_tree_nodes, int) or not 1 <= max_tree_nodes <= 1024:
            raise ValueError(f"max_tree_nodes must be an int in [1, 1024], got {max_tree_nodes!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.max_tree_nodes = max_tree_nodes if self.speculators else 1
        self.max_batch = max_batch
        self.block_size = block_size
        if kv_cache_tokens is None:
            kv_cache_tokens = max_batch * min(self.config.max_position_embeddings, 4096)
        if not isinstance(kv_cache_tokens, int) or kv_cache_tokens < block_size:
            raise ValueError(f"kv_cache_tokens must be an int >= block_size, got {kv_cache_tokens!r}")
        self.num_blocks = -(-kv_cache_tokens // block_size)
        # One sequence more than the batch: measure_forward_cost's scratch sequence.
        self.cache = target.new_cache(self.num_blocks, block_size=block_size, max_seqs=max_batch + 1)
        if self.device.type == "cuda":
            from . import cuda
            self.verifier = cuda.Verifier(self.config.vocab_size, self.device)
        else:
            self.verifier = Verifier(self.config.vocab_size, max_batch=max_batch, max_accept=self.max_tree_nodes)
        self.controller = None
        if self.speculators:
            self.controller = controller or Controller(len(self.speculators), max_nodes=self.max_tree_nodes,
                                                       fallback=fallback)
        self._cost_measured = False
        self._forward_timed = True   # whether the last serving forward ran undisturbed (see _forward)
        # Objects with observe(StepRecord) that see every forward (the learning loop's tap).
        self.observers = list(observers)
        if threads is None:
            threads = torch.get_num_threads()
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.threads = threads
        self.pin_threads = (self.device.type == "cpu" and placement.SUPPORTED) if pin_threads is None \
            else pin_threads
        self._next_seed = 0
        self._next_rid = 0
        self._live: Dict[int, _Request] = {}   # requests being served, by rid
        for o in self.observers:   # observers that weigh their work against what speculation saves
            attach = getattr(o, "attach", None)
            if attach is not None:
                attach(self)

    # ---- public API ---------------------------------------------------------------

    def close(self) -> None:
        """Stops what the engine started (the default learning loop, which
        waits for its trainer process to exit and checkpoints what it
        learnt). Also done on ``with Engine(...)`` exit. Observers passed in
        ``observers`` are the caller's to stop."""
        for o in self._owned_observers:
            o.stop()
        self._owned_observers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], max_new_tokens: int = 128, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: Optional[int] = None, stop: Optional[Sequence[str]] = None,
                 chat: bool = False) -> List[Output]:
        """Generates a completion for every prompt (strings, or lists of token ids).

        ``temperature=0`` is greedy; otherwise tokens are sampled with
        ``top_k`` (0 = off) and ``top_p`` (1 = off), reproducibly for a given
        ``seed`` (request i uses ``seed + i``). ``stop`` strings end a
        completion (the text is cut before them). ``chat=True`` applies the
        model's chat template to string prompts.
        """
        requests = self._make_requests(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, chat)
        for _ in self._run(requests):
            pass
        return [self._output(r) for r in requests]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, **kwargs) -> Iterator[List[int]]:
        """Generates one completion, yielding the token ids of each step as
        they are committed. Takes the keyword arguments of :meth:`generate`."""
        requests = self._make_requests([prompt], max_new_tokens, **self._stream_kwargs(kwargs))
        for _, new in self._run(requests):
            if new:
                yield new

    # ---- requests ------------------------------------------------------------------

    @staticmethod
    def _stream_kwargs(kwargs):
        allowed = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "stop": None, "chat": False}
        unknown = set(kwargs) - set(allowed)
        if unknown:
            raise TypeError(f"stream() got unexpected keyword arguments {sorted(unknown)}")
        return {k: kwargs.get(k, v) for k, v in allowed.items()}

    def _make_requests(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, chat):
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                        isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        temperature = float(temperature)
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        top_p = float(top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop)):
            raise ValueError("stop must be a list of non-empty strings")
        if seed is None:
            seed = self._next_seed
            self._next_seed += len(prompts)
        vocab = self.config.vocab_size
        max_ctx = self.config.max_position_embeddings
        requests = []
        for i, p in enumerate(prompts):
            ids = self._encode(p, chat, i)
            if len(ids) + 1 > max_ctx:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the model's context is {max_ctx} tokens")
            requests.append(_Request(i, ids, int(max_new_tokens), temperature, int(top_k), top_p,
                                     int(seed) + i, list(stop or [])))
            r = requests[-1]
            worst = min(len(ids) + int(max_new_tokens), max_ctx) + self.max_tree_nodes
            r.blocks_needed = -(-worst // self.block_size) + 1  # +1: copy on write of a shared tail
            if r.blocks_needed > self.num_blocks:
                raise CacheFullError(
                    f"prompt {i} needs up to {r.blocks_needed * self.block_size} KV cache tokens "
                    f"(prompt {len(ids)} + max_new_tokens {max_new_tokens} + draft tree {self.max_tree_nodes}), "
                    f"the cache holds {self.num_blocks * self.block_size}: raise kv_cache_tokens")
        del vocab
        return requests

    def _encode(self, prompt, chat: bool, i: int) -> List[int]:
        vocab = self.config.vocab_size
        if isinstance(prompt, str):
            tok = self.target.tokenizer
            if tok is None:
                raise ValueError("this target has no tokenizer: pass token ids instead of strings")
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            ids = tok.apply_chat_template(prompt) if chat else tok.encode(prompt)
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise ValueError(f"prompt {i} must be a string or a sequence of token ids") from None
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def _output(self, r: _Request) -> Output:
        tok = self.target.tokenizer
        text = tok.decode(r.generated) if tok is not None else None
        if text is not None and r.stop:
            cut = min((text.find(s) for s in r.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return Output(list(r.generated), text, r.finish_reason or "length", r.stats)

    # ---- the step loop ---------------------------------------------------------------

    def _run(self, requests: List[_Request]) -> Iterator[tuple]:
        """Runs requests to completion with continuous batching; yields
        (request, newly committed token ids) after every step."""
        outer_threads = torch.get_num_threads()
        pinned = self._pin_threads()
        gap = self._gap_threads()
        if outer_threads != gap:
            torch.set_num_threads(gap)
        try:
            yield from self._serve(requests)
        finally:
            if outer_threads != gap:
                torch.set_num_threads(outer_threads)
            if pinned is not None:
                self._unpin_threads(pinned)

    def _pin_threads(self):
        """With ``pin_threads``: pins the calling (serving) thread to one CPU
        and hands the others to the helpers (:func:`atlas.placement.claim`);
        returns (its thread id, the CPUs it had, the CPU claimed) for the end
        of the serve, or None when there is nothing to do (pinning off, too
        few CPUs)."""
        if not self.pin_threads:
            return None
        mine = os.sched_getaffinity(0)
        parts = placement.claim(mine)
        if parts is None:
            return None
        serve, helpers = parts
        # Threads take their creator's CPUs: torch's OpenMP team (prefills,
        # started by this thread) must exist before this thread is pinned, or
        # its workers would share the one CPU with it.
        with_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        torch.zeros(1 << 17).add_(1.0)
        torch.set_num_threads(with_threads)
        tid = threading.get_native_id()
        if not placement.set_thread_cpus(tid, {serve}):
            placement.release(serve)
            return None
        pinned = tid, mine, serve
        try:
            if _native.helper_cpus() != sorted(helpers):
                _native.set_helper_cpus(helpers)
            for o in self.observers:
                place = getattr(o, "place_threads", None)
                if place is not None:
                    place(helpers)
        except BaseException:
            self._unpin_threads(pinned)
            raise
        return pinned

    def _unpin_threads(self, pinned) -> None:
        tid, mine, serve = pinned
        placement.set_thread_cpus(tid, mine)
        placement.release(serve)

    def _gap_threads(self) -> int:
        """Torch threads for the serving thread's work between target
        forwards (drafting, verification, the observers): ``threads``, or 1
        on the CPU when an observer trains in those gaps (the learning loop's
        trainer process, paused during forwards). Small torch ops there would
        otherwise wake an OpenMP team whose second thread shares its core with
        the trainer, and wait for it at every barrier (measured, full atlas on
        2 cores: drafting 5.1 -> 7.8 ms and the tap 1.2 -> 3.4 ms per step
        while the trainer trained, back to 5.5 and 1.5 ms on one thread)."""
        if self.device.type == "cpu" and any(hasattr(o, "forward_begins") for o in self.observers):
            return 1
        return self.threads

    def _serve(self, requests: List[_Request]) -> Iterator[tuple]:
        if self.controller is not None and not self._cost_measured and self.max_tree_nodes > 1:
            self.measure_forward_cost()
        waiting = deque(requests)
        active: List[_Request] = []
        blocks_in_use = 0
        try:
            while waiting or active:
                admitted = []
                while waiting and len(active) + len(admitted) < self.max_batch and \
                        blocks_in_use + waiting[0].blocks_needed <= self.num_blocks:
                    r = waiting.popleft()
                    r.rid = self._next_rid
                    self._next_rid += 1
                    r.seq = self.cache.create()
                    self._live[r.rid] = r
                    blocks_in_use += r.blocks_needed
                    admitted.append(r)
                if admitted:
                    for r, new in self._prefill(admitted):
                        yield r, new
                    active.extend(admitted)
                elif active:
                    for r, new in self._decode_step(active):
                        yield r, new
                done = [r for r in active if r.finish_reason is not None]
                for r in done:
                    self._finish(r)
                    blocks_in_use -= r.blocks_needed
                active = [r for r in active if r.finish_reason is None]
        finally:
            for r in requests:
                if r.seq >= 0:
                    self._finish(r)

    def _finish(self, r: _Request) -> None:
        self._live.pop(r.rid, None)
        if r.seq >= 0:
            self.cache.release(r.seq)
            r.seq = -1
            for s in self.speculators:
                s.finish(r.rid)

    def speculation_value(self, speculator, rid: int) -> Optional[float]:
        """Seconds that ``speculator``'s drafts are expected to save over the
        rest of request ``rid``, as measured so far: the tokens it may still
        emit, times the share of emitted tokens that only it drafted
        (:meth:`Controller.share_only`: none of the speculators before it did),
        each worth what a token costs now. None when that is not measured yet,
        or ``speculator`` is not one of this engine's, or ``rid`` is not being
        served. (The learning loop weighs a request-local fit against it.)"""
        r = self._live.get(rid)
        index = next((i for i, s in enumerate(self.speculators) if s is speculator), None)
        if r is None or index is None or self.controller is None:
            return None
        share = self.controller.share_only(index)
        if share is None:
            return None
        left = max(r.max_new_tokens - len(r.generated), 0)
        return left * share * self.controller.seconds_per_token()

    def _params(self, reqs: List[_Request]) -> dict:
        """The verifier's sampling parameters. ``offset`` is the position of the
        tree's root, the request's last token (the last prompt token at the
        prefill): the verifier keys each position's uniforms on it, so plain
        and speculative decoding draw the token at a given position with the
        same uniform and, with the same seed, emit the same text."""
        return dict(temperature=np.array([r.temperature for r in reqs], np.float32),
                    top_k=np.array([r.top_k for r in reqs], np.int64),
                    top_p=np.array([r.top_p for r in reqs], np.float32),
                    seed=np.array([r.seed for r in reqs], np.uint64),
                    offset=np.array([len(r.tokens) - 1 for r in reqs], np.uint64))

    def _prefill(self, reqs: List[_Request]):
        t0 = time.perf_counter()
        lens = [len(r.prompt) for r in reqs]
        slots = [self.cache.reserve(r.seq, n) for r, n in zip(reqs, lens)]
        tokens = np.concatenate([np.asarray(r.prompt, np.int64) for r in reqs])
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
        parents = np.concatenate([np.arange(-1, n - 1, dtype=np.int32) for n in lens])
        q_offsets = np.zeros(len(reqs) + 1, np.int64)
        q_offsets[1:] = np.cumsum(lens)
        last_rows = torch.from_numpy(q_offsets[1:] - 1)
        logits, hidden = self._forward(
            self.cache, np.array([r.seq for r in reqs], np.int32), torch.from_numpy(tokens),
            torch.from_numpy(positions), parents, q_offsets, torch.from_numpy(np.concatenate(slots)),
            logit_rows=last_rows)
        for r in reqs:
            self.cache.commit(r.seq)
        # The first token: a one-node tree per request (the verifier's bonus).
        root = np.zeros(len(reqs), np.int32)
        res = self.verifier(logits, root, np.full(len(reqs), -1, np.int32),
                            np.arange(len(reqs) + 1, dtype=np.int64), **self._params(reqs))
        dt = time.perf_counter() - t0
        for s in self.speculators:
            for r in reqs:
                s.start(r.rid, r.prompt)
        committed = []
        for b, r in enumerate(reqs):
            r.stats.prompt_tokens = len(r.prompt)
            r.stats.steps += 1
            r.stats.time_prefill += dt
            committed.append((r, self._accept_tokens(r, res.emitted[b].tolist())))
        self._observe(StepRecord(True, [r.rid for r in reqs], q_offsets, tokens.astype(np.int32), parents,
                                 hidden, logits, [np.zeros(0, np.int32)] * len(reqs), [c[1] for c in committed]))
        return committed

    def _forward(self, *args, **kwargs):
        """The target forward of a serving step, between the observers'
        ``forward_begins`` and ``forward_ends`` (where they have them: the
        learning loop pauses its trainer process there); every speculator's
        ``after_forward`` comes right after the forward, before
        ``forward_ends``. A ``forward_begins`` that returns False says the
        forward runs beside work it could not pause (the learning loop's
        trainer process while it starts up): ``_forward_timed`` is then
        False, and the step's time is not one for the controller's cost
        model."""
        hooks = [o for o in self.observers if hasattr(o, "forward_begins")]
        timed = True
        for o in hooks:
            if o.forward_begins() is False:
                timed = False
        self._forward_timed = timed
        gap = torch.get_num_threads()
        if gap != self.threads:
            torch.set_num_threads(self.threads)   # see _gap_threads
        try:
            return self.target.forward(*args, **kwargs)
        finally:
            if gap != self.threads:
                torch.set_num_threads(gap)
            for s in self.speculators:   # (before a trainer resumes: see LearnedSpeculator)
                s.after_forward()
            for o in hooks:
                o.forward_ends()

    def _observe(self, record: StepRecord) -> None:
        for s in self.speculators:
            s.observe(record)
        for o in self.observers:
            o.observe(record)

    def measure_forward_cost(self, sizes=(1, 2, 4, 8, 16, 32, 64), context: int = 128) -> None:
        """Times the target forward at several tree sizes on this machine and
        hands the figures to the controller (it refines them every step).
        Observers with ``measurement_begins`` and ``measurement_ends`` (the
        learning loop, which stops its trainer process, even one that is still
        starting up) get them around the measurement: the controller starts
        from these figures, and a size it believes dear it does not try again
        until the figure goes stale. (Measured on SmolLM2-135M, 2 cores, twice
        each way: forwards of 8, 16 and 32 nodes read 53-55, 76-85 and
        123-139 ms beside the trainer process's start-up, 22-28, 32-41 and
        60-75 ms with it stopped, 23, 30-34 and 59-63 ms with no trainer.)"""
        hooks = [o for o in self.observers if hasattr(o, "measurement_begins")]
        for o in hooks:
            o.measurement_begins()
        outer_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        seq = self.cache.create()
        try:
            rng = np.random.default_rng(0)
            room = self.cache.num_free_blocks * self.block_size - max(sizes) - self.block_size
            ctx = max(1, min(context, self.config.max_position_embeddings // 2, room))
            slots = self.cache.reserve(seq, ctx)
            toks = torch.from_numpy(rng.integers(0, self.config.vocab_size, ctx))
            self.target.forward(self.cache, np.array([seq], np.int32), toks, torch.arange(ctx),
                                np.arange(-1, ctx - 1, dtype=np.int32), np.array([0, ctx], np.int64),
                                torch.from_numpy(slots), logit_rows=torch.tensor([ctx - 1]))
            self.cache.commit(seq)
            for n in sizes:
                if n > self.max_tree_nodes * self.max_batch or ctx + n > self.config.max_position_embeddings \
                        or n + self.block_size > self.cache.num_free_blocks * self.block_size:
                    break
                times = []
                for _ in range(3):  # the first run of a new shape warms up; keep the fastest
                    slots = self.cache.reserve(seq, n)
                    toks = torch.from_numpy(rng.integers(0, self.config.vocab_size, n))
                    parents = np.concatenate([[-1], np.zeros(n - 1, np.int32)]).astype(np.int32)
                    t0 = time.perf_counter()
                    self.target.forward(self.cache, np.array([seq], np.int32), toks,
                                        torch.full((n,), ctx) + torch.from_numpy((parents >= 0).astype(np.int64)),
                                        parents, np.array([0, n], np.int64), torch.from_numpy(slots))
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times.append(time.perf_counter() - t0)
                    self.cache.commit(seq, np.zeros(0, np.int32))
                self.controller.record_forward(n, min(times))
        finally:
            self.cache.release(seq)
            torch.set_num_threads(outer_threads)
            for o in hooks:
                o.measurement_ends()
        self._cost_measured = True

    def _draft(self, reqs: List[_Request]):
        """Runs the speculators the controller wants, each into trees of its
        own; the controller merges them into one tree per request."""
        ctl = self.controller
        run = ctl.active()
        cand_budget = ctl.candidate_budget(len(reqs))
        budgets = [max(1, min(self.max_tree_nodes, self.config.max_position_embeddings - (len(r.tokens) - 1)))
                   for r in reqs]
        contexts = [r.tokens for r in reqs]
        ids = [r.rid for r in reqs]
        roots = [r.generated[-1] for r in reqs]
        candidates = [[None] * len(self.speculators) for _ in reqs]
        spent = 0.0
        for pid, s in enumerate(self.speculators):
            if not run[pid]:
                continue
            if not ctl.worth_running(pid, candidates, len(reqs)):
                run[pid] = False
                continue
            t0 = time.perf_counter()
            hint = ctl.path_hint(pid)
            trees = [DraftTree(root, min(cand_budget, budget), self.config.vocab_size, hint)
                     for root, budget in zip(roots, budgets)]
            s.propose(ids, contexts, trees, pid)
            dt = time.perf_counter() - t0
            ctl.record_draft(pid, dt)
            spent += dt
            for b, t in enumerate(trees):
                candidates[b][pid] = t
        trees, origins = ctl.select(roots, candidates, self.config.vocab_size, budgets, spent)
        return trees, origins, run

    def _decode_step(self, reqs: List[_Request]):
        t_start = time.perf_counter()
        t_draft = 0.0
        if self.speculators and self.max_tree_nodes > 1:
            td = time.perf_counter()
            trees, origins, ran = self._draft(reqs)
            t_draft = time.perf_counter() - td
        else:
            trees = [DraftTree(r.generated[-1], 1, self.config.vocab_size) for r in reqs]

        flats = [t.flatten(len(r.tokens) - 1) for r, t in zip(reqs, trees)]
        sizes = [len(t) for t in trees]
        slots = [self.cache.reserve(r.seq, n) for r, n in zip(reqs, sizes)]
        q_offsets = np.zeros(len(reqs) + 1, np.int64)
        q_offsets[1:] = np.cumsum(sizes)
        tokens = np.concatenate([f.tokens for f in flats])
        parents = np.concatenate([f.parents for f in flats])
        positions = np.concatenate([f.positions for f in flats])
        tf = time.perf_counter()
        logits, hidden = self._forward(
            self.cache, np.array([r.seq for r in reqs], np.int32), torch.from_numpy(tokens.astype(np.int64)),
            torch.from_numpy(positions), parents, q_offsets, torch.from_numpy(np.concatenate(slots)))
        t_fwd = time.perf_counter() - tf
        res = self.verifier(logits, tokens, parents, q_offsets, **self._params(reqs))
        if self.device.type != "cpu":
            # The forward ran asynchronously; the verifier's result is the
            # first wait for the device, so time the two together.
            t_fwd = time.perf_counter() - tf
        out = []
        for b, r in enumerate(reqs):
            acc = res.accepted[b]
            keep = np.empty(len(acc) + 1, np.int32)
            keep[0] = 0
            keep[1:] = acc
            self.cache.commit(r.seq, keep)
            st = r.stats
            st.steps += 1
            st.drafted += sizes[b] - 1
            st.accepted += len(acc)
            max_depth = trees[b].max_depth
            while len(st.drafted_per_depth) < max_depth:
                st.drafted_per_depth.append(0)
                st.accepted_per_depth.append(0)
            for d in range(max_depth):
                st.drafted_per_depth[d] += 1
            for d in range(len(acc)):
                st.accepted_per_depth[d] += 1
            out.append((r, res.emitted[b].tolist()))
        committed = [(r, self._accept_tokens(r, new)) for r, new in out]
        if self.speculators:
            if self._forward_timed:
                # (A forward timed beside a trainer's start-up read about
                # twice its cost; a size the model believes dear is not
                # tried again until the figure goes stale, hundreds of
                # forwards later.)
                self.controller.record_forward(int(q_offsets[-1]), t_fwd)
            if self.max_tree_nodes > 1:
                self.controller.observe(trees, origins, res.accepted, ran, res.emitted)
        if self.speculators or self.observers:
            self._observe(StepRecord(False, [r.rid for r in reqs], q_offsets, tokens, parents, hidden, logits,
                                     res.accepted, [c[1] for c in committed]))
        t_total = time.perf_counter() - t_start
        for r in reqs:
            r.stats.time_draft += t_draft
            r.stats.time_verify += t_fwd
            r.stats.time_other += t_total - t_draft - t_fwd
        return committed

    def _accept_tokens(self, r: _Request, new: List[int]) -> List[int]:
        """Appends newly emitted tokens, applying EOS, stop strings, the token
        budget and the context limit; returns what was appended."""
        eos = self.config.eos_token_ids
        take = []
        for t in new:
            if len(r.generated) + len(take) >= r.max_new_tokens:
                break
            take.append(t)
            if t in eos:
                r.finish_reason = "stop"
                break
        r.generated.extend(take)
        r.stats.emitted = len(r.generated)
        for s in self.speculators:
            s.update(r.rid, take)
        if r.finish_reason is None:
            if len(r.generated) >= r.max_new_tokens or \
                    len(r.prompt) + len(r.generated) >= self.config.max_position_embeddings:
                r.finish_reason = "length"
            elif r.stop and self.target.tokenizer is not None:
                tail = self.target.tokenizer.decode(r.generated[-(len(take) + 32):])
                if any(s in tail for s in r.stop):
                    r.finish_reason = "stop"
        return take
