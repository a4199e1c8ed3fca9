"""Tokenizer: a ``tokenizers`` backend plus the chat template, no transformers.

Built from a ``tokenizer.json`` (+ ``tokenizer_config.json``) or from the
``tokenizer.*`` metadata of a GGUF file (byte-level BPE, as llama.cpp's
converter writes it for GPT-2-style vocabularies such as SmolLM2's).
"""
from __future__ import annotations

import datetime
from typing import Iterable, Optional, Sequence, Union

from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, pre_tokenizers
from tokenizers import processors

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# How text is split before BPE, per tokenizer.ggml.pre. None = the GPT-2 split
# built into the ByteLevel pre-tokenizer. The patterns are the published ones of
# each vocabulary: a vocabulary's merges were learned on pieces split this way,
# so another split gives other ids.
_SPLIT_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_SPLITS = {
    "default": None, "gpt2": None, "smollm": None,
    "llama3": _SPLIT_LLAMA3, "llama-v3": _SPLIT_LLAMA3, "llama-bpe": _SPLIT_LLAMA3,
    "smaug-bpe": _SPLIT_LLAMA3,
    "qwen2": _SPLIT_QWEN2, "deepseek-r1-qwen": _SPLIT_QWEN2,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1
    bytes stand for themselves, the other 68 are moved to U+0100 and up, so
    every byte string is spelled with visible, non-space characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tokenizer:
    """Text <-> token ids, and the model's chat template.

    ``encode`` adds what the tokenizer's post-processor adds (e.g. a BOS token
    where the model wants one); ``apply_chat_template`` renders the template
    (which writes its own special tokens) and encodes it without additions.
    """

    def __init__(self, backend: Backend, *, bos_token_id: Optional[int] = None,
                 eos_token_ids: Iterable[int] = (), chat_template: Optional[str] = None,
                 bos_token: Optional[str] = None, eos_token: Optional[str] = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._token(bos_token_id)
        first_eos = min(self.eos_token_ids) if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else self._token(first_eos)
        self._template = None

    def _token(self, i: Optional[int]) -> Optional[str]:
        return None if i is None else self.backend.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Union[str, Sequence[dict]], add_generation_prompt: bool = True) -> str:
        """The chat template rendered as text. A plain string is one user message."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (none in the GGUF metadata or "
                             "tokenizer_config.json / chat_template.jinja)")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def apply_chat_template(self, messages: Union[str, Sequence[dict]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat template (no special tokens added on top:
        the template writes its own)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    # ---- constructors -----------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        """From the ``tokenizer.*`` keys of a GGUF file (see gguf_meta in loader)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {kind!r}: atlas reads byte-level BPE "
                             "vocabularies (tokenizer.ggml.model = 'gpt2')")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ValueError("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_SPLITS:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; atlas knows "
                             f"{', '.join(sorted(_GGUF_SPLITS))}")

        spell = _byte_alphabet()
        alphabet = set(spell.values())
        vocab, special, user = {}, [], []
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            if typ == _CONTROL:
                special.append(tok)
            elif typ == _USER_DEFINED:
                user.append(tok)
            # A vocabulary token outside the byte alphabet was stored as raw text:
            # spell its UTF-8 bytes so that BPE can reach it.
            if typ != _CONTROL and not set(tok) <= alphabet:
                tok = "".join(spell[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        split = _GGUF_SPLITS[pre]
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        # Control and user-defined tokens are matched whole in the text, never split by BPE.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if meta.get(key) is not None:
                eos_ids.add(int(meta[key]))
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            bos_tok = tokens[int(bos)]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos_tok} $A", pair=f"{bos_tok} $A {bos_tok} $B",
                special_tokens=[(bos_tok, int(bos))])
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   chat_template=meta.get("tokenizer.chat_template"))


class _RaisedByTemplate(ValueError):
    pass


def _raise(message):
    raise _RaisedByTemplate(message)


def _compile_template(source: str):
    """Chat templates are written for a sandboxed jinja2 with trimmed blocks, as
    transformers renders them; templates call raise_exception and strftime_now."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("rendering a chat template needs jinja2 (pip install jinja2)") from e
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
