"""The CUDA kernels of atlas: tree verification, KV row copies and tree
attention, on torch tensors that live on a CUDA device.

They exist only in builds with CUDA (``atlas.build_info()["cuda"]``);
:func:`available` says whether they can run here (built with CUDA and a device
present). Each function runs on the current torch stream of the tensors'
device and allocates its outputs with torch. With ``check=True`` (the default)
it waits for the kernel and raises ``ValueError`` when the device found bad
input (a bad parent or token id in a device array, NaN in a logit row the walk
reads, a block id out of range); with ``check=False`` it returns at once and
the returned status tensor holds one code per sequence (0 = ok; the message of
a code is ``device_error_message(code)``).

The semantics are those of the CPU functions (``atlas.verify``,
``KVCache``, ``atlas._native.tree_attention``); the few choices the CPU
headers leave open are written down in ``cpp/include/atlas/cuda_ops.h``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _native
from .verify import VerifyResult

_BUILT = bool(_native.build_info()["cuda"])


def available() -> bool:
    """True when atlas was built with CUDA and a CUDA device is visible."""
    return _BUILT and _native.cuda_device_count() > 0 and torch.cuda.is_available()


def _require() -> None:
    if not _BUILT:
        raise RuntimeError("atlas was built without CUDA (atlas.build_info()['cuda'] is False)")


def device_error_message(code: int) -> str:
    """The message of a status code written by a kernel."""
    _require()
    return _native.device_error_message(int(code))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(x, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
    """x as a contiguous tensor of `dtype` on `device` (a copy only when needed)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point != dtype.is_floating_point:
            raise ValueError(f"{name} must hold {'floats' if dtype.is_floating_point else 'integers'}, "
                             f"got {x.dtype}")
        return x.to(device=device, dtype=dtype).contiguous()
    arr = np.asarray(x)
    if not dtype.is_floating_point and arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return torch.as_tensor(arr).to(device=device, dtype=dtype).contiguous()


def _host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ---- verification ---------------------------------------------------------------------------


class VerifyOutput(NamedTuple):
    """What :func:`verify` writes, on the device."""

    accepted: torch.Tensor      # [batch, max_accept] int32 tree-local node indices, path order; -1 padded
    emitted: torch.Tensor       # [batch, max_accept + 1] int32 token ids; -1 padded
    num_accepted: torch.Tensor  # [batch] int32
    status: torch.Tensor        # [batch] int32 device error codes, 0 = ok

    def to_result(self) -> VerifyResult:
        """The CPU verifier's result type (copies to the host and waits)."""
        acc, emi, num = (t.cpu().numpy() for t in (self.accepted, self.emitted, self.num_accepted))
        return VerifyResult([acc[b, : num[b]].copy() for b in range(len(num))],
                            [emi[b, : num[b] + 1].copy() for b in range(len(num))])


def _per_seq(value, name: str, batch: int, dtype) -> np.ndarray:
    """A number or a per-sequence array as a [batch] array of `dtype`; integer
    types are range-checked exactly (seeds and offsets span all of uint64)."""
    arr = np.asarray(_host(value), dtype=object)
    if arr.ndim == 0:
        arr = np.full(batch, arr.item(), dtype=object)
    if arr.ndim != 1 or arr.shape[0] != batch:
        raise ValueError(f"{name} must be a number or a 1-D array of length batch = {batch}")
    dt = np.dtype(dtype)
    if dt.kind == "f":
        try:
            return np.array([float(v) for v in arr], dt)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must hold numbers") from e
    info = np.iinfo(dt)
    out = []
    for v in arr:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, float, np.floating)) or (
                isinstance(v, (float, np.floating)) and not float(v).is_integer()):
            raise ValueError(f"{name} must hold integers, got {v!r}")
        if not info.min <= int(v) <= info.max:
            raise ValueError(f"{name} must be in [{info.min}, {info.max}], got {int(v)}")
        out.append(int(v))
    return np.array(out, dt)


def sampling_params(batch: int, temperature=0.0, top_k=0, top_p=1.0, seed=0, offset=0,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """The ``[batch, itemsize]`` uint8 rows of ``SamplingParams`` that
    :func:`verify` uploads; each argument is a number or a per-sequence array."""
    _require()
    layout = _native.sampling_params_layout()
    names = ["temperature", "top_k", "top_p", "seed", "offset"]
    dt = np.dtype({"names": names, "formats": ["<f4", "<i4", "<f4", "<u8", "<u8"],
                   "offsets": [layout[n] for n in names], "itemsize": layout["itemsize"]})
    temp = _per_seq(temperature, "temperature", batch, np.float64)
    k = _per_seq(top_k, "top_k", batch, np.int64)
    p = _per_seq(top_p, "top_p", batch, np.float64)
    if not (np.isfinite(temp).all() and (temp >= 0).all()):
        raise ValueError("temperature must be finite and >= 0")
    if ((k < 0) | (k > np.iinfo(np.int32).max)).any():
        raise ValueError("top_k must be in [0, 2^31)")
    if not ((p > 0) & (p <= 1)).all():
        raise ValueError("top_p must be in (0, 1]")
    rec = np.zeros(batch, dt)
    rec["temperature"], rec["top_k"], rec["top_p"] = temp, k, p
    rec["seed"] = _per_seq(seed, "seed", batch, np.uint64)
    rec["offset"] = _per_seq(offset, "offset", batch, np.uint64)
    rows = torch.from_numpy(rec.view(np.uint8).reshape(batch, dt.itemsize).copy())
    return rows if device is None else rows.to(device)


def verify(logits: torch.Tensor, tokens, parents, tree_offsets=None, *, temperature=0.0, top_k=0,
           top_p=1.0, seed=0, offset=0, draft_probs: Optional[torch.Tensor] = None,
           max_accept: Optional[int] = None, greedy_prepass: Optional[bool] = None, check: bool = True,
           workspace: Optional[torch.Tensor] = None) -> VerifyOutput:
    """``atlas.verify`` on the GPU, one block per tree.

    ``logits`` (``[total_nodes, vocab]``, float32 or bfloat16, CUDA) is read in
    place, rows 16-byte aligned for vector loads. ``tokens``, ``parents``
    (``[total_nodes]``) and ``tree_offsets`` (``[batch + 1]``; omitted: one
    tree) may be host or device arrays. ``offset`` is the position of each
    tree's root and ``draft_probs`` (``[total_nodes, vocab]`` float32, CUDA,
    optional) the rows the children were drawn from without replacement, as
    for the CPU verifier. ``max_accept`` (the width of
    ``accepted``) defaults to the largest tree's size, which reads
    ``tree_offsets`` on the host. ``greedy_prepass`` (see ``cuda_ops.h``)
    defaults to on for all-greedy batches too small to fill the GPU.
    """
    _require()
    if not isinstance(logits, torch.Tensor) or logits.device.type != "cuda":
        raise ValueError("logits must be a CUDA tensor")
    device = logits.device
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [total_nodes, vocab], got shape {tuple(logits.shape)}")
    total, vocab = int(logits.shape[0]), int(logits.shape[1])
    tok = _on(tokens, torch.int32, device, "tokens")
    par = _on(parents, torch.int32, device, "parents")
    if tree_offsets is None:
        offsets_host: Optional[np.ndarray] = np.array([0, total], np.int64)
        offsets = torch.from_numpy(offsets_host).to(device)
    elif isinstance(tree_offsets, torch.Tensor) and tree_offsets.device.type == "cuda":
        offsets_host = None
        offsets = _on(tree_offsets, torch.int64, device, "tree_offsets")
    else:
        offsets_host = _host(tree_offsets).astype(np.int64)
        offsets = torch.from_numpy(np.ascontiguousarray(offsets_host)).to(device)
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError("tree_offsets must be 1-D with batch + 1 >= 2 entries")
    batch = int(offsets.shape[0]) - 1
    if max_accept is None:
        if offsets_host is None:
            offsets_host = offsets.cpu().numpy()
        max_accept = max(int(np.diff(offsets_host).max()), 1)
    params = sampling_params(batch, temperature, top_k, top_p, seed, offset, device)
    if greedy_prepass is None:
        # Untuned guess (bench/bench_cuda.py measures both): when the trees are
        # too few to occupy the GPU with one block each, reading every row with
        # all multiprocessors beats walking the visited rows with a few.
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        all_greedy = bool((_per_seq(temperature, "temperature", batch, np.float64) == 0).all())
        greedy_prepass = all_greedy and batch < sms // 2 and total <= 2 * sms
    draft = None
    if draft_probs is not None:
        if not isinstance(draft_probs, torch.Tensor) or draft_probs.device != device:
            raise ValueError(f"draft_probs must be a tensor on {device}")
        draft = draft_probs
    need = _native.verify_cuda_workspace_bytes(vocab, batch, max(total, 1))
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, dtype=torch.uint8, device=device)
    out = VerifyOutput(torch.empty((batch, max_accept), dtype=torch.int32, device=device),
                       torch.empty((batch, max_accept + 1), dtype=torch.int32, device=device),
                       torch.empty(batch, dtype=torch.int32, device=device),
                       torch.empty(batch, dtype=torch.int32, device=device))
    _native.verify_cuda(logits, tok, par, offsets, params, draft, out.accepted, out.emitted,
                        out.num_accepted, out.status, workspace, _stream(device), bool(greedy_prepass),
                        bool(check))
    return out


class Verifier:
    """The engine's verifier on a CUDA device: the call of
    :class:`atlas.Verifier` (logits on the device, tree arrays and sampling
    parameters on the host), with a reused workspace; the result comes back to
    the host, which is the step's one wait for the device."""

    def __init__(self, vocab: int, device):
        _require()
        self.vocab = int(vocab)
        self.device = torch.device(device)
        self._workspace: Optional[torch.Tensor] = None

    def __call__(self, logits: torch.Tensor, tokens, parents, tree_offsets, *, temperature=0.0, top_k=0,
                 top_p=1.0, seed=0, offset=0) -> VerifyResult:
        offsets = np.asarray(tree_offsets, np.int64)
        batch, total = len(offsets) - 1, int(offsets[-1])
        need = _native.verify_cuda_workspace_bytes(self.vocab, batch, max(total, 1))
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.uint8, device=self.device)
        out = verify(logits, tokens, parents, offsets, temperature=temperature, top_k=top_k, top_p=top_p,
                     seed=seed, offset=offset, workspace=self._workspace)
        return out.to_result()


def philox_uniform(seed: int, position: int, streams, js, device="cuda") -> torch.Tensor:
    """The verifier's uniforms for (stream, j) pairs at one position, computed on
    the device: ``[n]`` float64 with 53 random bits each (see verify.h)."""
    _require()
    device = torch.device(device)
    st = _on(streams, torch.int64, device, "streams")
    j = _on(js, torch.int64, device, "js")
    for name, t in (("streams", st), ("js", j)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 0xFFFFFFFF):
            raise ValueError(f"{name} must be in [0, 2^32)")
    # uint32 values cross as their int32 bit patterns.
    st32 = (st - (st >= 2**31).to(torch.int64) * 2**32).to(torch.int32).contiguous()
    j32 = (j - (j >= 2**31).to(torch.int64) * 2**32).to(torch.int32).contiguous()
    out = torch.empty(st32.shape[0], dtype=torch.float64, device=device)
    _native.philox_uniform_cuda(int(seed), int(position), st32, j32, out, _stream(device))
    return out


# ---- KV cache ---------------------------------------------------------------------------------


def kv_copy_slots(cache, copies: torch.Tensor, check: bool = True) -> None:
    """Applies ``copies`` (``[n, 2]`` int64 (src_slot, dst_slot) on the
    cache's device), in order, to every layer's keys and values."""
    _require()
    device = cache.storage.device
    status = torch.empty(1, dtype=torch.int32, device=device)
    _native.kv_copy_slots_cuda(cache, _on(copies, torch.int64, device, "copies"), status, _stream(device),
                               bool(check))


def apply_pending_copies(cache, check: bool = True) -> int:
    """Moves the rows a device-storage cache left pending (commits and copy
    on write) and clears the list; returns how many copies there were. Call it
    after commit/reserve and before the next forward."""
    pending = cache.pending_copies()  # [n, 2] int64, host
    if len(pending):
        kv_copy_slots(cache, torch.from_numpy(pending).to(cache.storage.device), check)
    cache.clear_pending_copies()
    return int(len(pending))


# ---- tree attention ---------------------------------------------------------------------------


def paged_inputs(cache, seq_ids: Sequence[int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(block_tables [batch, max_blocks] int32, context_lens [batch] int32)``
    of the given sequences, from the cache's host metadata, on its device;
    table entries past a sequence's last block are -1 (never read)."""
    device = cache.storage.device if device is None else torch.device(device)
    tables = [np.asarray(cache.block_table(int(s)), np.int32) for s in seq_ids]
    width = max(1, max((len(t) for t in tables), default=1))
    out = np.full((len(tables), width), -1, np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    lens = np.array([cache.length(int(s)) for s in seq_ids], np.int32)
    return torch.from_numpy(out).to(device), torch.from_numpy(lens).to(device)


def tree_attention(cache, layer: int, q: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, q_offsets, parents, *, scale: Optional[float] = None,
                   out: Optional[torch.Tensor] = None, max_context: Optional[int] = None,
                   max_q_per_seq: Optional[int] = None, check: bool = True) -> torch.Tensor:
    """Tree attention of ``q`` (``[total_q, num_q_heads, head_dim]``, the
    cache's dtype and device) over the cache's storage, as
    ``atlas._native.tree_attention`` but through device block tables
    (``[batch, max_blocks]`` int32) and committed lengths (``[batch]`` int32);
    ``q_offsets`` ``[batch + 1]`` and tree-local ``parents`` ``[total_q]``.
    The keys and values of the queries must already be in the cache at
    positions ``context_lens[b] + i``. ``max_context`` and ``max_q_per_seq``
    (bounds that size the grid) are read from the inputs when omitted, which
    waits for the device. Returns ``out`` (``[total_q, num_q_heads, head_dim]``).
    """
    _require()
    device = cache.storage.device
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [total_q, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    tables = _on(block_tables, torch.int32, device, "block_tables")
    lens = _on(context_lens, torch.int32, device, "context_lens")
    qoff = _on(q_offsets, torch.int64, device, "q_offsets")
    par = _on(parents, torch.int32, device, "parents")
    if tables.dim() != 2:
        raise ValueError("block_tables must be 2-D [batch, max_blocks]")
    batch = int(tables.shape[0])
    if max_context is None:
        max_context = int(lens.max().item()) if lens.numel() else 0
    if max_q_per_seq is None:
        max_q_per_seq = int((qoff[1:] - qoff[:-1]).max().item()) if qoff.numel() > 1 else 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        out = torch.empty(tuple(q.shape), dtype=q.dtype, device=device)
    need = _native.tree_attention_cuda_workspace_bytes(cache, int(q.shape[1]), batch, int(max_context),
                                                       int(max(max_q_per_seq, 0)))
    workspace = torch.empty(need, dtype=torch.uint8, device=device)
    status = torch.empty(batch, dtype=torch.int32, device=device)
    _native.tree_attention_cuda(cache, layer, q, out, tables, lens, qoff, par, float(scale), int(max_context),
                                int(max(max_q_per_seq, 0)), status, workspace, _stream(device), bool(check))
    return out


__all__ = [
    "VerifyOutput",
    "Verifier",
    "apply_pending_copies",
    "available",
    "device_error_message",
    "kv_copy_slots",
    "paged_inputs",
    "philox_uniform",
    "sampling_params",
    "tree_attention",
    "verify",
]
