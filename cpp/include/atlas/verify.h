// atlas/verify.h: lossless acceptance of draft trees against target logits (CPU).
//
// Vocabulary:
//   accepted   a non-root draft node whose token the target keeps. Accepted
//              nodes form one root-to-node path.
//   bonus      the token the target emits after the accepted path: its argmax
//              (greedy) or a sample of what remains of its distribution after
//              the rejections at the last accepted node (sampling).
//   emitted    accepted tokens followed by the bonus: 1 + num_accepted tokens,
//              always at least one, so every verification step makes progress.
//
// Greedy (temperature == 0): child c of node i is accepted iff tokens[c] is the
// argmax of logits[i]; ties go to the lowest token id, as torch.argmax does.
//
// Sampling (temperature > 0): p = the target distribution at node i after the
// plain sampler's transforms, in this order: logits / temperature, keep the
// top_k largest (0 = all; ties with the k-th value are kept), softmax, keep the
// smallest prefix of tokens in descending probability whose mass reaches top_p
// (1 = all), renormalise. Children are tried in index order; child x is
// accepted with probability min(1, p(x) / q(x)), where q is the draft
// distribution of node i (draft_probs row i) or, without draft_probs, one-hot
// on x (a deterministic draft). After a rejection p <- normalise(max(p - q, 0)),
// applied multiplicity[c] times for a child that merged several proposals.
// The bonus is sampled from the final p. The emitted tokens are then distributed
// exactly as plain sampling of the target token by token.
//
// Randomness is counter based (Philox-4x32-10) so that a run replays bit for
// bit, on the CPU and the GPU alike: the uniform for attempt j at tree node i
// of a sequence with (seed, offset) is philox(key = seed, counter = {offset
// low, offset high, i, j}) mapped to [0, 1) with 24 bits; the bonus at node i
// uses j = 0x80000000. The engine advances offset by one per step.
#pragma once

#include <cstdint>

#include "atlas/common.h"

namespace atlas {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy; must be >= 0 and finite
  int32_t top_k = 0;         // 0 = no limit; must be >= 0
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
  uint64_t offset = 0;
};

// One batch of trees, flattened one after the other. All arrays are caller
// owned; the *out arrays are written.
struct VerifyProblem {
  // [total_nodes, vocab] target logits, row i = distribution of the token that
  // follows node i. Row stride in elements (>= vocab).
  const void* logits = nullptr;
  DType logits_dtype = DType::kFloat32;
  int64_t vocab = 0;
  int64_t logits_row_stride = 0;

  // Optional [total_nodes, vocab] float32 draft distributions: row i is the
  // distribution node i's children were sampled from. Null = one-hot drafts.
  const float* draft_probs = nullptr;
  int64_t draft_row_stride = 0;

  const int32_t* tokens = nullptr;        // [total_nodes] token of each node (root's is ignored)
  const int32_t* parents = nullptr;       // [total_nodes] tree-local parent, -1 at each root
  const int32_t* multiplicity = nullptr;  // [total_nodes] optional, >= 1; null = all 1
  const int64_t* tree_offsets = nullptr;  // [batch + 1] first node of each tree; tree_offsets[0] == 0
  int64_t batch = 0;
  const SamplingParams* params = nullptr; // [batch]

  int64_t max_accept = 0;                 // row width of accepted_out; emitted_out rows are max_accept + 1
  int32_t* accepted_out = nullptr;        // [batch, max_accept] tree-local node indices, path order; -1 padded
  int32_t* emitted_out = nullptr;         // [batch, max_accept + 1] token ids; -1 padded
  int32_t* num_accepted_out = nullptr;    // [batch]

  void* workspace = nullptr;              // verify_workspace_bytes(vocab) bytes, 64-byte aligned
  int64_t workspace_bytes = 0;
};

// Bytes of scratch one verify() call needs for this vocabulary.
int64_t verify_workspace_bytes(int64_t vocab);

// Validates the whole problem first (shapes, parents, token ids, parameters,
// depth of every tree <= max_accept) and writes nothing when it is invalid.
// Logit rows that the walk reads are checked: NaN or +inf there is an error
// (a row of all -inf too). Rows it does not read cannot change the result.
Status verify(const VerifyProblem& problem);

// The Philox-4x32-10 uniform described above; exposed for tests and the CUDA twin.
float philox_uniform(uint64_t seed, uint64_t offset, uint32_t node, uint32_t attempt);

}  // namespace atlas
