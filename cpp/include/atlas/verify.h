// atlas/verify.h: lossless acceptance of draft trees against target logits (CPU).
//
// Vocabulary:
//   accepted   a non-root draft node whose token the target keeps. Accepted
//              nodes form one root-to-node path.
//   bonus      the token the target emits after the accepted path: its argmax
//              (greedy) or a draw from its distribution at the last accepted
//              node (sampling; with draft_probs, from what remains of it after
//              the rejected children).
//   emitted    accepted tokens followed by the bonus: 1 + num_accepted tokens,
//              always at least one, so every verification step makes progress.
//
// Greedy (temperature == 0): child c of node i is accepted iff tokens[c] is the
// argmax of logits[i]; ties go to the lowest token id, as torch.argmax does.
// The first such child in index order is taken. draft_probs and the seed are
// not used.
//
// Sampling (temperature > 0): p = the target distribution at node i after the
// plain sampler's transforms, in this order: logits / temperature, keep the
// top_k largest (0 = all; ties with the k-th value are kept), softmax, keep the
// smallest prefix of tokens in descending probability (equal probabilities in
// ascending token id) whose mass reaches top_p (1 = all), renormalise. A draw
// "from p at u" is the inverse CDF: the first token, in ascending id order,
// whose cumulative weight exceeds u * total.
//
// Uniforms are keyed by position, not by node: the walk's node at depth d sits
// at position offset + d (SamplingParams::offset is the position of the root),
// and every uniform it uses is philox_uniform(seed, offset + d, stream, j):
//
//   One-hot drafts (no draft_probs): y = the draw from p at
//   philox_uniform(seed, offset + d, 0, 0). The first child (in index order)
//   whose token is y is accepted; if there is none, the bonus is y. A child x
//   is accepted with probability p(x), as rejection sampling would, but the
//   token at each position is the one plain sampling would emit there: with
//   the same seed, the emitted tokens are exactly those of plain sampling (a
//   tree of one node per step, offset = that step's root position), whatever
//   the shape of the tree, up to float rounding of p (a tree forward and a
//   one-token forward may round the logits differently). A seeded run
//   replays even when the trees are chosen from measured timings.
//
//   draft_probs: the children x_1..x_k of node i (index order) are distinct
//   tokens drawn without replacement from q = draft_probs row i (the tree is
//   a trie, so children are distinct by construction). Recursive rejection
//   sampling without replacement, with p_1 = p, q_1 = q / sum(q):
//     for j = 1..k: u_j = philox_uniform(seed, offset + d, 1, j - 1);
//       accept x_j iff u_j * q_j(x_j) < p_j(x_j) (then stop);
//       else p_{j+1} = normalise(max(p_j - q_j, 0)), which is 0 at x_j,
//            q_{j+1} = normalise(q_j with x_j set to 0).
//   If no child is accepted, the bonus is the draw from p_{k+1} at
//   philox_uniform(seed, offset + d, 2, 0). The emitted tokens are distributed
//   exactly as plain sampling of the target token by token. A residual that
//   would leave no mass (possible only through rounding) leaves p as it was.
//
// Numerics: p is computed in float with double sums. A token 2^-t times as
// likely as the most likely one has a relative error below 4e-7 + 2e-7 t;
// tokens less likely than 2^-126 times the most likely one get probability 0
// (so -inf logits never come out). The test u * q_j(x) < p_j(x) is evaluated
// as u * q[x] * P < w[x] * Q in double, with w the unnormalised weights of p_j,
// P their total, and Q the draft row's sum less the q of the rejected
// siblings (the sum in double, each rejection subtracting q[x]). A decision
// within that error of a boundary (u against p(x) / q(x), a top_p cut, a
// cumulative sum in a draw) may differ from an exact float64 reference.
// Results are bit-identical on every x86-64 CPU whatever vector width it runs.
//
// Randomness is counter based (Philox-4x32-10, as in Random123) so that a run
// replays bit for bit, with the same uniforms on the CPU and the GPU:
//   out = philox4x32_10(counter = {position low 32 bits, position high 32 bits,
//                                  stream, j},
//                       key = {seed low 32 bits, seed high 32 bits})
//   u = ((out[0] << 21) | (out[1] >> 11)) * 2^-53, in [0, 1) with 53 bits
// (24 bits would leave gaps of 6e-8 in the inverse CDF, coarser than the
// probabilities of a large vocabulary's tail).
#pragma once

#include <cstdint>

#include "atlas/common.h"

namespace atlas {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy; must be >= 0 and finite
  int32_t top_k = 0;         // 0 = no limit; must be >= 0
  float top_p = 1.0f;        // in (0, 1]
  uint64_t seed = 0;
  uint64_t offset = 0;       // position of the tree's root in its sequence (see above)
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
// parameters, depth of every tree <= max_accept, workspace size)
// and writes nothing when it is invalid. Rows are checked when the walk reads
// them: NaN or +inf in a logits row is an error, and so is a row of all -inf;
// a draft_probs row must be finite, non-negative and sum to 1 within 1e-3, and
// give each child drafted from it a probability > 0 (so siblings must not
// repeat a token: after its rejection a token has q = 0). Rows the walk does not
// read cannot change the result and are not read. After such a row error the
// outputs are unspecified (earlier trees of the batch may have been written).
// The caller owns every array; verify() allocates nothing.
Status verify(const VerifyProblem& problem);

// The k most probable tokens of each row: for each row, the k tokens with the
// largest logits (descending; equal logits in ascending id) and either their
// logits (logits_out) or their softmax probabilities at temperature 1 over
// the whole row (probs_out), computed as the verifier computes a dense row
// (weights 2^((x - max) log2 e) in float, their total in double); the logits
// cost no exponentials. Single-threaded and allocation-free: it runs on the
// serving thread between target forwards (the learned speculator's drafts,
// the learning tap's view of the target). Validates everything first and
// writes nothing when the problem is invalid; a row holding NaN or +inf, or
// only -inf, is an error naming the row (rows before it are written).
struct TopKProblem {
  const void* logits = nullptr;          // [rows, vocab]
  DType logits_dtype = DType::kFloat32;
  int64_t vocab = 0;
  int64_t logits_row_stride = 0;         // elements, >= vocab
  int64_t rows = 0;
  int32_t k = 0;                         // in [1, vocab]
  int32_t* ids_out = nullptr;            // [rows, k] token ids
  float* probs_out = nullptr;            // [rows, k] probabilities, or null
  float* logits_out = nullptr;           // [rows, k] logits, or null (exactly one of the two)
  void* workspace = nullptr;             // verify_workspace_bytes(vocab) bytes, any alignment
  int64_t workspace_bytes = 0;
};
Status top_k_probs(const TopKProblem& problem);

// The Philox-4x32-10 uniform described above; exposed for tests and the CUDA twin.
double philox_uniform(uint64_t seed, uint64_t position, uint32_t stream, uint32_t j);

}  // namespace atlas
