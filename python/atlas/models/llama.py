"""The Llama-family forward (Llama, Mistral, Qwen2, SmolLM2) over atlas's
paged KV cache, with tree attention.

Weights are kept in the layout the CPU wants for one-token decode: q, k and v
projections fused into one matrix (one matmul per layer instead of three), gate
and up fused likewise, every matrix contiguous ``[out, in]``. RoPE uses the
rotate-half convention of transformers (GGUF files are converted to it when
loaded) with cos/sin tables computed once.
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import _native
from ..kv_cache import KVCache
from .config import ModelConfig

# Rows of the cos/sin tables built up front; they grow (doubling) when a forward
# reaches a later position, so a model with a 128k context does not pay for
# tables it never reads.
_INITIAL_ROPE_ROWS = 4096
# CPU float32 matrices get two copies for small products (``pack_weight``):
# in atlas's panel layout (``_native.PackedLinear``, cpp/include/atlas/linear.h:
# the weight streamed once at the memory's bandwidth on the forward's threads),
# used for up to ``_PANEL_MAX_ROWS`` rows, which covers plain decoding and
# typical draft trees; and, when this torch build has oneDNN, in oneDNN's
# packed layout (``torch.ops.mkldnn``), used for larger products from
# ``_PACKED_MIN_ROWS`` rows. Otherwise one or two rows run as ``W @ x^T`` (MKL
# streams the weight faster as the left operand), up to ``_SMALL_ROWS`` rows
# (by torch threads) too, and larger products as ``F.linear``. Where a layer
# matrix has both copies, every product reads one of them, so ``pack`` drops
# its dense tensor (``unpack`` restores it from oneDNN's copy, exactly): the
# layer matrices take twice their float32 bytes instead of three times. The LM
# head keeps its dense tensor (the embedding, when tied; the draft heads read
# it). SmolLM2-135M after ``atlas.load``: 1,806 MB resident with the dense
# layer matrices kept, 1,401 without (measured after glibc's ``malloc_trim``,
# which returns the loader's freed buffers; before it 2,095 and 1,831 MB).
# Up to ``_PANEL_MAX_ROWS`` rows the forward also runs everything else on one
# torch thread (see :meth:`LlamaModel.forward`). SmolLM2-135M forward at 250
# tokens of context, 2 threads, median of 36 (panels) or 16, ms, measured with
# throwaway scripts on the 2-core development machine (Zen 4, so the panel
# kernel runs its AVX-512 form; the machine's speed drifts by 10-15%):
#   rows                  1    2    3    4    6    8   12   16   24   32
#   W @ x^T / x @ W^T    23   24   35   35   51   55   93   97
#   oneDNN, packed       23*  24*  28   27   29   34   40   47   61   75  (* W @ x^T)
#   panels               23   24   25   25   27   28   31   38   51   64
# (Since the panel kernel runs rows of several groups block by block, 13-20
# rows cost 5-7 ms less than this table's kernel; see cpp/src/linear.cpp.
# Since the layers run through LlamaModel._panel_layers, every size about 1-2
# ms less.)
_PANEL_MAX_ROWS = 32
_PACKED_MIN_ROWS = 3
_SMALL_ROWS = {1: 6}
_SMALL_ROWS_DEFAULT = 8


class PackedWeight:
    """The copies of one CPU float32 matrix that :func:`linear` reads: the
    panel copy (``panels``, a ``_native.PackedLinear``) and, when torch has
    oneDNN, oneDNN's packed copy (``onednn``); either may be None."""

    __slots__ = ("panels", "onednn")

    def __init__(self, panels, onednn):
        self.panels, self.onednn = panels, onednn


def _packing_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for a block, then restored."""
    outer = torch.get_num_threads()
    if outer != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if outer != n:
            torch.set_num_threads(outer)


def rope_inv_freq(config: ModelConfig, freq_factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies, with the config's scaling.

    ``freq_factors`` (``[head_dim / 2]``) divides the frequencies, as llama.cpp
    stores Llama 3 scaling in GGUF files (the ``rope_freqs`` tensor).
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is not None and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s is not None and s["rope_type"] == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the
        # band between blended linearly in 1/wavelength.
        old = s["original_max_position_embeddings"]
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / s["factor"] + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / s["factor"], inv)
        inv = torch.where((wavelen <= old / lo) & (wavelen >= old / hi), blended, inv)
    if freq_factors is not None:
        inv = inv / freq_factors.float()
    return inv


def pack_weight(weight: torch.Tensor) -> Optional[PackedWeight]:
    """The small-product copies of ``weight`` ``[out, in]`` (CPU float32) for
    :func:`linear`; None for other devices and dtypes."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    weight = weight.contiguous()
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, None) if _packing_available() else None
    return PackedWeight(_native.PackedLinear(weight), onednn)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           packed: Optional[PackedWeight] = None, threads: Optional[int] = None) -> torch.Tensor:
    """``F.linear`` for ``[rows, in]`` inputs. With ``packed``
    (:func:`pack_weight` of ``weight``): the panel kernel on ``threads``
    threads (default: torch's count) up to ``_PANEL_MAX_ROWS`` rows, oneDNN's
    matmul from ``_PACKED_MIN_ROWS`` rows. Otherwise ``W @ x^T`` for a few CPU
    float32 rows (see ``_SMALL_ROWS``; one row is padded to two: MKL's gemv is
    as slow as ``x @ W^T``), else ``F.linear``. ``weight`` may be None when
    ``packed`` has both copies (see :meth:`LlamaModel.pack`)."""
    m = x.shape[0]
    if packed is not None:
        if packed.panels is not None and m <= _PANEL_MAX_ROWS and x.dim() == 2:
            x = x.contiguous()
            out = torch.empty((m, packed.panels.out_features), dtype=torch.float32)
            packed.panels.forward(x, out, bias, threads or torch.get_num_threads())
            return out
        if packed.onednn is not None and (m >= _PACKED_MIN_ROWS or weight is None):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed.onednn, bias, "none", [], "")
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32 or \
            m > _SMALL_ROWS.get(torch.get_num_threads(), _SMALL_ROWS_DEFAULT):
        return F.linear(x, weight, bias)
    xt = (F.pad(x, (0, 0, 0, 1)) if m == 1 else x).t()
    y = torch.mm(weight, xt)[:, :m].t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 whatever the model dtype (as transformers does).
    Float32 rows in CPU memory go to ``_native.rms_norm`` (cpp/include/atlas/layer_ops.h):
    the chain of torch operations below costs about 45 microseconds a call in
    dispatch alone, 61 calls a forward of SmolLM2-135M."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1 \
            and x.is_cpu and weight.is_cpu and weight.is_contiguous() and not (x.requires_grad or weight.requires_grad):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        _native.rms_norm(x, weight, eps, out)
        return out
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class _Layer:
    __slots__ = ("attn_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "gate_up_bias",
                 "down", "down_bias", "packed")
    WEIGHTS = __slots__[:-1]

    # The matrices that LlamaModel.pack packs, and where the packed copies go.
    PACKED = ("qkv", "o", "gate_up", "down")

    def __init__(self):
        self.packed: dict = {}   # name -> packed copy (see pack_weight); empty when not packed

    def matrix(self, name: str) -> torch.Tensor:
        """The dense ``[out, in]`` matrix ``name`` (one of ``PACKED``), restored
        from its oneDNN copy when :meth:`LlamaModel.pack` dropped it."""
        w = getattr(self, name)
        return w if w is not None else self.packed[name].onednn.to_dense()


class LlamaModel:
    """Weights and forward of one Llama-family decoder.

    Build with :meth:`from_state_dict` from transformers-named tensors
    (``model.layers.{i}.self_attn.q_proj.weight`` ...; the ``model.`` prefix is
    optional).
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.config = config
        self.dtype = dtype
        self.embed: torch.Tensor = torch.empty(0)    # [vocab, hidden]
        self.norm: torch.Tensor = torch.empty(0)     # [hidden]
        self.lm_head: torch.Tensor = torch.empty(0)  # [vocab, hidden], the embedding when tied
        self.lm_head_packed: Optional[torch.Tensor] = None  # see pack()
        self.layer_panels = False   # every layer matrix has its panel copy (see pack() and _panel_layers)
        self.layers: list[_Layer] = []
        self.inv_freq: torch.Tensor = torch.empty(0)  # [head_dim / 2] float32
        self.cos = self.sin = torch.empty(0)          # [rows, head_dim]; sin has the rotate-half sign
        self.scale = 1.0 / math.sqrt(config.head_dim)

    # ---- weights -------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: Mapping[str, torch.Tensor],
                        dtype: torch.dtype = torch.float32,
                        rope_freq_factors: Optional[torch.Tensor] = None) -> "LlamaModel":
        """``state`` is consumed: tensors are popped as they are fused, so a large
        checkpoint is not held twice."""
        c = config
        sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()
              if not k.endswith("rotary_emb.inv_freq")}
        m = cls(c, dtype)
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

        def take(name, shape):
            if name not in sd:
                raise ValueError(f"weights: missing tensor {name!r}")
            t = sd.pop(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"weights: {name!r} must have shape {tuple(shape)}, got {tuple(t.shape)}")
            return t.detach().to(device="cpu", dtype=dtype).contiguous()

        def maybe(name, shape):
            return take(name, shape) if name in sd else None

        m.embed = take("embed_tokens.weight", (c.vocab_size, c.hidden_size))
        m.norm = take("norm.weight", (c.hidden_size,))
        head = sd.pop("lm_head.weight", None)
        if c.tie_word_embeddings or head is None:
            if not c.tie_word_embeddings:
                raise ValueError("weights: missing tensor 'lm_head.weight' (and the config does not "
                                 "tie the output layer to the embedding)")
            m.lm_head = m.embed
        else:
            sd["lm_head.weight"] = head
            m.lm_head = take("lm_head.weight", (c.vocab_size, c.hidden_size))

        for i in range(c.num_layers):
            p = f"layers.{i}."
            L = _Layer()
            L.attn_norm = take(p + "input_layernorm.weight", (c.hidden_size,))
            L.mlp_norm = take(p + "post_attention_layernorm.weight", (c.hidden_size,))
            shapes = {"q": q_out, "k": kv_out, "v": kv_out}
            L.qkv = torch.cat([take(f"{p}self_attn.{x}_proj.weight", (n, c.hidden_size))
                               for x, n in shapes.items()]).contiguous()
            biases = [maybe(f"{p}self_attn.{x}_proj.bias", (n,)) for x, n in shapes.items()]
            if any(b is not None for b in biases) and any(b is None for b in biases):
                raise ValueError(f"weights: layer {i} has biases on some of q/k/v projections only")
            L.qkv_bias = torch.cat(biases).contiguous() if biases[0] is not None else None
            L.o = take(p + "self_attn.o_proj.weight", (c.hidden_size, q_out))
            L.o_bias = maybe(p + "self_attn.o_proj.bias", (c.hidden_size,))
            I = c.intermediate_size
            L.gate_up = torch.cat([take(p + "mlp.gate_proj.weight", (I, c.hidden_size)),
                                   take(p + "mlp.up_proj.weight", (I, c.hidden_size))]).contiguous()
            gb, ub = maybe(p + "mlp.gate_proj.bias", (I,)), maybe(p + "mlp.up_proj.bias", (I,))
            L.gate_up_bias = torch.cat([gb, ub]).contiguous() if gb is not None else None
            L.down = take(p + "mlp.down_proj.weight", (c.hidden_size, I))
            L.down_bias = maybe(p + "mlp.down_proj.bias", (c.hidden_size,))
            m.layers.append(L)
        if sd:
            extra = sorted(sd)
            raise ValueError(f"weights: unexpected tensors for a {c.architecture} model: "
                             f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
        if rope_freq_factors is not None and tuple(rope_freq_factors.shape) != (c.head_dim // 2,):
            raise ValueError(f"rope frequency factors must have shape ({c.head_dim // 2},), "
                             f"got {tuple(rope_freq_factors.shape)}")
        m.inv_freq = rope_inv_freq(c, rope_freq_factors)
        m._grow_rope(min(c.max_position_embeddings, _INITIAL_ROPE_ROWS))
        m.pack()
        return m

    @property
    def packed(self) -> bool:
        """Whether the matrices have small-product copies (CPU float32; see
        :func:`pack_weight`)."""
        return self.lm_head_packed is not None

    def pack(self) -> "LlamaModel":
        """Makes the small-product copies of the layer matrices and the LM
        head where the weights' device and dtype allow (else none), and drops
        the dense tensor of each layer matrix that gets both copies (its
        ``_Layer`` attribute becomes None; :meth:`_Layer.matrix` restores it).
        Returns self."""
        for L in self.layers:
            L.packed = {name: p for name in _Layer.PACKED if (p := pack_weight(L.matrix(name))) is not None}
            for name, p in L.packed.items():
                if p.onednn is not None:   # (pack_weight always makes the panel copy)
                    setattr(L, name, None)   # every product reads a copy (see _PANEL_MAX_ROWS)
        self.lm_head_packed = pack_weight(self.lm_head)
        self.layer_panels = bool(self.layers) and all(
            len(L.packed) == len(_Layer.PACKED) and all(p.panels is not None for p in L.packed.values())
            for L in self.layers)
        return self

    def unpack(self) -> "LlamaModel":
        """Drops the packed copies, restoring the dense matrices that
        :meth:`pack` dropped (the forward then uses the dense matrices alone).
        Returns self."""
        for L in self.layers:
            for name in L.packed:
                setattr(L, name, L.matrix(name))
            L.packed = {}
        self.lm_head_packed = None
        self.layer_panels = False
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, device) -> "LlamaModel":
        """Moves every weight and the RoPE tables to ``device`` (in place);
        returns self. On a CUDA device the forward runs atlas's CUDA tree
        attention over a cache from :meth:`new_cache` (on the same device)."""
        device = torch.device(device)
        if device.type == "cuda":
            from .. import cuda
            if not cuda.available():
                raise RuntimeError("a CUDA device needs atlas built with CUDA (atlas.build_info()['cuda']) "
                                   "and a visible GPU; neither is optional")
        elif device.type != "cpu":
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
        tied = self.lm_head is self.embed
        self.unpack()
        self.embed = self.embed.to(device)
        self.lm_head = self.embed if tied else self.lm_head.to(device)
        self.norm = self.norm.to(device)
        for L in self.layers:
            for name in _Layer.WEIGHTS:
                t = getattr(L, name)
                setattr(L, name, None if t is None else t.to(device))
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.pack()

    def _grow_rope(self, rows: int) -> None:
        # float32 angles, cos and sin as transformers computes them, then cast to the
        # model dtype. Rotate-half: out = x * cos + cat(-x2, x1) * sin; the sign of
        # the first half is folded into the sin table so the forward needs no negation.
        pos = torch.arange(rows, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.config.head_dim // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        device = self.embed.device
        self.cos = emb.cos().to(self.dtype).contiguous().to(device)
        self.sin = (emb.sin() * sign).to(self.dtype).contiguous().to(device)

    # ---- forward ---------------------------------------------------------------------

    def new_cache(self, num_blocks: int, block_size: int = 16, max_seqs: int = 256) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, num_blocks, block_size, max_seqs,
                       dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, cache: KVCache, seq_ids: np.ndarray, tokens: torch.Tensor, positions: torch.Tensor,
                parents: np.ndarray, q_offsets: np.ndarray, slots: torch.Tensor,
                logit_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over the new tokens of a batch of sequences.

        seq_ids:   [batch] int32, the cache's sequence of each batch entry
        tokens:    [total] int64, sequence b's nodes are q_offsets[b] .. q_offsets[b+1]
        positions: [total] int64, length(b) + depth of the node
        parents:   [total] int32, tree-local parent, -1 at each root (a prompt is a chain)
        q_offsets: [batch + 1] int64, q_offsets[0] = 0 and q_offsets[-1] = total
        slots:     [total] int64, the slots cache.reserve returned for these nodes
        logit_rows: [R] int64 rows to compute logits for; None = all

        Writes every node's key and value into its slot (the caller commits after).
        Returns (logits [R or total, vocab] float32, hidden [total, hidden_size]: the
        final-norm hidden states of every node). Both are inference-mode tensors:
        clone them outside inference mode before using them in autograd.
        """
        c = self.config
        total = tokens.shape[0]
        if tokens.dim() != 1 or positions.shape != tokens.shape or slots.shape != tokens.shape:
            raise ValueError(f"tokens, positions and slots must be 1-D of one length, got shapes "
                             f"{tuple(tokens.shape)}, {tuple(positions.shape)}, {tuple(slots.shape)}")
        if len(q_offsets) < 2 or int(q_offsets[0]) != 0 or int(q_offsets[-1]) != total:
            raise ValueError(f"q_offsets must run from 0 to len(tokens) = {total}")
        if cache.num_layers != c.num_layers or cache.num_kv_heads != c.num_kv_heads or \
                cache.head_dim != c.head_dim or cache.dtype != self.dtype:
            raise ValueError("cache was not shaped for this model (use Target.new_cache)")
        if total == 0:
            raise ValueError("tokens must not be empty")
        top = int(positions.max())
        if int(positions.min()) < 0:
            raise ValueError("positions must be >= 0")
        if c.sliding_window is not None and top >= c.sliding_window:
            raise ValueError(f"position {top} reaches the sliding window ({c.sliding_window}); "
                             "atlas attends to the whole context and does not implement windows")
        if top >= self.cos.shape[0]:
            self._grow_rope(max(top + 1, 2 * self.cos.shape[0]))

        H, KH, D = c.num_heads, c.num_kv_heads, c.head_dim
        device = self.device
        if cache.storage.device != device:
            raise ValueError(f"cache is on {cache.storage.device}, the model on {device}")
        gpu = None
        if device.type == "cuda":
            from .. import cuda as gpu
            # Rows that commits and copy-on-write left pending move first (no wait).
            gpu.apply_pending_copies(cache, check=False)
            tokens, positions, slots = (t.to(device, non_blocking=True) for t in (tokens, positions, slots))
            if logit_rows is not None:
                logit_rows = logit_rows.to(device, non_blocking=True)
            # Block tables and committed lengths from the host metadata; the
            # grid bounds from host values, so that nothing waits for the device.
            tables, lens = gpu.paged_inputs(cache, seq_ids)
            max_context = max(int(cache.length(int(s))) for s in seq_ids)
            max_q = int(np.diff(np.asarray(q_offsets)).max())
            q_off_dev = torch.from_numpy(np.asarray(q_offsets, np.int64)).to(device, non_blocking=True)
            parents_dev = torch.from_numpy(np.asarray(parents, np.int32)).to(device, non_blocking=True)
        # A forward of a few rows (plain decoding, a draft tree) runs its
        # matrices and tree attention (its kv heads and their context split, see
        # atlas/attention.h) on atlas's pool threads and everything else on one
        # torch thread: its small element-wise products gain nothing from
        # more, and torch's OpenMP team would fight the panel workers for the
        # cores (measured, 8 rows on 2 cores: 36.3 ms a forward with torch on
        # 2 threads, 28.6 on 1).
        threads = torch.get_num_threads()
        few = gpu is None and self.lm_head_packed is not None and total <= _PANEL_MAX_ROWS and threads > 1
        # On the CPU in float32 the rotary embedding and the cache's stores run
        # natively, one call a layer (atlas/layer_ops.h: the same bits as the
        # torch expression below, in a tenth of its dispatch time).
        native_rope = gpu is None and self.dtype == torch.float32
        with _torch_threads(1 if few else threads):
            cos = self.cos[positions]  # [total, D]
            sin = self.sin[positions]
            if native_rope:
                q = torch.empty((total, H, D), dtype=self.dtype)
                slots = slots.to(torch.int64).contiguous()
            else:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [total, 1, D]
            x = self.embed[tokens]                   # [total, hidden]
            if native_rope and self.layer_panels and total <= _PANEL_MAX_ROWS:
                self._panel_layers(cache, x, q, cos, sin, slots, seq_ids, q_offsets, parents, threads)
            else:
                attn = torch.empty((total, H, D), dtype=self.dtype, device=device)
                for i, L in enumerate(self.layers):
                    h = rms_norm(x, L.attn_norm, c.rms_norm_eps)
                    qkv = linear(h, L.qkv, L.qkv_bias, L.packed.get("qkv"), threads).view(total, H + 2 * KH, D)
                    if native_rope:
                        _native.rope_store(cache, i, qkv, cos, sin, slots, q)
                    else:
                        # RoPE on q and k at once: they are the first H + KH heads of qkv.
                        qk = qkv[:, : H + KH]
                        qk = qk * cos + qk.view(total, H + KH, 2, D // 2).flip(2).view(total, H + KH, D) * sin
                        cache.keys(i).index_copy_(0, slots, qk[:, H:])
                        cache.values(i).index_copy_(0, slots, qkv[:, H + KH:])
                        q = qk[:, :H]
                    if gpu is None:
                        _native.tree_attention(cache, i, q, attn, seq_ids, q_offsets, parents, self.scale, threads)
                    else:
                        gpu.tree_attention(cache, i, q.contiguous(), tables, lens, q_off_dev, parents_dev,
                                           scale=self.scale, out=attn, max_context=max_context, max_q_per_seq=max_q,
                                           check=False)
                    x = x + linear(attn.view(total, H * D), L.o, L.o_bias, L.packed.get("o"), threads)
                    h = rms_norm(x, L.mlp_norm, c.rms_norm_eps)
                    gu = linear(h, L.gate_up, L.gate_up_bias, L.packed.get("gate_up"), threads)
                    x = x + linear(F.silu(gu[:, : c.intermediate_size]) * gu[:, c.intermediate_size:],
                                     L.down, L.down_bias, L.packed.get("down"), threads)
            hidden = rms_norm(x, self.norm, c.rms_norm_eps)
            rows = hidden if logit_rows is None else hidden[logit_rows]
            logits = linear(rows, self.lm_head, None, self.lm_head_packed, threads).float()
            return logits, hidden

    def _panel_layers(self, cache: KVCache, x: torch.Tensor, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      slots: torch.Tensor, seq_ids: np.ndarray, q_offsets: np.ndarray, parents: np.ndarray,
                      threads: int) -> None:
        """The decoder layers of a CPU float32 forward of at most
        ``_PANEL_MAX_ROWS`` rows, every matrix through its panel copy: ``x``
        ``[total, hidden]`` (a fresh tensor) is updated in place, ``q`` is
        the scratch of the rotated queries.

        The kernels and their order are the general loop's in
        :meth:`forward` (which gives this case the same bits, a test checks),
        called directly into buffers made once per forward, the residual
        sums and the gated product in place. What that saves is dispatch:
        the general loop's wrappers and its ten new tensors a layer.
        Measured on SmolLM2-135M at 250 tokens of context (forwards of 20-35
        ms), the mean difference of 148 alternated pairs of forwards, two
        runs of a throwaway script: 1.0 ms less a forward of 1 row (both
        runs), 1.8 and 2.3 ms of 8 rows, 1.6 of 14 (each +- 0.6-0.7 ms)."""
        c = self.config
        total = x.shape[0]
        H, KH, D, inner = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        h = torch.empty_like(x)                                   # each norm's output
        qkv = torch.empty((total, H + 2 * KH, D), dtype=x.dtype)
        attn = torch.empty((total, H, D), dtype=x.dtype)
        proj = torch.empty_like(x)                                # o's and down's outputs
        gu = torch.empty((total, 2 * inner), dtype=x.dtype)
        act = torch.empty((total, inner), dtype=x.dtype)
        qkv_rows, attn_rows = qkv.view(total, -1), attn.view(total, -1)
        gate, up = gu[:, :inner], gu[:, inner:]
        eps = c.rms_norm_eps
        for i, L in enumerate(self.layers):
            packed = L.packed
            _native.rms_norm(x, L.attn_norm, eps, h)
            packed["qkv"].panels.forward(h, qkv_rows, L.qkv_bias, threads)
            _native.rope_store(cache, i, qkv, cos, sin, slots, q)
            _native.tree_attention(cache, i, q, attn, seq_ids, q_offsets, parents, self.scale, threads)
            packed["o"].panels.forward(attn_rows, proj, L.o_bias, threads)
            x.add_(proj)
            _native.rms_norm(x, L.mlp_norm, eps, h)
            packed["gate_up"].panels.forward(h, gu, L.gate_up_bias, threads)
            torch.mul(F.silu(gate, inplace=True), up, out=act)
            packed["down"].panels.forward(act, proj, L.down_bias, threads)
            x.add_(proj)
