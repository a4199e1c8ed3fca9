// atlas/kv_cache.cpp: the paged KV cache's metadata (free list, reference
// counts, block tables) and the row moves that reserve and commit imply.
//
// Invariant between calls, for every live sequence s:
//   s.blocks.size() == ceil((s.length + s.reserved) / block_size)
// and every block id in a table has a reference count >= 1 equal to the number
// of tables that hold it; a block is on the free list iff its count is 0.
#include "atlas/kv_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace atlas {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a * b when it fits in int64 (both non-negative), else -1.
int64_t checked_mul(int64_t a, int64_t b) {
  if (a < 0 || b < 0) return -1;
  if (a != 0 && b > INT64_MAX / a) return -1;
  return a * b;
}

// Why 64: row moves are batched so that host copies run plane by plane (one
// layer's keys, then its values, ...), which keeps each plane's rows in cache;
// 64 rows cover any realistic accepted path or copy-on-write block in one batch.
constexpr int kCopyBatch = 64;

// Why 65536: pending copies per step are at most (block_size - 1) copy-on-write
// rows plus the accepted path per sequence; 64Ki rows (1 MiB) covers hundreds of
// sequences per step before the list would have to grow.
constexpr int64_t kPendingCapacity = 1 << 16;

uint64_t splitmix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

int64_t kv_storage_bytes(const KVCacheConfig& c) {
  if (c.num_layers < 1 || c.num_kv_heads < 1 || c.head_dim < 1 || c.num_blocks < 1 || c.block_size < 1)
    return -1;
  if (c.dtype != DType::kFloat32 && c.dtype != DType::kBFloat16) return -1;
  int64_t n = 2 * static_cast<int64_t>(c.num_layers);
  for (int64_t f : {static_cast<int64_t>(c.num_blocks), static_cast<int64_t>(c.block_size),
                    static_cast<int64_t>(c.num_kv_heads), static_cast<int64_t>(c.head_dim),
                    dtype_size(c.dtype)}) {
    n = checked_mul(n, f);
    if (n < 0) return -1;
  }
  return n;
}

void copy_slots_host(const KVCacheConfig& c, void* storage, const SlotCopy* copies, int64_t n) {
  const int64_t row = static_cast<int64_t>(c.num_kv_heads) * c.head_dim * dtype_size(c.dtype);
  const int64_t plane = static_cast<int64_t>(c.num_blocks) * c.block_size * row;
  char* base = static_cast<char*>(storage);
  // Plane by plane: each (layer, K or V) plane is independent, so applying the
  // copies in order within every plane is the same as applying them in order.
  for (int64_t p = 0; p < 2 * static_cast<int64_t>(c.num_layers); ++p) {
    char* pl = base + p * plane;
    for (int64_t i = 0; i < n; ++i) {
      if (copies[i].src_slot == copies[i].dst_slot) continue;
      std::memcpy(pl + copies[i].dst_slot * row, pl + copies[i].src_slot * row, static_cast<size_t>(row));
    }
  }
}

namespace {

// Collects row copies and applies them in order, in batches (host) or appends
// them to the pending list (device).
class RowCopier {
 public:
  explicit RowCopier(std::vector<SlotCopy>* pending, const KVCacheConfig& c, void* storage, bool host)
      : pending_(pending), config_(c), storage_(storage), host_(host) {}
  ~RowCopier() { flush(); }
  void add(int64_t src, int64_t dst) {
    if (!host_) {
      pending_->push_back({src, dst});
      return;
    }
    buf_[n_++] = {src, dst};
    if (n_ == kCopyBatch) flush();
  }
  void flush() {
    if (n_ > 0) copy_slots_host(config_, storage_, buf_, n_);
    n_ = 0;
  }

 private:
  std::vector<SlotCopy>* pending_;
  const KVCacheConfig& config_;
  void* storage_;
  bool host_;
  SlotCopy buf_[kCopyBatch];
  int n_ = 0;
};

}  // namespace

Status PagedKVCache::init(const KVCacheConfig& c, void* storage, int64_t storage_bytes, bool host_storage) {
  config_ = KVCacheConfig{};  // uninitialised until every check passed
  seqs_.clear();
  free_.clear();
  ref_counts_.clear();
  pending_.clear();
  storage_ = nullptr;
  const std::pair<const char*, int32_t> sizes[] = {{"num_layers", c.num_layers},
                                                   {"num_kv_heads", c.num_kv_heads},
                                                   {"head_dim", c.head_dim},
                                                   {"num_blocks", c.num_blocks},
                                                   {"block_size", c.block_size},
                                                   {"max_seqs", c.max_seqs}};
  for (const auto& s : sizes)
    if (s.second < 1) return Status::Invalid(std::string(s.first) + " must be >= 1, got " + str(s.second));
  if (c.dtype != DType::kFloat32 && c.dtype != DType::kBFloat16)
    return Status::Invalid("dtype must be float32 or bfloat16");
  const int64_t need = kv_storage_bytes(c);
  if (need < 0) return Status::Invalid("the storage size of this config overflows int64");
  if (storage == nullptr) return Status::Invalid("storage must not be null");
  if (reinterpret_cast<uintptr_t>(storage) % static_cast<uintptr_t>(dtype_size(c.dtype)) != 0)
    return Status::Invalid("storage must be aligned to its element size");
  if (storage_bytes < need)
    return Status::Invalid("storage holds " + str(storage_bytes) + " bytes, the config needs " + str(need));
  try {
    // Every table gets its full capacity now, so reserve/fork never allocate.
    seqs_.resize(static_cast<size_t>(c.max_seqs));
    for (Sequence& s : seqs_) s.blocks.reserve(static_cast<size_t>(c.num_blocks));
    ref_counts_.assign(static_cast<size_t>(c.num_blocks), 0);
    free_.reserve(static_cast<size_t>(c.num_blocks));
    // Stack order: block 0 is handed out first.
    for (int32_t b = c.num_blocks - 1; b >= 0; --b) free_.push_back(b);
    if (!host_storage)
      pending_.reserve(static_cast<size_t>(
          std::min<int64_t>(kPendingCapacity, static_cast<int64_t>(c.num_blocks) * c.block_size)));
  } catch (const std::bad_alloc&) {
    seqs_.clear();
    seqs_.shrink_to_fit();
    free_.clear();
    ref_counts_.clear();
    return Status::Internal("cannot allocate the block tables for max_seqs = " + str(c.max_seqs) +
                            " x num_blocks = " + str(c.num_blocks));
  } catch (const std::length_error&) {
    seqs_.clear();
    free_.clear();
    ref_counts_.clear();
    return Status::Internal("block tables for max_seqs x num_blocks are too large");
  }
  config_ = c;
  storage_ = storage;
  host_storage_ = host_storage;
  token_row_bytes_ = static_cast<int64_t>(c.num_kv_heads) * c.head_dim * dtype_size(c.dtype);
  return Status::Ok();
}

Status PagedKVCache::check_seq(int32_t seq) const {
  if (seqs_.empty()) return Status::Invalid("the KV cache is not initialised");
  if (seq < 0 || seq >= static_cast<int32_t>(seqs_.size()))
    return Status::Invalid("seq must be in [0, max_seqs = " + str(static_cast<int64_t>(seqs_.size())) +
                           "), got " + str(seq));
  if (!seqs_[static_cast<size_t>(seq)].live)
    return Status::Invalid("seq " + str(seq) + " is not a live sequence (never created or released)");
  return Status::Ok();
}

Status PagedKVCache::create(int32_t* seq) {
  if (seqs_.empty()) return Status::Invalid("the KV cache is not initialised");
  if (seq == nullptr) return Status::Invalid("seq (output) must not be null");
  for (size_t i = 0; i < seqs_.size(); ++i) {
    Sequence& s = seqs_[i];
    if (s.live) continue;
    s.live = true;
    s.length = 0;
    s.reserved = 0;
    s.blocks.clear();
    *seq = static_cast<int32_t>(i);
    return Status::Ok();
  }
  return Status::CacheFull("all max_seqs = " + str(config_.max_seqs) + " sequences are live");
}

Status PagedKVCache::fork(int32_t parent, int32_t* child) {
  ATLAS_RETURN_IF_ERROR(check_seq(parent));
  if (child == nullptr) return Status::Invalid("child (output) must not be null");
  int32_t id = -1;
  ATLAS_RETURN_IF_ERROR(create(&id));
  const Sequence& p = seqs_[static_cast<size_t>(parent)];
  Sequence& s = seqs_[static_cast<size_t>(id)];
  // Only the blocks that hold committed tokens are shared; the parent's reserved
  // slots past them stay private to the parent.
  const int64_t n = ceil_div(p.length, config_.block_size);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = p.blocks[static_cast<size_t>(i)];
    s.blocks.push_back(b);
    ++ref_counts_[static_cast<size_t>(b)];
  }
  s.length = p.length;
  *child = id;
  return Status::Ok();
}

Status PagedKVCache::release(int32_t seq) {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  Sequence& s = seqs_[static_cast<size_t>(seq)];
  // Last block first, so that the free stack hands the first block out first.
  for (size_t i = s.blocks.size(); i-- > 0;) {
    const int32_t b = s.blocks[i];
    if (--ref_counts_[static_cast<size_t>(b)] == 0) free_.push_back(b);
  }
  s.blocks.clear();
  s.live = false;
  s.length = 0;
  s.reserved = 0;
  return Status::Ok();
}

Status PagedKVCache::reserve(int32_t seq, int32_t n, int64_t* slots) {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  if (n < 1) return Status::Invalid("n must be >= 1, got " + str(n));
  if (slots == nullptr) return Status::Invalid("slots (output) must not be null");
  Sequence& s = seqs_[static_cast<size_t>(seq)];
  if (s.reserved != 0)
    return Status::Invalid("seq " + str(seq) + " already holds a reservation of " + str(s.reserved) +
                           " slots; commit it before reserving again");
  const int64_t bs = config_.block_size;
  const int64_t have = static_cast<int64_t>(s.blocks.size());
  const int64_t need = ceil_div(s.length + n, bs);
  const int64_t fill = s.length % bs;  // committed rows in the last block
  const bool cow = fill != 0 && ref_counts_[static_cast<size_t>(s.blocks.back())] > 1;
  const int64_t take = need - have + (cow ? 1 : 0);
  // Everything is checked before anything changes: all or nothing.
  if (take > static_cast<int64_t>(free_.size()))
    return Status::CacheFull("reserve(seq = " + str(seq) + ", n = " + str(n) + ") needs " + str(take) +
                             " free blocks, " + str(static_cast<int64_t>(free_.size())) + " are free");
  if (cow) {
    // The last block is shared and partly filled: the reserved slots would land
    // in it, so this sequence gets its own copy of the committed rows first.
    const int32_t old = s.blocks.back();
    const int32_t fresh = free_.back();
    free_.pop_back();
    ref_counts_[static_cast<size_t>(fresh)] = 1;
    --ref_counts_[static_cast<size_t>(old)];  // stays >= 1: it was shared
    RowCopier copier(&pending_, config_, storage_, host_storage_);
    for (int64_t off = 0; off < fill; ++off) copier.add(old * bs + off, fresh * bs + off);
    s.blocks.back() = fresh;
  }
  for (int64_t i = have; i < need; ++i) {
    const int32_t b = free_.back();
    free_.pop_back();
    ref_counts_[static_cast<size_t>(b)] = 1;
    s.blocks.push_back(b);
  }
  s.reserved = n;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = s.length + i;
    slots[i] = static_cast<int64_t>(s.blocks[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
  }
  return Status::Ok();
}

Status PagedKVCache::commit(int32_t seq, const int32_t* keep, int32_t n_keep) {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  Sequence& s = seqs_[static_cast<size_t>(seq)];
  const int32_t r = s.reserved;
  int32_t kept = r;
  if (keep == nullptr) {
    if (n_keep != 0 && n_keep != r)
      return Status::Invalid("keep is null (keep all " + str(r) +
                             " reserved slots), so n_keep must be 0 or " + str(r) + ", got " + str(n_keep));
  } else {
    if (n_keep < 0 || n_keep > r)
      return Status::Invalid("n_keep must be in [0, reserved = " + str(r) + "], got " + str(n_keep));
    for (int32_t j = 0; j < n_keep; ++j) {
      if (keep[j] < 0 || keep[j] >= r)
        return Status::Invalid("keep[" + str(j) + "] must be in [0, reserved = " + str(r) + "), got " +
                               str(keep[j]));
      if (j > 0 && keep[j] <= keep[j - 1])
        return Status::Invalid("keep must be strictly increasing, but keep[" + str(j) + "] = " +
                               str(keep[j]) + " <= keep[" + str(j - 1) + "] = " + str(keep[j - 1]));
    }
    kept = n_keep;
  }
  const int64_t bs = config_.block_size;
  const int64_t len = s.length;
  if (keep != nullptr) {
    // Kept entry j moves from reserved position len + keep[j] to len + j. keep
    // is strictly increasing from >= 0, so keep[j] >= j: every move goes down
    // (dst <= src), and a later move's source len + keep[j'] > len + keep[j] >=
    // len + j lies above every earlier destination. Applied in order, no move
    // overwrites a row that a later move still has to read.
    RowCopier copier(&pending_, config_, storage_, host_storage_);
    for (int32_t j = 0; j < n_keep; ++j) {
      if (keep[j] == j) continue;
      const int64_t src = len + keep[j];
      const int64_t dst = len + j;
      copier.add(static_cast<int64_t>(s.blocks[static_cast<size_t>(src / bs)]) * bs + src % bs,
                 static_cast<int64_t>(s.blocks[static_cast<size_t>(dst / bs)]) * bs + dst % bs);
    }
  }
  s.length = len + kept;
  s.reserved = 0;
  drop_blocks_past_length(s);
  return Status::Ok();
}

void PagedKVCache::drop_blocks_past_length(Sequence& s) {
  const size_t need = static_cast<size_t>(ceil_div(s.length, config_.block_size));
  while (s.blocks.size() > need) {
    const int32_t b = s.blocks.back();
    s.blocks.pop_back();
    if (--ref_counts_[static_cast<size_t>(b)] == 0) free_.push_back(b);
  }
}

Status PagedKVCache::truncate(int32_t seq, int64_t new_length) {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  Sequence& s = seqs_[static_cast<size_t>(seq)];
  if (s.reserved != 0)
    return Status::Invalid("seq " + str(seq) + " holds a reservation of " + str(s.reserved) +
                           " slots; commit it before truncating");
  if (new_length < 0 || new_length > s.length)
    return Status::Invalid("new_length must be in [0, length = " + str(s.length) + "], got " + str(new_length));
  // Rows past new_length are simply forgotten: a later reserve hands them out
  // again and the forward overwrites them. A shared last block stays shared;
  // reserve copies it on write.
  s.length = new_length;
  drop_blocks_past_length(s);
  return Status::Ok();
}

Status PagedKVCache::slot_of(int32_t seq, int64_t pos, int64_t* slot) const {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  if (slot == nullptr) return Status::Invalid("slot (output) must not be null");
  const Sequence& s = seqs_[static_cast<size_t>(seq)];
  const int64_t end = s.length + s.reserved;
  if (pos < 0 || pos >= end)
    return Status::Invalid("pos must be in [0, length + reserved = " + str(end) + "), got " + str(pos));
  const int64_t bs = config_.block_size;
  *slot = static_cast<int64_t>(s.blocks[static_cast<size_t>(pos / bs)]) * bs + pos % bs;
  return Status::Ok();
}

Status PagedKVCache::length(int32_t seq, int64_t* len) const {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  if (len == nullptr) return Status::Invalid("len (output) must not be null");
  *len = seqs_[static_cast<size_t>(seq)].length;
  return Status::Ok();
}

Status PagedKVCache::reserved(int32_t seq, int32_t* n) const {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  if (n == nullptr) return Status::Invalid("n (output) must not be null");
  *n = seqs_[static_cast<size_t>(seq)].reserved;
  return Status::Ok();
}

Status PagedKVCache::block_table(int32_t seq, const int32_t** table, int32_t* num_blocks) const {
  ATLAS_RETURN_IF_ERROR(check_seq(seq));
  if (table == nullptr || num_blocks == nullptr)
    return Status::Invalid("table and num_blocks must not be null");
  const Sequence& s = seqs_[static_cast<size_t>(seq)];
  *table = s.blocks.data();
  *num_blocks = static_cast<int32_t>(s.blocks.size());
  return Status::Ok();
}

Status PagedKVCache::ref_count(int32_t block, int32_t* count) const {
  if (seqs_.empty()) return Status::Invalid("the KV cache is not initialised");
  if (count == nullptr) return Status::Invalid("count (output) must not be null");
  if (block < 0 || block >= config_.num_blocks)
    return Status::Invalid("block must be in [0, num_blocks = " + str(config_.num_blocks) + "), got " +
                           str(block));
  *count = ref_counts_[static_cast<size_t>(block)];
  return Status::Ok();
}

int32_t PagedKVCache::num_live_seqs() const {
  int32_t n = 0;
  for (const Sequence& s : seqs_) n += s.live ? 1 : 0;
  return n;
}

void PagedKVCache::shuffle_free_blocks(uint64_t seed) {
  // Fisher-Yates with splitmix64: the same seed gives the same order everywhere.
  uint64_t state = seed;
  for (size_t i = free_.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(splitmix64(&state) % i);
    std::swap(free_[i - 1], free_[j]);
  }
}

}  // namespace atlas
