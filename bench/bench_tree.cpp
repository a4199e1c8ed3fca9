// Draft tree benchmark: building trees from candidate paths (with prefix
// merging) and flattening them for the target forward, at the node budgets a
// CPU (small) and a GPU (large) controller would pick. Baseline: writing the
// same flattened arrays with plain loops from precomputed parents, i.e. the
// cost of the output bytes alone.
#include <cstdio>
#include <random>
#include <vector>

#include "atlas/tree.h"
#include "bench_util.h"

int main(int argc, char** argv) {
  const bool quick = bench::has_flag(argc, argv, "--quick");
  if (bench::has_flag(argc, argv, "--help")) {
    std::printf("usage: bench_tree [--quick]\n  times DraftTree build (add_path) and flatten at 4..1024 nodes\n");
    return 0;
  }
  const int repeats = quick ? 51 : 501;
  std::printf("%-34s %12s %12s %8s\n", "case", "median_us", "baseline_us", "ratio");
  for (int nodes : {4, 16, 64, 256, 1024}) {
    // Candidate paths of depth 8 from a small alphabet, so that prefixes merge
    // as the proposals of several speculators do.
    std::mt19937 rng(nodes);
    std::uniform_int_distribution<int32_t> tok(0, 3);
    const int depth = 8;
    const int num_paths = nodes;  // more than enough to fill the budget
    std::vector<int32_t> paths(static_cast<size_t>(num_paths * depth));
    for (auto& t : paths) t = tok(rng);
    std::vector<float> conf(paths.size(), 0.5f);

    atlas::DraftTree tree;
    auto build = [&] {
      tree.init(1, nodes, 0);
      for (int p = 0; p < num_paths && tree.size() < nodes; ++p) {
        int32_t placed = 0, last = 0;
        tree.add_path(0, &paths[static_cast<size_t>(p * depth)], &conf[static_cast<size_t>(p * depth)], depth,
                      p % 3, &placed, &last);
      }
    };
    build();
    const int n = tree.size();
    std::vector<int32_t> tokens(n), parents(n), ref_parents(n), ref_tokens(n);
    std::vector<int64_t> positions(n), ref_depth(n);
    std::vector<uint8_t> mask(static_cast<size_t>(n) * n);
    for (int i = 0; i < n; ++i) {
      ref_parents[i] = tree.node(i).parent;
      ref_tokens[i] = tree.node(i).token;
    }

    // Baseline for build: copying the finished node arrays (what any tree
    // representation has to write).
    double base_build = bench::median_us([&] {
      for (int i = 0; i < n; ++i) {
        tokens[i] = ref_tokens[i];
        parents[i] = ref_parents[i];
      }
      bench::keep(tokens[n - 1]);
    }, repeats);
    double t_build = bench::median_us([&] { build(); bench::keep(tree); }, repeats);
    char name[64];
    std::snprintf(name, sizeof(name), "build %4d nodes (depth %d paths)", n, depth);
    std::printf("%-34s %12.2f %12.2f %8.2f\n", name, t_build, base_build, t_build / base_build);

    // Baseline for flatten: filling the mask with memset and a parent walk.
    double base_flat = bench::median_us([&] {
      std::memset(mask.data(), 0, mask.size());
      for (int i = 0; i < n; ++i) {
        positions[i] = 100;
        mask[static_cast<size_t>(i) * n + i] = 1;
      }
      bench::keep(mask[0]);
    }, repeats);
    double t_flat = bench::median_us([&] {
      tree.flatten(100, tokens.data(), positions.data(), parents.data(), mask.data());
      bench::keep(mask[0]);
    }, repeats);
    std::snprintf(name, sizeof(name), "flatten %4d nodes + mask", n);
    std::printf("%-34s %12.2f %12.2f %8.2f\n", name, t_flat, base_flat, t_flat / base_flat);
  }
  return 0;
}
