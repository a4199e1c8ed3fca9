"""Request-local adaptation: the draft head fitted to each request's prompt.

When a request arrives, the target's prefill computes its feature at every
prompt position, so the prompt is a small training set of the very text the
head is about to draft for: its identifiers, its style, its task. Right
after the prefill, the learning loop (:class:`atlas.learning.LearningLoop`,
on the serving thread) takes a few Adam steps on those examples, starting
from the live version's weights and changing only the MLP
(``ADAPT_TENSORS``), and hands the result to the speculator, which drafts
that request alone with it (:meth:`atlas.speculators.LearnedSpeculator.adapt`,
a request-local version: ``DraftHeadSnapshot.derive``) while every other
request drafts with the live version. The live weights never change this
way: what a prompt teaches is kept for its own request and dropped when it
ends (the replay buffer still gets the prompt's examples, for the slow,
shared learning of :mod:`atlas.learning.trainer`).

Why it pays: learning across requests generalises to new requests only so
far (with a few hundred requests the head memorises what it saw, see
``bench/results/CPU.md``), while a prompt says a lot about its own
continuation. Measured in a simulation of the HumanEval stream (SmolLM2-135M,
the static head trained on the teacher-forced prompts and outputs of
requests 0-122 with the loop's settings, then frozen; depth-1 greedy
acceptance on the outputs of requests 123-163, 4,707 positions; the static
head alone scores 0.386):

=======================================================  ==========
adaptation to each prompt, from the frozen head           acceptance
=======================================================  ==========
none                                                     0.493
the MLP, 1 step over every row, learning rate 2e-3       0.515
the MLP, 2 steps over every row at 2e-3                  0.531
the MLP, 4 steps over every row at 1e-3                  0.535
the MLP, 10 steps over every row at 4e-4                 0.542
the MLP, 2 steps of 64 sampled rows at 2e-3 (default)    0.525
the MLP, 4 steps of 64 rows at 1e-3                      0.527
the MLP, 4 steps of 32 rows at 1e-3                      0.525
every tensor but W_out, 20 steps of 64 rows at 5e-4      0.537
W_in and b_in, 20 steps of 64 at 3e-4                    0.530
b_in and the norms only, 20 steps of 64 at 3e-3          0.504
a bias on the logits alone, 20 steps at 0.1              0.480
=======================================================  ==========

(Rows drawn with replacement there. The static head adapted the same way,
with no learning across requests: 0.437 with 4 steps of 64 rows at 1e-3,
0.460 with 20 steps of 64 at 5e-4.) Steps at a
larger learning rate undo the gain (20 steps of 64 at 3e-3: 0.417): a few
small steps from the live weights, not a fit to the prompt.

Cost, and why the default is small and on the serving thread: a step over a
230-token prompt's every row took 27 ms of one core (bfloat16 products,
AVX-512 BF16), about 0.12 ms a row. At the default a fit takes about 21 ms
of one core (20 HumanEval prompts of 145 rows on average), the targets of
the rows it draws included (at most ``steps * batch`` of them, not every
row: :func:`~atlas.learning.trainer.fill_targets`), plus 2.4 ms for the
derived version. It computes gradients for ``ADAPT_TENSORS`` alone (the
frozen tensors' would be a third more products) and steps a fused Adam;
before those three changes it took 33 ms. In full atlas on two cores,
between forwards that have just swept the caches, a fit costs 39 ms a
request (bench_atlas.py's stream of 164 requests: 6.4 s, about 2% of
serving time; 52 ms before).

Two ways of keeping the fit off the serving thread were measured in that
stream and dropped: fits in the trainer process, which is
paused while target forwards run, came back late (106 of 160 after their
request had ended) and left the trainer 240 steps against about 590 (full
atlas 2.00x plain decoding in the last quarter, behind the suffix speculator
alone); letting that process run beside the forwards until its fit came back
got the fits in time but stalled the forwards' threads (1.75x).

When it pays: a fit raises the head's acceptance by about ``ADAPT_GAIN``
(served alone, the frozen adaptive head of three bench_atlas.py runs: tokens
accepted a step +4.8%, +8.1% and +9.6% with the fit; teacher-forced depth-1
acceptance +7.8% to +8.6%), so it saves about that share of what the head's
own drafts save the request. Where another speculator drafts most of the
accepted tokens that is far less than the fit costs: in full atlas on
HumanEval 2-5% of the emitted tokens were drafted by the adaptive head and
not by the suffix speculator (``Controller.share_only``), so a fit would
save a 128-token request a few milliseconds for its 30-35. (That share
leaves out what a better head does for the tokens both propose, through the
controller's calibrations: measured, fits raised full atlas's tokens a step
by about 1.4%, worth some 20 ms a request, still less than their cost.) The
same stream served with and without fits (two engines taking turns request
by request, 100 requests) ran 3.5% faster without them in its last quarter
(2.9% +- 1.2% per request over all 100). So the learning loop asks the
engine it observes what the head's drafts save each request
(``Engine.speculation_value``) and fits only when ``ADAPT_GAIN`` of that
exceeds what its latest fits took (``LearningLoop.fit_pays``). Served alone,
the head drafts every accepted draft token, 42% of those emitted, and a fit
saves about 75 ms for its 33.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .head import DraftHead, distillation_loss
from .trainer import adam, fill_targets

# The tensors request-local adaptation changes (see the table above).
ADAPT_TENSORS = ("w_gate", "w_up", "w_down")
# Adam steps per prompt (0: off), their learning rate, and the prompt rows
# each step samples (all of them when there are fewer).
ADAPT_STEPS = 2
ADAPT_LR = 2e-3
ADAPT_BATCH = 64
# The prompt rows a fit samples from, at most (the last ones).
ADAPT_MAX_ROWS = 512
# The relative rise of the head's acceptance that a fit brings, as measured
# (see "When it pays" above): what the learning loop expects of a fit.
ADAPT_GAIN = 0.08


def adapt_to_prompt(head: DraftHead, ex, *, steps: int = ADAPT_STEPS, lr: float = ADAPT_LR,
                    batch: int = ADAPT_BATCH, feature_weight: float = 1.0, bfloat16: bool = False,
                    max_rows: int = ADAPT_MAX_ROWS, rng: Optional[np.random.Generator] = None,
                    cache: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """``ADAPT_TENSORS`` of ``head`` after ``steps`` Adam steps (learning
    rate ``lr``) of :func:`~atlas.learning.head.distillation_loss` on
    ``ex``, the :class:`~atlas.learning.tap.Examples` of one prompt: each
    step on ``batch`` rows drawn without replacement by ``rng`` (every row,
    in order, when there are no more) from the last ``max_rows``. Rows
    without targets (a prompt's, from the tap) get them first, only the rows
    the steps draw (:func:`~atlas.learning.trainer.fill_targets` with
    ``head``'s draft vocabulary and ``cache``, its dict of LM head rows);
    ``ex`` is not changed. ``head`` holds the weights to start from (the
    live version's) and is not changed. ``bfloat16``: the products under
    ``torch.autocast`` in bfloat16, as the trainer's ``precision``. Returns
    float32 arrays by name, what ``DraftHeadSnapshot.derive`` takes. Raises
    ValueError for no examples, and when a step's loss is not finite."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not float(lr) > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    for name, v in (("batch", batch), ("max_rows", max_rows)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if len(ex) == 0:
        raise ValueError("no examples to adapt to")
    first = max(0, len(ex) - max_rows)
    n = len(ex) - first
    rng = np.random.default_rng(0) if rng is None else rng
    # Every step's rows first, then one gather (and one fill) of those alone.
    picks = [np.sort(rng.choice(n, batch, replace=False)) if n > batch else np.arange(n) for _ in range(steps)]
    used, where = np.unique(np.concatenate(picks), return_inverse=True)
    sub = fill_targets(ex.take(first + used), head, cache)
    data = [torch.from_numpy(a) for a in
            (sub.parent_feature, sub.token, sub.feature, sub.topk_logits, sub.topk_ids)]
    params = {name: getattr(head, name).detach().clone().requires_grad_(True) for name in ADAPT_TENSORS}
    opt = adam(params.values(), float(lr))
    at = 0
    for rows in picks:
        idx = torch.from_numpy(where[at:at + len(rows)])
        at += len(rows)
        x = [a[idx] for a in data]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            f_hat, logits = head.forward_with(x[0], x[1], params)
            loss, _ = distillation_loss(logits, f_hat, x[2], x[3], x[4], head.full_to_draft, feature_weight)
        if not torch.isfinite(loss):
            raise ValueError(f"adapting to a prompt gave a non-finite loss ({float(loss)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {name: p.detach().contiguous().numpy().copy() for name, p in params.items()}
