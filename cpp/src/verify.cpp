// verify.cpp: the CPU verifier. The rules it implements are in atlas/verify.h;
// this file is about doing it at the speed of reading the logits:
//   - only the rows on the walk are read (the root, then each accepted node);
//   - greedy is one vectorised pass per row: maximum, its lowest index, and the
//     NaN/+inf check;
//   - sampling without top_k is one fused pass per row: per 8 KiB block the
//     maximum and check, then 2^t for every token against the running maximum
//     (exp evaluated once per token, a polynomial); blocks computed against a
//     lower maximum are rescaled only when their weights are needed;
//   - top_k reads the row once for block maxima, then rereads only the ~k
//     blocks that can hold a top-k token; exp only for the candidates;
//   - top_p sorts only what it must: after top_k, the k candidates; otherwise a
//     histogram of the mass over buckets of t finds the one bucket where the
//     cut falls, and only that bucket is sorted;
//   - sums are accumulated in double; bfloat16 rows are widened on the fly;
//   - kernels run on 4-, 8- or 16-float vectors (SSE4.2 / AVX2 / AVX-512,
//     chosen at run time) with identical results;
//   - all scratch lives in the caller's workspace: verify() never allocates
//     (std::string only on error paths).
#include "atlas/verify.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "atlas/philox.h"
#include "atlas/tree.h"
#include "simd.h"

namespace atlas {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// Why 2^30: the row loops index tokens with int32 and step up to a few hundred
// past the index; 2^30 leaves that headroom, and no vocabulary comes near it.
constexpr int64_t kMaxVocab = int64_t{1} << 30;

// ---- Philox-4x32-10 (Salmon et al., SC'11), as in Random123 ---------------------

// Constants and streams: atlas/philox.h, shared with the CUDA twin.
constexpr uint32_t kPhiloxM0 = philox::kM0;
constexpr uint32_t kPhiloxM1 = philox::kM1;
constexpr uint32_t kPhiloxW0 = philox::kW0;
constexpr uint32_t kPhiloxW1 = philox::kW1;
using philox::kStreamDraft;
using philox::kStreamDraftBonus;
using philox::kStreamOneHot;

struct PhiloxOut {
  uint32_t w0, w1;
};

// The first two output words of Philox-4x32-10; the uniform needs no more.
PhiloxOut philox_two_words(uint64_t seed, uint64_t position, uint32_t stream, uint32_t j) {
  uint32_t c0 = static_cast<uint32_t>(position), c1 = static_cast<uint32_t>(position >> 32);
  uint32_t c2 = stream, c3 = j;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return {c0, c1};
}

// ---- SIMD ---------------------------------------------------------------------------
//
// The row kernels are written once over vectors of W floats with GCC/Clang
// vector extensions (plain C++ operators that the compiler maps to SSE, AVX or
// NEON instructions) and instantiated for W = 4 (the portable build: SSE4.2 on
// x86-64), W = 8 (in functions compiled for AVX2) and W = 16 (AVX-512F); the
// widest the CPU has runs. All work on kLanes = 16 logical lanes (four, two or
// one vector per step), every reduction runs over those lanes in one fixed
// order, and none contracts a multiply and an add into an FMA, so all return
// the same bits.

constexpr int kLanes = 16;

// simd.h's vectors of W lanes, with D, doubles of F's lanes (all four of
// them for W = 4, half of F's otherwise), and K, the 2W int16 lanes of
// bfloat16 keys.
template <int W>
struct Simd;
template <>
struct Simd<4> : simd::Vec<4> {
  typedef double D __attribute__((vector_size(32)));
  typedef int16_t K __attribute__((vector_size(16)));
};
template <>
struct Simd<8> : simd::Vec<8> {
  typedef double D __attribute__((vector_size(32)));
  typedef int16_t K __attribute__((vector_size(32)));
};
template <>
struct Simd<16> : simd::Vec<16> {
  typedef double D __attribute__((vector_size(64)));
  typedef int16_t K __attribute__((vector_size(64)));
};

#define ATLAS_INLINE inline __attribute__((always_inline))

// The helpers that pass vectors by value are always inlined, so the warning
// that wide vectors would change the calling convention does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

template <int W>
ATLAS_INLINE typename Simd<W>::F splat(float x) {
  return typename Simd<W>::F{} + x;
}
template <int W>
ATLAS_INLINE typename Simd<W>::F load(const float* p) {
  typename Simd<W>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// bfloat16 is the upper half of a float32: widening is a shift.
template <int W>
ATLAS_INLINE typename Simd<W>::F load(const uint16_t* p) {
  typename Simd<W>::H h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<typename Simd<W>::F>(__builtin_convertvector(h, typename Simd<W>::U) << 16);
}
template <int W>
ATLAS_INLINE void store(float* p, const typename Simd<W>::F& v) {
  std::memcpy(p, &v, sizeof(v));
}
ATLAS_INLINE float at(const float* p, int64_t j) { return p[j]; }
ATLAS_INLINE float at(const uint16_t* p, int64_t j) { return bf16_to_float(p[j]); }

// One double accumulator per logical lane, fed W floats at a time: sub-vector
// h of a step holds lanes h*W .. h*W + W - 1. Each lane adds its values in the
// same order whatever W is, and sum() adds the lanes in ascending order.
template <int W>
struct WideAcc {
  static constexpr int kParts = W == 4 ? 1 : 2;
  typename Simd<W>::D acc[kLanes / W][kParts];

  WideAcc() {
    for (auto& a : acc)
      for (auto& p : a) p = typename Simd<W>::D{};
  }
  ATLAS_INLINE void add(int h, const typename Simd<W>::F& v) {
    using D = typename Simd<W>::D;
    if constexpr (W == 4) {
      acc[h][0] += __builtin_convertvector(v, D);
    } else {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
      if constexpr (W == 8) {
        acc[h][0] += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), D);
        acc[h][1] += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), D);
      } else {
        acc[h][0] += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), D);
        acc[h][1] += __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), D);
      }
#else
      for (int q = 0; q < 2; ++q) {
        float half_f[W / 2];
        std::memcpy(half_f, reinterpret_cast<const char*>(&v) + sizeof(half_f) * q, sizeof(half_f));
        for (int l = 0; l < W / 2; ++l) acc[h][q][l] += static_cast<double>(half_f[l]);
      }
#endif
    }
  }
  double sum() const {
    double s = 0.0;
    for (int h = 0; h < kLanes / W; ++h)
      for (int q = 0; q < kParts; ++q)
        for (int l = 0; l < W / kParts; ++l) s += acc[h][q][l];
    return s;
  }
};

// 2^t for t <= 0 (or -inf), relative error below 2e-7. Below t = -126.5 the
// result is exactly 0: such a token is 2^-126 times less likely than the most
// likely one, and -inf (masked) logits keep probability 0.
template <int W>
ATLAS_INLINE typename Simd<W>::F exp2_nonpositive(const typename Simd<W>::F& t_in) {
  using F = typename Simd<W>::F;
  using U = typename Simd<W>::U;
  const F floor = splat<W>(-127.0f);
  const F t = t_in > floor ? t_in : floor;
  // Adding 1.5 * 2^23 rounds t to the integer n in the low mantissa bits of k.
  constexpr float kRound = 12582912.0f;
  const F k = t + kRound;
  const F f = t - (k - kRound);  // in [-0.5, 0.5], exact
  // 2^f = 1 + c1 f + ... + c5 f^5, fitted for minimal relative error in float
  // arithmetic; evaluated in Estrin's form, which halves the dependency chain
  // (the loop is bound by it more than by the operation count).
  const F f2 = f * f;
  const F lo = f * 6.931470037e-01f + 1.0f;
  const F mid = f * 5.550733954e-02f + 2.402224243e-01f;
  const F hi = f * 1.326470054e-03f + 9.671534412e-03f;
  const F p = lo + f2 * (mid + f2 * hi);
  // 2^n: the low bits of k are n + 0x400000 above a fixed exponent; shifting
  // (bits + 127) left by 23 leaves (n + 127) << 23, a float in [0, 1]
  // (n = -127 gives +0).
  const U scale = (reinterpret_cast<U>(k) + 127u) << 23;
  return p * reinterpret_cast<F>(scale);
}

// The same function for one value (same operations, so the same bits).
ATLAS_INLINE float exp2_one(float t) { return exp2_nonpositive<4>(splat<4>(t))[0]; }

// The largest lane of v (NaN lanes ignored), halving the vector while it is
// wider than 4.
template <int W>
ATLAS_INLINE float reduce_max(const typename Simd<W>::F& v) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  if constexpr (W == 16) {
    const Simd<8>::F a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const Simd<8>::F b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return reduce_max<8>(a > b ? a : b);
  } else if constexpr (W == 8) {
    const Simd<4>::F a = __builtin_shufflevector(v, v, 0, 1, 2, 3);
    const Simd<4>::F b = __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return reduce_max<4>(a > b ? a : b);
  }
#endif
  float m = -kInf;
  for (int l = 0; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

struct RowMax {
  float max = -kInf;
  int32_t argmax = 0;  // lowest index holding max
  bool finite = true;  // no NaN and no +inf in the row (-inf is allowed)
};

// One pass: maximum, the lowest index where it occurs, and whether the row
// holds a NaN or +inf (!(x < +inf) is true exactly for those). The answer is
// exact whatever the lane layout, so the layout is free: kChains<W> independent
// vectors per step, so that no compare waits on the previous one (as many as
// the registers allow; measured on a Zen 4).
template <int W>
constexpr int kChains = W == 16 ? 4 : 2;

template <int W, class T>
ATLAS_INLINE RowMax scan_row_impl(const T* __restrict row, int32_t n) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  constexpr int32_t kStep = kChains<W> * W;
  const F inf = splat<W>(kInf);
  const F one = splat<W>(1.0f);  // bad counts, per lane, the NaN and +inf seen
  // ix holds the step at which a lane last rose: token = step * kStep + c * W + lane.
  F mx[kChains<W>], bad[kChains<W>];
  I ix[kChains<W>];
  for (int c = 0; c < kChains<W>; ++c) {
    mx[c] = splat<W>(-kInf);
    bad[c] = F{};
    ix[c] = I{};
  }
  I step = I{};
  int32_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    for (int c = 0; c < kChains<W>; ++c) {
      const F x = load<W>(row + j + c * W);
      const I gt = x > mx[c];  // strict: each lane keeps its first maximum
      mx[c] = gt ? x : mx[c];
      ix[c] = gt ? step : ix[c];
      bad[c] += x < inf ? F{} : one;
    }
    step += 1;
  }
  RowMax r;
  int32_t any_bad = 0;
  for (int c = 0; c < kChains<W>; ++c) {
    for (int l = 0; l < W; ++l) {
      any_bad |= bad[c][l] != 0.0f;
      const int32_t index = ix[c][l] * kStep + c * W + l;
      if (mx[c][l] > r.max || (mx[c][l] == r.max && index < r.argmax)) {
        r.max = mx[c][l];
        r.argmax = index;
      }
    }
  }
  // The tail holds indices above every lane's: it wins only when strictly larger.
  for (; j < n; ++j) {
    const float x = at(row, j);
    any_bad |= !(x < kInf);
    if (x > r.max) {
      r.max = x;
      r.argmax = j;
    }
  }
  r.finite = any_bad == 0;
  return r;
}

// bfloat16 greedy without widening: a bfloat16's bits h, as int16, map to
//   key = (h ^ (s & 0x7fff)) - s,  s = h >> 15 (0 or -1),
// which orders keys as the floats are ordered (negative values have their
// magnitude bits flipped, then move up by one so that -0 and +0 share key 0).
// +inf is 0x7f80 and NaNs lie beyond the infinities: a maximum key >= 0x7f80 or
// a minimum key below that of -inf means NaN or +inf. Twice the lanes of a float
// vector, and exact: the lowest index of the maximum, as torch.argmax.
constexpr int16_t kKeyPosInf = 0x7f80;
constexpr int16_t kKeyNegInf = -32640;  // key of 0xff80

ATLAS_INLINE int16_t bf16_key(uint16_t bits) {
  const int16_t h = static_cast<int16_t>(bits);
  const int16_t sign = static_cast<int16_t>(h >> 15);
  return static_cast<int16_t>((h ^ (sign & 0x7fff)) - sign);
}

template <int W>
ATLAS_INLINE RowMax scan_row_bf16_impl(const uint16_t* __restrict row, int32_t n) {
  using K = typename Simd<W>::K;
  constexpr int32_t L = 2 * W;              // lanes per vector
  constexpr int32_t kStep = kChains<W> * L;   // tokens per step
  // The step within a chunk is an int16 lane: chunks of 2^14 steps.
  constexpr int32_t kChunkSteps = 1 << 14;
  int16_t best_key = std::numeric_limits<int16_t>::min();
  int16_t lowest = std::numeric_limits<int16_t>::max();
  int32_t best = 0;
  int32_t j = 0;
  while (j + kStep <= n) {
    const int32_t steps = std::min(kChunkSteps, (n - j) / kStep);
    K mx[kChains<W>], mn[kChains<W>], ix[kChains<W>];
    for (int c = 0; c < kChains<W>; ++c) {
      mx[c] = K{} + std::numeric_limits<int16_t>::min();
      mn[c] = K{} + std::numeric_limits<int16_t>::max();
      ix[c] = K{};
    }
    K step = K{};
    for (int32_t s = 0; s < steps; ++s) {
      for (int c = 0; c < kChains<W>; ++c) {
        K h;
        std::memcpy(&h, row + j + s * kStep + c * L, sizeof(h));
        const K sign = h >> 15;
        const K key = (h ^ (sign & 0x7fff)) - sign;
        const K gt = key > mx[c];  // strict: each lane keeps its first maximum
        mx[c] = gt ? key : mx[c];
        ix[c] = gt ? step : ix[c];
        mn[c] = key < mn[c] ? key : mn[c];
      }
      step += 1;
    }
    for (int c = 0; c < kChains<W>; ++c) {
      for (int l = 0; l < L; ++l) {
        lowest = mn[c][l] < lowest ? mn[c][l] : lowest;
        const int32_t index = j + ix[c][l] * kStep + c * L + l;
        if (mx[c][l] > best_key || (mx[c][l] == best_key && index < best)) {
          best_key = mx[c][l];
          best = index;
        }
      }
    }
    j += steps * kStep;
  }
  for (; j < n; ++j) {  // the tail holds indices above every lane's
    const int16_t key = bf16_key(row[j]);
    lowest = key < lowest ? key : lowest;
    if (key > best_key) {
      best_key = key;
      best = j;
    }
  }
  RowMax r;
  r.finite = best_key < kKeyPosInf && lowest >= kKeyNegInf;
  r.argmax = best;
  r.max = best_key == kKeyNegInf ? -kInf : bf16_to_float(row[best]);
  return r;
}

// The dense sampling pass over one row, fused so that the row is read from
// memory once: per block of kExpBlock elements (8 KiB of float32, which stays in
// L1), the block's maximum and NaN/+inf check, then its weights relative to the
// running maximum M_b (the maximum of this block and all before it):
//   w[j] = 2^((row[j] - M_b) * c),  block_sum[b] = sum of the block's w.
// A block whose M_b is below the row's maximum M is scaled by 2^((M_b - M) c)
// only when its weights are needed (Dist::materialize); the total needs just
// the block sums.
constexpr int32_t kExpBlock = 2048;

struct DenseRow {
  float max = -kInf;
  bool finite = true;
  double total = 0.0;
};

inline int32_t num_exp_blocks(int64_t vocab) { return static_cast<int32_t>((vocab + kExpBlock - 1) / kExpBlock); }

// The factor that brings block weights computed against block_max to the row maximum.
ATLAS_INLINE float block_factor(float block_max, float row_max, float c) {
  return block_max == row_max ? 1.0f : exp2_one((block_max - row_max) * c);
}

template <int W, class T>
ATLAS_INLINE DenseRow exp_row_impl(const T* __restrict row, int32_t n, float c, float* __restrict w,
                                   float* __restrict block_max, double* __restrict block_sum) {
  using F = typename Simd<W>::F;
  constexpr int S = kLanes / W;
  const F inf = splat<W>(kInf);
  const F one = splat<W>(1.0f);  // bad counts, per lane, the NaN and +inf seen
  F bad[S];
  for (int h = 0; h < S; ++h) bad[h] = F{};
  int32_t tail_bad = 0;
  float run = -kInf;
  int32_t nb = 0;
  for (int32_t b0 = 0; b0 < n; b0 += kExpBlock, ++nb) {
    const int32_t len = std::min(kExpBlock, n - b0);
    const T* r = row + b0;
    float* wb = w + b0;
    F mx[S];
    for (int h = 0; h < S; ++h) mx[h] = splat<W>(-kInf);
    int32_t j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      for (int h = 0; h < S; ++h) {
        const F x = load<W>(r + j + h * W);
        mx[h] = x > mx[h] ? x : mx[h];
        bad[h] += x < inf ? F{} : one;
      }
    }
    for (int h = 0; h < S; ++h) {
      const float m = reduce_max<W>(mx[h]);
      run = m > run ? m : run;
    }
    for (; j < len; ++j) {
      const float x = at(r, j);
      tail_bad |= !(x < kInf);
      run = x > run ? x : run;
    }
    block_max[nb] = run;
    if (run == -kInf) {  // everything so far is -inf: weight 0 (and no -inf - -inf)
      std::fill(wb, wb + len, 0.0f);
      block_sum[nb] = 0.0;
      continue;
    }
    // Eight steps per widening: each lane adds its eight weights pairwise in
    // float (three roundings deep), then in double.
    constexpr int32_t kStep = 8 * kLanes;
    WideAcc<W> acc;
    j = 0;
    for (; j + kStep <= len; j += kStep) {
      // The next block's max pass reads from memory: ask for it while the
      // exponentials keep the core busy.
      if (b0 + kExpBlock + j + kStep <= n) {
        const char* next = reinterpret_cast<const char*>(r + kExpBlock + j);
        for (size_t off = 0; off < kStep * sizeof(T); off += 64) __builtin_prefetch(next + off);
      }
      for (int h = 0; h < S; ++h) {
        F e[8];
        for (int q = 0; q < 8; ++q) {
          const int32_t at_q = j + q * kLanes + h * W;
          e[q] = exp2_nonpositive<W>((load<W>(r + at_q) - run) * c);
          store<W>(wb + at_q, e[q]);
        }
        acc.add(h, ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7])));
      }
    }
    for (; j < len; j += kLanes) {
      const int32_t count = std::min(kLanes, len - j);
      float x[kLanes], e[kLanes];
      for (int l = 0; l < kLanes; ++l) x[l] = l < count ? at(r, j + l) : -kInf;
      for (int h = 0; h < S; ++h) {
        const F eh = exp2_nonpositive<W>((load<W>(x + h * W) - run) * c);
        store<W>(e + h * W, eh);
        acc.add(h, eh);
      }
      for (int32_t l = 0; l < count; ++l) wb[j + l] = e[l];
    }
    block_sum[nb] = acc.sum();
  }
  DenseRow out;
  for (int h = 0; h < S; ++h)
    for (int l = 0; l < W; ++l) tail_bad |= bad[h][l] != 0.0f;
  out.finite = tail_bad == 0;
  out.max = run;
  if (!out.finite || run == -kInf) return out;
  double total = 0.0;
  for (int32_t b = 0; b < nb; ++b)
    total += block_sum[b] * static_cast<double>(block_factor(block_max[b], run, c));
  out.total = total;
  return out;
}

// Sum of w[0..n) in double: every element widened; two independent sets of
// lane accumulators so that the adds do not wait on each other.
template <int W>
ATLAS_INLINE double sum_floats_impl(const float* __restrict w, int32_t n) {
  WideAcc<W> acc[2];
  int32_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes)
    for (int g = 0; g < 2; ++g)
      for (int h = 0; h < kLanes / W; ++h) acc[g].add(h, load<W>(w + j + g * kLanes + h * W));
  double s = acc[0].sum() + acc[1].sum();
  for (; j < n; ++j) s += static_cast<double>(w[j]);
  return s;
}

// Defined with the dispatch below.
double sum_floats(const float* w, int32_t n);

// ---- workspace ----------------------------------------------------------------------

struct Cand {
  float x;     // raw logit
  float w;     // 2^t, t = (x - max) log2(e) / T
  int32_t id;  // token
};

// top_p buckets: kBucketsPerOctave per unit of t (a factor 2 in probability)
// down to the weight floor at t = -127; within one bucket probabilities differ
// by at most 2^(1/16) ~ 1.04, so the one bucket the cut falls in is small.
constexpr int32_t kBucketsPerOctave = 16;
constexpr int32_t kNumBuckets = 128 * kBucketsPerOctave;

constexpr int64_t kAlign = 64;
inline int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  float* w = nullptr;        // [vocab] weights: dense, or sparse beside ids
  int32_t* ids = nullptr;    // [vocab] sparse token ids, ascending
  Cand* cand = nullptr;      // [vocab] top-k candidates / top-p bucket candidates
  double* hist = nullptr;    // [kNumBuckets] top-p mass per bucket
  float* block_max = nullptr;    // [num_exp_blocks(vocab)] running maximum per exp block
  double* block_sum = nullptr;   // [num_exp_blocks(vocab)] weight sum per exp block
  int32_t* depth = nullptr;  // [kMaxTreeNodes] validation scratch
  int32_t* rejected = nullptr;  // [kMaxTreeNodes] tokens rejected at the current node (draft_probs)
};

int64_t workspace_layout(int64_t vocab, char* base, Workspace* ws) {
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t here = at;
    at += align_up(bytes);
    return base ? base + here : nullptr;
  };
  char* w = take(vocab * static_cast<int64_t>(sizeof(float)));
  char* ids = take(vocab * static_cast<int64_t>(sizeof(int32_t)));
  char* cand = take(vocab * static_cast<int64_t>(sizeof(Cand)));
  char* hist = take(kNumBuckets * static_cast<int64_t>(sizeof(double)));
  char* bmax = take(num_exp_blocks(vocab) * static_cast<int64_t>(sizeof(float)));
  char* bsum = take(num_exp_blocks(vocab) * static_cast<int64_t>(sizeof(double)));
  char* depth = take(kMaxTreeNodes * static_cast<int64_t>(sizeof(int32_t)));
  char* rejected = take(kMaxTreeNodes * static_cast<int64_t>(sizeof(int32_t)));
  if (ws) {
    ws->w = reinterpret_cast<float*>(w);
    ws->ids = reinterpret_cast<int32_t*>(ids);
    ws->cand = reinterpret_cast<Cand*>(cand);
    ws->hist = reinterpret_cast<double*>(hist);
    ws->block_max = reinterpret_cast<float*>(bmax);
    ws->block_sum = reinterpret_cast<double*>(bsum);
    ws->depth = reinterpret_cast<int32_t*>(depth);
    ws->rejected = reinterpret_cast<int32_t*>(rejected);
  }
  return at + kAlign;  // slack to align the caller's pointer
}

// ---- the working distribution of one node --------------------------------------------
//
// p(t) = weight / total. Dense: w[t] for every token. Sparse: ids[0..n) in
// ascending order with w[0..n); every other token has p = 0. Tokens are visited
// in ascending id order for the bonus draw in both forms.
struct Dist {
  float* w = nullptr;
  const int32_t* ids = nullptr;  // null when dense
  int32_t n = 0;
  double total = 0.0;
  // Dense rows from exp_row: blocks whose weights still wait for their factor.
  const float* block_max = nullptr;  // null when every weight is final
  double* block_sum = nullptr;  // exp_row's block sums, before the factors
  float row_max = 0.0f;
  float scale = 0.0f;

  int32_t token(int32_t i) const { return ids ? ids[i] : i; }
  int32_t find(int32_t t) const {
    if (!ids) return t < n ? t : -1;
    const int32_t* it = std::lower_bound(ids, ids + n, t);
    return (it != ids + n && *it == t) ? static_cast<int32_t>(it - ids) : -1;
  }
  // A weight brought to the row maximum; below the normal range it is 0, as
  // exp2_nonpositive would have made it against the row maximum directly.
  static float rescaled(float v, float f) {
    const float r = v * f;
    return r >= std::numeric_limits<float>::min() ? r : 0.0f;
  }
  // The weight at position i, as materialize() would leave it.
  float weight(int32_t i) const {
    if (!block_max) return w[i];
    const float f = block_factor(block_max[i / kExpBlock], row_max, scale);
    return f == 1.0f ? w[i] : rescaled(w[i], f);
  }
  // Applies the pending block factors; the total becomes the sum of the weights.
  void materialize() {
    if (!block_max) return;
    bool changed = false;
    for (int32_t b = 0, b0 = 0; b0 < n; ++b, b0 += kExpBlock) {
      const float f = block_factor(block_max[b], row_max, scale);
      if (f == 1.0f) continue;
      const int32_t e = std::min(n, b0 + kExpBlock);
      for (int32_t j = b0; j < e; ++j) w[j] = rescaled(w[j], f);
      changed = true;
    }
    block_max = nullptr;
    if (changed) total = sum_floats(w, n);
  }
};

// p <- normalise(max(p - q / q_total, 0)) after the rejection of token x: the
// residual of recursive rejection sampling, with q the draft row and q_total
// the mass it has left (verify.h). p(x) becomes exactly 0 (the rejection says
// p(x) < q(x); rounding could leave a trace, and x must never come out of
// this node again). Returns false (p unchanged) when nothing would be left,
// which for a rejected draft happens only through rounding. The CUDA twin
// repeats w * (1 / P) - q * (1 / Q) with separately rounded products; so does
// this code wherever the compiler has no FMA to contract them into (x86-64 at
// the SSE4.2 baseline this project builds for).
bool subtract_draft(Dist& d, const float* __restrict q, double q_total, int32_t x) {
  d.materialize();
  const double inv = 1.0 / d.total;
  const double inv_q = 1.0 / q_total;
  const int32_t ix = d.find(x);
  float* __restrict w = d.w;
  auto residual = [&](int32_t i) {
    const double r = static_cast<double>(w[i]) * inv - static_cast<double>(q[d.token(i)]) * inv_q;
    return static_cast<float>(r > 0.0 ? r : 0.0);
  };
  const int32_t skip = ix >= 0 ? ix : d.n;
  double s = 0.0;
  for (int32_t i = 0; i < skip; ++i) s += static_cast<double>(residual(i));
  for (int32_t i = skip + 1; i < d.n; ++i) s += static_cast<double>(residual(i));
  if (!(s > 0.0)) return false;
  for (int32_t i = 0; i < d.n; ++i) w[i] = residual(i);
  if (ix >= 0) w[ix] = 0.0f;
  d.total = sum_floats(w, d.n);
  return true;
}

// Weights are summed in chunks of this many before the one-at-a-time scan of
// an inverse-CDF draw: the chunk sums do not depend on each other, so only one
// add per chunk waits on the previous one.
constexpr int32_t kScanChunk = 16;

// A weight brought to the row maximum by the block factor f (kRescale), as
// Dist::weight does.
template <bool kRescale>
ATLAS_INLINE float weight_at(const float* w, int32_t j, float f) {
  if constexpr (kRescale) return Dist::rescaled(w[j], f);
  return w[j];
}

// The sum of 16 weights in double, pairwise: element k with k + 8, then with
// k + 4, k + 2, k + 1 (a fixed order, on 4-float vectors whatever the CPU).
template <bool kRescale>
ATLAS_INLINE double chunk_sum(const float* w, float f) {
  using F = Simd<4>::F;
  using D = Simd<4>::D;
  F a[4];
  for (int q = 0; q < 4; ++q) {
    a[q] = load<4>(w + 4 * q);
    if constexpr (kRescale) {
      const F r = a[q] * f;
      a[q] = r >= splat<4>(std::numeric_limits<float>::min()) ? r : F{};
    }
  }
  const D z = (__builtin_convertvector(a[0], D) + __builtin_convertvector(a[2], D)) +
              (__builtin_convertvector(a[1], D) + __builtin_convertvector(a[3], D));
  return (z[0] + z[2]) + (z[1] + z[3]);
}

// The running sum *cum over the weights w[begin, end) (each brought to the
// row maximum by f): the first index at which it exceeds target, or -1 with
// *cum advanced past the range. Whole chunks are summed first (chunk_sum; no
// chunk waits on another), so only one add per chunk is serial; the chunk
// where the sum crosses target is then scanned one weight at a time. If that
// scan falls short of target (rounding), the chunk's last token with weight is
// the draw.
template <bool kRescale>
int32_t scan_weights_impl(const float* w, int32_t begin, int32_t end, float f, double target, double* cum) {
  static_assert(kScanChunk == 16, "chunk_sum sums 16 weights");
  double c = *cum;
  for (int32_t j0 = begin; j0 < end; j0 += kScanChunk) {
    const int32_t len = std::min(kScanChunk, end - j0);
    double sum;
    if (len == kScanChunk) {
      sum = chunk_sum<kRescale>(w + j0, f);
    } else {
      float tail[kScanChunk] = {};
      std::copy(w + j0, w + j0 + len, tail);
      sum = chunk_sum<kRescale>(tail, f);
    }
    if (!(c + sum > target)) {
      c += sum;
      continue;
    }
    int32_t last = j0;
    for (int32_t k = 0; k < len; ++k) {
      const double x = weight_at<kRescale>(w, j0 + k, f);
      if (x > 0.0) last = j0 + k;
      c += x;
      if (c > target) return j0 + k;
    }
    return last;
  }
  *cum = c;
  return -1;
}

int32_t scan_weights(const float* w, int32_t begin, int32_t end, float f, double target, double* cum) {
  return f == 1.0f ? scan_weights_impl<false>(w, begin, end, f, target, cum)
                   : scan_weights_impl<true>(w, begin, end, f, target, cum);
}

// The draw from p at u (verify.h): the first token, in ascending id order,
// whose cumulative weight exceeds u * total. Block sums find the block, chunk
// sums the chunk, and only that chunk is scanned one weight at a time. When
// rounding puts u * total past every cumulative sum, the last token with any
// weight.
int32_t sample(Dist& d, double u) {
  const double target = u * d.total;
  double cum = 0.0;
  if (d.block_max) {
    // A dense row nothing has changed since exp_row: its block sums locate the
    // block, and only that block's weights are brought to the row maximum.
    for (int32_t b = 0, b0 = 0; b0 < d.n; ++b, b0 += kExpBlock) {
      const float f = block_factor(d.block_max[b], d.row_max, d.scale);
      const double bs = d.block_sum[b] * static_cast<double>(f);
      if (!(cum + bs > target)) {
        cum += bs;
        continue;
      }
      const int32_t j = scan_weights(d.w, b0, std::min(d.n, b0 + kExpBlock), f, target, &cum);
      if (j >= 0) return j;
    }
    for (int32_t i = d.n - 1; i >= 0; --i)
      if (d.weight(i) > 0.0f) return i;
    return 0;
  }
  constexpr int32_t kBlock = 1024;
  for (int32_t b = 0; b < d.n; b += kBlock) {
    const int32_t e = std::min(d.n, b + kBlock);
    const double bs = sum_floats(d.w + b, e - b);
    if (!(cum + bs > target)) {
      cum += bs;
      continue;
    }
    const int32_t j = scan_weights(d.w, b, e, 1.0f, target, &cum);
    if (j >= 0) return d.token(j);
  }
  for (int32_t i = d.n - 1; i >= 0; --i)
    if (d.w[i] > 0.0f) return d.token(i);
  return d.token(0);
}

// ---- top-k candidates ------------------------------------------------------------------

bool cand_greater(const Cand& a, const Cand& b) { return a.x > b.x; }
// Descending probability = descending logit; ties by ascending token id.
bool cand_before(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); }
bool cand_by_id(const Cand& a, const Cand& b) { return a.id < b.id; }

// Keeps the candidates >= the k-th largest value of buf[0..count) (ties with
// it stay); returns the new count and sets *kth.
int32_t keep_top_k(Cand* buf, int32_t count, int32_t k, float* kth) {
  if (count <= k) {
    float lo = kInf;
    for (int32_t i = 0; i < count; ++i) lo = std::min(lo, buf[i].x);
    *kth = count == k ? lo : -kInf;
    return count;
  }
  std::nth_element(buf, buf + (k - 1), buf + count, cand_greater);
  const float t = buf[k - 1].x;
  int32_t keep = k;
  for (int32_t i = k; i < count; ++i)
    if (buf[i].x >= t) buf[keep++] = buf[i];
  *kth = t;
  return keep;
}

// The top-k candidates in three steps:
//   1. one vectorised pass over the row: maximum, NaN/+inf check, and the
//      maximum of every block of kTopKBlock tokens;
//   2. tau = the k-th largest block maximum: at least k tokens are >= tau, so
//      the k-th largest token is too, and so is every token that top_k keeps;
//   3. only the blocks whose maximum reaches tau are read again (from cache),
//      each token >= tau a candidate; the k-th largest candidate is the cut.
// Steps 2 and 3 touch about k blocks, so the cost is one read of the row.
constexpr int32_t kTopKBlock = 4 * kLanes;

inline int32_t num_top_k_blocks(int64_t vocab) {
  return static_cast<int32_t>((vocab + kTopKBlock - 1) / kTopKBlock);
}

template <int W, class T>
ATLAS_INLINE RowMax block_maxima_impl(const T* __restrict row, int32_t n, float* __restrict bmax) {
  using F = typename Simd<W>::F;
  constexpr int S = kLanes / W;
  const F inf = splat<W>(kInf);
  const F one = splat<W>(1.0f);  // bad counts, per lane, the NaN and +inf seen
  F mx[S];
  F bad[S];
  for (int h = 0; h < S; ++h) {
    mx[h] = splat<W>(-kInf);
    bad[h] = F{};
  }
  int32_t j = 0, b = 0;
  for (; j + kTopKBlock <= n; j += kTopKBlock, ++b) {
    F bm[S];
    for (int h = 0; h < S; ++h) bm[h] = splat<W>(-kInf);
    for (int32_t q = 0; q < kTopKBlock; q += kLanes) {
      for (int h = 0; h < S; ++h) {
        const F x = load<W>(row + j + q + h * W);
        bm[h] = x > bm[h] ? x : bm[h];
        bad[h] += x < inf ? F{} : one;
      }
    }
    F all = bm[0];
    for (int h = 0; h < S; ++h) {
      mx[h] = bm[h] > mx[h] ? bm[h] : mx[h];
      all = bm[h] > all ? bm[h] : all;
    }
    bmax[b] = reduce_max<W>(all);
  }
  RowMax r;
  int32_t any_bad = 0;
  for (int h = 0; h < S; ++h) {
    for (int l = 0; l < W; ++l) {
      any_bad |= bad[h][l] != 0.0f;
      r.max = mx[h][l] > r.max ? mx[h][l] : r.max;
    }
  }
  if (j < n) {
    float m = -kInf;
    for (int32_t i = j; i < n; ++i) {
      const float x = at(row, i);
      any_bad |= !(x < kInf);
      m = x > m ? x : m;
    }
    bmax[b] = m;
    r.max = m > r.max ? m : r.max;
  }
  r.finite = any_bad == 0;
  return r;
}

// Steps 2 and 3 above; returns the number of candidates in buf (every token
// >= the k-th largest logit, ties included). buf holds vocab entries; each
// write lands at most at the index of the token being read.
template <class T>
int32_t top_k_candidates(const T* row, int32_t n, int32_t k, const float* bmax, Cand* buf) {
  const int32_t nblocks = num_top_k_blocks(n);
  float tau = -kInf;
  if (nblocks > k) {
    // A running threshold (the k-th largest so far) keeps the selection to a
    // few hundred candidates; written unconditionally, kept by advancing count.
    int32_t count = 0;
    int32_t cap = std::min(nblocks, std::max(2 * k, 256));
    for (int32_t b = 0; b < nblocks; ++b) {
      buf[count] = Cand{bmax[b], 0.0f, b};
      count += bmax[b] >= tau;
      if (count >= cap && cap < nblocks) {
        count = keep_top_k(buf, count, k, &tau);
        cap = std::min(nblocks, std::max(cap, 2 * count));
      }
    }
    keep_top_k(buf, count, k, &tau);
  }
  int32_t count = 0;
  for (int32_t b = 0; b < nblocks; ++b) {
    if (bmax[b] < tau) continue;
    const int32_t end = std::min(n, (b + 1) * kTopKBlock);
    for (int32_t i = b * kTopKBlock; i < end; ++i) {
      const float x = at(row, i);
      buf[count] = Cand{x, 0.0f, i};
      count += x >= tau;
    }
  }
  float kth;
  return keep_top_k(buf, count, k, &kth);
}

// Weights of candidates, four at a time through the same kernel.
void exp_cands(Cand* c, int32_t n, float max, float scale) {
  for (int32_t i = 0; i < n; i += 4) {
    const int32_t count = std::min(4, n - i);
    Simd<4>::F x = splat<4>(-kInf);
    for (int32_t l = 0; l < count; ++l) x[l] = c[i + l].x;
    const Simd<4>::F e = exp2_nonpositive<4>((x - max) * scale);
    for (int32_t l = 0; l < count; ++l) c[i + l].w = e[l];
  }
}

// Bucket keys for top_p over a dense row: min(-t * kBucketsPerOctave, last
// bucket) truncated, t the scaled logit. Non-increasing in the logit, so bucket
// order is descending-probability order; equal logits share a bucket.
template <int W, class T>
ATLAS_INLINE void bucket_keys_impl(const T* __restrict row, int32_t n, float max, float c,
                                   int32_t* __restrict keys) {
  using F = typename Simd<W>::F;
  using I = typename Simd<W>::I;
  const float mul = -c * static_cast<float>(kBucketsPerOctave);
  const F last = splat<W>(static_cast<float>(kNumBuckets - 1));
  int32_t j = 0;
  for (; j + W <= n; j += W) {
    const F b = (load<W>(row + j) - max) * mul;
    const I k = __builtin_convertvector(b < last ? b : last, I);
    std::memcpy(keys + j, &k, sizeof(k));
  }
  for (; j < n; ++j) {
    const float b = (at(row, j) - max) * mul;
    keys[j] = static_cast<int32_t>(b < static_cast<float>(kNumBuckets - 1) ? b : static_cast<float>(kNumBuckets - 1));
  }
}

// ---- dispatch ----------------------------------------------------------------------------
//
// Each kernel is compiled for every vector width (namespaces w4, w8, w16) and
// the widest the CPU supports runs. The environment variable ATLAS_SIMD_WIDTH
// (4, 8 or 16) caps the width; the tests use it to check that all widths give
// the same bits.

#if defined(__clang__)
#pragma clang fp contract(off)
#define ATLAS_NO_CONTRACT
#else
#define ATLAS_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif

#define ATLAS_DEFINE_KERNELS(NS, W, ATTR)                                                              \
  namespace NS {                                                                                        \
  ATTR double sum_floats(const float* w, int32_t n) { return sum_floats_impl<W>(w, n); }                \
  ATTR RowMax scan_row(const float* r, int32_t n) { return scan_row_impl<W>(r, n); }                    \
  ATTR RowMax scan_row(const uint16_t* r, int32_t n) { return scan_row_bf16_impl<W>(r, n); }            \
  ATTR DenseRow exp_row(const float* r, int32_t n, float c, float* w, float* bmax, double* bsum) {      \
    return exp_row_impl<W>(r, n, c, w, bmax, bsum);                                                     \
  }                                                                                                     \
  ATTR DenseRow exp_row(const uint16_t* r, int32_t n, float c, float* w, float* bmax, double* bsum) {   \
    return exp_row_impl<W>(r, n, c, w, bmax, bsum);                                                     \
  }                                                                                                     \
  ATTR RowMax block_maxima(const float* r, int32_t n, float* bmax) { return block_maxima_impl<W>(r, n, bmax); } \
  ATTR RowMax block_maxima(const uint16_t* r, int32_t n, float* bmax) {                                 \
    return block_maxima_impl<W>(r, n, bmax);                                                            \
  }                                                                                                     \
  ATTR void bucket_keys(const float* r, int32_t n, float max, float c, int32_t* keys) {                 \
    bucket_keys_impl<W>(r, n, max, c, keys);                                                            \
  }                                                                                                     \
  ATTR void bucket_keys(const uint16_t* r, int32_t n, float max, float c, int32_t* keys) {              \
    bucket_keys_impl<W>(r, n, max, c, keys);                                                            \
  }                                                                                                     \
  }

ATLAS_DEFINE_KERNELS(w4, 4, ATLAS_NO_CONTRACT)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
ATLAS_DEFINE_KERNELS(w8, 8, __attribute__((target("avx2"))) ATLAS_NO_CONTRACT)
ATLAS_DEFINE_KERNELS(w16, 16, __attribute__((target("avx512f,avx512bw"))) ATLAS_NO_CONTRACT)

int simd_width() {
  static const int width = [] {
    const char* cap_env = std::getenv("ATLAS_SIMD_WIDTH");
    const int cap = cap_env ? std::atoi(cap_env) : 16;
    if (cap >= 16 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 16;
    if (cap >= 8 && __builtin_cpu_supports("avx2")) return 8;
    return 4;
  }();
  return width;
}
#define ATLAS_DISPATCH(call)   \
  switch (simd_width()) {      \
    case 16:                   \
      return w16::call;        \
    case 8:                    \
      return w8::call;         \
    default:                   \
      return w4::call;         \
  }
#else
int simd_width() { return 4; }
#define ATLAS_DISPATCH(call) return w4::call;
#endif

double sum_floats(const float* w, int32_t n) { ATLAS_DISPATCH(sum_floats(w, n)) }
template <class T>
RowMax scan_row(const T* r, int32_t n) {
  ATLAS_DISPATCH(scan_row(r, n))
}
template <class T>
DenseRow exp_row(const T* r, int32_t n, float c, float* w, float* bmax, double* bsum) {
  ATLAS_DISPATCH(exp_row(r, n, c, w, bmax, bsum))
}
template <class T>
RowMax block_maxima(const T* r, int32_t n, float* bmax) {
  ATLAS_DISPATCH(block_maxima(r, n, bmax))
}
template <class T>
void bucket_keys(const T* r, int32_t n, float max, float c, int32_t* keys) {
  ATLAS_DISPATCH(bucket_keys(r, n, max, c, keys))
}

// ---- the problem --------------------------------------------------------------------------

std::string node_name(int64_t row, int64_t node, int64_t tree) {
  return "row " + std::to_string(row) + " (node " + std::to_string(node) + " of tree " + std::to_string(tree) + ")";
}

struct TreeView {
  int64_t tree = 0;   // index in the batch
  int64_t first = 0;  // global index of the root
  int32_t n = 0;      // nodes
  const int32_t* tokens = nullptr;
  const int32_t* parents = nullptr;
};

class Walker {
 public:
  Walker(const VerifyProblem& p, const Workspace& ws) : p_(p), ws_(ws), vocab_(static_cast<int32_t>(p.vocab)) {}

  template <class T>
  Status run(const TreeView& t, const SamplingParams& sp, int32_t* path, int32_t* num, int32_t* bonus) const;

 private:
  template <class T>
  const T* row(int64_t global) const {
    return static_cast<const T*>(p_.logits) + global * p_.logits_row_stride;
  }
  template <class T>
  Status build(const TreeView& t, int32_t node, const SamplingParams& sp, Dist* d) const;
  Status check_draft_row(const TreeView& t, int32_t node, const float* q, double* sum) const;

  const VerifyProblem& p_;
  const Workspace& ws_;
  int32_t vocab_;
};

Status row_error(const TreeView& t, int32_t node, bool finite) {
  const std::string where = "logits " + node_name(t.first + node, node, t.tree);
  if (!finite) return Status::Invalid(where + " holds NaN or +inf");
  return Status::Invalid(where + " is all -inf: no token is possible");
}

// p at `node` after temperature, top_k, softmax, top_p (see verify.h).
template <class T>
Status Walker::build(const TreeView& t, int32_t node, const SamplingParams& sp, Dist* d) const {
  const T* r = row<T>(t.first + node);
  // log2(e) / T in double, then float; a temperature so small that it
  // overflows makes every non-maximal token weigh 0, as it should.
  const double c_wide = 1.4426950408889634 / static_cast<double>(sp.temperature);
  const float scale = c_wide < std::numeric_limits<float>::max() ? static_cast<float>(c_wide)
                                                                 : std::numeric_limits<float>::max();
  const double top_p = static_cast<double>(sp.top_p);
  if (sp.top_k > 0 && sp.top_k < vocab_) {
    // ws_.w is free until the candidates are copied into it at the end.
    const RowMax s = block_maxima(r, vocab_, ws_.w);
    if (!s.finite || s.max == -kInf) return row_error(t, node, s.finite);
    Cand* cands = ws_.cand;
    int32_t count = top_k_candidates(r, vocab_, sp.top_k, ws_.w, cands);
    exp_cands(cands, count, s.max, scale);
    double total = 0.0;
    for (int32_t i = 0; i < count; ++i) total += static_cast<double>(cands[i].w);
    if (top_p < 1.0) {
      std::sort(cands, cands + count, cand_before);
      const double target = top_p * total;
      double cum = 0.0;
      for (int32_t i = 0; i < count; ++i) {
        cum += static_cast<double>(cands[i].w);
        if (cum >= target) {
          count = i + 1;
          break;
        }
      }
    }
    std::sort(cands, cands + count, cand_by_id);
    for (int32_t i = 0; i < count; ++i) {
      ws_.ids[i] = cands[i].id;
      ws_.w[i] = cands[i].w;
    }
    d->w = ws_.w;
    d->ids = ws_.ids;
    d->n = count;
    d->total = sum_floats(ws_.w, count);
    return Status::Ok();
  }

  float* w = ws_.w;
  const DenseRow s = exp_row(r, vocab_, scale, w, ws_.block_max, ws_.block_sum);
  if (!s.finite || s.max == -kInf) return row_error(t, node, s.finite);
  d->w = w;
  d->ids = nullptr;
  d->n = vocab_;
  d->total = s.total;
  d->block_max = ws_.block_max;
  d->block_sum = ws_.block_sum;
  d->row_max = s.max;
  d->scale = scale;
  if (!(top_p < 1.0)) return Status::Ok();
  d->materialize();
  const double total = d->total;

  // top_p over the dense row: the mass per bucket of scaled logit (buckets in
  // descending logit order) locates the bucket where the descending cumulative
  // mass reaches top_p; only that bucket is sorted. The keys live in ids until
  // the compaction overwrites them (it writes ids[n] after reading ids[j], n <= j).
  int32_t* keys = ws_.ids;
  bucket_keys(r, vocab_, s.max, scale, keys);
  double* hist = ws_.hist;
  std::fill(hist, hist + kNumBuckets, 0.0);
  for (int32_t j = 0; j < vocab_; ++j) hist[keys[j]] += static_cast<double>(w[j]);
  const double target = top_p * total;
  double above = 0.0;  // mass of the buckets before the cut bucket
  int32_t cut = -1;
  for (int32_t b = 0; b < kNumBuckets; ++b) {
    if (above + hist[b] >= target) {
      cut = b;
      break;
    }
    above += hist[b];
  }
  if (cut < 0) return Status::Ok();  // rounding kept the whole mass short of top_p: keep all
  Cand* cands = ws_.cand;
  int32_t count = 0;
  for (int32_t j = 0; j < vocab_; ++j)
    if (keys[j] == cut) cands[count++] = Cand{at(r, j), w[j], j};
  std::sort(cands, cands + count, cand_before);
  Cand last = cands[count > 0 ? count - 1 : 0];
  double cum = above;
  for (int32_t i = 0; i < count; ++i) {
    cum += static_cast<double>(cands[i].w);
    if (cum >= target) {
      last = cands[i];
      break;
    }
  }
  // Keep every token before `last` in (logit desc, id asc) order, and `last`;
  // compacted in place, ascending ids.
  int32_t n = 0;
  for (int32_t j = 0; j < vocab_; ++j) {
    const int32_t b = keys[j];
    bool keep = b < cut;
    if (b == cut) {
      const float x = at(r, j);
      keep = x > last.x || (x == last.x && j <= last.id);
    }
    if (keep) {
      keys[n] = j;  // keys is ids: from here on it holds the kept token ids
      w[n] = w[j];
      ++n;
    }
  }
  d->ids = ws_.ids;
  d->n = n;
  d->total = sum_floats(w, n);
  return Status::Ok();
}

// A draft row must be a distribution; checked when the walk first reads it.
// Why 1e-3: a float32 softmax over 150k tokens sums to 1 within ~1e-5; a row
// off by more is not a distribution (e.g. unnormalised or the wrong row).
Status Walker::check_draft_row(const TreeView& t, int32_t node, const float* q, double* sum) const {
  double s = 0.0;
  int32_t bad = 0;
  for (int32_t j = 0; j < vocab_; ++j) {
    bad |= !(q[j] >= 0.0f && q[j] < kInf);
    s += static_cast<double>(q[j]);
  }
  auto where = [&] { return "draft_probs " + node_name(t.first + node, node, t.tree); };
  if (bad) return Status::Invalid(where() + " must be finite and non-negative");
  if (!(std::fabs(s - 1.0) <= 1e-3)) return Status::Invalid(where() + " must sum to 1, sums to " + std::to_string(s));
  *sum = s;
  return Status::Ok();
}

template <class T>
Status Walker::run(const TreeView& t, const SamplingParams& sp, int32_t* path, int32_t* num,
                   int32_t* bonus) const {
  int32_t node = 0;
  int32_t accepted = 0;
  if (sp.temperature == 0.0f) {
    for (;;) {
      const RowMax s = scan_row(row<T>(t.first + node), vocab_);
      if (!s.finite || s.max == -kInf) return row_error(t, node, s.finite);
      int32_t next = -1;
      for (int32_t c = node + 1; c < t.n; ++c) {
        if (t.parents[c] == node && t.tokens[c] == s.argmax) {
          next = c;
          break;
        }
      }
      if (next < 0) {
        *bonus = s.argmax;
        break;
      }
      path[accepted++] = next;
      node = next;
    }
    *num = accepted;
    return Status::Ok();
  }

  for (uint64_t depth = 0;; ++depth) {
    Dist d;
    ATLAS_RETURN_IF_ERROR(build<T>(t, node, sp, &d));
    const uint64_t position = sp.offset + depth;  // wraps modulo 2^64, as the counter does
    int32_t next = -1;
    if (!p_.draft_probs) {
      // One draw per position; the tree only decides how many of them one
      // forward checks.
      const int32_t y = sample(d, philox_uniform(sp.seed, position, kStreamOneHot, 0));
      for (int32_t c = node + 1; c < t.n; ++c) {
        if (t.parents[c] == node && t.tokens[c] == y) {
          next = c;
          break;
        }
      }
      if (next < 0) {
        *bonus = y;
        break;
      }
    } else {
      const float* q = p_.draft_probs + (t.first + node) * p_.draft_row_stride;
      double q_left = 0.0;  // Q of verify.h: the row's mass less that of the rejected children
      uint32_t tried = 0;
      for (int32_t c = node + 1; c < t.n; ++c) {
        if (t.parents[c] != node) continue;
        if (tried == 0) ATLAS_RETURN_IF_ERROR(check_draft_row(t, node, q, &q_left));
        const int32_t x = t.tokens[c];
        auto where = [&] {
          return "draft_probs " + node_name(t.first + node, node, t.tree) + ": child node " +
                 std::to_string(c) + " (token " + std::to_string(x) + ")";
        };
        for (uint32_t k = 0; k < tried; ++k)
          if (ws_.rejected[k] == x)
            return Status::Invalid(where() + " repeats an earlier sibling's token; children drawn without "
                                             "replacement are distinct");
        const double qx = static_cast<double>(q[x]);
        if (!(qx > 0.0))
          return Status::Invalid(where() + " has probability 0: it cannot have been drafted from it");
        // Q >= q(x) in exact arithmetic; the subtractions could leave it short.
        const double q_total = std::max(q_left, qx);
        const double u = philox_uniform(sp.seed, position, kStreamDraft, tried);
        const int32_t i = d.find(x);
        const double wx = i >= 0 ? static_cast<double>(d.weight(i)) : 0.0;
        // u < p_j(x) / q_j(x), multiplied through by q_total * total.
        if (u * qx * d.total < wx * q_total) {
          next = c;
          break;
        }
        subtract_draft(d, q, q_total, x);
        q_left -= qx;
        ws_.rejected[tried++] = x;
      }
      if (next < 0) {
        *bonus = sample(d, philox_uniform(sp.seed, position, kStreamDraftBonus, 0));
        break;
      }
    }
    path[accepted++] = next;
    node = next;
  }
  *num = accepted;
  return Status::Ok();
}

Status validate(const VerifyProblem& p, const Workspace& ws) {
  if (p.logits == nullptr) return Status::Invalid("logits must not be null");
  if (p.logits_dtype != DType::kFloat32 && p.logits_dtype != DType::kBFloat16)
    return Status::Invalid("logits_dtype must be float32 or bfloat16");
  if (p.vocab < 1 || p.vocab > kMaxVocab)
    return Status::Invalid("vocab must be in [1, 2^30], got " + std::to_string(p.vocab));
  if (p.logits_row_stride < p.vocab)
    return Status::Invalid("logits_row_stride must be >= vocab = " + std::to_string(p.vocab) + ", got " +
                           std::to_string(p.logits_row_stride));
  if (p.draft_probs && p.draft_row_stride < p.vocab)
    return Status::Invalid("draft_row_stride must be >= vocab = " + std::to_string(p.vocab) + ", got " +
                           std::to_string(p.draft_row_stride));
  if (!p.tokens) return Status::Invalid("tokens must not be null");
  if (!p.parents) return Status::Invalid("parents must not be null");
  if (!p.tree_offsets) return Status::Invalid("tree_offsets must not be null");
  if (!p.params) return Status::Invalid("params must not be null");
  if (p.batch < 1) return Status::Invalid("batch must be >= 1, got " + std::to_string(p.batch));
  if (p.max_accept < 0) return Status::Invalid("max_accept must be >= 0, got " + std::to_string(p.max_accept));
  if ((p.max_accept > 0 && !p.accepted_out) || !p.emitted_out || !p.num_accepted_out)
    return Status::Invalid("accepted_out, emitted_out and num_accepted_out must not be null");
  const int64_t need = verify_workspace_bytes(p.vocab);
  if (!p.workspace || p.workspace_bytes < need)
    return Status::Invalid("workspace must hold verify_workspace_bytes(vocab) = " + std::to_string(need) +
                           " bytes, got " + std::to_string(p.workspace ? p.workspace_bytes : 0));
  if (p.tree_offsets[0] != 0)
    return Status::Invalid("tree_offsets[0] must be 0, got " + std::to_string(p.tree_offsets[0]));
  // Offsets first, before any tree is read: strictly increasing, so that every
  // tree lies within [0, tree_offsets[batch]) = the caller's arrays.
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.tree_offsets[b + 1] - p.tree_offsets[b];
    if (n < 1)
      return Status::Invalid("tree " + std::to_string(b) + " is empty: tree_offsets[" + std::to_string(b + 1) +
                             "] must be > tree_offsets[" + std::to_string(b) + "]");
    if (n > kMaxTreeNodes)
      return Status::Invalid("tree " + std::to_string(b) + " has " + std::to_string(n) + " nodes, more than " +
                             std::to_string(kMaxTreeNodes));
  }

  for (int64_t b = 0; b < p.batch; ++b) {
    const SamplingParams& sp = p.params[b];
    // Messages are built only on failure: a valid problem allocates nothing.
    auto at = [b] { return "[" + std::to_string(b) + "]"; };
    if (!(sp.temperature >= 0.0f && sp.temperature < kInf))
      return Status::Invalid("temperature" + at() + " must be finite and >= 0, got " + std::to_string(sp.temperature));
    if (sp.top_k < 0) return Status::Invalid("top_k" + at() + " must be >= 0, got " + std::to_string(sp.top_k));
    if (!(sp.top_p > 0.0f && sp.top_p <= 1.0f))
      return Status::Invalid("top_p" + at() + " must be in (0, 1], got " + std::to_string(sp.top_p));

    const int64_t first = p.tree_offsets[b];
    const int64_t n = p.tree_offsets[b + 1] - first;
    const int32_t* parents = p.parents + first;
    const int32_t* tokens = p.tokens + first;
    if (parents[0] != -1)
      return Status::Invalid("parents[" + std::to_string(first) + "] (root of tree " + std::to_string(b) +
                             ") must be -1, got " + std::to_string(parents[0]));
    ws.depth[0] = 0;
    int32_t max_depth = 0;
    for (int32_t i = 1; i < n; ++i) {
      auto where = [&] {
        return "[" + std::to_string(first + i) + "] (node " + std::to_string(i) + " of tree " + std::to_string(b) + ")";
      };
      if (parents[i] < 0 || parents[i] >= i)
        return Status::Invalid("parents" + where() + " must be in [0, " + std::to_string(i) +
                               "): nodes are stored parents first, got " + std::to_string(parents[i]));
      if (tokens[i] < 0 || tokens[i] >= p.vocab)
        return Status::Invalid("tokens" + where() + " must be in [0, vocab = " + std::to_string(p.vocab) + "), got " +
                               std::to_string(tokens[i]));
      ws.depth[i] = ws.depth[parents[i]] + 1;
      max_depth = std::max(max_depth, ws.depth[i]);
    }
    if (max_depth > p.max_accept)
      return Status::Invalid("tree " + std::to_string(b) + " has depth " + std::to_string(max_depth) +
                             ", more than max_accept = " + std::to_string(p.max_accept));
  }
  return Status::Ok();
}

// One row of top_k_probs(): into probs, or when it is null the logits into
// logits (no exponentials then: one pass for the block maxima, one over the
// blocks that can hold a top-k value).
template <class T>
Status top_k_row(const T* row, int32_t n, int32_t k, const Workspace& ws, int64_t r, int32_t* ids, float* probs,
                 float* logits) {
  constexpr float kLog2e = 1.4426950408889634f;
  // The row's total weight first (its weights are not kept: ws.w takes the
  // block maxima next, and block_maxima checks the row).
  const double total = probs != nullptr ? exp_row(row, n, kLog2e, ws.w, ws.block_max, ws.block_sum).total : 0.0;
  const RowMax m = block_maxima(row, n, ws.w);
  if (!m.finite || m.max == -kInf)
    return Status::Invalid("logits row " + std::to_string(r) + (m.finite ? " is all -inf" : " holds NaN or +inf"));
  int32_t count = top_k_candidates(row, n, k, ws.w, ws.cand);
  if (probs != nullptr) exp_cands(ws.cand, count, m.max, kLog2e);
  std::sort(ws.cand, ws.cand + count, cand_before);
  for (int32_t i = 0; i < k; ++i) {
    ids[i] = ws.cand[i].id;
    if (probs != nullptr)
      probs[i] = static_cast<float>(static_cast<double>(ws.cand[i].w) / total);
    else
      logits[i] = ws.cand[i].x;
  }
  return Status::Ok();
}

}  // namespace

Status top_k_probs(const TopKProblem& p) {
  if (p.vocab < 1 || p.vocab > kMaxVocab)
    return Status::Invalid("vocab must be in [1, 2^30], got " + std::to_string(p.vocab));
  if (p.rows < 0) return Status::Invalid("rows must be >= 0, got " + std::to_string(p.rows));
  if (p.k < 1 || p.k > p.vocab)
    return Status::Invalid("k must be in [1, vocab = " + std::to_string(p.vocab) + "], got " + std::to_string(p.k));
  if (p.logits_row_stride < p.vocab)
    return Status::Invalid("the logits row stride must be >= vocab");
  if (p.rows > 0 && (!p.logits || !p.ids_out || (p.probs_out == nullptr) == (p.logits_out == nullptr)))
    return Status::Invalid("logits, ids_out and exactly one of probs_out and logits_out must not be null");
  if (!p.workspace || p.workspace_bytes < verify_workspace_bytes(p.vocab))
    return Status::Invalid("the workspace must hold verify_workspace_bytes(vocab) = " +
                           std::to_string(verify_workspace_bytes(p.vocab)) + " bytes, got " +
                           std::to_string(p.workspace_bytes));
  Workspace ws;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p.workspace);
  workspace_layout(p.vocab, static_cast<char*>(p.workspace) + (kAlign - addr % kAlign) % kAlign, &ws);
  const int32_t n = static_cast<int32_t>(p.vocab);
  for (int64_t r = 0; r < p.rows; ++r) {
    int32_t* ids = p.ids_out + r * p.k;
    float* probs = p.probs_out ? p.probs_out + r * p.k : nullptr;
    float* logits = p.logits_out ? p.logits_out + r * p.k : nullptr;
    const int64_t offset = r * p.logits_row_stride;
    const Status st =
        p.logits_dtype == DType::kFloat32
            ? top_k_row(static_cast<const float*>(p.logits) + offset, n, p.k, ws, r, ids, probs, logits)
            : top_k_row(static_cast<const uint16_t*>(p.logits) + offset, n, p.k, ws, r, ids, probs, logits);
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

double philox_uniform(uint64_t seed, uint64_t position, uint32_t stream, uint32_t j) {
  const PhiloxOut out = philox_two_words(seed, position, stream, j);
  const uint64_t bits = (static_cast<uint64_t>(out.w0) << 21) | (out.w1 >> 11);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

int64_t verify_workspace_bytes(int64_t vocab) {
  if (vocab < 1 || vocab > kMaxVocab) return 0;
  return workspace_layout(vocab, nullptr, nullptr);
}

Status verify(const VerifyProblem& p) {
  // The workspace may come at any alignment; its size includes the slack.
  Workspace ws;
  if (p.workspace && p.vocab >= 1 && p.vocab <= kMaxVocab) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(p.workspace);
    char* base = static_cast<char*>(p.workspace) + (kAlign - addr % kAlign) % kAlign;
    workspace_layout(p.vocab, base, &ws);
  }
  ATLAS_RETURN_IF_ERROR(validate(p, ws));

  Walker walker(p, ws);
  const int64_t width = p.max_accept;
  for (int64_t b = 0; b < p.batch; ++b) {
    TreeView t;
    t.tree = b;
    t.first = p.tree_offsets[b];
    t.n = static_cast<int32_t>(p.tree_offsets[b + 1] - t.first);
    t.tokens = p.tokens + t.first;
    t.parents = p.parents + t.first;
    int32_t* path = p.accepted_out ? p.accepted_out + b * width : nullptr;
    int32_t* emitted = p.emitted_out + b * (width + 1);
    int32_t num = 0, bonus = 0;
    const Status st = p.logits_dtype == DType::kFloat32
                          ? walker.run<float>(t, p.params[b], path, &num, &bonus)
                          : walker.run<uint16_t>(t, p.params[b], path, &num, &bonus);
    if (!st.ok()) return st;
    for (int32_t i = 0; i < num; ++i) emitted[i] = t.tokens[path[i]];
    emitted[num] = bonus;
    for (int64_t i = num; i < width; ++i) path[i] = -1;
    for (int64_t i = num + 1; i <= width; ++i) emitted[i] = -1;
    p.num_accepted_out[b] = num;
  }
  return Status::Ok();
}

}  // namespace atlas
