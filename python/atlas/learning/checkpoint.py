"""Draft-head checkpoints on disk.

Where: one folder per model, ``<root>/<model key>/``, with ``root`` =
``$ATLAS_CACHE_DIR`` or ``~/.cache/atlas``. The model key hashes the target's
configuration and a sample of its weights (embedding, LM head and final
norm rows), so the same model loaded from any path, a GGUF file or a
transformers object, finds its checkpoints, and two models with one
architecture (a base model and its fine-tune) do not share them. Files:

* ``static.npz``: the head that :func:`atlas.learning.distill` trained
  offline (the static speculator);
* ``adaptive.npz``: the last weights the learning loop pushed.

What: a ``.npz`` (zip) holding every pushed tensor (the names of
:data:`atlas.learning.head.PUSHED`, float32 and int32 ``draft_ids``) and a
``meta`` entry (JSON as bytes): format version, head configuration, version
history, metric, a SHA-256 of the tensors, and free-form notes.

How: written to a temporary file in the same folder, flushed and fsynced,
then renamed over the old one (and the folder fsynced), so a crash at any
point leaves either the old file or the new one, never a torn one. A file
that is cut short, corrupt (zip CRC or our checksum), or of other shapes is
reported with a warning that names it and is ignored.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch

from .head import PUSHED

FORMAT = 1
STATIC = "static.npz"
ADAPTIVE = "adaptive.npz"


def cache_root() -> Path:
    """``$ATLAS_CACHE_DIR``, or ``~/.cache/atlas``."""
    env = os.environ.get("ATLAS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "atlas"


def model_key(target) -> str:
    """16 hex digits identifying a target (see the module docstring)."""
    c = target.config
    h = hashlib.sha256()
    cfg = {k: getattr(c, k) for k in ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                                       "num_layers", "num_heads", "num_kv_heads", "head_dim", "rms_norm_eps",
                                       "rope_theta", "max_position_embeddings", "tie_word_embeddings")}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    m = target.model
    # 64 evenly spaced rows of the embedding and of the LM head, and the final
    # norm: a few hundred KB at most, and any retraining changes them.
    rows = torch.linspace(0, c.vocab_size - 1, min(64, c.vocab_size)).long()
    rows = rows.to(m.embed.device)
    for t in (m.embed[rows], m.lm_head[rows], m.norm):
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_dir(target, root: Union[str, os.PathLike, None] = None) -> Path:
    """The target's checkpoint folder (not created here)."""
    return (Path(root).expanduser() if root is not None else cache_root()) / model_key(target)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes ``path`` through ``write(file)`` so that it is replaced whole or
    not at all: a temporary file beside it, fsync, rename, fsync of the folder.
    If ``write`` raises, the temporary file is removed and ``path`` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _digest(weights: Dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in PUSHED:
        a = np.ascontiguousarray(weights[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A head checkpoint: ``weights`` as :meth:`DraftHead.export` writes them,
    ``config`` (hidden, intermediate, draft_vocab, vocab, eps), ``history`` (a
    list of dicts with at least ``version`` and ``metric``), ``metric`` (the
    held-out metric of these weights, or None) and free-form ``notes``."""

    weights: Dict[str, np.ndarray]
    config: dict
    history: List[dict] = field(default_factory=list)
    metric: Optional[float] = None
    notes: dict = field(default_factory=dict)


def head_config(head) -> dict:
    """The configuration a checkpoint records, from a :class:`DraftHead`."""
    return dict(hidden=int(head.hidden), intermediate=int(head.intermediate),
                draft_vocab=int(head.draft_vocab), vocab=int(head.vocab), eps=float(head.eps))


def expected_shapes(config: dict) -> Dict[str, tuple]:
    H, I, Vd = config["hidden"], config["intermediate"], config["draft_vocab"]
    return dict(w_in=(H, 2 * H), b_in=(H,), norm1=(H,), w_gate=(I, H), w_up=(I, H), w_down=(H, I), norm2=(H,),
                w_out=(Vd, H), draft_ids=(Vd,))


def save_checkpoint(path: Union[str, os.PathLike], ckpt: Checkpoint) -> None:
    """Writes a checkpoint atomically (see :func:`atomic_write`)."""
    weights = {n: np.ascontiguousarray(ckpt.weights[n], np.int32 if n == "draft_ids" else np.float32)
               for n in PUSHED}
    meta = dict(format=FORMAT, config=ckpt.config, history=ckpt.history, metric=ckpt.metric, notes=ckpt.notes,
                sha256=_digest(weights))
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    atomic_write(path, lambda f: np.savez(f, meta=blob, **weights))


def load_checkpoint(path: Union[str, os.PathLike], expect: Optional[dict] = None) -> Optional[Checkpoint]:
    """Reads a checkpoint; None when the file does not exist. A file that
    cannot be used (cut short, corrupt, another format, shapes other than
    ``expect``'s, a config key of ``expect`` that differs) is reported with a
    warning naming it, and None is returned."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return _load(path, expect)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is reported and skipped
        warnings.warn(f"atlas: ignoring the draft-head checkpoint {path}: {e}", RuntimeWarning, stacklevel=2)
        return None


def _load(path: Path, expect: Optional[dict]) -> Checkpoint:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            missing = [n for n in ("meta",) + PUSHED if n not in names]
            if missing:
                raise ValueError(f"it lacks {', '.join(missing)}")
            meta = json.loads(bytes(z["meta"]).decode())
            weights = {n: z[n] for n in PUSHED}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"it is not a complete checkpoint (cut short or corrupt: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    config = meta.get("config")
    if not isinstance(config, dict) or not all(k in config for k in ("hidden", "intermediate", "draft_vocab",
                                                                      "vocab")):
        raise ValueError("its meta lacks the head configuration")
    if expect is not None:
        for k, v in expect.items():
            if k in config and k != "eps" and config[k] != v:
                raise ValueError(f"it was written for {k} = {config[k]}, this head has {k} = {v}")
    for name, shape in expected_shapes(config).items():
        a = weights[name]
        if tuple(a.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
        want = np.int32 if name == "draft_ids" else np.float32
        if a.dtype != want:
            raise ValueError(f"tensor {name} has dtype {a.dtype}, expected {np.dtype(want)}")
        if name != "draft_ids" and not np.all(np.isfinite(a)):
            raise ValueError(f"tensor {name} holds non-finite values")
    ids = weights["draft_ids"]
    if ids.min() < 0 or ids.max() >= config["vocab"] or len(np.unique(ids)) != ids.size:
        raise ValueError(f"draft_ids must be distinct token ids in [0, {config['vocab']})")
    if meta.get("sha256") != _digest(weights):
        raise ValueError("its checksum does not match its tensors (corrupt)")
    metric = meta.get("metric")
    return Checkpoint(weights, config, list(meta.get("history") or []),
                      float(metric) if metric is not None else None, dict(meta.get("notes") or {}))
