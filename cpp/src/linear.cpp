// Small-batch linear layers on the CPU (see atlas/linear.h for the layout, the
// numerics and the threads; atlas/pool.h for the worker threads).
//
// Three compilations of one kernel, written with GCC/Clang generic vectors
// (the code needs GCC or Clang): the baseline (the build's SSE4.2, 4-float
// vectors, 3 rows at a time), and where the CPU has them AVX2 + FMA (8-float
// vectors, 6 rows) or AVX-512 (16-float vectors, 12 rows of 32 registers). The
// last two run the same fused multiply-adds in the same order on every
// element, so they give the same bits; the baseline, without FMA, rounds
// each product. Measured on the development machine (Zen 4, SmolLM2's
// shapes, 2 threads), 8 rows of all 30 layers and the LM head: about 20 ms
// with AVX-512, 24 ms with AVX2, 26 ms with oneDNN's packed kernels.
#include "atlas/linear.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "atlas/cpu.h"
#include "atlas/pool.h"
#include "simd.h"

namespace atlas {

namespace {

typedef simd::Vec<4>::F F4;
typedef simd::Vec<8>::F F8;
typedef simd::Vec<16>::F F16;
using simd::Unaligned;

// How far ahead of the multiply-adds the weight stream is requested: 8 KiB,
// into the L2 cache (prefetcht1), not L1. Why: with 8-12 rows a panel line
// takes 8-12 multiply-adds, and the memory must keep pace with them on every
// core. Requests into L1 tie up its few miss buffers, and the stream fell
// behind: the weights' fetch and the arithmetic took turns instead of
// overlapping. Measured (2 threads, the 49152 x 576 LM head from DRAM, 12
// rows): 6.7 ms with L1 requests 4 KiB ahead, 4.1 ms with these; the whole
// SmolLM2-135M forward of a 12-node tree 38-43 ms -> 31-34 ms; one row
// unchanged (about 23 ms).
constexpr int64_t kAheadFloats = 2048;

// Rows that take more than one group: each panel runs in blocks of kBlockK
// values of k, every group over a block before the next block, so that the
// later groups read the block from the cache while the prefetches of the
// weight stream run ahead. (A whole panel per group left the memory idle
// while the later groups worked from the cache.) The accumulators wait in
// `acc` between blocks, which keeps each output's sum the same multiply-adds
// in the same order. Measured (SmolLM2-135M forwards at 300 tokens of
// context, 2 threads, both ways in one process, medians of 12, ms): 13 rows
// 31 against 36, 16 rows 37 against 42, 17 rows 38 against 45, 20 rows 45
// against 52; 24 rows (12 + 12) 53 either way; the same bits.
constexpr int64_t kBlockK = 128;
// At most this many rows run blocked (their accumulators on the stack); more
// (the model hands such products to oneDNN) run one group after another.
constexpr int64_t kBlockedMaxRows = 48;
// Panels a group runs at once, at most (see panels_impl).
constexpr int kMaxPanelsAtOnce = 4;

// A group of R rows runs over NP consecutive panels at once (panel stride
// `pstride` floats): each row's x[k] is broadcast once for all NP, and the R *
// NP * kVecs accumulators are as many independent chains of multiply-adds.
// Every output is one chain of multiply-adds over k in order whatever NP is,
// so NP does not change the bits.

// acc[q][r] += x[r, k] * W_q[., k] for k in [k0, k1), k ascending.
template <typename V, int R, int NP>
__attribute__((always_inline)) inline void np_steps(const float* __restrict x, int64_t ldx, int64_t k0, int64_t k1,
                                                    const float* __restrict panel, int64_t pstride,
                                                    V (&acc)[NP][R][kLinearPanel * sizeof(float) / sizeof(V)]) {
  typedef typename Unaligned<V>::type VL;
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(float));
  constexpr int kVecs = static_cast<int>(kLinearPanel) / kLanes;
  for (int64_t k = k0; k < k1; ++k) {
    V w[NP][kVecs];
    for (int q = 0; q < NP; ++q) {
      const float* wk = panel + q * pstride + k * kLinearPanel;
      __builtin_prefetch(wk + kAheadFloats, 0, 2);  // one cache line per k and panel
      for (int v = 0; v < kVecs; ++v) w[q][v] = *reinterpret_cast<const VL*>(wk + v * kLanes);
    }
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * ldx + k];
      for (int q = 0; q < NP; ++q)
        for (int v = 0; v < kVecs; ++v) acc[q][r][v] += xs * w[q][v];
    }
  }
}

// y[c] = out[c] (+ b[c]) for c < cols.
inline void store_row(const float* out, const float* b, float* y, int64_t cols) {
  if (b != nullptr) {
    for (int64_t c = 0; c < cols; ++c) y[c] = out[c] + b[c];
  } else {
    for (int64_t c = 0; c < cols; ++c) y[c] = out[c];
  }
}

// R rows against the NP panels at `panel`: y[r, c] for their columns, the
// last panel's first `cols_last` only.
template <typename V, int R, int NP>
__attribute__((always_inline)) inline void panel_rows(const float* __restrict x, int64_t ldx, int64_t k_len,
                                                      const float* __restrict panel, int64_t pstride,
                                                      const float* bias, float* __restrict y, int64_t ldy,
                                                      int64_t cols_last) {
  constexpr int kVecs = static_cast<int>(kLinearPanel * sizeof(float) / sizeof(V));
  V acc[NP][R][kVecs];
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) acc[q][r][v] = V{};
  np_steps<V, R, NP>(x, ldx, 0, k_len, panel, pstride, acc);
  for (int q = 0; q < NP; ++q) {
    for (int r = 0; r < R; ++r) {
      float out[kLinearPanel];
      std::memcpy(out, acc[q][r], sizeof(out));
      store_row(out, bias != nullptr ? bias + q * kLinearPanel : nullptr, y + r * ldy + q * kLinearPanel,
                q + 1 < NP ? kLinearPanel : cols_last);
    }
  }
}

// The same over k in [k0, k1), continuing the sums in acc_io: panel q's row r
// at acc_io + (q * kBlockedMaxRows + r) * kLinearPanel (started at 0 when
// k0 == 0).
template <typename V, int R, int NP>
__attribute__((always_inline)) inline void panel_rows_block(const float* __restrict x, int64_t ldx, int64_t k0,
                                                            int64_t k1, const float* __restrict panel,
                                                            int64_t pstride, float* __restrict acc_io) {
  typedef typename Unaligned<V>::type VL;
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(float));
  constexpr int kVecs = static_cast<int>(kLinearPanel) / kLanes;
  V acc[NP][R][kVecs];
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v)
        acc[q][r][v] = k0 == 0 ? V{}
                               : *reinterpret_cast<const VL*>(acc_io + (q * kBlockedMaxRows + r) * kLinearPanel +
                                                              v * kLanes);
  np_steps<V, R, NP>(x, ldx, k0, k1, panel, pstride, acc);
  for (int q = 0; q < NP; ++q)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v)
        *reinterpret_cast<VL*>(acc_io + (q * kBlockedMaxRows + r) * kLinearPanel + v * kLanes) = acc[q][r][v];
}

// The most panels a group of R rows runs at once: its accumulators within
// kChains vectors, kMaxPanels at most.
template <typename V, int R, int kChains, int kMaxPanels>
constexpr int panels_at_once() {
  constexpr int per_panel = R * static_cast<int>(kLinearPanel * sizeof(float) / sizeof(V));
  return kChains / per_panel >= kMaxPanels ? kMaxPanels : kChains / per_panel >= 1 ? kChains / per_panel : 1;
}

// `rows` (1 <= rows <= kRows) rows of one group over `take` panels (at most
// panels_at_once for `rows`): whole (k_len given, k1 < 0, the result in y),
// or over [k0, k1) (the sums in acc_io).
template <typename V, int kRows, int kChains, int kMaxPanels, int NP = panels_at_once<V, kRows, kChains, kMaxPanels>()>
__attribute__((always_inline)) inline void group_rows(int64_t rows, int64_t take, const float* x, int64_t ldx,
                                                      int64_t k0, int64_t k1, const float* panel, int64_t pstride,
                                                      const float* bias, float* y, int64_t ldy, int64_t cols_last,
                                                      float* acc_io) {
  if (rows == kRows && take == NP) {
    if (acc_io == nullptr) {
      panel_rows<V, kRows, NP>(x, ldx, k1, panel, pstride, bias, y, ldy, cols_last);
    } else {
      panel_rows_block<V, kRows, NP>(x, ldx, k0, k1, panel, pstride, acc_io);
    }
    return;
  }
  if (rows == kRows) {
    if constexpr (NP > 1)
      group_rows<V, kRows, kChains, kMaxPanels, NP - 1>(rows, take, x, ldx, k0, k1, panel, pstride, bias, y, ldy,
                                                        cols_last, acc_io);
    return;
  }
  if constexpr (kRows > 1)
    group_rows<V, kRows - 1, kChains, kMaxPanels>(rows, take, x, ldx, k0, k1, panel, pstride, bias, y, ldy,
                                                  cols_last, acc_io);
}

// Panels [p0, p1) for all rows, in groups of at most kRows rows (accumulators
// for kRows rows fill most of the vector registers) whose sizes differ by at
// most one: 13 rows run as 7 + 6, not 12 + 1 (measured before the groups ran
// blocked, 13 rows of SmolLM2-135M: 35 ms as 7 + 6, 38 ms as 12 + 1; not
// measured again since). Several groups run blocked (see kBlockK). Each group
// takes as many panels at once as the largest group's accumulators allow
// within kChains vectors, kMaxPanels at most.
template <typename V, int kRows, int kChains, int kMaxPanels>
__attribute__((always_inline)) inline void panels_impl(const float* x, int64_t rows, int64_t ldx, int64_t k_len,
                                                       const float* panels, int64_t n, const float* bias,
                                                       float* y, int64_t ldy, int64_t p0, int64_t p1) {
  constexpr int64_t kVecs = static_cast<int64_t>(kLinearPanel * sizeof(float) / sizeof(V));
  const int64_t groups = (rows + kRows - 1) / kRows;
  const bool blocked = groups > 1 && rows <= kBlockedMaxRows;
  const int64_t largest = (rows + groups - 1) / groups;
  const int64_t at_once = std::max<int64_t>(1, std::min<int64_t>(kMaxPanels, kChains / (largest * kVecs)));
  const int64_t pstride = k_len * kLinearPanel;
  alignas(64) float acc[kMaxPanels * kBlockedMaxRows * kLinearPanel];
  for (int64_t p = p0; p < p1;) {
    const int64_t take = std::min(at_once, p1 - p);
    const int64_t c0 = p * kLinearPanel;
    const float* panel = panels + p * pstride;
    const float* b = bias != nullptr ? bias + c0 : nullptr;
    const int64_t cols_last = std::min<int64_t>(kLinearPanel, n - c0 - (take - 1) * kLinearPanel);
    if (!blocked) {
      for (int64_t g = 0, r = 0; g < groups; ++g) {
        const int64_t m = rows / groups + (g < rows % groups ? 1 : 0);
        group_rows<V, kRows, kChains, kMaxPanels>(m, take, x + r * ldx, ldx, 0, k_len, panel, pstride, b,
                                                  y + r * ldy + c0, ldy, cols_last, nullptr);
        r += m;
      }
    } else {
      for (int64_t k0 = 0; k0 < k_len; k0 += kBlockK) {
        const int64_t k1 = std::min(k0 + kBlockK, k_len);
        for (int64_t g = 0, r = 0; g < groups; ++g) {
          const int64_t m = rows / groups + (g < rows % groups ? 1 : 0);
          group_rows<V, kRows, kChains, kMaxPanels>(m, take, x + r * ldx, ldx, k0, k1, panel, pstride, nullptr,
                                                    nullptr, 0, 0, acc + r * kLinearPanel);
          r += m;
        }
      }
      for (int64_t q = 0; q < take; ++q)
        for (int64_t r = 0; r < rows; ++r)
          store_row(acc + (q * kBlockedMaxRows + r) * kLinearPanel, b != nullptr ? b + q * kLinearPanel : nullptr,
                    y + r * ldy + c0 + q * kLinearPanel, q + 1 < take ? kLinearPanel : cols_last);
    }
    p += take;
  }
}

// Baseline: 4-float vectors, 4 per panel row; 3 rows = 12 of the 16 SSE registers.
void panels_baseline(const float* x, int64_t rows, int64_t ldx, int64_t k_len, const float* panels, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t p0, int64_t p1) {
  panels_impl<F4, 3, 12, 1>(x, rows, ldx, k_len, panels, n, bias, y, ldy, p0, p1);
}

#if ATLAS_X86_TARGETS
// Wide: 8-float vectors, 2 per panel row; 6 rows = 12 of the 16 AVX registers,
// the multiply-adds fused.
__attribute__((target("avx2,fma"))) void panels_wide(const float* x, int64_t rows, int64_t ldx, int64_t k_len,
                                                     const float* panels, int64_t n, const float* bias, float* y,
                                                     int64_t ldy, int64_t p0, int64_t p1) {
  panels_impl<F8, 6, 12, 1>(x, rows, ldx, k_len, panels, n, bias, y, ldy, p0, p1);
}

// AVX-512: one 16-float vector per panel row, 12 rows a group, up to four
// panels at once within 24 accumulators (4 panels up to 6 rows, 3 up to 8, 2
// up to 12). One panel at a time, a group of 8 rows had 8 chains and a load
// per multiply-add, and its products, not the memory, set the pace. Measured
// (SmolLM2-135M's matrices of one forward, 537 MB, streamed on 2 threads,
// alternated in one process, medians of 7; Intel Xeon with AVX-512), one
// panel at a time against several: 1 row 20.6 / 20.2 ms, 4 rows 21.0 / 21.3,
// 8 rows 24.9 / 22.6, 12 rows 28.6 / 25.5, 16 rows 31.4 / 28.7, 24 rows
// 39.1 / 34.6. (One panel at a time, groups of 8 and 16 measured the same
// over 1-32 rows; 24 spilled and ran 2x slower.)
__attribute__((target("avx512f"))) void panels_512(const float* x, int64_t rows, int64_t ldx, int64_t k_len,
                                                   const float* panels, int64_t n, const float* bias, float* y,
                                                   int64_t ldy, int64_t p0, int64_t p1) {
  panels_impl<F16, 12, 24, kMaxPanelsAtOnce>(x, rows, ldx, k_len, panels, n, bias, y, ldy, p0, p1);
}
#endif

struct Job {
  const float* x;
  int64_t rows, ldx, k_len;
  const float* panels;
  int64_t n;
  const float* bias;
  float* y;
  int64_t ldy, num_panels;
  bool wide, use_512;
};

void run_panels(const Job& j, int64_t p0, int64_t p1) {
#if ATLAS_X86_TARGETS
  if (j.use_512) {
    panels_512(j.x, j.rows, j.ldx, j.k_len, j.panels, j.n, j.bias, j.y, j.ldy, p0, p1);
    return;
  }
  if (j.wide) {
    panels_wide(j.x, j.rows, j.ldx, j.k_len, j.panels, j.n, j.bias, j.y, j.ldy, p0, p1);
    return;
  }
#endif
  panels_baseline(j.x, j.rows, j.ldx, j.k_len, j.panels, j.n, j.bias, j.y, j.ldy, p0, p1);
}

// Part i of `parts`: a contiguous range of the panels.
void run_part(const void* arg, int32_t i, int32_t parts) {
  const Job& j = *static_cast<const Job*>(arg);
  const int64_t p0 = j.num_panels * i / parts, p1 = j.num_panels * (i + 1) / parts;
  if (p0 < p1) run_panels(j, p0, p1);
}

}  // namespace

Status PackedLinear::init(const float* w, int64_t n, int64_t k, int64_t row_stride, bool allow_wide,
                         bool allow_512) {
  if (ready_) return Status::Invalid("the linear layer is already initialised");
  // Why 2^31: panel offsets are int64, but no layer needs more elements.
  if (n < 1 || k < 1 || n * k > (int64_t{1} << 31))
    return Status::Invalid("the weight must be [N, K] with N, K >= 1 and N * K <= 2^31, got [" +
                           std::to_string(n) + ", " + std::to_string(k) + "]");
  if (w == nullptr) return Status::Invalid("the weight is null");
  if (row_stride < k) return Status::Invalid("the weight's row stride must be >= K");
  const int64_t panels = (n + kLinearPanel - 1) / kLinearPanel;
  panels_.assign(static_cast<size_t>(panels * k * kLinearPanel), 0.0f);
  for (int64_t row = 0; row < n; ++row) {
    const float* src = w + row * row_stride;
    float* dst = panels_.data() + (row / kLinearPanel) * k * kLinearPanel + row % kLinearPanel;
    for (int64_t j = 0; j < k; ++j) dst[j * kLinearPanel] = src[j];
  }
  n_ = n;
  k_ = k;
  wide_ = allow_wide && cpu::has_avx2_fma();
  use_512_ = wide_ && allow_512 && cpu::has_avx512f();
  ready_ = true;
  return Status::Ok();
}

Status PackedLinear::forward(const float* x, int64_t rows, int64_t ldx, const float* bias, float* y, int64_t ldy,
                             int32_t threads) const {
  if (!ready_) return Status::Invalid("the linear layer is not initialised");
  if (rows < 0) return Status::Invalid("rows must be >= 0");
  if (ldx < k_ || ldy < n_) return Status::Invalid("the row strides of x and y must be >= K and >= N");
  if (threads < 1 || threads > kLinearMaxThreads)
    return Status::Invalid("threads must be in [1, " + std::to_string(kLinearMaxThreads) + "], got " +
                           std::to_string(threads));
  if (rows == 0) return Status::Ok();
  if (x == nullptr || y == nullptr) return Status::Invalid("x and y must not be null");
  const int64_t num_panels = (n_ + kLinearPanel - 1) / kLinearPanel;
  const int32_t parts = static_cast<int32_t>(std::min<int64_t>(threads, num_panels));
  const Job job{x, rows, ldx, k_, panels_.data(), n_, bias, y, ldy, num_panels, wide_, use_512_};
  parallel_parts(parts, run_part, &job);
  return Status::Ok();
}

}  // namespace atlas
