// cuda/verify.cu: lossless tree verification on the GPU (twin of
// cpp/src/verify.cpp; the rules are in verify.h and cuda_ops.h).
//
// One block of kThreads threads walks one tree. The walk is sequential, but
// each step over a logit row (argmax; max, top-k, top-p, softmax; inverse-CDF
// draw; with draft rows, their mass and the residuals) is a block-wide pass,
// and every reduction has a fixed association order, so a run replays bit for
// bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "atlas/cuda_ops.h"
#include "atlas/tree.h"
#include "common.cuh"
#include "philox.cuh"

namespace atlas {
namespace cuda {
namespace {

// 512 threads: enough 16-byte loads in flight to stream a row with one block,
// and 128 registers per thread for the sampling path without spills.
constexpr int kThreads = 512;
constexpr int kMaxNodes = kMaxTreeNodes;
// 16-byte loads issued per thread before the first is used: the greedy walk
// streams a row with one block, so its bandwidth is the bytes in flight per
// block over the DRAM latency (512 x 8 x 16 B = 64 KiB); the sampling passes
// mostly re-read rows from L2 and have less room in registers.
constexpr int kGreedyLoadBatch = 8;
constexpr int kLoadBatch = 4;
// Contiguous elements per thread in the ordered (id-order) scans.
constexpr int kScanItems = 8;
// Greedy prepass: at most this many blocks per row, each at least this long.
constexpr int kMaxSplits = 64;
constexpr int64_t kMinSplitLen = 4096;
// Probability mass in fixed point for top-p: 2^40 units per unit of mass keeps
// the sum of 2^31 truncated terms exact in 64 bits.
constexpr float kMassScale = 1099511627776.0f;  // 2^40

struct ArgmaxPartial {
  float value;
  int32_t index;  // kPartialBad: NaN/+inf in the chunk; kPartialNone: no value > -inf
};
constexpr int32_t kPartialBad = -2;
constexpr int32_t kPartialNone = INT32_MAX;

struct VerifyArgs {
  const void* logits;
  int64_t vocab;
  int64_t row_stride;
  bool vec_rows;  // every row starts 16-byte aligned: vector loads
  const float* draft;
  int64_t draft_stride;
  const int32_t* tokens;
  const int32_t* parents;
  const int64_t* offsets;
  int64_t batch;
  int64_t total_nodes;
  const SamplingParams* params;
  int64_t max_accept;
  int32_t* accepted;
  int32_t* emitted;
  int32_t* num_accepted;
  int32_t* status;
  float* rows;  // [batch, rows_stride] the current distribution of each tree (sampling)
  int64_t rows_stride;
  const ArgmaxPartial* partials;  // [total_nodes, splits] greedy prepass; null = none
  int32_t splits;
};

struct Shared {
  int32_t parent[kMaxNodes];
  int32_t token[kMaxNodes];
  int32_t anc[kMaxNodes];  // pointer jumping, then the children of the current node
  int32_t dep[kMaxNodes];
  int32_t path[kMaxNodes];
  float fred[33];
  double dred[33];
  int64_t ired[33];
  unsigned long long ured[33];
  unsigned long long hist_w[256];
  uint32_t hist_c[256];
  // values one thread decides and all read
  int bc_digit;
  unsigned long long bc_above, bc_tied_w;
  uint32_t bc_tied_c;
  int64_t bc_index;
  int bc_accept, bc_badq;
};

// Order-preserving map of floats to unsigned ints (-0 folded onto +0, so that
// equal values get equal keys).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Calls f(t, value) for t in [begin, end) of a row, each thread visiting its
// elements in increasing t (so "first maximum" ties resolve to the lower id).
// kReadOnly: the row is not written during the kernel (non-coherent loads).
template <bool kReadOnly, typename T, typename F, int kBatch = kLoadBatch>
__device__ __forceinline__ void for_each_elem(const T* row, int64_t begin, int64_t end, bool vec, F&& f) {
  constexpr int kN = Vec16<T>::kN;
  int64_t tail = begin;
  if (vec) {
    const uint4* v = reinterpret_cast<const uint4*>(row + begin);
    const int64_t nvec = (end - begin) / kN;
    const int64_t step = static_cast<int64_t>(blockDim.x) * kBatch;
    for (int64_t base = threadIdx.x; base < nvec; base += step) {
      uint4 raw[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t k = base + static_cast<int64_t>(u) * blockDim.x;
        raw[u] = make_uint4(0, 0, 0, 0);
        if (k < nvec) raw[u] = kReadOnly ? __ldg(v + k) : v[k];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t k = base + static_cast<int64_t>(u) * blockDim.x;
        if (k < nvec) {
          float x[kN];
          Vec16<T>::unpack(raw[u], x);
#pragma unroll
          for (int e = 0; e < kN; ++e) f(begin + k * kN + e, x[e]);
        }
      }
    }
    tail = begin + nvec * kN;
  }
  for (int64_t t = tail + threadIdx.x; t < end; t += blockDim.x) f(t, to_float(row[t]));
}

// Per-thread argmax of row[begin, end): NaN and +inf set *bad.
template <typename T>
__device__ __forceinline__ void thread_argmax(const T* row, int64_t begin, int64_t end, bool vec, float* best,
                                              int64_t* arg, bool* bad) {
  float b = -INFINITY;
  int64_t a = INT64_MAX;
  bool nf = false;
  auto visit = [&](int64_t t, float x) {
    nf |= (x != x) || (x == INFINITY);
    if (x > b) {
      b = x;
      a = t;
    }
  };
  for_each_elem<true, T, decltype(visit)&, kGreedyLoadBatch>(row, begin, end, vec, visit);
  *best = b;
  *arg = a;
  *bad = nf;
}

// ---- radix select ---------------------------------------------------------------------------

struct RadixResult {
  bool found;
  uint32_t key;               // the selected key
  unsigned long long above;   // weight of keys > key
  unsigned long long tied_w;  // weight of keys == key
  uint32_t tied_c;            // count of keys == key
};

// The largest key k such that the weight of the elements with key >= k
// reaches `target`, by four 8-bit digit passes over the row (most significant
// first). visit(cb) calls cb(key, weight) for this thread's elements. Integer
// weights make the histograms exact whatever order the atomics land in.
template <typename Visit>
__device__ RadixResult radix_select(Visit&& visit, unsigned long long target, Shared& sh) {
  RadixResult res{false, 0u, 0ull, 0ull, 0u};
  uint32_t prefix = 0, mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      sh.hist_w[i] = 0;
      sh.hist_c[i] = 0;
    }
    __syncthreads();
    // Runs of equal digits are summed in registers first: the bins that many
    // elements share (the exponent byte of similar values) would otherwise
    // serialise the shared-memory atomics.
    int cur = -1;
    unsigned long long cw = 0;
    uint32_t cc = 0;
    visit([&](uint32_t key, unsigned long long w) {
      if ((key & mask) != prefix) return;
      const int d = static_cast<int>((key >> shift) & 255u);
      if (d != cur) {
        if (cc) {
          atomicAdd(&sh.hist_w[cur], cw);
          atomicAdd(&sh.hist_c[cur], cc);
        }
        cur = d;
        cw = 0;
        cc = 0;
      }
      cw += w;
      cc += 1;
    });
    if (cc) {
      atomicAdd(&sh.hist_w[cur], cw);
      atomicAdd(&sh.hist_c[cur], cc);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      unsigned long long lw[8], s = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        lw[k] = sh.hist_w[lane * 8 + k];
        s += lw[k];
      }
      unsigned long long suf = s;  // weight of the bins of this lane and the lanes above
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long n = __shfl_down_sync(0xffffffffu, suf, o);
        if (lane + o < 32) suf += n;
      }
      const unsigned ok = __ballot_sync(0xffffffffu, above + suf >= target);
      if (lane == 0) sh.bc_digit = -1;
      __syncwarp();
      if (ok != 0u && lane == 31 - __clz(ok)) {
        unsigned long long cum = above + (suf - s);
        for (int k = 7; k >= 0; --k) {
          if (cum + lw[k] >= target) {
            sh.bc_digit = lane * 8 + k;
            sh.bc_above = cum;
            sh.bc_tied_w = lw[k];
            sh.bc_tied_c = sh.hist_c[lane * 8 + k];
            break;
          }
          cum += lw[k];
        }
      }
    }
    __syncthreads();
    const int digit = sh.bc_digit;
    if (digit < 0) return res;  // the whole row weighs less than target (first level only)
    prefix |= static_cast<uint32_t>(digit) << shift;
    mask |= 0xffu << shift;
    above = sh.bc_above;
    res.tied_w = sh.bc_tied_w;
    res.tied_c = sh.bc_tied_c;
    __syncthreads();  // everyone has read bc_* before the next level writes them
  }
  res.found = true;
  res.key = prefix;
  res.above = above;
  return res;
}

// ---- ordered scans ------------------------------------------------------------------------------

// Index of the n-th (1-based) element of the row, in id order, for which
// pred(t, value) holds; n must not exceed their count.
template <typename T, typename Pred>
__device__ int64_t find_nth(const T* row, int64_t V, unsigned long long n, Pred&& pred, Shared& sh) {
  unsigned long long running = 0;
  for (int64_t tile = 0; tile < V; tile += static_cast<int64_t>(blockDim.x) * kScanItems) {
    const int64_t beg = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    unsigned long long cnt = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t t = beg + k;
      if (t < V && pred(t, to_float(row[t]))) ++cnt;
    }
    unsigned long long total;
    const unsigned long long excl =
        block_exclusive_scan<unsigned long long>(cnt, sh.ured, &total);
    if (cnt > 0 && running + excl < n && n <= running + excl + cnt) {
      unsigned long long seen = running + excl;
      for (int k = 0; k < kScanItems; ++k) {
        const int64_t t = beg + k;
        if (t < V && pred(t, to_float(row[t])) && ++seen == n) {
          sh.bc_index = t;
          break;
        }
      }
    }
    __syncthreads();
    if (running + total >= n) return sh.bc_index;
    running += total;
  }
  return V - 1;  // not reached when n is within the count
}

// Block-wide sum in double (the association order depends only on the block
// shape); every thread gets it.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
  double total;
  block_exclusive_scan<double>(v, scratch, &total);
  return total;
}

// The draw from p at u (verify.h): the first id of prow[0, V) (unnormalised,
// total mass z) whose running sum exceeds u * z, summed in double as the CPU
// twin does; when rounding leaves none, the last id with mass > 0.
__device__ int64_t sample_row(const float* prow, int64_t V, double z, double u, Shared& sh) {
  const double target = u * z;
  double running = 0.0;
  int64_t last = -1;
  for (int64_t tile = 0; tile < V; tile += static_cast<int64_t>(blockDim.x) * kScanItems) {
    const int64_t beg = tile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    float vals[kScanItems];
    double local = 0.0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t t = beg + k;
      vals[k] = t < V ? prow[t] : 0.0f;
      local += vals[k];
      if (vals[k] > 0.0f) last = t;
    }
    double total;
    const double excl = block_exclusive_scan<double>(local, sh.dred, &total);
    const double base = running + excl;
    int64_t cand = INT64_MAX;
    if (base + local > target) {
      double acc = base;
#pragma unroll
      for (int k = 0; k < kScanItems; ++k) {
        acc += vals[k];
        if (cand == INT64_MAX && vals[k] > 0.0f && acc > target) cand = beg + k;
      }
    }
    cand = block_min_i64(cand, sh.ired);
    if (cand != INT64_MAX) return cand;
    running += total;
  }
  return block_max_i64(last, sh.ired);
}

// ---- sampling transforms --------------------------------------------------------------------------

struct Transform {
  float temperature;
  float max_x;       // max of logits / temperature
  bool topk;
  uint32_t topk_key; // keep key >= this
  bool topp;
  uint32_t topp_key; // keep key > this, and key == this up to id topp_cut
  int64_t topp_cut;
};

__device__ __forceinline__ bool kept_topk(const Transform& tr, uint32_t key) {
  return !tr.topk || key >= tr.topk_key;
}
__device__ __forceinline__ bool kept(const Transform& tr, int64_t t, uint32_t key) {
  if (!kept_topk(tr, key)) return false;
  if (tr.topp && (key < tr.topp_key || (key == tr.topp_key && t > tr.topp_cut))) return false;
  return true;
}

// Writes p (unnormalised: exp(x - max) on the kept tokens, 0 elsewhere) of
// logits row `row` to prow and its sum to *z. Returns a DeviceError.
template <typename T>
__device__ int32_t sample_transform(const T* row, const VerifyArgs& a, const SamplingParams& sp, float* prow,
                                    double* z, Shared& sh) {
  const int64_t V = a.vocab;
  const float temp = sp.temperature;
  float mx = -INFINITY;
  bool bad = false;
  for_each_elem<true>(row, 0, V, a.vec_rows, [&](int64_t, float l) {
    const float x = l / temp;
    bad |= (l != l) || (x == INFINITY);
    mx = fmaxf(mx, x);
  });
  if (__syncthreads_or(bad)) return static_cast<int32_t>(DeviceError::kNonFiniteLogits);
  Transform tr{temp, block_max(mx, sh.fred), false, 0u, false, 0u, INT64_MAX};
  if (tr.max_x == -INFINITY) return static_cast<int32_t>(DeviceError::kNoFiniteLogit);

  if (sp.top_k > 0 && sp.top_k < V) {
    RadixResult r = radix_select(
        [&](auto&& cb) {
          for_each_elem<true>(row, 0, V, a.vec_rows,
                              [&](int64_t, float l) { cb(order_key(l / temp), 1ull); });
        },
        static_cast<unsigned long long>(sp.top_k), sh);
    tr.topk = true;  // always found: V elements of weight 1 reach any k < V
    tr.topk_key = r.key;
  }

  if (sp.top_p < 1.0f) {
    float s = 0.0f;
    for_each_elem<true>(row, 0, V, a.vec_rows, [&](int64_t, float l) {
      const float x = l / temp;
      if (kept_topk(tr, order_key(x))) s += expf(x - tr.max_x);
    });
    const float sum = block_sum(s, sh.fred);
    unsigned long long target = __float2ull_rz(sp.top_p * kMassScale);
    if (target == 0) target = 1;  // at least the most likely token
    RadixResult r = radix_select(
        [&](auto&& cb) {
          for_each_elem<true>(row, 0, V, a.vec_rows, [&](int64_t, float l) {
            const float x = l / temp;
            const uint32_t key = order_key(x);
            if (kept_topk(tr, key)) cb(key, __float2ull_rz(expf(x - tr.max_x) / sum * kMassScale));
          });
        },
        target, sh);
    if (r.found) {  // not found: the truncated masses sum below top_p, keep everything
      tr.topp = true;
      tr.topp_key = r.key;
      if (r.tied_c > 1) {
        // Equal keys carry equal mass; keep the fewest of them, lowest ids first.
        const unsigned long long need = target - r.above;
        const unsigned long long each = r.tied_w / r.tied_c;
        const unsigned long long take = each > 0 ? (need + each - 1) / each : r.tied_c;
        if (take < r.tied_c) {
          const uint32_t tkey = r.key;
          tr.topp_cut = find_nth(row, V, take,
                                 [&](int64_t, float l) {
                                   const uint32_t key = order_key(l / temp);
                                   return key == tkey && kept_topk(tr, key);
                                 },
                                 sh);
        }
      }
    }
  }

  double zs = 0.0;
  for_each_elem<true>(row, 0, V, a.vec_rows, [&](int64_t t, float l) {
    const float x = l / temp;
    const float e = kept(tr, t, order_key(x)) ? expf(x - tr.max_x) : 0.0f;
    prow[t] = e;
    zs += e;
  });
  *z = block_sum_f64(zs, sh.dred);  // >= 1: the maximum is always kept
  return 0;
}

// The draft row's mass (double), and whether it holds a negative, NaN or
// infinite entry.
__device__ double draft_mass(const float* qrow, int64_t V, bool* bad, Shared& sh) {
  double s = 0.0;
  bool b = false;
  for (int64_t t = threadIdx.x; t < V; t += blockDim.x) {
    const float q = qrow[t];
    b |= !(q >= 0.0f && q < INFINITY);
    s += q;
  }
  *bad = __syncthreads_or(b);
  return block_sum_f64(s, sh.dred);
}

// p <- normalise(max(p - q / q_total, 0)) with p = prow / z, after the
// rejection of token x, whose probability becomes exactly 0 (the CPU twin's
// subtract_draft, operation for operation). Returns the new mass; when nothing
// would be left (only through rounding) p stays as it was and so does z.
__device__ double draft_residual(float* prow, int64_t V, double z, const float* qrow, double q_total,
                                 int32_t x, Shared& sh) {
  const double inv = 1.0 / z, inv_q = 1.0 / q_total;
  auto residual = [&](int64_t t) {
    // Rounded intrinsics: never fused into an FMA, so the CPU's bits.
    const double r = __dsub_rn(__dmul_rn(prow[t], inv), __dmul_rn(qrow[t], inv_q));
    return static_cast<float>(r > 0.0 ? r : 0.0);
  };
  double s = 0.0;
  for (int64_t t = threadIdx.x; t < V; t += blockDim.x)
    if (t != x) s += residual(t);
  if (!(block_sum_f64(s, sh.dred) > 0.0)) return z;
  s = 0.0;
  for (int64_t t = threadIdx.x; t < V; t += blockDim.x) {
    const float r = t == x ? 0.0f : residual(t);
    prow[t] = r;
    s += r;
  }
  return block_sum_f64(s, sh.dred);
}

// ---- the kernels ------------------------------------------------------------------------------

__device__ void write_failure(const VerifyArgs& a, int64_t b, int32_t err) {
  for (int64_t k = threadIdx.x; k < a.max_accept; k += blockDim.x) a.accepted[b * a.max_accept + k] = -1;
  for (int64_t k = threadIdx.x; k <= a.max_accept; k += blockDim.x)
    a.emitted[b * (a.max_accept + 1) + k] = -1;
  if (threadIdx.x == 0) {
    a.num_accepted[b] = 0;
    a.status[b] = err;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) verify_kernel(VerifyArgs a) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;

  // -- the tree: offsets, parameters, parents, tokens, depth
  const int64_t t0 = a.offsets[b], t1 = a.offsets[b + 1];
  const bool offsets_ok = t0 >= 0 && t0 < t1 && t1 <= a.total_nodes && (b != 0 || t0 == 0) &&
                          (b != a.batch - 1 || t1 == a.total_nodes);
  if (!offsets_ok) return write_failure(a, b, static_cast<int32_t>(DeviceError::kBadTreeOffsets));
  if (t1 - t0 > kMaxNodes) return write_failure(a, b, static_cast<int32_t>(DeviceError::kTreeTooLarge));
  const SamplingParams sp = a.params[b];
  if (!(sp.temperature >= 0.0f && sp.temperature < INFINITY) || sp.top_k < 0 ||
      !(sp.top_p > 0.0f && sp.top_p <= 1.0f))
    return write_failure(a, b, static_cast<int32_t>(DeviceError::kBadSamplingParams));
  const int32_t n = static_cast<int32_t>(t1 - t0);

  bool bad_parent = false, bad_token = false;
  for (int32_t c = tid; c < n; c += kThreads) {
    const int32_t p = a.parents[t0 + c], tok = a.tokens[t0 + c];
    sh.parent[c] = p;
    sh.token[c] = tok;
    sh.anc[c] = p;
    sh.dep[c] = c == 0 ? 0 : 1;
    bad_parent |= c == 0 ? p != -1 : (p < 0 || p >= c);
    bad_token |= c > 0 && (tok < 0 || tok >= a.vocab);
  }
  if (__syncthreads_or(bad_parent)) return write_failure(a, b, static_cast<int32_t>(DeviceError::kBadParent));
  if (__syncthreads_or(bad_token)) return write_failure(a, b, static_cast<int32_t>(DeviceError::kBadToken));

  // Depths by pointer jumping: after r rounds anc[c] is the 2^r-th ancestor
  // and dep[c] the distance to it (or to the root).
  for (int32_t span = 1; span < n; span <<= 1) {
    int32_t na[kMaxNodes / kThreads], nd[kMaxNodes / kThreads];
#pragma unroll
    for (int k = 0; k < kMaxNodes / kThreads; ++k) {
      const int32_t c = tid + k * kThreads;
      if (c < n) {
        const int32_t p = sh.anc[c];
        na[k] = p >= 0 ? sh.anc[p] : -1;
        nd[k] = p >= 0 ? sh.dep[c] + sh.dep[p] : sh.dep[c];
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMaxNodes / kThreads; ++k) {
      const int32_t c = tid + k * kThreads;
      if (c < n) {
        sh.anc[c] = na[k];
        sh.dep[c] = nd[k];
      }
    }
    __syncthreads();
  }
  int64_t deepest = 0;
  for (int32_t c = tid; c < n; c += kThreads) deepest = max(deepest, static_cast<int64_t>(sh.dep[c]));
  if (block_max_i64(deepest, sh.ired) > a.max_accept)
    return write_failure(a, b, static_cast<int32_t>(DeviceError::kTooDeep));

  // -- the walk
  const T* logits = static_cast<const T*>(a.logits);
  const bool greedy = sp.temperature == 0.0f;
  float* prow = a.rows + b * a.rows_stride;
  int32_t node = 0, depth = 0, err = 0;
  int64_t bonus = -1;
  while (true) {
    const int64_t g = t0 + node;
    const T* row = logits + g * a.row_stride;
    if (greedy) {
      float best = -INFINITY;
      int64_t arg = INT64_MAX;
      bool bad = false;
      if (a.partials) {
        for (int s = tid; s < a.splits; s += kThreads) {
          const ArgmaxPartial p = a.partials[g * a.splits + s];
          if (p.index == kPartialBad) bad = true;
          else if (p.index != kPartialNone) argmax_merge(best, arg, p.value, p.index);
        }
      } else {
        thread_argmax(row, 0, a.vocab, a.vec_rows, &best, &arg, &bad);
      }
      if (__syncthreads_or(bad)) {
        err = static_cast<int32_t>(DeviceError::kNonFiniteLogits);
        break;
      }
      block_argmax(best, arg, sh.fred, sh.ired);
      if (arg == INT64_MAX) {
        err = static_cast<int32_t>(DeviceError::kNoFiniteLogit);
        break;
      }
      // The accepted child: the first child (in index order) holding the argmax.
      int64_t next = INT64_MAX;
      for (int32_t c = node + 1 + tid; c < n; c += kThreads)
        if (sh.parent[c] == node && sh.token[c] == arg) next = min(next, static_cast<int64_t>(c));
      next = block_min_i64(next, sh.ired);
      if (next == INT64_MAX) {
        bonus = arg;
        break;
      }
      if (tid == 0) sh.path[depth] = static_cast<int32_t>(next);
      ++depth;
      node = static_cast<int32_t>(next);
      continue;
    }

    double z = 0.0;
    err = sample_transform(row, a, sp, prow, &z, sh);
    if (err) break;
    // Uniforms are keyed by the node's position, the root's plus its depth.
    const uint64_t position = sp.offset + static_cast<uint64_t>(depth);
    const float* qrow = a.draft ? a.draft + g * a.draft_stride : nullptr;
    if (!qrow) {
      // One-hot drafts: the position's draw, and the first child holding it.
      const double u = philox_uniform53(sp.seed, position, kStreamOneHot, 0);
      const int64_t y = sample_row(prow, a.vocab, z, u, sh);
      int64_t next = INT64_MAX;
      for (int32_t c = node + 1 + tid; c < n; c += kThreads)
        if (sh.parent[c] == node && sh.token[c] == y) next = min(next, static_cast<int64_t>(c));
      next = block_min_i64(next, sh.ired);
      if (next == INT64_MAX) {
        bonus = y;
        break;
      }
      if (tid == 0) sh.path[depth] = static_cast<int32_t>(next);
      ++depth;
      node = static_cast<int32_t>(next);
      continue;
    }

    // draft_probs: recursive rejection sampling without replacement. The
    // children of node, in index order, into sh.anc[0, nchild).
    int32_t nchild = 0;
    for (int32_t base = node + 1; base < n; base += kThreads) {
      const int32_t c = base + tid;
      const int64_t flag = c < n && sh.parent[c] == node ? 1 : 0;
      int64_t total;
      const int64_t pos = block_exclusive_scan<int64_t>(flag, sh.ired, &total);
      if (flag) sh.anc[nchild + pos] = c;
      nchild += static_cast<int32_t>(total);
    }
    __syncthreads();
    int32_t chosen = -1;
    double q_left = 0.0;  // the row's mass less that of the rejected children
    if (nchild > 0) {
      bool bad = false;
      q_left = draft_mass(qrow, a.vocab, &bad, sh);
      if (bad) {
        err = static_cast<int32_t>(DeviceError::kBadDraftProbs);
        break;
      }
    }
    for (int32_t j = 0; j < nchild; ++j) {
      const int32_t c = sh.anc[j];
      const int32_t x = sh.token[c];
      // A sibling repeating a rejected token has q = 0 there: it cannot have
      // been drafted (the CPU twin refuses it too).
      bool dup = false;
      for (int32_t k = tid; k < j; k += kThreads) dup |= sh.token[sh.anc[k]] == x;
      dup = __syncthreads_or(dup);
      const double qx = qrow[x];
      const double q_total = fmax(q_left, qx);  // >= q(x) in exact arithmetic
      if (dup || !(qx > 0.0)) {
        err = static_cast<int32_t>(DeviceError::kBadDraftProbs);
        break;
      }
      if (tid == 0) {
        const double u = philox_uniform53(sp.seed, position, kStreamDraft, static_cast<uint32_t>(j));
        // u < p_j(x) / q_j(x), multiplied through by q_total * z (as the CPU twin).
        sh.bc_accept = u * qx * z < static_cast<double>(prow[x]) * q_total;
      }
      __syncthreads();
      const bool accept = sh.bc_accept;
      __syncthreads();  // bc_accept is rewritten by the next attempt
      if (accept) {
        chosen = c;
        break;
      }
      z = draft_residual(prow, a.vocab, z, qrow, q_total, x, sh);
      q_left -= qx;
    }
    if (err) break;
    if (chosen >= 0) {
      if (tid == 0) sh.path[depth] = chosen;
      ++depth;
      node = chosen;
      continue;
    }
    bonus = sample_row(prow, a.vocab, z, philox_uniform53(sp.seed, position, kStreamDraftBonus, 0), sh);
    break;
  }

  __syncthreads();  // sh.path is complete
  if (err) return write_failure(a, b, err);
  for (int64_t k = tid; k < a.max_accept; k += kThreads)
    a.accepted[b * a.max_accept + k] = k < depth ? sh.path[k] : -1;
  for (int64_t k = tid; k <= a.max_accept; k += kThreads) {
    int32_t v = -1;
    if (k < depth) v = sh.token[sh.path[k]];
    else if (k == depth) v = static_cast<int32_t>(bonus);
    a.emitted[b * (a.max_accept + 1) + k] = v;
  }
  if (tid == 0) {
    a.num_accepted[b] = depth;
    a.status[b] = 0;
  }
}

// Greedy prepass: the argmax of chunk blockIdx.y of row blockIdx.x.
template <typename T>
__global__ void __launch_bounds__(256) argmax_rows_kernel(const T* logits, int64_t vocab, int64_t row_stride,
                                                          bool vec, int64_t split_len, int32_t splits,
                                                          ArgmaxPartial* out) {
  __shared__ float fred[33];
  __shared__ int64_t ired[33];
  const int64_t row = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * split_len;
  const int64_t end = min(vocab, begin + split_len);
  float best = -INFINITY;
  int64_t arg = INT64_MAX;
  bool bad = false;
  if (begin < end) thread_argmax(logits + row * row_stride, begin, end, vec, &best, &arg, &bad);
  bad = __syncthreads_or(bad);
  block_argmax(best, arg, fred, ired);
  if (threadIdx.x == 0) {
    ArgmaxPartial p;
    p.value = best;
    p.index = bad ? kPartialBad : (arg == INT64_MAX ? kPartialNone : static_cast<int32_t>(arg));
    out[row * splits + blockIdx.y] = p;
  }
}

__global__ void philox_kernel(uint64_t seed, uint64_t position, const uint32_t* streams, const uint32_t* js,
                              int64_t n, double* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = philox_uniform53(seed, position, streams[i], js[i]);
}

int64_t rows_stride_of(int64_t vocab) { return (vocab + 63) / 64 * 64; }  // 256-byte rows
int64_t align256(int64_t x) { return (x + 255) / 256 * 256; }

}  // namespace
}  // namespace cuda

int64_t verify_cuda_workspace_bytes(int64_t vocab, int64_t batch, int64_t total_nodes) {
  if (vocab < 1 || batch < 1 || total_nodes < 1) return 0;
  return cuda::align256(batch * cuda::rows_stride_of(vocab) * static_cast<int64_t>(sizeof(float))) +
         total_nodes * cuda::kMaxSplits * static_cast<int64_t>(sizeof(cuda::ArgmaxPartial));
}

Status verify_cuda(const VerifyProblem& p, const VerifyCudaOptions& o, void* stream) {
  using cuda::ArgmaxPartial;
  if (p.logits == nullptr) return Status::Invalid("verify_cuda: logits must not be null");
  if (p.vocab < 1 || p.vocab > INT32_MAX)
    return Status::Invalid("verify_cuda: vocab must be in [1, 2^31), got " + std::to_string(p.vocab));
  if (p.logits_row_stride < p.vocab)
    return Status::Invalid("verify_cuda: logits_row_stride must be >= vocab = " + std::to_string(p.vocab));
  if (p.logits_dtype != DType::kFloat32 && p.logits_dtype != DType::kBFloat16)
    return Status::Invalid("verify_cuda: logits_dtype must be float32 or bfloat16");
  if (p.draft_probs && p.draft_row_stride < p.vocab)
    return Status::Invalid("verify_cuda: draft_row_stride must be >= vocab = " + std::to_string(p.vocab));
  if (!p.tokens || !p.parents || !p.tree_offsets || !p.params)
    return Status::Invalid("verify_cuda: tokens, parents, tree_offsets and params must not be null");
  if (p.batch < 1) return Status::Invalid("verify_cuda: batch must be >= 1, got " + std::to_string(p.batch));
  if (p.batch > INT32_MAX) return Status::Invalid("verify_cuda: batch must be < 2^31");
  if (o.total_nodes < p.batch)
    return Status::Invalid("verify_cuda: total_nodes must be >= batch (one root per tree), got " +
                           std::to_string(o.total_nodes));
  if (p.max_accept < 0) return Status::Invalid("verify_cuda: max_accept must be >= 0");
  if ((p.max_accept > 0 && !p.accepted_out) || !p.emitted_out || !p.num_accepted_out || !o.status_out)
    return Status::Invalid(
        "verify_cuda: accepted_out, emitted_out, num_accepted_out and status_out must not be null");
  const int64_t need = verify_cuda_workspace_bytes(p.vocab, p.batch, o.total_nodes);
  if (!p.workspace || p.workspace_bytes < need || (reinterpret_cast<uintptr_t>(p.workspace) & 255u) != 0)
    return Status::Invalid("verify_cuda: workspace must be " + std::to_string(need) +
                           " bytes (verify_cuda_workspace_bytes), 256-byte aligned");

  const bool bf16 = p.logits_dtype == DType::kBFloat16;
  const int64_t esize = dtype_size(p.logits_dtype);
  cuda::VerifyArgs a;
  a.logits = p.logits;
  a.vocab = p.vocab;
  a.row_stride = p.logits_row_stride;
  a.vec_rows = cuda::aligned16(p.logits) && (p.logits_row_stride * esize) % 16 == 0;
  a.draft = p.draft_probs;
  a.draft_stride = p.draft_row_stride;
  a.tokens = p.tokens;
  a.parents = p.parents;
  a.offsets = p.tree_offsets;
  a.batch = p.batch;
  a.total_nodes = o.total_nodes;
  a.params = p.params;
  a.max_accept = p.max_accept;
  a.accepted = p.accepted_out;
  a.emitted = p.emitted_out;
  a.num_accepted = p.num_accepted_out;
  a.status = o.status_out;
  a.rows = static_cast<float*>(p.workspace);
  a.rows_stride = cuda::rows_stride_of(p.vocab);
  a.partials = nullptr;
  a.splits = 0;
  cudaStream_t s = cuda::as_stream(stream);

  if (o.greedy_prepass) {
    int dev = 0, sms = 0;
    ATLAS_RETURN_IF_ERROR(cuda::cuda_status(cudaGetDevice(&dev), "cudaGetDevice"));
    ATLAS_RETURN_IF_ERROR(cuda_multiprocessor_count(dev, &sms));
    if (o.total_nodes > INT32_MAX)
      return Status::Invalid("verify_cuda: total_nodes must be < 2^31 with the prepass");
    // Enough blocks for ~4 waves of the GPU, each chunk long enough to stream.
    int64_t splits = (4LL * sms + o.total_nodes - 1) / o.total_nodes;
    const int64_t most = (p.vocab + cuda::kMinSplitLen - 1) / cuda::kMinSplitLen;
    splits = std::max<int64_t>(1, std::min<int64_t>({splits, cuda::kMaxSplits, most}));
    int64_t split_len = (p.vocab + splits - 1) / splits;
    split_len = (split_len + 7) / 8 * 8;  // whole 16-byte vectors for either dtype
    splits = (p.vocab + split_len - 1) / split_len;
    auto* partials = reinterpret_cast<ArgmaxPartial*>(
        static_cast<char*>(p.workspace) +
        cuda::align256(p.batch * a.rows_stride * static_cast<int64_t>(sizeof(float))));
    dim3 grid(static_cast<unsigned>(o.total_nodes), static_cast<unsigned>(splits));
    if (bf16)
      cuda::argmax_rows_kernel<uint16_t><<<grid, 256, 0, s>>>(static_cast<const uint16_t*>(p.logits), p.vocab,
                                                              p.logits_row_stride, a.vec_rows, split_len,
                                                              static_cast<int32_t>(splits), partials);
    else
      cuda::argmax_rows_kernel<float><<<grid, 256, 0, s>>>(static_cast<const float*>(p.logits), p.vocab,
                                                           p.logits_row_stride, a.vec_rows, split_len,
                                                           static_cast<int32_t>(splits), partials);
    ATLAS_RETURN_IF_ERROR(cuda::launch_status("argmax_rows_kernel"));
    a.partials = partials;
    a.splits = static_cast<int32_t>(splits);
  }

  if (bf16) cuda::verify_kernel<uint16_t><<<static_cast<unsigned>(p.batch), cuda::kThreads, 0, s>>>(a);
  else cuda::verify_kernel<float><<<static_cast<unsigned>(p.batch), cuda::kThreads, 0, s>>>(a);
  return cuda::launch_status("verify_kernel");
}

Status philox_uniform_cuda(uint64_t seed, uint64_t position, const uint32_t* streams, const uint32_t* js,
                           int64_t n, double* out, void* stream) {
  if (n < 0) return Status::Invalid("philox_uniform_cuda: n must be >= 0");
  if (n == 0) return Status::Ok();
  if (!streams || !js || !out) return Status::Invalid("philox_uniform_cuda: arrays must not be null");
  const int64_t blocks = (n + 255) / 256;
  if (blocks > INT32_MAX) return Status::Invalid("philox_uniform_cuda: n is too large");
  cuda::philox_kernel<<<static_cast<unsigned>(blocks), 256, 0, cuda::as_stream(stream)>>>(seed, position,
                                                                                         streams, js, n, out);
  return cuda::launch_status("philox_kernel");
}

}  // namespace atlas
