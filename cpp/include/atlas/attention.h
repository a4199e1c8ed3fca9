// atlas/attention.h: tree attention over the paged KV cache (CPU).
//
// For each sequence b of a batch, the queries are the nodes of its draft tree
// (or the tokens of its prompt, a chain), whose keys and values were just
// written to the sequence's reserved slots: node i of the tree sits at
// position length(b) + i. Query i attends to
//   - every committed position 0 .. length(b) - 1 of the sequence, and
//   - itself and its ancestors in the tree (parents, tree-local, -1 at the root),
// reading keys and values straight from the paged storage through the block
// table: the context is never gathered or copied.
//
// GQA: query head h reads kv head h / (num_q_heads / num_kv_heads).
//
// Threads: the work of each tile of queries is split over `threads` parts (the
// calling thread and the pool's workers). Its units are the kv heads, each
// one pass over the context, or from 128 committed positions two passes per
// head (the context below and above a page boundary near its middle, merged
// by their softmax statistics), so that SmolLM2-135M's 3 kv heads make 6
// units, 3 for each of 2 threads, instead of 2 and 1. The units depend on
// the problem only: the result does not depend on `threads`.
#pragma once

#include <cstdint>

#include "atlas/common.h"
#include "atlas/kv_cache.h"

namespace atlas {

struct TreeAttentionProblem {
  const PagedKVCache* cache = nullptr;
  int32_t layer = 0;

  // [total_q, num_q_heads, head_dim] queries with the given strides (elements);
  // head_dim is contiguous. dtype = the cache's dtype.
  const void* q = nullptr;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  int32_t num_q_heads = 0;

  // [total_q, num_q_heads, head_dim] output, contiguous, same dtype as q.
  void* out = nullptr;

  const int32_t* seq_ids = nullptr;     // [batch]
  const int64_t* q_offsets = nullptr;   // [batch + 1] first query of each sequence
  const int32_t* parents = nullptr;     // [total_q] tree-local parent, -1 at each root
  int64_t batch = 0;
  float scale = 0.0f;                   // softmax scale, usually 1/sqrt(head_dim)
  // Threads of atlas/pool.h that share each tile's kv heads (at most
  // num_kv_heads take part), in [1, kPoolMaxThreads]. The result does not
  // depend on it.
  int32_t threads = 1;
};

// Each sequence must have exactly q_offsets[b+1] - q_offsets[b] reserved slots.
Status tree_attention(const TreeAttentionProblem& problem);

}  // namespace atlas
