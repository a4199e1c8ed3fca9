"""The static speculator: a draft head distilled offline (``atlas distill``).

:func:`distill` runs the target teacher-forced, in plain forwards with no
speculation, over two kinds of local text:

* **sources**: ``tokens`` tokens of a text corpus, by default the Python
  standard library's own ``.py`` files (present wherever Python is, so nothing
  is fetched), cut into windows of ``seq_len`` tokens;
* **completions**: the target's own greedy completions of ``prompts``
  code-completion requests made from the same files (a public function's
  signature and docstring, the way HumanEval poses a problem; see
  :func:`function_prompts`), ``gen_tokens`` each, generated in batches by a
  plain-decoding :class:`atlas.Engine`, each request with its completion one
  window.

Why completions: the head drafts what the target *writes*, and what a chat
model writes after a function stub (code, usage examples, prose explaining
it) is not what library sources look like. Measured on SmolLM2-135M (depth-1
greedy acceptance on the outputs of the last 24 HumanEval prompts, a domain
neither kind of data comes from): 65,280 examples of stdlib sources, 1,600
steps: 0.22; 21,856 examples of 128 completions, 1,200 steps: 0.32. This is
self-distillation, as EAGLE-style heads are trained on the target's own
generations.

Every position t >= 1 of a window gives one example, as the tap would record
it (:mod:`atlas.learning.tap`): parent feature ``h[t-1]``, token ``x[t]``, the
target's top-k next-token logits at t, feature ``h[t]``, linked to the
example of t - 1. The draft vocabulary is the ``draft_vocab`` most frequent
tokens of all windows. A :class:`~atlas.learning.trainer.Trainer` fits a
fresh :class:`DraftHead` on all but the last ``held_out_fraction`` of the
examples (windows are added in a seeded random order, so both kinds are held
out; training samples uniformly), and the metric on that last part (expected
greedy acceptance at depth 1, see :mod:`atlas.learning.trainer`) is reported
before and after. What is saved, as ``static.npz`` in the model's checkpoint
folder (:mod:`atlas.learning.checkpoint`), is the trainer's moving average
of the head's weights (see :mod:`atlas.learning.trainer`).

:func:`load_static` returns a :class:`LearnedSpeculator` with those weights.
When there are none it raises :class:`FileNotFoundError` saying how to make
them, unless ``distill_if_missing=True``: distilling takes minutes, which a
caller should choose to spend, not discover.
"""
from __future__ import annotations

import ast
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .checkpoint import STATIC, Checkpoint, head_config, load_checkpoint, model_dir, save_checkpoint
from .head import DEFAULT_DRAFT_VOCAB, DraftHead, choose_draft_vocab
from .replay import ReplayBuffer
from .tap import Examples, topk_logits
from .trainer import Trainer, head_metric


def stdlib_sources(seed: int = 0) -> List[Path]:
    """The standard library's ``.py`` files (``site-packages`` excluded), in a
    seeded shuffled order so that a short corpus still mixes modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order]


def corpus_tokens(encode: Callable[[str], Sequence[int]], n_tokens: int, files: Sequence[os.PathLike],
                  vocab: int) -> np.ndarray:
    """The first ``n_tokens`` tokens of the files' texts, one after another
    (files that cannot be read as UTF-8 are skipped)."""
    out, have = [], 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        ids = np.asarray(list(encode(text)), np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"encode returned token ids outside the target's vocabulary [0, {vocab})")
        out.append(ids[: n_tokens - have])
        have += len(out[-1])
        if have >= n_tokens:
            break
    if have < n_tokens:
        raise ValueError(f"the corpus holds only {have} tokens, {n_tokens} were asked for")
    return np.concatenate(out)


def function_prompts(files: Sequence[os.PathLike], n: int) -> List[str]:
    """Up to ``n`` code-completion requests made from Python sources: the first
    public function of each file whose docstring has 60 to 800 characters,
    written as its ``def`` line and docstring, the way HumanEval poses a
    problem (one per file, so that n requests span n modules). Files that do
    not parse are skipped; nothing is imported or run."""
    out: List[str] = []
    for f in files:
        if len(out) >= n:
            break
        try:
            tree = ast.parse(Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or not 60 <= len(doc) <= 800:
                continue
            body = "\n".join("    " + line if line else "" for line in doc.splitlines()).lstrip()
            kw = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
            out.append(f'{kw} {node.name}({ast.unparse(node.args)}):\n    """{body}\n    """\n')
            break
    return out


def completions(target, prompt_ids: Sequence[Sequence[int]], new_tokens: int, batch: int) -> List[np.ndarray]:
    """Each prompt followed by the target's greedy completion of
    ``new_tokens`` tokens (fewer at an end-of-sequence token), generated
    ``batch`` requests at a time with plain decoding."""
    from ..engine import Engine

    engine = Engine(target, speculators=None, max_batch=batch)
    outs = engine.generate([list(p) for p in prompt_ids], max_new_tokens=new_tokens)
    return [np.asarray(list(p) + o.token_ids, np.int64) for p, o in zip(prompt_ids, outs)]


def window_examples(tokens: np.ndarray, hidden: torch.Tensor, logits: torch.Tensor, k: int) -> Examples:
    """The examples of one teacher-forced window: tokens ``[L]``, final-norm
    hidden ``[L, H]``, logits ``[L, vocab]``."""
    L = len(tokens)
    ids, top = topk_logits(logits[1:], k)
    h = hidden.detach().to("cpu", torch.float32).numpy()
    back = np.ones(L - 1, np.int64)
    back[0] = 0
    return Examples(h[:-1].copy(), tokens[1:].astype(np.int32), ids, top, h[1:].copy(), back)


def teacher_forced(target, cache, tokens: np.ndarray):
    """One plain forward of ``tokens`` (a fresh sequence in ``cache``, released
    after): (logits ``[L, vocab]``, final-norm hidden ``[L, H]``)."""
    L = len(tokens)
    seq = cache.create()
    try:
        slots = cache.reserve(seq, L)
        return target.forward(cache, np.array([seq], np.int32), torch.from_numpy(np.asarray(tokens, np.int64)),
                              torch.arange(L), np.arange(-1, L - 1, dtype=np.int32), np.array([0, L], np.int64),
                              torch.from_numpy(slots))
    finally:
        cache.release(seq)


@dataclass
class DistillResult:
    head: DraftHead
    path: Optional[Path]          # where it was saved (None when save=False)
    metric: float                 # held-out metric after training
    untrained_metric: float       # the same, for the fresh head
    examples: int
    collect_seconds: float
    train_seconds: float


def distill(target=None, *, model: Optional[str] = None, tokens: int = 16384, prompts: int = 256,
            gen_tokens: int = 128, gen_batch: int = 16, steps: int = 2000, out=None,
            draft_vocab: int = DEFAULT_DRAFT_VOCAB, intermediate: Optional[int] = None, seq_len: int = 256,
            batch_size: int = 256, lr: float = 2e-3, topk: int = 16, held_out_fraction: float = 0.05, seed: int = 0,
            encode: Optional[Callable[[str], Sequence[int]]] = None,
            files: Optional[Sequence[os.PathLike]] = None, save: bool = True,
            progress: Optional[Callable[[str], None]] = None) -> DistillResult:
    """Distils a static draft head for ``target`` (an :func:`atlas.load`
    target; None loads ``model``, default :func:`atlas.default_model`).

    ``tokens`` of source text (``files``, default :func:`stdlib_sources`; 0:
    none) are run through the target in windows of ``seq_len``, and so are
    ``prompts`` requests made from the same files with the target's own
    completions of ``gen_tokens`` tokens (0: none; generated ``gen_batch`` at a
    time); ``steps`` Adam steps of ``batch_size`` examples train the head;
    ``out`` is the checkpoint root (default ``$ATLAS_CACHE_DIR`` or
    ``~/.cache/atlas``). ``encode`` turns text into token ids (default: the
    target's tokenizer). ``progress`` receives one-line reports. With the
    defaults on SmolLM2-135M and 2 CPU cores (measured): about 2.5 minutes generating, 2
    running the windows through the target and 2 training.
    """
    say = progress or (lambda msg: None)
    from_stdlib = files is None
    if target is None:
        from ..models import default_model, load
        target = load(model or default_model())
    for name, v in (("steps", steps), ("draft_vocab", draft_vocab), ("seq_len", seq_len),
                    ("batch_size", batch_size), ("topk", topk), ("gen_tokens", gen_tokens),
                    ("gen_batch", gen_batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name, v in (("tokens", tokens), ("prompts", prompts)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if tokens == 0 and prompts == 0:
        raise ValueError("nothing to distil from: tokens and prompts are both 0")
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    cfg = target.config
    seq_len = min(seq_len, cfg.max_position_embeddings)
    if encode is None:
        if target.tokenizer is None:
            raise ValueError("this target has no tokenizer: pass encode= (text -> token ids)")
        encode = target.tokenizer.encode

    t0 = time.perf_counter()
    files = files if files is not None else stdlib_sources(seed)
    windows: List[np.ndarray] = []
    if tokens:
        corpus = corpus_tokens(encode, tokens, files, cfg.vocab_size)
        windows += [corpus[i * seq_len:(i + 1) * seq_len] for i in range(max(1, len(corpus) // seq_len))]
        say(f"distill: {len(corpus)} tokens of source text in {len(windows)} windows of {seq_len}")
    if prompts:
        room = cfg.max_position_embeddings - gen_tokens
        asked = []
        for text in function_prompts(files, prompts):
            ids = list(encode(text))
            if ids and not 0 <= min(ids) <= max(ids) < cfg.vocab_size:
                raise ValueError(f"encode returned token ids outside the target's vocabulary [0, {cfg.vocab_size})")
            if 1 <= len(ids) <= room:
                asked.append(ids)
        if not asked:
            raise ValueError("no function with a docstring in the corpus files fits the target's context: "
                             "pass prompts=0 to distil from source text alone")
        say(f"distill: generating {gen_tokens} tokens for each of {len(asked)} function prompts "
            f"({gen_batch} at a time)")
        done = completions(target, asked, gen_tokens, gen_batch)
        say(f"distill: {sum(len(d) - len(a) for d, a in zip(done, asked))} tokens generated "
            f"({time.perf_counter() - t0:.0f} s)")
        windows += done
    windows = [w for w in windows if len(w) >= 2]
    windows = [windows[i] for i in np.random.default_rng(seed).permutation(len(windows))]
    total = sum(len(w) - 1 for w in windows)
    held = max(1, int(total * held_out_fraction))
    buffer = ReplayBuffer(cfg.hidden_size, topk, capacity=total, max_bytes=None, held_out=held,
                          held_out_fraction=0.99, half_life=math.inf)
    say(f"distill: {len(windows)} windows, {total} examples, {held} held out")
    block = 16
    longest = max(len(w) for w in windows)
    cache = target.new_cache(-(-longest // block) + 1, block_size=block, max_seqs=1)
    for i, w in enumerate(windows):
        logits, hidden = teacher_forced(target, cache, w)
        buffer.add(window_examples(w, hidden, logits, topk))
        if (i + 1) % max(1, len(windows) // 10) == 0 or i + 1 == len(windows):
            say(f"distill: forward {i + 1}/{len(windows)} ({time.perf_counter() - t0:.0f} s)")
    collect_seconds = time.perf_counter() - t0

    counts = np.bincount(np.concatenate(windows), minlength=cfg.vocab_size)
    ids = choose_draft_vocab(counts, min(draft_vocab, cfg.vocab_size))
    head = DraftHead.from_target(target, ids, intermediate=intermediate, seed=seed)
    trainer = Trainer(head, buffer, None, lr=lr, batch_size=batch_size, steps_per_round=steps, threads=0,
                      nice=0, max_share=1.0, min_train=1, min_held_out=1, seed=seed)
    held_batch = buffer.held_out_batch()
    untrained = head_metric(head, held_batch)
    say(f"distill: draft vocabulary {len(ids)} tokens; untrained head held-out metric {untrained:.4f}")
    t1 = time.perf_counter()
    every = max(1, steps // 10)
    done = 0
    while done < steps:
        done += trainer.train_steps(min(every, steps - done))
        say(f"distill: step {done}/{steps} loss {trainer.last_loss:.4f} ({time.perf_counter() - t1:.0f} s)")
    train_seconds = time.perf_counter() - t1
    head = trainer.average   # what a trainer evaluates and pushes: its weights' moving average
    metric = head_metric(head, held_batch)
    say(f"distill: held-out metric (expected greedy acceptance at depth 1) {untrained:.4f} -> {metric:.4f}")

    path = None
    if save:
        path = model_dir(target, out) / STATIC
        notes = dict(corpus="python stdlib" if from_stdlib else "files", tokens=int(tokens),
                     prompts=int(prompts), gen_tokens=int(gen_tokens), examples=int(total), steps=int(steps),
                     untrained_metric=untrained, collect_seconds=collect_seconds, train_seconds=train_seconds,
                     time=time.time())
        save_checkpoint(path, Checkpoint(head.export(), head_config(head),
                                         [dict(version="static", metric=metric)], metric, notes))
        say(f"distill: saved {path}")
    return DistillResult(head, path, metric, untrained, total, collect_seconds, train_seconds)


def static_head(target, cache_dir=None) -> Optional[DraftHead]:
    """The static head saved for ``target`` under ``cache_dir`` (see
    :mod:`atlas.learning.checkpoint`), or None when there is none usable (an
    unusable file is reported with a warning)."""
    path = model_dir(target, cache_dir) / STATIC
    ck = load_checkpoint(path, dict(hidden=target.config.hidden_size, vocab=target.config.vocab_size))
    if ck is None:
        return None
    head = DraftHead.from_target(target, ck.weights["draft_ids"], intermediate=int(ck.config["intermediate"]))
    head.load_export(ck.weights)
    return head


def load_static(target, *, distill_if_missing: bool = False, cache_dir=None, **speculator_kwargs):
    """A :class:`LearnedSpeculator` serving the static head of ``target``.
    With no static head saved: raises :class:`FileNotFoundError`, or with
    ``distill_if_missing=True`` runs :func:`distill` with its defaults first.
    ``speculator_kwargs`` go to the speculator (``max_depth``, ``topk``, ...)."""
    from ..speculators import LearnedSpeculator

    head = static_head(target, cache_dir)
    if head is None:
        where = model_dir(target, cache_dir) / STATIC
        if not distill_if_missing:
            raise FileNotFoundError(f"no static draft head for this model at {where}: run `atlas distill` "
                                    "(or load_static(target, distill_if_missing=True))")
        distill(target, out=cache_dir)
        head = static_head(target, cache_dir)
        if head is None:
            raise RuntimeError(f"distill wrote no usable static head at {where}")
    return LearnedSpeculator(head, **speculator_kwargs)
