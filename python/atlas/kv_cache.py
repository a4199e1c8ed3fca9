"""Paged key/value cache.

The storage is one torch tensor of shape
``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (axis 1:
0 = keys, 1 = values), owned by this object; the native ``PagedKVCache`` owns
the metadata (free list, reference counts, block tables) and reads the storage
in place. A *slot* is ``block * block_size + offset``; ``keys(layer)`` and
``values(layer)`` are ``[num_blocks * block_size, num_kv_heads, head_dim]``
views of the storage indexed by slot, so a forward writes its new entries with
one ``index_copy_`` and nothing is ever gathered.

Lifecycle of a sequence: ``create`` -> (``reserve`` -> write the slots ->
``commit``)* -> ``release``; ``fork`` shares a sequence's blocks.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import _native


class KVCache(_native.PagedKVCache):
    """A paged KV cache whose storage this object allocates and owns.

    ``num_blocks * block_size`` is the total number of tokens all sequences can
    hold together. Running out raises :class:`atlas.CacheFullError` and leaves
    every sequence as it was.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, max_seqs: int = 256, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim), ("num_blocks", num_blocks),
                        ("block_size", block_size), ("max_seqs", max_seqs)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        storage = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
                              dtype=dtype, device=device)
        super().__init__(num_layers, num_kv_heads, head_dim, num_blocks, block_size, max_seqs, storage)
        self.storage = storage  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        flat = storage.view(num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        self._keys = [flat[layer, 0] for layer in range(num_layers)]
        self._values = [flat[layer, 1] for layer in range(num_layers)]
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = dtype

    def keys(self, layer: int) -> torch.Tensor:
        """``[num_blocks * block_size, num_kv_heads, head_dim]`` keys of a layer, by slot."""
        return self._keys[layer]

    def values(self, layer: int) -> torch.Tensor:
        """``[num_blocks * block_size, num_kv_heads, head_dim]`` values of a layer, by slot."""
        return self._values[layer]

    def commit(self, seq: int, keep: Optional[Sequence[int]] = None) -> None:
        """Keeps the reserved slots listed in ``keep`` (indices into the
        reservation, increasing; all when None) as the next positions."""
        k = None
        if keep is not None:
            k = np.asarray(keep)
            # Checked before the cast: astype would wrap an out-of-range index silently.
            if k.size and k.dtype.kind not in "iu":
                raise ValueError(f"keep must hold integer indices, got dtype {k.dtype}")
            if k.size and (k.min() < 0 or (k.dtype != np.int32 and k.max() > np.iinfo(np.int32).max)):
                raise ValueError("keep must hold indices into the reservation, in [0, reserved)")
            k = np.ascontiguousarray(k, dtype=np.int32)
        super().commit(seq, k)
