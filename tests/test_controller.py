"""The controller's decisions, on synthetic candidates and verdicts: the cost
model's bound, and which speculators it asks to draft in which context."""
import numpy as np
import pytest

from atlas.controller import EXPLORE_EVERY, PROBE_HINT, STALE_RECORDS, Controller, CostModel
from atlas.tree import DraftTree

VOCAB = 100


def chain(tokens, conf):
    """A chain candidate: root 0, then ``tokens``, each with confidence ``conf``."""
    n = len(tokens) + 1
    return DraftTree.from_arrays([0] + list(tokens), [-1] + list(range(n - 1)),
                                 confidences=[1.0] + [conf] * (n - 1), max_nodes=n, vocab_size=VOCAB)


def test_cost_model_never_exceeds_separate_forwards():
    cost = CostModel()
    cost.record(1, 0.05)
    cost.record(4, 5.0)            # a stalled measurement
    cost.record(8, 0.09)
    assert cost(4) == pytest.approx(0.09)       # not above the larger size's
    assert cost(8) == pytest.approx(0.09)
    assert cost(2) <= 0.1
    assert cost(1) == pytest.approx(0.05)
    cost.record(12, 0.08)                        # a larger size measured cheaper still
    assert cost(8) == pytest.approx(0.08) and cost(4) == pytest.approx(0.08)
    cost.record(2, 0.03)                         # and the one-node figure held to two nodes'
    assert cost(2) == pytest.approx(0.03) and cost(1) == pytest.approx(0.03)


def test_cost_model_forgets_stale_sizes():
    """A size measured while the machine was busy is tried again later: once
    its measurement is stale, the cost beyond the fresh sizes is assumed flat."""
    cost = CostModel()
    for n, t in ((1, 0.05), (2, 0.1), (8, 0.4)):   # measured under load: no tree pays
        cost.record(n, t)
    assert cost(8) == pytest.approx(0.4)
    for _ in range(STALE_RECORDS + 1):
        cost.record(1, 0.05)                        # only plain steps since
    assert cost.known_sizes == [1]
    assert cost(8) == pytest.approx(0.05)
    cost.record(8, 0.07)                            # tried again, measured anew
    assert cost(8) == pytest.approx(0.07) and cost(4) < 0.07


def test_cost_model_medians_interpolation_and_extrapolation():
    """Medians per size (even counts average the middle two), linear between
    sizes, beyond them the least squares line's slope, as numpy computes them."""
    rng = np.random.default_rng(0)
    obs = {1: rng.random(5) + 1, 4: rng.random(6) + 2, 8: rng.random(7) + 3, 16: rng.random(4) + 5}
    cost = CostModel()
    for n, ts in obs.items():
        for t in ts:
            cost.record(n, float(t))
    med = {n: float(np.median(ts)) for n, ts in obs.items()}
    for n in obs:
        assert cost(n) == pytest.approx(med[n])
    assert cost(6) == pytest.approx(0.5 * (med[4] + med[8]))
    sizes = sorted(obs)
    slope = np.polyfit(sizes, [med[n] for n in sizes], 1)[0]
    assert cost(20) == pytest.approx(med[16] + 4 * slope)


def step(ctl, first, second_tokens, accepted_first, accepted_second, draft_second=0.01):
    """One step of two speculators: 0 proposes ``first``; 1 (if the controller
    asks) proposes ``second_tokens`` as a fan under the root. Returns whether
    1 ran. ``accepted_*``: whether each speculator's first node is accepted."""
    cands = [[first, None]]
    ran = [True, False]
    assert ctl.worth_running(0, [[None, None]], 1)
    ctl.record_draft(0, 1e-5)
    if ctl.worth_running(1, cands, 1):
        ran[1] = True
        cands[0][1] = DraftTree.from_arrays([0] + list(second_tokens), [-1] + [0] * len(second_tokens),
                                            confidences=[1.0] + [0.5] * len(second_tokens),
                                            max_nodes=len(second_tokens) + 1, vocab_size=VOCAB)
        ctl.record_draft(1, draft_second)
    trees, origins = ctl.select([0], cands, VOCAB, [16], 0.0)
    tree = trees[0]
    toks = tree.tokens
    acc = []
    if accepted_first and first is not None and len(first) > 1:
        acc = [i for i in range(1, len(toks)) if tree.parents[i] == 0 and toks[i] == first.tokens[1]]
    elif accepted_second and ran[1]:
        acc = [i for i in range(1, len(toks)) if tree.parents[i] == 0 and toks[i] == second_tokens[0]]
    ctl.observe(trees, origins, [np.asarray(acc[:1], np.int32)], ran)
    return ran[1]


def test_selection_keeps_the_prefix_of_best_rate_however_the_costs_grow():
    """One speculator, one request: the selected tree is the prefix of the
    nodes in decreasing path probability whose expected tokens per second
    (cost model plus drafting time) is best, the first among equals, with
    forward costs flat, linear, steep and stepped. (The selection stops
    popping nodes once the rest could not lift the rate; this checks that it
    never stops early.)"""
    rng = np.random.default_rng(3)
    curves = [lambda n: 0.03, lambda n: 0.03 + 0.001 * n, lambda n: 0.01 * n,
              lambda n: 0.03 if n <= 8 else 0.045]
    for trial in range(200):
        ctl = Controller(1, max_nodes=48)
        curve = curves[trial % len(curves)]
        for n in (1, 2, 4, 8, 12, 16, 32):
            ctl.record_forward(n, curve(n))
        size = int(rng.integers(2, 40))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, size)]
        conf = [1.0] + rng.random(size - 1).tolist()
        tree = DraftTree.from_arrays(list(range(size)), parents, confidences=conf, max_nodes=size,
                                     vocab_size=VOCAB)
        draft = float(rng.choice([0.0, 0.002]))
        prob = [1.0] + [ctl.calib[0].prob(int(d), float(c)) for d, c in zip(tree.depths[1:], tree.confidences[1:])]
        path = [1.0] * size
        for i in range(1, size):
            path[i] = path[parents[i]] * prob[i]
        ranked = sorted(path[1:], reverse=True)
        best, best_rate = 0, 1.0 / (ctl.cost(1) + draft)
        for k in range(1, size):
            rate = (1.0 + sum(ranked[:k])) / (ctl.cost(1 + k) + draft)
            if rate > best_rate:
                best, best_rate = k, rate
        trees, _ = ctl.select([0], [[tree]], VOCAB, [size], draft)
        assert len(trees[0]) == 1 + best


def test_a_costly_speculator_is_skipped_where_it_adds_nothing():
    """Speculator 1 (10 ms a step) adds tokens only when speculator 0 has no
    confident candidate; the controller stops asking it when 0 is confident,
    keeps asking when 0 has nothing, and still tries it now and then."""
    ctl = Controller(2, max_nodes=16)
    for n in (1, 2, 4, 8, 16):
        ctl.record_forward(n, 0.05 + 0.002 * n)
    confident = chain([5, 6, 7, 8], 0.95)
    ran_confident, ran_empty = [], []
    for i in range(400):
        if i % 2 == 0:
            ran_confident.append(step(ctl, confident, [9], accepted_first=True, accepted_second=False))
        else:
            ran_empty.append(step(ctl, None, [9], accepted_first=False, accepted_second=True))
    late_confident = ran_confident[len(ran_confident) // 2:]
    assert all(ran_empty)
    # Skipped in the confident context, except the exploration steps (one
    # step in EXPLORE_EVERY; with this alternation they all fall on confident ones).
    assert sum(late_confident) <= 2 * len(late_confident) // EXPLORE_EVERY + 2
    assert ctl.skipped[1] > 100 and ctl.skipped[0] == 0


def test_a_cheap_speculator_is_never_skipped():
    """A speculator costing microseconds keeps drafting through a long run of
    useless steps: its next good step is worth far more than its cost."""
    ctl = Controller(1, max_nodes=16)
    for n in (1, 2, 4):
        ctl.record_forward(n, 0.05)
    tree = chain([5], 0.5)
    for _ in range(200):
        assert ctl.worth_running(0, [[None]], 1)
        ctl.record_draft(0, 4e-5)
        trees, origins = ctl.select([0], [[tree]], VOCAB, [16], 0.0)
        ctl.observe(trees, origins, [np.zeros(0, np.int32)], [True])
    assert ctl.skipped[0] == 0



def test_calibration_follows_a_sudden_shift_within_a_few_hundred_nodes():
    """Steady traffic leaves the drift correction near 1; when acceptance
    drops from 90% to 20% at the same confidence, the estimate follows within
    a few hundred verified nodes, while the 5,000-node counts alone would
    still say about 0.8."""
    from atlas.controller import DRIFT_MEMORY, _Calibration
    rng = np.random.default_rng(0)
    cal = _Calibration()
    for _ in range(6000):
        cal.record(1, 0.85, bool(rng.random() < 0.9))
    assert cal.prob(1, 0.85) == pytest.approx(0.9, abs=0.03)
    assert cal.drift == pytest.approx(1.0, abs=0.06)
    for _ in range(DRIFT_MEMORY):
        cal.record(1, 0.85, bool(rng.random() < 0.2))
    assert cal.counted(1, 0.85) > 0.75          # the slow counts have barely moved
    assert cal.prob(1, 0.85) < 0.5              # the corrected estimate has
    for _ in range(DRIFT_MEMORY):
        cal.record(1, 0.85, bool(rng.random() < 0.2))
    assert cal.counted(1, 0.85) > 0.65
    assert cal.prob(1, 0.85) < 0.35
    for _ in range(3 * DRIFT_MEMORY):           # and it settles on the new level
        cal.record(1, 0.85, bool(rng.random() < 0.2))
    assert cal.prob(1, 0.85) == pytest.approx(0.2, abs=0.07)


def test_a_token_is_valued_at_what_a_token_costs_now():
    """The controller's price of a token is the recent step time over the
    tokens a step emits: a speculator that adds 0.15 tokens a step for 4 ms
    of drafting runs while a token costs 30 ms, and is skipped once steps
    emit 3 tokens for 36 ms (0.15 x 12 ms < 4 ms)."""
    ctl = Controller(2, max_nodes=16)
    ctl.record_forward(1, 0.030)
    assert ctl.seconds_per_token() == pytest.approx(0.030)   # before any step: a one-node forward
    base = chain([5, 6], 0.9)

    def one_step(accepted):
        ctl.active()
        ran = ctl.worth_running(1, [[base, None]], 1)
        ctl.record_draft(1, 0.004)
        ctl.record_forward(3, 0.032)
        ctl._context[1] = ctl._context[1] if ran else None
        ctl.marginal[1, :] = 0.15                      # what it adds, in every context
        ctl.marginal_n[1, :] = 1000
        origins = [[[], [(0, 0.9)], [(0, 0.9)]]]       # the chain as verified, drafted by speculator 0
        ctl.observe([base], origins, [np.arange(1, accepted + 1, dtype=np.int32)], [True, ran])
        return ran

    ctl.steps = 1
    ran = [one_step(0) for _ in range(60)]             # 1 token a step: a token costs 36 ms
    assert ctl.seconds_per_token() == pytest.approx(0.036, rel=0.01)
    assert all(ran[1:])
    ran = [one_step(2) for _ in range(200)]            # 3 tokens a step: 12 ms
    assert ctl.seconds_per_token() == pytest.approx(0.012, rel=0.02)
    late = ran[100:]
    assert sum(late) <= len(late) // EXPLORE_EVERY + 1  # only the exploration steps


def test_the_drafting_hint_is_a_low_percentile_of_cutoffs_measured_on_exploration_steps():
    """A speculator's cutoff in a step: its smallest selected own path
    probability below depth 1, or, when the step selected none of those, the
    largest it proposed. It is measured on exploration steps only, where the
    hint is 0, so that what the hint leaves out is still measured."""
    def run(ctl, steps):
        hints = []
        for _ in range(steps):
            hints.append((ctl.steps, ctl.path_hint(1)))
            cands = [[None, chain([5, 6, 7, 8], 0.9)]]
            trees, origins = ctl.select([0], cands, VOCAB, [16], 0.0)
            ctl.observe(trees, origins, [np.zeros(0, np.int32)], [False, True])
        return hints

    cheap = Controller(2)
    for n in range(1, 9):
        cheap.cost.record(n, 0.02)     # every node pays: the whole chain is selected
    hints = run(cheap, 7 * EXPLORE_EVERY + 1)
    assert all(h == 0.0 for _, h in hints)           # fewer than 8 cutoffs measured, or exploring
    assert cheap.path_hint(0) == 0.0                 # speculator 0 proposed nothing
    assert cheap.path_hint(1) == pytest.approx(0.9 ** 4, rel=1e-6)
    run(cheap, EXPLORE_EVERY - 1)
    assert cheap.steps % EXPLORE_EVERY == 0 and cheap.path_hint(1) == 0.0

    dear = Controller(2)
    dear.cost.record(1, 0.02)
    dear.cost.record(2, 1.0)           # no drafted node pays
    run(dear, 7 * EXPLORE_EVERY + 1)
    # None selected: the largest proposed below depth 1 (depth 2) is the cutoff.
    assert dear.path_hint(1) == pytest.approx(0.9 ** 2, rel=1e-6)
    assert Controller(2, select="all").path_hint(1) == 0.0


def test_the_untrusted_head_of_the_fallback_pair_probes_its_first_tokens_on_exploration_steps():
    """On exploration steps the fallback's untrusted speculator drafts with
    PROBE_HINT (its first tokens, which the comparison reads), every other
    speculator with no hint; on other steps it does not run."""
    ctl = Controller(3, fallback=(1, 2))
    assert ctl.steps % EXPLORE_EVERY == 0
    run = ctl.active()
    assert run == [True, True, True] and ctl.trusted == 2   # the static one until the adaptive is measured
    assert ctl.path_hint(1) == PROBE_HINT and 0.0 < PROBE_HINT < 1.0
    assert ctl.path_hint(0) == 0.0 and ctl.path_hint(2) == 0.0
    ctl.observe([DraftTree(0, 4, VOCAB)], [[[]]], [np.zeros(0, np.int32)], run)
    assert ctl.active() == [True, False, True]
    ctl.pair_n, ctl.pair_hits[:] = 50.0, [0.6, 0.4]           # the adaptive one measured better
    for _ in range(EXPLORE_EVERY - 1):
        ctl.observe([DraftTree(0, 4, VOCAB)], [[[]]], [np.zeros(0, np.int32)], ctl.active())
    assert ctl.active() == [True, True, True] and ctl.trusted == 1
    assert ctl.path_hint(2) == PROBE_HINT and ctl.path_hint(1) == 0.0


def fallback_step(ctl, k, adaptive_right, static_right, emitted=True):
    """One step with a fallback pair: 0 the adaptive head, 1 the static one.
    The target's next token is 7. The adaptive head drafts a chain whose
    deeper nodes are always wrong, the static one a single node; each
    one's first token is 7 when ``*_right(k)``. Returns which ones drafted."""
    run = ctl.active()
    cands = [[None, None]]
    if run[0]:
        cands[0][0] = chain([7 if adaptive_right(k) else 8, 9, 9, 9], 0.9)
    if run[1]:
        cands[0][1] = chain([7 if static_right(k) else 8], 0.9)
    trees, origins = ctl.select([0], cands, VOCAB, [16], 0.0)
    tree = trees[0]
    acc = [i for i in range(1, len(tree)) if tree.parents[i] == 0 and tree.tokens[i] == 7]
    ctl.observe(trees, origins, [np.asarray(acc, np.int32)], run, [[7, 3]] if emitted else None)
    return run


def test_the_fallback_trusts_the_head_whose_first_tokens_the_target_emits():
    """Compared on the steps where both drafted: the adaptive head's first
    token is right 4 times in 5, the static head's every other time, so the
    adaptive head serves. When its first tokens go wrong it is dropped within
    a few dozen comparisons, and trusted again when they recover."""
    from atlas.controller import MIN_PAIRS, PAIR_MEMORY
    ctl = Controller(2, max_nodes=16, fallback=(0, 1))
    for n in range(1, 9):
        ctl.record_forward(n, 0.02 + 0.001 * n)
    # Patterns over the exploration steps (every EXPLORE_EVERY-th), where both draft.
    good = lambda k: (k // EXPLORE_EVERY) % 5 != 0      # noqa: E731
    half = lambda k: (k // EXPLORE_EVERY) % 2 == 0      # noqa: E731
    bad = lambda k: (k // EXPLORE_EVERY) % 5 == 0       # noqa: E731
    assert ctl.trusted == 1
    runs = [fallback_step(ctl, k, good, half) for k in range(600)]
    # Until MIN_PAIRS comparisons the static head serves (the adaptive one
    # drafts on exploration steps only).
    assert runs[0] == [True, True] and runs[1] == [False, True]
    assert ctl.trusted == 0
    assert ctl.pair_hits[0] == pytest.approx(0.8, abs=0.05) and ctl.pair_hits[1] == pytest.approx(0.5, abs=0.05)
    late = runs[300:]
    assert sum(r[0] for r in late) == len(late)
    assert sum(r[1] for r in late) <= len(late) // EXPLORE_EVERY + 1
    assert ctl.summary()["fallback_first_token_hits"][2] == min(60, PAIR_MEMORY)
    # The adaptive head's first tokens go bad: dropped within 50 comparisons.
    runs = [fallback_step(ctl, k, bad, half) for k in range(50 * EXPLORE_EVERY)]
    assert ctl.trusted == 1
    assert sum(r[0] for r in runs[-100:]) <= 100 // EXPLORE_EVERY + 1
    runs = [fallback_step(ctl, k, good, half) for k in range(60 * EXPLORE_EVERY)]
    assert ctl.trusted == 0 and MIN_PAIRS < PAIR_MEMORY <= 100


def test_without_emitted_tokens_the_fallback_keeps_the_static_head():
    ctl = Controller(2, max_nodes=16, fallback=(0, 1))
    for n in range(1, 9):
        ctl.record_forward(n, 0.02 + 0.001 * n)
    for k in range(300):
        fallback_step(ctl, k, lambda k: True, lambda k: False, emitted=False)
    assert ctl.trusted == 1 and ctl.pair_n == 0


def test_calibration_estimates_are_remembered_only_until_the_next_record():
    """counted() keeps each cell's estimate between records (the selection
    reads the same cells many times a step); a record forgets them all, and
    every answer equals a fresh computation from the same counts."""
    from atlas.controller import _Calibration
    rng = np.random.default_rng(1)
    cal = _Calibration()

    def fresh(depth, conf):
        other = _Calibration(accepted=cal.accepted.copy(), tried=cal.tried.copy())
        return other.counted(depth, conf)

    for step in range(200):
        for _ in range(3):
            d, c = int(rng.integers(1, 12)), float(rng.random())
            assert cal.counted(d, c) == fresh(d, c)
        cal.record(int(rng.integers(1, 12)), float(rng.random()), bool(rng.random() < 0.6))
    assert cal.counted(1, 0.95) == cal.counted(1, 0.95) == fresh(1, 0.95)
    before = cal.counted(1, 0.95)
    for _ in range(20):
        cal.record(1, 0.95, False)
    assert cal.counted(1, 0.95) < before and cal.counted(1, 0.95) == fresh(1, 0.95)


def test_a_trees_acceptances_are_looked_up_as_prob_reads_them_node_by_node():
    """probs_of (one table lookup per tree, what select() and
    expected_tokens() read) equals prob() node by node, bin edges, deep nodes
    and a drift correction included."""
    from atlas.controller import CONF_BINS, _Calibration
    rng = np.random.default_rng(2)
    cal = _Calibration()
    for _ in range(400):   # enough nodes for the drift check to apply
        cal.record(int(rng.integers(1, 12)), float(rng.random()), bool(rng.random() < 0.3))
    assert cal.drift != 1.0
    edges = np.arange(CONF_BINS + 1, dtype=np.float32) / CONF_BINS   # 0.3 as float32 is below 0.3
    conf = np.concatenate([edges, rng.random(200).astype(np.float32), np.nextafter(edges, 2, dtype=np.float32)])
    conf = np.minimum(conf, 1.0).astype(np.float32)
    depth = rng.integers(1, 14, conf.size).astype(np.int32)
    assert cal.probs_of(depth, conf) == [cal.prob(int(d), float(c)) for d, c in zip(depth, conf)]


def test_agreed_and_contested_nodes_get_calibrations_of_their_own():
    """Two speculators, each with confidence 0.5 in its first token. When they
    propose the same token the target takes it 90% of the time; when they
    disagree, speculator 0's token 40% and speculator 1's 10%. Each one's own
    calibration pools both cases, so it cannot tell them apart; the merged
    tree's acceptances, which the selection uses, follow each case."""
    rng = np.random.default_rng(0)
    ctl = Controller(2, max_nodes=16)
    for n in (1, 2, 4, 8):
        ctl.record_forward(n, 0.05)

    def one(agree: bool):
        second = [5] if agree else [6]
        cands = [[chain([5], 0.5), chain(second, 0.5)]]
        trees, origins = ctl.select([0], cands, VOCAB, [16], 0.0)
        tree = trees[0]
        u = rng.random()
        want = (5 if u < 0.9 else None) if agree else (5 if u < 0.4 else 6 if u < 0.5 else None)
        acc = [i for i in range(1, len(tree)) if tree.tokens[i] == want]
        ctl.observe(trees, origins, [np.asarray(acc, np.int32)], [True, True])
        return {int(t): float(c) for t, c in zip(tree.tokens[1:], tree.confidences[1:])}

    for i in range(3000):
        one(agree=i % 2 == 0)
    agreed, contested = one(agree=True), one(agree=False)
    assert agreed[5] == pytest.approx(0.9, abs=0.08)
    assert contested[5] == pytest.approx(0.4, abs=0.08)
    assert contested[6] == pytest.approx(0.1, abs=0.06)
    # Speculator 1's own calibration saw 0.9 and 0.1 alike: about 0.5.
    assert ctl.calib[1].prob(1, 0.5) == pytest.approx(0.5, abs=0.08)


def test_a_single_speculator_is_calibrated_by_its_own_counts_alone():
    """With one speculator every node is alone: the selected tree's
    acceptances are that speculator's calibration, and no second calibration
    learns anything."""
    ctl = Controller(1, max_nodes=16)
    for n in (1, 2, 4, 8):
        ctl.record_forward(n, 0.05)
    fan = DraftTree.from_arrays([0, 5, 6, 7], [-1, 0, 0, 1], confidences=[1.0, 0.6, 0.3, 0.8], max_nodes=4,
                                vocab_size=VOCAB)
    for i in range(200):
        trees, origins = ctl.select([0], [[fan]], VOCAB, [16], 0.0)
        acc = [1, 3] if i % 3 else []
        ctl.observe(trees, origins, [np.asarray(acc, np.int32)], [True])
    trees, _ = ctl.select([0], [[fan]], VOCAB, [16], 0.0)
    tree = trees[0]
    for i in range(1, len(tree)):
        j = list(fan.tokens).index(tree.tokens[i])
        assert tree.confidences[i] == pytest.approx(ctl.calib[0].prob(int(fan.depths[j]), float(fan.confidences[j])))
    assert all(c.tried.sum() == 0 for c in ctl.agreement)


def test_share_only_is_the_share_of_emitted_tokens_no_earlier_speculator_drafted():
    """Accepted tokens are credited to the first speculator that drafted
    them; steps where a speculator did not run count as none of its own."""
    ctl = Controller(2, max_nodes=16)
    assert ctl.share_only(0) is None and ctl.summary()["share_only"] == [None, None]
    tree = chain([5, 6, 7], 0.9)
    # Node 1 drafted by both, nodes 2 and 3 by speculator 1 alone.
    origins = [[[], [(0, 0.9), (1, 0.8)], [(1, 0.8)], [(1, 0.8)]]]
    for _ in range(20):   # nodes 1-2 accepted: 3 tokens emitted, 1 only 0's, 1 only 1's
        ctl.observe([tree], origins, [np.array([1, 2], np.int32)], [True, True])
    assert ctl.share_only(0) == pytest.approx(1 / 3) and ctl.share_only(1) == pytest.approx(1 / 3)
    for _ in range(20):   # speculator 1 did not run: only the first node, speculator 0's
        ctl.observe([chain([5], 0.9)], [[[], [(0, 0.9)]]], [np.array([1], np.int32)], [True, False])
    # Running means over the 40 steps: 2.5 tokens emitted a step, 1 of them 0's alone, 0.5 1's alone.
    assert ctl.share_only(0) == pytest.approx(1.0 / 2.5) and ctl.share_only(1) == pytest.approx(0.5 / 2.5)
