// Draft head benchmark: the native forward at SmolLM2-135M size (H = 576,
// vocabulary 49152, intermediate = H as the Python head defaults to) for draft
// vocabularies of 2048 and 8192 tokens and 1, 4, 8 and 64 nodes per call, on the
// SSE baseline path and, where the CPU has them, the AVX2 + FMA path and the
// AVX-512 bfloat16 dot-product path.
// Baseline: the time to move the head's weights through memory once (a memcpy
// of a buffer of the size a version stores: matrices in bfloat16, vectors in
// float32; measured in the same run: it reads them once and writes them once,
// so a forward of a few nodes, which only reads, can come in under it). The
// forwards repeat on the same weights, so they run with whatever of the
// weights the caches hold. A push (copy, round to bfloat16, validate, swap) is
// timed too: it runs off the hot path but bounds how often a learning loop may
// push.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "atlas/head.h"
#include "bench_util.h"

int main(int argc, char** argv) {
  if (bench::has_flag(argc, argv, "--help")) {
    std::printf("usage: bench_head [--quick]\n"
                "  times the draft head forward at H=576, Vd 2048/8192, B 1/4/8/64\n");
    return 0;
  }
  const bool quick = bench::has_flag(argc, argv, "--quick");
  const int repeats = quick ? 7 : 41;
  const int32_t H = 576, I = 576, vocab = 49152;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> embed(static_cast<size_t>(vocab) * H);
  for (auto& v : embed) v = normal(rng) * 0.05f;

  std::printf("%-30s %11s %11s %12s %11s %8s\n", "case", "median_us", "us/node", "weights_MiB", "base_us",
              "ratio");
  for (int32_t vd : {2048, 8192}) {
    atlas::HeadConfig c;
    c.hidden = H;
    c.intermediate = I;
    c.draft_vocab = vd;
    c.vocab = vocab;
    atlas::DraftHead head, avx2, baseline;
    if (!head.init(c, embed.data()).ok()) return 1;
    c.simd = atlas::HeadSimd::kAvx2;
    if (!avx2.init(c, embed.data()).ok()) return 1;
    c.simd = atlas::HeadSimd::kBaseline;
    if (!baseline.init(c, embed.data()).ok()) return 1;
    // Weights with the scale of a trained layer (1 / sqrt(fan_in)).
    const int64_t sizes[atlas::kNumHeadTensors][2] = {{H, 2 * H}, {H, 1}, {H, 1}, {I, H}, {I, H}, {H, I},
                                                      {H, 1}, {vd, H}};
    std::vector<std::vector<float>> store(atlas::kNumHeadTensors);
    atlas::HeadWeightsRef ref;
    for (int t = 0; t < atlas::kNumHeadTensors; ++t) {
      const int64_t n = sizes[t][0] * sizes[t][1];
      store[t].resize(static_cast<size_t>(n));
      const float scale = sizes[t][1] > 1 ? 1.0f / std::sqrt(static_cast<float>(sizes[t][1])) : 0.0f;
      for (auto& v : store[t]) v = sizes[t][1] > 1 ? normal(rng) * scale : 1.0f;
      ref.tensors[t].data = store[t].data();
      ref.tensors[t].ndim = sizes[t][1] > 1 ? 2 : 1;
      ref.tensors[t].shape[0] = sizes[t][0];
      ref.tensors[t].shape[1] = sizes[t][1] > 1 ? sizes[t][1] : 0;
    }
    std::vector<int32_t> ids(static_cast<size_t>(vd));
    for (int32_t j = 0; j < vd; ++j) ids[static_cast<size_t>(j)] = j * (vocab / vd);
    ref.draft_ids = ids.data();
    ref.num_draft_ids = vd;
    int64_t version = 0;
    double t_push = bench::median_us([&] {
      if (!head.push(ref, 0.0, &version).ok()) std::abort();
    }, quick ? 3 : 7, 1);
    if (!avx2.push(ref, 0.0, &version).ok() || !baseline.push(ref, 0.0, &version).ok()) return 1;

    // Memcpy rate on a buffer the size of the stored weights (about half the
    // pushed float32 tensors' size).
    const size_t bytes = static_cast<size_t>(head.snapshot()->bytes());
    std::vector<char> src(bytes, 1), dst(bytes, 0);
    double t_copy = bench::median_us([&] {
      std::memcpy(dst.data(), src.data(), bytes);
      bench::keep(dst[bytes / 2]);
    }, repeats);
    const double mib = static_cast<double>(bytes) / (1 << 20);
    char name[64];
    std::snprintf(name, sizeof(name), "push Vd=%d", vd);
    std::printf("%-30s %11.1f %11s %12.1f %11.1f %8.2f\n", name, t_push, "-", mib, t_copy, t_push / t_copy);

    std::vector<float> ws(static_cast<size_t>(head.workspace_floats()));
    std::vector<atlas::DraftHead*> paths = {&baseline};  // each path this CPU has, once
    for (atlas::DraftHead* h : {&avx2, &head})
      if (std::strcmp(h->simd_path(), paths.back()->simd_path()) != 0) paths.push_back(h);
    for (atlas::DraftHead* h : paths) {
      auto w = h->snapshot();
      for (int B : {1, 4, 8, 64}) {
        std::vector<float> feats(static_cast<size_t>(B) * H), f_hat(feats.size());
        std::vector<float> logits(static_cast<size_t>(B) * vd);
        std::vector<int32_t> tokens(static_cast<size_t>(B));
        for (auto& v : feats) v = normal(rng);
        for (int b = 0; b < B; ++b) tokens[static_cast<size_t>(b)] = static_cast<int32_t>(rng() % vocab);
        double t = bench::median_us([&] {
          if (!h->forward(w.get(), feats.data(), H, tokens.data(), B, f_hat.data(), logits.data(), ws.data(),
                          static_cast<int64_t>(ws.size())).ok())
            std::abort();
          bench::keep(logits[0]);
        }, repeats);
        std::snprintf(name, sizeof(name), "forward %s Vd=%d B=%d", h->simd_path(), vd, B);
        std::printf("%-30s %11.1f %11.1f %12.1f %11.1f %8.2f\n", name, t, t / B, mib, t_copy, t / t_copy);
      }
    }
  }
  return 0;
}
