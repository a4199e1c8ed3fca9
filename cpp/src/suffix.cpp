// Suffix speculator: hash chains over the request's own tokens and a corpus
// ring of finished outputs; drafts a trie of the continuations of the longest
// credible match (see atlas/suffix.h for the rule).
#include "atlas/suffix.h"

#include <algorithm>
#include <limits>
#include <new>
#include <string>

namespace atlas {

namespace {

uint64_t next_pow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Growable tables start small: most requests are short.
constexpr uint64_t kInitialTable = 16;

// A request longer than this could overflow the 32-bit chain distances; no
// model has such a context.
constexpr int64_t kMaxRequestTokens = (int64_t{1} << 31) - 1;

}  // namespace

// ---- TokenIndex ------------------------------------------------------------------

void TokenIndex::init_growable() {
  *this = TokenIndex();
  ready_ = true;
  ring_ = false;
  for (int l = 0; l < kLevels; ++l) table_[l].assign(kInitialTable, 0u);
}

void TokenIndex::init_ring(uint64_t capacity) {
  // Allocate first: if that throws, *this is left as it was.
  TokenIndex t;
  t.tok_.assign(capacity, kSeparator);
  // Every live slot holds at most one entry per table, so a table of
  // next_pow2(2 * capacity) entries stays at load <= 1/2 and never grows.
  for (int l = 0; l < kLevels; ++l) {
    t.prev_[l].assign(capacity, 0u);
    t.table_[l].assign(next_pow2(2 * capacity), 0u);
  }
  t.ready_ = true;
  t.ring_ = true;
  t.cap_ = capacity;
  *this = std::move(t);
}

uint64_t TokenIndex::pos_of_slot(uint64_t s) const {
  if (!ring_) return s;
  // The live positions [begin_, begin_ + cap_) map one to one onto the slots.
  const uint64_t bs = begin_ % cap_;
  return begin_ + (s >= bs ? s - bs : s + cap_ - bs);
}

uint64_t TokenIndex::anchor_hash(int level, const int32_t* q) const {
  uint64_t h = 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(level);
  for (int32_t i = 0; i < anchor_len(level); ++i) {
    h = (h ^ static_cast<uint32_t>(q[i])) * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
  }
  return h;
}

void TokenIndex::gather(int level, uint64_t pos, int32_t* q) const {
  const int32_t a = anchor_len(level);
  for (int32_t i = 0; i < a; ++i) q[i] = tok_[slot(pos - static_cast<uint64_t>(a - 1 - i))];
}

bool TokenIndex::anchor_equals(int level, uint64_t pos, const int32_t* q) const {
  const int32_t a = anchor_len(level);
  for (int32_t i = 0; i < a; ++i)
    if (tok_[slot(pos - static_cast<uint64_t>(a - 1 - i))] != q[i]) return false;
  return true;
}

uint64_t TokenIndex::find(int level, const int32_t* q, bool* found) const {
  const std::vector<uint32_t>& t = table_[level];
  const uint64_t mask = t.size() - 1;
  uint64_t i = anchor_hash(level, q) & mask;
  while (t[i] != 0) {
    if (anchor_equals(level, pos_of_slot(t[i] - 1), q)) {
      *found = true;
      return i;
    }
    i = (i + 1) & mask;
  }
  *found = false;
  return i;
}

void TokenIndex::erase(int level, uint64_t i) {
  // Backward-shift deletion (linear probing): move later entries of the probe
  // run into the hole unless their home lies cyclically in (i, j].
  std::vector<uint32_t>& t = table_[level];
  const uint64_t mask = t.size() - 1;
  int32_t q[kTrustedMatch];
  uint64_t j = i;
  for (;;) {
    j = (j + 1) & mask;
    if (t[j] == 0) break;
    gather(level, pos_of_slot(t[j] - 1), q);
    const uint64_t home = anchor_hash(level, q) & mask;
    const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (!stays) {
      t[i] = t[j];
      i = j;
    }
  }
  t[i] = 0;
  --table_count_[level];
}

void TokenIndex::grow_table(int level) {
  std::vector<uint32_t> old;
  old.swap(table_[level]);
  table_[level].assign(old.size() * 2, 0u);
  const uint64_t mask = table_[level].size() - 1;
  int32_t q[kTrustedMatch];
  for (uint32_t e : old) {
    if (e == 0) continue;
    gather(level, pos_of_slot(e - 1), q);
    uint64_t i = anchor_hash(level, q) & mask;
    while (table_[level][i] != 0) i = (i + 1) & mask;
    table_[level][i] = e;
  }
}

void TokenIndex::push(int32_t token) {
  const uint64_t p = end_;
  const uint64_t s = slot(p);
  if (ring_) tok_[s] = token;
  else tok_.push_back(token);
  ++end_;
  int32_t q[kTrustedMatch];
  for (int l = 0; l < kLevels; ++l) {
    uint32_t dist = 0;
    const uint64_t a = static_cast<uint64_t>(anchor_len(l));
    if (p - doc_start_ + 1 >= a) {  // the anchor lies inside the document
      if (!ring_ && 2 * (table_count_[l] + 1) > table_[l].size()) grow_table(l);
      gather(l, p, q);
      bool found = false;
      const uint64_t i = find(l, q, &found);
      if (found) dist = static_cast<uint32_t>(p - pos_of_slot(table_[l][i] - 1));
      else ++table_count_[l];
      table_[l][i] = static_cast<uint32_t>(s + 1);
    }
    if (ring_) prev_[l][s] = dist;
    else prev_[l].push_back(dist);
  }
}

void TokenIndex::end_document() {
  const uint64_t s = slot(end_);
  tok_[s] = kSeparator;
  for (int l = 0; l < kLevels; ++l) prev_[l][s] = 0;
  ++end_;
  doc_start_ = end_;
}

uint64_t TokenIndex::evict_oldest() {
  // Positions are unindexed oldest first, so an anchor whose table entry
  // points at the position being evicted has no newer occurrence: its entry
  // goes. The document's tokens stay readable until later pushes overwrite
  // them, and nothing is pushed during an eviction.
  const uint64_t start = begin_;
  uint64_t p = start;
  int32_t q[kTrustedMatch];
  while (tok_[slot(p)] != kSeparator) {
    for (int l = 0; l < kLevels; ++l) {
      if (p - start + 1 < static_cast<uint64_t>(anchor_len(l))) continue;
      gather(l, p, q);
      bool found = false;
      const uint64_t i = find(l, q, &found);
      if (found && table_[l][i] - 1 == slot(p)) erase(l, i);
    }
    ++p;
  }
  begin_ = p + 1;  // past the separator
  return p - start;
}

uint64_t TokenIndex::head(int level, const int32_t* query) const {
  if (!ready_ || end_ == begin_) return kNone;
  bool found = false;
  const uint64_t i = find(level, query, &found);
  return found ? pos_of_slot(table_[level][i] - 1) : kNone;
}

int64_t TokenIndex::memory_bytes() const {
  int64_t b = static_cast<int64_t>(tok_.capacity() * sizeof(int32_t));
  for (int l = 0; l < kLevels; ++l)
    b += static_cast<int64_t>((prev_[l].capacity() + table_[l].capacity()) * sizeof(uint32_t));
  return b;
}

// ---- SuffixSpeculator -----------------------------------------------------------------

Status SuffixSpeculator::init(const SuffixConfig& c) {
  if (c.max_match < 1 || c.max_match > 1024)
    return Status::Invalid("max_match must be in [1, 1024], got " + std::to_string(c.max_match));
  if (c.max_depth < 1 || c.max_depth > kMaxTreeNodes - 1)
    return Status::Invalid("max_depth must be in [1, " + std::to_string(kMaxTreeNodes - 1) + "], got " +
                           std::to_string(c.max_depth));
  if (c.max_occurrences < 1 || c.max_occurrences > 4096)
    return Status::Invalid("max_occurrences must be in [1, 4096], got " + std::to_string(c.max_occurrences));
  // The trie scratch holds max_occurrences * max_depth nodes: keep it a few MB.
  if (static_cast<int64_t>(c.max_occurrences) * c.max_depth > (int64_t{1} << 18))
    return Status::Invalid("max_occurrences * max_depth must be <= 262144 (the proposal scratch), got " +
                           std::to_string(static_cast<int64_t>(c.max_occurrences) * c.max_depth));
  if (c.min_support < 1)
    return Status::Invalid("min_support must be >= 1, got " + std::to_string(c.min_support));
  if (c.max_corpus_tokens != 0 && (c.max_corpus_tokens < 2 || c.max_corpus_tokens > kMaxRequestTokens))
    return Status::Invalid("max_corpus_tokens must be 0 (no corpus) or in [2, 2^31 - 1], got " +
                           std::to_string(c.max_corpus_tokens));
  if (c.vocab_size < 0)
    return Status::Invalid("vocab_size must be >= 0 (0 = unchecked), got " + std::to_string(c.vocab_size));
  if (!(c.min_prob >= 0.0 && c.min_prob <= 1.0))
    return Status::Invalid("min_prob must be in [0, 1], got " + std::to_string(c.min_prob));
  config_ = c;
  corpus_ = TokenIndex();
  live_.clear();
  stats_ = SuffixStats();
  const size_t k = static_cast<size_t>(c.max_occurrences);
  const size_t trie = 1 + k * static_cast<size_t>(c.max_depth);
  occ_.clear();
  occ_.reserve(k);
  support_.assign(static_cast<size_t>(c.max_match) + 1, 0);
  trie_.clear();
  trie_.reserve(trie);
  heap_.clear();
  heap_.reserve(trie);
  kids_.clear();
  kids_.reserve(k);
  ready_ = true;
  return Status::Ok();
}

Status SuffixSpeculator::check_ready() const {
  if (!ready_) return Status::Invalid("the suffix speculator is not initialised");
  return Status::Ok();
}

Status SuffixSpeculator::check_tokens(const int32_t* tokens, int64_t n, const char* what) const {
  if (n < 0) return Status::Invalid(std::string(what) + ": length must be >= 0, got " + std::to_string(n));
  if (n > 0 && tokens == nullptr) return Status::Invalid(std::string(what) + " is null");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    if (t < 0 || (config_.vocab_size > 0 && t >= config_.vocab_size)) {
      const std::string hi =
          config_.vocab_size > 0 ? std::to_string(config_.vocab_size) : std::string("2^31");
      return Status::Invalid(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(t) +
                             " is not a token id in [0, " + hi + ")");
    }
  }
  return Status::Ok();
}

Status SuffixSpeculator::find_request(int64_t rid, Request** req) {
  auto it = live_.find(rid);
  if (it == live_.end())
    return Status::Invalid("rid " + std::to_string(rid) + " is not a live request of the suffix speculator "
                           "(start() it first; finish() ends it)");
  *req = it->second.get();
  return Status::Ok();
}

Status SuffixSpeculator::start(int64_t rid, const int32_t* tokens, int64_t n) {
  ATLAS_RETURN_IF_ERROR(check_ready());
  if (live_.count(rid)) return Status::Invalid("rid " + std::to_string(rid) + " is already a live request");
  if (n < 1) return Status::Invalid("prompt_tokens is empty: a request needs at least one token");
  if (n > kMaxRequestTokens) return Status::Invalid("prompt_tokens is longer than 2^31 - 1 tokens");
  ATLAS_RETURN_IF_ERROR(check_tokens(tokens, n, "prompt_tokens"));
  auto req = std::make_unique<Request>();
  req->index.init_growable();
  for (int64_t i = 0; i < n; ++i) req->index.push(tokens[i]);
  req->prompt_len = n;
  live_.emplace(rid, std::move(req));
  stats_.live_requests = static_cast<int64_t>(live_.size());
  return Status::Ok();
}

Status SuffixSpeculator::extend(int64_t rid, const int32_t* tokens, int64_t n) {
  ATLAS_RETURN_IF_ERROR(check_ready());
  Request* req = nullptr;
  ATLAS_RETURN_IF_ERROR(find_request(rid, &req));
  ATLAS_RETURN_IF_ERROR(check_tokens(tokens, n, "tokens"));
  if (n > kMaxRequestTokens - static_cast<int64_t>(req->index.end()))
    return Status::Invalid("rid " + std::to_string(rid) + " would exceed 2^31 - 1 tokens");
  for (int64_t i = 0; i < n; ++i) req->index.push(tokens[i]);
  return Status::Ok();
}

Status SuffixSpeculator::finish(int64_t rid) {
  ATLAS_RETURN_IF_ERROR(check_ready());
  Request* req = nullptr;
  ATLAS_RETURN_IF_ERROR(find_request(rid, &req));
  const int64_t from = config_.index_prompts ? 0 : req->prompt_len;
  const int64_t len = static_cast<int64_t>(req->index.end());
  Status st = add_document(req->index.data() + from, len - from);
  live_.erase(rid);
  stats_.live_requests = static_cast<int64_t>(live_.size());
  return st;
}

Status SuffixSpeculator::add_document(const int32_t* tokens, int64_t n) {
  ATLAS_RETURN_IF_ERROR(check_ready());
  ATLAS_RETURN_IF_ERROR(check_tokens(tokens, n, "tokens"));
  const int64_t cap = config_.max_corpus_tokens;
  if (cap == 0 || n == 0) return Status::Ok();
  // A document too long for the ring keeps its newest tokens.
  const int64_t keep = std::min<int64_t>(n, cap - 1);
  tokens += n - keep;
  if (!corpus_.ready()) {
    try {
      corpus_.init_ring(static_cast<uint64_t>(cap));
    } catch (const std::bad_alloc&) {
      return Status::Internal("cannot allocate the corpus of max_corpus_tokens = " + std::to_string(cap) +
                              " (about " + std::to_string(28 * cap >> 20) + " MiB): lower max_corpus_tokens");
    }
  }
  while (static_cast<int64_t>(corpus_.end() - corpus_.begin()) + keep + 1 > cap) {
    const uint64_t len = corpus_.evict_oldest();
    stats_.corpus_docs -= 1;
    stats_.corpus_tokens -= static_cast<int64_t>(len);
    stats_.evicted_docs += 1;
    stats_.evicted_tokens += static_cast<int64_t>(len);
  }
  for (int64_t i = 0; i < keep; ++i) corpus_.push(tokens[i]);
  corpus_.end_document();
  stats_.corpus_docs += 1;
  stats_.corpus_tokens += keep;
  return Status::Ok();
}

Status SuffixSpeculator::request_length(int64_t rid, int64_t* n) const {
  ATLAS_RETURN_IF_ERROR(check_ready());
  if (n == nullptr) return Status::Invalid("n output is null");
  auto it = live_.find(rid);
  if (it == live_.end())
    return Status::Invalid("rid " + std::to_string(rid) + " is not a live request of the suffix speculator");
  *n = static_cast<int64_t>(it->second->index.end());
  return Status::Ok();
}

int64_t SuffixSpeculator::memory_bytes() const {
  int64_t b = static_cast<int64_t>(sizeof(*this)) + corpus_.memory_bytes();
  b += static_cast<int64_t>(occ_.capacity() * sizeof(Occurrence) + support_.capacity() * sizeof(int32_t) +
                            trie_.capacity() * sizeof(TrieNode) + heap_.capacity() * sizeof(Frontier) +
                            kids_.capacity() * sizeof(int32_t));
  // The request map: its bucket array, and per request a node (key, pointer,
  // link, cached hash), the Request and its index.
  b += static_cast<int64_t>(live_.bucket_count() * sizeof(void*));
  for (const auto& kv : live_)
    b += static_cast<int64_t>(4 * sizeof(void*) + sizeof(Request)) + kv.second->index.memory_bytes();
  return b;
}

SuffixStats SuffixSpeculator::stats() const {
  SuffixStats s = stats_;
  s.live_requests = static_cast<int64_t>(live_.size());
  return s;
}

void SuffixSpeculator::collect(int level, const int32_t* x, uint64_t n, const TokenIndex& own) {
  // Visits the newest max_occurrences positions with the request's level
  // anchor, its own before the corpus's, and records each occurrence with its
  // match length.
  const uint64_t a = static_cast<uint64_t>(TokenIndex::anchor_len(level));
  const uint64_t max_match = static_cast<uint64_t>(config_.max_match);
  int32_t visited = 0;
  const int32_t budget = config_.max_occurrences;
  // The request's own chain starts at its last position, which is the query
  // itself: its predecessors are the earlier occurrences.
  for (uint64_t e = own.prev(level, n - 1); e != TokenIndex::kNone && visited < budget;
       e = own.prev(level, e)) {
    ++visited;
    uint64_t m = 0;
    while (m < max_match && m <= e && x[e - m] == x[n - 1 - m]) ++m;
    occ_.push_back({e, 1, static_cast<int32_t>(m)});
  }
  if (visited >= budget || !corpus_.ready()) return;
  const uint64_t begin = corpus_.begin();
  for (uint64_t e = corpus_.head(level, x + n - a); e != TokenIndex::kNone && visited < budget;
       e = corpus_.prev(level, e)) {
    ++visited;
    if (corpus_.at(e + 1) == TokenIndex::kSeparator) continue;  // a document's last token: nothing follows
    uint64_t m = 0;
    while (m < max_match && m < n && m <= e - begin && corpus_.at(e - m) == x[n - 1 - m]) ++m;
    occ_.push_back({e, 0, static_cast<int32_t>(m)});
  }
}

int32_t SuffixSpeculator::select_match_length() {
  int32_t longest = 0;
  for (const Occurrence& o : occ_) longest = std::max(longest, o.match);
  if (longest >= kTrustedMatch) return longest;
  // support_[L] = occurrences with m == L; accumulate from the longest down.
  int32_t* sup = support_.data();
  for (int32_t l = 0; l <= longest; ++l) sup[l] = 0;
  for (const Occurrence& o : occ_) ++sup[o.match];
  int32_t at_least = 0;
  for (int32_t l = longest; l >= 1; --l) {
    at_least += sup[l];
    if (at_least >= config_.min_support) return l;
  }
  return longest;
}

void SuffixSpeculator::build_trie(int32_t min_match, const int32_t* x, uint64_t n, int32_t max_depth) {
  trie_.clear();
  trie_.push_back({-1, 0, -1, -1, -1});
  const uint64_t depth = static_cast<uint64_t>(max_depth);
  for (const Occurrence& o : occ_) {
    if (o.match < min_match) continue;
    int32_t cur = 0;
    ++trie_[0].count;
    for (uint64_t d = 1; d <= depth; ++d) {
      int32_t t;
      if (o.own) {
        // A match at least as long as its distance p to the request's end
        // shows the text repeating with period p: the continuation repeats
        // x[e+1 .. n-1]. Otherwise it stops at the request's last token.
        const uint64_t period = n - 1 - o.pos;
        if (static_cast<uint64_t>(o.match) >= period) {
          t = x[o.pos + 1 + (d - 1) % period];
        } else {
          if (o.pos + d >= n) break;
          t = x[o.pos + d];
        }
      } else {
        t = corpus_.at(o.pos + d);  // a separator ends every document before end()
        if (t == TokenIndex::kSeparator) break;
      }
      int32_t child = trie_[cur].first_child;
      while (child >= 0 && trie_[child].token != t) child = trie_[child].next_sibling;
      if (child < 0) {
        child = static_cast<int32_t>(trie_.size());
        trie_.push_back({t, 0, -1, -1, -1});
        if (trie_[cur].last_child < 0) trie_[cur].first_child = child;
        else trie_[trie_[cur].last_child].next_sibling = child;
        trie_[cur].last_child = child;
      }
      ++trie_[child].count;
      cur = child;
    }
  }
}

namespace {
// Max-heap order: higher probability first, then the earlier queued.
struct FrontierLess {
  template <typename F>
  bool operator()(const F& a, const F& b) const {
    if (a.prob != b.prob) return a.prob < b.prob;
    return a.seq > b.seq;
  }
};
}  // namespace

void SuffixSpeculator::push_children(int32_t node, double prob, int32_t draft_parent, int32_t* seq) {
  kids_.clear();
  int64_t total = 0;
  for (int32_t c = trie_[node].first_child; c >= 0; c = trie_[c].next_sibling) {
    kids_.push_back(c);
    total += trie_[c].count;
  }
  // Stable insertion sort by count, descending: equal counts keep first-seen order.
  for (size_t i = 1; i < kids_.size(); ++i) {
    const int32_t k = kids_[i];
    size_t j = i;
    while (j > 0 && trie_[kids_[j - 1]].count < trie_[k].count) {
      kids_[j] = kids_[j - 1];
      --j;
    }
    kids_[j] = k;
  }
  for (int32_t c : kids_) {
    const double freq = static_cast<double>(trie_[c].count) / static_cast<double>(total);
    heap_.push_back({prob * freq, freq, (*seq)++, c, draft_parent});
    std::push_heap(heap_.begin(), heap_.end(), FrontierLess());
  }
}

Status SuffixSpeculator::propose(int64_t rid, DraftTree* tree, int32_t proposer, int64_t expected_len,
                                 int32_t* added) {
  if (added) *added = 0;
  ATLAS_RETURN_IF_ERROR(check_ready());
  if (tree == nullptr) return Status::Invalid("tree is null");
  if (proposer < 0 || proposer >= kMaxProposers)
    return Status::Invalid("proposer must be in [0, " + std::to_string(kMaxProposers) + "), got " +
                           std::to_string(proposer));
  Request* req = nullptr;
  ATLAS_RETURN_IF_ERROR(find_request(rid, &req));
  const TokenIndex& own = req->index;
  const uint64_t n = own.end();
  if (expected_len >= 0 && static_cast<uint64_t>(expected_len) != n)
    return Status::Invalid("rid " + std::to_string(rid) + " has " + std::to_string(n) +
                           " tokens in the suffix speculator but the context has " +
                           std::to_string(expected_len) +
                           ": committed tokens were not all passed to extend()");
  if (tree->size() < 1) return Status::Invalid("tree is not initialised");
  const int32_t* x = own.data();
  if (tree->node(0).token != x[n - 1])
    return Status::Invalid("the tree's root token " + std::to_string(tree->node(0).token) +
                           " is not the last token " + std::to_string(x[n - 1]) + " of rid " +
                           std::to_string(rid));
  if (tree->size() >= tree->max_nodes()) return Status::Ok();
  ++stats_.proposals;

  occ_.clear();
  if (config_.max_match >= kTrustedMatch && n >= static_cast<uint64_t>(kTrustedMatch)) collect(1, x, n, own);
  if (occ_.empty()) collect(0, x, n, own);
  if (occ_.empty()) return Status::Ok();
  const int32_t ls = select_match_length();
  ++stats_.matched;
  stats_.match_length_sum += ls;
  // No node of a tree of max_nodes lies deeper than max_nodes - 1, so
  // continuations are cut there: the same tree, less work for small budgets.
  build_trie(ls, x, n, std::min(config_.max_depth, tree->max_nodes() - 1));

  const double weight = ls / (ls + kMatchPrior);   // rule 3: the match's weight in every confidence
  heap_.clear();
  int32_t seq = 0;
  push_children(0, 1.0, 0, &seq);
  const int32_t size_before = tree->size();
  while (!heap_.empty()) {
    std::pop_heap(heap_.begin(), heap_.end(), FrontierLess());
    const Frontier f = heap_.back();
    heap_.pop_back();
    if (f.prob < config_.min_prob) break;  // every queued path is at most this likely
    int32_t node = -1;
    ATLAS_RETURN_IF_ERROR(
        tree->add_child(f.draft_parent, trie_[f.trie_node].token, static_cast<float>(f.frequency * weight),
                        proposer, &node));
    if (node < 0) break;  // the budget is reached
    push_children(f.trie_node, f.prob, node, &seq);
  }
  const int32_t grown = tree->size() - size_before;
  stats_.proposed_nodes += grown;
  if (added) *added = grown;
  return Status::Ok();
}

}  // namespace atlas
