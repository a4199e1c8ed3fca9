// atlas/attention.cpp: tree attention over the paged KV cache on the CPU.
//
// Work is organised as a small blocked GEMM per sequence and kv head (the kv
// heads of a tile, or halves of their context, split over the pool's threads,
// see atlas/attention.h and kSplitContext): the
// "rows" are a tile of queries (up to kTileFloats / head_dim rows) times the G
// query heads that share the kv head, so every key and value row read from the
// paged cache serves all of them. The rows walk their positions in chunks of
// at most kChunk consecutive positions of one page. Committed positions
// [0, length) are seen by every row; tree positions length + j only by the rows
// whose query node is j or a descendant of j: an additive mask (0 or -inf per
// tree node and row, built per tile by walking parents) is added to the scores
// of tree chunks. Each row keeps a one-pass online softmax (running max m,
// running sum l, float32 accumulator acc); per chunk:
//
//   S[c, r] = (q_r . k_c) * scale      queries transposed to [head_dim, rows], so
//                                      that a score vector holds W rows of one key
//                                      and each step is a broadcast key element
//                                      times a vector of query elements;
//   m' = max(m, max_c S[c, r]), P = exp(S - m'), alpha = exp(m - m'),
//   l = l * alpha + sum_c P            vectorised over rows;
//   acc[r] = acc[r] * alpha[r] + sum_c P[c, r] * v_c
//                                      a register block of rows x head_dim vectors,
//                                      the chunk's sum formed first, so that long
//                                      contexts are summed in blocks.
//
// With few rows (at most dot_rows(W): decoding one token, one query of G = 3
// heads) a score vector would be mostly padding: the scores instead come from
// dot products vectorised over head_dim (see qk_dot), and the softmax runs over
// vectors of keys.
//
// A masked key gets the weight exp(-inf) = 0 exactly, so it adds 0 * v to the
// row: tree slots must hold finite values (the forward writes every node's row
// before the call), unlike committed context, which is visible to all rows anyway.
//
// The kernels are written with GCC/Clang generic vectors and compiled twice:
// W = 4 floats (the build's SSE baseline) and 8 (AVX2 + FMA); the wider one
// runs when the CPU has it, unless the environment variable ATLAS_SIMD_WIDTH is
// 4 (as in verify.cpp). The widths differ only in float rounding (FMA
// contraction, lane grouping of sums). No AVX-512 path: on Zen 4 a 16-float
// multiply-add costs two 8-float ones, and a 16-float build measured 1.5-2.7x
// slower than the 8-float one (padding lanes, register spills).
#include "atlas/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

#include "atlas/pool.h"
#include "simd.h"

// The wide paths need GCC or Clang function targets on x86-64.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ATLAS_ATTN_WIDE 1
#else
#define ATLAS_ATTN_WIDE 0
#endif

// 32-byte generic vectors in always-inline helpers that only AVX2 code calls.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace atlas {

namespace {

// Why 32: a chunk's keys and values (2 x 32 rows of head_dim floats, 16 KiB at
// head_dim 64) stay in L1 while every row of the tile reads them. With block
// size 16 a chunk is one page.
constexpr int kChunk = 32;

// Why 4096 floats (16 KiB): the tile's transposed queries [head_dim, rows] stay in
// L1 next to the chunk while the chunk's scores are formed (64 rows at head_dim
// 64, i.e. 21 queries of 3 heads); more rows per tile would only save re-reads of
// context that is already cache resident.
constexpr int64_t kTileFloats = 4096;

// Why split at 128 positions: a kv head's pass over a long context is the unit
// the pool's threads share, and SmolLM2's 3 kv heads split over 2 threads as 2
// and 1, one thread idle a third of the time. From 128 committed positions each
// head's pass is two (positions below and above a page boundary near the middle
// of the context, the tree in the second), merged by their softmax statistics:
// 6 units, 3 a thread. Below that a pass is short enough that the extra setup
// and merge would eat the gain. The split depends on the context only, never
// on the thread count, so the result does not either.
constexpr int64_t kSplitContext = 128;

std::string str(int64_t v) { return std::to_string(v); }

// Scratch reused across calls (one per thread: the binding runs calls on
// several caches concurrently). It only grows, so steady-state calls with the
// same shapes never allocate.
struct Workspace {
  std::vector<float> maskf;
  std::vector<uint8_t> any;
  std::vector<float> part_m, part_l, part_acc;  // the split segments' results (see Tile)
};

// Scratch of one thread's kv-head passes (see Tile).
struct HeadScratch {
  std::vector<float> qt, acc, m, l, alpha, s, kbuf, vbuf;
};

template <typename V>
typename V::value_type* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline void store_out(float* dst, float x) { *dst = x; }
inline void store_out(uint16_t* dst, float x) { *dst = float_to_bf16(x); }

#define ATLAS_AI __attribute__((always_inline)) inline

using simd::Unaligned;
using simd::Vec;

template <int W>
ATLAS_AI typename Vec<W>::F load(const float* p) {
  return *reinterpret_cast<const typename Unaligned<typename Vec<W>::F>::type*>(p);
}
template <int W>
ATLAS_AI void store(float* p, typename Vec<W>::F v) {
  *reinterpret_cast<typename Unaligned<typename Vec<W>::F>::type*>(p) = v;
}

// W elements of a key or value row as floats: bf16 widens on the way.
template <int W>
ATLAS_AI typename Vec<W>::F load_row(const float* p) {
  return load<W>(p);
}
template <int W>
ATLAS_AI typename Vec<W>::F load_row(const uint16_t* p) {
  typedef typename Unaligned<typename Vec<W>::H>::type HU;
  const typename Vec<W>::U w = __builtin_convertvector(*reinterpret_cast<const HU*>(p), typename Vec<W>::U) << 16;
  return (typename Vec<W>::F)w;
}

// exp(x) lane by lane for x <= 0 (scores minus their running max): Cephes'
// polynomial after a Cody-Waite reduction, within 2 ulp. exp(x) for x < -87.3
// (and -inf) is 0 and NaN stays NaN. The range checks are integer compares on
// the bit pattern (key: an int32 whose order is the float order).
template <int W>
ATLAS_AI typename Vec<W>::F exp_nonpositive(typename Vec<W>::F x) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const float low = -87.3f;  // exp(low) is just above FLT_MIN: 2^fn stays a normal float
  int32_t low_bits;
  std::memcpy(&low_bits, &low, sizeof(low_bits));
  const I key_low = I{} + (low_bits ^ 0x7fffffff);
  const I u = (I)x;  // generic-vector casts between equal sizes reinterpret the bits
  const I key = u ^ ((u >> 31) & 0x7fffffff);
  const I in_range = (key >= key_low) & (key <= I{});  // all ones when low <= x <= +0
  const I nan = (u & 0x7fffffff) > (I{} + 0x7f800000);
  const I vi = (u & in_range) | (low_bits & ~in_range);
  const F v = (F)vi;
  const F fn = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2), in [-126, 0]
  const F r = (v - fn * 0.693359375f) - fn * -2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F e = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(fn, I) + 127) << 23;  // 2^fn
  const F y = e * (F)bits;
  return (F)(((I)y & in_range) | (u & nan));
}

// Rows of one chunk as float32: fp32 storage is read in place, bf16 is widened
// into buf (head_dim floats per row).
template <int W>
ATLAS_AI const float* rows_as_float(const float* src, int64_t stride, int, int, float*, int64_t* out_stride) {
  *out_stride = stride;
  return src;
}
template <int W>
ATLAS_AI const float* rows_as_float(const uint16_t* src, int64_t stride, int n, int dim, float* buf,
                                    int64_t* out_stride) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::U U;
  typedef typename Unaligned<typename Vec<W>::H>::type HU;
  for (int t = 0; t < n; ++t) {
    const uint16_t* in = src + t * stride;
    float* o = buf + static_cast<int64_t>(t) * dim;
    int d = 0;
    for (; d + W <= dim; d += W) {
      const U w = __builtin_convertvector(*reinterpret_cast<const HU*>(in + d), U) << 16;
      store<W>(o + d, (F)w);
    }
    for (; d < dim; ++d) {
      const uint32_t bits = static_cast<uint32_t>(in[d]) << 16;
      std::memcpy(&o[d], &bits, sizeof(float));
    }
  }
  *out_stride = dim;
  return buf;
}

// Scores of KB keys (rows k, k + ks, ...) for NV vectors of rows:
// s[kk * rp + j * W + lane] = (sum_d qt[d * rp + j * W + lane] * k[kk * ks + d]) * scale,
// the sum over d in order.
template <int W, int NV, int KB>
ATLAS_AI void qk_block(const float* __restrict qt, int rp, const float* __restrict k, int64_t ks, int dim,
                       float scale, float* __restrict s) {
  typedef typename Vec<W>::F F;
  F acc[KB][NV];
  for (int kk = 0; kk < KB; ++kk)
    for (int j = 0; j < NV; ++j) acc[kk][j] = F{};
  for (int d = 0; d < dim; ++d) {
    F q[NV];
    for (int j = 0; j < NV; ++j) q[j] = load<W>(qt + static_cast<int64_t>(d) * rp + j * W);
    for (int kk = 0; kk < KB; ++kk) {
      const float kv = k[kk * ks + d];
      for (int j = 0; j < NV; ++j) acc[kk][j] += kv * q[j];
    }
  }
  for (int kk = 0; kk < KB; ++kk)
    for (int j = 0; j < NV; ++j) store<W>(s + kk * rp + j * W, acc[kk][j] * scale);
}

// Keys c0 .. n - 1 in blocks of KB, then KB / 2, ... 1.
template <int W, int NV, int KB>
ATLAS_AI void qk_keys(const float* qt, int rp, const float* k, int64_t ks, int c0, int n, int dim, float scale,
                      float* s) {
  for (; c0 + KB <= n; c0 += KB) qk_block<W, NV, KB>(qt, rp, k + c0 * ks, ks, dim, scale, s + c0 * rp);
  if constexpr (KB > 1) qk_keys<W, NV, KB / 2>(qt, rp, k, ks, c0, n, dim, scale, s);
}

// s[c * rp + r] = (q_r . k_c) * scale for the n keys of a chunk and all rp rows.
// Blocks of NV row vectors x KB keys: 8 to 12 accumulators, enough independent
// chains to hide the multiply-add latency within the 16 vector registers, and
// each key element is broadcast once for NV row vectors.
template <int W>
ATLAS_AI void qk_rows(const float* qt, int rp, const float* k, int64_t ks, int n, int dim, float scale, float* s) {
  const int nv = rp / W;
  int v = 0;
  if constexpr (W == 8) {
    for (; v + 3 <= nv; v += 3) qk_keys<W, 3, 4>(qt + v * W, rp, k, ks, 0, n, dim, scale, s + v * W);
    if (v + 2 <= nv) {
      qk_keys<W, 2, 6>(qt + v * W, rp, k, ks, 0, n, dim, scale, s + v * W);
      v += 2;
    }
  } else {
    for (; v + 2 <= nv; v += 2) qk_keys<W, 2, 4>(qt + v * W, rp, k, ks, 0, n, dim, scale, s + v * W);
  }
  if (v < nv) qk_keys<W, 1, 8>(qt + v * W, rp, k, ks, 0, n, dim, scale, s + v * W);
}

// ---- few rows: dot products along head_dim ----------------------------------------
//
// With fewer rows than half a vector (one query of 3 heads), vectors over rows
// would be mostly padding. This path instead vectorises the dot products over
// head_dim: s[r * kChunk + c] (scores of one row contiguous), KB keys x R rows of
// accumulators, each reduced to a score by a shuffle tree that turns 4
// accumulators into 4 sums at once; the softmax then runs over vectors of keys.

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define ATLAS_ATTN_SHUFFLE 1
#endif
#endif

// out[i] = sum of the lanes of a[i], i < 4.
template <int W>
ATLAS_AI void reduce4(const typename Vec<W>::F* a, float* out) {
#if defined(ATLAS_ATTN_SHUFFLE)
  typedef typename Vec<4>::F F4;
  if constexpr (W == 8) {
    const auto t01 = __builtin_shufflevector(a[0], a[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                     __builtin_shufflevector(a[0], a[1], 1, 9, 3, 11, 5, 13, 7, 15);
    const auto t23 = __builtin_shufflevector(a[2], a[3], 0, 8, 2, 10, 4, 12, 6, 14) +
                     __builtin_shufflevector(a[2], a[3], 1, 9, 3, 11, 5, 13, 7, 15);
    const auto u = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
    const F4 r = __builtin_shufflevector(u, u, 0, 1, 2, 3) + __builtin_shufflevector(u, u, 4, 5, 6, 7);
    *reinterpret_cast<typename Unaligned<F4>::type*>(out) = r;
    return;
  } else if constexpr (W == 4) {
    const F4 t01 = __builtin_shufflevector(a[0], a[1], 0, 4, 2, 6) + __builtin_shufflevector(a[0], a[1], 1, 5, 3, 7);
    const F4 t23 = __builtin_shufflevector(a[2], a[3], 0, 4, 2, 6) + __builtin_shufflevector(a[2], a[3], 1, 5, 3, 7);
    const F4 r = __builtin_shufflevector(t01, t23, 0, 1, 4, 5) + __builtin_shufflevector(t01, t23, 2, 3, 6, 7);
    *reinterpret_cast<typename Unaligned<F4>::type*>(out) = r;
    return;
  }
#endif
  for (int i = 0; i < 4; ++i) {
    float t = 0.0f;
    for (int lane = 0; lane < W; ++lane) t += a[i][lane];
    out[i] = t;
  }
}

// s[r * kChunk + kk] = (q_r . k_kk) * scale for R rows (q rows of length dim,
// stride ldq) and KB keys; dim is a multiple of W.
template <int W, int R, int KB, typename T>
ATLAS_AI void qk_dot_block(const float* __restrict q, int ldq, const T* __restrict k, int64_t ks, int dim,
                           float scale, float* __restrict s) {
  typedef typename Vec<W>::F F;
  F acc[R][KB];
  for (int r = 0; r < R; ++r)
    for (int kk = 0; kk < KB; ++kk) acc[r][kk] = F{};
  for (int d = 0; d < dim; d += W) {
    F kv[KB];
    for (int kk = 0; kk < KB; ++kk) kv[kk] = load_row<W>(k + kk * ks + d);
    for (int r = 0; r < R; ++r) {
      const F qv = load<W>(q + r * ldq + d);
      for (int kk = 0; kk < KB; ++kk) acc[r][kk] += qv * kv[kk];
    }
  }
  for (int r = 0; r < R; ++r) {
    float t[4];
    if constexpr (KB == 4) {
      reduce4<W>(acc[r], t);
    } else {
      for (int kk = 0; kk < KB; ++kk) {
        t[kk] = 0.0f;
        for (int lane = 0; lane < W; ++lane) t[kk] += acc[r][kk][lane];
      }
    }
    for (int kk = 0; kk < KB; ++kk) s[r * kChunk + kk] = t[kk] * scale;
  }
}

template <int W, int R, typename T>
ATLAS_AI void qk_dot(const float* q, int ldq, const T* k, int64_t ks, int n, int dim, float scale, float* s) {
  int c = 0;
  for (; c + 4 <= n; c += 4) qk_dot_block<W, R, 4, T>(q, ldq, k + c * ks, ks, dim, scale, s + c);
  for (; c < n; ++c) qk_dot_block<W, R, 1, T>(q, ldq, k + c * ks, ks, dim, scale, s + c);
}

template <int W>
ATLAS_AI float lane_max(typename Vec<W>::F v) {
  float m = v[0];
  for (int lane = 1; lane < W; ++lane) m = v[lane] > m ? v[lane] : m;
  return m;
}
template <int W>
ATLAS_AI float lane_sum(typename Vec<W>::F v) {
  float t = 0.0f;
  for (int lane = 0; lane < W; ++lane) t += v[lane];
  return t;
}

// Online-softmax step for rows <= W rows with contiguous scores (s[r * kChunk + c]);
// the lanes from n up to a whole vector are set to -inf first (weight 0). The
// per-row maxima and rescale factors go in one vector over the rows (m, l, alpha
// hold at least W floats).
template <int W>
ATLAS_AI void softmax_chunk_dot(float* __restrict s, int rows, int n, float* __restrict m, float* __restrict l,
                                float* __restrict alpha) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const float inf = std::numeric_limits<float>::infinity();
  const int np = (n + W - 1) / W * W;
  F mc = F{} - inf;
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kChunk;
    for (int c = n; c < np; ++c) sr[c] = -inf;
    F mv = load<W>(sr);
    for (int c = W; c < np; c += W) {
      const F x = load<W>(sr + c);
      mv = mv > x ? mv : x;
    }
    mc[r] = lane_max<W>(mv);
  }
  const F mo = load<W>(m);
  const F mn = mo > mc ? mo : mc;
  const I none = mn == (F{} - inf);  // no key seen yet: subtract 0, weights 0
  const F ms = (F)((I)mn & ~none);
  store<W>(alpha, exp_nonpositive<W>(mo - ms));
  store<W>(m, mn);
  for (int r = 0; r < rows; ++r) {
    float* sr = s + r * kChunk;
    const float msr = ms[r];
    F sum = F{};
    for (int c = 0; c < np; c += W) {
      const F p = exp_nonpositive<W>(load<W>(sr + c) - msr);
      store<W>(sr + c, p);
      sum += p;
    }
    l[r] = l[r] * alpha[r] + lane_sum<W>(sum);
  }
}

// Online-softmax step for the n keys of a chunk, W rows at a time: scores s
// become weights P, alpha[r] = exp(m_old - m_new) rescales what was summed before.
template <int W>
ATLAS_AI void softmax_chunk(float* __restrict s, int rp, int n, float* __restrict m, float* __restrict l,
                            float* __restrict alpha) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const F neg_inf = F{} - std::numeric_limits<float>::infinity();
  for (int v = 0; v < rp; v += W) {
    const F mo = load<W>(m + v);
    F mc = load<W>(s + v);
    for (int c = 1; c < n; ++c) {
      const F x = load<W>(s + c * rp + v);
      mc = mc > x ? mc : x;
    }
    const F mn = mo > mc ? mo : mc;
    // A row that has seen no key yet (all -inf so far) subtracts 0: its weights are 0.
    const I none = mn == neg_inf;
    const F ms = (F)((I)mn & ~none);
    const F a = exp_nonpositive<W>(mo - ms);
    F sum = F{};
    for (int c = 0; c < n; ++c) {
      const F p = exp_nonpositive<W>(load<W>(s + c * rp + v) - ms);
      store<W>(s + c * rp + v, p);
      sum += p;
    }
    store<W>(l + v, load<W>(l + v) * a + sum);
    store<W>(m + v, mn);
    store<W>(alpha + v, a);
  }
}

// acc[i, d0 ..] = acc[i, d0 ..] * alpha[i] + sum_c s[i * sr + c * sc] * v[c, d0 ..] for RB rows
// and DB vectors of head_dim.
template <int W, int RB, int DB, typename T>
ATLAS_AI void pv_block(const float* __restrict s, int sr, int sc, const T* __restrict v, int64_t vs, int n,
                       const float* __restrict alpha, float* __restrict acc, int dim, int d0) {
  typedef typename Vec<W>::F F;
  F t[RB][DB];
  for (int i = 0; i < RB; ++i)
    for (int j = 0; j < DB; ++j) t[i][j] = F{};
  for (int c = 0; c < n; ++c) {
    const T* vr = v + c * vs + d0;
    F vv[DB];
    for (int j = 0; j < DB; ++j) vv[j] = load_row<W>(vr + j * W);
    const float* pc = s + c * sc;
    for (int i = 0; i < RB; ++i) {
      const float p = pc[i * sr];
      for (int j = 0; j < DB; ++j) t[i][j] += p * vv[j];
    }
  }
  for (int i = 0; i < RB; ++i) {
    const float a = alpha[i];
    float* ar = acc + static_cast<int64_t>(i) * dim + d0;
    for (int j = 0; j < DB; ++j) store<W>(ar + j * W, load<W>(ar + j * W) * a + t[i][j]);
  }
}

template <int W, int RB, typename T>
ATLAS_AI void pv_rows(const float* s, int sr, int sc, const T* v, int64_t vs, int n, const float* alpha,
                      float* acc, int dim) {
  // RB x DB accumulators (8 at most, 12 measured slower): each value vector serves RB rows.
  constexpr int DB = 2;
  int d0 = 0;
  for (; d0 + DB * W <= dim; d0 += DB * W) pv_block<W, RB, DB, T>(s, sr, sc, v, vs, n, alpha, acc, dim, d0);
  for (; d0 + W <= dim; d0 += W) pv_block<W, RB, 1, T>(s, sr, sc, v, vs, n, alpha, acc, dim, d0);
  for (; d0 < dim; ++d0)
    for (int i = 0; i < RB; ++i) {
      float t = 0.0f;
      for (int c = 0; c < n; ++c) t += s[i * sr + c * sc] * to_float(v[c * vs + d0]);
      float* a = acc + static_cast<int64_t>(i) * dim + d0;
      *a = *a * alpha[i] + t;
    }
}

template <int W, typename T>
ATLAS_AI void pv(const float* s, int sr, int sc, const T* v, int64_t vs, int n, const float* alpha, float* acc,
                 int dim, int rows) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<W, 4, T>(s + r * sr, sr, sc, v, vs, n, alpha + r, acc + r * dim, dim);
  switch (rows - r) {
    case 3: pv_rows<W, 3, T>(s + r * sr, sr, sc, v, vs, n, alpha + r, acc + r * dim, dim); break;
    case 2: pv_rows<W, 2, T>(s + r * sr, sr, sc, v, vs, n, alpha + r, acc + r * dim, dim); break;
    case 1: pv_rows<W, 1, T>(s + r * sr, sr, sc, v, vs, n, alpha + r, acc + r * dim, dim); break;
    default: break;
  }
}

// One tile of rows of one sequence against one kv head.
struct Job {
  const void* k = nullptr;  // the layer's K plane, offset to the kv head
  const void* v = nullptr;  // likewise V
  const int32_t* table = nullptr;
  int64_t block_size = 0, row = 0;  // row: elements per token row of a plane
  int64_t ctx = 0;                  // committed length
  int64_t begin = 0, end = 0;       // positions [begin, end) are visited
  int dim = 0, rows = 0, rp = 0;    // rp: rows padded to a multiple of W
  float scale = 0.0f;
  const float* qt = nullptr;        // [dim, rp] queries, transposed (but see dot)
  const float* maskf = nullptr;     // [tree node, rp]: 0 or -inf
  const uint8_t* any = nullptr;     // [tree node]: some row of the tile sees it
  float *acc = nullptr, *m = nullptr, *l = nullptr, *alpha = nullptr, *s = nullptr;
  float *kbuf = nullptr, *vbuf = nullptr;  // bf16 rows widened (rows path)
  bool dot = false;  // few rows: qt holds the queries untransposed, [rows, dim]
};

template <int W, typename T, bool kDot>
ATLAS_AI void attend_chunks(const Job& j) {
  const int dim = j.dim, rp = j.rp, rows = j.rows;
  const int64_t bs = j.block_size;
  std::fill(j.m, j.m + rp, -std::numeric_limits<float>::infinity());
  std::fill(j.l, j.l + rp, 0.0f);
  std::fill(j.acc, j.acc + static_cast<int64_t>(rows) * dim, 0.0f);
  const T* kp = static_cast<const T*>(j.k);
  const T* vp = static_cast<const T*>(j.v);
  for (int64_t pos = j.begin; pos < j.end;) {
    const int64_t off = pos % bs;
    int64_t n = std::min<int64_t>({kChunk, bs - off, j.end - pos});
    const bool tree = pos >= j.ctx;
    if (!tree) n = std::min(n, j.ctx - pos);  // a chunk is all context or all tree
    if (tree) {
      bool any = false;
      for (int64_t c = 0; c < n; ++c) any |= j.any[pos - j.ctx + c] != 0;
      if (!any) {  // no row of the tile sees these nodes
        pos += n;
        continue;
      }
    }
    const int nc = static_cast<int>(n);
    const int64_t first = (static_cast<int64_t>(j.table[pos / bs]) * bs + off) * j.row;
    const float* mk = tree ? j.maskf + (pos - j.ctx) * rp : nullptr;
    if constexpr (kDot) {
      const T* K = kp + first;  // widened as loaded: each key vector serves all rows
      switch (rows) {
        case 1: qk_dot<W, 1>(j.qt, dim, K, j.row, nc, dim, j.scale, j.s); break;
        case 2: qk_dot<W, 2>(j.qt, dim, K, j.row, nc, dim, j.scale, j.s); break;
        default: qk_dot<W, 3>(j.qt, dim, K, j.row, nc, dim, j.scale, j.s); break;
      }
      if (tree)
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < nc; ++c) j.s[r * kChunk + c] += mk[c * rp + r];
      softmax_chunk_dot<W>(j.s, rows, nc, j.m, j.l, j.alpha);
      pv<W>(j.s, kChunk, 1, vp + first, j.row, nc, j.alpha, j.acc, dim, rows);  // bf16 widened as loaded
    } else {
      // Key elements are broadcast one by one and each value vector is loaded once
      // per block of rows: bf16 rows are widened into kbuf and vbuf first.
      int64_t ks = 0, vs = 0;
      const float* K = rows_as_float<W>(kp + first, j.row, nc, dim, j.kbuf, &ks);
      const float* V = rows_as_float<W>(vp + first, j.row, nc, dim, j.vbuf, &vs);
      qk_rows<W>(j.qt, rp, K, ks, nc, dim, j.scale, j.s);
      if (tree)
        for (int c = 0; c < nc; ++c) {
          float* sc = j.s + c * rp;
          for (int v = 0; v < rp; v += W) store<W>(sc + v, load<W>(sc + v) + load<W>(mk + c * rp + v));
        }
      softmax_chunk<W>(j.s, rp, nc, j.m, j.l, j.alpha);
      pv<W>(j.s, 1, rp, V, vs, nc, j.alpha, j.acc, dim, rows);
    }
    pos += n;
  }
}

template <int W, typename T>
ATLAS_AI void attend_impl(const Job& j) {
  if (j.dot)
    attend_chunks<W, T, true>(j);
  else
    attend_chunks<W, T, false>(j);
}

// Few rows (at most dot_rows(W), and head_dim a whole number of vectors) take the
// dot-product path.
constexpr int dot_rows(int width) { return width >= 8 ? 3 : 2; }

#define ATLAS_DEFINE_ATTEND(NS, W, ATTR)                                          \
  namespace NS {                                                                  \
  ATTR void attend(const Job& j, const float*) { attend_impl<W, float>(j); }       \
  ATTR void attend(const Job& j, const uint16_t*) { attend_impl<W, uint16_t>(j); } \
  }

ATLAS_DEFINE_ATTEND(w4, 4, )
#if ATLAS_ATTN_WIDE
ATLAS_DEFINE_ATTEND(w8, 8, __attribute__((target("avx2,fma"))))
#endif

// The vector width in use: the widest the CPU has, at most ATLAS_SIMD_WIDTH.
int simd_width() {
#if ATLAS_ATTN_WIDE
  static const int width = [] {
    const char* cap_env = std::getenv("ATLAS_SIMD_WIDTH");
    const int cap = cap_env ? std::atoi(cap_env) : 8;
    if (cap >= 8 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 4;
  }();
  return width;
#else
  return 4;
#endif
}

template <typename T>
void attend(int width, const Job& j) {
  const T* tag = nullptr;
#if ATLAS_ATTN_WIDE
  if (width == 8) return w8::attend(j, tag);
#endif
  (void)width;
  w4::attend(j, tag);
}

Status validate(const TreeAttentionProblem& p, int64_t* max_queries) {
  if (p.cache == nullptr) return Status::Invalid("cache must not be null");
  const KVCacheConfig& cfg = p.cache->config();
  if (cfg.num_layers < 1 || p.cache->storage() == nullptr) return Status::Invalid("cache is not initialised");
  if (!p.cache->host_storage())
    return Status::Invalid("cache: tree_attention on the CPU needs storage in host memory");
  if (p.layer < 0 || p.layer >= cfg.num_layers)
    return Status::Invalid("layer must be in [0, num_layers = " + str(cfg.num_layers) + "), got " +
                           str(p.layer));
  if (p.num_q_heads < 1 || p.num_q_heads % cfg.num_kv_heads != 0)
    return Status::Invalid("num_q_heads must be a positive multiple of num_kv_heads = " +
                           str(cfg.num_kv_heads) + ", got " + str(p.num_q_heads));
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale))
    return Status::Invalid("scale must be a positive finite number");
  if (p.threads < 1 || p.threads > kPoolMaxThreads)
    return Status::Invalid("threads must be in [1, " + str(kPoolMaxThreads) + "], got " + str(p.threads));
  if (p.batch < 0) return Status::Invalid("batch must be >= 0, got " + str(p.batch));
  *max_queries = 0;
  if (p.batch == 0) return Status::Ok();
  if (p.seq_ids == nullptr || p.q_offsets == nullptr)
    return Status::Invalid("seq_ids and q_offsets must not be null");
  if (p.q_offsets[0] != 0) return Status::Invalid("q_offsets[0] must be 0, got " + str(p.q_offsets[0]));
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.q_offsets[b + 1] < p.q_offsets[b])
      return Status::Invalid("q_offsets must be non-decreasing, but q_offsets[" + str(b + 1) + "] = " +
                             str(p.q_offsets[b + 1]) + " < q_offsets[" + str(b) + "] = " +
                             str(p.q_offsets[b]));
    // No overflow: 0 <= q_offsets[b] <= q_offsets[b + 1].
    const int64_t n = p.q_offsets[b + 1] - p.q_offsets[b];
    int32_t reserved = 0;
    const Status st = p.cache->reserved(p.seq_ids[b], &reserved);
    if (!st.ok()) return Status::Invalid("seq_ids[" + str(b) + "]: " + st.message);
    if (n != reserved)
      return Status::Invalid("seq_ids[" + str(b) + "] = " + str(p.seq_ids[b]) + " has " + str(reserved) +
                             " reserved slots, but q_offsets gives it " + str(n) +
                             " queries; they must match");
    *max_queries = std::max(*max_queries, n);
  }
  const int64_t total = p.q_offsets[p.batch];
  if (total == 0) return Status::Ok();
  if (p.q == nullptr || p.out == nullptr || p.parents == nullptr)
    return Status::Invalid("q, out and parents must not be null");
  const uintptr_t esize = static_cast<uintptr_t>(dtype_size(cfg.dtype));
  if (reinterpret_cast<uintptr_t>(p.q) % esize != 0 || reinterpret_cast<uintptr_t>(p.out) % esize != 0)
    return Status::Invalid("q and out must be aligned to their element size");
  // Same rule as validate_parents (tree.h): the root first, every other parent earlier.
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.q_offsets[b];
    const int64_t n = p.q_offsets[b + 1] - q0;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t par = p.parents[q0 + i];
      const bool ok = i == 0 ? par == -1 : (par >= 0 && par < i);
      if (!ok)
        return Status::Invalid("parents[" + str(q0 + i) + "] (node " + str(i) + " of sequence " + str(b) +
                               ") must be " +
                               (i == 0 ? std::string("-1 (the root)") : "in [0, " + str(i) + ")") +
                               ", got " + str(par));
    }
  }
  return Status::Ok();
}

// One tile of queries of one sequence: what its kv heads' passes share. The
// heads are independent (each reads its own K and V columns and writes its
// own output heads), so parts of the pool take contiguous ranges of them, each
// with scratch of its own; a head's result does not depend on the split.
template <typename T>
struct Tile {
  Job job;  // all but the scratch pointers
  const T* q = nullptr;
  T* out = nullptr;
  const T* kplane = nullptr;
  const T* vplane = nullptr;
  int64_t q_stride_token = 0, q_stride_head = 0;
  int64_t first = 0, tq = 0;  // the tile's first query (batch-wide index) and its query count
  int group = 0, nkv = 0, num_q_heads = 0, width = 0;
  int64_t rows_max = 0, rp_max = 0;
  // Two segments per kv head (see kSplitContext) when split is set: positions
  // [0, mid) and [mid, end), each a unit of work whose running max, sum and
  // accumulator go to part_m / part_l / part_acc[unit], merged by the caller.
  bool split = false;
  int64_t mid = 0;
  float *part_m = nullptr, *part_l = nullptr, *part_acc = nullptr;
  mutable std::atomic<bool> failed{false};  // a part could not allocate its scratch

  // Output row of the tile's query qi, query head h of kv head g.
  T* out_row(int64_t qi, int g, int h) const {
    return out + ((first + qi) * num_q_heads + static_cast<int64_t>(g) * group + h) * job.dim;
  }
};

template <typename T>
void tile_heads(const void* arg, int32_t part, int32_t parts) {
  const Tile<T>& t = *static_cast<const Tile<T>*>(arg);
  const int units = t.nkv * (t.split ? 2 : 1);
  const int u0 = static_cast<int>(int64_t{units} * part / parts);
  const int u1 = static_cast<int>(int64_t{units} * (part + 1) / parts);
  if (u0 >= u1) return;
  const int dim = t.job.dim, group = t.group;
  Job job = t.job;
  thread_local HeadScratch ws;
  try {
    job.qt = grow(ws.qt, static_cast<size_t>(t.rp_max * dim));
    job.acc = grow(ws.acc, static_cast<size_t>(t.rows_max * dim));
    job.m = grow(ws.m, static_cast<size_t>(t.rp_max));
    job.l = grow(ws.l, static_cast<size_t>(t.rp_max));
    job.alpha = grow(ws.alpha, static_cast<size_t>(t.rp_max));
    job.s = grow(ws.s, static_cast<size_t>(kChunk * t.rp_max));
    job.kbuf = grow(ws.kbuf, static_cast<size_t>(kChunk) * dim);
    job.vbuf = grow(ws.vbuf, static_cast<size_t>(kChunk) * dim);
  } catch (const std::bad_alloc&) {
    t.failed.store(true);
    return;
  }
  float* qt = ws.qt.data();
  const int rows = job.rows, rp = job.rp;
  const int splits = t.split ? 2 : 1;
  int last_g = -1;
  for (int u = u0; u < u1; ++u) {
    const int g = u / splits;
    if (t.split) {
      const bool first_half = u % 2 == 0;
      job.begin = first_half ? 0 : t.mid;
      job.end = first_half ? t.mid : t.job.end;
      job.acc = t.part_acc + static_cast<int64_t>(u) * t.rows_max * dim;
      job.m = t.part_m + static_cast<int64_t>(u) * t.rp_max;
      job.l = t.part_l + static_cast<int64_t>(u) * t.rp_max;
    }
    if (g == last_g) {  // the same head's queries, already in qt
      attend<T>(t.width, job);
      continue;
    }
    last_g = g;
    // qt[d * rp + r] = query row r (query first + r / group, head g * group + r % group),
    // or qt[r * dim + d] on the dot-product path.
    for (int64_t qi = 0; qi < t.tq; ++qi)
      for (int h = 0; h < group; ++h) {
        const T* src = t.q + (t.first + qi) * t.q_stride_token +
                       (static_cast<int64_t>(g) * group + h) * t.q_stride_head;
        const int64_t r = qi * group + h;
        if (job.dot)
          for (int d = 0; d < dim; ++d) qt[r * dim + d] = to_float(src[d]);
        else
          for (int d = 0; d < dim; ++d) qt[static_cast<int64_t>(d) * rp + r] = to_float(src[d]);
      }
    if (!job.dot)
      for (int d = 0; d < dim; ++d)
        std::fill(qt + static_cast<int64_t>(d) * rp + rows, qt + static_cast<int64_t>(d + 1) * rp, 0.0f);
    job.k = t.kplane + static_cast<int64_t>(g) * dim;
    job.v = t.vplane + static_cast<int64_t>(g) * dim;
    attend<T>(t.width, job);
    if (t.split) continue;  // the caller merges the two segments

    const float* l = job.l;
    for (int64_t qi = 0; qi < t.tq; ++qi)
      for (int h = 0; h < group; ++h) {
        const int64_t r = qi * group + h;
        const float inv = 1.0f / l[r];
        T* dst = t.out_row(qi, g, h);
        const float* a = job.acc + r * dim;
        for (int d = 0; d < dim; ++d) store_out(dst + d, a[d] * inv);
      }
  }
}

// Merges the two segments of each kv head of a split tile (unit 2g: positions
// [0, mid), unit 2g + 1: [mid, end)) and writes the output rows: with M the
// larger running max, out = (acc0 e^(m0 - M) + acc1 e^(m1 - M)) / (l0 e^(m0 - M) +
// l1 e^(m1 - M)). Every row sees position 0 (committed context is visible to all)
// and its own node, so both segments saw keys and both maxima are finite.
template <typename T>
void merge_segments(const Tile<T>& t) {
  const int dim = t.job.dim, rows = t.job.rows;
  for (int g = 0; g < t.nkv; ++g) {
    const int64_t u0 = 2 * g, u1 = 2 * g + 1;
    for (int r = 0; r < rows; ++r) {
      const float m0 = t.part_m[u0 * t.rp_max + r], m1 = t.part_m[u1 * t.rp_max + r];
      const float mx = std::max(m0, m1);
      const float a0 = std::exp(m0 - mx), a1 = std::exp(m1 - mx);
      const float inv = 1.0f / (t.part_l[u0 * t.rp_max + r] * a0 + t.part_l[u1 * t.rp_max + r] * a1);
      const float* acc0 = t.part_acc + (u0 * t.rows_max + r) * dim;
      const float* acc1 = t.part_acc + (u1 * t.rows_max + r) * dim;
      const int64_t qi = r / t.group, h = r % t.group;
      T* dst = t.out_row(qi, g, h);
      for (int d = 0; d < dim; ++d) store_out(dst + d, (acc0[d] * a0 + acc1[d] * a1) * inv);
    }
  }
}

template <typename T>
void run(const TreeAttentionProblem& p, int64_t max_queries) {
  const KVCacheConfig& cfg = p.cache->config();
  const int dim = cfg.head_dim;
  const int nkv = cfg.num_kv_heads;
  const int group = p.num_q_heads / nkv;
  const int64_t bs = cfg.block_size;
  const int64_t row = static_cast<int64_t>(nkv) * dim;  // elements per token row of a plane
  const int64_t plane = static_cast<int64_t>(cfg.num_blocks) * bs * row;
  const int width = simd_width();

  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(max_queries, kTileFloats / (group * dim)));
  thread_local Workspace ws;
  Tile<T> t;
  t.rows_max = tile * group;
  t.rp_max = (t.rows_max + 7) / 8 * 8;
  float* maskf = grow(ws.maskf, static_cast<size_t>(max_queries * t.rp_max));
  uint8_t* any = grow(ws.any, static_cast<size_t>(max_queries));
  const float neg_inf = -std::numeric_limits<float>::infinity();

  t.kplane = static_cast<const T*>(p.cache->storage()) + (2 * static_cast<int64_t>(p.layer)) * plane;
  t.vplane = t.kplane + plane;
  t.q = static_cast<const T*>(p.q);
  t.out = static_cast<T*>(p.out);
  t.q_stride_token = p.q_stride_token;
  t.q_stride_head = p.q_stride_head;
  t.group = group;
  t.nkv = nkv;
  t.num_q_heads = p.num_q_heads;
  t.width = width;
  Job& job = t.job;
  job.table = nullptr;
  job.block_size = bs;
  job.row = row;
  job.dim = dim;
  job.scale = p.scale;
  job.maskf = maskf;
  job.any = any;

  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.q_offsets[b];
    const int64_t nq = p.q_offsets[b + 1] - q0;
    if (nq == 0) continue;
    int32_t nblocks = 0;
    int64_t ctx = 0;
    p.cache->block_table(p.seq_ids[b], &job.table, &nblocks);  // validated: cannot fail
    p.cache->length(p.seq_ids[b], &ctx);
    const int32_t* parents = p.parents + q0;

    for (int64_t t0 = 0; t0 < nq; t0 += tile) {
      const int64_t tq = std::min(tile, nq - t0);
      const int rows = static_cast<int>(tq * group);
      const int rp = (rows + width - 1) / width * width;
      // Ancestors precede their descendants, so no row of the tile needs a node past its last query.
      const int64_t nodes = t0 + tq;
      // maskf[j * rp + r] = 0 iff tree node j is row r's query or one of its ancestors, else -inf
      // (and -inf for the padding rows).
      std::fill(maskf, maskf + nodes * rp, neg_inf);
      std::memset(any, 0, static_cast<size_t>(nodes));
      for (int64_t qi = 0; qi < tq; ++qi)
        for (int32_t jn = static_cast<int32_t>(t0 + qi); jn >= 0; jn = parents[jn]) {
          std::fill(maskf + jn * rp + qi * group, maskf + jn * rp + (qi + 1) * group, 0.0f);
          any[jn] = 1;
        }
      job.ctx = ctx;
      job.begin = 0;
      job.end = ctx + nodes;
      job.rows = rows;
      job.rp = rp;
      job.dot = rows <= dot_rows(width) && dim % width == 0;
      t.first = q0 + t0;
      t.tq = tq;
      // Long contexts: two segments per kv head, split at a page boundary.
      t.mid = ctx >= kSplitContext ? ctx / 2 / bs * bs : 0;
      t.split = t.mid > 0;
      const int units = nkv * (t.split ? 2 : 1);
      if (t.split) {
        t.part_m = grow(ws.part_m, static_cast<size_t>(units * t.rp_max));
        t.part_l = grow(ws.part_l, static_cast<size_t>(units * t.rp_max));
        t.part_acc = grow(ws.part_acc, static_cast<size_t>(units * t.rows_max * dim));
      }
      parallel_parts(std::min<int32_t>(p.threads, units), tile_heads<T>, &t);
      if (t.failed.load()) throw std::bad_alloc();
      if (t.split) merge_segments(t);
    }
  }
}

}  // namespace

Status tree_attention(const TreeAttentionProblem& problem) {
  int64_t max_queries = 0;
  ATLAS_RETURN_IF_ERROR(validate(problem, &max_queries));
  if (max_queries == 0) return Status::Ok();
  try {
    if (problem.cache->config().dtype == DType::kFloat32)
      run<float>(problem, max_queries);
    else
      run<uint16_t>(problem, max_queries);
  } catch (const std::bad_alloc&) {
    return Status::Internal("tree_attention: cannot allocate its scratch space");
  }
  return Status::Ok();
}

}  // namespace atlas
