// Draft head: the native forward of the learned speculator and its versioned
// weights (see atlas/head.h for the module and the versioning rules).
//
// Layout. push() repacks every weight matrix W [N, K] (torch layout, N outputs)
// into panels of kHeadPanel output columns, in bfloat16: each value is the
// pushed float32 rounded to nearest even, and two of them share a 32-bit word.
// Panel p is ceil(K / 2) rows of kHeadPanel words; word l of row j holds
// W[p * kHeadPanel + l][2j] in its upper 16 bits and W[p * kHeadPanel + l][2j + 1]
// in its lower 16 bits (zero past K, and zero-padded past N). Half the bytes of
// float32, which is what the forward costs when its weights come from memory:
// between drafting steps the target's forward evicts them from the caches.
// Biases and norm vectors stay float32. A GEMM streams each panel once per row
// tile, front to back.
//
// Numerics. The inputs of every matrix product are bfloat16 too: forward()
// rounds each row it multiplies (the feature and the token's embedding, the
// normed activations, the gated product, f_hat) to the nearest bfloat16 (ties
// to even) just before the product; f_hat itself is returned unrounded, and the
// rest (biases, residual, norms, SiLU) stays float32. A product of two bfloat16
// values is exact in float32 (8-bit significands), so each output is a chain
// of exact products added to a float32 accumulator in k order (k, then
// k + 1, ...), each addition rounded once, and a row's result does not depend
// on the other rows of the batch. Every path below computes exactly that, so
// all give the same bits: the forward computes, in float32, the float32 head
// whose matrices and matrix inputs are bfloat16-rounded
// (atlas.learning.head.round_to_bf16 is that rounding in Python, and
// DraftHead.forward_native the twin). Exception: vdpbf16ps reads a bfloat16
// subnormal (magnitude below 2^-126) as zero and flushes a subnormal sum to
// zero, values trained weights and activations do not hold.
//
// Three compilations of the GEMM, chosen once by init() (see HeadSimd):
// * the baseline (the build's SSE4.2): widens the weights to float32 in
//   registers, exactly (a bfloat16 zero-extended to 32 bits and shifted left
//   by 16 is its float: `word & 0xffff0000` for a word's upper value,
//   `word << 16` for its lower one), and multiplies and adds them (the
//   product is exact, so the add is its only rounding);
// * AVX2 + FMA: the same with 8-float vectors and fused multiply-adds;
// * AVX-512 BF16 (vdpbf16ps on 256-bit vectors): the rows' inputs packed as
//   pairs of bfloat16 in the weights' word layout, one instruction per word
//   vector and row adds both products of a pair, upper (k) first, each
//   rounded once. Twice the multiply-adds per instruction of FMA and no
//   widening. Measured on this project's 2-core AMD EPYC (Zen 4): 109
//   against 58 GMAC/s at peak (a loop on registers alone); SmolLM2's static
//   head (H 576, Vd 4096), 4 rows with its weights in the caches, as in a
//   drafting step's later depths: 0.35 ms against 0.54 with AVX2 + FMA
//   (8 rows: 0.52 against 1.07). With the weights in memory (a step's first
//   depth, after the target's forward) both wait on memory: about 0.75 ms.
// The code needs GCC or Clang (generic vectors, function targets).
#include "atlas/head.h"

#include "atlas/cpu.h"
#include "atlas/layer_ops.h"
#include "atlas/pool.h"
#include "atlas/verify.h"
#include "simd.h"

#if ATLAS_X86_TARGETS
#include <immintrin.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <system_error>
#include <thread>
#include <utility>

namespace atlas {

namespace {

// The smallest float32 magnitude that rounds to infinity in bfloat16: halfway
// between the largest finite bfloat16 (0x1.fep127) and 2^128.
constexpr float kBf16Overflow = 0x1.ffp127f;

constexpr const char* kNames[kNumHeadTensors] = {"w_in", "b_in", "norm1", "w_gate", "w_up",
                                                 "w_down", "norm2", "w_out"};

struct Shape {
  int32_t ndim;
  int64_t d0, d1;
  const char* text;  // the symbolic shape, for messages
};

Shape expected_shape(const HeadConfig& c, int32_t t) {
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  switch (t) {
    case kHeadWIn: return {2, H, 2 * H, "(H, 2H)"};
    case kHeadWGate: return {2, I, H, "(I, H)"};
    case kHeadWUp: return {2, I, H, "(I, H)"};
    case kHeadWDown: return {2, H, I, "(H, I)"};
    case kHeadWOut: return {2, V, H, "(Vd, H)"};
    default: return {1, H, 1, "(H,)"};  // b_in, norm1, norm2
  }
}

std::string shape_text(int32_t ndim, int64_t d0, int64_t d1) {
  if (ndim == 1) return "(" + std::to_string(d0) + ",)";
  return "(" + std::to_string(d0) + ", " + std::to_string(d1) + ")";
}

std::string shape_text(const HeadTensorRef& r) {
  if (r.ndim == 1) return shape_text(1, r.shape[0], 0);
  if (r.ndim == 2) return shape_text(2, r.shape[0], r.shape[1]);
  return std::to_string(r.ndim) + "-D";
}

// Formats a float for messages: %g, so that 3.4e+38 does not print as 39 digits.
std::string float_text(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  return buf;
}

// Words per panel of a matrix with k inputs: one per column and pair of k.
inline int64_t panel_words(int64_t k) { return (k + 1) / 2 * kHeadPanel; }

// Copies W [n, k] into bfloat16 panels (see the top of this file), rounding
// each value to nearest even; fails on the first value that is not finite or
// that is too large for bfloat16 (it would round to infinity).
Status pack_panels(const char* name, const float* w, int64_t n, int64_t k, std::vector<uint32_t>* out) {
  const int64_t panels = (n + kHeadPanel - 1) / kHeadPanel;
  out->assign(static_cast<size_t>(panels * panel_words(k)), 0u);
  uint32_t* dst = out->data();
  for (int64_t row = 0; row < n; ++row) {
    const float* src = w + row * k;
    uint32_t* panel = dst + (row / kHeadPanel) * panel_words(k) + row % kHeadPanel;
    for (int64_t j = 0; j < k; ++j) {
      const float v = src[j];
      if (!std::isfinite(v))
        return Status::Invalid(std::string(name) + " holds a non-finite value (" + std::to_string(v) +
                               ") at [" + std::to_string(row) + ", " + std::to_string(j) + "]");
      const uint32_t b = float_to_bf16(v);
      if ((b & 0x7fffu) == 0x7f80u)
        return Status::Invalid(std::string(name) + " holds a value too large for bfloat16 (" + float_text(v) +
                               ") at [" + std::to_string(row) + ", " + std::to_string(j) +
                               "]: the native head stores its matrices in bfloat16, whose values round to "
                               "infinity from magnitude " + float_text(kBf16Overflow) + " up");
      panel[j / 2 * kHeadPanel] |= j % 2 == 0 ? b << 16 : b;
    }
  }
  return Status::Ok();
}

// The inverse of pack_panels for rows < n, widened to float32: out [n, k].
void unpack_panels(const std::vector<uint32_t>& panels, int64_t n, int64_t k, float* out) {
  for (int64_t row = 0; row < n; ++row) {
    const uint32_t* panel = panels.data() + (row / kHeadPanel) * panel_words(k) + row % kHeadPanel;
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t word = panel[j / 2 * kHeadPanel];
      out[row * k + j] = bf16_to_float(static_cast<uint16_t>(j % 2 == 0 ? word >> 16 : word & 0xffffu));
    }
  }
}

Status copy_vector(const char* name, const float* w, int64_t n, std::vector<float>* out) {
  out->assign(w, w + n);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(w[i]))
      return Status::Invalid(std::string(name) + " holds a non-finite value (" + std::to_string(w[i]) +
                             ") at [" + std::to_string(i) + "]");
  return Status::Ok();
}

// The GEMM is written with generic vectors (simd.h) rather than plain loops
// because GCC's loop vectoriser otherwise picks the k loop below (an in-order
// float reduction: transposes and scalar adds, 4x slower) instead of the
// panel's columns. The SSE path keeps to 4-float vectors: without AVX, GCC
// lowers 8-float vectors through memory (3x slower, measured).
typedef simd::Vec<4>::F Vec4;
typedef simd::Vec<8>::F Vec8;
using simd::Unaligned;
using simd::UintsOf;

// Prefetch distance of the weight stream, in panel words: 2 KiB, about the
// bytes that arrive from memory while one 8-row group computes on 2 KiB of a
// panel.
constexpr int64_t kPrefetchWords = 512;

// *out = W[., k] for the kLanes columns of one panel vector whose words are
// at p (see panel_kernel): the upper halves of the words when k is even, the
// lower halves when it is odd, as floats. (An out parameter rather than a
// return value: a function returning an AVX vector has a different ABI with
// and without AVX, which GCC warns about.)
template <typename V, bool kUpper>
__attribute__((always_inline)) inline void widen(const uint32_t* p, V* out) {
  typedef UintsOf<V> U;
  const U words = *reinterpret_cast<const typename Unaligned<U>::type*>(p);
  // Vector casts between vectors of one size reinterpret the bits.
  *out = kUpper ? (V)(words & (U{} + 0xffff0000u)) : (V)(words << 16);
}

// acc[r][q][v] += x[r * ldx + k] * W[., k] for the R rows and the NP panels
// whose words for k are at words + q * stride (kUpper: k is even). Two loop
// orders, whichever keeps fewer values live beside the R * NP * kVecs
// accumulators, so that none spill to the stack (a spilled accumulator puts a
// store and a load in its chain of multiply-adds: 2x slower on 4 rows,
// measured): the panel vectors widened first and each row's x broadcast in
// turn (NP * kVecs live vectors), or each row's x broadcast first and each
// panel vector widened in turn (R live broadcasts).
template <typename V, int R, int NP, int kVecs, bool kUpper>
__attribute__((always_inline)) inline void accumulate_k(const float* __restrict x, int64_t ldx, int64_t k,
                                                        const uint32_t* __restrict words, int64_t stride,
                                                        V (&acc)[R][NP][kVecs]) {
  constexpr int kLanes = kHeadPanel / kVecs;
  if constexpr (NP * kVecs <= R) {
    V w[NP][kVecs];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < kVecs; ++v) widen<V, kUpper>(words + q * stride + v * kLanes, &w[q][v]);
    for (int r = 0; r < R; ++r) {
      const float xs = x[r * ldx + k];
      for (int q = 0; q < NP; ++q)
        for (int v = 0; v < kVecs; ++v) acc[r][q][v] += xs * w[q][v];
    }
  } else {
    float xs[R];
    for (int r = 0; r < R; ++r) xs[r] = x[r * ldx + k];
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < kVecs; ++v) {
        V w;
        widen<V, kUpper>(words + q * stride + v * kLanes, &w);
        for (int r = 0; r < R; ++r) acc[r][q][v] += xs[r] * w;
      }
  }
}

// For NP consecutive panels starting at `panel` (panel stride
// panel_words(k_len)) and R rows of x: y[r, c] = sum_k x[r * ldx + k] * W[c, k]
// (+ bias[c] when bias is not null) for c < cols, the columns of those panels,
// the sum in k order in float32. Each (row, panel) pair has its own
// accumulators, so NP > 1 gives a single row several independent chains of
// multiply-adds: with one chain the loop waits on the add latency instead of
// on memory. V is Vec4 or Vec8; a panel row is kHeadPanel / lanes vectors.
//
// Widening: a vector of words holds, per column, W[c, k] in the upper half
// and W[c, k + 1] in the lower half (k even), so `words & 0xffff0000` is
// W[., k] as floats and `words << 16` is W[., k + 1]: one integer operation
// per vector, which runs beside the multiply-adds. Why not 16-bit values in
// column order widened with __builtin_convertvector: GCC 12 compiles that to
// two 128-bit zero-extensions, a shift and an insert per 8 columns, shuffle
// work that made one row 2x slower with the weights in the caches (measured).
template <typename V, int R, int NP>
__attribute__((always_inline)) inline void panel_kernel(const float* __restrict x, int64_t ldx, int64_t k_len,
                                                        const uint32_t* __restrict panel, const float* bias,
                                                        float* __restrict y, int64_t ldy, int64_t cols) {
  constexpr int kLanes = static_cast<int>(sizeof(V) / sizeof(float));
  constexpr int kVecs = kHeadPanel / kLanes;
  static_assert(kVecs * kLanes == kHeadPanel, "a panel is a whole number of vectors");
  const int64_t stride = panel_words(k_len);
  V acc[R][NP][kVecs];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q)
      for (int v = 0; v < kVecs; ++v) acc[r][q][v] = V{};
  const int64_t pairs = k_len / 2;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    // The weights stream from memory (they do not fit the caches, and each
    // forward reads them once): ask for them kPrefetchWords ahead, which runs
    // past a panel's end into the next one. A 64-byte line holds two pairs.
    if ((kp & 1) == 0)
      for (int q = 0; q < NP; ++q) __builtin_prefetch(panel + q * stride + kp * kHeadPanel + kPrefetchWords);
    const uint32_t* words = panel + kp * kHeadPanel;
    accumulate_k<V, R, NP, kVecs, true>(x, ldx, 2 * kp, words, stride, acc);
    accumulate_k<V, R, NP, kVecs, false>(x, ldx, 2 * kp + 1, words, stride, acc);
  }
  if (k_len % 2 != 0)  // the last k, alone in the upper halves of its words
    accumulate_k<V, R, NP, kVecs, true>(x, ldx, k_len - 1, panel + pairs * kHeadPanel, stride, acc);
  for (int r = 0; r < R; ++r) {
    float out[NP * kHeadPanel];
    for (int q = 0; q < NP; ++q) std::memcpy(out + q * kHeadPanel, acc[r][q], kHeadPanel * sizeof(float));
    float* yr = y + r * ldy;
    if (bias != nullptr) {
      for (int64_t c = 0; c < cols; ++c) yr[c] = out[c] + bias[c];
    } else {
      for (int64_t c = 0; c < cols; ++c) yr[c] = out[c];
    }
  }
}

// y[r, j] = bias[j] (0 when bias is null) + sum_k x[r, k] * W[j, k] for r < rows,
// j < n, with W packed in panels. x and y are row-major with strides ldx, ldy.
// Rows go in groups of kRows (kRows rows of accumulators fill about half the
// vector registers), one panel at a time: the panel stays in the L1/L2 cache
// while every group passes over it, so the weights are read from memory once
// per call. The L < kRows rows left over go in one more group that covers
// kRows / L panels at once, so that it has as many accumulators as a full
// group (see panel_kernel), while those panels are still in the cache.
template <typename V, int kRows, int L>
__attribute__((always_inline)) inline void gemm_panels_rows(const float* __restrict x, int64_t ldx,
                                                            int64_t rows, int64_t k_len, const uint32_t* panels,
                                                            int64_t n, const float* bias, float* __restrict y,
                                                            int64_t ldy) {
  constexpr int NP = L == 0 ? 1 : (kRows / L > 1 ? kRows / L : 1);
  const int64_t num_panels = (n + kHeadPanel - 1) / kHeadPanel;
  const int64_t full = rows - L;
  const float* xl = x + full * ldx;
  for (int64_t p0 = 0; p0 < num_panels; p0 += NP) {
    const int64_t np = std::min<int64_t>(NP, num_panels - p0);
    for (int64_t p = p0; p < p0 + np; ++p) {
      const uint32_t* panel = panels + p * panel_words(k_len);
      const int64_t col0 = p * kHeadPanel;
      const int64_t cols = std::min<int64_t>(kHeadPanel, n - col0);
      const float* b = bias ? bias + col0 : nullptr;
      for (int64_t r0 = 0; r0 < full; r0 += kRows)
        panel_kernel<V, kRows, 1>(x + r0 * ldx, ldx, k_len, panel, b, y + r0 * ldy + col0, ldy, cols);
      if (L > 0 && np < NP)  // the last few panels: one at a time
        panel_kernel<V, (L > 0 ? L : 1), 1>(xl, ldx, k_len, panel, b, y + full * ldy + col0, ldy, cols);
    }
    if (L > 0 && np == NP) {
      const int64_t col0 = p0 * kHeadPanel;
      panel_kernel<V, (L > 0 ? L : 1), NP>(xl, ldx, k_len, panels + p0 * panel_words(k_len),
                                           bias ? bias + col0 : nullptr, y + full * ldy + col0, ldy,
                                           std::min<int64_t>(NP * kHeadPanel, n - col0));
    }
  }
}

template <typename V, int kRows>
__attribute__((always_inline)) inline void gemm_panels_impl(const float* x, int64_t ldx, int64_t rows,
                                                            int64_t k_len, const uint32_t* panels, int64_t n,
                                                            const float* bias, float* y, int64_t ldy) {
  static_assert(kRows == 4 || kRows == 8, "row groups of 4 or 8");
  switch (rows % kRows) {
    case 0: gemm_panels_rows<V, kRows, 0>(x, ldx, rows, k_len, panels, n, bias, y, ldy); break;
    case 1: gemm_panels_rows<V, kRows, 1>(x, ldx, rows, k_len, panels, n, bias, y, ldy); break;
    case 2: gemm_panels_rows<V, kRows, 2>(x, ldx, rows, k_len, panels, n, bias, y, ldy); break;
    case 3: gemm_panels_rows<V, kRows, 3>(x, ldx, rows, k_len, panels, n, bias, y, ldy); break;
    case 4:
      gemm_panels_rows<V, kRows, (kRows > 4 ? 4 : 1)>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
      break;
    case 5:
      gemm_panels_rows<V, kRows, (kRows > 5 ? 5 : 1)>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
      break;
    case 6:
      gemm_panels_rows<V, kRows, (kRows > 6 ? 6 : 1)>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
      break;
    default:
      gemm_panels_rows<V, kRows, (kRows > 7 ? 7 : 1)>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
      break;
  }
}

// Baseline path: SSE (the build's -msse4.2), 4 rows x 2 Vec4 = 8 accumulators of
// the 16 SSE registers.
void gemm_panels_baseline(const float* x, int64_t ldx, int64_t rows, int64_t k_len, const uint32_t* panels,
                          int64_t n, const float* bias, float* y, int64_t ldy) {
  gemm_panels_impl<Vec4, 4>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
}

#if ATLAS_X86_TARGETS
// Wide path, chosen at run time on CPUs with AVX2 and FMA (every x86-64 CPU
// since 2013-2015): 8 rows x 1 Vec8 = 8 of the 16 AVX registers, and the
// multiply-adds fuse. Twice the baseline's speed when the forward is
// compute-bound (8 or more rows), measured. The wheel stays portable: only
// this function is compiled for AVX2, and only a CPU that has it runs it.
__attribute__((target("avx2,fma"))) void gemm_panels_wide(const float* x, int64_t ldx, int64_t rows,
                                                          int64_t k_len, const uint32_t* panels, int64_t n,
                                                          const float* bias, float* y, int64_t ldy) {
  gemm_panels_impl<Vec8, 8>(x, ldx, rows, k_len, panels, n, bias, y, ldy);
}
#endif

#if ATLAS_X86_TARGETS
// AVX-512 BF16 path. Its GEMM reads the rows of x as words in the panels'
// layout (see pack_rows_bf16), so a word vector of a panel and a row's word
// broadcast to every lane are the operands of one vdpbf16ps.
#define ATLAS_BF16_TARGET __attribute__((target("avx512f,avx512vl,avx512bf16")))

// rows of x (float32 values that are already bfloat16: forward() rounds them)
// as bfloat16 pairs: word j of row r (at out + r * ceil(k_len / 2)) holds
// x[r, 2j] in its upper half and x[r, 2j + 1] in its lower half (zero past
// k_len), as a panel row holds W[c, 2j] and W[c, 2j + 1].
void pack_rows_bf16(const float* x, int64_t ldx, int64_t rows, int64_t k_len, uint32_t* out) {
  const int64_t pairs = (k_len + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint32_t* o = out + r * pairs;
    for (int64_t j = 0; j < k_len / 2; ++j) {
      uint32_t hi, lo;
      std::memcpy(&hi, xr + 2 * j, sizeof(hi));
      std::memcpy(&lo, xr + 2 * j + 1, sizeof(lo));
      o[j] = (hi & 0xffff0000u) | (lo >> 16);
    }
    if (k_len % 2 != 0) {
      uint32_t hi;
      std::memcpy(&hi, xr + k_len - 1, sizeof(hi));
      o[pairs - 1] = hi & 0xffff0000u;
    }
  }
}

// y[r, c] (+ bias[c]) for M rows of packed x and NP consecutive panels from
// panel index p: M * NP accumulators (independent chains of vdpbf16ps, whose
// latency is several cycles; 12 or more keep both of its units busy), NP
// weight vectors and a broadcast: at most 28 of the 32 vector registers for
// the (M, NP) pairs gemm_panels_dot uses.
template <int M, int NP>
ATLAS_BF16_TARGET __attribute__((always_inline)) inline void dot_block(const uint32_t* __restrict xw,
                                                                       int64_t pairs, const uint32_t* panels,
                                                                       int64_t stride, int64_t p, int64_t n,
                                                                       const float* bias, float* __restrict y,
                                                                       int64_t ldy) {
  __m256 acc[M][NP];
  for (int r = 0; r < M; ++r)
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm256_setzero_ps();
  const uint32_t* panel = panels + p * stride;
  for (int64_t kp = 0; kp < pairs; ++kp) {
    if ((kp & 1) == 0)  // a 64-byte line holds two pairs of a panel
      for (int q = 0; q < NP; ++q) __builtin_prefetch(panel + q * stride + kp * kHeadPanel + kPrefetchWords);
    __m256i w[NP];
    for (int q = 0; q < NP; ++q)
      w[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * stride + kp * kHeadPanel));
    for (int r = 0; r < M; ++r) {
      const __m256i xb = _mm256_set1_epi32(static_cast<int>(xw[r * pairs + kp]));
      for (int q = 0; q < NP; ++q) acc[r][q] = _mm256_dpbf16_ps(acc[r][q], (__m256bh)w[q], (__m256bh)xb);
    }
  }
  for (int r = 0; r < M; ++r) {
    for (int q = 0; q < NP; ++q) {
      float out[kHeadPanel];
      _mm256_storeu_ps(out, acc[r][q]);
      const int64_t col0 = (p + q) * kHeadPanel;
      const int64_t cols = std::min<int64_t>(kHeadPanel, n - col0);
      float* yr = y + r * ldy + col0;
      if (bias != nullptr) {
        for (int64_t c = 0; c < cols; ++c) yr[c] = out[c] + bias[col0 + c];
      } else {
        for (int64_t c = 0; c < cols; ++c) yr[c] = out[c];
      }
    }
  }
}

// M rows against panels [p0, p1): NP at a time, then the rest one by one.
template <int M, int NP>
ATLAS_BF16_TARGET __attribute__((always_inline)) inline void dot_panels(const uint32_t* xw, int64_t pairs,
                                                                        const uint32_t* panels, int64_t stride,
                                                                        int64_t p0, int64_t p1, int64_t n,
                                                                        const float* bias, float* y,
                                                                        int64_t ldy) {
  int64_t p = p0;
  for (; p + NP <= p1; p += NP) dot_block<M, NP>(xw, pairs, panels, stride, p, n, bias, y, ldy);
  for (; p < p1; ++p) dot_block<M, 1>(xw, pairs, panels, stride, p, n, bias, y, ldy);
}

// m (4 <= m <= 8) rows against panels [p0, p1), 3 panels at a time.
ATLAS_BF16_TARGET void dot_group(int64_t m, const uint32_t* xw, int64_t pairs, const uint32_t* panels,
                                 int64_t stride, int64_t p0, int64_t p1, int64_t n, const float* bias, float* y,
                                 int64_t ldy) {
  switch (m) {
    case 4: dot_panels<4, 3>(xw, pairs, panels, stride, p0, p1, n, bias, y, ldy); break;
    case 5: dot_panels<5, 3>(xw, pairs, panels, stride, p0, p1, n, bias, y, ldy); break;
    case 6: dot_panels<6, 3>(xw, pairs, panels, stride, p0, p1, n, bias, y, ldy); break;
    case 7: dot_panels<7, 3>(xw, pairs, panels, stride, p0, p1, n, bias, y, ldy); break;
    default: dot_panels<8, 3>(xw, pairs, panels, stride, p0, p1, n, bias, y, ldy); break;
  }
}

// The GEMM of gemm_panels_wide with vdpbf16ps (x already bfloat16). Up to 3
// rows: one group, with more panels at once so that it still has 12
// accumulators (a drafting step's few nodes). More rows: groups of 4 to 8
// rows whose sizes differ by at most one, 3 panels at a time, every group over
// those panels while the cache holds them, so that the weights come from
// memory once per call.
ATLAS_BF16_TARGET void gemm_panels_dot(const float* x, int64_t ldx, int64_t rows, int64_t k_len,
                                       const uint32_t* panels, int64_t n, const float* bias, float* y,
                                       int64_t ldy) {
  thread_local std::vector<uint32_t> words;  // packed x; grows to the largest call, then stays
  const int64_t pairs = (k_len + 1) / 2;
  if (words.size() < static_cast<size_t>(rows * pairs)) words.resize(static_cast<size_t>(rows * pairs));
  uint32_t* xw = words.data();
  pack_rows_bf16(x, ldx, rows, k_len, xw);
  const int64_t stride = panel_words(k_len);
  const int64_t num_panels = (n + kHeadPanel - 1) / kHeadPanel;
  switch (rows) {
    case 1: dot_panels<1, 12>(xw, pairs, panels, stride, 0, num_panels, n, bias, y, ldy); return;
    case 2: dot_panels<2, 6>(xw, pairs, panels, stride, 0, num_panels, n, bias, y, ldy); return;
    case 3: dot_panels<3, 4>(xw, pairs, panels, stride, 0, num_panels, n, bias, y, ldy); return;
    default: break;
  }
  const int64_t groups = (rows + 7) / 8;
  for (int64_t p0 = 0; p0 < num_panels; p0 += 3) {
    const int64_t p1 = std::min<int64_t>(p0 + 3, num_panels);
    for (int64_t g = 0, r = 0; g < groups; ++g) {
      const int64_t m = rows / groups + (g < rows % groups ? 1 : 0);
      dot_group(m, xw + r * pairs, pairs, panels, stride, p0, p1, n, bias, y + r * ldy, ldy);
      r += m;
    }
  }
}
#undef ATLAS_BF16_TARGET
#endif

using GemmFn = void (*)(const float*, int64_t, int64_t, int64_t, const uint32_t*, int64_t, const float*,
                        float*, int64_t);

// out[i] = x[i] rounded to the nearest bfloat16 (ties to even), as float32;
// out may be x.
inline void round_to_bf16(const float* x, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = bf16_to_float(float_to_bf16(x[i]));
}

}  // namespace

const char* head_tensor_name(int32_t t) {
  return t >= 0 && t < kNumHeadTensors ? kNames[t] : "unknown";
}

Status DraftHead::init(const HeadConfig& c, const float* embed) {
  if (ready_) return Status::Invalid("the draft head is already initialised");
  // Why these caps: beyond them H * 2H floats or Vd * H floats of one matrix
  // pass 2^31 elements, which no draft head needs.
  if (c.hidden < 1 || c.hidden > 32768)
    return Status::Invalid("hidden must be in [1, 32768], got " + std::to_string(c.hidden));
  if (c.intermediate < 1 || c.intermediate > 131072)
    return Status::Invalid("intermediate must be in [1, 131072], got " + std::to_string(c.intermediate));
  if (c.vocab < 1) return Status::Invalid("vocab must be >= 1, got " + std::to_string(c.vocab));
  if (c.draft_vocab < 1 || c.draft_vocab > c.vocab)
    return Status::Invalid("draft_vocab must be in [1, vocab = " + std::to_string(c.vocab) + "], got " +
                           std::to_string(c.draft_vocab));
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps))
    return Status::Invalid("eps must be a positive finite number, got " + std::to_string(c.eps));
  if (embed == nullptr) return Status::Invalid("embed is null");
  if (c.simd != HeadSimd::kAuto && c.simd != HeadSimd::kBaseline && c.simd != HeadSimd::kAvx2)
    return Status::Invalid("simd must be kAuto, kBaseline or kAvx2, got " +
                           std::to_string(static_cast<int>(c.simd)));
  config_ = c;
  embed_ = embed;
  path_ = Path::kSse;
  if (c.simd != HeadSimd::kBaseline && cpu::has_avx2_fma()) path_ = Path::kAvx2;
  if (c.simd == HeadSimd::kAuto && cpu::has_avx512_bf16()) path_ = Path::kBf16;
  ready_ = true;
  return Status::Ok();
}

namespace {

// Checks tensor t's shape against the configuration.
Status check_tensor_shape(const HeadConfig& c, int32_t t, const HeadTensorRef& r) {
  const Shape s = expected_shape(c, t);
  const bool ok = r.ndim == s.ndim && r.shape[0] == s.d0 && (s.ndim == 1 || r.shape[1] == s.d1);
  if (!ok)
    return Status::Invalid(std::string(kNames[t]) + " must have shape " + s.text + " = " +
                           shape_text(s.ndim, s.d0, s.d1) + ", got " + shape_text(r));
  return Status::Ok();
}

// Validates tensor t's values and stores them in w (a matrix packed as
// bfloat16 panels, a vector copied).
Status load_tensor(const HeadConfig& c, int32_t t, const float* data, HeadWeights::Tensors* w) {
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  switch (t) {
    case kHeadWIn: return pack_panels(kNames[t], data, H, 2 * H, &w->w_in);
    case kHeadWGate: return pack_panels(kNames[t], data, I, H, &w->w_gate);
    case kHeadWUp: return pack_panels(kNames[t], data, I, H, &w->w_up);
    case kHeadWDown: return pack_panels(kNames[t], data, H, I, &w->w_down);
    case kHeadWOut: return pack_panels(kNames[t], data, V, H, &w->w_out);
    case kHeadBIn: return copy_vector(kNames[t], data, H, &w->b_in);
    case kHeadNorm1: return copy_vector(kNames[t], data, H, &w->norm1);
    case kHeadNorm2: return copy_vector(kNames[t], data, H, &w->norm2);
    default: return Status::Invalid("unknown head tensor " + std::to_string(t));
  }
}

}  // namespace

Status DraftHead::push(const HeadWeightsRef& in, double metric, int64_t* version) {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (version == nullptr) return Status::Invalid("version is null");
  const HeadConfig& c = config_;
  // Shapes first: nothing is read before every size is known to be right.
  for (int32_t t = 0; t < kNumHeadTensors; ++t) {
    const HeadTensorRef& r = in.tensors[t];
    if (r.data == nullptr) return Status::Invalid(std::string("missing tensor '") + kNames[t] + "'");
    ATLAS_RETURN_IF_ERROR(check_tensor_shape(c, t, r));
  }
  if (in.draft_ids == nullptr)
    return Status::Invalid(std::string("missing tensor '") + kHeadDraftIdsName + "'");
  if (in.num_draft_ids != c.draft_vocab)
    return Status::Invalid(std::string(kHeadDraftIdsName) + " must have shape (Vd,) = (" +
                           std::to_string(c.draft_vocab) + ",), got (" + std::to_string(in.num_draft_ids) +
                           ",)");

  auto w = std::make_shared<HeadWeights>();
  const int64_t V = c.draft_vocab;
  for (int32_t t = 0; t < kNumHeadTensors; ++t)
    ATLAS_RETURN_IF_ERROR(load_tensor(c, t, in.tensors[t].data, &w->t_));

  w->draft_ids_.assign(in.draft_ids, in.draft_ids + V);
  for (int64_t j = 0; j < V; ++j) {
    const int32_t id = w->draft_ids_[static_cast<size_t>(j)];
    if (id < 0 || id >= c.vocab)
      return Status::Invalid(std::string(kHeadDraftIdsName) + "[" + std::to_string(j) + "] = " +
                             std::to_string(id) + " is outside the vocabulary [0, " +
                             std::to_string(c.vocab) + ")");
  }
  std::vector<int32_t> sorted = w->draft_ids_;
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end())
    return Status::Invalid(std::string(kHeadDraftIdsName) + " lists token " + std::to_string(*dup) +
                           " twice: each draft row must map to a distinct token");

  std::lock_guard<std::mutex> lock(mu_);
  w->version_ = next_version_++;
  *version = w->version_;
  live_ = std::move(w);
  history_.push_back({*version, metric});
  if (history_.size() > static_cast<size_t>(kMaxHeadHistory)) history_.erase(history_.begin());
  return Status::Ok();
}

Status DraftHead::derive(const HeadWeights* base, const HeadWeightsRef& in,
                         std::shared_ptr<const HeadWeights>* out) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (base == nullptr) return Status::Invalid("base is null");
  if (out == nullptr) return Status::Invalid("out is null");
  if (in.draft_ids != nullptr || in.num_draft_ids != 0)
    return Status::Invalid(std::string("a derived version keeps its base's ") + kHeadDraftIdsName +
                           ": give float tensors only");
  const HeadConfig& c = config_;
  bool any = false;
  for (int32_t t = 0; t < kNumHeadTensors; ++t) {
    if (in.tensors[t].data == nullptr) continue;
    ATLAS_RETURN_IF_ERROR(check_tensor_shape(c, t, in.tensors[t]));
    any = true;
  }
  if (!any) return Status::Invalid("derive needs at least one tensor to replace");
  auto w = std::make_shared<HeadWeights>(*base);
  for (int32_t t = 0; t < kNumHeadTensors; ++t)
    if (in.tensors[t].data != nullptr) ATLAS_RETURN_IF_ERROR(load_tensor(c, t, in.tensors[t].data, &w->t_));
  w->derived_ = true;
  *out = std::move(w);
  return Status::Ok();
}

Status DraftHead::set_metric(int64_t version, double metric) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& h : history_) {
    if (h.version == version) {
      h.metric = metric;
      return Status::Ok();
    }
  }
  return Status::Invalid("version " + std::to_string(version) + " is not in the history (pushed versions: " +
                         (history_.empty() ? std::string("none")
                                           : std::to_string(history_.front().version) + ".." +
                                                 std::to_string(history_.back().version)) + ")");
}

const char* DraftHead::simd_path() const {
  switch (path_) {
    case Path::kBf16: return "avx512-bf16";
    case Path::kAvx2: return "avx2+fma";
    default: return "sse";
  }
}

// ---- cache warm-up (see "Warming the caches" in head.h) ----------------------------------

struct DraftHead::Prefetcher {
  std::mutex mu;  // guards the five fields below
  std::condition_variable cv;
  std::shared_ptr<const HeadWeights> pending;
  uint64_t pending_ticket = 0;
  std::chrono::steady_clock::time_point pending_since;
  bool stop = false;
  pid_t worker_pid = 0;             // the process whose thread serves `pending`, 0: none yet
  std::atomic<uint64_t> ticket{0};  // bumped by every request: the latest one stands
  std::atomic<int64_t> done{0}, abandoned{0};
};

void DraftHead::prefetch_loop(std::shared_ptr<Prefetcher> s) {
  std::unique_lock<std::mutex> lock(s->mu);
  for (;;) {
    s->cv.wait(lock, [&] { return s->stop || s->pending != nullptr; });
    if (s->stop) return;
    follow_helper_cpus();  // (atlas/pool.h)
    std::shared_ptr<const HeadWeights> w = std::move(s->pending);
    s->pending.reset();
    const uint64_t mine = s->pending_ticket;
    const auto deadline = s->pending_since + std::chrono::microseconds(kHeadPrefetchMicros);
    lock.unlock();
    // One byte of every cache line, kPrefetchChunk bytes between checks that
    // the request still stands: every 64-byte line of a range holds exactly
    // one of its offsets 0, 64, ... (the last byte covers a partial line).
    // (Each byte is read through a volatile pointer, a read the compiler must
    // perform.)
    constexpr size_t kPrefetchChunk = 16 << 10;
    bool given_up = false;
    auto read = [&](const void* data, size_t bytes) {
      const auto* b = static_cast<const volatile unsigned char*>(data);
      for (size_t lo = 0; lo < bytes && !given_up; lo += kPrefetchChunk) {
        if (s->ticket.load(std::memory_order_relaxed) != mine || std::chrono::steady_clock::now() > deadline) {
          given_up = true;
          break;
        }
        const size_t hi = std::min(bytes, lo + kPrefetchChunk);
        for (size_t i = lo; i < hi; i += 64) (void)b[i];
        (void)b[hi - 1];
      }
    };
    for (const auto* m : {&w->t_.w_in, &w->t_.w_gate, &w->t_.w_up, &w->t_.w_down, &w->t_.w_out})
      read(m->data(), m->size() * sizeof(uint32_t));
    for (const auto* v : {&w->t_.b_in, &w->t_.norm1, &w->t_.norm2}) read(v->data(), v->size() * sizeof(float));
    read(w->draft_ids_.data(), w->draft_ids_.size() * sizeof(int32_t));
    w.reset();  // (a version swapped out meanwhile is freed here, off the serving thread)
    (given_up ? s->abandoned : s->done).fetch_add(1, std::memory_order_release);
    lock.lock();
  }
}

DraftHead::DraftHead() : prefetcher_(std::make_shared<Prefetcher>()) {}

DraftHead::~DraftHead() {
  std::lock_guard<std::mutex> lock(prefetcher_->mu);
  prefetcher_->stop = true;
  prefetcher_->pending.reset();
  prefetcher_->cv.notify_all();
}

Status DraftHead::prefetch(bool* queued) const { return prefetch(snapshot(), queued); }

Status DraftHead::prefetch(std::shared_ptr<const HeadWeights> w, bool* queued) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (queued == nullptr) return Status::Invalid("queued is null");
  *queued = false;
  if (!w) return Status::Ok();
  Prefetcher& s = *prefetcher_;
  // try_lock: the thread holds the mutex only while it takes or hands back a
  // request, and in a child forked at that moment it stays locked for good:
  // then this skips instead of waiting.
  std::unique_lock<std::mutex> lock(s.mu, std::try_to_lock);
  if (!lock.owns_lock()) return Status::Ok();
  const pid_t pid = getpid();
  if (s.worker_pid != pid) {  // first call, or a forked child (it has no thread)
    try {
      std::thread(prefetch_loop, prefetcher_).detach();
    } catch (const std::system_error& e) {
      return Status::Internal(std::string("could not start the draft head's warm-up thread: ") + e.what());
    }
    s.worker_pid = pid;
  }
  if (s.pending) s.abandoned.fetch_add(1, std::memory_order_release);  // replaced before it started
  s.pending = std::move(w);
  s.pending_ticket = s.ticket.fetch_add(1, std::memory_order_relaxed) + 1;
  s.pending_since = std::chrono::steady_clock::now();
  s.cv.notify_one();
  *queued = true;
  return Status::Ok();
}

int64_t DraftHead::prefetches_done() const { return prefetcher_->done.load(std::memory_order_acquire); }

int64_t DraftHead::prefetches_abandoned() const {
  return prefetcher_->abandoned.load(std::memory_order_acquire);
}

std::shared_ptr<const HeadWeights> DraftHead::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_;
}

int64_t DraftHead::version() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_ ? live_->version_ : 0;
}

std::vector<HeadVersionRecord> DraftHead::history() const {
  std::lock_guard<std::mutex> lock(mu_);
  return history_;
}

int64_t HeadWeights::bytes() const {
  int64_t b = 0;
  for (const auto* m : {&t_.w_in, &t_.w_gate, &t_.w_up, &t_.w_down, &t_.w_out})
    b += static_cast<int64_t>(m->size() * sizeof(uint32_t));
  for (const auto* v : {&t_.b_in, &t_.norm1, &t_.norm2}) b += static_cast<int64_t>(v->size() * sizeof(float));
  return b + static_cast<int64_t>(draft_ids_.size() * sizeof(int32_t));
}

Status DraftHead::read_tensor(const HeadWeights* w, int32_t t, float* out, int64_t out_floats) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (w == nullptr) return Status::Invalid("no weights: push a version first");
  if (t < 0 || t >= kNumHeadTensors)
    return Status::Invalid("tensor index " + std::to_string(t) + " is out of range");
  const Shape s = expected_shape(config_, t);
  const int64_t numel = s.ndim == 1 ? s.d0 : s.d0 * s.d1;
  if (out == nullptr || out_floats < numel)
    return Status::Invalid(std::string(kNames[t]) + " has " + std::to_string(numel) + " values, got room for " +
                           std::to_string(out == nullptr ? 0 : out_floats));
  switch (t) {
    case kHeadWIn: unpack_panels(w->t_.w_in, s.d0, s.d1, out); break;
    case kHeadWGate: unpack_panels(w->t_.w_gate, s.d0, s.d1, out); break;
    case kHeadWUp: unpack_panels(w->t_.w_up, s.d0, s.d1, out); break;
    case kHeadWDown: unpack_panels(w->t_.w_down, s.d0, s.d1, out); break;
    case kHeadWOut: unpack_panels(w->t_.w_out, s.d0, s.d1, out); break;
    case kHeadBIn: std::copy(w->t_.b_in.begin(), w->t_.b_in.end(), out); break;
    case kHeadNorm1: std::copy(w->t_.norm1.begin(), w->t_.norm1.end(), out); break;
    default: std::copy(w->t_.norm2.begin(), w->t_.norm2.end(), out); break;
  }
  return Status::Ok();
}

int64_t DraftHead::workspace_floats() const {
  return static_cast<int64_t>(kHeadRowTile) * (4 * static_cast<int64_t>(config_.hidden) +
                                              2 * static_cast<int64_t>(config_.intermediate));
}

Status DraftHead::forward(const HeadWeights* w, const float* features, int64_t feature_stride,
                          const int32_t* tokens, int64_t n, float* f_hat_out, float* logits_out,
                          float* workspace, int64_t workspace_floats) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (w == nullptr) return Status::Invalid("no weights: push a version before the first forward");
  if (n < 0) return Status::Invalid("n must be >= 0, got " + std::to_string(n));
  if (n == 0) return Status::Ok();
  const HeadConfig& c = config_;
  const int64_t H = c.hidden, I = c.intermediate, V = c.draft_vocab;
  if (features == nullptr || tokens == nullptr || f_hat_out == nullptr || logits_out == nullptr)
    return Status::Invalid("features, tokens, f_hat_out and logits_out must not be null");
  if (feature_stride < H)
    return Status::Invalid("feature_stride must be >= hidden = " + std::to_string(H) + ", got " +
                           std::to_string(feature_stride));
  if (workspace == nullptr || workspace_floats < this->workspace_floats())
    return Status::Invalid("workspace must hold " + std::to_string(this->workspace_floats()) +
                           " floats, got " + std::to_string(workspace == nullptr ? 0 : workspace_floats));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= c.vocab)
      return Status::Invalid("tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                             " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");

  const int64_t T = kHeadRowTile;
  float* xcat = workspace;       // [T, 2H]  [f ; e]
  float* z = xcat + T * 2 * H;   // [T, H]
  float* nrm = z + T * H;        // [T, H]   n, then h once n is spent
  float* gate = nrm + T * H;     // [T, I]   W_gate n, then silu(.) * up
  float* up = gate + T * I;      // [T, I]
  const float eps = c.eps;
  GemmFn gemm_panels = gemm_panels_baseline;
#if ATLAS_X86_TARGETS
  if (path_ == Path::kAvx2) gemm_panels = gemm_panels_wide;
  if (path_ == Path::kBf16) gemm_panels = gemm_panels_dot;
#endif
  for (int64_t r0 = 0; r0 < n; r0 += T) {
    const int64_t rows = std::min(T, n - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* f = features + (r0 + r) * feature_stride;
      const float* e = embed_ + static_cast<int64_t>(tokens[r0 + r]) * H;
      std::copy(f, f + H, xcat + r * 2 * H);
      std::copy(e, e + H, xcat + r * 2 * H + H);
    }
    // Every product's input rounded to bfloat16 first (see the top of this file).
    round_to_bf16(xcat, rows * 2 * H, xcat);
    gemm_panels(xcat, 2 * H, rows, 2 * H, w->t_.w_in.data(), H, w->t_.b_in.data(), z, H);
    ATLAS_RETURN_IF_ERROR(rms_norm(z, rows, H, H, w->t_.norm1.data(), eps, nrm, H));
    round_to_bf16(nrm, rows * H, nrm);
    gemm_panels(nrm, H, rows, H, w->t_.w_gate.data(), I, nullptr, gate, I);
    gemm_panels(nrm, H, rows, H, w->t_.w_up.data(), I, nullptr, up, I);
    for (int64_t i = 0; i < rows * I; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
    round_to_bf16(gate, rows * I, gate);
    float* h = nrm;
    gemm_panels(gate, I, rows, I, w->t_.w_down.data(), H, nullptr, h, H);
    float* f_hat = f_hat_out + r0 * H;
    for (int64_t i = 0; i < rows * H; ++i) h[i] += z[i];
    ATLAS_RETURN_IF_ERROR(rms_norm(h, rows, H, H, w->t_.norm2.data(), eps, f_hat, H));
    float* f_in = h;  // h is spent: the rounded copy of f_hat that W_out reads
    round_to_bf16(f_hat, rows * H, f_in);
    gemm_panels(f_in, H, rows, H, w->t_.w_out.data(), V, nullptr, logits_out + r0 * V, V);
  }
  return Status::Ok();
}

Status DraftHead::draft(const HeadWeights* w, const HeadDraftJob* jobs, int64_t num_jobs,
                        const HeadDraftSettings& settings, std::vector<std::vector<HeadDraftNode>>* out,
                        float* workspace, int64_t workspace_floats) const {
  if (!ready_) return Status::Invalid("the draft head is not initialised");
  if (w == nullptr) return Status::Invalid("the draft head has no weights yet: push a version first");
  if (out == nullptr || num_jobs < 0 || (num_jobs > 0 && jobs == nullptr))
    return Status::Invalid("draft needs its jobs and an output");
  if (settings.topk < 1 || settings.width < 1 || settings.max_depth < 1)
    return Status::Invalid("topk, width and max_depth must be >= 1");
  const int64_t H = config_.hidden, V = config_.draft_vocab;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const HeadDraftJob& job = jobs[j];
    if (job.feature == nullptr) return Status::Invalid("a job's feature is null");
    if (job.token < 0 || job.token >= config_.vocab) return Status::Invalid("a job's token is outside the vocabulary");
    if (job.budget < 1) return Status::Invalid("a job's budget must be >= 1");
    if (!(job.floor >= 0.0 && job.floor < 1.0)) return Status::Invalid("a job's floor must be in [0, 1)");
  }
  out->assign(static_cast<size_t>(num_jobs), {});
  if (num_jobs == 0) return Status::Ok();
  const int32_t k = static_cast<int32_t>(std::min<int64_t>(settings.topk, V));
  // Candidates of every job (all depths), in creation order.
  struct Cand {
    double path;
    float prob;
    int32_t token;  // full-vocabulary id
    int32_t parent; // candidate index, -1: the root
  };
  std::vector<std::vector<Cand>> cands(static_cast<size_t>(num_jobs));
  // The frontier: (job, candidate or -1, path) per forward row.
  struct Row {
    int64_t job;
    int32_t cand;
    double path;
  };
  std::vector<Row> frontier, next;
  std::vector<float> feats(static_cast<size_t>(num_jobs * H));
  std::vector<int32_t> toks(static_cast<size_t>(num_jobs));
  for (int64_t j = 0; j < num_jobs; ++j) {
    frontier.push_back({j, -1, 1.0});
    std::copy(jobs[j].feature, jobs[j].feature + H, feats.data() + j * H);
    toks[j] = jobs[j].token;
  }
  std::vector<float> f_hat, logits, probs;
  std::vector<int32_t> cols;
  std::vector<uint8_t> topk_ws(static_cast<size_t>(verify_workspace_bytes(V)));
  std::vector<std::vector<std::pair<int32_t, int32_t>>> fresh(static_cast<size_t>(num_jobs));  // (cand, row)
  std::vector<double> sorted_paths;
  for (int32_t depth = 0; depth < settings.max_depth && !frontier.empty(); ++depth) {
    const int64_t n = static_cast<int64_t>(frontier.size());
    f_hat.resize(static_cast<size_t>(n * H));
    probs.resize(static_cast<size_t>(n * k));
    cols.resize(static_cast<size_t>(n * k));
    // Tiles of rows, so that the logits held at once stay small however wide
    // the frontier.
    logits.resize(static_cast<size_t>(std::min<int64_t>(n, kHeadRowTile) * V));
    for (int64_t r0 = 0; r0 < n; r0 += kHeadRowTile) {
      const int64_t m = std::min<int64_t>(kHeadRowTile, n - r0);
      ATLAS_RETURN_IF_ERROR(forward(w, feats.data() + r0 * H, H, toks.data() + r0, m, f_hat.data() + r0 * H,
                                    logits.data(), workspace, workspace_floats));
      TopKProblem tk;
      tk.logits = logits.data();
      tk.vocab = V;
      tk.logits_row_stride = V;
      tk.rows = m;
      tk.k = k;
      tk.ids_out = cols.data() + r0 * k;
      tk.probs_out = probs.data() + r0 * k;
      tk.workspace = topk_ws.data();
      tk.workspace_bytes = static_cast<int64_t>(topk_ws.size());
      ATLAS_RETURN_IF_ERROR(top_k_probs(tk));
    }
    for (auto& f : fresh) f.clear();
    for (int64_t r = 0; r < n; ++r) {
      const Row& row = frontier[static_cast<size_t>(r)];
      const HeadDraftJob& job = jobs[row.job];
      auto& jc = cands[static_cast<size_t>(row.job)];
      const int32_t take = std::min<int32_t>(k, job.budget);
      for (int32_t i = 0; i < take; ++i) {
        const float p = probs[static_cast<size_t>(r * k + i)];
        const double path = row.path * static_cast<double>(p);
        if (path <= 0.0 || (depth > 0 && path < job.floor)) break;  // probabilities descend
        jc.push_back({path, std::min(std::max(p, 0.0f), 1.0f), w->draft_ids_[static_cast<size_t>(cols[r * k + i])],
                      row.cand});
        fresh[static_cast<size_t>(row.job)].push_back({static_cast<int32_t>(jc.size()) - 1, static_cast<int32_t>(r)});
      }
    }
    if (depth + 1 == settings.max_depth) break;
    next.clear();
    std::vector<int64_t> rows;
    for (int64_t j = 0; j < num_jobs; ++j) {
      auto& fj = fresh[static_cast<size_t>(j)];
      if (fj.empty()) continue;
      const auto& jc = cands[static_cast<size_t>(j)];
      const int32_t budget = jobs[j].budget;
      // A child is never more probable than its parent: expand only nodes
      // above the budget-th best candidate so far.
      double cut = -1.0;
      if (static_cast<int64_t>(jc.size()) >= budget) {
        sorted_paths.clear();
        for (const Cand& c : jc) sorted_paths.push_back(c.path);
        std::nth_element(sorted_paths.begin(), sorted_paths.begin() + (budget - 1), sorted_paths.end(),
                         std::greater<double>());
        cut = sorted_paths[static_cast<size_t>(budget - 1)];
      }
      std::stable_sort(fj.begin(), fj.end(), [&](const std::pair<int32_t, int32_t>& a,
                                                 const std::pair<int32_t, int32_t>& b) {
        return jc[static_cast<size_t>(a.first)].path > jc[static_cast<size_t>(b.first)].path;
      });
      const size_t expand = static_cast<size_t>(std::min<int32_t>(settings.width, budget));
      for (size_t i = 0; i < fj.size() && i < expand; ++i) {
        const Cand& c = jc[static_cast<size_t>(fj[i].first)];
        if (c.path > cut && c.path >= jobs[j].floor) {
          next.push_back({j, fj[i].first, c.path});
          rows.push_back(fj[i].second);
        }
      }
    }
    if (next.empty()) break;
    feats.resize(static_cast<size_t>(next.size() * H));
    toks.resize(next.size());
    for (size_t i = 0; i < next.size(); ++i) {
      std::copy(f_hat.data() + rows[i] * H, f_hat.data() + (rows[i] + 1) * H, feats.data() + i * H);
      toks[i] = cands[static_cast<size_t>(next[i].job)][static_cast<size_t>(next[i].cand)].token;
    }
    frontier.swap(next);
  }
  // Keep each job's budget most probable candidates (ties: the earlier), in
  // creation order, their parents renumbered among the kept.
  for (int64_t j = 0; j < num_jobs; ++j) {
    const auto& jc = cands[static_cast<size_t>(j)];
    std::vector<int32_t> order(jc.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
    const size_t keep = std::min<size_t>(order.size(), static_cast<size_t>(jobs[j].budget));
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int32_t a, int32_t b) {
      const double pa = jc[static_cast<size_t>(a)].path, pb = jc[static_cast<size_t>(b)].path;
      return pa > pb || (pa == pb && a < b);
    });
    order.resize(keep);
    std::sort(order.begin(), order.end());
    std::vector<int32_t> index(jc.size(), -1);
    auto& dst = (*out)[static_cast<size_t>(j)];
    for (int32_t c : order) {
      const Cand& cand = jc[static_cast<size_t>(c)];
      const int32_t parent = cand.parent < 0 ? -1 : index[static_cast<size_t>(cand.parent)];
      if (cand.parent >= 0 && parent < 0) continue;  // never: the kept set is closed under parents
      index[static_cast<size_t>(c)] = static_cast<int32_t>(dst.size());
      dst.push_back({parent, cand.token, cand.prob});
    }
  }
  return Status::Ok();
}

}  // namespace atlas
