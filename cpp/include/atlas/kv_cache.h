// atlas/kv_cache.h: paged key/value cache (metadata on the host, storage
// anywhere).
//
// Storage layout. One contiguous, row-major buffer of shape
//
//     [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
//
// (index 0 of the second axis = keys, 1 = values), dtype float32 or bfloat16.
// A *slot* names one token position in the pool: slot = block * block_size +
// offset. So storage[layer, kv].view(num_blocks * block_size, heads, head_dim)
// [slot] is that token's key (kv = 0) or value (kv = 1) for that layer; the
// target forward writes its new keys and values there with one index_copy.
//
// Ownership. The caller allocates and owns the storage (a torch tensor on the
// CPU or a GPU, or a numpy array) and keeps it alive as long as the cache; the
// PagedKVCache owns only the metadata: the free list, reference counts and one
// block table per sequence. When the storage is host memory the cache moves
// token data itself; when it is device memory (host_storage = false), every
// operation that must move data leaves the moves in pending_copies() for a
// device kernel to apply before the next forward.
//
// Lifecycle of a sequence: create -> (reserve -> forward writes the reserved
// slots -> commit)* -> release. fork shares a sequence's blocks with a new one.
//
// Preconditions whose breach corrupts state:
//   - only reserved slots may be written by the caller; committed slots of a
//     block shared by several sequences are read-only.
//   - between reserve and commit the sequence takes no other reserve.
#pragma once

#include <cstdint>
#include <vector>

#include "atlas/common.h"

namespace atlas {

struct KVCacheConfig {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 16;
  int32_t max_seqs = 256;
  DType dtype = DType::kFloat32;
};

// Bytes of storage a config needs; -1 when a size is not positive, the dtype is
// unknown or the product overflows int64.
int64_t kv_storage_bytes(const KVCacheConfig& config);

// One token-row copy: every layer's key and value at src_slot is copied to
// dst_slot (src and dst never overlap as rows; order matters: apply in order).
struct SlotCopy {
  int64_t src_slot;
  int64_t dst_slot;
};

class PagedKVCache {
 public:
  // storage must hold kv_storage_bytes(config) bytes. host_storage says whether
  // the cache may touch it (CPU memory) or must leave moves pending (GPU).
  Status init(const KVCacheConfig& config, void* storage, int64_t storage_bytes, bool host_storage);

  // A new, empty sequence. CacheFull when max_seqs sequences are live.
  Status create(int32_t* seq);

  // A new sequence with the same committed tokens as `parent`, sharing its
  // blocks (each shared block's reference count goes up by one). No data moves.
  Status fork(int32_t parent, int32_t* child);

  // Drops the sequence and its references; blocks whose count reaches zero
  // return to the free list.
  Status release(int32_t seq);

  // Appends n slots after the committed tokens (positions length .. length+n-1)
  // and writes their slot ids to slots[0..n). Allocates blocks as needed; if the
  // last, partly filled block is shared with another sequence it is copied
  // first (copy on write), so every reserved slot is private. All or nothing:
  // CacheFull leaves every sequence and the free list exactly as they were.
  // A second reserve before commit is an error.
  Status reserve(int32_t seq, int32_t n, int64_t* slots);

  // Ends the reservation: the reserved slots keep[0..n_keep) (indices into the
  // reservation, strictly increasing) become the next n_keep positions, in
  // order; every other reserved slot is dropped and blocks past the new length
  // are freed. keep == null keeps all reserved slots.
  Status commit(int32_t seq, const int32_t* keep, int32_t n_keep);

  // Drops the committed positions new_length .. length-1 (e.g. rejected drafts
  // of a draft model); blocks past the new length are freed. No reservation may
  // be pending.
  Status truncate(int32_t seq, int64_t new_length);

  // Slot of position pos (< length + reserved) of the sequence.
  Status slot_of(int32_t seq, int64_t pos, int64_t* slot) const;

  Status length(int32_t seq, int64_t* len) const;      // committed tokens
  Status reserved(int32_t seq, int32_t* n) const;      // reserved, not yet committed
  Status block_table(int32_t seq, const int32_t** table, int32_t* num_blocks) const;
  Status ref_count(int32_t block, int32_t* count) const;

  int32_t num_free_blocks() const { return static_cast<int32_t>(free_.size()); }
  int32_t num_live_seqs() const;
  const KVCacheConfig& config() const { return config_; }
  void* storage() const { return storage_; }
  bool host_storage() const { return host_storage_; }

  // Row copies left for a device kernel (host_storage = false); the caller
  // applies them in order and then calls clear_pending_copies().
  const std::vector<SlotCopy>& pending_copies() const { return pending_; }
  void clear_pending_copies() { pending_.clear(); }

  // Permutes the free list (tests: results must not depend on block order).
  void shuffle_free_blocks(uint64_t seed);

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    int32_t reserved = 0;
    std::vector<int32_t> blocks;  // capacity num_blocks, reserved at init
  };

  Status check_seq(int32_t seq) const;
  void drop_blocks_past_length(Sequence& s);

  KVCacheConfig config_;
  void* storage_ = nullptr;
  bool host_storage_ = true;
  int64_t token_row_bytes_ = 0;  // num_kv_heads * head_dim * dtype size
  std::vector<Sequence> seqs_;
  std::vector<int32_t> free_;       // stack of free block ids
  std::vector<int32_t> ref_counts_; // per block
  std::vector<SlotCopy> pending_;
};

// Copies token rows within host storage laid out as above (all layers, K and V).
void copy_slots_host(const KVCacheConfig& config, void* storage, const SlotCopy* copies, int64_t n);

}  // namespace atlas
