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
// The first such child in index order is taken. draft_probs, multiplicity and
// the seed are not used.
//
// Sampling (temperature > 0): p = the target distribution at node i after the
// plain sampler's transforms, in this order: logits / temperature, keep the
// top_k largest (0 = all; ties with the k-th value are kept), softmax, keep the
// smallest prefix of tokens in descending probability (equal probabilities in
// ascending token id) whose mass reaches top_p (1 = all), renormalise.
// Children are tried in index order; child x is accepted with probability
// min(1, p(x) / q(x)), i.e. iff u * q(x) < p(x) for the attempt's uniform u,
// where q is the draft distribution of node i (draft_probs row i) or, without
// draft_probs, one-hot on x (a deterministic draft). After a rejection
// p <- normalise(max(p - q, 0)), applied multiplicity[c] times for a child that
// merged several proposals (with one-hot q once is the same as any number of
// times); a residual that would leave no mass (possible only through rounding)
// leaves p as it was. The bonus is sampled from the final p by inversion: the
// first token, in ascending id order, whose cumulative probability exceeds u.
// The emitted tokens are then distributed exactly as plain sampling of the
// target token by token (one node tree = the plain sampler).
//
// Numerics: p is computed in float with double sums. A token 2^-t times as
// likely as the most likely one has a relative error below 4e-7 + 2e-7 t;
// tokens less likely than 2^-126 times the most likely one get probability 0
// (so -inf logits never come out). A decision within that error of a boundary
// (u against p(x) / q(x), a top_p cut, a cumulative sum in the bonus draw) may
// differ from an exact float64 reference. Results are bit-identical on every
// x86-64 CPU whatever vector width it runs.
//
// Randomness is counter based (Philox-4x32-10, as in Random123) so that a run
// replays bit for bit, with the same uniforms on the CPU and the GPU: the
// uniform for attempt j (0, 1, ... in the order the children of node i are
// tried) at tree-local node i of a sequence with (seed, offset) is
//   out = philox4x32_10(counter = {offset low 32 bits, offset high 32 bits, i, j},
//                       key = {seed low 32 bits, seed high 32 bits})
//   u = (out[0] >> 8) * 2^-24, in [0, 1) with 24 bits;
// the bonus at node i uses j = 0x80000000. The engine advances offset by one
// per step.
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
  const int32_t* parents = nullptr;       // [total_nodes] tree-local parent, -1 at each root, else < the node
  const int32_t* multiplicity = nullptr;  // [total_nodes] optional, >= 1 (root's ignored); null = all 1
  // [batch + 1] first node of each tree; tree_offsets[0] == 0, tree_offsets[batch]
  // == total_nodes (the number of logits rows: the caller guarantees it), each
  // tree 1 to kMaxTreeNodes nodes.
  const int64_t* tree_offsets = nullptr;
  int64_t batch = 0;
  const SamplingParams* params = nullptr; // [batch]

  int64_t max_accept = 0;                 // row width of accepted_out; emitted_out rows are max_accept + 1
  int32_t* accepted_out = nullptr;        // [batch, max_accept] tree-local node indices, path order; -1 padded
  int32_t* emitted_out = nullptr;         // [batch, max_accept + 1] token ids; -1 padded
  int32_t* num_accepted_out = nullptr;    // [batch]

  void* workspace = nullptr;              // verify_workspace_bytes(vocab) bytes, any alignment
  int64_t workspace_bytes = 0;
};

// Bytes of scratch one verify() call needs for this vocabulary (0 when vocab is
// not in [1, 2^30], the vocabularies verify() accepts).
int64_t verify_workspace_bytes(int64_t vocab);

// Validates the whole problem first (shapes, strides, parents, token ids,
// multiplicities, parameters, depth of every tree <= max_accept, workspace size)
// and writes nothing when it is invalid. Rows are checked when the walk reads
// them: NaN or +inf in a logits row is an error, and so is a row of all -inf;
// a draft_probs row must be finite, non-negative and sum to 1 within 1e-3, and
// give each child drafted from it a probability > 0. Rows the walk does not
// read cannot change the result and are not read. After such a row error the
// outputs are unspecified (earlier trees of the batch may have been written).
// The caller owns every array; verify() allocates nothing.
Status verify(const VerifyProblem& problem);

// The Philox-4x32-10 uniform described above; exposed for tests and the CUDA twin.
float philox_uniform(uint64_t seed, uint64_t offset, uint32_t node, uint32_t attempt);

}  // namespace atlas
