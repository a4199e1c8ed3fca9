"""Kernel benchmarks of atlas's CUDA path. Needs a GPU and atlas built with CUDA.

Every figure is the median of repeated runs after a warm-up, timed with CUDA
events around the kernel alone, with a cold L2 (a buffer of at least twice the
L2 size is written before each run) and the GPU kept busy while the host
enqueues the launch (a short device-side sleep before the start event), so
that host overhead is not counted. Bandwidths are bytes the kernel must read
(or read and write) per second, against the device-to-device copy bandwidth
measured in the same run (copy bytes = read + written). Each operation is
also timed against a PyTorch baseline on the same data, as a ratio. What is
measured and why is written down in bench/GPU.md.

    python bench/bench_cuda.py [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

import atlas
import atlas.cuda as ac
from atlas import _native

DEV = torch.device("cuda")


class Timer:
    def __init__(self, reps: int, warmup: int):
        props = torch.cuda.get_device_properties(DEV)
        l2 = getattr(props, "L2_cache_size", 64 << 20) or (64 << 20)
        self.flush = torch.empty(max(2 * l2, 128 << 20) // 4, dtype=torch.float32, device=DEV)
        self.reps, self.warmup = reps, warmup
        self.sleep = getattr(torch.cuda, "_sleep", None)

    def __call__(self, fn) -> float:
        """Median microseconds of fn() on the device."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self.flush.fill_(1.0)  # evicts the L2
            if self.sleep is not None:
                self.sleep(200_000)  # ~0.1 ms of device work: the launch below is queued behind it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    return 2 * n / (us * 1e-6)


# ---- verification ------------------------------------------------------------------------------


def chain_batch(batch: int, nodes: int, vocab: int, accept_all: bool, gen):
    """`batch` trees of `nodes` nodes each; chains whose every child is the
    parent's argmax (the walk reads every row) or random trees."""
    logits = torch.randn((batch * nodes, vocab), generator=gen, device=DEV).to(torch.bfloat16)
    arg = logits.float().argmax(-1).cpu().numpy().astype(np.int32)
    rng = np.random.default_rng(0)
    toks, pars = [], []
    for b in range(batch):
        if accept_all:
            p = np.arange(-1, nodes - 1, dtype=np.int32)
            t = np.concatenate([[0], arg[b * nodes: (b + 1) * nodes - 1]]).astype(np.int32)
        else:  # a bushy tree: 4 children per node, the first child the argmax half the time
            p = np.array([-1] + [(c - 1) // 4 for c in range(1, nodes)], np.int32)
            t = np.zeros(nodes, np.int32)
            for c in range(1, nodes):
                first = (c - 1) % 4 == 0
                t[c] = arg[b * nodes + p[c]] if first and rng.random() < 0.5 else (c * 7919) % vocab
                if not first and t[c] == arg[b * nodes + p[c]]:
                    t[c] = (t[c] + 1) % vocab
        toks.append(t)
        pars.append(p)
    offsets = np.arange(0, batch * nodes + 1, nodes, dtype=np.int64)
    return logits, np.concatenate(toks), np.concatenate(pars), offsets


def bench_verify(timer: Timer, copy_bw: float, quick: bool):
    rows = []
    vocab, nodes = 151936, 64
    gen = torch.Generator(device=DEV).manual_seed(0)
    stream = torch.cuda.current_stream().cuda_stream
    configs = [(1, True), (1, False), (8, True), (64, True)] if not quick else [(1, True), (8, True)]
    for batch, accept_all in configs:
        logits, tokens, parents, offsets = chain_batch(batch, nodes, vocab, accept_all, gen)
        total = batch * nodes
        tok = torch.from_numpy(tokens).to(DEV)
        par = torch.from_numpy(parents).to(DEV)
        off = torch.from_numpy(offsets).to(DEV)
        ws = torch.empty(_native.verify_cuda_workspace_bytes(vocab, batch, total), dtype=torch.uint8, device=DEV)
        acc = torch.empty((batch, nodes), dtype=torch.int32, device=DEV)
        emi = torch.empty((batch, nodes + 1), dtype=torch.int32, device=DEV)
        num = torch.empty(batch, dtype=torch.int32, device=DEV)
        status = torch.empty(batch, dtype=torch.int32, device=DEV)
        row_bytes = vocab * 2
        base_us = timer(lambda: logits.argmax(-1))
        shape = "chain, all accepted" if accept_all else "4-ary tree"
        for mode, temp in (("greedy walk", 0.0), ("greedy prepass", 0.0), ("sampling k50 p0.9", 1.0)):
            params = ac.sampling_params(batch, temperature=temp, top_k=50 if temp else 0, top_p=0.9 if temp else 1.0,
                                        seed=np.arange(batch, dtype=np.uint64), device=DEV)
            prepass = mode == "greedy prepass"

            def run():
                _native.verify_cuda(logits, tok, par, off, params, None, acc, emi, num, status, ws, stream,
                                    prepass, False)

            us = timer(run)
            if int(status.abs().sum()) != 0:
                raise RuntimeError(f"verify_cuda reported {status.cpu().tolist()}")
            visited = int(num.sum()) + batch
            read = (total if prepass else visited) * row_bytes
            rows.append({
                "op": "verify", "case": f"B={batch} x {nodes} nodes, {shape}", "mode": mode,
                "us": us, "rows_read": total if prepass else visited,
                "GB/s": read / us / 1e3 if mode != "sampling k50 p0.9" else float("nan"),
                "%copy": 100 * (read / (us * 1e-6)) / copy_bw if mode != "sampling k50 p0.9" else float("nan"),
                "baseline": "torch argmax of all rows", "baseline_us": base_us, "speedup": base_us / us,
            })
    return rows


# ---- tree attention ----------------------------------------------------------------------------


def bench_attention(timer: Timer, copy_bw: float, quick: bool):
    rows = []
    q_heads, kv_heads, dim, bs = 32, 8, 128, 16
    group = q_heads // kv_heads
    configs = [(1, 4096, 16), (1, 16384, 64), (8, 4096, 16), (32, 2048, 8)]
    if quick:
        configs = configs[:2]
    stream = torch.cuda.current_stream().cuda_stream
    rng = np.random.default_rng(1)
    for batch, ctx, n in configs:
        blocks = batch * (-(-(ctx + n) // bs)) + 8
        cache = atlas.KVCache(1, kv_heads, dim, blocks, bs, batch + 1, dtype=torch.bfloat16, device=DEV)
        cache.storage.normal_()
        cache.shuffle_free_blocks(3)
        seqs = [cache.create() for _ in range(batch)]
        for s in seqs:
            cache.reserve(s, ctx)
            cache.commit(s)
            cache.reserve(s, n)
        tables, lens = ac.paged_inputs(cache, seqs)
        parents = np.concatenate([np.array([-1] + [int(rng.integers(c)) for c in range(1, n)], np.int32)
                                  for _ in range(batch)])
        qoff = np.arange(0, batch * n + 1, n, dtype=np.int64)
        q = torch.randn((batch * n, q_heads, dim), device=DEV).to(torch.bfloat16)
        out = torch.empty_like(q)
        ws = torch.empty(_native.tree_attention_cuda_workspace_bytes(cache, q_heads, batch, ctx, n),
                         dtype=torch.uint8, device=DEV)
        status = torch.empty(batch, dtype=torch.int32, device=DEV)
        par_d = torch.from_numpy(parents).to(DEV)
        qoff_d = torch.from_numpy(qoff).to(DEV)
        scale = dim ** -0.5

        def run():
            _native.tree_attention_cuda(cache, 0, q, out, tables, lens, qoff_d, par_d, scale, ctx, n, status, ws,
                                        stream, False)

        us = timer(run)
        if int(status.abs().sum()) != 0:
            raise RuntimeError(f"tree_attention_cuda reported {status.cpu().tolist()}")

        # The same data gathered into contiguous tensors, and the tree mask.
        keys, values = cache.keys(0), cache.values(0)
        slots = [torch.tensor([cache.slot_of(s, p) for p in range(ctx + n)], device=DEV) for s in seqs]
        k = torch.stack([keys[sl] for sl in slots]).transpose(1, 2).contiguous()  # [B, kv_heads, ctx + n, dim]
        v = torch.stack([values[sl] for sl in slots]).transpose(1, 2).contiguous()
        mask = np.zeros((batch, 1, n, ctx + n), bool)
        mask[..., :ctx] = True
        for b in range(batch):
            anc = np.eye(n, dtype=bool)
            for i in range(1, n):
                anc[i] |= anc[parents[b * n + i]]
            mask[b, 0, :, ctx:] = anc
        mask_d = torch.from_numpy(mask).to(DEV)
        qs = q.view(batch, n, q_heads, dim).transpose(1, 2)
        try:
            F.scaled_dot_product_attention(qs, k, v, attn_mask=mask_d, enable_gqa=True)

            def sdpa():
                return F.scaled_dot_product_attention(qs, k, v, attn_mask=mask_d, enable_gqa=True)
        except TypeError:  # torch without enable_gqa
            kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

            def sdpa():
                return F.scaled_dot_product_attention(qs, kr, vr, attn_mask=mask_d)
        base_us = timer(sdpa)
        err = (sdpa().transpose(1, 2).reshape_as(out).float() - out.float()).abs().max().item()
        read = batch * (ctx + n) * kv_heads * dim * 2 * 2  # keys and values, bf16
        rows.append({
            "op": "tree_attention", "case": f"B={batch} ctx={ctx} nodes={n} Hq={q_heads} Hkv={kv_heads} D={dim} bf16",
            "mode": "paged", "us": us, "GB/s": read / us / 1e3, "%copy": 100 * (read / (us * 1e-6)) / copy_bw,
            "baseline": "torch SDPA, contiguous K/V + mask", "baseline_us": base_us, "speedup": base_us / us,
            "max_abs_diff_vs_sdpa": err,
        })
        # Drop this case's device tensors before the next case allocates its
        # own (rebinding rather than `del`, which the closures above read).
        cache = k = v = None
    return rows


# ---- KV row copies -----------------------------------------------------------------------------


def bench_kv_copy(timer: Timer, copy_bw: float, quick: bool):
    rows = []
    layers, kv_heads, dim, blocks, bs = 32, 8, 128, 2048, 16
    cache = atlas.KVCache(layers, kv_heads, dim, blocks, bs, 2, dtype=torch.bfloat16, device=DEV)
    stream = torch.cuda.current_stream().cuda_stream
    status = torch.empty(1, dtype=torch.int32, device=DEV)
    flat = cache.storage.view(layers * 2, blocks * bs, kv_heads * dim)
    for n in ((64,) if quick else (8, 64, 512)):
        perm = np.random.default_rng(n).permutation(blocks * bs)[: 2 * n]
        pairs = torch.from_numpy(np.stack([perm[:n], perm[n:]], 1).astype(np.int64)).to(DEV)

        def run():
            _native.kv_copy_slots_cuda(cache, pairs, status, stream, False)

        us = timer(run)
        src, dst = pairs[:, 0], pairs[:, 1]

        def torch_copy():
            flat[:, dst] = flat[:, src]

        base_us = timer(torch_copy)
        moved = 2 * n * layers * 2 * kv_heads * dim * 2  # read + written
        rows.append({
            "op": "kv_copy_slots", "case": f"{n} rows x {layers} layers x K,V ({kv_heads}x{dim} bf16)",
            "mode": "in order", "us": us, "GB/s": moved / us / 1e3, "%copy": 100 * (moved / (us * 1e-6)) / copy_bw,
            "baseline": "torch index gather/scatter", "baseline_us": base_us, "speedup": base_us / us,
        })
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    if not ac.available():
        print("bench_cuda: needs atlas built with CUDA and a CUDA device", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(DEV)
    timer = Timer(reps=10 if args.quick else 30, warmup=3)
    copy_bw = copy_bandwidth(timer)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {getattr(props, 'L2_cache_size', 0) >> 20} MiB;"
          f" device-to-device copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    rows = bench_verify(timer, copy_bw, args.quick) + bench_attention(timer, copy_bw, args.quick) + \
        bench_kv_copy(timer, copy_bw, args.quick)
    head = f"{'op':15} {'case':52} {'mode':18} {'us':>9} {'GB/s':>8} {'%copy':>6} {'base us':>9} {'x base':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        gbs = "" if math.isnan(r["GB/s"]) else f"{r['GB/s']:.0f}"
        pct = "" if math.isnan(r["%copy"]) else f"{r['%copy']:.0f}"
        print(f"{r['op']:15} {r['case'][:52]:52} {r['mode']:18} {r['us']:9.1f} {gbs:>8} {pct:>6} "
              f"{r['baseline_us']:9.1f} {r['speedup']:7.2f}")
    print("baselines: verify = torch argmax of all rows; tree_attention = torch SDPA on gathered contiguous K/V "
          "with the tree mask; kv_copy_slots = torch index gather/scatter (no ordering)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_bw_bytes_per_s": copy_bw, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
