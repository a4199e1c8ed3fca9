// cuda/attention.cu: tree attention over the paged KV cache (twin of
// cpp/src/attention.cpp; semantics in attention.h).
//
// Flash-decoding: a block takes kRows query rows of one sequence and one kv
// head (row = node * group + head within the group, GQA) and one slice of the
// sequence's keys, positions [split * chunk, (split + 1) * chunk). Keys and
// values are read through the block table straight from the paged storage, a
// tile of kKeys at a time, into shared memory as fp32; scores and the online
// softmax stay in fp32 (base 2, the scale folded into q). Keys before the
// committed length are visible to every row; tree keys only to the rows of
// their descendants. When the keys are split over several blocks, each writes
// its partial (max, sum, unnormalised output) and a second kernel combines them.
//
// CUDA cores, not tensor cores: a verification step has a handful of query
// rows per sequence, so the kernel is bound by reading the context, not by
// arithmetic, until rows x head_dim grow large (see bench/GPU.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "atlas/cuda_ops.h"
#include "atlas/tree.h"
#include "common.cuh"

namespace atlas {
namespace cuda {
namespace {

constexpr int kRows = 16;                      // query rows per block
constexpr int kRowsPerWarp = 4;
constexpr int kThreads = kRows / kRowsPerWarp * 32;  // 128
constexpr int kKeys = 32;                      // keys per tile: one per lane in the score phase
constexpr int kMaxHeadDim = 256;
constexpr int kChunksPerLane = kMaxHeadDim / 4 / 32;  // float4 columns of the output per lane
// Below this many keys per slice the combine costs more than the parallelism gains.
constexpr int64_t kMinSliceKeys = 256;
// Tree keys are masked through a per-row bit set of ancestors when the tree
// has at most this many nodes; longer query runs must be chains (prompts).
constexpr int kMaxTreeKeys = kMaxTreeNodes;
constexpr int kBitWords = kMaxTreeKeys / 32;

struct AttnArgs {
  const void* storage;
  int64_t plane_elems;  // elements of one (layer, key/value) plane
  int32_t layer;
  int32_t num_blocks;
  int32_t block_size;
  int32_t num_kv_heads;
  int32_t head_dim;
  int32_t group;  // query heads per kv head
  const void* q;
  int64_t q_stride_token;
  int64_t q_stride_head;
  int32_t num_q_heads;
  int64_t total_q;
  void* out;
  const int32_t* tables;
  int64_t table_stride;
  const int32_t* context_lens;
  const int64_t* q_offsets;
  const int32_t* parents;
  int64_t batch;
  float scale_log2;  // softmax scale * log2(e)
  int64_t max_context;
  int64_t max_q;
  int32_t* status;
  float* part_acc;  // [batch * kv_heads * row_tiles * kRows, splits, head_dim]
  float* part_ml;   // [batch * kv_heads * row_tiles * kRows, splits, 2] (max in log2 units, sum)
  int32_t splits;
  int64_t chunk;
  int32_t row_tiles;
};

struct SeqGeom {
  int64_t q0, n, len;  // first query, queries, committed length
  int32_t err;
};

// The sequence's queries and length, checked so that nothing derived from
// them is read out of bounds.
__device__ SeqGeom seq_geom(const AttnArgs& a, int64_t b) {
  SeqGeom s{0, 0, 0, 0};
  const int64_t q0 = a.q_offsets[b], q1 = a.q_offsets[b + 1];
  if (!(q0 >= 0 && q0 <= q1 && q1 <= a.total_q && (b != 0 || q0 == 0) &&
        (b != a.batch - 1 || q1 == a.total_q))) {
    s.err = static_cast<int32_t>(DeviceError::kBadQueryOffsets);
    return s;
  }
  s.q0 = q0;
  s.n = q1 - q0;
  if (s.n > a.max_q) {
    s.err = static_cast<int32_t>(DeviceError::kTooManyQueries);
    return s;
  }
  s.len = a.context_lens[b];
  if (s.len < 0 || s.len > a.max_context || s.len + s.n > a.table_stride * a.block_size)
    s.err = static_cast<int32_t>(DeviceError::kBadContextLength);
  return s;
}

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  Vec16<T>::unpack(*reinterpret_cast<const uint4*>(p), out);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 3) tree_attn_kernel(AttnArgs a) {
  extern __shared__ float4 smem4[];
  const int D = a.head_dim, Dp = D + 4, D4 = D / 4;
  float* q_s = reinterpret_cast<float*>(smem4);  // [kRows][D], scaled
  float* k_s = q_s + kRows * D;                  // [kKeys][D + 4]: padded, conflict-free float4 reads by key
  float* v_s = k_s + kKeys * Dp;                 // [kKeys][D]
  float* p_s = v_s + kKeys * D;                  // [warps][kKeys][4] probabilities of a warp's rows
  int64_t* slot_s = reinterpret_cast<int64_t*>(p_s + kThreads / 32 * kKeys * 4);  // [kKeys]
  uint32_t* bits_s = reinterpret_cast<uint32_t*>(slot_s + kKeys);                 // [kRows][kBitWords]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, tile = blockIdx.y;
  const int64_t bg = blockIdx.z, b = bg / a.num_kv_heads, g = bg % a.num_kv_heads;
  const bool reporter = split == 0 && tile == 0 && g == 0;  // the one block that reports per-sequence errors

  const SeqGeom sg = seq_geom(a, b);
  if (sg.err) {
    if (reporter && tid == 0) a.status[b] = sg.err;
    return;
  }
  const int64_t n = sg.n, len = sg.len, q0 = sg.q0;
  if (reporter) {
    bool bad = false, chain = true;
    for (int64_t c = tid; c < n; c += kThreads) {
      const int32_t p = a.parents[q0 + c];
      bad |= c == 0 ? p != -1 : (p < 0 || p >= c);
      chain &= p == c - 1;
    }
    bad = __syncthreads_or(bad);
    chain = __syncthreads_and(chain);
    if (tid == 0 && (bad || (!chain && n > kMaxTreeKeys)))
      a.status[b] = static_cast<int32_t>(bad ? DeviceError::kBadParent : DeviceError::kNotAChain);
  }
  const int64_t rows = n * a.group, row0 = static_cast<int64_t>(tile) * kRows;
  const int64_t kv_len = len + n, k_begin = static_cast<int64_t>(split) * a.chunk;
  if (row0 >= rows || k_begin >= kv_len) return;
  const int64_t k_end = min(kv_len, k_begin + a.chunk);
  const bool use_bits = n <= kMaxTreeKeys;

  // Ancestor bit sets of this block's rows (nodes repeat across the heads of a group).
  for (int i = tid; i < kRows * kBitWords; i += kThreads) bits_s[i] = 0u;
  __syncthreads();
  if (use_bits && tid < kRows && row0 + tid < rows) {
    int64_t j = (row0 + tid) / a.group;
    while (j >= 0) {  // parents strictly decrease; a malformed entry ends the walk (reported above)
      bits_s[tid * kBitWords + j / 32] |= 1u << (j % 32);
      const int32_t p = a.parents[q0 + j];
      if (p >= j || p < -1) break;
      j = p;
    }
  }
  // Queries, pre-scaled so that scores are in log2 units.
  const T* q = static_cast<const T*>(a.q);
  for (int i = tid; i < kRows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const int64_t row = row0 + r;
    float v = 0.0f;
    if (row < rows) {
      const int64_t node = row / a.group, head = g * a.group + row % a.group;
      v = to_float(q[(q0 + node) * a.q_stride_token + head * a.q_stride_head + d]) * a.scale_log2;
    }
    q_s[i] = v;
  }

  const T* kbase = static_cast<const T*>(a.storage) + (static_cast<int64_t>(a.layer) * 2) * a.plane_elems;
  const T* vbase = kbase + a.plane_elems;
  const int64_t token_elems = static_cast<int64_t>(a.num_kv_heads) * D;
  constexpr int kVec = Vec16<T>::kN;
  const int nvec = D / kVec;

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kChunksPerLane][4];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunksPerLane; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][c][e] = 0.0f;
  }

  for (int64_t kt = k_begin; kt < k_end; kt += kKeys) {
    __syncthreads();  // the previous tile is consumed (and bits_s / q_s are written)
    if (tid < kKeys) {
      const int64_t pos = kt + tid;
      int64_t slot = -1;
      if (pos < k_end) {
        const int32_t blk = a.tables[b * a.table_stride + pos / a.block_size];
        if (blk < 0 || blk >= a.num_blocks) a.status[b] = static_cast<int32_t>(DeviceError::kBadBlockId);
        else slot = static_cast<int64_t>(blk) * a.block_size + pos % a.block_size;
      }
      slot_s[tid] = slot;
    }
    __syncthreads();
    for (int i = tid; i < kKeys * nvec; i += kThreads) {
      const int t = i / nvec, c = i % nvec;
      const int64_t slot = slot_s[t];
      float kv[kVec], vv[kVec];
      if (slot >= 0) {
        const int64_t off = slot * token_elems + g * D + c * kVec;
        load_vec(kbase + off, kv);
        load_vec(vbase + off, vv);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) kv[e] = vv[e] = 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kVec; e += 4) {
        *reinterpret_cast<float4*>(k_s + t * Dp + c * kVec + e) =
            make_float4(kv[e], kv[e + 1], kv[e + 2], kv[e + 3]);
        *reinterpret_cast<float4*>(v_s + t * D + c * kVec + e) =
            make_float4(vv[e], vv[e + 1], vv[e + 2], vv[e + 3]);
      }
    }
    __syncthreads();

    // Scores of this warp's rows against key `lane`.
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.0f;
    const float4* kr = reinterpret_cast<const float4*>(k_s + lane * Dp);
    for (int d4 = 0; d4 < D4; ++d4) {
      const float4 kk = kr[d4];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float4 qq = reinterpret_cast<const float4*>(q_s + (warp * kRowsPerWarp + r) * D)[d4];
        s[r] += qq.x * kk.x + qq.y * kk.y + qq.z * kk.z + qq.w * kk.w;
      }
    }
    const int64_t pos = kt + lane;
    const bool key_ok = pos < k_end && slot_s[lane] >= 0;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int rr = warp * kRowsPerWarp + r;
      bool vis = key_ok;
      if (vis && pos >= len) {  // a tree key: visible to itself and its descendants
        const int64_t j = pos - len, row = row0 + rr;
        if (row >= rows) vis = false;
        else if (use_bits) vis = (bits_s[rr * kBitWords + j / 32] >> (j % 32)) & 1u;
        else vis = j <= row / a.group;
      }
      if (!vis) s[r] = -INFINITY;
    }

    // Online softmax; a row that has seen nothing yet keeps max -inf.
    float pr[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float mnew = fmaxf(m[r], warp_max(s[r]));
      const float muse = mnew == -INFINITY ? 0.0f : mnew;
      pr[r] = exp2f(s[r] - muse);
      const float alpha = exp2f(m[r] - muse);
      l[r] = l[r] * alpha + warp_sum(pr[r]);
      m[r] = mnew;
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][c][e] *= alpha;
    }
    float4* pw = reinterpret_cast<float4*>(p_s) + warp * kKeys;
    pw[lane] = make_float4(pr[0], pr[1], pr[2], pr[3]);
    __syncwarp();
    for (int t = 0; t < kKeys; ++t) {
      const float4 p4 = pw[t];
      const float pv[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int d4 = lane + 32 * c;
        if (d4 < D4) {
          const float4 v4 = reinterpret_cast<const float4*>(v_s + t * D)[d4];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            acc[r][c][0] += pv[r] * v4.x;
            acc[r][c][1] += pv[r] * v4.y;
            acc[r][c][2] += pv[r] * v4.z;
            acc[r][c][3] += pv[r] * v4.w;
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int rr = warp * kRowsPerWarp + r;
    const int64_t row = row0 + rr;
    if (row >= rows) continue;
    if (a.splits == 1) {
      const int64_t node = row / a.group, head = g * a.group + row % a.group;
      T* o = static_cast<T*>(a.out) + ((q0 + node) * a.num_q_heads + head) * D;
      const float inv = 1.0f / l[r];  // l > 0: every row sees its own key
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int d4 = lane + 32 * c;
        if (d4 < D4)
#pragma unroll
          for (int e = 0; e < 4; ++e) store_elem(o + d4 * 4 + e, acc[r][c][e] * inv);
      }
    } else {
      const int64_t pidx = ((bg * a.row_tiles + tile) * kRows + rr) * a.splits + split;
      float* pa = a.part_acc + pidx * D;
#pragma unroll
      for (int c = 0; c < kChunksPerLane; ++c) {
        const int d4 = lane + 32 * c;
        if (d4 < D4)
          reinterpret_cast<float4*>(pa)[d4] =
              make_float4(acc[r][c][0], acc[r][c][1], acc[r][c][2], acc[r][c][3]);
      }
      if (lane == 0) {
        a.part_ml[pidx * 2] = m[r];
        a.part_ml[pidx * 2 + 1] = l[r];
      }
    }
  }
}

// Merges the slices of each row: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s.
template <typename T>
__global__ void __launch_bounds__(kThreads) tree_attn_combine_kernel(AttnArgs a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tile = blockIdx.x;
  const int64_t bg = blockIdx.y, b = bg / a.num_kv_heads, g = bg % a.num_kv_heads;
  const SeqGeom sg = seq_geom(a, b);
  if (sg.err) return;
  const int64_t rows = sg.n * a.group, row0 = static_cast<int64_t>(tile) * kRows;
  const int64_t nslices = (sg.len + sg.n + a.chunk - 1) / a.chunk;
  const int D = a.head_dim;
  for (int rr = warp; rr < kRows; rr += kThreads / 32) {
    const int64_t row = row0 + rr;
    if (row >= rows) break;
    const int64_t base = ((bg * a.row_tiles + tile) * kRows + rr) * a.splits;
    float mx = -INFINITY;
    for (int64_t s = 0; s < nslices; ++s) mx = fmaxf(mx, a.part_ml[(base + s) * 2]);
    float denom = 0.0f;
    for (int64_t s = 0; s < nslices; ++s) {
      const float ms = a.part_ml[(base + s) * 2];
      denom += (ms == -INFINITY ? 0.0f : exp2f(ms - mx)) * a.part_ml[(base + s) * 2 + 1];
    }
    const int64_t node = row / a.group, head = g * a.group + row % a.group;
    T* o = static_cast<T*>(a.out) + ((sg.q0 + node) * a.num_q_heads + head) * D;
    for (int d = lane; d < D; d += 32) {
      float num = 0.0f;
      for (int64_t s = 0; s < nslices; ++s) {
        const float ms = a.part_ml[(base + s) * 2];
        if (ms != -INFINITY) num += exp2f(ms - mx) * a.part_acc[(base + s) * D + d];
      }
      store_elem(o + d, num / denom);
    }
  }
}

struct Plan {
  int32_t row_tiles;
  int32_t splits;
  int64_t chunk;
  int64_t workspace_bytes;
  size_t smem_bytes;
};

Status make_plan(const TreeAttentionCudaProblem& p, Plan* plan) {
  const KVCacheConfig& c = p.cache;
  if (c.num_layers < 1 || c.num_kv_heads < 1 || c.head_dim < 1 || c.num_blocks < 1 || c.block_size < 1)
    return Status::Invalid("tree_attention_cuda: cache config sizes must be positive");
  if (c.dtype != DType::kFloat32 && c.dtype != DType::kBFloat16)
    return Status::Invalid("tree_attention_cuda: cache dtype must be float32 or bfloat16");
  if (c.head_dim % 8 != 0 || c.head_dim > kMaxHeadDim)
    return Status::Unsupported("tree_attention_cuda: head_dim must be a multiple of 8 and at most 256, got " +
                               std::to_string(c.head_dim));
  if (p.layer < 0 || p.layer >= c.num_layers)
    return Status::Invalid("tree_attention_cuda: layer must be in [0, " + std::to_string(c.num_layers) + ")");
  if (p.num_q_heads < 1 || p.num_q_heads % c.num_kv_heads != 0)
    return Status::Invalid("tree_attention_cuda: num_q_heads must be a positive multiple of num_kv_heads = " +
                           std::to_string(c.num_kv_heads));
  if (p.batch < 1) return Status::Invalid("tree_attention_cuda: batch must be >= 1");
  if (p.total_q < 0 || p.max_context < 0 || p.max_q_per_seq < 0)
    return Status::Invalid("tree_attention_cuda: total_q, max_context and max_q_per_seq must be >= 0");
  if (p.max_context > (int64_t{1} << 40) || p.max_q_per_seq > (int64_t{1} << 30))
    return Status::Invalid("tree_attention_cuda: max_context or max_q_per_seq is implausibly large");
  if (p.block_table_stride < 1)
    return Status::Invalid("tree_attention_cuda: block_table_stride must be >= 1");
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale))
    return Status::Invalid("tree_attention_cuda: scale must be a positive finite number");
  const int64_t group = p.num_q_heads / c.num_kv_heads;
  const int64_t row_tiles = std::max<int64_t>(1, (p.max_q_per_seq * group + kRows - 1) / kRows);
  const int64_t heads = p.batch * c.num_kv_heads;
  if (row_tiles > 65535 || heads > 65535)
    return Status::Invalid("tree_attention_cuda: too many query rows per sequence or sequences x kv heads "
                           "for one launch (max 65535 each)");
  int dev = 0, sms = 0;
  ATLAS_RETURN_IF_ERROR(cuda_status(cudaGetDevice(&dev), "cudaGetDevice"));
  ATLAS_RETURN_IF_ERROR(cuda_multiprocessor_count(dev, &sms));
  // Split the keys only as much as needed for two waves of blocks.
  const int64_t base = heads * row_tiles;
  const int64_t max_kv = std::max<int64_t>(1, p.max_context + p.max_q_per_seq);
  int64_t splits = 1;
  if (base < 2LL * sms)
    splits = std::max<int64_t>(
        1, std::min<int64_t>((2LL * sms + base - 1) / base, (max_kv + kMinSliceKeys - 1) / kMinSliceKeys));
  int64_t chunk = (max_kv + splits - 1) / splits;
  chunk = (chunk + kKeys - 1) / kKeys * kKeys;
  splits = (max_kv + chunk - 1) / chunk;
  if (splits > INT32_MAX) return Status::Invalid("tree_attention_cuda: context too long");
  plan->row_tiles = static_cast<int32_t>(row_tiles);
  plan->splits = static_cast<int32_t>(splits);
  plan->chunk = chunk;
  const int64_t prow = base * kRows * splits;
  plan->workspace_bytes = splits > 1 ? prow * (c.head_dim + 2) * static_cast<int64_t>(sizeof(float)) : 0;
  const int64_t D = c.head_dim;
  const int64_t smem_floats = kRows * D + kKeys * (D + 4) + kKeys * D + kThreads / 32 * kKeys * 4;
  plan->smem_bytes = static_cast<size_t>(smem_floats * static_cast<int64_t>(sizeof(float)) +
                                         kKeys * static_cast<int64_t>(sizeof(int64_t)) +
                                         kRows * kBitWords * static_cast<int64_t>(sizeof(uint32_t)));
  return Status::Ok();
}

template <typename T>
Status launch(const AttnArgs& a, const Plan& plan, cudaStream_t s) {
  ATLAS_RETURN_IF_ERROR(cuda_status(cudaFuncSetAttribute(tree_attn_kernel<T>,
                                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                          static_cast<int>(plan.smem_bytes)),
                                    "cudaFuncSetAttribute(tree_attn_kernel)"));
  dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(plan.row_tiles),
            static_cast<unsigned>(a.batch * a.num_kv_heads));
  tree_attn_kernel<T><<<grid, kThreads, plan.smem_bytes, s>>>(a);
  ATLAS_RETURN_IF_ERROR(launch_status("tree_attn_kernel"));
  if (plan.splits > 1) {
    dim3 cgrid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(a.batch * a.num_kv_heads));
    tree_attn_combine_kernel<T><<<cgrid, kThreads, 0, s>>>(a);
    ATLAS_RETURN_IF_ERROR(launch_status("tree_attn_combine_kernel"));
  }
  return Status::Ok();
}

}  // namespace
}  // namespace cuda

Status tree_attention_cuda_workspace_bytes(const TreeAttentionCudaProblem& p, int64_t* bytes) {
  cuda::Plan plan;
  ATLAS_RETURN_IF_ERROR(cuda::make_plan(p, &plan));
  *bytes = plan.workspace_bytes;
  return Status::Ok();
}

Status tree_attention_cuda(const TreeAttentionCudaProblem& p, void* stream) {
  cuda::Plan plan;
  ATLAS_RETURN_IF_ERROR(cuda::make_plan(p, &plan));
  const KVCacheConfig& c = p.cache;
  if (!p.storage || !cuda::aligned16(p.storage))
    return Status::Invalid("tree_attention_cuda: storage must be a non-null, 16-byte aligned device pointer");
  if (!p.q || !p.out) return Status::Invalid("tree_attention_cuda: q and out must not be null");
  if (p.q_stride_token < 0 || p.q_stride_head < 0)
    return Status::Invalid("tree_attention_cuda: q strides must be >= 0");
  if (!p.block_tables || !p.context_lens || !p.q_offsets || !p.parents || !p.status_out)
    return Status::Invalid(
        "tree_attention_cuda: block_tables, context_lens, q_offsets, parents and status_out must not be "
        "null");
  if (plan.workspace_bytes > 0 &&
      (!p.workspace || p.workspace_bytes < plan.workspace_bytes || !cuda::aligned16(p.workspace)))
    return Status::Invalid("tree_attention_cuda: workspace must be " + std::to_string(plan.workspace_bytes) +
                           " bytes (tree_attention_cuda_workspace_bytes), 16-byte aligned");
  cudaStream_t s = cuda::as_stream(stream);
  const size_t status_bytes = static_cast<size_t>(p.batch) * sizeof(int32_t);
  ATLAS_RETURN_IF_ERROR(
      cuda::cuda_status(cudaMemsetAsync(p.status_out, 0, status_bytes, s), "cudaMemsetAsync"));

  cuda::AttnArgs a;
  a.storage = p.storage;
  a.plane_elems = static_cast<int64_t>(c.num_blocks) * c.block_size * c.num_kv_heads * c.head_dim;
  a.layer = p.layer;
  a.num_blocks = c.num_blocks;
  a.block_size = c.block_size;
  a.num_kv_heads = c.num_kv_heads;
  a.head_dim = c.head_dim;
  a.group = p.num_q_heads / c.num_kv_heads;
  a.q = p.q;
  a.q_stride_token = p.q_stride_token;
  a.q_stride_head = p.q_stride_head;
  a.num_q_heads = p.num_q_heads;
  a.total_q = p.total_q;
  a.out = p.out;
  a.tables = p.block_tables;
  a.table_stride = p.block_table_stride;
  a.context_lens = p.context_lens;
  a.q_offsets = p.q_offsets;
  a.parents = p.parents;
  a.batch = p.batch;
  a.scale_log2 = static_cast<float>(static_cast<double>(p.scale) * 1.4426950408889634);
  a.max_context = p.max_context;
  a.max_q = p.max_q_per_seq;
  a.status = p.status_out;
  a.part_acc = static_cast<float*>(p.workspace);
  const int64_t partial_rows = static_cast<int64_t>(p.batch) * c.num_kv_heads * plan.row_tiles * cuda::kRows;
  a.part_ml = plan.workspace_bytes > 0 ? a.part_acc + partial_rows * plan.splits * c.head_dim : nullptr;
  a.splits = plan.splits;
  a.chunk = plan.chunk;
  a.row_tiles = plan.row_tiles;
  if (c.dtype == DType::kBFloat16) return cuda::launch<uint16_t>(a, plan, s);
  return cuda::launch<float>(a, plan, s);
}

}  // namespace atlas
