"""The confidence-aware controller: which speculator to trust, how far to look.

Vocabulary:

* **candidate tree**: what one speculator proposed for one request, each node
  with that speculator's own *confidence* in [0, 1];
* **calibrated acceptance** of a node: the estimated probability that the
  target accepts it given that its parent was accepted. It is learned online,
  per speculator and depth, as a function of the speculator's confidence
  (binned), from every verified node whose parent was accepted (counts with a
  memory of about 5,000 nodes), times a *drift* correction: the acceptance
  of the speculator's last few hundred nodes over what the counts predicted
  for them, so that a sudden shift of traffic is followed within a request
  or two;
* **agreement**: where several speculators draft for a request, a merged
  node is *agreed* when more than one proposed it, *contested* when one did
  and another proposed a different child of the same parent, and otherwise
  *alone*. A speculator's calibration pools all three, but they differ:
  measured in full atlas on HumanEval (60 requests, 9,600 verified nodes),
  contested depth-1 nodes predicted 0.18-0.21 and were accepted 0.08-0.13 of
  the time (depth 2: 0.30-0.40 against 0.12-0.20), agreed ones predicted
  0.42 and were accepted 0.47. So agreed and contested nodes get a second
  calibration each, from the merged acceptance (the most probable proposer's)
  to what such nodes turned out to be, learnt and decayed like the first;
  alone nodes keep their proposer's. (A/B, full atlas with and without it,
  requests served in turn: 85.1 against 83.9 and 83.2 against 81.7 tokens/s,
  at the same tokens per step; see ``bench/results/CPU.md``);
* **path probability** of a node: the product of calibrated acceptances from
  the root to it, i.e. the chance the node's token is emitted; the expected
  number of tokens a step emits is ``1 + sum`` of the path probabilities of
  its drafted nodes;
* **cost model**: the target forward's wall time as a function of the number
  of nodes it verifies (all requests of a step together), measured on this
  machine: at start-up over a few sizes, then refined after every step, plus
  each speculator's drafting time.

Each step the controller merges the candidate trees of every request into one
trie and keeps the nodes, across all requests of the step, that maximise
expected tokens per second: nodes are taken in decreasing path probability
(an ancestor is never less probable than its descendants, so every prefix of
that order is a valid set of trees) and the prefix with the best ratio wins.
No tree size or depth is fixed; ``max_nodes`` is only a memory bound.

Per step, speculators run in order and each one after the first is asked for
only if it pays *given what the ones before it drafted*: the controller keeps,
per speculator and per bin of the expected tokens already on the table
(``CONTEXT_EDGES``), the tokens it added that no earlier speculator proposed,
and skips it when those tokens, each valued at what a token costs now (recent
seconds per emitted token), are worth less than its drafting time. A long,
confident suffix match thus goes to the target alone, while the draft heads
are asked where the suffix speculator has nothing to say. Over all steps it
also keeps each speculator's share of the emitted tokens that it drafted and
no earlier one did (:meth:`Controller.share_only`): what the engine values a
speculator's drafts by for the learning loop's request-local fits.

Drafting hint: a speculator that pays for each depth it drafts (a learned
head runs a forward per depth) learns from :meth:`Controller.path_hint`
where to stop. Its *cutoff* in a step is, among its nodes below depth 1,
the smallest path probability in its own terms (the product of its
confidences from the root) that the step selected, or when none was
selected the largest it proposed. The hint is a low percentile of recent
cutoffs, measured on exploration steps, where the hint is 0 (so that what is
not drafted still gets measured), except for the fallback's untrusted
speculator (below).

Fallback: given a pair (adaptive, static) of speculator indices, the
controller runs only the one it trusts, trying the other on a small share of
steps (``EXPLORE_EVERY``) so that a recovering adaptive speculator is
noticed; there it drafts with the hint ``PROBE_HINT``, so that a learned
head drafts little more than its first tokens. It compares the two on
exactly those steps, where both drafted for the same contexts: per request,
whether each one's most confident first token is the token the target
emitted there (for greedy decoding, depth-1 greedy acceptance, what the
learning loop's trainer scores before a push). It trusts the adaptive one
while its rate over the last ``PAIR_MEMORY`` such pairs is at least the
static one's, and drops it as soon as it falls below. (It used to compare
each speculator's acceptance over the nodes the controller had selected from
it. That rate depends on how deep the controller reaches into a
speculator's tree, and on which steps it ran, not only on how good its
drafts are: measured on HumanEval, an adaptive head
whose depth-1 acceptance had risen from 0.39 to 0.48 read 0.28 against the
static head's 0.29, and the static head served most of the steps after the
fortieth request.)
"""
from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .tree import DraftTree

CONF_BINS = 10
# Depths past this share one calibration row: deep nodes are rare and alike.
MAX_DEPTH_BUCKET = 8
# Weight of the prior (acceptance = confidence) in draft counts: a few
# observations are enough to override a miscalibrated speculator.
PRIOR_WEIGHT = 2.0
# Per-observation decay of the calibration counts: a memory of about 5,000
# verified nodes per speculator, so the estimates follow traffic that shifts.
DECAY = 1.0 - 1.0 / 5000
# Memory (verified nodes) of the drift check: the acceptance observed over the
# last few hundred nodes against what the calibration predicted for them. A
# sudden shift (code to prose) moves it within a request or two, long before
# the 5,000-node counts follow; in steady traffic it stays near 1.
DRIFT_MEMORY = 300
# Nodes before the drift check applies, and the range of its correction.
DRIFT_MIN_OBS = 50
DRIFT_RANGE = (0.2, 2.0)
# Share of steps on which the speculator not currently trusted (fallback pair)
# still runs, so that its acceptance estimate stays current.
EXPLORE_EVERY = 10
# The drafting hint of that untrusted speculator on those steps: it drafts its
# first tokens, what the fallback's comparison reads, and goes deeper only
# along near-certain paths. (With no hint a learned head drafted its whole
# tree there, a forward of its own per depth, from cold caches.)
PROBE_HINT = 0.99
# The fallback's comparison (see the module docstring): EWMAs over about this
# many (adaptive, static) pairs of first tokens, one per request every
# EXPLORE_EVERY steps (so a head that turns worse is dropped within a few
# requests), and the pairs needed before the adaptive speculator is trusted
# (until then the static one serves).
PAIR_MEMORY = 50
MIN_PAIRS = 20
# Bins of the expected tokens (sum of calibrated path probabilities) that the
# speculators run earlier in a step already proposed, per request: the context
# in which a later speculator's added value is learnt and judged.
CONTEXT_EDGES = (0.25, 0.5, 1.0, 2.0, 4.0)
# Observations per context bin before its estimate is trusted over running.
MIN_CONTEXT_OBS = 5
# Optimism (tokens) added to a speculator's estimated added value, divided by
# the square root of its observations in the context bin.
EXPLORE_BONUS = 0.05
# The agreement of a merged node (see the module docstring): indices of the
# second calibrations.
AGREED, CONTESTED = 0, 1
# Forwards after which a tree size's measured cost is forgotten (see CostModel).
STALE_RECORDS = 400
# Forwards between two computations of candidate_budget's size hint.
BUDGET_REFRESH = 16
# Request-steps over which share_only() averages (about ten 128-token
# requests at three tokens a step).
SHARE_MEMORY = 400
# The drafting hint (see Controller.path_hint): the CUTOFF_QUANTILE percentile
# of a speculator's last CUTOFF_STEPS cutoffs, measured on exploration steps.
CUTOFF_STEPS = 64
CUTOFF_QUANTILE = 10
MIN_CUTOFFS = 8


@dataclass
class _Calibration:
    accepted: np.ndarray = field(default_factory=lambda: np.zeros((MAX_DEPTH_BUCKET, CONF_BINS)))
    tried: np.ndarray = field(default_factory=lambda: np.zeros((MAX_DEPTH_BUCKET, CONF_BINS)))
    recent: float = 0.0       # EWMA of acceptance (parent accepted) over all this speculator's nodes
    recent_n: float = 0.0
    # The drift check: EWMAs, over the last DRIFT_MEMORY nodes, of acceptance
    # and of what the counts predicted for those nodes; their ratio scales
    # every estimate (see DRIFT_MEMORY).
    fast_ok: float = 0.0
    fast_pred: float = 0.0
    fast_n: float = 0.0
    drift: float = 1.0
    # The estimates of every (depth row, confidence bin) cell since the last
    # record: a step's selection reads the same few dozen cells hundreds of
    # times, and one table of them is a handful of numpy operations (per cell
    # they were a few numpy sums each: about 0.3 ms a step in full atlas).
    _counted: Optional[List[List[float]]] = None
    _probs: Optional[List[List[float]]] = None
    _probs_array: Optional[np.ndarray] = None

    @staticmethod
    def cell(depth: int, conf: float) -> Tuple[int, int]:
        """The (depth row, confidence bin) of a node."""
        return min(depth, MAX_DEPTH_BUCKET) - 1, min(int(conf * CONF_BINS), CONF_BINS - 1)

    def _tables(self) -> Tuple[List[List[float]], List[List[float]]]:
        if self._counted is None:
            # Two-level: the confidence bin pooled over all depths (prior:
            # acceptance = confidence) is the prior of each depth's own estimate.
            prior = (np.arange(CONF_BINS) + 0.5) / CONF_BINS
            pooled = (self.accepted.sum(axis=0) + PRIOR_WEIGHT * prior) / (self.tried.sum(axis=0) + PRIOR_WEIGHT)
            table = (self.accepted + PRIOR_WEIGHT * pooled) / (self.tried + PRIOR_WEIGHT)
            self._counted = table.tolist()
            probs = table if self.drift == 1.0 else np.minimum(table * self.drift, 1.0)
            self._probs, self._probs_array = probs.tolist(), probs
        return self._counted, self._probs

    def probs_of(self, depths: np.ndarray, confidences: np.ndarray) -> List[float]:
        """:meth:`prob` of every node of a candidate tree but its root
        (``depths`` >= 1), as one list: a table lookup for the whole tree
        (per node, a step's merging read the table a few thousand times)."""
        self._tables()
        rows = np.minimum(depths, MAX_DEPTH_BUCKET) - 1
        # float64, as cell() computes the bin from the Python float
        bins = np.minimum((confidences.astype(np.float64) * CONF_BINS).astype(np.int64), CONF_BINS - 1)
        return self._probs_array[rows, bins].tolist()

    def counted(self, depth: int, conf: float) -> float:
        """The estimate from the decayed counts alone. Two-level: the
        confidence bin pooled over all depths (prior: acceptance =
        confidence) is the prior of the depth's own estimate, so what is
        learnt at shallow depths carries to deep ones before they have been
        tried."""
        d, b = self.cell(depth, conf)
        return self._tables()[0][d][b]

    def prob(self, depth: int, conf: float) -> float:
        """Calibrated acceptance: the counted estimate times the drift
        correction, at most 1."""
        d, b = self.cell(depth, conf)
        return self._tables()[1][d][b]

    def record(self, depth: int, conf: float, ok: bool) -> None:
        self.record_many([(depth, conf, ok)])

    def record_many(self, trials: Sequence[Tuple[int, float, bool]]) -> None:
        """Records one step's trials (depth, confidence, accepted), in order:
        the same counts as that many record() calls; the drift check compares
        each with what the counts predicted before the step, which is what
        the step's selection read."""
        if not trials:
            return
        counted = self._tables()[0]
        k = len(trials)
        rows, bins, oks = np.empty(k, np.int64), np.empty(k, np.int64), np.empty(k)
        for j, (depth, conf, ok) in enumerate(trials):
            d, b = self.cell(depth, conf)
            rows[j], bins[j], oks[j] = d, b, ok
            self.fast_n = min(self.fast_n + 1, DRIFT_MEMORY)
            self.fast_ok += (ok - self.fast_ok) / self.fast_n
            self.fast_pred += (counted[d][b] - self.fast_pred) / self.fast_n
            self.recent_n = self.recent_n * DECAY + 1
            self.recent += (ok - self.recent) / max(self.recent_n, 1.0)
        if self.fast_n >= DRIFT_MIN_OBS and self.fast_pred > 0:
            self.drift = min(max(self.fast_ok / self.fast_pred, DRIFT_RANGE[0]), DRIFT_RANGE[1])
        # Trial j is decayed by the k - 1 - j trials after it.
        weight = DECAY ** np.arange(k - 1, -1, -1, dtype=np.float64)
        self.accepted *= DECAY ** k
        self.tried *= DECAY ** k
        cells = rows * CONF_BINS + bins
        size = MAX_DEPTH_BUCKET * CONF_BINS
        self.accepted += np.bincount(cells, weight * oks, size).reshape(self.accepted.shape)
        self.tried += np.bincount(cells, weight, size).reshape(self.tried.shape)
        self._counted = self._probs = self._probs_array = None


class CostModel:
    """Target forward time as a function of verified nodes: medians of recent
    measurements per size, each held to at most the medians of the larger
    sizes, linearly interpolated, extrapolated by a least squares line through
    the measured sizes, and never above ``nodes`` times the one-node time (n
    separate forwards would do the same work). A figure above those bounds is
    a measurement that stalled, e.g. on a loaded machine, and would otherwise
    keep the controller from trying that size again. (Measured: in a
    16-minute HumanEval run the medians read 52 ms at 11 nodes and 64 ms at
    14, against 37 ms at 16.)

    Measurements go stale: a size last measured more than ``STALE_RECORDS``
    forwards ago is forgotten while fresher ones exist, and with a single fresh
    size the cost is assumed flat beyond it (a memory-bound decode), so that
    the controller tries larger trees again and measures them anew. A machine
    that was busy when a size was measured is not believed forever."""

    def __init__(self):
        self._obs: Dict[int, List[float]] = {}
        self._last: Dict[int, int] = {}
        self._clock = 0
        # Estimates since the last record: the controller asks for the same
        # few sizes hundreds of times a step.
        self._memo: Dict[int, float] = {}
        self._fit = None   # (sizes, medians, slope) since the last record

    def record(self, nodes: int, seconds: float) -> None:
        self._clock += 1
        buf = self._obs.setdefault(int(nodes), [])
        if buf and self._clock - self._last[int(nodes)] > STALE_RECORDS:
            buf.clear()   # measured anew: the stale figures go
        buf.append(float(seconds))
        if len(buf) > 16:
            del buf[0]
        self._last[int(nodes)] = self._clock
        self._memo.clear()
        self._fit = None

    @property
    def records(self) -> int:
        """Forwards recorded so far."""
        return self._clock

    @property
    def known_sizes(self) -> List[int]:
        fresh = sorted(n for n in self._obs if self._clock - self._last[n] <= STALE_RECORDS)
        return fresh or sorted(self._obs)

    def __call__(self, nodes: int) -> float:
        if not self._obs:
            return 1.0 * nodes  # unmeasured: any increasing cost gives a valid (small) tree
        t = self._memo.get(nodes)
        if t is None:
            sizes, med, _ = self._table()
            t = self._estimate(nodes)
            if nodes > 1 and 1 in med:
                t = min(t, nodes * med[1])
            self._memo[nodes] = t
        return t

    def _table(self):
        # Plain Python over at most a few dozen sizes of at most 16 figures:
        # numpy's per-call overhead made this a fifth of a millisecond a step.
        if self._fit is None:
            sizes = self.known_sizes
            med = {n: _median(self._obs[n]) for n in sizes}
            # A forward does not get cheaper with more nodes: a size whose
            # median exceeds a larger size's (it stalled, or was last measured
            # while the machine was slower) is held to the larger one's.
            low = math.inf
            for n in reversed(sizes):
                low = med[n] = min(med[n], low)
            self._fit = (sizes, med, max(_slope(sizes, [med[n] for n in sizes]), 0.0))
        return self._fit

    def _estimate(self, nodes: int) -> float:
        sizes, med, slope = self._table()
        if nodes in med:
            return med[nodes]
        if sizes[0] < nodes < sizes[-1]:
            i = bisect.bisect_left(sizes, nodes)
            lo, hi = sizes[i - 1], sizes[i]
            w = (nodes - lo) / (hi - lo)
            return med[lo] * (1 - w) + med[hi] * w
        if len(sizes) == 1:
            return med[sizes[0]] * max(nodes, 1) / max(sizes[0], 1) if nodes < sizes[0] else med[sizes[0]]
        edge = sizes[0] if nodes < sizes[0] else sizes[-1]
        return max(med[edge] + slope * (nodes - edge), 1e-9)


def _median(values: List[float]) -> float:
    v = sorted(values)
    h = len(v) // 2
    return v[h] if len(v) % 2 else 0.5 * (v[h - 1] + v[h])


def _slope(xs: List[int], ys: List[float]) -> float:
    """The least squares line's slope through (xs, ys); 0 for fewer than two
    distinct xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0


def _first_token(tree: Optional[DraftTree]) -> Optional[int]:
    """The token of a candidate tree's most confident depth-1 node (the
    lowest index among equals), or None when it has none."""
    if tree is None or len(tree) <= 1:
        return None
    children = np.flatnonzero(tree.parents == 0)
    if len(children) == 0:
        return None
    return int(tree.tokens[children[np.argmax(tree.confidences[children])]])


@dataclass
class _NodeOrigin:
    """Per node of a selected tree: (speculator, its confidence) pairs."""
    proposals: List[Tuple[int, float]]


class Controller:
    """Builds each step's draft trees from the speculators' candidates.

    ``num_speculators``: how many speculators the engine runs, in order (the
    proposer id of a node is its speculator's index). ``fallback`` = (adaptive,
    static) indices, or None. ``max_nodes`` bounds one request's tree.
    """

    def __init__(self, num_speculators: int, *, max_nodes: int = 64, fallback: Optional[Tuple[int, int]] = None,
                 select: str = "throughput"):
        if num_speculators < 1:
            raise ValueError("the controller needs at least one speculator")
        if fallback is not None:
            a, s = fallback
            if not (0 <= a < num_speculators and 0 <= s < num_speculators and a != s):
                raise ValueError(f"fallback must name two different speculators in [0, {num_speculators}), "
                                 f"got {fallback}")
        if select not in ("throughput", "all"):
            raise ValueError(f"select must be 'throughput' or 'all', got {select!r}")
        # "all" keeps every candidate up to the budget and runs every speculator
        # (fixed trees, e.g. to test invariants); "throughput" is the controller.
        self.select_mode = select
        self.gain = np.zeros(num_speculators)        # EWMA accepted tokens credited per request-step
        self.gain_n = np.zeros(num_speculators)
        self.num_speculators = num_speculators
        self.max_nodes = max_nodes
        self.fallback = fallback
        self.calib = [_Calibration() for _ in range(num_speculators)]
        # Second calibrations of agreed and contested nodes (AGREED, CONTESTED),
        # and per request of this step, per node of its selected tree, the
        # (agreement, merged acceptance) that observe() records (None: alone).
        self.agreement = [_Calibration(), _Calibration()]
        self._agreement_of: List[Optional[List[Optional[Tuple[int, float]]]]] = []
        self.cost = CostModel()
        self.draft_time = np.zeros(num_speculators)   # EWMA seconds per step, per speculator
        # What a token costs now: EWMAs of a step's seconds (forward and
        # drafting) and of the tokens it emitted (all requests together).
        self.step_seconds = 0.0
        self.step_tokens = 0.0
        self._step_n = 0
        self._this_step = 0.0   # seconds recorded in this step so far
        self._this_forward = False
        self._draft_seen = np.zeros(num_speculators, bool)
        # Tokens a speculator added beyond the earlier ones, per context bin (EWMA).
        self.marginal = np.zeros((num_speculators, len(CONTEXT_EDGES) + 1))
        self.marginal_n = np.zeros((num_speculators, len(CONTEXT_EDGES) + 1))
        self._context: List[Optional[int]] = [None] * num_speculators
        self.skipped = np.zeros(num_speculators, np.int64)   # steps skipped by the context rule
        # EWMAs per request-step, over every step (0 where a speculator did not
        # run): tokens accepted that no earlier speculator proposed, and tokens
        # emitted (see share_only).
        self.only = np.zeros(num_speculators)
        self.emitted_per_request = 0.0
        self._share_n = 0
        # Per speculator: its cutoffs on recent exploration steps (see path_hint).
        self._cutoffs: List[List[float]] = [[] for _ in range(num_speculators)]
        self._hints = [0.0] * num_speculators   # their percentile, updated as they are recorded
        self.steps = 0
        self.trusted: Optional[int] = None if fallback is None else fallback[1]
        # The fallback's comparison: rates at which the (adaptive, static) first
        # tokens were the target's, over pairs (EWMA), and this step's pairs.
        self.pair_hits = np.zeros(2)
        self.pair_n = 0.0
        self._firsts: Optional[List[Tuple[Optional[int], Optional[int]]]] = None
        # expected_tokens() of this step's candidate trees and the calibrated
        # acceptances of their nodes (root first), by (speculator, id):
        # worth_running asks again for each later speculator, and select()
        # merges the same trees.
        self._expected: Dict[Tuple[int, int], Tuple[DraftTree, float, List[float]]] = {}
        self._budget_hint: Optional[Tuple[int, int, int]] = None   # (batch, cost records then, hint)

    # ---- which speculators run this step -------------------------------------------

    def active(self) -> List[bool]:
        """Which speculators may propose this step (all, except the untrusted
        one of the fallback pair on most steps); :meth:`worth_running` then
        decides for each in turn."""
        self._this_step, self._this_forward = 0.0, False   # a new step: its times follow
        self._expected.clear()
        run = [True] * self.num_speculators
        if self.select_mode == "all":
            return run
        explore = self.steps % EXPLORE_EVERY == 0
        if self.fallback is not None:
            adaptive, static = self.fallback
            # Trust the adaptive speculator once it is measured and at least as good.
            good = self.pair_n >= MIN_PAIRS and self.pair_hits[0] >= self.pair_hits[1]
            self.trusted = adaptive if good else static
            other = static if self.trusted == adaptive else adaptive
            run[other] = run[other] and explore
        return run

    def expected_tokens(self, speculator: int, tree: Optional[DraftTree]) -> float:
        """Sum of the calibrated path probabilities of a candidate tree's
        nodes: the tokens it would add if all were verified."""
        if tree is None or len(tree) <= 1:
            return 0.0
        return self._scored(speculator, tree)[0]

    def _scored(self, speculator: int, tree: DraftTree) -> Tuple[float, List[float]]:
        """(expected tokens, calibrated acceptance per node, root 1.0) of a
        candidate tree of at least two nodes, computed once per step."""
        key = (speculator, id(tree))
        known = self._expected.get(key)   # (the tree is kept with it: its id is not reused meanwhile)
        if known is not None:
            return known[1], known[2]
        probs = [1.0] + self.calib[speculator].probs_of(tree.depths[1:], tree.confidences[1:])
        par = tree.parents.tolist()
        pp = [1.0] * len(par)
        for i in range(1, len(par)):
            pp[i] = pp[par[i]] * probs[i]
        e = sum(pp) - 1.0
        self._expected[key] = (tree, e, probs)
        return e, probs

    def worth_running(self, speculator: int, earlier: Sequence[Sequence[Optional[DraftTree]]],
                      batch: int) -> bool:
        """Whether ``speculator`` should draft this step, given the candidate
        trees ``earlier[b][s]`` that the speculators before it drafted (None
        where one did not run): yes unless, in this context, the tokens it
        added beyond them have been worth less than its drafting time. Call it
        for every speculator that :meth:`active` lets run, in order."""
        if self.select_mode == "all":
            return True
        e = 0.0
        for trees in earlier:
            e += max((self.expected_tokens(s, t) for s, t in enumerate(trees) if t is not None), default=0.0)
        b = bisect.bisect_right(CONTEXT_EDGES, e / max(len(earlier), 1))
        self._context[speculator] = b
        n = self.marginal_n[speculator, b]
        if n < MIN_CONTEXT_OBS or self.steps % EXPLORE_EVERY == 0 or not self._draft_seen[speculator]:
            return True
        # Tokens it adds per request, with an optimism that shrinks as
        # evidence grows, each worth what a token costs now (a step's seconds
        # over the tokens it emits), against its drafting time: a speculator
        # that costs next to nothing is never skipped on a run of bad luck.
        # (A token used to be valued at a whole one-node forward, half as
        # much again as a token cost with trees of 2.5 tokens.)
        value = self.marginal[speculator, b] + EXPLORE_BONUS / math.sqrt(n)
        if value * batch * self.seconds_per_token(batch) >= self.draft_time[speculator]:
            return True
        self._context[speculator] = None
        self.skipped[speculator] += 1
        return False

    def seconds_per_token(self, batch: int = 1) -> float:
        """Recent wall seconds per emitted token (forwards and drafting);
        before any step, a one-node forward per request."""
        if self._step_n == 0 or self.step_tokens <= 0:
            return self.cost(batch) / max(batch, 1)
        return self.step_seconds / self.step_tokens

    def path_hint(self, speculator: int) -> float:
        """A path probability, in ``speculator``'s own terms, below which its
        nodes below depth 1 have rarely been selected (see the module
        docstring); 0 on exploration steps and until it has been measured.
        The untrusted speculator of the fallback pair, which runs only on
        exploration steps, gets ``PROBE_HINT`` there: the fallback's
        comparison reads its first tokens alone."""
        if self.select_mode == "all":
            return 0.0
        if self.steps % EXPLORE_EVERY == 0:
            if self.fallback is not None and speculator in self.fallback and speculator != self.trusted:
                return PROBE_HINT
            return 0.0
        return self._hints[speculator]

    def candidate_budget(self, batch: int) -> int:
        """Nodes each speculator may propose per request: enough to exceed
        what the cost model would ever select."""
        if self.select_mode == "all":
            return self.max_nodes
        # The hint moves only as the cost model's medians do: recomputed every
        # BUDGET_REFRESH forwards (a scan of up to max_nodes sizes, which took
        # 0.23 ms a step when done every step), and after every forward while
        # the model has fewer records than that (its start-up measurements).
        now = self.cost.records
        hint = self._budget_hint
        if hint is None or hint[0] != batch or now - hint[1] >= BUDGET_REFRESH or now < BUDGET_REFRESH:
            hint = self._budget_hint = (batch, now, self._best_size_hint(batch))
        best = hint[2]
        return int(min(self.max_nodes, max(4, 2 * best + 2)))

    def _best_size_hint(self, batch: int) -> int:
        # With perfect drafts (path probability 1) the best tree is where the
        # marginal cost of a node stops paying for one token: an upper bound
        # of what any step selects.
        best, best_rate = 1, 0.0
        t1 = self.cost(batch)
        for n in range(1, self.max_nodes + 1):
            rate = n / max(self.cost(batch * n), 1e-9)
            if rate > best_rate:
                best, best_rate = n, rate
            elif self.cost(batch * n) > 8 * t1:
                break
        return best

    # ---- selection ---------------------------------------------------------------------

    def select(self, roots: Sequence[int], candidates: List[List[Optional[DraftTree]]], vocab_size: int,
               budgets: Sequence[int], draft_seconds: float):
        """Merges candidates[b][s] (request b, speculator s; None if it did not
        run) and keeps the best nodes across the step. Returns one DraftTree
        per request and the origins of its nodes (for :meth:`observe`)."""
        batch = len(roots)
        if self.fallback is not None:
            a, s = self.fallback   # compared only where both drafted
            self._firsts = [(_first_token(c[a]), _first_token(c[s])) if c[a] is not None and c[s] is not None
                            else (None, None) for c in candidates]
        # 1. Merge each request's candidates into one trie with calibrated
        #    acceptances (max over the speculators proposing a node).
        merged = []  # per request: (tokens, parents, depth, accept prob, origins, agreement)
        for b in range(batch):
            index = {(-1, int(roots[b])): 0}
            toks, pars, depth, prob, origins = [int(roots[b])], [-1], [0], [1.0], [[]]
            for s, tree in enumerate(candidates[b]):
                if tree is None or len(tree) <= 1:
                    continue
                t_tok, t_par = tree.tokens.tolist(), tree.parents.tolist()
                t_dep, t_conf = tree.depths.tolist(), tree.confidences.tolist()
                t_prob = self._scored(s, tree)[1]
                local = [0] * len(t_tok)
                for i in range(1, len(t_tok)):
                    parent = local[t_par[i]]
                    key = (parent, t_tok[i])
                    conf = t_conf[i]
                    p = t_prob[i]
                    j = index.get(key)
                    if j is None:
                        j = len(toks)
                        index[key] = j
                        toks.append(t_tok[i])
                        pars.append(parent)
                        depth.append(t_dep[i])
                        prob.append(p)
                        origins.append([(s, conf)])
                    else:
                        prob[j] = max(prob[j], p)
                        origins[j].append((s, conf))
                    local[i] = j
            agree = self._agreement(pars, depth, prob, origins)
            merged.append((toks, pars, depth, prob, origins, agree))

        # 2. Path probabilities; greedy best-first across all requests.
        heap = []
        path = []
        children = []
        unseen = 0.0   # path probability of the nodes not popped yet
        for b, (toks, pars, depth, prob, _, _) in enumerate(merged):
            pp = [1.0] * len(toks)
            ch = [[] for _ in toks]
            for i in range(1, len(toks)):
                pp[i] = pp[pars[i]] * prob[i]
                ch[pars[i]].append(i)
            unseen += sum(pp) - 1.0
            path.append(pp)
            children.append(ch)
            for c in ch[0]:
                heapq.heappush(heap, (-pp[c], b, c))
        chosen = [[0] for _ in range(batch)]
        taken = [1] * batch  # chosen or pending, per request
        expected = float(batch)
        best_rate = expected / (self.cost(batch) + draft_seconds)
        order = []
        total = batch
        cost = self.cost
        every = self.select_mode == "all"
        while heap:
            negp, b, i = heapq.heappop(heap)
            unseen += negp
            if taken[b] >= budgets[b]:
                continue
            # The cost model never falls with more nodes: once every node left
            # could not lift the rate above the best, no longer prefix wins.
            # (The margin covers the rounding of ``unseen``, a running sum.)
            if not every and (expected - negp + unseen) / (cost(total + 1) + draft_seconds) \
                    < best_rate * (1.0 - 1e-9):
                break
            taken[b] += 1
            order.append((b, i))
            expected += -negp
            total += 1
            rate = expected / (cost(total) + draft_seconds)
            if rate > best_rate or every:
                best_rate = rate
                for bb, ii in order:
                    chosen[bb].append(ii)
                order = []
            for c in children[b][i]:
                heapq.heappush(heap, (-path[b][c], b, c))

        if self.steps % EXPLORE_EVERY == 0 and self.select_mode != "all":
            self._record_cutoffs(merged, chosen)

        # 3. Build the final trees (chosen nodes are ancestor-closed).
        trees, tree_origins = [], []
        self._agreement_of = []
        for b, (toks, pars, depth, prob, origins, agree) in enumerate(merged):
            keep = sorted(chosen[b])
            self._agreement_of.append(None if agree is None else [agree[i] for i in keep])
            remap = {old: new for new, old in enumerate(keep)}
            t = DraftTree.from_arrays([toks[i] for i in keep], [-1] + [remap[pars[i]] for i in keep[1:]],
                                      confidences=[1.0] + [min(max(prob[i], 0.0), 1.0) for i in keep[1:]],
                                      max_nodes=max(len(keep), 1), vocab_size=vocab_size)
            trees.append(t)
            tree_origins.append([origins[i] for i in keep])
        return trees, tree_origins

    def _agreement(self, pars, depth, prob, origins) -> Optional[List[Optional[Tuple[int, float]]]]:
        """Applies the second calibration to a merged trie's agreed and
        contested nodes (``prob`` in place); returns per node its (agreement,
        merged acceptance), None for the root and alone nodes, or None when a
        single speculator proposed every node."""
        n = len(pars)
        proposers = [0] * n   # per parent: bit mask of the speculators proposing a child
        for i in range(1, n):
            for s, _ in origins[i]:
                proposers[pars[i]] |= 1 << s
        # (a node with several proposers gives its parent several bits too)
        if all(m & (m - 1) == 0 for m in proposers):
            return None
        out: List[Optional[Tuple[int, float]]] = [None] * n
        for i in range(1, n):
            orig = origins[i]
            if len(orig) > 1:
                kind = AGREED
            elif proposers[pars[i]] != 1 << orig[0][0]:
                kind = CONTESTED
            else:
                continue
            raw = prob[i]
            out[i] = (kind, raw)
            prob[i] = self.agreement[kind].prob(depth[i], raw)
        return out

    def _record_cutoffs(self, merged, chosen) -> None:
        """Each speculator's cutoff in this step (see the module docstring)."""
        lo = [math.inf] * self.num_speculators    # smallest selected
        hi = [-math.inf] * self.num_speculators   # largest proposed
        for (toks, pars, depth, _, origins, _), keep in zip(merged, chosen):
            keep = set(keep)
            own = [dict() for _ in toks]   # per node: speculator -> its own path probability
            for i in range(1, len(toks)):
                parent = own[pars[i]]
                for s, conf in origins[i]:
                    p = parent.get(s, 1.0) * conf
                    own[i][s] = p
                    if depth[i] >= 2:
                        hi[s] = max(hi[s], p)
                        if i in keep:
                            lo[s] = min(lo[s], p)
        for s in range(self.num_speculators):
            cut = lo[s] if lo[s] < math.inf else hi[s]
            if cut > -math.inf:
                cuts = self._cutoffs[s]
                cuts.append(cut)
                if len(cuts) > CUTOFF_STEPS:
                    del cuts[0]
                if len(cuts) >= MIN_CUTOFFS:
                    self._hints[s] = min(float(np.percentile(cuts, CUTOFF_QUANTILE)), 0.99)

    # ---- learning from the step ----------------------------------------------------------

    def observe(self, trees: List[DraftTree], origins, accepted: List[np.ndarray],
                ran: Optional[Sequence[bool]] = None, emitted: Optional[Sequence[Sequence[int]]] = None) -> None:
        """Updates the calibrations from a verified step: every node whose
        parent was accepted (or is the root) is a trial for its proposers,
        and an agreed or contested one of the trees of the last
        :meth:`select` also for that kind's second calibration.
        ``ran`` says which speculators proposed this step (default: all);
        ``emitted[b]`` the tokens request b emitted (the fallback's comparison
        reads the first; without it the comparison learns nothing)."""
        self.steps += 1
        self._expected.clear()   # the calibrations change below
        firsts, self._firsts = self._firsts, None
        if firsts is not None and emitted is not None:
            for (fa, fs), em in zip(firsts, emitted):
                if fa is None or fs is None or len(em) == 0:
                    continue
                self.pair_n = min(self.pair_n + 1.0, PAIR_MEMORY)
                hit = np.array([fa == int(em[0]), fs == int(em[0])], float)
                self.pair_hits += (hit - self.pair_hits) / self.pair_n
        step_emitted = float(sum(len(acc) + 1 for acc in accepted))
        if self._this_forward and step_emitted > 0:
            self._step_n += 1
            w = 1.0 / min(self._step_n, 50)
            self.step_seconds += (self._this_step - self.step_seconds) * w
            self.step_tokens += (step_emitted - self.step_tokens) * w
        self._this_step, self._this_forward = 0.0, False
        credit = np.zeros(self.num_speculators)
        added = np.zeros(self.num_speculators)   # accepted, and proposed by no earlier speculator
        for orig, acc in zip(origins, accepted):
            for i in acc:
                first = min((s for s, _ in orig[int(i)]), default=None)
                if first is not None:
                    added[first] += 1
                for s, _ in orig[int(i)]:
                    credit[s] += 1
        for s, b in enumerate(self._context):
            if b is not None and (ran is None or ran[s]):
                self.marginal_n[s, b] = min(self.marginal_n[s, b] + 1, 1 / (1 - DECAY))
                self.marginal[s, b] += (added[s] / max(len(trees), 1) - self.marginal[s, b]) / \
                    min(self.marginal_n[s, b], 50)
        self._context = [None] * self.num_speculators
        if trees:
            self._share_n = min(self._share_n + 1, SHARE_MEMORY)
            w = 1.0 / self._share_n
            self.only += (added / len(trees) - self.only) * w
            self.emitted_per_request += (step_emitted / len(trees) - self.emitted_per_request) * w
        for s in range(self.num_speculators):
            if ran is None or ran[s]:
                self.gain_n[s] = min(self.gain_n[s] + 1, 1 / (1 - DECAY))
                self.gain[s] += (credit[s] / max(len(trees), 1) - self.gain[s]) / min(self.gain_n[s], 50)
        trials = [[] for _ in range(self.num_speculators)]
        agreement_trials: List[List[Tuple[int, float, bool]]] = [[], []]
        agreement_of, self._agreement_of = self._agreement_of, []
        if len(agreement_of) != len(trees):   # not the trees of this controller's last select()
            agreement_of = [None] * len(trees)
        for tree, orig, acc, agree in zip(trees, origins, accepted, agreement_of):
            n = len(tree)
            if n <= 1:
                continue
            on_path = [False] * n
            on_path[0] = True
            for i in acc:
                on_path[int(i)] = True
            parents = tree.parents.tolist()
            depths = tree.depths.tolist()
            for i in range(1, n):
                if on_path[parents[i]]:
                    for s, conf in orig[i]:
                        trials[s].append((depths[i], conf, on_path[i]))
                    if agree is not None and agree[i] is not None:
                        kind, raw = agree[i]
                        agreement_trials[kind].append((depths[i], raw, on_path[i]))
        for s, t in enumerate(trials):
            self.calib[s].record_many(t)
        for cal, t in zip(self.agreement, agreement_trials):
            cal.record_many(t)

    def share_only(self, speculator: int) -> Optional[float]:
        """The share of emitted tokens, over about the last ``SHARE_MEMORY``
        request-steps, that ``speculator`` drafted and no speculator before
        it did (steps it did not run count as none); None before any step."""
        if self._share_n == 0 or self.emitted_per_request <= 0:
            return None
        return float(self.only[speculator] / self.emitted_per_request)

    def record_forward(self, nodes: int, seconds: float) -> None:
        self.cost.record(nodes, seconds)
        self._this_step += seconds
        self._this_forward = True

    def record_draft(self, speculator: int, seconds: float) -> None:
        self._this_step += seconds
        if not self._draft_seen[speculator]:
            self.draft_time[speculator] = seconds
            self._draft_seen[speculator] = True
        else:
            self.draft_time[speculator] += 0.1 * (seconds - self.draft_time[speculator])

    def summary(self) -> dict:
        """Current estimates, for reports."""
        return {
            "acceptance": [round(c.recent, 4) for c in self.calib],
            "drift": [round(c.drift, 3) for c in self.calib],
            "agreed_contested_acceptance": [round(c.recent, 4) for c in self.agreement],
            "tokens_per_step": [round(float(g), 4) for g in self.gain],
            "trusted": self.trusted,
            "fallback_first_token_hits": None if self.fallback is None else
            [round(float(h), 4) for h in self.pair_hits] + [round(self.pair_n, 1)],
            "forward_seconds": {n: round(self.cost(n), 5) for n in self.cost.known_sizes},
            "draft_seconds": [round(float(t), 6) for t in self.draft_time],
            "seconds_per_token": round(self.seconds_per_token(), 5),
            "skipped_in_context": self.skipped.tolist(),
            "share_only": [None if self._share_n == 0 else round(self.share_only(s), 4)
                           for s in range(self.num_speculators)],
        }
