// atlas/suffix.h: the suffix speculator, a model-free speculator in the spirit
// of SuffixDecoding (Oliaro et al., 2024): it drafts what followed earlier
// occurrences of the request's latest tokens, in the request itself and in the
// outputs of finished requests.
//
// Vocabulary:
//   request     a live request: its prompt and the tokens committed so far,
//               appended by extend(); its last token is the draft tree's root.
//   document    a finished request's output (with its prompt when
//               index_prompts is set) or a text given to add_document().
//   corpus      the documents, oldest first, in a ring of max_corpus_tokens
//               slots. A document takes its length + 1 slots: a separator
//               after it keeps matches and continuations inside it. Adding a
//               document evicts the oldest ones until it fits, exactly; a
//               document longer than max_corpus_tokens - 1 keeps its last
//               max_corpus_tokens - 1 tokens.
//   anchor      the last a tokens at a position (inside its document), for
//               a in {1, 4}.
//   occurrence  a position e (in the request, before its last token, or in a
//               corpus document, before the document's last token) whose
//               anchor equals the request's. Its match length m is the length
//               of the common suffix of the text up to e and the request, at
//               most max_match; its continuation is the up to max_depth tokens
//               that follow e. In the request the text after e ends at its
//               last token, n - 1; when m >= p = n - 1 - e the request is
//               periodic with period p over its last m + p tokens, and the
//               continuation repeats x[e+1 .. n-1] to max_depth tokens (a
//               greedy decoder's loop is drafted to full depth, not p tokens).
//
// The rule that a proposal follows (tests/test_suffix.py restates it in
// plain Python and compares trees exactly):
//   1. Occurrences are visited newest first, the request's own before the
//      corpus's, at most max_occurrences positions in all (a corpus position
//      at a document's end is visited but is no occurrence: nothing follows).
//      First with the 4-token anchor (when the request has 4 tokens and
//      max_match >= 4); when that finds no occurrence, again with the
//      1-token anchor.
//   2. Match length: with L1 the longest match found and N(L) the number of
//      occurrences with m >= L, the draft uses the occurrences with m >= Ls,
//      Ls = L1 when L1 >= 4 (kTrustedMatch), otherwise the largest L <= L1
//      with N(L) >= min_support, or L1 when no L has that support. A match of
//      4 tokens is rarely a coincidence, so it is trusted alone; a shorter one
//      must be corroborated by min_support occurrences, and when the longest
//      is not, a shorter match that is takes its place (SuffixDecoding scores
//      candidate match lengths by length and frequency; this is that trade-off
//      as one threshold).
//   3. Tree: the continuations of the selected occurrences form a trie with
//      counts; its children are expanded best first by path probability (the
//      product of the conditional frequencies from the root; ties: first
//      queued first), children queued by count, most frequent first (ties:
//      first seen first). A node's confidence is its frequency
//      count(node) / total(parent), total = the summed counts of the parent's
//      children (occurrences whose continuation ends at the parent do not
//      count), times the match's weight Ls / (Ls + kMatchPrior): the longer
//      the match the frequency comes from, the more it is worth (measured on
//      the greedy outputs of the 164 HumanEval requests served in order, nodes
//      of frequency 1 whose parent was accepted: accepted at 0.70, 0.75, 0.84
//      and 0.95 for Ls in 1-3, 4-7, 8-15 and 16-32, against weights of
//      0.40-0.67, 0.73-0.82, 0.84-0.91 and 0.91-0.96; with the frequency
//      alone they were all one confidence, and the controller, which
//      calibrates acceptance per confidence and so needs the classes apart
//      rather than exact, could not draft a long match deeper than a short
//      one). The path probability that orders the expansion is the product
//      of the frequencies alone (one proposal has one Ls). No smoothing.
//      Expansion stops at the tree's budget, at max_depth, or when the best
//      path probability is below min_prob. Nodes are added with
//      DraftTree::add_child (merging into other speculators' nodes), proposer
//      bit = the given id.
//
// Why hash chains over a token ring rather than a suffix tree or n-gram
// count tables: eviction of the oldest document is then exact and O(its
// length) with no restructuring (the ring's tail moves; chains are cut where
// they reach it), memory is a fixed 12 bytes per corpus slot plus two anchor
// tables of 4 bytes per entry at load <= 1/2 (n-gram count tables for
// every context length up to max_match cost O(max_match) entries per token,
// a compressed suffix tree supports no cheap deletion of its oldest text),
// extend is O(1) per token, and a proposal visits at most max_occurrences
// positions, each read with at most max_match + max_depth token compares.
// The price is that matches beyond the newest max_occurrences positions of an
// anchor are not seen; recent text is the better predictor of the next.
//
// Memory: the corpus takes 12 * C + 8 * next_pow2(2 * C) bytes (C =
// max_corpus_tokens; the default, 2^17, is 3.7 MB) from the first document
// on, and never more; each live request 30 to 50 bytes per token (freed by
// finish); the proposal scratch 44 * (1 + K * D) + 20 * K + 4 * max_match
// bytes (K = max_occurrences, D = max_depth). With no live request,
// memory_bytes() <= 12 C + 8 next_pow2(2 C) + 48 (1 + K D) + 32 K +
// 4 max_match + 4096. memory_bytes() reports what is allocated.
//
// Ownership and threads: the speculator owns every buffer; proposals write
// into the caller's DraftTree. Not thread-safe: the binding serialises calls.
// Preconditions whose breach corrupts nothing but the drafts' quality: the
// tokens given to extend() are the request's committed tokens, in order.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "atlas/common.h"
#include "atlas/tree.h"

namespace atlas {

// A match this long is trusted even when it occurs once (rule 2 above). It is
// also the long anchor's length: every occurrence found through the long
// anchor is a trusted match.
constexpr int32_t kTrustedMatch = 4;

// The match-length prior of a node's confidence (rule 3 above).
constexpr double kMatchPrior = 1.5;

struct SuffixConfig {
  int32_t max_match = 32;          // longest suffix compared, in [1, 1024]
  int32_t max_depth = 16;          // deepest draft node, in [1, kMaxTreeNodes - 1]
  int32_t max_occurrences = 64;    // positions visited per proposal, in [1, 4096]
  int32_t min_support = 2;         // occurrences that make a short match credible, >= 1
  int64_t max_corpus_tokens = 1 << 17;  // corpus ring slots; 0 = no corpus; else in [2, 2^31 - 1]
  bool index_prompts = false;      // finished requests add their prompt too
  int32_t vocab_size = 0;          // > 0: every token is checked against [0, vocab_size)
  double min_prob = 0.0;           // path probability below which nothing is drafted, in [0, 1]
};

struct SuffixStats {
  int64_t live_requests = 0;
  int64_t corpus_docs = 0;
  int64_t corpus_tokens = 0;       // document tokens in the corpus (separators excluded)
  int64_t evicted_docs = 0;
  int64_t evicted_tokens = 0;
  int64_t proposals = 0;           // propose() calls that found the tree with room
  int64_t matched = 0;             // ... of which found an occurrence
  int64_t match_length_sum = 0;    // sum of Ls over matched proposals
  int64_t proposed_nodes = 0;      // nodes new to the trees (merges not counted)
};

// A token sequence with hash chains over its anchors: for each anchor length,
// a table from anchor to its newest position and, per position, the distance
// back to the previous position with the same anchor. Either growable (one
// document that only grows: a live request) or a ring of fixed capacity that
// holds whole documents, each followed by a separator (the corpus).
// Positions are global and only grow; a ring keeps [begin(), end()).
class TokenIndex {
 public:
  static constexpr int kLevels = 2;
  static constexpr int32_t kSeparator = -1;
  static constexpr uint64_t kNone = ~uint64_t{0};
  static int32_t anchor_len(int level) { return level == 0 ? 1 : kTrustedMatch; }

  void init_growable();
  // Allocates the ring and both anchor tables at their final size.
  void init_ring(uint64_t capacity);
  bool ready() const { return ready_; }

  uint64_t begin() const { return begin_; }
  uint64_t end() const { return end_; }
  uint64_t capacity() const { return cap_; }
  // Precondition: begin() <= pos < end().
  int32_t at(uint64_t pos) const { return tok_[slot(pos)]; }
  // Growable only: the tokens, contiguous.
  const int32_t* data() const { return tok_.data(); }

  // Appends a token to the current document and indexes the anchors ending at
  // it. A ring needs end() - begin() < capacity() (evict first).
  void push(int32_t token);
  // Ring: closes the current document with a separator.
  void end_document();
  // Ring: evicts the oldest document and its separator; returns its length.
  // Precondition: the ring is not empty.
  uint64_t evict_oldest();

  // Newest position whose level anchor equals query[0..anchor_len(level)), or
  // kNone. The query must not alias positions being written.
  uint64_t head(int level, const int32_t* query) const;
  // The previous position with the same level anchor as pos (which must be
  // indexed at that level), or kNone.
  uint64_t prev(int level, uint64_t pos) const {
    const uint32_t d = prev_[level][slot(pos)];
    if (d == 0 || pos - begin_ < d) return kNone;
    return pos - d;
  }

  int64_t memory_bytes() const;

 private:
  uint64_t slot(uint64_t pos) const { return ring_ ? pos % cap_ : pos; }
  uint64_t pos_of_slot(uint64_t s) const;
  uint64_t anchor_hash(int level, const int32_t* q) const;
  void gather(int level, uint64_t pos, int32_t* q) const;  // anchor tokens ending at pos
  bool anchor_equals(int level, uint64_t pos, const int32_t* q) const;
  // Table index holding q's entry, or the empty index where it would go.
  uint64_t find(int level, const int32_t* q, bool* found) const;
  void erase(int level, uint64_t i);
  void grow_table(int level);

  bool ready_ = false;
  bool ring_ = false;
  uint64_t cap_ = 0;          // ring slots (ring only)
  uint64_t begin_ = 0;        // oldest live position
  uint64_t end_ = 0;          // next position
  uint64_t doc_start_ = 0;    // first position of the document being written
  std::vector<int32_t> tok_;
  std::vector<uint32_t> prev_[kLevels];   // distance to the previous same anchor; 0 = none
  std::vector<uint32_t> table_[kLevels];  // slot + 1 of an anchor's newest position; 0 = empty
  uint64_t table_count_[kLevels] = {0, 0};
};

class SuffixSpeculator {
 public:
  // Validates the config; nothing else works before a successful init.
  Status init(const SuffixConfig& config);

  // A request begins with these tokens (n >= 1). rid must not be live.
  Status start(int64_t rid, const int32_t* tokens, int64_t n);
  // Appends committed tokens to a live request (n >= 0).
  Status extend(int64_t rid, const int32_t* tokens, int64_t n);
  // Ends a request: its output (and prompt, with index_prompts) becomes a
  // corpus document, and its own index is freed.
  Status finish(int64_t rid);
  // Adds a document to the corpus directly (e.g. earlier traffic, a warm start).
  Status add_document(const int32_t* tokens, int64_t n);

  // Adds draft nodes to `tree`, whose root must be the request's last token.
  // expected_len >= 0 is checked against the request's length (the caller's
  // view of the sequence); -1 skips the check. *added (may be null) is the
  // number of nodes new to the tree. Allocates nothing.
  Status propose(int64_t rid, DraftTree* tree, int32_t proposer, int64_t expected_len, int32_t* added);

  bool is_live(int64_t rid) const { return live_.count(rid) != 0; }
  Status request_length(int64_t rid, int64_t* n) const;
  int64_t memory_bytes() const;
  int64_t corpus_tokens() const { return stats_.corpus_tokens; }
  SuffixStats stats() const;
  const SuffixConfig& config() const { return config_; }

 private:
  struct Occurrence {
    uint64_t pos;
    int32_t own;     // 1: in the request itself, 0: in the corpus
    int32_t match;   // m
  };
  struct TrieNode {
    int32_t token;
    int32_t count;
    int32_t first_child;
    int32_t next_sibling;
    int32_t last_child;
  };
  struct Frontier {
    double prob;       // path probability: product of the frequencies from the root
    double frequency;  // count / total at the parent
    int32_t seq;
    int32_t trie_node;
    int32_t draft_parent;
  };
  struct Request {
    TokenIndex index;
    int64_t prompt_len = 0;
  };

  Status check_ready() const;
  Status check_tokens(const int32_t* tokens, int64_t n, const char* what) const;
  Status find_request(int64_t rid, Request** req);
  void collect(int level, const int32_t* x, uint64_t n, const TokenIndex& own);
  int32_t select_match_length();
  void build_trie(int32_t min_match, const int32_t* x, uint64_t n, int32_t max_depth);
  void push_children(int32_t trie_node, double prob, int32_t draft_parent, int32_t* seq);

  bool ready_ = false;
  SuffixConfig config_;
  TokenIndex corpus_;
  std::unordered_map<int64_t, std::unique_ptr<Request>> live_;
  SuffixStats stats_;
  // Proposal scratch, sized in init() for the worst case so that propose()
  // never allocates.
  std::vector<Occurrence> occ_;
  std::vector<int32_t> support_;   // [max_match + 1]: occurrences per match length
  std::vector<TrieNode> trie_;
  std::vector<Frontier> heap_;
  std::vector<int32_t> kids_;
};

}  // namespace atlas
