// atlas/linear.h: the target's linear layers for the few rows of a decode or
// draft-tree forward on the CPU: y = x W^T (+ bias) for x [rows, K], W [N, K].
//
// Why: with a handful of rows a linear layer is a stream of its weights, and
// the library kernels do not keep up with the memory there. Measured on the
// 2-core development machine (Zen 4, SmolLM2-135M's shapes, weights from
// DRAM, 2 threads, microseconds), this code against oneDNN's packed kernels:
// the 576 x 960 QKV matrix at 3 rows 71 / 96 and at 8 rows 82 / 112; the
// 49152 x 576 LM head at 3 rows 3.8 / 4.3 ms and at 8 rows 4.2 / 5.1 ms.
// The whole SmolLM2-135M forward at 16, 24 and 32 rows: 38, 51 and 64 ms
// against 47, 61 and 75 with oneDNN; the model uses oneDNN from 33 rows.
//
// Layout: PackedLinear::init copies W into panels of kLinearPanel output
// columns: panel p holds, for k = 0..K-1, W[p * 16 + l][k] for l = 0..15 side
// by side (zero past N). A panel is streamed front to back once; rows that
// take several groups (more than a group's accumulators fit in the
// registers) go over it block by block of k, each block from the cache after
// the first group. The inner loop is a multiply-add of one x value into 16
// columns of accumulators held in registers (with AVX-512, into those of up
// to four panels at once, which share each broadcast of x).
//
// Numerics: every output is 0 + x[r, 0] W[n, 0] + x[r, 1] W[n, 1] + ..., in
// ascending k, one multiply-add at a time (fused where the CPU has FMA), then
// + bias[n]. A row's result depends neither on the other rows nor on the
// number of threads, so the same token gets the same logits in a one-node and
// a twelve-node forward.
//
// Threads: forward() splits the panels into `threads` contiguous ranges; the
// calling thread runs the first and the persistent workers of atlas/pool.h
// the others.
#pragma once

#include <cstdint>
#include <vector>

#include "atlas/common.h"
#include "atlas/pool.h"

namespace atlas {

constexpr int64_t kLinearPanel = 16;
constexpr int64_t kLinearMaxThreads = kPoolMaxThreads;

class PackedLinear {
 public:
  // Copies w [n, k] (row stride `row_stride` floats, >= k) into panels.
  // allow_wide = false keeps to the baseline kernel; allow_512 = false to the
  // AVX2 + FMA one where the CPU has AVX-512 (tests compare them: AVX2 and
  // AVX-512 give the same bits).
  Status init(const float* w, int64_t n, int64_t k, int64_t row_stride, bool allow_wide = true,
              bool allow_512 = true);

  // y[r, :] = x[r, :] W^T (+ bias) for r < rows. x rows are `ldx` floats apart
  // (>= K), y rows `ldy` (>= N); bias is null or N floats. threads in
  // [1, kLinearMaxThreads]. Does not allocate after the first call with a
  // given thread count (the pool grows once).
  Status forward(const float* x, int64_t rows, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int32_t threads) const;

  int64_t out_features() const { return n_; }
  int64_t in_features() const { return k_; }
  bool ready() const { return ready_; }
  // Whether forward() runs a fused multiply-add kernel (AVX2 + FMA, or
  // AVX-512 where the CPU has it; else the SSE baseline).
  bool wide() const { return wide_; }

 private:
  int64_t n_ = 0, k_ = 0;
  bool ready_ = false;
  bool wide_ = false;
  bool use_512_ = false;
  std::vector<float> panels_;
};

}  // namespace atlas
