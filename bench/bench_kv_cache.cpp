// bench_kv_cache: the paged KV cache's reserve + commit, and CPU tree attention.
//
//   reserve + commit of a random accepted path of a 16- and a 64-node draft tree,
//   against a memcpy of the same bytes (the rows commit moves, all layers);
//   tree attention of 1, 8, 64 query nodes over contexts of 512 and 4096 tokens
//   (9 query heads, 3 kv heads, head_dim 64), against a plain loop over a
//   contiguous copy of the context, and as K/V bytes read per second.
//
// Each figure is the median of repeated timed runs after a warm-up.
// Usage: bench_kv_cache [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "atlas/attention.h"
#include "atlas/kv_cache.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

template <typename F>
double median_seconds(int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(seconds_since(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void check(const atlas::Status& st, const char* what) {
  if (!st.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, st.message.c_str());
    std::exit(1);
  }
}

// Random tree in topological order (parents[0] = -1, parents[i] in [0, i)).
std::vector<int32_t> random_tree(int n, std::mt19937_64& rng) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  p[0] = -1;
  for (int i = 1; i < n; ++i)
    p[static_cast<size_t>(i)] = static_cast<int32_t>(rng() % static_cast<uint64_t>(i));
  return p;
}

// An accepted path: from the root, step to a random child until a leaf.
std::vector<int32_t> random_path(const std::vector<int32_t>& parents, std::mt19937_64& rng) {
  std::vector<int32_t> path{0};
  for (;;) {
    std::vector<int32_t> kids;
    for (size_t i = 0; i < parents.size(); ++i)
      if (parents[i] == path.back()) kids.push_back(static_cast<int32_t>(i));
    if (kids.empty()) break;
    path.push_back(kids[rng() % kids.size()]);
  }
  return path;
}

struct Shape {
  const char* name;
  int layers, kv_heads, head_dim;
};

// ---- reserve + commit --------------------------------------------------------------

void bench_commit(const Shape& sh, int tree_nodes, bool quick) {
  const int bs = 16;
  const int steps = quick ? 50 : 200;  // reserve + commit pairs per timed run
  // The context's length does not change the cost of a commit; a short one keeps
  // the storage (up to 256 KiB per token at the large shape) small.
  const int64_t ctx = 100;
  std::mt19937_64 rng(42);
  std::vector<std::vector<int32_t>> keeps;  // one accepted path per step, fixed across runs
  int64_t moved_rows = 0, kept = 0;
  for (int s = 0; s < steps; ++s) {
    keeps.push_back(random_path(random_tree(tree_nodes, rng), rng));
    kept += static_cast<int64_t>(keeps.back().size());
    for (size_t j = 0; j < keeps.back().size(); ++j) moved_rows += keeps.back()[j] != static_cast<int32_t>(j);
  }
  const int64_t max_len = ctx + kept + tree_nodes;
  atlas::KVCacheConfig c;
  c.num_layers = sh.layers;
  c.num_kv_heads = sh.kv_heads;
  c.head_dim = sh.head_dim;
  c.block_size = bs;
  c.num_blocks = static_cast<int32_t>(max_len / bs + 2);
  c.max_seqs = 2;
  c.dtype = atlas::DType::kFloat32;
  std::vector<char> storage(static_cast<size_t>(atlas::kv_storage_bytes(c)), 1);
  atlas::PagedKVCache cache;
  check(cache.init(c, storage.data(), static_cast<int64_t>(storage.size()), true), "init");

  std::vector<int64_t> slots(static_cast<size_t>(tree_nodes));
  int32_t seq = -1;
  auto reset = [&] {
    if (seq >= 0) check(cache.release(seq), "release");
    check(cache.create(&seq), "create");
    std::vector<int64_t> ctx_slots(static_cast<size_t>(ctx));
    check(cache.reserve(seq, static_cast<int32_t>(ctx), ctx_slots.data()), "reserve");
    check(cache.commit(seq, nullptr, 0), "commit");
  };
  // The forward writes the reserved rows between reserve and commit, so commit
  // finds the rows it moves in cache. The benchmark writes the accepted path's
  // rows (every layer, K and V) there too, untimed.
  const int64_t row_bytes = static_cast<int64_t>(sh.kv_heads) * sh.head_dim * 4;
  const int64_t plane_bytes = static_cast<int64_t>(c.num_blocks) * bs * row_bytes;
  auto forward_writes = [&](const std::vector<int32_t>& keep) {
    for (int64_t pl = 0; pl < 2 * static_cast<int64_t>(sh.layers); ++pl)
      for (size_t j = 0; j < keep.size(); ++j)
        for (int64_t slot : {slots[j], slots[static_cast<size_t>(keep[j])]})
          std::memset(storage.data() + pl * plane_bytes + slot * row_bytes, static_cast<int>(j),
                      static_cast<size_t>(row_bytes));
  };
  std::vector<double> per_run;
  const int reps = quick ? 5 : 15;
  for (int r = 0; r < reps + 2; ++r) {
    reset();
    double t = 0.0;
    for (int s = 0; s < steps; ++s) {
      const std::vector<int32_t>& keep = keeps[static_cast<size_t>(s)];
      auto t0 = Clock::now();
      check(cache.reserve(seq, tree_nodes, slots.data()), "reserve");
      t += seconds_since(t0);
      forward_writes(keep);
      t0 = Clock::now();
      check(cache.commit(seq, keep.data(), static_cast<int32_t>(keep.size())), "commit");
      t += seconds_since(t0);
    }
    if (r >= 2) per_run.push_back(t);  // two warm-up runs
  }
  std::sort(per_run.begin(), per_run.end());
  const double total = per_run[per_run.size() / 2];

  // Baseline: memcpy of the bytes those commits move (every layer's K and V rows).
  const int64_t bytes = moved_rows * row_bytes * 2 * sh.layers;
  std::vector<char> a(static_cast<size_t>(std::max<int64_t>(bytes / steps + 1, 1)), 2), b(a.size());
  const double base = median_seconds(2, reps, [&] {
    for (int s = 0; s < steps; ++s) {
      std::memcpy(b.data(), a.data(), a.size());
      a[static_cast<size_t>(s) % a.size()] ^= b[0];  // keeps the copies from being folded away
    }
  });
  std::printf("| %-8s | %3d | %6.2f | %9.1f | %8.2f | %8.2f | %5.2f |\n", sh.name, tree_nodes,
              static_cast<double>(moved_rows) / steps, static_cast<double>(bytes) / steps / 1024.0,
              total / steps * 1e6, base / steps * 1e6, total / base);
}

// ---- tree attention ----------------------------------------------------------------

// The plain loop: context and tree gathered into contiguous float arrays
// [len, kv_heads, head_dim]; per query and head, scores, max, exp, sum, weighted sum.
void reference_attention(const std::vector<float>& k, const std::vector<float>& v, int64_t ctx,
                         const std::vector<int32_t>& parents, const std::vector<float>& q, int q_heads,
                         int kv_heads, int dim, float scale, std::vector<float>& out,
                         std::vector<float>& scores,
                         std::vector<uint8_t>& allowed) {
  const int n = static_cast<int>(parents.size());
  const int group = q_heads / kv_heads;
  const int64_t len = ctx + n;
  for (int i = 0; i < n; ++i) {
    std::fill(allowed.begin(), allowed.begin() + len, 0);
    std::fill(allowed.begin(), allowed.begin() + ctx, 1);
    for (int j = i; j >= 0; j = parents[static_cast<size_t>(j)]) allowed[static_cast<size_t>(ctx + j)] = 1;
    for (int h = 0; h < q_heads; ++h) {
      const float* qi = &q[(static_cast<size_t>(i) * q_heads + h) * dim];
      const int g = h / group;
      float mx = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        if (!allowed[static_cast<size_t>(t)]) continue;
        const float* kt = &k[(static_cast<size_t>(t) * kv_heads + g) * dim];
        float s = 0.0f;
        for (int d = 0; d < dim; ++d) s += qi[d] * kt[d];
        scores[static_cast<size_t>(t)] = s * scale;
        mx = std::max(mx, scores[static_cast<size_t>(t)]);
      }
      float* o = &out[(static_cast<size_t>(i) * q_heads + h) * dim];
      std::fill(o, o + dim, 0.0f);
      float sum = 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        if (!allowed[static_cast<size_t>(t)]) continue;
        const float p = std::exp(scores[static_cast<size_t>(t)] - mx);
        sum += p;
        const float* vt = &v[(static_cast<size_t>(t) * kv_heads + g) * dim];
        for (int d = 0; d < dim; ++d) o[d] += p * vt[d];
      }
      for (int d = 0; d < dim; ++d) o[d] /= sum;
    }
  }
}

uint16_t to_bf16(float f) { return atlas::float_to_bf16(f); }

void bench_attention(int64_t ctx, int nodes, atlas::DType dtype, bool quick) {
  const int layers = 1, kv_heads = 3, q_heads = 9, dim = 64, bs = 16;
  atlas::KVCacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kv_heads;
  c.head_dim = dim;
  c.block_size = bs;
  c.num_blocks = static_cast<int32_t>((ctx + nodes) / bs + 4);
  c.max_seqs = 1;
  c.dtype = dtype;
  std::vector<char> storage(static_cast<size_t>(atlas::kv_storage_bytes(c)));
  atlas::PagedKVCache cache;
  check(cache.init(c, storage.data(), static_cast<int64_t>(storage.size()), true), "init");
  cache.shuffle_free_blocks(7);  // pages out of order, as after a while of serving

  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  const int64_t len = ctx + nodes;
  std::vector<float> k(static_cast<size_t>(len) * kv_heads * dim), v(k.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  if (dtype == atlas::DType::kBFloat16) {  // the baseline sees the same (rounded) values
    for (auto& x : k) x = atlas::bf16_to_float(to_bf16(x));
    for (auto& x : v) x = atlas::bf16_to_float(to_bf16(x));
  }
  int32_t seq = -1;
  check(cache.create(&seq), "create");
  std::vector<int64_t> slots(static_cast<size_t>(len));
  if (ctx > 0) {
    check(cache.reserve(seq, static_cast<int32_t>(ctx), slots.data()), "reserve");
    check(cache.commit(seq, nullptr, 0), "commit");
  }
  check(cache.reserve(seq, nodes, slots.data() + ctx), "reserve");
  for (int64_t p = 0; p < ctx; ++p) check(cache.slot_of(seq, p, &slots[static_cast<size_t>(p)]), "slot_of");
  const int64_t row = static_cast<int64_t>(kv_heads) * dim;
  const int64_t plane = static_cast<int64_t>(c.num_blocks) * bs * row;
  for (int64_t p = 0; p < len; ++p)
    for (int64_t e = 0; e < row; ++e) {
      const size_t src = static_cast<size_t>(p * row + e);
      const int64_t dk = slots[static_cast<size_t>(p)] * row + e;
      if (dtype == atlas::DType::kFloat32) {
        reinterpret_cast<float*>(storage.data())[dk] = k[src];
        reinterpret_cast<float*>(storage.data())[plane + dk] = v[src];
      } else {
        reinterpret_cast<uint16_t*>(storage.data())[dk] = to_bf16(k[src]);
        reinterpret_cast<uint16_t*>(storage.data())[plane + dk] = to_bf16(v[src]);
      }
    }

  const std::vector<int32_t> parents = random_tree(nodes, rng);
  std::vector<float> q(static_cast<size_t>(nodes) * q_heads * dim);
  for (auto& x : q) x = normal(rng);
  std::vector<uint16_t> q16(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    q16[i] = to_bf16(q[i]);
    q[i] = atlas::bf16_to_float(q16[i]);
  }
  std::vector<float> out(q.size());
  std::vector<uint16_t> out16(q.size());
  const int64_t offsets[2] = {0, nodes};
  atlas::TreeAttentionProblem p;
  p.cache = &cache;
  p.layer = 0;
  p.q = dtype == atlas::DType::kFloat32 ? static_cast<const void*>(q.data()) : q16.data();
  p.q_stride_token = static_cast<int64_t>(q_heads) * dim;
  p.q_stride_head = dim;
  p.num_q_heads = q_heads;
  p.out = dtype == atlas::DType::kFloat32 ? static_cast<void*>(out.data()) : out16.data();
  p.seq_ids = &seq;
  p.q_offsets = offsets;
  p.parents = parents.data();
  p.batch = 1;
  p.scale = 1.0f / std::sqrt(static_cast<float>(dim));

  const int reps = quick ? 5 : 21;
  // Calls per timed run: enough work (~8M query-head-key triples) to dwarf the clock.
  const double work = static_cast<double>(len) * nodes * q_heads;
  const int inner = std::max<int>(1, static_cast<int>((quick ? 2e6 : 8e6) / work));
  const double ours = median_seconds(2, reps, [&] {
    for (int i = 0; i < inner; ++i) check(atlas::tree_attention(p), "tree_attention");
  }) / inner;

  std::vector<float> ref(q.size()), scores(static_cast<size_t>(len)), tmp_out(q.size());
  std::vector<uint8_t> allowed(static_cast<size_t>(len));
  const double base = median_seconds(1, quick ? 3 : 7, [&] {
    for (int i = 0; i < inner; ++i)
      reference_attention(k, v, ctx, parents, q, q_heads, kv_heads, dim, p.scale, ref, scores, allowed);
  }) / inner;
  double max_err = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const float o = dtype == atlas::DType::kFloat32 ? out[i] : atlas::bf16_to_float(out16[i]);
    max_err = std::max(max_err, static_cast<double>(std::fabs(o - ref[i])));
  }
  // Bytes of K and V the call has to read at least once: the context and the tree rows.
  const double kv_bytes = static_cast<double>(len) * row * 2 * atlas::dtype_size(dtype);
  std::printf("| %4lld | %3d | %-4s | %9.1f | %9.1f | %5.2fx | %6.2f | %7.1e |\n",
              static_cast<long long>(ctx), nodes,
              dtype == atlas::DType::kFloat32 ? "f32" : "bf16", ours * 1e6, base * 1e6, base / ours,
              kv_bytes / ours / 1e9, max_err);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  std::printf(
      "reserve + commit of a random accepted path (float32 storage, block 16; baseline: one memcpy of\n"
      "the bytes commit moves, from a cache-hot buffer)\n");
  std::printf("| shape    | nodes | moved rows/step | KiB moved/step | us/step | memcpy us | ratio |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  const Shape shapes[] = {{"SmolLM2", 30, 3, 64}, {"8B-like", 32, 8, 128}};
  for (const Shape& sh : shapes)
    for (int n : {16, 64}) bench_commit(sh, n, quick);

  std::printf("\ntree attention, one layer (9 q heads, 3 kv heads, head_dim 64, block 16, shuffled pages)\n");
  std::printf("| ctx | nodes | dtype | atlas us | plain loop us | speedup | K/V GB/s | max |diff| |\n");
  std::printf("|---|---|---|---|---|---|---|---|\n");
  for (atlas::DType dt : {atlas::DType::kFloat32, atlas::DType::kBFloat16})
    for (int64_t ctx : {512, 4096})
      for (int n : {1, 8, 64}) bench_attention(ctx, n, dt, quick);
  return 0;
}
