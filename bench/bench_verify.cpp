// bench_verify: time atlas::verify on the CPU against a plain read of the same
// logits rows.
//
// Cases: vocab 49,152 (SmolLM2) and 151,936 (Qwen2); trees of 1, 4, 16 and 64
// nodes, either a chain whose every draft is accepted (the worst case: every
// row is read) or a random tree (random parents and tokens: the walk usually
// stops at the root); greedy, sampling at temperature 0.8 with top_k 50 and
// top_p 0.9, and plain sampling at temperature 1.0; float32 and bfloat16.
//
// Baseline: a 32-bit integer sum over the bytes of the rows the walk read (the
// root and the accepted nodes), the cheapest pass that touches them. Both run
// on the same buffers back to back, so both find the rows in the same cache
// level. Each figure is the median of repeated runs after a warm-up; the last
// column is the ratio of the minima (steadier where other work shares the CPU).
// The kernels run at the widest vector width the CPU has; set
// ATLAS_SIMD_WIDTH=4 or 8 to measure a narrower one.
//
// Usage: bench_verify [--quick]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "atlas/common.h"

// 32-byte vectors in always-inlined code only.
#pragma GCC diagnostic ignored "-Wpsabi"
#include "atlas/verify.h"

namespace {

using Clock = std::chrono::steady_clock;

// A small deterministic generator so that the benchmark needs nothing else.
struct SplitMix {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  float normal() {  // Box-Muller; logits of a real model are about this spread
    const double u1 = uniform() + 1e-300, u2 = uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
};

// A sink the compiler cannot see through, so the baseline sum is kept.
volatile uint32_t g_sink = 0;

// Four independent 32-byte accumulators: the read is limited by the memory
// system, not by the adds. Compiled for AVX2 too where the compiler can, like
// the verifier's kernels, so that the baseline is not handicapped.
typedef uint32_t VU __attribute__((vector_size(32)));

#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
__attribute__((target_clones("avx2", "default")))
#endif
#endif
uint32_t sum_words(const void* data, int64_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  constexpr int64_t kStep = 4 * sizeof(VU);
  VU a0 = VU{}, a1 = VU{}, a2 = VU{}, a3 = VU{};
  int64_t i = 0;
  for (; i + kStep <= bytes; i += kStep) {
    VU v0, v1, v2, v3;
    std::memcpy(&v0, p + i, sizeof(VU));
    std::memcpy(&v1, p + i + 32, sizeof(VU));
    std::memcpy(&v2, p + i + 64, sizeof(VU));
    std::memcpy(&v3, p + i + 96, sizeof(VU));
    a0 += v0;
    a1 += v1;
    a2 += v2;
    a3 += v3;
  }
  const VU a = (a0 + a1) + (a2 + a3);
  uint32_t s = 0;
  for (int l = 0; l < 8; ++l) s += a[l];
  for (; i < bytes; ++i) s += p[i];
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Mode {
  const char* name;
  float temperature;
  int32_t top_k;
  float top_p;
};

struct Case {
  int64_t vocab;
  int32_t nodes;
  bool chain;
  Mode mode;
  atlas::DType dtype;
};

struct Buffers {
  std::vector<float> f32;       // [max_nodes, max_vocab]
  std::vector<uint16_t> bf16;   // [max_nodes, max_vocab]
  std::vector<uint8_t> workspace;
};

// Fills rows [0, nodes) and the tree. In a chain, node i + 1's token is
// boosted at row i so far above the rest (+40) that it is the argmax and has
// probability 1 - O(vocab e^-40) at any temperature used here: every draft is
// accepted.
void make_tree(const Case& c, SplitMix& rng, Buffers& buf, std::vector<int32_t>& tokens,
               std::vector<int32_t>& parents) {
  const int64_t v = c.vocab;
  tokens.assign(static_cast<size_t>(c.nodes), 0);
  parents.assign(static_cast<size_t>(c.nodes), -1);
  for (int32_t i = 1; i < c.nodes; ++i) {
    parents[i] = c.chain ? i - 1 : static_cast<int32_t>(rng.next() % static_cast<uint64_t>(i));
    tokens[i] = static_cast<int32_t>(rng.next() % static_cast<uint64_t>(v));
  }
  for (int32_t i = 0; i < c.nodes; ++i) {
    float* row = buf.f32.data() + static_cast<int64_t>(i) * v;
    for (int64_t j = 0; j < v; ++j) row[j] = 2.0f * rng.normal();
    if (c.chain && i + 1 < c.nodes) row[tokens[i + 1]] += 40.0f;
    uint16_t* brow = buf.bf16.data() + static_cast<int64_t>(i) * v;
    for (int64_t j = 0; j < v; ++j) brow[j] = atlas::float_to_bf16(row[j]);
  }
}

struct Result {
  double verify_us;  // medians
  double base_us;
  double verify_min_us;  // minima: on a shared machine the medians also carry preemptions
  double base_min_us;
  int32_t rows;
};

Result run_case(const Case& c, Buffers& buf, int repeats) {
  SplitMix rng{0x5eed0000ull + static_cast<uint64_t>(c.nodes) * 131 + static_cast<uint64_t>(c.vocab)};
  std::vector<int32_t> tokens, parents;
  make_tree(c, rng, buf, tokens, parents);
  const int64_t max_accept = c.nodes;
  std::vector<int32_t> accepted(static_cast<size_t>(max_accept) + 1), emitted(static_cast<size_t>(max_accept) + 1);
  int32_t num = 0;
  const int64_t offsets[2] = {0, c.nodes};
  atlas::SamplingParams sp;
  sp.temperature = c.mode.temperature;
  sp.top_k = c.mode.top_k;
  sp.top_p = c.mode.top_p;
  sp.seed = 1234;

  atlas::VerifyProblem p;
  p.logits = c.dtype == atlas::DType::kFloat32 ? static_cast<const void*>(buf.f32.data())
                                                 : static_cast<const void*>(buf.bf16.data());
  p.logits_dtype = c.dtype;
  p.vocab = c.vocab;
  p.logits_row_stride = c.vocab;
  p.tokens = tokens.data();
  p.parents = parents.data();
  p.tree_offsets = offsets;
  p.batch = 1;
  p.params = &sp;
  p.max_accept = max_accept;
  p.accepted_out = accepted.data();
  p.emitted_out = emitted.data();
  p.num_accepted_out = &num;
  p.workspace = buf.workspace.data();
  p.workspace_bytes = static_cast<int64_t>(buf.workspace.size());

  std::vector<double> tv, tb;
  const int warmup = 2;
  int32_t rows = 0;
  for (int r = 0; r < warmup + repeats; ++r) {
    sp.offset = static_cast<uint64_t>(r);
    const auto t0 = Clock::now();
    const atlas::Status st = atlas::verify(p);
    const auto t1 = Clock::now();
    if (!st.ok()) {
      std::fprintf(stderr, "verify failed: %s\n", st.message.c_str());
      std::exit(1);
    }
    // The rows the walk read: the root and each accepted node.
    rows = 1 + num;
    const int64_t row_bytes = c.vocab * atlas::dtype_size(c.dtype);
    const auto* base = static_cast<const uint8_t*>(p.logits);
    const auto t2 = Clock::now();
    uint32_t s = sum_words(base, row_bytes);
    for (int32_t i = 0; i < num; ++i) s += sum_words(base + accepted[i] * row_bytes, row_bytes);
    const auto t3 = Clock::now();
    g_sink = g_sink + s;
    if (r >= warmup) {
      tv.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      tb.push_back(std::chrono::duration<double, std::micro>(t3 - t2).count());
    }
  }
  if (c.chain && num != c.nodes - 1) {
    std::fprintf(stderr, "chain case accepted %d of %d drafts\n", num, c.nodes - 1);
    std::exit(1);
  }
  return {median(tv), median(tb), *std::min_element(tv.begin(), tv.end()),
          *std::min_element(tb.begin(), tb.end()), rows};
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
      return 2;
    }
  }
  const int repeats = quick ? 5 : 21;
  const std::vector<int64_t> vocabs = quick ? std::vector<int64_t>{49152} : std::vector<int64_t>{49152, 151936};
  const std::vector<int32_t> sizes = quick ? std::vector<int32_t>{1, 64} : std::vector<int32_t>{1, 4, 16, 64};
  const Mode modes[] = {
      {"greedy", 0.0f, 0, 1.0f},
      {"t0.8/k50/p0.9", 0.8f, 50, 0.9f},
      {"t1.0", 1.0f, 0, 1.0f},
  };
  const atlas::DType dtypes[] = {atlas::DType::kFloat32, atlas::DType::kBFloat16};

  Buffers buf;
  const int64_t max_vocab = *std::max_element(vocabs.begin(), vocabs.end());
  const int64_t max_nodes = *std::max_element(sizes.begin(), sizes.end());
  buf.f32.resize(static_cast<size_t>(max_vocab * max_nodes));
  buf.bf16.resize(static_cast<size_t>(max_vocab * max_nodes));
  buf.workspace.resize(static_cast<size_t>(atlas::verify_workspace_bytes(max_vocab)));

  std::printf("%-44s %5s %11s %11s %7s %9s\n", "case", "rows", "median us", "baseline us", "ratio",
              "min ratio");
  for (int64_t vocab : vocabs) {
    for (int32_t nodes : sizes) {
      for (int shape = 0; shape < 2; ++shape) {
        const bool chain = shape == 0;
        if (!chain && nodes == 1) continue;  // one node is the same tree either way
        for (const Mode& mode : modes) {
          for (atlas::DType dtype : dtypes) {
            const Case c{vocab, nodes, chain, mode, dtype};
            const Result r = run_case(c, buf, repeats);
            char name[128];
            std::snprintf(name, sizeof(name), "V=%lld n=%d %s %s %s", static_cast<long long>(vocab), nodes,
                          chain ? "chain" : "random", mode.name, atlas::dtype_name(dtype));
            std::printf("%-44s %5d %11.1f %11.1f %7.2f %9.2f\n", name, r.rows, r.verify_us, r.base_us,
                        r.verify_us / r.base_us, r.verify_min_us / r.base_min_us);
            std::fflush(stdout);
          }
        }
      }
    }
  }
  return 0;
}
