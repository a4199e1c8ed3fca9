// Suffix speculator benchmark: propose (per request per step) and extend (per
// committed token) with a full corpus of repetitive synthetic text (phrases
// drawn from a phrase book with a power law, a little noise) and of random
// text (no structure: chains are short, drafts rare). Baselines measured in
// the same run: for propose, initialising the tree and copying the proposed
// tree's arrays (the cost of the output alone); for extend, appending the token
// to a vector plus one unordered_map insert of its 4-gram hash (a plain
// hashed n-gram index).
#include <cstdio>
#include <random>
#include <unordered_map>
#include <vector>

#include "atlas/suffix.h"
#include "atlas/tree.h"
#include "bench_util.h"

namespace {

constexpr int32_t kVocab = 32000;

struct TextGen {
  bool repetitive;
  std::mt19937_64 rng;
  std::vector<std::vector<int32_t>> phrases;
  std::vector<double> cdf;

  TextGen(bool rep, uint64_t seed) : repetitive(rep), rng(seed) {
    if (!rep) return;
    std::uniform_int_distribution<int32_t> tok(0, kVocab - 1), len(4, 24);
    const int num = 4000;
    double acc = 0;
    for (int i = 0; i < num; ++i) {
      std::vector<int32_t> p(static_cast<size_t>(len(rng)));
      for (auto& t : p) t = tok(rng);
      phrases.push_back(std::move(p));
      acc += 1.0 / (i + 1);  // Zipf: a few phrases are very common
      cdf.push_back(acc);
    }
    for (auto& c : cdf) c /= acc;
  }

  std::vector<int32_t> doc(size_t n) {
    std::vector<int32_t> out;
    out.reserve(n + 32);
    std::uniform_int_distribution<int32_t> tok(0, kVocab - 1);
    std::uniform_real_distribution<double> u(0, 1);
    while (out.size() < n) {
      if (!repetitive || u(rng) < 0.05) {
        out.push_back(tok(rng));
        continue;
      }
      const size_t i = static_cast<size_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
      const auto& p = phrases[std::min(i, phrases.size() - 1)];
      out.insert(out.end(), p.begin(), p.end());
    }
    out.resize(n);
    return out;
  }
};

void check(const atlas::Status& st) {
  if (!st.ok()) {
    std::fprintf(stderr, "error: %s\n", st.message.c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = bench::has_flag(argc, argv, "--quick");
  if (bench::has_flag(argc, argv, "--help")) {
    std::printf("usage: bench_suffix [--quick]\n  times SuffixSpeculator propose/extend over a "
                "1M-token corpus (--quick: 200k)\n");
    return 0;
  }
  const int64_t corpus_tokens = quick ? 200000 : 1000000;
  const int repeats = quick ? 201 : 2001;
  const int num_requests = 64;
  std::printf("corpus %lld tokens, defaults (max_match 32, max_depth 16, max_occurrences 64)\n",
              static_cast<long long>(corpus_tokens));
  std::printf("%-40s %12s %12s %8s\n", "case", "median_us", "baseline_us", "ratio");
  for (bool repetitive : {true, false}) {
    const char* kind = repetitive ? "repetitive" : "random";
    TextGen gen(repetitive, repetitive ? 1 : 2);
    atlas::SuffixConfig cfg;
    cfg.max_corpus_tokens = corpus_tokens + corpus_tokens / 200 + 16;  // + separators
    atlas::SuffixSpeculator spec;
    check(spec.init(cfg));
    std::vector<std::vector<int32_t>> docs;
    int64_t filled = 0;
    while (filled < corpus_tokens) {
      docs.push_back(gen.doc(200 + static_cast<size_t>(gen.rng() % 400)));
      filled += static_cast<int64_t>(docs.back().size());
    }
    auto t0 = std::chrono::steady_clock::now();
    for (const auto& d : docs) check(spec.add_document(d.data(), static_cast<int64_t>(d.size())));
    const double fill_ns =
        std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / filled;

    // Live requests: a 256-token prompt each, then proposals round-robin.
    std::vector<std::vector<int32_t>> prompts;
    for (int r = 0; r < num_requests; ++r) {
      prompts.push_back(gen.doc(256));
      check(spec.start(r, prompts.back().data(), 256));
    }
    for (int budget : {8, 64}) {
      atlas::DraftTree tree;
      int r = 0;
      int64_t nodes = 0, calls = 0;
      const double t = bench::median_us([&] {
        check(tree.init(prompts[static_cast<size_t>(r)].back(), budget, 0));
        int32_t added = 0;
        check(spec.propose(r, &tree, 0, -1, &added));
        nodes += added;
        ++calls;
        r = (r + 1) % num_requests;
      }, repeats);
      // Baseline: the same tree's arrays written out (what any speculator
      // producing this tree has to write).
      std::vector<int32_t> tok(static_cast<size_t>(budget)), par(static_cast<size_t>(budget));
      std::vector<float> conf(static_cast<size_t>(budget));
      const int n = tree.size();
      const double base = bench::median_us([&] {
        atlas::DraftTree t2;
        t2.init(tree.node(0).token, budget, 0);
        for (int i = 0; i < n; ++i) {
          tok[static_cast<size_t>(i)] = tree.node(i).token;
          par[static_cast<size_t>(i)] = tree.node(i).parent;
          conf[static_cast<size_t>(i)] = tree.node(i).confidence;
        }
        bench::keep(t2);
        bench::keep(tok[0]);
      }, repeats);
      char name[96];
      std::snprintf(name, sizeof(name), "propose %s budget %d (%.1f nodes)", kind, budget,
                    static_cast<double>(nodes) / static_cast<double>(calls));
      std::printf("%-40s %12.3f %12.3f %8.2f\n", name, t, base, t / base);
    }

    // extend: 64 single-token calls per timing, as the engine commits a few
    // tokens per step; reported per token.
    const int batch = 64;
    std::vector<int32_t> stream = gen.doc(static_cast<size_t>((repeats + 8) * batch));
    size_t at = 0;
    const double t_ext = bench::median_us([&] {
      for (int i = 0; i < batch; ++i) {
        check(spec.extend(0, &stream[at % stream.size()], 1));
        ++at;
      }
    }, repeats) / batch;
    std::vector<int32_t> plain;
    plain.reserve(stream.size() + 16);
    std::unordered_map<uint64_t, uint32_t> grams;
    grams.reserve(stream.size() * 2);
    size_t at2 = 0;
    const double t_base = bench::median_us([&] {
      for (int i = 0; i < batch; ++i) {
        plain.push_back(stream[at2 % stream.size()]);
        ++at2;
        const size_t m = plain.size();
        uint64_t h = 0;
        for (size_t k = m >= 4 ? m - 4 : 0; k < m; ++k)
          h = (h ^ static_cast<uint32_t>(plain[k])) * 0x100000001b3ull;
        grams[h] = static_cast<uint32_t>(m);
      }
    }, repeats) / batch;
    char name[96];
    std::snprintf(name, sizeof(name), "extend %s (per token)", kind);
    std::printf("%-40s %12.4f %12.4f %8.2f\n", name, t_ext, t_base, t_ext / t_base);

    // finish: a 400-token output moved into the full corpus (evicting the oldest).
    std::vector<int32_t> out = gen.doc(400);
    int rid = 1000;
    const double t_fin = bench::median_us([&] {
      check(spec.start(rid, out.data(), 1));
      check(spec.extend(rid, out.data() + 1, 399));
      check(spec.finish(rid));
      ++rid;
    }, quick ? 51 : 201);
    std::snprintf(name, sizeof(name), "start+extend+finish %s 400 tok", kind);
    std::printf("%-40s %12.3f %12s %8s\n", name, t_fin, "-", "-");
    std::printf("%-40s %12.1f ns/token to fill; memory %.1f MB\n", kind, fill_ns,
                static_cast<double>(spec.memory_bytes()) / (1 << 20));
  }
  return 0;
}
