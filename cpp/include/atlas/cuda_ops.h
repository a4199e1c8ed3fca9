// atlas/cuda_ops.h: launchers of the CUDA kernels (cuda/*.cu). Includers need
// no CUDA header: a stream is passed as `void*` (a cudaStream_t; null = the
// legacy default stream) and every pointer documented "device" must point to
// memory of the current CUDA device.
//
// Errors come back in two ways:
//   - what the host can check without reading device memory (null pointers,
//     sizes, strides, alignment, launch failures) is returned as a Status;
//   - what only the device can see (a bad parent or token id inside a device
//     array, a NaN in a logit row the walk reads, a block id out of range) is
//     written as a DeviceError code into a caller-owned device status array,
//     one int32 per sequence. The kernels never read or write out of bounds
//     because of such values; the outputs of a sequence whose status is not
//     kOk are unspecified. device_status_check() reads a status array back
//     (it waits for the stream) and turns the first error into a Status.
//
// Only built with ATLAS_WITH_CUDA; the CPU twins are verify.h, kv_cache.h and
// attention.h, whose semantics these kernels implement.
#pragma once

#include <cstdint>

#include "atlas/common.h"
#include "atlas/kv_cache.h"
#include "atlas/verify.h"

namespace atlas {

// ---- devices --------------------------------------------------------------------

// Number of CUDA devices; 0 when there is no driver or no device (never fails).
int cuda_device_count();
Status cuda_get_device(int* device);
Status cuda_set_device(int device);
// Multiprocessor count of a device (the kernels size their grids with it).
Status cuda_multiprocessor_count(int device, int* count);

// ---- device-side errors -----------------------------------------------------------

enum class DeviceError : int32_t {
  kOk = 0,
  // verify_cuda
  kBadTreeOffsets = 1,    // tree_offsets not 0 = o[0] < o[1] < ... < o[batch] = total_nodes
  kTreeTooLarge = 2,      // a tree of more than kMaxTreeNodes nodes
  kBadParent = 3,         // parents[root] != -1, or parents[c] not in [0, c) for c > 0 (tree-local)
  kBadToken = 4,          // a non-root token outside [0, vocab)
  // 5 is retired (it was a bad multiplicity, which verification no longer reads)
  kTooDeep = 6,           // a tree deeper than max_accept
  kBadSamplingParams = 7, // temperature < 0 or not finite, top_k < 0, top_p outside (0, 1]
  kNonFiniteLogits = 8,   // NaN or +inf in a row the walk reads (or logits / temperature overflows)
  kNoFiniteLogit = 9,     // a row the walk reads is all -inf
  kBadDraftProbs = 10,    // a draft row the walk reads holds a negative, NaN or inf value, or q(child) = 0
  // tree_attention_cuda
  kBadQueryOffsets = 11,  // q_offsets not 0 = o[0] <= ... <= o[batch] = total_q
  kBadContextLength = 12, // context_lens[b] < 0 or > max_context, or the sequence overflows its block table
  kTooManyQueries = 13,   // q_offsets[b+1] - q_offsets[b] > max_q_per_seq
  kBadBlockId = 14,       // a block table entry outside [0, num_blocks)
  kNotAChain = 15,        // more than kMaxTreeNodes queries that are not a chain (parents[c] = c - 1)
  // kv_copy_slots_cuda
  kBadSlot = 16,          // a slot outside [0, num_blocks * block_size); that copy is skipped
};

// A message for a DeviceError code (static storage).
const char* device_error_message(int32_t code);

// Copies status[0..n) (device, int32) to the host, waiting for `stream`, and
// returns Invalid("<op>: sequence <i>: <message>") for the first non-zero entry.
Status device_status_check(const int32_t* status, int64_t n, const char* op, void* stream);

// ---- verification (twin of verify.h) -------------------------------------------------

struct VerifyCudaOptions {
  // Rows of logits (= length of tokens and parents): tree_offsets must end at it.
  int64_t total_nodes = 0;
  // [batch] int32, device, written: a DeviceError per tree.
  int32_t* status_out = nullptr;
  // Greedy only: first compute the argmax of every row with the whole GPU,
  // then walk. Reads every row instead of the visited ones, but in parallel;
  // pays off when the batch is too small to fill the GPU with one block per
  // tree. Trees with temperature > 0 ignore it.
  bool greedy_prepass = false;
};

// Device bytes of the workspace verify_cuda needs (the same for any options).
int64_t verify_cuda_workspace_bytes(int64_t vocab, int64_t batch, int64_t total_nodes);

// verify() on the GPU: every pointer of the problem is device memory, params
// included ([batch] SamplingParams, the struct as declared in verify.h), and
// the workspace is verify_cuda_workspace_bytes() bytes, 256-byte aligned. One
// block walks one tree. Decisions follow verify.h, with the same uniforms
// (philox_uniform(seed, root position + depth, stream, j)) and the same
// arithmetic where the header fixes it: the acceptance test
// u * q[x] * P < w[x] * Q and the residual w * (1 / P) - q * (1 / Q) in double,
// inverse-CDF draws summed in double. Where verify.h leaves a choice open the
// kernel does this (the CPU verifier must agree for bit-identical replay):
//   - top-k keeps x >= the k-th largest x = logits / temperature; top-p keeps
//     the smallest prefix in order of decreasing x (ties: lower token id first)
//     whose probability mass, summed in 2^-40 fixed point, reaches top_p.
//   - a draw whose running sums never exceed u * total (rounding) gives the
//     last token with p > 0.
// p itself is computed with expf in float, not with the CPU's polynomial, so
// decisions agree with the CPU bit for bit where p is exact on both (e.g.
// uniform over a support of 2^a tokens) and otherwise differ only where a
// uniform falls within rounding of a threshold. Draft rows are checked for
// negative, NaN and infinite values and for q(child) = 0 (a sibling repeating
// a rejected token included), not for their sum: Q normalises them.
// Unlike the CPU twin, a tree that fails its checks does not stop the others:
// its status is set and its outputs are -1 / 0.
Status verify_cuda(const VerifyProblem& problem, const VerifyCudaOptions& options, void* stream);

// verify.h's uniforms philox_uniform(seed, position, streams[i], js[i]) for n
// pairs (device arrays; out: [n] float64, device), so that tests can compare
// the GPU generator with the CPU's bit for bit.
Status philox_uniform_cuda(uint64_t seed, uint64_t position, const uint32_t* streams, const uint32_t* js,
                           int64_t n, double* out, void* stream);

// ---- KV cache --------------------------------------------------------------------------

// Applies row copies (PagedKVCache::pending_copies(), uploaded to the device)
// to device storage laid out as in kv_cache.h, all layers, keys and values, in
// one launch, with the result of applying them one after the other in order.
// copies: [n] device. status_out: optional [1] int32 device, set to kBadSlot
// when a copy names a slot out of range (that copy is skipped), else kOk.
Status kv_copy_slots_cuda(const KVCacheConfig& config, void* storage, const SlotCopy* copies, int64_t n,
                          void* stream, int32_t* status_out = nullptr);

// ---- tree attention (twin of attention.h) ---------------------------------------------------

struct TreeAttentionCudaProblem {
  // The paged storage (device) as in kv_cache.h and the layer to read.
  KVCacheConfig cache;
  const void* storage = nullptr;
  int32_t layer = 0;

  // [total_q, num_q_heads, head_dim] queries (device), head_dim contiguous,
  // strides in elements; dtype = cache.dtype.
  const void* q = nullptr;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  int32_t num_q_heads = 0;
  int64_t total_q = 0;

  // [total_q, num_q_heads, head_dim] output (device, contiguous), written.
  void* out = nullptr;

  // Per sequence b (all device): its block table row (block_tables[b * stride
  // + k] = block id of positions k * block_size ...; entries past the
  // sequence's last block are not read), its committed length, its queries
  // q_offsets[b] .. q_offsets[b+1] (query i at position context_lens[b] + i,
  // whose key and value are already in the cache) and their tree-local parents.
  const int32_t* block_tables = nullptr;  // [batch, block_table_stride]
  int64_t block_table_stride = 0;         // >= blocks of the longest sequence
  const int32_t* context_lens = nullptr;  // [batch]
  const int64_t* q_offsets = nullptr;     // [batch + 1]
  const int32_t* parents = nullptr;       // [total_q]
  int64_t batch = 0;
  float scale = 0.0f;

  // Host-side bounds that size the grid: every context_lens[b] <= max_context
  // and every sequence has <= max_q_per_seq queries (checked on the device).
  int64_t max_context = 0;
  int64_t max_q_per_seq = 0;

  int32_t* status_out = nullptr;  // [batch] int32, device, written: a DeviceError per sequence
  void* workspace = nullptr;      // tree_attention_cuda_workspace_bytes() bytes, device, 16-byte aligned
  int64_t workspace_bytes = 0;
};

// Device bytes of workspace for this problem on the current device (0 when the
// context is not split across blocks). Reads only sizes.
Status tree_attention_cuda_workspace_bytes(const TreeAttentionCudaProblem& problem, int64_t* bytes);

// attention.h's tree attention on the GPU, flash-decoding style: each block
// takes 16 query rows (nodes x heads of one kv head) of one sequence and one
// slice of its keys, reads them straight from the paged storage through the
// block table, keeps an online softmax in fp32, and a second kernel combines
// the slices when the context was split. head_dim must be a multiple of 8 and
// at most 256. A sequence with more than kMaxTreeNodes queries must be a chain.
Status tree_attention_cuda(const TreeAttentionCudaProblem& problem, void* stream);

}  // namespace atlas
