"""The learned speculator's draft head: the PyTorch twin of the native forward.

The module is defined once, in ``cpp/include/atlas/head.h``; this twin computes
the same function in float32 with autograd, for training. Precision: the
native head stores its five matrices (``MATRICES``) in bfloat16, each pushed
float32 value rounded to nearest even (:func:`round_to_bf16`), rounds the
input of each matrix product to bfloat16 the same way, and computes in float32
with them (every product of two bfloat16 values is exact in float32); biases,
norms and the residual stay float32. So what serves is this twin with its
matrices and their inputs rounded: :meth:`DraftHead.forward_native` computes
that (the metrics of :mod:`atlas.learning.trainer` use it), while training
updates the float32 weights, which every push rounds afresh. The rounding
halves the bytes the native forward streams from memory and lets it use the
CPU's bfloat16 dot products where it has them (twice the multiply-adds of
float32 ones); it cannot change what is generated (the target verifies every
drafted token) and hardly changes the drafts (SmolLM2's static head on the
last 41 HumanEval requests' outputs, teacher-forced: depth-1 greedy hit rate
0.389 with float32 inputs and with rounded ones). Vocabulary:

* **feature**: a target final-norm hidden state (what its LM head reads), or
  the head's prediction of one (``f_hat``) deeper in a draft tree;
* **draft vocabulary**: the ``Vd`` tokens the head scores (the most frequent in
  traffic, see :func:`choose_draft_vocab`); ``draft_ids[j]`` is the token of
  logits column ``j``.

For a node x with parent feature f (``H`` = hidden size, ``I`` = intermediate):
``z = W_in [f ; E[x]] + b_in``, ``h = z + W_down(silu(W_gate n) * W_up n)`` with
``n = rmsnorm(z) * norm1``, ``f_hat = rmsnorm(h) * norm2``, ``logits = W_out
f_hat``. ``E`` is the target's token embedding, frozen and never pushed;
``W_out`` starts as the target's LM head rows of the draft tokens, so an
untrained head that predicted the feature exactly would score like the target.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The names of the pushable tensors, in the native binding's order; all float32
# except draft_ids (int32).
PUSHED = ("w_in", "b_in", "norm1", "w_gate", "w_up", "w_down", "norm2", "w_out", "draft_ids")
# The matrices, which the native head stores in bfloat16 (the other float
# tensors stay float32).
MATRICES = ("w_in", "w_gate", "w_up", "w_down", "w_out")
# The forward's float tensors: the pushed ones and the frozen embedding.
_FLOATS = ("embed",) + PUSHED[:-1]


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bfloat16 value (ties to even), as float32:
    what the native head's push does to each matrix value. Torch's float32 to
    bfloat16 cast rounds that way on the CPU (subnormals included; the tests
    check it against the native head bit for bit). A finite value of magnitude
    0x1.ffp127 (about 3.3962e38) or more becomes infinite, which the native
    push refuses."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return x.detach().to("cpu", torch.float32).to(torch.bfloat16).to(torch.float32)


# The draft vocabulary's default size: the tokens the head scores. Measured on
# SmolLM2-135M (2026-12-01, bench/results/CPU.md): static heads distilled with
# 2048 and 4096 tokens scored the same on `atlas distill`'s held-out examples
# (0.477 both) and within 1.5% of each other teacher-forced on HumanEval
# outputs, while 2048 made a cold draft 16% and a trainer step 22% cheaper (the
# output layer is most of the head's bytes and of its arithmetic).
DEFAULT_DRAFT_VOCAB = 2048


def choose_draft_vocab(counts, size: int) -> np.ndarray:
    """The ``size`` most frequent tokens of ``counts`` (``[vocab]``, counts per
    token id), ties broken towards the lower id, as sorted int32 ids. With
    ``size >= vocab`` every token. Typical sizes: 2048 to 8192 for a 49k or
    150k vocabulary (the head's output layer costs ``size * H`` per node)."""
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError("counts must be a non-empty 1-D array (one count per token id), "
                         f"got shape {counts.shape}")
    if counts.dtype.kind not in "iuf" or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must hold finite non-negative numbers")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = min(int(size), counts.size)
    # Stable sort of -counts: equal counts keep ascending id order.
    order = np.argsort(-counts.astype(np.float64), kind="stable")[:size]
    return np.sort(order).astype(np.int32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class DraftHead(nn.Module):
    """The draft head (fp32). ``embed`` and ``lm_head`` are the target's
    ``[vocab, H]`` token embedding and output layer (the same tensor when
    tied), which the head keeps frozen (float32 tables are not copied);
    ``draft_ids`` the draft vocabulary; ``intermediate`` the MLP width
    (default ``H``: on a CPU the head runs once per tree depth, and its cost
    grows with the width); ``eps`` the target's RMSNorm epsilon."""

    def __init__(self, embed: torch.Tensor, lm_head: torch.Tensor, draft_ids: Sequence[int],
                 intermediate: Optional[int] = None, eps: float = 1e-5, seed: int = 0):
        super().__init__()
        if not isinstance(embed, torch.Tensor) or embed.ndim != 2:
            raise ValueError("embed must be a 2-D tensor [vocab, hidden]")
        vocab, hidden = embed.shape
        if not isinstance(lm_head, torch.Tensor) or tuple(lm_head.shape) != (vocab, hidden):
            raise ValueError(f"lm_head must be a tensor of shape {(vocab, hidden)} (the embedding's), "
                             f"got {tuple(getattr(lm_head, 'shape', ()))}")
        ids = np.asarray(draft_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError("draft_ids must be a non-empty 1-D sequence of token ids")
        if ids.min() < 0 or ids.max() >= vocab or len(np.unique(ids)) != ids.size:
            raise ValueError(f"draft_ids must be distinct token ids in [0, {vocab})")
        intermediate = hidden if intermediate is None else intermediate
        if not isinstance(intermediate, int) or intermediate < 1:
            raise ValueError(f"intermediate must be a positive int, got {intermediate!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.hidden, self.intermediate, self.vocab, self.eps = hidden, intermediate, vocab, float(eps)
        # Frozen: a buffer, not a parameter; float32 and contiguous so that the
        # native head can read the same memory.
        self.register_buffer("embed", embed.detach().to(torch.float32).contiguous(), persistent=False)
        ids_t = torch.from_numpy(ids.astype(np.int64))
        self.register_buffer("draft_ids", ids_t)
        full_to_draft = torch.full((vocab,), -1, dtype=torch.long)
        full_to_draft[ids_t] = torch.arange(len(ids_t))
        self.register_buffer("full_to_draft", full_to_draft)  # [vocab], -1 outside the draft vocabulary

        gen = torch.Generator().manual_seed(seed)

        def uniform(rows, cols):  # nn.Linear's default scale, from an explicit generator
            bound = 1.0 / np.sqrt(cols)
            return nn.Parameter((torch.rand(rows, cols, generator=gen) * 2 - 1) * bound)

        self.w_in = uniform(hidden, 2 * hidden)
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.norm1 = nn.Parameter(torch.ones(hidden))
        self.w_gate = uniform(intermediate, hidden)
        self.w_up = uniform(intermediate, hidden)
        self.w_down = uniform(hidden, intermediate)
        self.norm2 = nn.Parameter(torch.ones(hidden))
        # The target's LM head (the embedding itself when tied: no copy),
        # frozen and never pushed: where a new draft vocabulary's output rows
        # start.
        tied = lm_head is embed or (lm_head.dtype == embed.dtype and lm_head.data_ptr() == embed.data_ptr()
                                    and lm_head.stride() == embed.stride())
        self.register_buffer("lm_head", self.embed if tied else lm_head.detach().to(torch.float32).contiguous(),
                             persistent=False)
        self.w_out = nn.Parameter(self.lm_head[ids_t].clone())

    @classmethod
    def from_target(cls, target, draft_ids: Sequence[int], **kwargs) -> "DraftHead":
        """A head for an :func:`atlas.load` target (its embedding, LM head,
        hidden size and RMSNorm epsilon)."""
        model = getattr(target, "model", None)
        embed = getattr(model, "embed", None)
        lm_head = getattr(model, "lm_head", None)
        if not isinstance(embed, torch.Tensor) or not isinstance(lm_head, torch.Tensor):
            raise ValueError("target must expose model.embed and model.lm_head tensors "
                             "(an atlas.load target)")
        if embed.shape[1] != target.config.hidden_size:
            raise ValueError("target.model.embed does not match target.config.hidden_size")
        kwargs.setdefault("eps", float(target.config.rms_norm_eps))
        # The twin trains on the host (the replay buffer lives there), whatever
        # device the target runs on; a tied LM head stays one table there.
        host = embed.cpu()
        return cls(host, host if lm_head is embed else lm_head.cpu(), draft_ids, **kwargs)

    def twin(self) -> "DraftHead":
        """A copy of this head's weights that shares its frozen embedding and
        LM head (no second ``[vocab, H]`` table)."""
        copy = DraftHead(self.embed, self.lm_head, self.draft_ids.numpy(), intermediate=self.intermediate,
                         eps=self.eps)
        copy.load_export(self.export())
        return copy

    @property
    def draft_vocab(self) -> int:
        return int(self.draft_ids.numel())

    def forward(self, features: torch.Tensor, tokens: torch.Tensor,
                bf16_inputs: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """features ``[N, H]``, tokens ``[N]`` -> (f_hat ``[N, H]``, logits ``[N, Vd]``).
        ``bf16_inputs``: round each matrix product's input to bfloat16 first,
        as the native head does (through float32, whatever the head's dtype)."""
        return self._forward(features, tokens, {name: getattr(self, name) for name in _FLOATS}, bf16_inputs)

    def forward_native(self, features: torch.Tensor, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The function the native head computes with this twin's weights: the
        forward with every matrix and every matrix product's input rounded to
        bfloat16 (:func:`round_to_bf16`), in float32 on the CPU, without
        autograd. Each call makes rounded float32 copies of the matrices (11 MB
        for SmolLM2's head with 2,048 draft tokens)."""
        with torch.no_grad():
            weights = {name: round_to_bf16(getattr(self, name)) if name in MATRICES
                       else getattr(self, name).detach().to("cpu", torch.float32) for name in _FLOATS}
            return self._forward(features.cpu(), tokens.cpu(), weights, True)

    def forward_with(self, features: torch.Tensor, tokens: torch.Tensor,
                     replaced: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The forward with some float tensors (names of ``PUSHED``) replaced
        by the given ones, which autograd flows into, and into nothing else:
        this head's own are read, detached, not changed (no gradient of
        theirs is computed). What request-local adaptation trains
        (:func:`atlas.learning.adapt.adapt_to_prompt`)."""
        unknown = sorted(set(replaced) - set(_FLOATS[1:]))
        if unknown:
            raise ValueError(f"replaced names unknown tensors {unknown}; the float tensors are {list(_FLOATS[1:])}")
        w = {name: getattr(self, name).detach() for name in _FLOATS}
        for name, t in replaced.items():
            if tuple(t.shape) != tuple(w[name].shape):
                raise ValueError(f"{name} must have shape {tuple(w[name].shape)}, got {tuple(t.shape)}")
        w.update(replaced)
        return self._forward(features, tokens, w, False)

    def _forward(self, features, tokens, w, bf16_inputs):
        if bf16_inputs:
            def linear(a, m, b=None):
                return F.linear(a.to(torch.float32).to(torch.bfloat16).to(a.dtype), m, b)
        else:
            linear = F.linear
        x = torch.cat([features.to(w["w_in"].dtype), w["embed"][tokens.long()]], dim=-1)
        z = linear(x, w["w_in"], w["b_in"])
        n = rms_norm(z, w["norm1"], self.eps)
        h = z + linear(F.silu(linear(n, w["w_gate"])) * linear(n, w["w_up"]), w["w_down"])
        f_hat = rms_norm(h, w["norm2"], self.eps)
        return f_hat, linear(f_hat, w["w_out"])

    def export(self) -> Dict[str, np.ndarray]:
        """The pushable weights (every name of ``PUSHED``) as contiguous numpy
        copies: float32, torch layout ``[out, in]``, and int32 ``draft_ids``.
        The dict that ``atlas._native.DraftHead.push`` takes."""
        with torch.no_grad():
            out = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous().numpy().copy()
                   for name in PUSHED if name != "draft_ids"}
        out["draft_ids"] = self.draft_ids.cpu().numpy().astype(np.int32)
        return out

    def load_snapshot(self, snapshot) -> None:
        """Loads the weights a native ``DraftHeadSnapshot`` serves (its
        matrices as the native head stores them, rounded to bfloat16), as
        :meth:`load_export` loads."""
        weights = {name: snapshot.tensor(name) for name in PUSHED if name != "draft_ids"}
        weights["draft_ids"] = snapshot.draft_ids
        self.load_export(weights)

    def load_export(self, weights: Dict[str, np.ndarray]) -> None:
        """Loads what :meth:`export` wrote (same hidden, intermediate and draft
        vocabulary size; the draft vocabulary itself may differ)."""
        missing = [n for n in PUSHED if n not in weights]
        if missing:
            raise ValueError(f"weights is missing {missing}")
        ids = np.asarray(weights["draft_ids"])
        if ids.shape != (self.draft_vocab,) or ids.min() < 0 or ids.max() >= self.vocab \
                or len(np.unique(ids)) != ids.size:
            raise ValueError(f"draft_ids must be {self.draft_vocab} distinct token ids in [0, {self.vocab})")
        with torch.no_grad():
            for name in PUSHED[:-1]:
                p = getattr(self, name)
                w = torch.as_tensor(np.asarray(weights[name]), dtype=torch.float32)
                if w.shape != p.shape:
                    raise ValueError(f"{name} must have shape {tuple(p.shape)}, got {tuple(w.shape)}")
                p.copy_(w)
            self.draft_ids.copy_(torch.from_numpy(ids.astype(np.int64)))
            self.full_to_draft.fill_(-1)
            self.full_to_draft[self.draft_ids] = torch.arange(self.draft_vocab)

    def loss(self, features: torch.Tensor, tokens: torch.Tensor, target_features: torch.Tensor,
             target_topk_logits: torch.Tensor, target_topk_ids: torch.Tensor,
             feature_weight: float = 1.0) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Runs the head and returns :func:`distillation_loss` of its outputs."""
        f_hat, logits = self(features, tokens)
        return distillation_loss(logits, f_hat, target_features, target_topk_logits, target_topk_ids,
                                 self.full_to_draft, feature_weight)


def distillation_loss(logits: torch.Tensor, f_hat: torch.Tensor, target_features: torch.Tensor,
                      target_topk_logits: torch.Tensor, target_topk_ids: torch.Tensor,
                      full_to_draft: torch.Tensor, feature_weight: float = 1.0
                      ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The head's training loss for N tapped nodes:
    ``cross_entropy + feature_weight * feature_regression``.

    * ``logits [N, Vd]``, ``f_hat [N, H]``: the head's outputs for the nodes.
    * ``target_features [N, H]``: the target's final-norm hidden state at each
      node's position (what ``f_hat`` predicts).
    * ``target_topk_logits, target_topk_ids [N, k]``: the target's k largest
      logits at each node and their token ids (the tap keeps the top k rather
      than whole vocabulary rows to keep its memory small); log-probabilities
      do as well, since a row's constant offset cancels. -inf entries (tokens
      the target rules out) get no weight.
    * ``full_to_draft [vocab]``: draft column of each token id, -1 outside.

    Cross-entropy: the target distribution is the softmax of its top-k logits
    restricted to the draft vocabulary (renormalised over the top-k tokens the
    head can score), and the loss is ``-sum_j p_j log q_j`` with ``q`` the head's
    softmax over the draft vocabulary: the KL divergence from p to q up to p's
    entropy, which does not depend on the head. Rows with none of their
    finite top-k in the draft vocabulary are left out of this term. Feature
    regression: the mean squared error of ``f_hat`` against the target
    feature, divided by the target features' mean square, so that the term
    is 1 for a head that predicts zeros whatever the scale of the target's
    hidden states (it keeps
    deeper drafts, which read ``f_hat``, on the target's manifold).
    Returns ``(loss, {"ce", "feature", "rows"})``.
    """
    cols = full_to_draft[target_topk_ids.long()]              # [N, k], -1 outside
    inside = (cols >= 0) & torch.isfinite(target_topk_logits)
    rows = inside.any(-1)                                     # [N]
    # A row left out weighs 0 rather than being selected out: selecting rows
    # copied the logits and scattered their gradient back, about 1 ms of a
    # 20 ms step of 128 rows. (Its targets become finite placeholders so that
    # its zero weight stays zero.)
    masked = target_topk_logits.float().masked_fill(~inside, float("-inf")).masked_fill(~rows[:, None], 0.0)
    p = torch.softmax(masked, dim=-1)                         # [N, k]
    logq = torch.log_softmax(logits.float(), dim=-1)          # [N, Vd]
    logq_k = torch.gather(logq, 1, cols.clamp(min=0))         # [N, k]
    ce_rows = -(p * logq_k.masked_fill(~inside, 0.0)).sum(-1)  # 0 for a row left out
    n_rows = int(rows.sum())
    ce = ce_rows.sum() / n_rows if n_rows else logits.sum() * 0.0
    scale = target_features.float().pow(2).mean().clamp(min=1e-12)
    feat = (f_hat.float() - target_features.float()).pow(2).mean() / scale
    loss = ce + feature_weight * feat
    return loss, {"ce": float(ce.detach()), "feature": float(feat.detach()), "rows": n_rows}
