// Draft tree: a trie of candidate continuations under a node budget.
#include "atlas/tree.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace atlas {

Status validate_parents(const int32_t* parents, int32_t n) {
  if (n < 1) return Status::Invalid("the tree is empty: it needs at least the root (node 0)");
  if (parents == nullptr) return Status::Invalid("parents is null");
  if (parents[0] != -1)
    return Status::Invalid("parents[0] must be -1 (node 0 is the root), got " + std::to_string(parents[0]));
  for (int32_t i = 1; i < n; ++i) {
    const int32_t p = parents[i];
    if (p >= 0 && p < i) continue;
    if (p < 0 || p >= n)
      return Status::Invalid("parents[" + std::to_string(i) + "] = " + std::to_string(p) + " is not a node of a " +
                             std::to_string(n) + "-node tree (only the root has no parent)");
    // p >= i: either a cycle or a forward reference. Follow parents at most n
    // steps: coming back to i is a cycle.
    int32_t cur = p;
    for (int32_t steps = 0; steps < n && cur >= 0 && cur < n; ++steps) {
      if (cur == i)
        return Status::Invalid("parents has a cycle through node " + std::to_string(i) + " (parents[" +
                               std::to_string(i) + "] = " + std::to_string(p) + ")");
      cur = parents[cur];
    }
    return Status::Invalid("parents[" + std::to_string(i) + "] = " + std::to_string(p) +
                           " points forward: nodes must be in topological order (parent index < child index)");
  }
  return Status::Ok();
}

Status DraftTree::init(int32_t root_token, int32_t max_nodes, int32_t vocab_size) {
  if (max_nodes < 1 || max_nodes > kMaxTreeNodes)
    return Status::Invalid("max_nodes must be in [1, " + std::to_string(kMaxTreeNodes) + "], got " +
                           std::to_string(max_nodes));
  if (vocab_size < 0) return Status::Invalid("vocab_size must be >= 0 (0 = unchecked), got " + std::to_string(vocab_size));
  const int32_t old_vocab = vocab_size_;
  vocab_size_ = vocab_size;
  Status st = check_token(root_token, "root_token");
  if (!st.ok()) {
    vocab_size_ = old_vocab;
    return st;
  }
  max_nodes_ = max_nodes;
  nodes_.clear();
  first_child_.clear();
  next_sibling_.clear();
  last_child_.clear();
  nodes_.reserve(static_cast<size_t>(max_nodes));
  first_child_.reserve(static_cast<size_t>(max_nodes));
  next_sibling_.reserve(static_cast<size_t>(max_nodes));
  last_child_.reserve(static_cast<size_t>(max_nodes));
  DraftNode root;
  root.token = root_token;
  nodes_.push_back(root);
  first_child_.push_back(-1);
  next_sibling_.push_back(-1);
  last_child_.push_back(-1);
  return Status::Ok();
}

Status DraftTree::check_token(int32_t token, const char* what) const {
  if (token < 0 || (vocab_size_ > 0 && token >= vocab_size_))
    return Status::Invalid(std::string(what) + " = " + std::to_string(token) + " is outside the vocabulary [0, " +
                           (vocab_size_ > 0 ? std::to_string(vocab_size_) : std::string("2^31")) + ")");
  return Status::Ok();
}

Status DraftTree::add_child(int32_t parent, int32_t token, float confidence, int32_t proposer, int32_t* node) {
  if (node == nullptr) return Status::Invalid("node output is null");
  *node = -1;
  if (nodes_.empty()) return Status::Invalid("the tree is not initialised");
  if (parent < 0 || parent >= size())
    return Status::Invalid("parent = " + std::to_string(parent) + " is not a node of the tree (size " +
                           std::to_string(size()) + ")");
  ATLAS_RETURN_IF_ERROR(check_token(token, "token"));
  if (!(confidence >= 0.0f && confidence <= 1.0f))
    return Status::Invalid("confidence must be in [0, 1], got " + std::to_string(confidence));
  if (proposer < 0 || proposer >= kMaxProposers)
    return Status::Invalid("proposer must be in [0, " + std::to_string(kMaxProposers) + "), got " +
                           std::to_string(proposer));
  const uint32_t bit = 1u << proposer;
  for (int32_t c = first_child_[parent]; c >= 0; c = next_sibling_[c]) {
    DraftNode& n = nodes_[c];
    if (n.token == token) {
      n.confidence = std::max(n.confidence, confidence);
      n.proposers |= bit;
      n.multiplicity += 1;
      *node = c;
      return Status::Ok();
    }
  }
  if (size() >= max_nodes_) return Status::Ok();  // budget reached: the node is left out
  const int32_t idx = size();
  DraftNode n;
  n.token = token;
  n.parent = parent;
  n.depth = nodes_[parent].depth + 1;
  n.confidence = confidence;
  n.proposers = bit;
  nodes_.push_back(n);
  first_child_.push_back(-1);
  next_sibling_.push_back(-1);
  last_child_.push_back(-1);
  if (last_child_[parent] < 0) first_child_[parent] = idx;
  else next_sibling_[last_child_[parent]] = idx;
  last_child_[parent] = idx;
  *node = idx;
  return Status::Ok();
}

Status DraftTree::add_path(int32_t parent, const int32_t* tokens, const float* confidences, int32_t len,
                           int32_t proposer, int32_t* placed, int32_t* last) {
  if (placed == nullptr || last == nullptr) return Status::Invalid("placed / last outputs are null");
  *placed = 0;
  *last = parent;
  if (len < 0) return Status::Invalid("path length must be >= 0, got " + std::to_string(len));
  if (len > 0 && tokens == nullptr) return Status::Invalid("tokens is null");
  if (parent < 0 || parent >= size())
    return Status::Invalid("parent = " + std::to_string(parent) + " is not a node of the tree (size " +
                           std::to_string(size()) + ")");
  // Validate the whole path first so that a bad token leaves the tree unchanged.
  for (int32_t i = 0; i < len; ++i) {
    Status st = check_token(tokens[i], "tokens[i]");
    if (!st.ok()) return Status::Invalid("tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                                         " is outside the vocabulary");
    if (confidences && !(confidences[i] >= 0.0f && confidences[i] <= 1.0f))
      return Status::Invalid("confidences[" + std::to_string(i) + "] must be in [0, 1], got " +
                             std::to_string(confidences[i]));
  }
  if (proposer < 0 || proposer >= kMaxProposers)
    return Status::Invalid("proposer must be in [0, " + std::to_string(kMaxProposers) + "), got " +
                           std::to_string(proposer));
  int32_t cur = parent;
  for (int32_t i = 0; i < len; ++i) {
    int32_t child = -1;
    ATLAS_RETURN_IF_ERROR(add_child(cur, tokens[i], confidences ? confidences[i] : 1.0f, proposer, &child));
    if (child < 0) break;  // budget reached
    cur = child;
    *placed = i + 1;
  }
  *last = cur;
  return Status::Ok();
}

Status DraftTree::assign(const int32_t* tokens, const int32_t* parents, const float* confidences,
                         const uint32_t* proposers, int32_t n, int32_t max_nodes, int32_t vocab_size) {
  if (n < 1) return Status::Invalid("the tree is empty: it needs at least the root (node 0)");
  if (tokens == nullptr) return Status::Invalid("tokens is null");
  if (max_nodes < 1 || max_nodes > kMaxTreeNodes)
    return Status::Invalid("max_nodes must be in [1, " + std::to_string(kMaxTreeNodes) + "], got " +
                           std::to_string(max_nodes));
  if (n > max_nodes)
    return Status::Invalid("the tree has " + std::to_string(n) + " nodes, more than max_nodes = " +
                           std::to_string(max_nodes));
  ATLAS_RETURN_IF_ERROR(validate_parents(parents, n));
  // Build into a fresh tree and swap, so that a failure leaves *this unchanged.
  DraftTree t;
  ATLAS_RETURN_IF_ERROR(t.init(tokens[0], max_nodes, vocab_size));
  for (int32_t i = 1; i < n; ++i) {
    const float c = confidences ? confidences[i] : 1.0f;
    if (!(c >= 0.0f && c <= 1.0f))
      return Status::Invalid("confidences[" + std::to_string(i) + "] must be in [0, 1], got " + std::to_string(c));
    Status st = t.check_token(tokens[i], "token");
    if (!st.ok())
      return Status::Invalid("tokens[" + std::to_string(i) + "] = " + std::to_string(tokens[i]) +
                             " is outside the vocabulary");
    for (int32_t s = t.first_child_[parents[i]]; s >= 0; s = t.next_sibling_[s]) {
      if (t.nodes_[s].token == tokens[i])
        return Status::Invalid("nodes " + std::to_string(s) + " and " + std::to_string(i) +
                               " are both children of node " + std::to_string(parents[i]) + " with token " +
                               std::to_string(tokens[i]) + ": a draft tree is a trie, merge them");
    }
    int32_t idx = -1;
    ATLAS_RETURN_IF_ERROR(t.add_child(parents[i], tokens[i], c, 0, &idx));
    if (idx != i) return Status::Internal("assign: node index mismatch");
    t.nodes_[i].proposers = proposers ? proposers[i] : 1u;
  }
  *this = std::move(t);
  return Status::Ok();
}

int32_t DraftTree::max_depth() const {
  int32_t d = 0;
  for (const auto& n : nodes_) d = std::max(d, n.depth);
  return d;
}

Status DraftTree::flatten(int64_t committed_len, int32_t* tokens, int64_t* positions, int32_t* parents,
                          uint8_t* ancestor_mask) const {
  if (committed_len < 0)
    return Status::Invalid("committed_len must be >= 0, got " + std::to_string(committed_len));
  if (nodes_.empty()) return Status::Invalid("the tree is not initialised");
  const int32_t n = size();
  for (int32_t i = 0; i < n; ++i) {
    const DraftNode& node = nodes_[i];
    if (tokens) tokens[i] = node.token;
    if (positions) positions[i] = committed_len + node.depth;
    if (parents) parents[i] = node.parent;
  }
  if (ancestor_mask) {
    // Row i = row of its parent (already complete: parent < i) plus i itself.
    const size_t row = static_cast<size_t>(n);
    for (int32_t i = 0; i < n; ++i) {
      uint8_t* r = ancestor_mask + row * static_cast<size_t>(i);
      const int32_t p = nodes_[i].parent;
      if (p >= 0) std::copy(ancestor_mask + row * static_cast<size_t>(p), ancestor_mask + row * (p + 1), r);
      else std::fill(r, r + row, uint8_t{0});
      r[i] = 1;
    }
  }
  return Status::Ok();
}

}  // namespace atlas
