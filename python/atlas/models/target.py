"""Target: the model atlas accelerates (config, forward, tokenizer)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..kv_cache import KVCache
from .config import ModelConfig
from .llama import LlamaModel
from .tokenizer import Tokenizer


class Target:
    """A loaded target model.

    ``forward`` runs the new tokens of a batch of sequences (a prompt as a chain,
    or a draft tree) over a paged KV cache shaped by ``new_cache``; see
    :meth:`LlamaModel.forward` for the arguments. ``tokenizer`` may be None when
    the target was built from a model object without one.
    """

    def __init__(self, config: ModelConfig, model: LlamaModel, tokenizer: Optional[Tokenizer]):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer is not None:
            # Model config and tokenizer files may each name some of the end tokens
            # (Llama 3: config.json lists three, tokenizer_config.json one); any ends.
            config.eos_token_ids |= tokenizer.eos_token_ids
            tokenizer.eos_token_ids |= config.eos_token_ids
            if config.bos_token_id is None:
                config.bos_token_id = tokenizer.bos_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, num_blocks: int, block_size: int = 16, max_seqs: int = 256) -> KVCache:
        """A KV cache for this model holding num_blocks * block_size tokens in all."""
        return self.model.new_cache(num_blocks, block_size, max_seqs)

    def forward(self, cache: KVCache, seq_ids: np.ndarray, tokens: torch.Tensor, positions: torch.Tensor,
                parents: np.ndarray, q_offsets: np.ndarray, slots: torch.Tensor,
                logit_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [R or total, vocab] float32, hidden [total, hidden_size])."""
        return self.model.forward(cache, seq_ids, tokens, positions, parents, q_offsets, slots, logit_rows)

    def __repr__(self) -> str:
        c = self.config
        return (f"Target({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype})")
