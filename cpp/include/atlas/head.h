// atlas/head.h: the learned speculator's draft head (native forward) and its
// versioned weights.
//
// The head drafts the children of a tree node x from two inputs: the *feature*
// f of x's parent position (the target's final-norm hidden state there, the
// vector its LM head reads, or deeper in a draft tree the head's own
// prediction of it) and x's token. One forward, per node (H = hidden size,
// I = intermediate size, Vd = draft vocabulary size):
//
//   e     = E[x]                               frozen target token embedding [H]
//   z     = W_in [f ; e] + b_in                W_in [H, 2H]
//   n     = rmsnorm(z) * norm1
//   h     = z + W_down (silu(W_gate n) * W_up n)   W_gate, W_up [I, H], W_down [H, I]
//   f_hat = rmsnorm(h) * norm2                 the predicted feature of x's position [H]
//   logits = W_out f_hat                       W_out [Vd, H]: logits of x's children
//
// rmsnorm(v) = v / sqrt(mean(v^2) + eps), as the target normalises (the
// target's CPU forward's own, atlas/layer_ops.h, rounded as stated there). Row j of
// the logits is the token draft_ids[j]: the head scores a *draft vocabulary*
// (the tokens that traffic uses most) rather than the whole vocabulary,
// because the output layer is the head's largest cost and rare tokens are
// hardly ever accepted. Drafting below a drafted child c of x uses (f_hat of
// x, c). Why one residual MLP and not a full decoder layer as in EAGLE: the
// head runs once per tree depth on a CPU, between target forwards; attention
// over the context would need a KV cache of its own, and the target's feature
// already summarises the context.
//
// Weights and versions. The embedding table is borrowed, given once to init()
// and never pushed: the caller keeps it alive and unchanged for the head's
// lifetime. Everything else is a *version*: push() copies a complete set of
// float32 tensors into a new HeadWeights beside the live one, validates it
// (every shape, finite values, matrix values within bfloat16's range, draft
// ids in range and distinct) and only then swaps it in under a mutex; a
// refused push changes nothing. A forward reads the one HeadWeights it is
// given, which a snapshot() keeps alive however many pushes follow, so a
// caller that takes one snapshot per decoding step never sees two versions
// within the step. Versions are numbered 1, 2, ... in push order; the history
// keeps (version, metric) for the most recent kMaxHeadHistory pushes.
//
// Precision. A version stores its five matrices (W_in, W_gate, W_up, W_down,
// W_out) in bfloat16, each pushed value rounded to nearest even, and keeps no
// float32 copy of them; b_in, norm1 and norm2 stay float32. The forward widens
// the bfloat16 values to float32 (exactly) and computes in float32: it is the
// float32 head whose matrices are the rounded ones. Why: the forward runs on
// a few rows between target forwards, which evict its weights from the
// caches, so its cost is streaming them from memory, and bfloat16 halves those
// bytes (11 MB to 6 MB for SmolLM2's head with 2,048 draft tokens, 16 to 8
// with 4,096). Drafting precision cannot change what is generated: the
// target verifies every drafted token.
//
// Warming the caches (prefetch()). The same eviction makes a step's first
// depth wait on memory, while the drafting thread has other work to do first
// (after the target's forward: verification, the controller's bookkeeping,
// the other speculators). prefetch() returns at once, having handed the live
// version to a background thread of the head's own, which reads one byte of
// every cache line of its tensors: on a CPU whose last-level cache the cores
// share, the lines then wait there for the drafting thread. Measured on this
// project's 2-core AMD EPYC (SmolLM2's static head, 8 MB): one request
// drafting 16 nodes after 64 MB of other traffic took 1.38 ms cold, 0.95 ms
// with the warm-up run on the other core while this one worked for 1.5 ms
// (0.71 ms fully warm); in full atlas (HumanEval requests 124-163, warm-ups
// on and off in alternate requests) the adaptive head's draft took 1.45
// against 1.69 ms a call (medians) with learning off, 1.62 against 1.72 with
// learning on, whose trainer process competes for the other core.
// The warm-up thread is a helper thread: it runs on the helper CPUs when they
// are set (atlas/pool.h), off the serving thread's core.
//
// Ownership: DraftHead owns its versions (shared with the snapshots handed
// out); the caller owns inputs, outputs and the workspace of forward().
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "atlas/common.h"

namespace atlas {

// The float tensors of a version, in push order. Shapes, torch layout [out, in]:
enum HeadTensor : int32_t {
  kHeadWIn = 0,   // [H, 2H]
  kHeadBIn,       // [H]
  kHeadNorm1,     // [H]
  kHeadWGate,     // [I, H]
  kHeadWUp,       // [I, H]
  kHeadWDown,     // [H, I]
  kHeadNorm2,     // [H]
  kHeadWOut,      // [Vd, H]
  kNumHeadTensors,
};

// Names as Python's dict of weights spells them ("w_in", ...).
const char* head_tensor_name(int32_t t);

// Name of the int32 [Vd] tensor of draft token ids that goes with each version.
constexpr const char* kHeadDraftIdsName = "draft_ids";

// Output columns per packed weight panel: two SSE vectors, so that a panel
// times a few rows of input keeps its accumulators in registers.
constexpr int32_t kHeadPanel = 8;

// Rows per tile of forward(): the weights are read once per tile, and a tile's
// intermediate activations (tile * (4H + 2I) floats) stay in the L2 cache at
// the sizes atlas targets (H <= 1024).
constexpr int32_t kHeadRowTile = 64;

// How long after its request a cache warm-up (DraftHead::prefetch) may still
// run: a drafting step's gap between two target forwards on the CPU is a few
// milliseconds, and the warm-up is worth something only in its first part.
constexpr int64_t kHeadPrefetchMicros = 1500;

// Why 1024: one entry per push; a learning loop that pushes every few minutes
// keeps days of history in a few kilobytes.
constexpr int32_t kMaxHeadHistory = 1024;

// Which GEMM code forward() runs. Every path computes the same function, to
// the bit (see head.cpp): the choice changes only the speed. kAuto: the
// fastest path the CPU has (chosen at run time, so the build stays portable):
// AVX-512 bfloat16 dot products, else AVX2 + FMA, else the SSE baseline;
// kAvx2: AVX2 + FMA where the CPU has it, else the baseline; kBaseline: always
// the baseline (so that tests cover every path on any machine).
enum class HeadSimd : int32_t {
  kAuto = 0,
  kBaseline = 1,
  kAvx2 = 2,
};

struct HeadConfig {
  int32_t hidden = 0;        // H, the target's hidden size
  int32_t intermediate = 0;  // I
  int32_t draft_vocab = 0;   // Vd, in [1, vocab]
  int32_t vocab = 0;         // rows of the embedding table
  float eps = 1e-5f;         // rmsnorm epsilon, > 0
  HeadSimd simd = HeadSimd::kAuto;
};

// A borrowed float32 tensor as push() reads it: row-major, dense.
struct HeadTensorRef {
  const float* data = nullptr;
  int32_t ndim = 0;
  int64_t shape[2] = {0, 0};
};

struct HeadWeightsRef {
  HeadTensorRef tensors[kNumHeadTensors];
  const int32_t* draft_ids = nullptr;  // [num_draft_ids]
  int64_t num_draft_ids = 0;
};

// One immutable weight version, laid out for the forward: every matrix is
// packed in panels of kHeadPanel output columns, as bfloat16 (see head.cpp).
class HeadWeights {
 public:
  // The version's number; a derived version (DraftHead::derive) has its
  // base's.
  int64_t version() const { return version_; }
  // True for a version made by DraftHead::derive (never live).
  bool derived() const { return derived_; }
  const std::vector<int32_t>& draft_ids() const { return draft_ids_; }
  // Bytes of tensor data this version holds (panels, vectors and draft ids).
  int64_t bytes() const;

  struct Tensors {
    std::vector<uint32_t> w_in, w_gate, w_up, w_down, w_out;  // packed panels, two bfloat16 per word
    std::vector<float> b_in, norm1, norm2;
  };

 private:
  friend class DraftHead;
  int64_t version_ = 0;
  bool derived_ = false;
  Tensors t_;
  std::vector<int32_t> draft_ids_;
};

struct HeadVersionRecord {
  int64_t version = 0;
  double metric = 0.0;  // NaN until the caller records one
};

// Best-first drafting of token trees from a head's forward (the learned
// speculator's propose, atlas/speculators/learned.py, describes the rule): per
// request a root with its parent feature and token, a node budget and a path
// probability floor below depth 1; at each depth the `width` most probable
// nodes of the depth before (path probability: the product of the head's
// conditional probabilities from the root, in double) are expanded into their
// `topk` most probable children (softmax over the draft vocabulary with the
// verifier's numerics, atlas/verify.h), all requests in one forward a depth,
// while a node could still place a child among the budget most probable
// candidates; then each request keeps its budget most probable candidates
// (ties: the earlier created), a set closed under parents.
struct HeadDraftJob {
  const float* feature = nullptr;  // [H]: the feature of the root's parent position
  int32_t token = 0;               // the root's token, in [0, vocab)
  int32_t budget = 1;              // nodes it may add, >= 1
  double floor = 0.0;              // in [0, 1)
};

struct HeadDraftSettings {
  int32_t topk = 4;       // children considered per expanded node, >= 1
  int32_t width = 4;      // nodes expanded per depth and request, >= 1
  int32_t max_depth = 6;  // >= 1
};

// A kept candidate: its parent among the same request's kept candidates
// (-1: the root), its token (a full-vocabulary id) and the head's conditional
// probability of it, in creation order (a parent before its children).
struct HeadDraftNode {
  int32_t parent = -1;
  int32_t token = 0;
  float prob = 0.0f;
};

class DraftHead {
 public:
  DraftHead();
  ~DraftHead();
  DraftHead(const DraftHead&) = delete;
  DraftHead& operator=(const DraftHead&) = delete;

  struct Prefetcher;  // the warm-up thread's state (head.cpp)

  // embed [vocab, hidden] float32, row-major: borrowed (see above).
  Status init(const HeadConfig& config, const float* embed);

  // Copies, validates and swaps in a new version; *version is its number.
  // On error the live version is unchanged. metric may be NaN (none yet).
  Status push(const HeadWeightsRef& weights, double metric, int64_t* version);

  // A request-local version: a copy of `base` with the float tensors that
  // `in` gives replaced (any non-empty subset; a null data pointer keeps the
  // base's), each validated as push() validates it; draft_ids cannot change
  // (in.draft_ids must be null). It is never live and takes no number or
  // history entry: version() is the base's and derived() is true. What it is
  // for: the learning loop fits the head to each request's prompt
  // (atlas/learning/trainer.py: adapt_to_prompt) and drafts that request with
  // the result, while every other request drafts with the live version. Costs
  // a copy of the base's tensors (6 MB for SmolLM2's head with 2,048 draft
  // tokens) and the packing of the replaced ones. On error *out is unchanged.
  Status derive(const HeadWeights* base, const HeadWeightsRef& in, std::shared_ptr<const HeadWeights>* out) const;

  // Records a metric for a version still in the history (e.g. the acceptance
  // it reached while serving).
  Status set_metric(int64_t version, double metric);

  // The live version, kept alive by the returned pointer; null before the
  // first successful push.
  std::shared_ptr<const HeadWeights> snapshot() const;

  // Live version number, 0 before the first push.
  int64_t version() const;

  // Queues the live version for the background cache warm-up (see above) and
  // returns at once; *queued is false before the first push, and when the
  // warm-up thread is handing over a request at that moment (skipped, never
  // waited for). The thread starts on the first call (again in a forked
  // child). A queued warm-up is abandoned when a newer request comes (before
  // or while it runs), and kHeadPrefetchMicros after its request: by then the
  // caller's next target forward may have begun, which a late warm-up would
  // slow down. One still under way when a draft() begins goes on: it reads
  // ahead of the draft, which finds the lines it needs sooner.
  Status prefetch(bool* queued) const;
  // The same for version w (one of this head's, e.g. a derived one); a null
  // w queues nothing.
  Status prefetch(std::shared_ptr<const HeadWeights> w, bool* queued) const;
  // Warm-ups completed, and abandoned, so far: in the end every queued one
  // is one or the other.
  int64_t prefetches_done() const;
  int64_t prefetches_abandoned() const;
  std::vector<HeadVersionRecord> history() const;

  const HeadConfig& config() const { return config_; }

  // The GEMM path init() chose: "avx512-bf16", "avx2+fma" or "sse".
  const char* simd_path() const;

  // Tensor t (a HeadTensor) of version w as the forward uses it, in torch
  // layout [out, in] (out_floats >= its element count): a matrix's bfloat16
  // values widened to float32, a vector as pushed.
  Status read_tensor(const HeadWeights* w, int32_t t, float* out, int64_t out_floats) const;

  // Drafts a tree per job with weights w (see HeadDraftJob): out[j] receives
  // job j's kept candidates. workspace as forward()'s.
  Status draft(const HeadWeights* w, const HeadDraftJob* jobs, int64_t num_jobs, const HeadDraftSettings& settings,
               std::vector<std::vector<HeadDraftNode>>* out, float* workspace, int64_t workspace_floats) const;

  // Floats of workspace forward() needs, whatever the batch size: rows are
  // processed in tiles of kHeadRowTile.
  int64_t workspace_floats() const;

  // Forward of n nodes with weights w (a snapshot):
  //   features [n, H] (row i at features + i * feature_stride, stride >= H),
  //   tokens [n] in [0, vocab) -> f_hat_out [n, H], logits_out [n, Vd], dense.
  // workspace: workspace_floats() floats, caller-owned, one caller at a time.
  // n == 0 is a no-op. Inputs must not alias outputs or the workspace.
  Status forward(const HeadWeights* w, const float* features, int64_t feature_stride, const int32_t* tokens,
                 int64_t n, float* f_hat_out, float* logits_out, float* workspace,
                 int64_t workspace_floats) const;

 private:
  HeadConfig config_;
  const float* embed_ = nullptr;
  bool ready_ = false;
  enum class Path : int32_t { kSse, kAvx2, kBf16 };
  Path path_ = Path::kSse;

  mutable std::mutex mu_;  // guards live_, next_version_, history_
  std::shared_ptr<const HeadWeights> live_;
  int64_t next_version_ = 1;
  std::vector<HeadVersionRecord> history_;

  // Shared with the warm-up thread, which is detached and outlives the head
  // if it must (it exits once told to stop).
  std::shared_ptr<Prefetcher> prefetcher_;
  static void prefetch_loop(std::shared_ptr<Prefetcher> s);
};

}  // namespace atlas
