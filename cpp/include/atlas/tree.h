// atlas/tree.h: the draft tree that speculators fill and the target verifies.
//
// Vocabulary (used across atlas):
//   root       node 0, the last committed token; its key/value is not yet in
//              the KV cache, so the verification forward computes it too.
//   node       one draft token: its token id, its parent node, its depth
//              (root = 0), the speculator's confidence that the target would
//              produce it, a bit mask of the speculators that proposed it, and
//              its multiplicity (how many proposals merged into it; a statistic:
//              the verifier does not read it).
//   committed_len  number of tokens of the sequence whose keys/values are in
//              the cache; a node's position is committed_len + depth.
//
// Nodes are stored in topological order: parent index < child index, always.
// Children of a node are ordered by insertion; the stochastic verifier tries
// them in that order.
//
// Ownership: a DraftTree owns its node arrays. They are sized once, in init(),
// for max_nodes; adding nodes never allocates.
#pragma once

#include <cstdint>
#include <vector>

#include "atlas/common.h"

namespace atlas {

// Why 1024: the flattened ancestor mask is max_nodes^2 bytes (1 MiB here) and
// no target verifies more than a few hundred nodes per sequence in one forward
// with any gain; larger budgets are a caller bug.
constexpr int32_t kMaxTreeNodes = 1024;

// Speculator ids are bit positions in DraftNode::proposers.
constexpr int32_t kMaxProposers = 32;

struct DraftNode {
  int32_t token = 0;
  int32_t parent = -1;   // -1 for the root only
  int32_t depth = 0;
  float confidence = 1.0f;  // in [0, 1]; merged nodes keep the maximum
  uint32_t proposers = 0;   // bit i set: speculator i proposed this node
  int32_t multiplicity = 1; // proposals merged into this node
};

class DraftTree {
 public:
  // Resets the tree to the root alone. max_nodes counts the root.
  // vocab_size > 0 makes every added token be checked against [0, vocab_size).
  Status init(int32_t root_token, int32_t max_nodes, int32_t vocab_size);

  // Adds one child of `parent`, or merges into the existing child with the same
  // token (confidence = max, proposers |= bit, multiplicity += 1). *node is the
  // child's index. When the tree is full and no such child exists, *node is -1
  // and the tree is unchanged (the budget is a cap, not an error).
  Status add_child(int32_t parent, int32_t token, float confidence, int32_t proposer, int32_t* node);

  // Adds the chain tokens[0..len) below `parent`, merging shared prefixes.
  // confidences may be null (all 1). *placed is how many tokens of the chain are
  // in the tree afterwards (merged or new: it stops at the budget), *last the
  // index of the deepest placed node (parent itself when placed == 0).
  Status add_path(int32_t parent, const int32_t* tokens, const float* confidences, int32_t len,
                  int32_t proposer, int32_t* placed, int32_t* last);

  // Replaces the tree by explicit arrays (e.g. built in Python). parents[0] must
  // be -1 and every other parents[i] in [0, i). A parent >= i is reported as a
  // cycle when following parents from i returns to i, otherwise as a forward
  // reference. Duplicate (parent, token) pairs are rejected: the tree is a trie.
  Status assign(const int32_t* tokens, const int32_t* parents, const float* confidences,
                const uint32_t* proposers, int32_t n, int32_t max_nodes, int32_t vocab_size);

  // Writes the arrays the target forward takes, each of length size():
  //   tokens[i], positions[i] = committed_len + depth[i], parents[i],
  //   ancestor_mask[i * size() + j] = 1 iff j is i or an ancestor of i, else 0.
  // Any output pointer may be null to skip it.
  Status flatten(int64_t committed_len, int32_t* tokens, int64_t* positions, int32_t* parents,
                 uint8_t* ancestor_mask) const;

  int32_t size() const { return static_cast<int32_t>(nodes_.size()); }
  int32_t max_nodes() const { return max_nodes_; }
  int32_t vocab_size() const { return vocab_size_; }
  int32_t max_depth() const;
  const DraftNode& node(int32_t i) const { return nodes_[static_cast<size_t>(i)]; }

 private:
  Status check_token(int32_t token, const char* what) const;

  std::vector<DraftNode> nodes_;
  std::vector<int32_t> first_child_;   // -1 when none
  std::vector<int32_t> next_sibling_;  // -1 when none
  std::vector<int32_t> last_child_;    // -1 when none; keeps insertion order O(1)
  int32_t max_nodes_ = 0;
  int32_t vocab_size_ = 0;
};

// Checks a parents array of a tree of n nodes as assign() does, without
// building a tree. Used by the verifier and the KV commit on raw arrays.
Status validate_parents(const int32_t* parents, int32_t n);

}  // namespace atlas
