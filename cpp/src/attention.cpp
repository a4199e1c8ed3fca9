// atlas/attention.cpp: tree attention over the paged KV cache on the CPU.
//
// Work is organised so that every key/value row is read once per tile of
// queries: for one sequence, a tile of queries (kTileFloats / (G * head_dim) of
// them) times the G query heads of one kv head (the "rows") walks its positions in
// chunks of at most kChunk consecutive positions of one page. Committed
// positions [0, length) are seen by every row; tree positions length + j are
// seen by the rows whose query node is j or a descendant of j (an ancestor mask
// built per tile by walking parents). Each row keeps a one-pass online softmax
// (running max m, running sum l, float32 accumulator acc); per chunk it
// computes the chunk's scores, rescales once and adds the chunk's weighted
// values, summed separately first so that long contexts are summed in blocks.
//
// The inner loops (dot products, axpy over head_dim, exp over a chunk) are
// plain loops over contiguous floats with restrict-qualified outputs, written
// so that -O3 -msse4.2 vectorises them without -ffast-math: dot products keep
// 16 independent partial sums, which fixes the summation order.
#include "atlas/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace atlas {

namespace {

// Why 32: a chunk's keys and values (2 x 32 rows of head_dim floats, 16 KiB at
// head_dim 64) stay in L1 while every row of the tile reads them.
constexpr int kChunk = 32;

// Why 8192 floats (32 KiB): a tile's accumulators [rows, head_dim], and likewise
// its queries, stay within L2 next to the chunk; more queries per tile would only
// save re-reads of context that is already cache resident. Queries are not
// pre-scaled: scores are (q . k) * scale, in the reference's order.
constexpr int64_t kTileFloats = 8192;

std::string str(int64_t v) { return std::to_string(v); }

// Scratch reused across calls (one per thread: the binding runs calls on
// several caches concurrently). It only grows, so steady-state calls with the
// same shapes never allocate.
struct Workspace {
  std::vector<float> q, acc, m, l, s, tmp, kbuf, vbuf;
  std::vector<int32_t> idx, cnt;
  std::vector<uint8_t> mask;
};

template <typename V>
typename V::value_type* grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return bf16_to_float(x); }
inline void store(float* dst, float x) { *dst = x; }
inline void store(uint16_t* dst, float x) { *dst = float_to_bf16(x); }

// Dot product with 16 partial sums: a fixed order that SSE vectorises as four
// 4-wide accumulators.
inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  float s[16] = {};
  int d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) s[j] += a[d + j] * b[d + j];
  for (; d + 4 <= n; d += 4)
    for (int j = 0; j < 4; ++j) s[j] += a[d + j] * b[d + j];
  for (int j = 0; j < 4; ++j) s[j] += (s[j + 4] + s[j + 8]) + s[j + 12];
  float t = (s[0] + s[2]) + (s[1] + s[3]);
  for (; d < n; ++d) t += a[d] * b[d];
  return t;
}

// exp(x) in place for x <= 0 (the scores minus their running max): Cephes'
// polynomial after a Cody-Waite reduction, within 2 ulp. exp(x) for x < -87.3
// (and -inf) is 0 and NaN stays NaN. The range checks are integer masks on the
// bit pattern: a float compare would stop GCC from vectorising the loop unless
// -fno-trapping-math were given.
inline void exp_nonpositive(float* __restrict x, int n) {
  const float low = -87.3f;  // exp(low) is just above FLT_MIN: 2^fn stays a normal float
  uint32_t low_bits;
  std::memcpy(&low_bits, &low, sizeof(low_bits));
  // key(x): an int32 whose order is the float order (negative floats have their
  // magnitude bits flipped).
  const int32_t key_low = static_cast<int32_t>(low_bits ^ 0x7fffffffu);
  for (int i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    const int32_t si = static_cast<int32_t>(u);
    const int32_t key = si ^ static_cast<int32_t>(static_cast<uint32_t>(si >> 31) >> 1);
    // All ones when low <= x <= +0 (NaN and -inf fall outside).
    const uint32_t in_range = static_cast<uint32_t>(-static_cast<int32_t>((key >= key_low) & (key <= 0)));
    const uint32_t nan = static_cast<uint32_t>(-static_cast<int32_t>((u & 0x7fffffffu) > 0x7f800000u));
    const uint32_t vu = (u & in_range) | (low_bits & ~in_range);
    float v;
    std::memcpy(&v, &vu, sizeof(v));
    const float fn = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2), in [-126, 0]
    const float r = (v - fn * 0.693359375f) - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float e = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;  // 2^fn
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    const float y = e * scale;
    uint32_t yu;
    std::memcpy(&yu, &y, sizeof(yu));
    yu = (yu & in_range) | (u & nan);
    std::memcpy(&x[i], &yu, sizeof(yu));
  }
}

// Rows of one chunk as float32: fp32 storage is read in place, bf16 is widened
// into buf (head_dim floats per row).
inline const float* rows_as_float(const float* src, int64_t stride, int n, int dim, float*,
                                  int64_t* out_stride) {
  (void)n;
  (void)dim;
  *out_stride = stride;
  return src;
}
inline const float* rows_as_float(const uint16_t* src, int64_t stride, int n, int dim, float* buf,
                                  int64_t* out_stride) {
  for (int t = 0; t < n; ++t) {
    const uint16_t* __restrict in = src + t * stride;
    float* __restrict o = buf + static_cast<int64_t>(t) * dim;
    for (int d = 0; d < dim; ++d) {
      const uint32_t bits = static_cast<uint32_t>(in[d]) << 16;
      std::memcpy(&o[d], &bits, sizeof(float));
    }
  }
  *out_stride = dim;
  return buf;
}

// One row's online-softmax update with the cnt keys idx[0..cnt) of a chunk.
inline void update_row(const float* __restrict qrow, const float* K, int64_t ks, const float* V, int64_t vs,
                       const int32_t* idx, int cnt, int dim, float scale, float* __restrict s,
                       float* __restrict tmp, float* __restrict acc, float* m, float* l) {
  float cm = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < cnt; ++c) {
    s[c] = dot(qrow, K + idx[c] * ks, dim) * scale;
    cm = std::max(cm, s[c]);
  }
  const float mo = *m;
  const float mn = std::max(mo, cm);
  for (int c = 0; c < cnt; ++c) s[c] -= mn;
  exp_nonpositive(s, cnt);
  float sum = 0.0f;
  for (int c = 0; c < cnt; ++c) sum += s[c];
  // The first chunk has mo = -inf and nothing to rescale.
  const float alpha = mo == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(mo - mn);
  *l = *l * alpha + sum;
  *m = mn;

  // tmp = sum_c s[c] * V[idx[c]], four keys per pass over head_dim.
  for (int d = 0; d < dim; ++d) tmp[d] = 0.0f;
  int c = 0;
  for (; c + 4 <= cnt; c += 4) {
    const float* __restrict v0 = V + idx[c] * vs;
    const float* __restrict v1 = V + idx[c + 1] * vs;
    const float* __restrict v2 = V + idx[c + 2] * vs;
    const float* __restrict v3 = V + idx[c + 3] * vs;
    const float p0 = s[c], p1 = s[c + 1], p2 = s[c + 2], p3 = s[c + 3];
    for (int d = 0; d < dim; ++d) tmp[d] += ((p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]));
  }
  for (; c < cnt; ++c) {
    const float* __restrict v = V + idx[c] * vs;
    const float p = s[c];
    for (int d = 0; d < dim; ++d) tmp[d] += p * v[d];
  }
  for (int d = 0; d < dim; ++d) acc[d] = acc[d] * alpha + tmp[d];
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

template <typename T>
void run(const TreeAttentionProblem& p, int64_t max_queries) {
  const KVCacheConfig& cfg = p.cache->config();
  const int dim = cfg.head_dim;
  const int nkv = cfg.num_kv_heads;
  const int group = p.num_q_heads / nkv;
  const int64_t bs = cfg.block_size;
  const int64_t row = static_cast<int64_t>(nkv) * dim;  // elements per token row of a plane
  const int64_t plane = static_cast<int64_t>(cfg.num_blocks) * bs * row;
  const T* kplane = static_cast<const T*>(p.cache->storage()) + (2 * static_cast<int64_t>(p.layer)) * plane;
  const T* vplane = kplane + plane;
  const T* q = static_cast<const T*>(p.q);
  T* out = static_cast<T*>(p.out);

  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(max_queries, kTileFloats / (group * dim)));
  const int64_t rows_max = tile * group;
  thread_local Workspace ws;
  float* qf = grow(ws.q, static_cast<size_t>(rows_max * dim));
  float* acc = grow(ws.acc, static_cast<size_t>(rows_max * dim));
  float* m = grow(ws.m, static_cast<size_t>(rows_max));
  float* l = grow(ws.l, static_cast<size_t>(rows_max));
  float* s = grow(ws.s, kChunk);
  float* tmp = grow(ws.tmp, static_cast<size_t>(dim));
  float* kbuf = grow(ws.kbuf, static_cast<size_t>(kChunk) * dim);
  float* vbuf = grow(ws.vbuf, static_cast<size_t>(kChunk) * dim);
  int32_t* idx = grow(ws.idx, static_cast<size_t>(tile * kChunk));
  int32_t* cnt = grow(ws.cnt, static_cast<size_t>(tile));
  uint8_t* mask = grow(ws.mask, static_cast<size_t>(tile * max_queries));
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t q0 = p.q_offsets[b];
    const int64_t nq = p.q_offsets[b + 1] - q0;
    if (nq == 0) continue;
    const int32_t* table = nullptr;
    int32_t nblocks = 0;
    int64_t ctx = 0;
    p.cache->block_table(p.seq_ids[b], &table, &nblocks);  // validated: cannot fail
    p.cache->length(p.seq_ids[b], &ctx);
    const int32_t* parents = p.parents + q0;

    for (int64_t t0 = 0; t0 < nq; t0 += tile) {
      const int64_t tq = std::min(tile, nq - t0);
      // mask[qi * nq + j] = 1 iff tree node j is query t0 + qi or one of its ancestors.
      std::memset(mask, 0, static_cast<size_t>(tq * nq));
      for (int64_t qi = 0; qi < tq; ++qi)
        for (int32_t j = static_cast<int32_t>(t0 + qi); j >= 0; j = parents[j]) mask[qi * nq + j] = 1;
      // Ancestors precede their descendants, so no row of the tile needs a node past its last query.
      const int64_t end = ctx + t0 + tq;

      for (int g = 0; g < nkv; ++g) {
        const int64_t rows = tq * group;
        for (int64_t qi = 0; qi < tq; ++qi)
          for (int h = 0; h < group; ++h) {
            const T* src = q + (q0 + t0 + qi) * p.q_stride_token +
                           (static_cast<int64_t>(g) * group + h) * p.q_stride_head;
            float* dst = qf + (qi * group + h) * dim;
            for (int d = 0; d < dim; ++d) dst[d] = to_float(src[d]);
          }
        std::fill(m, m + rows, neg_inf);
        std::fill(l, l + rows, 0.0f);
        std::fill(acc, acc + rows * dim, 0.0f);

        for (int64_t pos = 0; pos < end;) {
          const int64_t off = pos % bs;
          int64_t n = std::min<int64_t>({kChunk, bs - off, end - pos});
          if (pos < ctx) n = std::min(n, ctx - pos);  // a chunk is all context or all tree
          const bool context = pos < ctx;
          int64_t any = 0;
          for (int64_t qi = 0; qi < tq; ++qi) {
            int32_t* ix = idx + qi * kChunk;
            int32_t c = 0;
            if (context) {
              for (int32_t t = 0; t < n; ++t) ix[c++] = t;
            } else {
              const uint8_t* mk = mask + qi * nq + (pos - ctx);
              for (int32_t t = 0; t < n; ++t)
                if (mk[t]) ix[c++] = t;
            }
            cnt[qi] = c;
            any += c;
          }
          if (any > 0) {
            const int64_t first =
                (static_cast<int64_t>(table[pos / bs]) * bs + off) * row + static_cast<int64_t>(g) * dim;
            int64_t ks = 0, vs = 0;
            const float* K = rows_as_float(kplane + first, row, static_cast<int>(n), dim, kbuf, &ks);
            const float* V = rows_as_float(vplane + first, row, static_cast<int>(n), dim, vbuf, &vs);
            for (int64_t qi = 0; qi < tq; ++qi) {
              if (cnt[qi] == 0) continue;
              for (int h = 0; h < group; ++h) {
                const int64_t r = qi * group + h;
                update_row(qf + r * dim, K, ks, V, vs, idx + qi * kChunk, cnt[qi], dim, p.scale, s, tmp,
                           acc + r * dim, m + r, l + r);
              }
            }
          }
          pos += n;
        }

        for (int64_t qi = 0; qi < tq; ++qi)
          for (int h = 0; h < group; ++h) {
            const int64_t r = qi * group + h;
            const float inv = 1.0f / l[r];
            T* dst = out + ((q0 + t0 + qi) * p.num_q_heads + static_cast<int64_t>(g) * group + h) * dim;
            const float* a = acc + r * dim;
            for (int d = 0; d < dim; ++d) store(dst + d, a[d] * inv);
          }
      }
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
