"""Model configuration: the few numbers the Llama-family forward needs, read
from a transformers ``config.json`` (either schema: ``rope_scaling`` +
``rope_theta`` as transformers 4 writes them, or ``rope_parameters`` as
transformers 5 does) or from GGUF metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

# model_type (config.json) -> the name atlas reports. All three share one forward:
# Qwen2 differs only by its q/k/v biases, Mistral only by its sliding window.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# RoPE types whose frequencies are fixed once per model. "dynamic" NTK scaling is
# left out on purpose: its frequencies change with the current sequence length,
# so keys already in the cache would have been rotated with other frequencies.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Shapes and constants of a Llama-family decoder."""

    architecture: str            # "llama", "mistral" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    # {"rope_type": "linear" | "llama3", ...} with the type's own keys; None = plain RoPE.
    rope_scaling: Optional[dict] = None
    # Attention span limit (Mistral); positions at or past it are refused by the forward.
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: set = field(default_factory=set)

    def __post_init__(self):
        if self.architecture not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; atlas supports "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"config: {name} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From a transformers config dict (``config.json`` or ``config.to_dict()``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = cfg.get("architectures") or model_type
            raise ValueError(f"unsupported architecture {arch!r} (model_type {model_type!r}); atlas "
                             f"supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        theta, scaling = _hf_rope(cfg)
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # Qwen2 configs carry a window that is off unless use_sliding_window
        return cls(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            sliding_window=int(window) if window else None,
            bos_token_id=_first_id(cfg.get("bos_token_id")),
            eos_token_ids=_id_set(cfg.get("eos_token_id")),
        )


def _hf_rope(cfg: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from either config schema."""
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"config: rope_parameters must be a dict, got {params!r}")
    if params and any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("config: per-layer-type rope_parameters are not supported")
    scaling = dict(params or cfg.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if kind == "default":
        return float(theta), None
    scaling["rope_type"] = kind
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return float(theta), scaling


def check_rope_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """Validates a RoPE scaling dict; returns it normalised (None for plain RoPE)."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in SUPPORTED_ROPE_TYPES:
        why = (" ('dynamic' rescales the frequencies as the sequence grows, which keys already in "
               "the KV cache cannot follow)" if kind == "dynamic" else "")
        raise ValueError(f"unsupported rope scaling type {kind!r}; atlas supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}{why}")
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")}[kind]
    missing = [k for k in need if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling {kind!r} is missing {', '.join(missing)}")
    out = {k: float(scaling[k]) for k in need}
    out["rope_type"] = kind
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError("rope scaling 'llama3' needs high_freq_factor > low_freq_factor")
    if out["factor"] <= 0:
        raise ValueError(f"rope scaling factor must be positive, got {out['factor']}")
    return out


def _first_id(v) -> Optional[int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def _id_set(v) -> set:
    if v is None:
        return set()
    if isinstance(v, (list, tuple, set)):
        return {int(x) for x in v}
    return {int(v)}
