"""atlas: an adaptive-learning speculative decoding engine.

The native core (``atlas._native``, C++17, optional CUDA) owns the draft tree,
the lossless verifier, the paged KV cache and tree attention; this package
wraps it for PyTorch users.
"""
from __future__ import annotations

from . import _native
from ._native import CacheFullError
from .controller import Controller
from .engine import Engine, Output, RequestStats
from .kv_cache import KVCache
from .models import default_model, load
from .tree import DraftTree, FlatTree
from .verify import Verifier, VerifyResult, verify

__version__ = _native.build_info()["version"]


def build_info() -> dict:
    """What the native extension was built with.

    Keys: ``version``, ``compiler``, ``build_type``, ``simd_flags``, ``cuda``
    (bool: CUDA kernels compiled in) and ``cuda_archs`` (e.g. ``['90', '100a']``).
    """
    return dict(_native.build_info())


__all__ = [
    "CacheFullError",
    "Controller",
    "DraftTree",
    "Engine",
    "FlatTree",
    "KVCache",
    "Output",
    "RequestStats",
    "Verifier",
    "VerifyResult",
    "build_info",
    "default_model",
    "load",
    "verify",
]
