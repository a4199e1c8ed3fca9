"""Targets: loading Llama-family models from local files and their forward
over atlas's paged KV cache (see ``llama.py``)."""
from .config import ModelConfig
from .loader import default_model, load
from .target import Target
from .tokenizer import Tokenizer

__all__ = ["ModelConfig", "Target", "Tokenizer", "default_model", "load"]
